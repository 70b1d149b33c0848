"""Caption files hold narration as text, never as markup (issue 11, finding 10).

Each narration is written the way the composer writes it (split into cues by
``chunk``, timed by ``spread``) and also as one cue holding the raw narration
(line breaks included, as any caller of ``to_srt``/``to_vtt`` may pass). The
files are then read back by two small parsers below: a WebVTT one that follows
the W3C parsing rules, and a SubRip one as lenient as ffmpeg's (any line that
looks like a timing line starts a cue). And the SubRip file is read by the
bundled ffmpeg itself, the parser that mpv and ffmpeg's burn-in use.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import imageio_ffmpeg
import pytest
from storyreel_composer.captions import Cue, chunk, spread, to_srt, to_vtt

NARRATIONS = {
    "script": "<script>alert(1)</script>",
    "bold": "<b>bold</b>",
    "ampersand": "Tom & Jerry",
    "ass-override": "{\\an8}top",
    "arrow": "a --> b",
    "blank-lines": "first line\n\nsecond line\n \n\nthird",
    "timing-line": "Meet at\n00:00:05,000 --> 00:00:09,000 sharp",
    "entity": "&lt;i&gt; and &amp; as typed",
    "ass-escape": "C:\\New\\hat {y:i}",
}

WORD_JOINER = "\u2060"
#: What the SubRip writer substitutes, mapped back to the narration's characters.
SRT_LOOK_ALIKES = {"\u2039": "<", "\u203a": ">", "\u2774": "{", "\u2775": "}"}

_SRT_TIMING = re.compile(r"\d\d:\d\d:\d\d,\d\d\d --> \d\d:\d\d:\d\d,\d\d\d")
_VTT_TIMING = re.compile(r"\d\d:\d\d:\d\d\.\d\d\d --> \d\d:\d\d:\d\d\.\d\d\d")
# ffmpeg's SubRip demuxer starts a cue at any line like this (hours may have any digits).
_LENIENT_SRT_TIMING = re.compile(r"\s*\d+:\d+:\d+[,.]\d+\s*-->\s*\d+:\d+:\d+[,.]\d+")


def normalised(text: str) -> str:
    return " ".join(text.split())


def cues_for(narration: str, style) -> list[list[Cue]]:
    """The narration as the composer cues it in ``style``, and as one raw cue."""
    return [spread(chunk(narration, style), 1.0, 4.0), [Cue(1.0, 4.0, (narration,))]]


def parse_srt(text: str) -> list[str]:
    """The cue texts of a SubRip file, each line joined by a space.

    Fails unless every block is: its number, a timing line, one or more text
    lines, and no text line would start a new cue in a lenient parser.
    """
    assert text.endswith("\n") and not text.endswith("\n\n")
    texts = []
    for number, block in enumerate(text[:-1].split("\n\n"), start=1):
        lines = block.split("\n")
        assert lines[0] == str(number), block
        assert _SRT_TIMING.fullmatch(lines[1]), block
        body = lines[2:]
        assert body, f"cue {number} has no text"
        for line in body:
            assert line.strip(), f"blank line inside cue {number}: {block!r}"
            assert "-->" not in line and not _LENIENT_SRT_TIMING.match(line), line
        texts.append(" ".join(body))
    return texts


def srt_markup(text: str) -> list[str]:
    """Anything a SubRip player would read as markup rather than show."""
    return [
        *re.findall(r"<[^>]*>?|>", text),  # HTML-like tags (<b>, <font ...>, ffmpeg: <b c>)
        *re.findall(r"\{[^}]*\}?|\}", text),  # ASS override blocks, MicroDVD {y:i}
        *re.findall(r"\\[^\u2060]", text),  # ASS escapes: \N \n \h \{
        *re.findall(r"&#?[0-9A-Za-z]+;", text),  # character references, where decoded
    ]


def srt_shown(text: str) -> str:
    """What a viewer reads in a SubRip cue's text, in the narration's characters."""
    for look_alike, original in SRT_LOOK_ALIKES.items():
        text = text.replace(look_alike, original)
    return text.replace(WORD_JOINER, "")


def parse_vtt(text: str) -> list[str]:
    """The displayed texts of a WebVTT file's cues (lines joined by a space), by the
    W3C parsing rules: a cue's text ends at a blank line or a line holding "-->"
    (this parser fails there instead), ``<`` opens a tag (there must be none) and
    ``&`` a character reference (only ``&amp;``, ``&lt;``, ``&gt;`` are allowed)."""
    assert text.startswith("WEBVTT\n\n") and text.endswith("\n") and not text.endswith("\n\n")
    texts = []
    for block in text[len("WEBVTT\n\n") : -1].split("\n\n"):
        lines = block.split("\n")
        assert _VTT_TIMING.fullmatch(lines[0]), block
        body = lines[1:]
        assert body, f"cue without text: {block!r}"
        for line in body:
            assert line, f"blank line inside a cue: {block!r}"
            assert "-->" not in line, f"'-->' ends the cue: {line!r}"
            assert "<" not in line, f"a tag: {line!r}"
            assert ">" not in line, f"raw '>': {line!r}"
            references = re.findall(r"&[^;\s]*;?", line)
            assert set(references) <= {"&amp;", "&lt;", "&gt;"}, line
        shown = " ".join(body)
        shown = shown.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
        texts.append(shown)
    return texts


@pytest.mark.parametrize("narration", NARRATIONS.values(), ids=NARRATIONS.keys())
def test_caption_files_are_valid_cues_that_show_the_narration_as_text(narration: str, style_for):
    for cues in cues_for(narration, style_for(1280, 720)):
        srt = parse_srt(to_srt(cues))
        vtt = parse_vtt(to_vtt(cues))
        assert len(srt) == len(vtt) == len(cues)
        for text in srt:
            assert srt_markup(text) == [], text
        # Every word reaches the viewer as written, in both files.
        assert normalised(" ".join(srt_shown(text) for text in srt)) == normalised(narration)
        assert normalised(" ".join(vtt)) == normalised(narration)


def test_caption_cues_keep_their_raw_text_for_the_burned_captions():
    # drawtext reads Cue.text from a file verbatim: the sidecar escaping must not reach it.
    narration = "<b>Tom</b> & {\\an8}Jerry --> on"
    cue = Cue(0.0, 1.0, (narration,))
    assert "&amp;" in to_vtt([cue]) and "\u2039b\u203a" in to_srt([cue])
    assert cue.text == narration


def test_caption_cues_left_without_text_are_not_written():
    cues = [Cue(0.0, 1.0, ("one",)), Cue(1.0, 2.0, ("", " \n\n")), Cue(2.0, 3.0, ("two",))]
    assert to_srt(cues) == (
        "1\n00:00:00,000 --> 00:00:01,000\none\n\n2\n00:00:02,000 --> 00:00:03,000\ntwo\n"
    )
    assert to_vtt(cues) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\none\n\n00:00:02.000 --> 00:00:03.000\ntwo\n"
    )


PLAYER_VISIBLE = ["script", "bold", "ass-override", "timing-line", "ass-escape"]


@pytest.mark.parametrize("case", PLAYER_VISIBLE)
def test_ffmpeg_reads_the_srt_captions_as_plain_text(case: str, tmp_path: Path):
    """ffmpeg (and so mpv and any libass burn-in) turns SubRip into ASS: the result
    holds one dialogue per cue, with no override block and no escape in it."""
    narration = NARRATIONS[case]
    cue = Cue(1.0, 4.0, tuple(narration.split("\n")))
    (tmp_path / "captions.srt").write_text(to_srt([cue]), encoding="utf-8")
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    subprocess.run(
        [ffmpeg, "-nostdin", "-v", "error", "-y", "-i", "captions.srt", "captions.ass"],
        cwd=tmp_path,
        check=True,
        timeout=60,
    )
    ass = (tmp_path / "captions.ass").read_text(encoding="utf-8")
    dialogues = [line.split(",", 9)[9] for line in ass.splitlines() if line.startswith("Dialogue:")]
    assert len(dialogues) == 1, dialogues
    (text,) = dialogues
    assert "{" not in text, text  # no override block: {\an8}, {\b1} from <b>
    # ffmpeg joins the cue's lines with \N; no other escape (\N, \h, ...) is left.
    lines = text.split("\\N")
    assert len(lines) == len(cue.lines), text
    assert not any(re.search(r"\\[^\u2060]", line) for line in lines), text
    assert normalised(srt_shown(" ".join(lines))) == normalised(narration)
