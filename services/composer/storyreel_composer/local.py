"""Composing from local files, without the other services: ``storyreel compose``.

The user's own images (taken in name order) and audio become a video through
the same :class:`~storyreel_composer.composer.VideoComposer` the service
runs, over a private file store in a temporary directory; the results are
copied next to the requested output.

The ``storyreel`` command line finds this module through the ``storyreel.local``
entry point this package declares (its pyproject.toml) and calls
:func:`compose_files`: the shared core imports no service package.
``pip install 'storyreel[composer]'`` installs it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from storyreel.compose_options import ComposeOptions
from storyreel.errors import InvalidInput, StoryreelError
from storyreel.ids import shown
from storyreel.storage import FileStore
from storyreel_composer.composer import ComposeResult, Scene, VideoComposer
from storyreel_composer.settings import ComposerSettings
from storyreel_composer.tts import NarrationSynthesizer

__all__ = ["LocalResult", "compose_files", "narration_lines", "scene_images"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class LocalResult:
    """Where the results were written, and the composition's facts."""

    video: Path
    captions_srt: Path | None
    captions_vtt: Path | None
    poster: Path
    contact_sheet: Path
    result: ComposeResult


def _natural_key(path: Path) -> list:
    # "scene-2" before "scene-10": numbers compare as numbers.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def scene_images(images_dir: Path) -> list[Path]:
    """The image files of ``images_dir`` in name order (numbers in names compare as numbers)."""
    if not images_dir.is_dir():
        raise InvalidInput(f"--images {images_dir} is not a directory")
    images = [
        path
        for path in images_dir.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not images:
        raise InvalidInput(
            f"--images {images_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return sorted(images, key=_natural_key)


def narration_lines(narration: Path | None, count: int) -> list[str]:
    """One narration line per image from a text file (trailing blank lines ignored)."""
    if narration is None:
        return [""] * count
    try:
        lines = narration.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"--narration {narration} is not a readable text file ({exc})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != count:
        raise InvalidInput(
            f"--narration {narration} has {len(lines)} lines for {count} images: "
            "write one line per image (an empty line for a scene without narration)"
        )
    return [line.strip() for line in lines]


def _said_of_files(message: str, names: dict[str, str]) -> str:
    """``message`` with each stored object's URI replaced by the user's file it holds
    (``audio_uri <uri>`` becomes ``--audio <file>``): no path of the private store,
    which is gone once the command ends, reaches the user."""
    for uri, name in names.items():
        message = message.replace(f"audio_uri {uri}", f"--audio {name}").replace(uri, name)
    return message


def compose_files(
    images_dir: Path,
    output: Path,
    *,
    audio: Path | None = None,
    narration: Path | None = None,
    options: ComposeOptions | None = None,
    fps: int = 0,
    width: int = 0,
    height: int = 0,
    settings: ComposerSettings | None = None,
) -> LocalResult:
    """Compose a video from local files and write it to ``output``.

    Beside it go ``<stem>.srt`` and ``<stem>.vtt`` (when there are captions),
    ``<stem>-poster.png`` and ``<stem>-contact-sheet.png``. The voice is
    loaded only when narration is to be spoken.
    """
    settings = settings or ComposerSettings()
    options = options or ComposeOptions()
    images = scene_images(images_dir)
    texts = narration_lines(narration, len(images))
    if audio is not None and not audio.is_file():
        raise InvalidInput(f"--audio {audio} does not exist")
    if audio is None and not any(texts):
        raise InvalidInput("give --audio, or --narration to speak, or both")

    synthesizer = NarrationSynthesizer.from_settings(settings)
    mode = options.audio_mode or ("soundtrack" if audio else "narration")
    if mode in ("narration", "music") and any(texts):
        synthesizer.load()
    with tempfile.TemporaryDirectory(prefix="storyreel-local-") as tmp:
        store = FileStore(Path(tmp) / "artifacts")
        scenes = [
            Scene(store.put_file(f"jobs/local/images/scene-{n:03d}{path.suffix}", path), text)
            for n, (path, text) in enumerate(zip(images, texts, strict=True), start=1)
        ]
        audio_uri = (
            store.put_file(f"jobs/local/audio/audio{audio.suffix[:10]}", audio) if audio else None
        )
        composer = VideoComposer(store, synthesizer, settings)
        # The composer names the objects of the private store; the user knows the files.
        names = {s.image_uri: shown(str(path)) for s, path in zip(scenes, images, strict=True)}
        if audio_uri:
            names[audio_uri] = shown(str(audio))
        try:
            result = asyncio.run(
                composer.compose(
                    "local", scenes, audio_uri, fps=fps, width=width, height=height, options=options
                )
            )
        except StoryreelError as exc:
            raise type(exc)(_said_of_files(exc.message, names)) from None
        output.parent.mkdir(parents=True, exist_ok=True)
        stem = output.with_suffix("")

        def copy(uri: str, target: Path) -> Path:
            shutil.copyfile(store.path_of(uri), target)
            return target

        return LocalResult(
            video=copy(result.video_uri, output),
            captions_srt=(
                copy(result.captions_srt_uri, stem.with_name(stem.name + ".srt"))
                if result.captions_srt_uri
                else None
            ),
            captions_vtt=(
                copy(result.captions_vtt_uri, stem.with_name(stem.name + ".vtt"))
                if result.captions_vtt_uri
                else None
            ),
            poster=copy(result.poster_uri, stem.with_name(stem.name + "-poster.png")),
            contact_sheet=copy(
                result.contact_sheet_uri, stem.with_name(stem.name + "-contact-sheet.png")
            ),
            result=result,
        )
