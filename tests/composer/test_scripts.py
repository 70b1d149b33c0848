"""Captions in every script: the right font for each character, shaped, in reading
order, broken where the script allows, and never drawn as empty boxes.

The burned frames are checked without OCR: the white fill of the caption, cut
to its bounding box, is compared with the same line drawn by Pillow (HarfBuzz
shaping through raqm) in the font the caption must use, and with what a wrong
result would look like (the caption font's empty boxes, a right-to-left line
laid out left to right). The right one must match, and match better.

The fallback fonts are Debian's Noto Sans CJK, Devanagari and Thai and Symbola,
from the packages the composer image installs, unpacked into build/caption-fonts
by `make caption-fonts`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from storyreel_composer.captions import (
    Cue,
    burn,
    chunk,
    is_rtl,
    join_text,
    missing_glyphs_warning,
    split_sentences,
    to_ass,
    to_srt,
    wrap,
)
from storyreel_composer.composer import Scene, VideoComposer
from storyreel_composer.filtergraph import FilterPlan, encode
from storyreel_composer.settings import PACKAGED_FONT, ComposerSettings
from storyreel_composer.timeline import Timeline, shots
from storyreel_composer.tts import NarrationSynthesizer
from storyreel_composer.typefaces import Face, FontChain, font_chain
from support import CAPTION_FONTS_DIR, ffmpeg_decode, wav_bytes

WIDTH, HEIGHT, FPS = 640, 360, 10
BACKGROUND = 110

CHINESE = "今天天气很好。"
JAPANESE = "これはテストです。"
KOREAN = "안녕하세요 세계."
HEBREW = "שלום עולם."
ARABIC = "مرحبا بالعالم."
EMOJI = "Party \U0001f389"  # PARTY POPPER: not in DejaVu Sans, in Symbola
HINDI = "क्षत्रिय किताब"  # a conjunct (क्ष) and a vowel sign drawn before its consonant (कि)
THAI = "สวัสดีครับ"


@pytest.fixture(scope="module")
def chain() -> FontChain:
    fonts = sorted(path.name for path in CAPTION_FONTS_DIR.glob("*"))
    assert fonts == [
        "NotoSansCJK-Bold.ttc",
        "NotoSansDevanagari-Bold.ttf",
        "NotoSansThai-Bold.ttf",
        "Symbola_hint.ttf",
    ], f"{CAPTION_FONTS_DIR} must hold the fallback fonts: run `make caption-fonts`"
    return font_chain(PACKAGED_FONT, (), (CAPTION_FONTS_DIR,))


@pytest.fixture(scope="module")
def style(chain, style_for):
    # Large letters, so that the shapes compared are many pixels.
    return style_for(WIDTH, HEIGHT, fonts=chain, font_scale=0.12)


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory) -> Path:
    """Where the burned frames are kept for people to look at (the test run's output)."""
    return tmp_path_factory.mktemp("caption-frames", numbered=False)


def burned_frame(folder: Path, style, line: str, keep: Path | None = None) -> np.ndarray:
    """The grey frame at 1 s of a 2 s video whose one caption is ``line`` (also
    written to ``keep`` as a PNG)."""
    (folder / "canvas.rgb").write_bytes(bytes([BACKGROUND]) * (WIDTH * HEIGHT * 3))
    (folder / "track.wav").write_bytes(wav_bytes(2.0, 22050))
    plan = FilterPlan(
        width=WIDTH,
        height=HEIGHT,
        fps=FPS,
        canvases=("canvas.rgb",),
        canvas_size=(WIDTH, HEIGHT),
        shots=tuple(shots(Timeline(FPS, (2 * FPS,)), 0)),
        moves=(None,),
        total_frames=2 * FPS,
        audio="track.wav",
        captions=(burn([Cue(0.0, 2.0, (line,))], style, folder),),
    )
    video = encode(plan, folder, timeout_s=60)
    raw = ffmpeg_decode(video, "-f", "rawvideo", "-pix_fmt", "gray")
    frame = np.frombuffer(raw, np.uint8).reshape(-1, HEIGHT, WIDTH)[FPS]
    if keep is not None:
        Image.fromarray(frame).save(keep)
    return frame


def drawn(runs: list[tuple[Face, str]], style, direction: str | None = None) -> np.ndarray:
    """``runs`` drawn side by side by Pillow (raqm), white on black, as a mask."""
    image = Image.new("L", (WIDTH * 2, HEIGHT), 0)
    draw = ImageDraw.Draw(image)
    x = 10.0
    for face, text in runs:
        font = face.font(style.ass_size * face.em_per_size)
        draw.text((x, HEIGHT * 0.7), text, fill=255, font=font, anchor="ls", direction=direction)
        x += font.getlength(text, direction=direction)
    return np.asarray(image) > 128


def likeness(frame_fill: np.ndarray, reference: np.ndarray) -> float:
    """Intersection over union of two ink masks, each cut to its bounding box and the
    reference scaled to the frame's box."""

    def cut(mask: np.ndarray) -> np.ndarray:
        rows, cols = np.nonzero(mask)
        assert len(rows), "no ink"
        return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]

    a = cut(frame_fill)
    b = Image.fromarray(cut(reference).astype(np.uint8) * 255)
    b = np.asarray(b.resize((a.shape[1], a.shape[0]), Image.Resampling.BILINEAR)) > 128
    return float((a & b).sum() / (a | b).sum())


