"""Fixtures of the composer tests: small settings, stored inputs, one loaded voice."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from storyreel_composer.captions import CaptionStyle, caption_style
from storyreel_composer.composer import VideoComposer
from storyreel_composer.settings import PACKAGED_FONT, ComposerSettings
from storyreel_composer.tts import NarrationSynthesizer
from storyreel_composer.typefaces import font_chain
from support import lavfi_media

from storyreel.storage import FileStore

#: Solid scene colours, one dominant channel each (red, green, blue), so every
#: decoded frame tells which scene it shows.
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]


@pytest.fixture
def composer_settings(tmp_path: Path) -> ComposerSettings:
    """Small frames and a private work directory, so tests are quick and can see leftovers.

    Motion and captions stay on (the defaults), so every test renders the full filtergraph.
    """
    return ComposerSettings(
        port=0, default_width=128, default_height=128, default_fps=24, work_dir=tmp_path / "work"
    )


@pytest.fixture(scope="session")
def voice() -> Iterator[NarrationSynthesizer]:
    """The real piper voice, loaded once per session (tests using it are marked `model`)."""
    synthesizer = NarrationSynthesizer.from_settings(ComposerSettings())
    synthesizer.load()
    yield synthesizer
    synthesizer.close()


@pytest.fixture
def unvoiced_composer(file_store: FileStore, composer_settings: ComposerSettings) -> VideoComposer:
    """A composer whose voice is not loaded: enough for user audio and for rejections."""
    return VideoComposer(
        file_store, NarrationSynthesizer.from_settings(composer_settings), composer_settings
    )


@pytest.fixture
def narrating_composer(
    file_store: FileStore, composer_settings: ComposerSettings, voice: NarrationSynthesizer
) -> VideoComposer:
    return VideoComposer(file_store, voice, composer_settings)


@pytest.fixture(scope="session")
def style_for() -> Callable[..., CaptionStyle]:
    """``style_for(width, height, **change)``: the caption style of a frame, with the
    composer's default caption settings but for ``change``."""
    defaults = dict(
        fonts=font_chain(PACKAGED_FONT, (), ()),
        font_scale=0.055,
        outline_scale=0.09,
        max_lines=2,
        max_chars=42,
        margin=0.05,
        portrait_bottom_margin=0.18,
    )

    def style(width: int, height: int, **change) -> CaptionStyle:
        return caption_style(width, height, **(defaults | change))

    return style


def _png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def images(file_store: FileStore) -> list[str]:
    """URIs of three stored 320x180 scene images (wider than the output, so they are
    cropped): red, green, blue."""
    return [
        file_store.put_bytes(f"jobs/inputs/images/scene-{n}.png", _png(colour, (320, 180)))
        for n, colour in enumerate(COLOURS, start=1)
    ]


@pytest.fixture
def make_audio(tmp_path: Path) -> Callable[..., Path]:
    """Returns make(name, lavfi_source, duration_s, *more_ffmpeg_options) -> path."""

    def make(name: str, source: str, duration_s: float, *options: str) -> Path:
        path = tmp_path / "audio-sources" / name
        path.parent.mkdir(exist_ok=True)
        return lavfi_media(path, source, duration_s, *options)

    return make
