"""Pictures as drawn, in the composed video (issue 17, item 1).

A transparent PNG shows the background where it is transparent and a mix where it is
translucent, in the frames the composer encodes (decoded back with ffmpeg), never the
colour the file stores under its transparent pixels. An image enlarged far past its size to
fill the frame is said in the result's warnings (the gateway's job events carry them:
tests/gateway/test_soundtracks.py).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from storyreel_composer.composer import Scene, VideoComposer
from storyreel_composer.images import BACKGROUND
from support import ffmpeg_decode, probe_media

from storyreel.compose_options import ComposeOptions

#: Still pictures, hard cuts, no captions: every frame of a scene is its canvas.
STILL = ComposeOptions(motion="none", transition="cut", captions="off")


def _png(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save)
    return buffer.getvalue()


def _frame_at(path, seconds: float) -> np.ndarray:
    media = probe_media(path)
    raw = ffmpeg_decode(path, "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", seek=seconds)
    return np.frombuffer(raw, np.uint8).reshape(media.height, media.width, 3).astype(int)


def _close(region: np.ndarray, colour, tolerance: int) -> bool:
    """Whether the region's mean colour is within ``tolerance`` of ``colour`` in every channel
    (H.264 in yuv420p shifts flat colours by a few levels)."""
    return bool(np.abs(region.reshape(-1, 3).mean(axis=0) - colour).max() <= tolerance)


async def test_transparent_and_palette_pngs_are_composed_over_the_background(
    unvoiced_composer: VideoComposer, file_store, make_audio
):
    # Scene 1: the left half transparent over green, the right half red at half opacity.
    rgba = Image.new("RGBA", (128, 128), (0, 255, 0, 0))
    rgba.paste((255, 0, 0, 128), (64, 0, 128, 128))
    # Scene 2: a palette image whose index 0 (green) is transparent; the right half blue.
    palette = Image.new("P", (128, 128), 0)
    palette.putpalette([0, 255, 0] + [0, 0, 255] + [0] * (256 - 2) * 3)
    palette.paste(1, (64, 0, 128, 128))
    images = [
        file_store.put_bytes("jobs/inputs/images/rgba.png", _png(rgba)),
        file_store.put_bytes("jobs/inputs/images/palette.png", _png(palette, transparency=0)),
    ]
    audio = file_store.put_file("jobs/inputs/a.wav", make_audio("a.wav", "sine", 2.0))

    result = await unvoiced_composer.compose(
        "job-alpha", [Scene(uri) for uri in images], audio, options=STILL
    )
    video = file_store.path_of(result.video_uri)
    assert (result.width, result.height) == (128, 128)

    first, second = _frame_at(video, 0.5), _frame_at(video, 1.5)
    # Where the pictures are transparent: the background, never the stored green.
    assert _close(first[8:120, 8:56], BACKGROUND, 6), first[8:120, 8:56].mean(axis=(0, 1))
    assert _close(second[8:120, 8:56], BACKGROUND, 6), second[8:120, 8:56].mean(axis=(0, 1))
    # Half-opaque red over black is half red; the palette's opaque half is as drawn.
    assert _close(first[8:120, 72:120], (128, 0, 0), 10), first[8:120, 72:120].mean(axis=(0, 1))
    assert _close(second[8:120, 72:120], (0, 0, 255), 10)
    assert result.warnings == ()  # 128 px images in a 128 px frame: nothing enlarged


async def test_a_tiny_image_is_warned_of_and_a_fair_one_is_not(
    unvoiced_composer: VideoComposer, file_store, make_audio
):
    images = [
        file_store.put_bytes("jobs/inputs/images/fair.png", _png(Image.new("RGB", (64, 48)))),
        file_store.put_bytes("jobs/inputs/images/tiny.png", _png(Image.new("RGB", (16, 12)))),
    ]
    audio = file_store.put_file("jobs/inputs/a.wav", make_audio("a.wav", "sine", 1.0))

    result = await unvoiced_composer.compose(
        "job-tiny", [Scene(uri) for uri in images], audio, options=STILL
    )
    # 64x48 covering 128x128: 2.7 times; 16x12: 10.7 times, past the limit of 4.
    [warning] = result.warnings
    assert warning.startswith("scene 2 image is only 16x12 pixels: enlarged 10.7 times"), warning
    assert "jobs/" not in warning and "://" not in warning