def fill(frame: np.ndarray) -> np.ndarray:
    """The caption's white fill (the outline is black, the background mid-grey)."""
    return frame > 200


@pytest.mark.parametrize(
    ("text", "family"),
    [
        (CHINESE, "Noto Sans CJK SC"),
        (JAPANESE, "Noto Sans CJK JP"),
        (KOREAN, "Noto Sans CJK KR"),
        (HEBREW, "DejaVu Sans"),
        (ARABIC, "DejaVu Sans"),
        (HINDI, "Noto Sans Devanagari"),
        (THAI, "Noto Sans Thai"),
    ],
)
def test_each_script_is_drawn_by_a_font_that_has_it(chain, text, family):
    runs = chain.runs(text)
    assert [run.face.family for run in runs] == [family]
    assert "".join(run.text for run in runs) == text
    assert chain.missing(text) == []


def test_emoji_come_from_an_emoji_font_and_the_rest_from_the_caption_font(chain):
    runs = chain.runs(EMOJI)
    assert [(run.face.family, run.text) for run in runs] == [
        ("DejaVu Sans", "Party "),
        ("Symbola", "\U0001f389"),
    ]


@pytest.mark.parametrize(("text", "family"), [(CHINESE, "Noto Sans CJK SC"), (EMOJI, None)])
def test_burned_characters_the_caption_font_lacks_are_glyphs_not_boxes(
    tmp_path, chain, style, text, family, frames_dir
):
    keep = frames_dir / f"{'cjk' if family else 'emoji'}.png"
    frame = fill(burned_frame(tmp_path, style, text, keep))
    right = drawn([(run.face, run.text) for run in chain.runs(text)], style)
    boxes = drawn([(chain.primary, text)], style)  # the caption font alone: empty boxes
    good, bad = likeness(frame, right), likeness(frame, boxes)
    print(f"likeness {text!r}: right font {good:.2f}, boxes {bad:.2f}")
    assert good > 0.55, (good, bad)
    assert good > bad + 0.15, (good, bad)
    script = (tmp_path / "captions.ass").read_text()
    if family:
        assert "{\\fn" + family + "}" in script


@pytest.mark.parametrize("text", [HEBREW, ARABIC])
def test_right_to_left_lines_read_right_to_left_with_their_full_stop_at_the_left(
    tmp_path, chain, style, text, frames_dir
):
    assert is_rtl(text)
    keep = frames_dir / f"{'hebrew' if text == HEBREW else 'arabic'}.png"
    frame = fill(burned_frame(tmp_path, style, text, keep))
    face = chain.runs(text)[0].face
    right = likeness(frame, drawn([(face, text)], style, direction="rtl"))
    wrong = likeness(frame, drawn([(face, text)], style, direction="ltr"))
    print(f"likeness {text!r}: right to left {right:.2f}, left to right {wrong:.2f}")
    assert right > 0.55, (right, wrong)
    assert right > wrong + 0.1, (right, wrong)
    # The full stop is the leftmost ink: a small mark on the baseline, apart from the word.
    cols = np.nonzero(frame.any(axis=0))[0]
    gaps = np.nonzero(np.diff(cols) > 1)[0]
    first = cols[: gaps[0] + 1]
    assert len(first) < style.font_size * 0.3
    rows = np.nonzero(frame[:, first].any(axis=1))[0]
    ink_rows = np.nonzero(frame.any(axis=1))[0]
    assert rows.min() > (ink_rows.min() + ink_rows.max()) / 2


