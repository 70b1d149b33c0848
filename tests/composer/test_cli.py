"""`storyreel compose`: the user's own images and audio become a video, no other service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import ffmpeg_decode, lavfi_media, probe_media

# Named so that plain string order would differ from number order.
PICTURES = {
    "scene-1.png": (230, 20, 20),
    "scene-2.png": (20, 230, 20),
    "scene-10.png": (20, 20, 230),
}


def compose(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "storyreel.cli", "compose", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        check=False,
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "pictures"
    images.mkdir()
    for name, colour in PICTURES.items():
        Image.new("RGB", (320, 240), colour).save(images / name)
    (images / "notes.txt").write_text("not an image")
    lavfi_media(tmp_path / "song.mp3", "sine", 3.0, "-c:a", "libmp3lame")
    (tmp_path / "lines.txt").write_text("The red one.\nThe green one.\n\n")
    return tmp_path


def test_compose_makes_a_captioned_video_from_local_files_in_name_order(folder: Path):
    (folder / "lines.txt").write_text("The red one.\nThe green one.\nThe blue one.\n")
    result = compose(
        *("--images", "pictures", "--audio", "song.mp3", "--narration", "lines.txt"),
        *("--aspect", "1:1", "--resolution", "480p", "--fps", "12", "--transition", "cut"),
        *("--motion", "none", "-o", "out/story.mp4"),
        cwd=folder,
    )
    assert result.returncode == 0, result.stderr
    video = folder / "out" / "story.mp4"
    assert result.stdout.strip() == str(video)
    media = probe_media(video)
    assert (media.width, media.height, media.video_codec, media.audio_codec) == (
        480,
        480,
        "h264",
        "aac",
    )
    assert media.duration_s == pytest.approx(3.0, abs=1 / 12)
    for name in ("story.srt", "story.vtt", "story-poster.png", "story-contact-sheet.png"):
        assert (folder / "out" / name).is_file(), name
    srt = (folder / "out" / "story.srt").read_text()
    assert "The red one." in srt and "The blue one." in srt

    # Scenes in number order: red, green, then blue (scene-10), each a third of the song.
    raw = ffmpeg_decode(video, "-vf", "scale=8:8", "-f", "rawvideo", "-pix_fmt", "rgb24")
    shown = np.frombuffer(raw, np.uint8).reshape(-1, 64, 3).mean(axis=1).argmax(axis=1)
    assert shown[[6, 18, 30]].tolist() == [0, 1, 2]


def test_narration_with_the_wrong_number_of_lines_is_refused_naming_both_counts(folder: Path):
    result = compose(
        *("--images", "pictures", "--audio", "song.mp3", "--narration", "lines.txt"),
        cwd=folder,
    )
    assert result.returncode == 2
    assert "has 2 lines for 3 images" in result.stderr
    assert not (folder / "storyreel.mp4").exists()


def test_bad_audio_is_refused_and_nothing_is_written(folder: Path):
    (folder / "song.mp3").write_bytes(b"ID3 but nothing else")
    result = compose("--images", "pictures", "--audio", "song.mp3", "-o", "x.mp4", cwd=folder)
    assert result.returncode == 2
    assert "is not usable audio" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["lines.txt", "pictures", "song.mp3"]


def test_a_truncated_mp3_is_refused_naming_the_users_file_not_ours(folder: Path):
    """The first 1000 bytes of a real MP3: refused as damaged, said of `--audio` and the
    file as the user named it, never of the command's private store."""
    (folder / "my song.mp3").write_bytes((folder / "song.mp3").read_bytes()[:1000])
    result = compose("--images", "pictures", "--audio", "my song.mp3", "-o", "x.mp4", cwd=folder)
    assert result.returncode == 2, result.stderr
    assert "--audio 'my song.mp3' is not usable audio: it is truncated" in result.stderr
    assert "storyreel-local" not in result.stderr and "file://" not in result.stderr
    assert not (folder / "x.mp4").exists()


def test_an_unreadable_image_is_named_by_its_file(folder: Path):
    (folder / "pictures" / "scene-3.png").write_bytes(b"not a png")
    result = compose("--images", "pictures", "--audio", "song.mp3", "-o", "x.mp4", cwd=folder)
    assert result.returncode == 2, result.stderr
    assert "scene 3 image 'pictures/scene-3.png' is not a readable image" in result.stderr
    assert "storyreel-local" not in result.stderr and "file://" not in result.stderr


def test_a_tiny_image_is_composed_with_a_warning(folder: Path):
    Image.new("RGB", (16, 12), (200, 200, 40)).save(folder / "pictures" / "scene-1.png")
    result = compose(
        *("--images", "pictures", "--audio", "song.mp3", "--resolution", "480p"),
        *("--motion", "none", "--fps", "12", "-o", "x.mp4"),
        cwd=folder,
    )
    assert result.returncode == 0, result.stderr
    # 16x12 covering 854x480 (16:9 at 480p): enlarged 53.4 times.
    assert "warning scene 1 image is only 16x12 pixels: enlarged 53.4 times" in result.stderr
    assert "scene 2 image" not in result.stderr  # 320x240: 2.7 times
