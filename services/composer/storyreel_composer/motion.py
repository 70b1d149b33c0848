"""Ken Burns moves: a slow zoom or pan per scene, chosen from the seed.

A move is described in the picture's own coordinates, so that one description
drives both the ffmpeg ``zoompan`` filter (the renderer) and the reference
frames computed in Python (tests, the moviepy model).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: Every kind of move; a scene never repeats the previous scene's kind.
KINDS = ("zoom_in", "zoom_out", "pan_left", "pan_right", "pan_up", "pan_down")


@dataclass(frozen=True)
class Move:
    """Zoom and focus at the start and end of a scene.

    ``zoom`` is how much the picture is magnified (1 shows all of it); the
    focus (fx, fy) in 0..1 says where the visible window sits in the slack the
    zoom leaves: 0 left/top, 0.5 centre, 1 right/bottom.
    """

    kind: str
    zoom_from: float
    zoom_to: float
    fx_from: float = 0.5
    fx_to: float = 0.5
    fy_from: float = 0.5
    fy_to: float = 0.5

    def window(self, progress: float, width: float, height: float) -> tuple[float, float, float]:
        """Visible window at ``progress`` (0..1) of a ``width`` x ``height`` picture.

        Returns (left, top, zoom): the window is width/zoom x height/zoom.
        """
        p = min(max(progress, 0.0), 1.0)
        zoom = self.zoom_from + (self.zoom_to - self.zoom_from) * p
        fx = self.fx_from + (self.fx_to - self.fx_from) * p
        fy = self.fy_from + (self.fy_to - self.fy_from) * p
        return fx * (width - width / zoom), fy * (height - height / zoom), zoom

    def zoompan(self, frames: int, width: int, height: int, fps: int, lead: int = 0) -> str:
        """The ``zoompan`` filter that plays this move over ``frames`` output frames.

        ``lead`` extra frames come first, showing the move's start (the
        renderer hides them under the previous shot).
        """
        p = f"clip((on-{lead})/{max(frames - 1, 1)},0,1)"
        zoom = _lerp(self.zoom_from, self.zoom_to, p)
        fx = _lerp(self.fx_from, self.fx_to, p)
        fy = _lerp(self.fy_from, self.fy_to, p)
        return (
            f"zoompan=z='{zoom}':x='{fx}*(iw-iw/zoom)':y='{fy}*(ih-ih/zoom)'"
            f":d={frames + lead}:s={width}x{height}:fps={fps}"
        )


STILL = Move("still", 1.0, 1.0)


def _lerp(start: float, end: float, p: str) -> str:
    if start == end:
        return f"{start:.6f}"
    return f"({start:.6f}{end - start:+.6f}*{p})"


def choose_moves(seed: int, count: int, zoom: float) -> list[Move]:
    """One move per scene, the same for the same seed; no kind twice in a row.

    Zooms run between 1 and ``zoom`` towards a focus near the centre; pans
    cross the slack a ``zoom`` magnification leaves, at that zoom.
    """
    rng = random.Random(f"storyreel-ken-burns/{seed}")
    moves: list[Move] = []
    previous = None
    for _ in range(count):
        kind = rng.choice([k for k in KINDS if k != previous])
        previous = kind
        if kind in ("zoom_in", "zoom_out"):
            fx, fy = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
            start, end = (1.0, zoom) if kind == "zoom_in" else (zoom, 1.0)
            moves.append(Move(kind, start, end, fx, fx, fy, fy))
        else:
            edge_from, edge_to = (1.0, 0.0) if kind in ("pan_left", "pan_up") else (0.0, 1.0)
            if kind in ("pan_left", "pan_right"):
                moves.append(Move(kind, zoom, zoom, fx_from=edge_from, fx_to=edge_to))
            else:
                moves.append(Move(kind, zoom, zoom, fy_from=edge_from, fy_to=edge_to))
    return moves
