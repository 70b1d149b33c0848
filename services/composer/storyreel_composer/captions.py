"""Captions: narration split into short, wrapped cues, timed to the speech.

The same cues are burned into the picture and written as SubRip and WebVTT
sidecars. Burned captions are drawn by libass (ffmpeg's ``ass`` filter, the
renderer mpv and VLC use) from an ASS script (:func:`to_ass`): HarfBuzz shapes
every script, FriBidi orders right-to-left text, and each character is drawn
by the first font of the composer's chain that has it
(:mod:`storyreel_composer.typefaces`). Lines are wrapped with those fonts'
real glyph widths, so a burned caption never leaves the safe area, and break
where each script allows (Unicode line breaking, UAX #14: between words, and
between CJK characters but never before closing punctuation).

Cue text is narration, never markup. The sidecars escape it as below; the
ASS script escapes it its own way (:func:`ass_text`); a :class:`Cue` always
holds the text as written.

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
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from uniseg.graphemecluster import grapheme_clusters
from uniseg.linebreak import line_break_units

from storyreel_composer.typefaces import Face, FontChain, is_hangul

# Whitespace after . ! ? or …, or after one of them and a closing quote or bracket;
# or right after a full-width 。！？ (and its closing quote or bracket), spaces or not.
_CLOSERS = "」』）】〉》〕］”’"
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?…])|(?<=[.!?…][\"'”’)\]]))\s+"
    rf"|(?<=[。！？])(?![{_CLOSERS}。！？])\s*"
    rf"|(?<=[。！？][{_CLOSERS}])\s*"
)


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

    fonts: FontChain
    #: The caption font's em size in pixels.
    font_size: int
    outline: int
    max_width: int
    max_lines: int
    #: Characters per line, for reading speed, whatever the frame's width (a full-width
    #: CJK character counts as two: :func:`reading_length`).
    max_chars: int
    bottom: int
    #: The frame the captions are drawn on.
    frame_width: int
    frame_height: int

    @property
    def ass_size(self) -> float:
        """The font size libass is given for an em of ``font_size`` pixels."""
        return self.font_size / self.fonts.primary.em_per_size

    def width_of(self, text: str) -> float:
        return self.fonts.width(text, self.ass_size) + 2 * self.outline


def caption_style(
    width: int,
    height: int,
    *,
    fonts: FontChain,
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
        fonts=fonts,
        font_size=font_size,
        outline=max(1, round(font_size * outline_scale)) if outline_scale > 0 else 0,
        max_width=max(1, round(width * (1 - 2 * margin))),
        max_lines=max_lines,
        max_chars=max_chars,
        bottom=round(height * bottom),
        frame_width=width,
        frame_height=height,
    )


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (split after . ! ? or …), whitespace normalised."""
    text = " ".join(text.split())
    return [part.strip() for part in _SENTENCE_END.split(text) if part.strip()]


def break_units(text: str) -> list[str]:
    """``text`` cut where a line may break (UAX #14), each unit with its trailing space.

    Words in scripts written with spaces; single characters (with the
    punctuation that must stay beside them) in Chinese and Japanese.
    """
    return [unit for unit in line_break_units(" ".join(text.split())) if unit.strip()]


def _too_long(line: str, style: CaptionStyle) -> bool:
    return style.width_of(line) > style.max_width or reading_length(line) > style.max_chars


