"""Captions: narration split into short, word-wrapped cues, timed to the speech.

The same cues are burned into the picture (ffmpeg ``drawtext`` with the
packaged font and an outline) and written as SubRip and WebVTT sidecars.
Lines are wrapped with the font's real glyph widths, so a burned caption never
leaves the safe area.

Cue text is narration, never markup, so the sidecars escape it; the burned
captions get the text verbatim (``drawtext`` reads it from a file with
``expansion=none``), so the escaping below happens only in :func:`to_srt` and
:func:`to_vtt`, never on a :class:`Cue`.

In both files a cue's text is split at every line break it holds and blank
lines are dropped (a blank line ends a cue); a cue left with no text is not
written.

WebVTT (W3C): ``&``, ``<`` and ``>`` are written as ``&amp;``, ``&lt;`` and
``&gt;``. Every player shows the original characters, no tag or character
reference can form, and ``-->`` cannot appear in a cue (it becomes ``--&gt;``).
Nothing else has a meaning in WebVTT cue text, so nothing else changes.

SubRip has no escape at all, but players read HTML-like tags in it (``<b>``,
``<i>``, ``<font>``; ffmpeg even takes ``<b c>`` for bold and drops unknown
tags such as ``<script>``), ASS override blocks (``{\\an8}``; libass hides
any ``{...}``) and ASS escapes (``\\N`` is a line break). So a few characters
are replaced by look-alikes that mean nothing to any player, or separated
from what follows them by an invisible U+2060 WORD JOINER:

* ``<`` and ``>`` become ``‹`` and ``›`` (U+2039, U+203A): no tag can open,
  and ``-->`` cannot appear in a cue's text to be taken for a timing line;
* ``{`` and ``}`` become ``❴`` and ``❵`` (U+2774, U+2775, the Zapf Dingbats
  curly brackets that DejaVu, Segoe UI Symbol and Noto carry): no override
  block (or MicroDVD-style ``{y:i}``) can open;
* a word joiner follows every ``\\`` (no ``\\N``, ``\\h``, ``\\n`` escape) and
  every ``&`` that is followed by a letter, digit or ``#`` (players that
  decode character references show ``&amp;`` as written). Anything else,
  ``Tom & Jerry`` included, is written as it is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from PIL import ImageFont

# Whitespace after . ! ? or …, or after one of them and a closing quote or bracket.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?…])|(?<=[.!?…][\"'”’)\]]))\s+")


@dataclass(frozen=True)
class Cue:
    """One caption: its lines, shown from ``start_s`` until ``end_s`` (seconds)."""

    start_s: float
    end_s: float
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class CaptionStyle:
    """How captions look in a frame of a given size (all sizes in pixels)."""

    font_path: Path
    font_size: int
    outline: int
    max_width: int
    max_lines: int
    #: Characters per line, for reading speed, whatever the frame's width.
    max_chars: int
    bottom: int
    line_spacing: int

    @property
    def font(self) -> ImageFont.FreeTypeFont:
        return _font(self.font_path, self.font_size)

    def width_of(self, text: str) -> float:
        return self.font.getlength(text) + 2 * self.outline


@cache
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def caption_style(
    width: int,
    height: int,
    *,
    font_path: Path,
    font_scale: float,
    outline_scale: float,
    max_lines: int,
    max_chars: int,
    margin: float,
    portrait_bottom_margin: float,
) -> CaptionStyle:
    """The caption style of a ``width`` x ``height`` frame.

    Sizes scale with the frame's short side; captions keep inside the safe
    area (``margin`` of the frame on every side, ``portrait_bottom_margin`` at
    the bottom of portrait frames, where apps draw their controls).
    """
    short = min(width, height)
    font_size = max(8, round(short * font_scale))
    bottom = portrait_bottom_margin if height > width else margin
    return CaptionStyle(
        font_path=Path(font_path),
        font_size=font_size,
        outline=max(1, round(font_size * outline_scale)) if outline_scale > 0 else 0,
        max_width=max(1, round(width * (1 - 2 * margin))),
        max_lines=max_lines,
        max_chars=max_chars,
        bottom=round(height * bottom),
        line_spacing=round(font_size * 0.15),
    )


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (split after . ! ? or …), whitespace normalised."""
    text = " ".join(text.split())
    return [part.strip() for part in _SENTENCE_END.split(text) if part.strip()]


