"""The composer core: scene images plus narration or a user's audio become an MP4.

No gRPC here. :class:`VideoComposer` validates a request before doing any
work, works in a temporary directory that is always removed, and stores only
the finished, checked MP4. Scenes are numbered from 1 in messages, as in the
storyboard.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storyreel.errors import InvalidInput, NotFound, NotReady, Overloaded
from storyreel.ids import check_job_id, job_key
from storyreel.storage import ArtifactStore
from storyreel_composer.audio import fit_audio_track, write_narration_track
from storyreel_composer.images import cover_frame
from storyreel_composer.probe import MediaError, MediaInfo, probe
from storyreel_composer.settings import ComposerSettings
from storyreel_composer.timeline import (
    Timeline,
    narrated_timeline,
    narration_weights,
    shared_timeline,
)
from storyreel_composer.tts import NarrationSynthesizer
from storyreel_composer.video import encode_slideshow

log = logging.getLogger(__name__)

VIDEO_NAME = "video.mp4"


@dataclass(frozen=True)
class SceneInput:
    """One scene: an image in the artifact store and what is said over it."""

    image_uri: str
    narration: str = ""


@dataclass(frozen=True)
class ComposeResult:
    """The stored video, its exact length and when each scene starts (seconds)."""

    video_uri: str
    duration_s: float
    scene_starts_s: list[float]


@dataclass(frozen=True)
class ComposePlan:
    """A validated request with defaults filled in."""

    job_id: str
    scenes: tuple[SceneInput, ...]
    audio_uri: str | None
    fps: int
    width: int
    height: int


class VideoComposer:
    """Composes and stores videos; at most ``max_concurrent_compositions`` at once."""

    def __init__(
        self, store: ArtifactStore, synthesizer: NarrationSynthesizer, settings: ComposerSettings
    ) -> None:
        self.store = store
        self.synthesizer = synthesizer
        self.settings = settings
        self._slots = asyncio.Semaphore(settings.max_concurrent_compositions)
        self._waiting = 0

    async def compose(
        self,
        job_id: str,
        scenes: Sequence[SceneInput],
        audio_uri: str | None = None,
        *,
        fps: int = 0,
        width: int = 0,
        height: int = 0,
    ) -> ComposeResult:
        """Compose the video of ``scenes`` and store it at ``jobs/<job_id>/video/video.mp4``.

        Without ``audio_uri`` each scene's narration is spoken by the voice and
        the scene lasts as long as it (plus padding); with ``audio_uri`` the
        video lasts as long as that audio and the scenes share it by narration
        length. ``fps``, ``width`` and ``height`` of 0 select the defaults.

        Raises InvalidInput for a malformed request or an unusable image or
        audio file, NotFound for an image or audio URI that does not exist,
        NotReady when narration is needed before the voice is loaded, and
        Overloaded when too many compositions are already waiting. Nothing
        is stored unless the whole video was made.
        """
        plan = self.check_request(job_id, scenes, audio_uri, fps=fps, width=width, height=height)
        if plan.audio_uri is None and not self.synthesizer.loaded:
            raise NotReady("the narration voice is not loaded yet")
        if self._slots.locked() and self._waiting >= self.settings.max_waiting_compositions:
            raise Overloaded(
                f"the composer is busy: {self._waiting} compositions are already waiting"
            )
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        work = asyncio.ensure_future(asyncio.to_thread(self._compose_blocking, plan))
        # The slot is freed when the work ends, not when the caller stops
        # waiting: a thread cannot be cancelled, and the limit must hold.
        work.add_done_callback(self._work_done)
        return await asyncio.shield(work)

    def _work_done(self, work: asyncio.Future) -> None:
        self._slots.release()
        if not work.cancelled():
            # Retrieve the outcome so that the failure of work whose caller
            # gave up is not reported as "exception never retrieved".
            work.exception()

    def check_request(
        self,
        job_id: str,
        scenes: Sequence[SceneInput],
        audio_uri: str | None = None,
        *,
        fps: int = 0,
        width: int = 0,
        height: int = 0,
    ) -> ComposePlan:
        """Validate a request without any I/O; InvalidInput names the first problem."""
        s = self.settings
        check_job_id(job_id)
        if not 1 <= len(scenes) <= s.max_scenes:
            raise InvalidInput(f"scenes must hold 1 to {s.max_scenes} scenes, got {len(scenes)}")
        for number, scene in enumerate(scenes, start=1):
            if not scene.image_uri:
                raise InvalidInput(f"scene {number} has no image_uri")
            try:
                self.store.key_of(scene.image_uri)
            except InvalidInput as exc:
                raise InvalidInput(f"scene {number} image_uri: {exc.message}") from None
            if len(scene.narration) > s.max_narration_chars:
                raise InvalidInput(
                    f"scene {number} narration is {len(scene.narration)} characters; "
                    f"the limit is {s.max_narration_chars}"
                )
        if audio_uri:
            try:
                self.store.key_of(audio_uri)
            except InvalidInput as exc:
                raise InvalidInput(f"audio_uri: {exc.message}") from None
        fps = fps or s.default_fps
        width = width or s.default_width
        height = height or s.default_height
        if not s.min_fps <= fps <= s.max_fps:
            raise InvalidInput(f"fps must be between {s.min_fps} and {s.max_fps}, got {fps}")
        for name, value in (("width", width), ("height", height)):
            if value % 2 or not s.min_side <= value <= s.max_side:
                raise InvalidInput(
                    f"{name} must be an even number between {s.min_side} and {s.max_side}, "
                    f"got {value}"
                )
        return ComposePlan(job_id, tuple(scenes), audio_uri or None, fps, width, height)

    def _compose_blocking(self, plan: ComposePlan) -> ComposeResult:
        s = self.settings
        started = time.perf_counter()
        # Everything that can reject the request runs before narration and
        # encoding: existence, then the audio, then the images.
        for number, scene in enumerate(plan.scenes, start=1):
            if not self.store.exists(scene.image_uri):
                raise NotFound(f"scene {number} image_uri {scene.image_uri} does not exist")
        if plan.audio_uri and not self.store.exists(plan.audio_uri):
            raise NotFound(f"audio_uri {plan.audio_uri} does not exist")

        if s.work_dir is not None:
            s.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="storyreel-compose-", dir=s.work_dir) as tmp:
            work = Path(tmp)
            audio = self._checked_audio(plan.audio_uri, work) if plan.audio_uri else None
            frames = self._frames(plan)
            checked = time.perf_counter()

            track = work / "track.wav"
            if audio is not None:
                source, info = audio
                timeline = shared_timeline(
                    info.duration_s,
                    narration_weights([scene.narration for scene in plan.scenes]),
                    plan.fps,
                )
                fit_audio_track(
                    source,
                    timeline.duration_s,
                    track,
                    s.audio_sample_rate,
                    channels=min(info.channels or 2, 2),
                    timeout_s=s.ffmpeg_timeout_s,
                )
            else:
                timeline = self._narrate(plan, work, track)
            voiced = time.perf_counter()

            video = work / VIDEO_NAME
            encode_slideshow(
                frames,
                timeline,
                track,
                video,
                preset=s.x264_preset,
                crf=s.x264_crf,
                audio_bitrate=s.audio_bitrate,
                sample_rate=s.audio_sample_rate,
                threads=s.encode_threads,
            )
            self._check_output(video, plan)
            encoded = time.perf_counter()
            uri = self.store.put_file(job_key(plan.job_id, "video", VIDEO_NAME), video, "video/mp4")

        log.info(
            "composed",
            extra={
                "scenes": len(plan.scenes),
                "size": f"{plan.width}x{plan.height}",
                "fps": plan.fps,
                "duration_s": round(timeline.duration_s, 3),
                "user_audio": plan.audio_uri is not None,
                "check_s": round(checked - started, 2),
                "audio_s": round(voiced - checked, 2),
                "encode_s": round(encoded - voiced, 2),
                "total_s": round(time.perf_counter() - started, 2),
            },
        )
        return ComposeResult(uri, timeline.duration_s, timeline.scene_starts_s)

    def _checked_audio(self, audio_uri: str, work: Path) -> tuple[Path, MediaInfo]:
        """Download the user's audio and reject it unless it is readable audio within limits."""
        s = self.settings
        # Keep the extension: ffmpeg uses it as a hint when probing.
        suffix = Path(self.store.key_of(audio_uri)).suffix[:10]
        path = self.store.download(audio_uri, work / f"user-audio{suffix}")
        if path.stat().st_size == 0:
            raise InvalidInput(f"audio_uri {audio_uri} is not usable audio: the file is empty")
        try:
            # The header first, so an overlong file is refused without decoding it.
            header = probe(path, decode=False, timeout_s=s.ffmpeg_timeout_s)
            if header.has_audio and header.duration_s > s.max_audio_s + 1:
                raise InvalidInput(
                    f"audio_uri {audio_uri} lasts {header.duration_s:.1f} s; "
                    f"the limit is {s.max_audio_s:g} s"
                )
            info = probe(path, decode_video=False, timeout_s=s.ffmpeg_timeout_s)
        except MediaError as exc:
            raise InvalidInput(f"audio_uri {audio_uri} is not usable audio: {exc}") from None
        if not info.has_audio:
            raise InvalidInput(f"audio_uri {audio_uri} is not usable audio: it has no audio stream")
        if info.duration_s <= 0:
            raise InvalidInput(f"audio_uri {audio_uri} is not usable audio: it holds no samples")
        if info.duration_s > s.max_audio_s:
            raise InvalidInput(
                f"audio_uri {audio_uri} lasts {info.duration_s:.1f} s; "
                f"the limit is {s.max_audio_s:g} s"
            )
        return path, info

    def _frames(self, plan: ComposePlan) -> list[np.ndarray]:
        """Every scene image, decoded once and cropped to the output size."""
        frames = []
        for number, scene in enumerate(plan.scenes, start=1):
            frames.append(
                cover_frame(
                    self.store.get_bytes(scene.image_uri),
                    plan.width,
                    plan.height,
                    max_pixels=self.settings.max_image_pixels,
                    label=f"scene {number} image {scene.image_uri}",
                )
            )
        return frames

    def _narrate(self, plan: ComposePlan, work: Path, track: Path) -> Timeline:
        """Speak every scene's narration and lay it out; returns the timeline."""
        s = self.settings
        wavs: list[Path | None] = []
        seconds: list[float] = []
        for number, scene in enumerate(plan.scenes, start=1):
            if not scene.narration.strip():
                wavs.append(None)
                seconds.append(0.0)
                continue
            wav = work / f"narration-{number:03d}.wav"
            duration = self.synthesizer.synthesize(scene.narration, wav)
            # Text with nothing to pronounce gives no samples: a silent scene.
            wavs.append(wav if duration > 0 else None)
            seconds.append(duration)
        timeline = narrated_timeline(
            seconds, plan.fps, padding_s=s.narration_padding_s, silent_scene_s=s.silent_scene_s
        )
        write_narration_track(
            wavs,
            timeline.scene_starts_s,
            timeline.duration_s,
            track,
            self.synthesizer.sample_rate,
        )
        return timeline

    def _check_output(self, video: Path, plan: ComposePlan) -> None:
        """Refuse to store a file players would reject (wrong codec, pixel format or size)."""
        info = probe(video, decode=False, timeout_s=self.settings.ffmpeg_timeout_s)
        expected = ("h264", "yuv420p", plan.width, plan.height, "aac")
        actual = (info.video_codec, info.pix_fmt, info.width, info.height, info.audio_codec)
        if actual != expected:
            raise RuntimeError(f"encoder wrote {actual}, expected {expected}")