def reading_length(text: str) -> int:
    """``text``'s length as captions count it for reading speed: a full-width (CJK)
    character counts twice, so a line holds about 21 of them where it holds 42 letters."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def wrap(text: str, style: CaptionStyle) -> list[str]:
    """Lines of ``text`` no wider than the style allows, broken where the script
    allows (a unit longer than a line is split between its graphemes)."""
    lines: list[str] = []
    current = ""
    for unit in break_units(text):
        for piece in _split_long_unit(unit, style):
            candidate = current + piece
            if current and _too_long(candidate.rstrip(), style):
                lines.append(current.rstrip())
                current = piece
            else:
                current = candidate
    if current.strip():
        lines.append(current.rstrip())
    return lines


def _split_long_unit(unit: str, style: CaptionStyle) -> list[str]:
    if not _too_long(unit.rstrip(), style):
        return [unit]
    pieces, current = [], ""
    for cluster in grapheme_clusters(unit):
        candidate = current + cluster
        if current and _too_long(candidate.rstrip(), style):
            pieces.append(current)
            current = ""
        current += cluster
    return [*pieces, current] if current else pieces


def _spaceless(char: str) -> bool:
    """Whether ``char`` belongs to a script written without spaces between words
    (Chinese, Japanese, their full-width punctuation; not Korean, which uses spaces)."""
    return not is_hangul(char) and unicodedata.east_asian_width(char) in "WF"


def join_text(parts: Sequence[str]) -> str:
    """Pieces of a text (lines, units) joined back: with a space between them,
    except where the text on either side is written without spaces."""
    text = ""
    for part in (part.strip() for part in parts):
        if not part:
            continue
        if text and not (_spaceless(text[-1]) or _spaceless(part[0])):
            text += " "
        text += part
    return text


def chunk(text: str, style: CaptionStyle) -> list[tuple[str, ...]]:
    """``text`` as cues of at most ``style.max_lines`` wrapped lines, never across sentences.

    A sentence that needs several cues is split into cues of similar length
    (no cue left holding a single word), and each cue's lines are balanced.
    """
    cues: list[tuple[str, ...]] = []
    for sentence in split_sentences(text):
        units = break_units(sentence)
        count = -(-len(wrap(sentence, style)) // style.max_lines)
        while True:
            groups = [_balance("".join(g).strip(), style) for g in _even_groups(units, count)]
            if all(len(lines) <= style.max_lines for lines in groups) or count >= len(units):
                break
            count += 1
        cues.extend(tuple(lines) for lines in groups if lines)
    return cues


def _even_groups(units: list[str], count: int) -> list[list[str]]:
    """``units`` cut into ``count`` runs of similar character length."""
    total = sum(len(unit) for unit in units)
    groups: list[list[str]] = [[]]
    done = 0
    for index, unit in enumerate(units):
        remaining_groups = count - len(groups)
        remaining_units = len(units) - index
        boundary = total * len(groups) / count
        if (
            groups[-1]
            and remaining_groups > 0
            and (done + len(unit) / 2 > boundary or remaining_units <= remaining_groups)
        ):
            groups.append([])
        groups[-1].append(unit)
        done += len(unit)
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


_ASS_ESCAPES = str.maketrans({"{": "\\{", "}": "\\}", "\\": "\\\u2060"})
_STRONG = {"L": False, "R": True, "AL": True}
_ISOLATE_RTL, _POP_ISOLATE = "\u2067", "\u2069"


def ass_text(text: str) -> str:
    """``text`` as libass draws it, verbatim: ``{`` and ``}`` escaped (no override
    block can open) and a word joiner after each backslash (no ``\\N``, ``\\h``
    or ``\\n`` escape can form)."""
    return text.translate(_ASS_ESCAPES)


def is_rtl(line: str) -> bool:
    """Whether ``line`` reads right to left: its first strong character is
    right-to-left (the paragraph rule of the Unicode bidirectional algorithm)."""
    for char in line:
        strong = _STRONG.get(unicodedata.bidirectional(char))
        if strong is not None:
            return strong
    return False


def _family(face: Face) -> str:
    """``face``'s family as an ASS style or ``\\fn`` tag names it (no separators)."""
    return "".join(char for char in face.family if char not in "{}\\,\n\r")


def _ass_time(seconds: float) -> str:
    cs = max(0, round(seconds * 100))
    hours, cs = divmod(cs, 360_000)
    minutes, cs = divmod(cs, 6000)
    secs, cs = divmod(cs, 100)
    return f"{hours}:{minutes:02d}:{secs:02d}.{cs:02d}"