def wrap(text: str, style: CaptionStyle) -> list[str]:
    """Lines of ``text`` no wider than the style allows (a longer word is split)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        for piece in _split_long_word(word, style):
            candidate = f"{current} {piece}" if current else piece
            too_long = (
                style.width_of(candidate) > style.max_width or len(candidate) > style.max_chars
            )
            if current and too_long:
                lines.append(current)
                current = piece
            else:
                current = candidate
    if current:
        lines.append(current)
    return lines


def _split_long_word(word: str, style: CaptionStyle) -> list[str]:
    pieces, current = [], ""
    for char in word:
        candidate = current + char
        if current and (
            style.width_of(candidate) > style.max_width or len(candidate) > style.max_chars
        ):
            pieces.append(current)
            current = ""
        current += char
    return [*pieces, current] if current else pieces


def chunk(text: str, style: CaptionStyle) -> list[tuple[str, ...]]:
    """``text`` as cues of at most ``style.max_lines`` wrapped lines, never across sentences.

    A sentence that needs several cues is split into cues of similar length
    (no cue left holding a single word), and each cue's lines are balanced.
    """
    cues: list[tuple[str, ...]] = []
    for sentence in split_sentences(text):
        words = sentence.split()
        count = -(-len(wrap(sentence, style)) // style.max_lines)
        while True:
            groups = [_balance(" ".join(g), style) for g in _even_groups(words, count)]
            if all(len(lines) <= style.max_lines for lines in groups) or count >= len(words):
                break
            count += 1
        cues.extend(tuple(lines) for lines in groups)
    return cues


def _even_groups(words: list[str], count: int) -> list[list[str]]:
    """``words`` cut into ``count`` runs of similar character length."""
    total = sum(len(word) + 1 for word in words)
    groups: list[list[str]] = [[]]
    done = 0
    for index, word in enumerate(words):
        remaining_groups = count - len(groups)
        remaining_words = len(words) - index
        boundary = total * len(groups) / count
        if (
            groups[-1]
            and remaining_groups > 0
            and (done + (len(word) + 1) / 2 > boundary or remaining_words <= remaining_groups)
        ):
            groups.append([])
        groups[-1].append(word)
        done += len(word) + 1
    return groups


def _balance(text: str, style: CaptionStyle) -> list[str]:
    """Wrap ``text`` in as few lines as fit, of similar widths rather than full-then-short."""
    lines = wrap(text, style)
    if len(lines) < 2:
        return lines
    step = max(1, style.font_size // 4)
    width = int(style.width_of(text) / len(lines))
    while width < style.max_width:
        trial = wrap(text, replace(style, max_width=width))
        if len(trial) <= len(lines):
            return trial
        width += step
    return lines


def spread(chunks: Sequence[tuple[str, ...]], start_s: float, end_s: float) -> list[Cue]:
    """Cues for ``chunks`` sharing ``start_s``..``end_s`` in proportion to their length."""
    if not chunks or end_s <= start_s:
        return []
    weights = [max(1, len(" ".join(lines))) for lines in chunks]
    total = sum(weights)
    cues, elapsed = [], 0
    for lines, weight in zip(chunks, weights, strict=True):
        cue_start = start_s + (end_s - start_s) * elapsed / total
        elapsed += weight
        cue_end = start_s + (end_s - start_s) * elapsed / total
        cues.append(Cue(cue_start, cue_end, lines))
    return cues


def _timestamp(seconds: float, separator: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def _rounded(cues: Sequence[tuple[float, float, list[str]]]) -> list[tuple[int, int, list[str]]]:
    """Cues in whole milliseconds, each at least 1 ms long and none overlapping the next."""
    result: list[tuple[int, int, list[str]]] = []
    for start_s, end_s, lines in cues:
        start, end = round(start_s * 1000), round(end_s * 1000)
        if result and start < result[-1][1]:
            start = result[-1][1]
        if end > start:
            result.append((start, end, lines))
    return result


def _written(cues: Sequence[Cue], escape) -> list[tuple[int, int, list[str]]]:
    """The cues to write: every line break in their text honoured, blank lines
    dropped, each line escaped by ``escape``; cues left with no text skipped."""
    kept = []
    for cue in cues:
        lines = [escape(line) for line in cue.text.splitlines() if line.strip()]
        if lines:
            kept.append((cue.start_s, cue.end_s, lines))
    return _rounded(kept)


_SRT_LOOK_ALIKES = str.maketrans({"<": "\u2039", ">": "\u203a", "{": "\u2774", "}": "\u2775"})
_WORD_JOINER = "\u2060"
# A backslash, or an ampersand that could start a character reference.
_SRT_ESCAPE_START = re.compile(r"\\|&(?=[0-9A-Za-z#])")


def srt_text(line: str) -> str:
    """One line of cue text as written in a SubRip file (see the module's docstring)."""
    line = line.translate(_SRT_LOOK_ALIKES)
    return _SRT_ESCAPE_START.sub(lambda match: match.group() + _WORD_JOINER, line)


def vtt_text(line: str) -> str:
    """One line of cue text as written in a WebVTT file: ``&``, ``<``, ``>`` escaped."""
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_srt(cues: Sequence[Cue]) -> str:
    """SubRip text: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm`` times."""
    blocks = []
    for number, (start, end, lines) in enumerate(_written(cues, srt_text), start=1):
        times = f"{_timestamp(start / 1000, ',')} --> {_timestamp(end / 1000, ',')}"
        text = "\n".join(lines)
        blocks.append(f"{number}\n{times}\n{text}\n")
    return "\n".join(blocks)


def to_vtt(cues: Sequence[Cue]) -> str:
    """WebVTT text: the ``WEBVTT`` header, then ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` cues."""
    blocks = ["WEBVTT\n"]
    for start, end, lines in _written(cues, vtt_text):
        times = f"{_timestamp(start / 1000, '.')} --> {_timestamp(end / 1000, '.')}"
        text = "\n".join(lines)
        blocks.append(f"{times}\n{text}\n")
    return "\n".join(blocks)


def drawtext_filters(
    cues: Sequence[Cue], style: CaptionStyle, font_name: str, text_names: Sequence[str]
) -> list[str]:
    """One ``drawtext`` filter per cue, shown on the frames of its time span.

    ``font_name`` and ``text_names`` are plain file names (the render runs in
    the directory holding them), so nothing in the filter needs escaping; the
    text is read from the files verbatim (no ``%{...}`` expansion).
    """
    filters = []
    for cue, name in zip(cues, text_names, strict=True):
        filters.append(
            f"drawtext=fontfile={font_name}:textfile={name}:expansion=none"
            f":fontsize={style.font_size}:fontcolor=white"
            f":borderw={style.outline}:bordercolor=black"
            f":text_align=C:line_spacing={style.line_spacing}"
            f":x=(w-text_w)/2:y=h-{style.bottom}-text_h"
            f":enable='gte(t,{cue.start_s:.6f})*lt(t,{cue.end_s:.6f})'"
        )
    return filters


def readable(
    cues: Sequence[Cue], style: CaptionStyle, *, min_s: float, end_s: float
) -> tuple[list[Cue], str]:
    """``cues`` each on screen at least ``min_s`` (within 0..``end_s``), and a warning.

    Short cues are first merged with a neighbour when the two fit the style's
    lines together, then shifted: a short cue runs on into the time after it,
    pushing later cues on, and cues near the end start early instead. A cue
    already long enough with room around it is left as it is.

    When even that cannot give every cue ``min_s`` (more text than the time
    holds at that pace), neighbouring cues are shown in groups: each group
    shows its first cue for the whole group's time and the rest of its text
    is left out of the captions; the warning (else "") says so.
    """
    if not cues or min_s <= 0:
        return list(cues), ""
    # Half a millisecond more, so that no cue rounds below min_s in the sidecars.
    min_s += 0.0005
    merged = _merge_short(list(cues), style, min_s)
    fits = max(1, int(end_s / min_s + 1e-9))
    warning = ""
    if len(merged) > fits:
        groups = [
            merged[round(g * len(merged) / fits) : round((g + 1) * len(merged) / fits)]
            for g in range(fits)
        ]
        needed = len(merged) * min_s
        warning = (
            f"captions: the narration needs {needed:.1f} s to be read at {min_s:.1f} s per "
            f"caption but the video lasts {end_s:.1f} s; {len(merged) - fits} of "
            f"{len(merged)} captions were left out"
        )
        merged = [Cue(group[0].start_s, group[-1].end_s, group[0].lines) for group in groups]
    return _retime(merged, min(min_s, end_s), end_s), warning


def _merge_short(cues: list[Cue], style: CaptionStyle, min_s: float) -> list[Cue]:
    """Merge each cue shorter than ``min_s`` with its shorter neighbour (no more than
    ``min_s`` away) while the two fit ``style.max_lines`` together."""
    i = 0
    while i < len(cues):
        cue = cues[i]
        if cue.end_s - cue.start_s >= min_s:
            i += 1
            continue
        options = []
        for j in (i - 1, i + 1):
            if not 0 <= j < len(cues):
                continue
            first, second = cues[min(i, j)], cues[max(i, j)]
            if second.start_s - first.end_s > min_s:
                continue
            lines = tuple(_balance(" ".join((*first.lines, *second.lines)), style))
            if len(lines) <= style.max_lines:
                length = cues[j].end_s - cues[j].start_s
                options.append((length, min(i, j), Cue(first.start_s, second.end_s, lines)))
        if not options:
            i += 1
            continue
        _, at, joined = min(options, key=lambda option: option[0])
        cues[at : at + 2] = [joined]
        # The joined cue may still be short, and its left neighbour may now take it.
        i = max(0, at - 1)
    return cues


def _retime(cues: Sequence[Cue], min_s: float, end_s: float) -> list[Cue]:
    """Cues each at least ``min_s`` long, in order, none overlapping, within 0..``end_s``
    (there must be room: ``len(cues) * min_s <= end_s``)."""
    starts = [cue.start_s for cue in cues]
    ends = [cue.end_s for cue in cues]
    for i in range(len(cues)):  # run on into the time after, pushing later cues on
        if i:
            starts[i] = max(starts[i], ends[i - 1])
        ends[i] = max(ends[i], starts[i] + min_s)
    limit = end_s
    for i in reversed(range(len(cues))):  # and start early where that overran the end
        ends[i] = min(ends[i], limit)
        starts[i] = max(0.0, min(starts[i], ends[i] - min_s))
        limit = starts[i]
    return [
        cue if (cue.start_s, cue.end_s) == (start, end) else Cue(start, end, cue.lines)
        for cue, start, end in zip(cues, starts, ends, strict=True)
    ]