def test_a_character_no_font_has_is_left_out_and_named_never_drawn_as_a_box(chain, style):
    # U+1FAE8 SHAKING FACE (Unicode 15): in none of the fonts.
    cue = Cue(0.0, 1.0, ("Hello \U0001fae8 world",))
    assert chain.missing(cue.text) == ["\U0001fae8"]
    script = to_ass([cue], style)
    assert "\U0001fae8" not in script.text and "Hello  world" in script.text
    warning = missing_glyphs_warning([cue], chain)
    assert "U+1FAE8" in warning and "\U0001fae8" not in warning
    assert "\U0001fae8" in to_srt([cue])  # players draw sidecars with their own fonts
    assert missing_glyphs_warning([Cue(0, 1, ("Hello",))], chain) == ""


def test_the_warning_names_a_bounded_number_of_characters(chain):
    text = "".join(chr(0x1FAE0 + n) for n in range(9)) + "\ue000" * 50
    warning = missing_glyphs_warning([Cue(0, 1, (text,))], chain)
    assert len(warning) < 300 and "more" in warning


def test_chinese_breaks_between_characters_never_before_closing_punctuation(chain, style_for):
    style = style_for(360, 640, fonts=chain)
    text = (
        "这是一个很长的句子，用来测试中文字幕的换行是否正确，"
        "「不会」在标点前面断开，也不会超出画面的安全区域。"
    )
    lines = wrap(text, style)
    assert len(lines) > 2 and join_text(lines) == text
    for line in lines:
        assert style.width_of(line) <= style.max_width
        assert line[0] not in "，。」、！？" and line[-1] not in "「"
        assert " " not in line


def test_sentences_end_at_full_width_stops_without_spaces():
    assert split_sentences("今天天气很好。我们去公园吧！「你好」他说。Then English. Yes") == [
        "今天天气很好。",
        "我们去公园吧！",
        "「你好」他说。",
        "Then English.",
        "Yes",
    ]


def test_rejoined_lines_keep_spaces_only_where_the_script_has_them():
    assert join_text(["今天天气", "很好。"]) == "今天天气很好。"
    assert join_text(["안녕하세요", "세계."]) == "안녕하세요 세계."
    assert join_text(["A whale", "sings."]) == "A whale sings."


def test_long_chinese_narration_makes_cues_of_at_most_the_style_lines(chain, style_for):
    style = style_for(640, 360, fonts=chain)
    text = "从前有一座灯塔。" + "灯塔的看守人每天晚上都看着灰色的大海，数着从北方涌来的海浪。" * 3
    cues = chunk(text, style)
    assert cues[0] == ("从前有一座灯塔。",)
    assert all(len(lines) <= style.max_lines for lines in cues)
    assert "".join("".join(lines) for lines in cues) == text


def composer_with_fonts(file_store, tmp_path: Path, font_dirs: list[Path]) -> VideoComposer:
    """A composer of small videos whose captions fall back on the fonts in ``font_dirs``."""
    settings = ComposerSettings(
        port=0,
        default_width=320,
        default_height=180,
        default_fps=10,
        work_dir=tmp_path / "work",
        caption_font_dirs=font_dirs,
    )
    return VideoComposer(file_store, NarrationSynthesizer.from_settings(settings), settings)