def _ass_line(line: str, fonts: FontChain) -> tuple[str, list[Path]]:
    """One caption line, and the font files it uses: each run in its face (``\\fn``),
    right-to-left lines isolated as such, so that their punctuation lands at their start
    whatever surrounds them."""
    text, family, files = "", fonts.primary.family, []
    for run in fonts.runs(line):
        if run.face.family != family:
            family = run.face.family
            text += "{\\fn" + _family(run.face) + "}"
        text += ass_text(run.text)
        files.append(run.face.path)
    if text and is_rtl(line):
        text = f"{_ISOLATE_RTL}{text}{_POP_ISOLATE}"
    return text, files


@dataclass(frozen=True)
class AssScript:
    """Burned captions: the ASS script and the font files it names."""

    text: str
    font_files: tuple[Path, ...]


def to_ass(cues: Sequence[Cue], style: CaptionStyle) -> AssScript:
    """The ASS script that burns ``cues`` in ``style``: white text with a black
    outline, centred at the bottom of the safe area, lines as wrapped; characters
    no font has are left out (:meth:`FontChain.missing` names them)."""
    fonts = style.fonts
    primary = fonts.primary
    margin = max(0, (style.frame_width - style.max_width) // 2)
    bold = -1 if "bold" in primary.style.lower() else 0
    italic = -1 if {"italic", "oblique"} & set(primary.style.lower().split()) else 0
    header = [
        "[Script Info]",
        "ScriptType: v4.00+",
        f"PlayResX: {style.frame_width}",
        f"PlayResY: {style.frame_height}",
        "WrapStyle: 2",
        "ScaledBorderAndShadow: yes",
        "YCbCr Matrix: None",
        "",
        "[V4+ Styles]",
        "Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, "
        "BackColour, Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, "
        "BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, MarginV, Encoding",
        f"Style: Caption,{_family(primary)},{style.ass_size:.3f},"
        f"&H00FFFFFF,&H00FFFFFF,&H00000000,&H00000000,{bold},{italic},0,0,100,100,0,0,"
        f"1,{style.outline},0,2,{margin},{margin},{style.bottom},1",
        "",
        "[Events]",
        "Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text",
    ]
    events = []
    faces = {primary.path: None}
    for cue in cues:
        lines = []
        for line in cue.lines:
            text, files = _ass_line(line, fonts)
            if text:
                lines.append(text)
                faces.update(dict.fromkeys(files))
        if not lines:
            continue
        events.append(
            f"Dialogue: 0,{_ass_time(cue.start_s)},{_ass_time(cue.end_s)},Caption,,0,0,0,,"
            + "\\N".join(lines)
        )
    return AssScript("\n".join([*header, *events]) + "\n", tuple(faces))


#: The burned captions' script and the folder of the fonts it names, in the render's folder.
CAPTION_SCRIPT = "captions.ass"
CAPTION_FONTS = "caption-fonts"


def burn(cues: Sequence[Cue], style: CaptionStyle, folder: Path) -> str:
    """Write the ASS script of ``cues`` into ``folder`` with links to the fonts it
    uses (libass loads every font in its fonts folder, so only those), and return
    the ``ass`` filter that burns it (plain names: the render runs in ``folder``,
    so nothing in the filter needs escaping), shaped by HarfBuzz."""
    script = to_ass(cues, style)
    (folder / CAPTION_SCRIPT).write_text(script.text, encoding="utf-8")
    (folder / CAPTION_FONTS).mkdir()
    for number, path in enumerate(script.font_files, start=1):
        (folder / CAPTION_FONTS / f"font-{number:02d}{path.suffix}").symlink_to(path.resolve())
    return f"ass={CAPTION_SCRIPT}:fontsdir={CAPTION_FONTS}:shaping=complex"


def missing_glyphs_warning(cues: Sequence[Cue], fonts: FontChain, shown: int = 8) -> str:
    """A warning naming the characters of ``cues`` no installed font has, else ""."""
    missing = fonts.missing("".join(cue.text for cue in cues))
    if not missing:
        return ""
    names = ", ".join(f"U+{ord(char):04X}" for char in missing[:shown])
    more = f" and {len(missing) - shown} more" if len(missing) > shown else ""
    return (
        f"captions: no installed font has {names}{more}; left out of the burned "
        "captions (the SRT and VTT files keep them)"
    )


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
            lines = tuple(_balance(join_text((*first.lines, *second.lines)), style))
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