async def test_the_composer_draws_with_its_font_settings_and_reports_what_no_font_has(
    file_store, images, make_audio, tmp_path
):
    composer = composer_with_fonts(file_store, tmp_path, [CAPTION_FONTS_DIR])
    audio = make_audio("music.wav", "sine=frequency=440:sample_rate=22050", 4.0)
    audio_uri = file_store.put_file("uploads/tenant/x/music.wav", audio)
    scenes = [Scene(images[0], "灯塔的看守人。"), Scene(images[1], "Hello \U0001fae8 world.")]
    result = await composer.compose("job-scripts", scenes, audio_uri)
    assert len(result.warnings) == 1, result.warnings
    assert "U+1FAE8" in result.warnings[0] and "left out" in result.warnings[0]
    assert "灯塔的看守人。" in file_store.get_bytes(result.captions_vtt_uri).decode()
    # Only U+1FAE8 is missing: the CJK characters came from the settings' font folder.
    # And the CJK caption is drawn (white fill in the caption band of its scene).
    raw = ffmpeg_decode(
        file_store.path_of(result.video_uri),
        "-frames:v",
        "1",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "gray",
        seek=0.5,
    )
    frame = np.frombuffer(raw, np.uint8).reshape(180, 320)
    assert (frame[120:, :] > 200).sum() > 20


async def test_without_fallback_fonts_cjk_captions_are_left_out_and_said_to_be(
    file_store, images, make_audio, tmp_path
):
    composer = composer_with_fonts(file_store, tmp_path, [])
    audio = make_audio("music.wav", "sine=frequency=440:sample_rate=22050", 2.0)
    audio_uri = file_store.put_file("uploads/tenant/x/music.wav", audio)
    result = await composer.compose("job-no-cjk", [Scene(images[0], "灯塔。")], audio_uri)
    assert len(result.warnings) == 1 and "U+706F" in result.warnings[0]


def test_override_tags_and_escapes_in_narration_are_drawn_as_written(tmp_path, chain, style):
    # Unescaped, libass would draw "Big" four times larger, break the line and hide "{x}".
    text = r"{\fs80}Big \N {x} \\h"
    frame = fill(burned_frame(tmp_path, style, text))
    literal = likeness(frame, drawn([(chain.primary, text)], style))
    obeyed = likeness(frame, drawn([(chain.primary, "Big ")], style))
    assert literal > 0.55 and literal > obeyed + 0.15, (literal, obeyed)


def test_indic_text_is_shaped_conjuncts_and_reordered_vowel_signs(
    tmp_path, chain, style, frames_dir
):
    frame = fill(burned_frame(tmp_path, style, HINDI, frames_dir / "hindi.png"))
    face = chain.runs(HINDI)[0].face
    font = face.font(style.ass_size * face.em_per_size)
    shaped = np.asarray(_draw(font, HINDI, ImageFont.Layout.RAQM)) > 128
    unshaped = np.asarray(_draw(font, HINDI, ImageFont.Layout.BASIC)) > 128
    right, wrong = likeness(frame, shaped), likeness(frame, unshaped)
    print(f"likeness {HINDI!r}: shaped {right:.2f}, unshaped {wrong:.2f}")
    assert right > 0.55 and right > wrong + 0.1, (right, wrong)


def _draw(font: ImageFont.FreeTypeFont, text: str, layout: ImageFont.Layout) -> Image.Image:
    """``text`` drawn white on black with ``font`` laid out by ``layout``."""
    font = ImageFont.truetype(font.path, font.size, index=font.index, layout_engine=layout)
    image = Image.new("L", (WIDTH * 2, HEIGHT), 0)
    ImageDraw.Draw(image).text((10, HEIGHT * 0.7), text, fill=255, font=font, anchor="ls")
    return image


def test_a_caption_line_holds_half_as_many_full_width_characters_as_letters(chain, style_for):
    style = style_for(1920, 1080, fonts=chain)  # wide enough that only the count limits
    lines = wrap("灯" * 60, style)
    assert [len(line) for line in lines] == [21, 21, 18]
    assert [len(line) for line in wrap("a" * 100, style)] == [42, 42, 16]


def test_a_damaged_font_on_the_machine_is_skipped_and_a_bad_caption_font_refused_at_start(
    tmp_path,
):
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    (fonts / "Broken-Bold.ttf").write_bytes(b"\x00\x01\x00\x00" + b"\xff" * 200)
    (fonts / "Symbola_hint.ttf").symlink_to(CAPTION_FONTS_DIR / "Symbola_hint.ttf")
    chain = FontChain(PACKAGED_FONT, (), (fonts,))
    assert [run.face.family for run in chain.runs(EMOJI)] == ["DejaVu Sans", "Symbola"]
    with pytest.raises(ValueError, match="not a font libass can draw"):
        ComposerSettings(caption_font_path=fonts / "Broken-Bold.ttf")
