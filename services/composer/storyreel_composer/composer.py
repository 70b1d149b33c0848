"""The composer core: scene images plus narration or a user's audio become an MP4.

No gRPC here. :class:`VideoComposer` validates a request before doing any
work, works in a temporary directory that is always removed, and stores the
finished, checked MP4 with its captions, poster and contact sheet, or nothing.
Scenes are numbered from 1 in messages, as in the storyboard.

Which name belongs to which layer:

====================  =============================  ===========================================
contract              composer core (here)           gateway
====================  =============================  ===========================================
composer.v1.Scene     :class:`Scene`                 (image URI, narration) pairs
ComposeRequest        storyreel.compose_options      the same ComposeOptions (shared core; the
option fields         .ComposeOptions                ``storyreel compose`` command's too)
ComposeResponse       :class:`ComposeResult`         storyreel_gateway.jobs.ComposedVideo
====================  =============================  ===========================================

The audio URI, frame rate, width, height and revision are the request's own,
arguments of :meth:`VideoComposer.compose` beside the options.

The composition is planned in Python, frame-exact (:mod:`.timeline`,
:mod:`.motion`, :mod:`.captions`, :mod:`.audio`) and drawn by one ffmpeg
filtergraph (:mod:`.filtergraph`); :mod:`.reference` builds the same plan as a
moviepy clip, the slow per-frame reference the filtergraph is checked against.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from storyreel.compose_options import FITS, MOTIONS, TRANSITIONS, ComposeOptions
from storyreel.errors import InvalidInput, NotFound, NotReady, Overloaded
from storyreel.frames import SHAPES, SHORT_SIDES, even, video_size
from storyreel.ids import check_job_id, check_revision, job_key, shown
from storyreel.limits import MIN_SCENES
from storyreel.options import AUDIO_MODES, CAPTIONS
from storyreel.storage import ArtifactStore
from storyreel_composer.audio import (
    AacEncoding,
    LoudnessTarget,
    mix_music,
    normalise_track,
    speech_spans,
    write_narration_track,
)
from storyreel_composer.captions import (
    Cue,
    burn,
    caption_style,
    chunk,
    missing_glyphs_warning,
    readable,
    spread,
    to_srt,
    to_vtt,
)
from storyreel_composer.filtergraph import Encoding, FilterPlan, encode
from storyreel_composer.images import decode_image, fit_image, upscale_warning
from storyreel_composer.motion import choose_moves
from storyreel_composer.narration_cache import NarrationCache
from storyreel_composer.probe import MediaInfo, probe
from storyreel_composer.settings import ComposerSettings
from storyreel_composer.stills import (
    contact_sheet,
    middle_frames,
    read_canvas,
    scene_still,
    thumbnail,
)
from storyreel_composer.timeline import (
    Timeline,
    narrated_timeline,
    narration_weights,
    shared_timeline,
    shots,
)
from storyreel_composer.tts import NarrationSynthesizer, Speech, VoiceCatalog
from storyreel_composer.typefaces import font_chain
from storyreel_composer.user_audio import UPLOADS_PREFIX, AudioFacts, check_audio_file

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

VIDEO_NAME = "video.mp4"
SRT_NAME = "captions.srt"
VTT_NAME = "captions.vtt"
POSTER_NAME = "poster.png"
CONTACT_SHEET_NAME = "contact-sheet.png"


@dataclass(frozen=True)
class Scene:
    """One scene: an image in the artifact store and what is said over it."""

    image_uri: str
    narration: str = ""


@dataclass(frozen=True)
class ComposeResult:
    """What was stored, the video's exact length and when each scene starts (seconds)."""

    video_uri: str
    duration_s: float
    scene_starts_s: list[float]
    captions_srt_uri: str = ""
    captions_vtt_uri: str = ""
    poster_uri: str = ""
    contact_sheet_uri: str = ""
    width: int = 0
    height: int = 0
    fps: int = 0
    #: Scenes whose speech was synthesized for this composition, and those whose speech
    #: came from the narration cache (scenes without narration, or with a user's
    #: soundtrack alone, count in neither).
    narration_synthesized: int = 0
    narration_cached: int = 0
    #: What the caller should know of a video that was made: text shown in part, say.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class NarrationCounts:
    """How many scenes' speech was synthesized and how many came from the cache."""

    synthesized: int = 0
    cached: int = 0


@dataclass(frozen=True)
class ComposePlan:
    """A validated request with defaults filled in (by :meth:`VideoComposer.check_request`
    from the settings: the plan has no defaults of its own)."""

    job_id: str
    scenes: tuple[Scene, ...]
    audio_uri: str | None
    fps: int
    width: int
    height: int
    fit: str
    transition: str
    crossfade_s: float
    motion: str
    seed: int
    captions: str
    audio_mode: str
    voice: str
    speaking_rate: float
    #: Run of the job: every artifact goes under this revision's folder (storyreel.ids.job_key).
    revision: int

    @property
    def speaks(self) -> bool:
        """Whether narration is synthesized (narration and music modes)."""
        return self.audio_mode in ("narration", "music")


@dataclass
class _Artifacts:
    """Files of one composition in its work directory."""

    video: Path
    timeline: Timeline
    cues: list[Cue] = field(default_factory=list)
    poster: Path | None = None
    contact_sheet: Path | None = None


class _Slots:
    """At most ``concurrent`` blocking calls at once, each in a thread; at most ``max_waiting``
    callers wait for a slot, later ones get Overloaded ("... ``what`` are already waiting")."""

    def __init__(self, concurrent: int, max_waiting: int, what: str) -> None:
        self._slots = asyncio.Semaphore(concurrent)
        self._max_waiting = max_waiting
        self._waiting = 0
        self._what = what

    async def run(self, blocking: Callable[[T], R], arg: T) -> R:
        """``blocking(arg)`` in a thread once a slot is free; its result or its exception."""
        if self._slots.locked() and self._waiting >= self._max_waiting:
            raise Overloaded(
                f"the composer is busy: {self._waiting} {self._what} are already waiting"
            )
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        work = asyncio.ensure_future(asyncio.to_thread(blocking, arg))
        # The slot is freed when the work ends, not when the caller stops
        # waiting: a thread cannot be cancelled, and the limit must hold.
        work.add_done_callback(self._done)
        return await asyncio.shield(work)

    def _done(self, work: asyncio.Future) -> None:
        self._slots.release()
        if not work.cancelled():
            # Retrieve the outcome so that the failure of work whose caller
            # gave up is not reported as "exception never retrieved".
            work.exception()


@contextmanager
def _scratch_dir(work_dir: Path | None, prefix: str) -> Iterator[Path]:
    """A temporary directory under ``work_dir`` (created if missing; None: the system's),
    removed afterwards."""
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=work_dir) as tmp:
        yield Path(tmp)


class VideoComposer:
    """Composes and stores videos; at most ``max_concurrent_compositions`` at once."""

    def __init__(
        self, store: ArtifactStore, synthesizer: NarrationSynthesizer, settings: ComposerSettings
    ) -> None:
        self.store = store
        self.synthesizer = synthesizer
        self.settings = settings
        self._compositions = _Slots(
            settings.max_concurrent_compositions, settings.max_waiting_compositions, "compositions"
        )
        self._probes = _Slots(
            settings.max_concurrent_probes, settings.max_waiting_probes, "audio probes"
        )
        self._narration_cache = (
            NarrationCache(store, settings.narration_cache_prefix)
            if settings.narration_cache_enabled
            else None
        )

    async def compose(
        self,
        job_id: str,
        scenes: Sequence[Scene],
        audio_uri: str | None = None,
        *,
        fps: int = 0,
        width: int = 0,
        height: int = 0,
        options: ComposeOptions | None = None,
        revision: int = 0,
    ) -> ComposeResult:
        """Compose the video of ``scenes`` and store it under the job's ``revision``.

        Everything is stored under ``jobs/<job_id>/video/`` for revision 0 and under
        ``jobs/<job_id>/r<N>/video/`` for revision N (see :func:`storyreel.ids.job_key`),
        so a later revision leaves the videos of earlier ones readable.

        Without ``audio_uri`` each scene's narration is spoken by the voice and
        the scene lasts as long as it (plus padding); with ``audio_uri`` the
        video lasts as long as that audio and the scenes share it by narration
        length (or, in "music" mode, the audio plays under the narration).
        ``fps``, ``width`` and ``height`` of 0 select the defaults; ``options``
        chooses the look and sound (:class:`ComposeOptions`).

        Stored: ``video.mp4``, ``captions.srt`` and ``captions.vtt`` (unless
        captions are off or nothing is narrated), ``poster.png`` and
        ``contact-sheet.png``.

        Raises InvalidInput for a malformed request or an unusable image or
        audio file, NotFound for an image or audio URI that does not exist,
        NotReady when narration is needed before the voice is loaded, and
        Overloaded when too many compositions are already waiting. Nothing
        is stored unless the whole video was made.
        """
        plan = self.check_request(
            job_id,
            scenes,
            audio_uri,
            fps=fps,
            width=width,
            height=height,
            options=options,
            revision=revision,
        )
        if plan.speaks and _narrated(plan) and not self.synthesizer.loaded:
            raise NotReady("the narration voice is not loaded yet")
        return await self._compositions.run(self._compose_blocking, plan)

    def check_job_inputs(
        self, job_id: str, scenes: Sequence[Scene], audio_uri: str | None = None
    ) -> None:
        """What the composer service may read for ``job_id``; InvalidInput otherwise, unread.

        Scene images only from the job's own folder (``jobs/<job_id>/``, any of its
        revisions), the audio only from the uploads (``uploads/``, where the gateway
        stores them; ProbeAudio reads nothing else either), so that a request naming
        another job's or tenant's objects reads none of them. The gateway's requests
        always keep to this; it is the service's own check, beside the internal token.
        URIs that are no key of this store are left to :meth:`check_request`.
        """
        check_job_id(job_id)
        own = f"jobs/{job_id}/"
        for number, scene in enumerate(scenes, start=1):
            key = self._key_or_none(scene.image_uri)
            if key is not None and not key.startswith(own):
                raise InvalidInput(
                    f"scene {number} image_uri {shown(scene.image_uri, 256)} is not in this "
                    f"job's folder {own}: a composition reads only its own job's images"
                )
        key = self._key_or_none(audio_uri)
        if key is not None and not key.startswith(UPLOADS_PREFIX):
            raise InvalidInput(
                f"audio_uri {shown(audio_uri, 256)} is not an upload: only {UPLOADS_PREFIX} is read"
            )

    def _key_or_none(self, uri: str | None) -> str | None:
        if not uri:
            return None
        try:
            return self.store.key_of(uri)
        except InvalidInput:
            return None

    def check_request(
        self,
        job_id: str,
        scenes: Sequence[Scene],
        audio_uri: str | None = None,
        *,
        fps: int = 0,
        width: int = 0,
        height: int = 0,
        options: ComposeOptions | None = None,
        revision: int = 0,
    ) -> ComposePlan:
        """Validate a request without any I/O; InvalidInput names the first problem."""
        s = self.settings
        o = options or ComposeOptions()
        check_job_id(job_id)
        check_revision(revision)
        if not MIN_SCENES <= len(scenes) <= s.max_scenes:
            raise InvalidInput(
                f"scenes must hold {MIN_SCENES} to {s.max_scenes} scenes, got {len(scenes)}"
            )
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

        audio_mode = _choice("audio_mode", o.audio_mode, tuple(AUDIO_MODES), None)
        if audio_mode is None:
            audio_mode = "soundtrack" if audio_uri else "narration"
        if audio_mode == "narration" and audio_uri:
            raise InvalidInput("audio_mode narration takes no audio_uri (use soundtrack or music)")
        if audio_mode != "narration" and not audio_uri:
            raise InvalidInput(f"audio_mode {audio_mode} needs an audio_uri")

        fps = fps or s.default_fps
        if not s.min_fps <= fps <= s.max_fps:
            raise InvalidInput(f"fps must be between {s.min_fps} and {s.max_fps}, got {fps}")
        width, height = self._frame_size(width, height, o)

        transition = _choice("transition", o.transition, tuple(TRANSITIONS), s.default_transition)
        crossfade_s = o.crossfade_s or s.crossfade_s
        if not s.min_crossfade_s <= crossfade_s <= s.max_crossfade_s:
            raise InvalidInput(
                f"crossfade_s must be between {s.min_crossfade_s:g} and {s.max_crossfade_s:g} s, "
                f"got {crossfade_s:g}"
            )
        rate = o.speaking_rate or 1.0
        if not s.min_speaking_rate <= rate <= s.max_speaking_rate:
            raise InvalidInput(
                f"speaking_rate must be between {s.min_speaking_rate:g} and "
                f"{s.max_speaking_rate:g}, got {rate:g}"
            )
        if o.seed < 0:
            raise InvalidInput(f"seed must not be negative, got {o.seed}")
        return ComposePlan(
            job_id,
            tuple(scenes),
            audio_uri or None,
            fps,
            width,
            height,
            fit=_choice("fit", o.fit, tuple(FITS), s.default_fit),
            transition=transition,
            crossfade_s=crossfade_s,
            motion=_choice("motion", o.motion, tuple(MOTIONS), s.default_motion),
            seed=o.seed,
            captions=_choice("captions", o.captions, tuple(CAPTIONS), s.default_captions),
            audio_mode=audio_mode,
            # One of the narration's language unless named (soundtrack: nothing is spoken).
            voice=self.synthesizer.voice_for(
                o.voice, [] if audio_mode == "soundtrack" else [s.narration for s in scenes]
            ),
            speaking_rate=rate,
            revision=revision,
        )

    def _frame_size(self, width: int, height: int, o: ComposeOptions) -> tuple[int, int]:
        s = self.settings
        if (width or height) and (o.aspect or o.resolution):
            raise InvalidInput("set either width and height or aspect and resolution, not both")
        if o.aspect or o.resolution:
            aspect = _choice("aspect", o.aspect, tuple(SHAPES), s.default_aspect)
            resolution = _choice(
                "resolution", o.resolution, tuple(SHORT_SIDES), s.default_resolution
            )
            return video_size(aspect, resolution)
        width = width or s.default_width
        height = height or s.default_height
        for name, value in (("width", width), ("height", height)):
            if value % 2 or not s.min_side <= value <= s.max_side:
                raise InvalidInput(
                    f"{name} must be an even number between {s.min_side} and {s.max_side}, "
                    f"got {value}"
                )
        return width, height

    # --- the work -----------------------------------------------------------------------------

    def _compose_blocking(self, plan: ComposePlan) -> ComposeResult:
        s = self.settings
        started = time.perf_counter()
        # Everything that can reject the request runs before narration and
        # rendering: existence, then the audio, then the images.
        for number, scene in enumerate(plan.scenes, start=1):
            if not self.store.exists(scene.image_uri):
                raise NotFound(f"scene {number} image_uri {scene.image_uri} does not exist")
        if plan.audio_uri and not self.store.exists(plan.audio_uri):
            raise NotFound(f"audio_uri {plan.audio_uri} does not exist")

        with _scratch_dir(s.work_dir, "storyreel-compose-") as work:
            audio = self._checked_audio(plan.audio_uri, work) if plan.audio_uri else None
            warnings: list[str] = []
            canvas_size = self._write_canvases(plan, work, warnings)
            checked = time.perf_counter()

            timeline, cues, counts = self._sound_track(plan, audio, work)
            if plan.captions != "off":
                cues, warning = readable(
                    cues,
                    self._caption_style(plan),
                    min_s=s.caption_min_duration_s,
                    end_s=timeline.duration_s,
                )
                warnings += [warning] if warning else []
            if plan.captions == "burned":
                warning = missing_glyphs_warning(cues, self._caption_style(plan).fonts)
                warnings += [warning] if warning else []
            voiced = time.perf_counter()

            made = self._encode(plan, timeline, cues, canvas_size, work)
            self._check_output(made.video, plan)
            encoded = time.perf_counter()
            result = self._store(plan, made, work, counts, tuple(warnings))

        log.info(
            "composed",
            extra={
                "scenes": len(plan.scenes),
                "size": f"{plan.width}x{plan.height}",
                "fps": plan.fps,
                "duration_s": round(timeline.duration_s, 3),
                "audio_mode": plan.audio_mode,
                "captions": plan.captions,
                "narration_synthesized": counts.synthesized,
                "narration_cached": counts.cached,
                "check_s": round(checked - started, 2),
                "audio_s": round(voiced - checked, 2),
                "encode_s": round(encoded - voiced, 2),
                "total_s": round(time.perf_counter() - started, 2),
            },
        )
        return result

    def _checked_audio(self, audio_uri: str, work: Path) -> tuple[Path, MediaInfo]:
        """Download the user's audio and reject it unless it is readable audio within limits.

        The one check of a user's audio, shared with :meth:`probe_audio`
        (:func:`~storyreel_composer.user_audio.check_audio_file`).
        """
        s = self.settings
        # Keep the extension: ffmpeg uses it as a hint when probing.
        suffix = Path(self.store.key_of(audio_uri)).suffix[:10]
        path = self.store.download(audio_uri, work / f"user-audio{suffix}")
        info = check_audio_file(
            path, audio_uri, max_audio_s=s.max_audio_s, timeout_s=s.ffmpeg_timeout_s
        )
        return path, info

    # --- facts for admission ------------------------------------------------------------------

    def voices(self) -> VoiceCatalog:
        """The narration voices a request may name, and the default one."""
        return self.synthesizer.catalog()

    async def probe_audio(self, uri: str) -> AudioFacts:
        """Read an uploaded audio file as :meth:`compose` reads ``audio_uri``; what it holds.

        Only objects under ``uploads/`` are read (InvalidInput otherwise).
        Raises InvalidInput with the message :meth:`compose` would give for the
        same audio, NotFound when the object does not exist, and Overloaded
        when ``max_waiting_probes`` probes already wait for one of the
        ``max_concurrent_probes`` slots (probes never wait for compositions).
        """
        shown = uri if len(uri) <= 256 else uri[:256] + "..."
        try:
            key = self.store.key_of(uri)
        except InvalidInput as exc:
            raise InvalidInput(f"uri: {exc.message[:512]}") from None
        if not key.startswith(UPLOADS_PREFIX):
            raise InvalidInput(f"uri {shown} is not an upload: only {UPLOADS_PREFIX} is read")
        return await self._probes.run(self._probe_blocking, uri)

    def _probe_blocking(self, uri: str) -> AudioFacts:
        if not self.store.exists(uri):
            raise NotFound(f"audio_uri {uri} does not exist")
        with _scratch_dir(self.settings.work_dir, "storyreel-probe-") as work:
            _path, info = self._checked_audio(uri, work)
        return AudioFacts.of(info)

    def _write_canvases(
        self, plan: ComposePlan, work: Path, warnings: list[str]
    ) -> tuple[int, int]:
        """Decode every scene image, fit it to the frame and write it raw for the renderer.

        Moving pictures are fitted larger than the frame (``motion_supersample``)
        so that slow moves glide instead of stepping a pixel at a time. One
        image is held in memory at a time. A warning is added to ``warnings`` for
        each image enlarged far past its size to fill the frame
        (:func:`~storyreel_composer.images.upscale_warning`).
        """
        s = self.settings
        scale = s.motion_supersample if plan.motion == "ken_burns" else 1.0
        size = (even(plan.width * scale), even(plan.height * scale))
        for number, scene in enumerate(plan.scenes, start=1):
            image = decode_image(
                self.store.get_bytes(scene.image_uri),
                max_pixels=s.max_image_pixels,
                label=f"scene {number} image {scene.image_uri}",
            )
            fitted = fit_image(
                image,
                *size,
                fit=plan.fit,
                blur_radius=s.blur_radius,
                blur_brightness=s.blur_brightness,
            )
            (work / _canvas_name(number)).write_bytes(fitted.tobytes())
            # Said of the scene by its number: the caller knows no object key.
            warning = upscale_warning(
                image.size, plan.width, plan.height, fit=plan.fit, label=f"scene {number} image"
            )
            warnings += [warning] if warning else []
        return size

    def _sound_track(
        self, plan: ComposePlan, audio: tuple[Path, MediaInfo] | None, work: Path
    ) -> tuple[Timeline, list[Cue], NarrationCounts]:
        """Write ``track.wav`` (normalised, exactly as long as the video); returns the
        timeline, the caption cues and how the narration was made."""
        s = self.settings
        target = LoudnessTarget(
            s.loudness_lufs, s.true_peak_db, s.loudness_range_lu, s.encoder_headroom_db
        )
        aac = AacEncoding(s.audio_bitrate, s.audio_sample_rate)
        style = self._caption_style(plan)
        track = work / "track.wav"
        if plan.audio_mode == "soundtrack":
            assert audio is not None
            source, info = audio
            timeline = shared_timeline(
                info.duration_s,
                narration_weights([scene.narration for scene in plan.scenes]),
                plan.fps,
            )
            normalise_track(
                source,
                track,
                timeline.duration_s,
                target=target,
                sample_rate=s.audio_sample_rate,
                timeout_s=s.ffmpeg_timeout_s,
                encoding=aac,
            )
            # No speech to follow: each scene's text is shown across its scene.
            cues: list[Cue] = []
            ends = [*timeline.scene_starts_s[1:], timeline.duration_s]
            for scene, start, end in zip(plan.scenes, timeline.scene_starts_s, ends, strict=True):
                cues += spread(chunk(scene.narration, style), start, end)
            return timeline, cues, NarrationCounts()

        speeches, counts = self._narrate(plan, work)
        timeline = narrated_timeline(
            [speech.duration_s for speech in speeches],
            plan.fps,
            padding_s=s.narration_padding_s,
            silent_scene_s=s.silent_scene_s,
        )
        # With nothing narrated the voice may not be loaded: the track is silence.
        narrated = any(speech.duration_s for speech in speeches)
        narration = write_narration_track(
            [
                work / _narration_name(number) if speech.duration_s else None
                for number, speech in enumerate(speeches, start=1)
            ],
            timeline.scene_starts_s,
            timeline.duration_s,
            work / "narration.wav",
            self.synthesizer.sample_rate_of(plan.voice) if narrated else s.audio_sample_rate,
        )
        cues = []
        for speech, start in zip(speeches, timeline.scene_starts_s, strict=True):
            for text, begin, end in speech.sentences:
                cues += spread(chunk(text, style), start + begin, start + end)
        mix = narration
        if plan.audio_mode == "music":
            assert audio is not None
            spans = [
                (start, start + speech.duration_s)
                for speech, start in zip(speeches, timeline.scene_starts_s, strict=True)
            ]
            mix = mix_music(
                narration,
                audio[0],
                work / "mix.wav",
                timeline.duration_s,
                spans=speech_spans(spans, s.duck_hold_s),
                target=target,
                music_level_lu=s.music_level_lu,
                duck_db=s.music_duck_db,
                ramp_s=s.duck_ramp_s,
                fade_out_s=s.music_fade_out_s,
                sample_rate=s.audio_sample_rate,
                timeout_s=s.ffmpeg_timeout_s,
            )
        normalise_track(
            mix,
            track,
            timeline.duration_s,
            target=target,
            sample_rate=s.audio_sample_rate,
            timeout_s=s.ffmpeg_timeout_s,
            encoding=aac,
        )
        return timeline, cues, counts

    def _narrate(self, plan: ComposePlan, work: Path) -> tuple[list[Speech], NarrationCounts]:
        """Speak every scene's narration into its own WAV file, or take it from the
        narration cache (:mod:`.narration_cache`) when the same speech was made before."""
        cache = self._narration_cache
        speeches = []
        synthesized = cached = 0
        for number, scene in enumerate(plan.scenes, start=1):
            if not scene.narration.strip():
                speeches.append(Speech(0.0))
                continue
            path = work / _narration_name(number)
            key = ""
            if cache is not None:
                synth = self.synthesizer
                rate = plan.speaking_rate
                key = synth.narration_key(scene.narration, voice=plan.voice, rate=rate)
                speech = cache.load(key, path, synth.sample_rate_of(plan.voice))
                if speech is not None:
                    speeches.append(speech)
                    cached += 1
                    continue
            speech = self.synthesizer.speak(
                scene.narration, path, voice=plan.voice, rate=plan.speaking_rate
            )
            synthesized += 1
            if cache is not None:
                cache.save(key, path, speech)
            speeches.append(speech)
        return speeches, NarrationCounts(synthesized, cached)

    def _caption_style(self, plan: ComposePlan):
        s = self.settings
        return caption_style(
            plan.width,
            plan.height,
            fonts=font_chain(
                s.caption_font_path,
                tuple(s.caption_fallback_fonts),
                tuple(s.caption_font_dirs),
            ),
            font_scale=s.caption_font_scale,
            outline_scale=s.caption_outline_scale,
            max_lines=s.caption_max_lines,
            max_chars=s.caption_max_chars,
            margin=s.caption_margin,
            portrait_bottom_margin=s.caption_portrait_bottom_margin,
        )

    def _encode(
        self,
        plan: ComposePlan,
        timeline: Timeline,
        cues: list[Cue],
        canvas_size: tuple[int, int],
        work: Path,
    ) -> _Artifacts:
        s = self.settings
        count = len(plan.scenes)
        moves = (
            choose_moves(plan.seed, count, s.motion_zoom)
            if plan.motion == "ken_burns"
            else [None] * count
        )
        fade = round(plan.crossfade_s * plan.fps) if plan.transition == "crossfade" else 0
        burned: list[str] = []
        if plan.captions == "burned" and cues:
            burned = [burn(cues, self._caption_style(plan), work)]
        filter_plan = FilterPlan(
            width=plan.width,
            height=plan.height,
            fps=plan.fps,
            canvases=tuple(_canvas_name(n) for n in range(1, count + 1)),
            canvas_size=canvas_size,
            shots=tuple(shots(timeline, fade)),
            moves=tuple(moves),
            total_frames=timeline.total_frames,
            audio="track.wav",
            video=VIDEO_NAME,
            captions=tuple(burned),
            encoding=Encoding(
                s.x264_preset, s.x264_crf, s.audio_bitrate, s.audio_sample_rate, s.encode_threads
            ),
        )
        video = encode(filter_plan, work, timeout_s=s.encode_timeout_s)
        poster, sheet = self._stills(filter_plan, timeline, work)
        return _Artifacts(video, timeline, cues if plan.captions != "off" else [], poster, sheet)

    def _stills(self, plan: FilterPlan, timeline: Timeline, work: Path) -> tuple[Path, Path]:
        """The poster (scene 1) and contact sheet (every scene): mid-scene, no captions."""
        s = self.settings
        poster, sheet = work / POSTER_NAME, work / CONTACT_SHEET_NAME
        frames = middle_frames(timeline.start_frames, timeline.scene_frames)
        thumbs = []
        for number, (shot, move, frame) in enumerate(
            zip(plan.shots, plan.moves, frames, strict=True), start=1
        ):
            canvas = read_canvas(work / _canvas_name(number), plan.canvas_size)
            still = scene_still(canvas, shot, move, frame, (plan.width, plan.height))
            if number == 1:
                still.save(poster)
            thumbs.append(thumbnail(still, s.contact_sheet_thumb_width))
        contact_sheet(thumbs, s.contact_sheet_columns).save(sheet)
        return poster, sheet

    def _check_output(self, video: Path, plan: ComposePlan) -> None:
        """Refuse to store a file players would reject (wrong codec, pixel format or size)."""
        info = probe(video, decode=False, timeout_s=self.settings.ffmpeg_timeout_s)
        expected = ("h264", "yuv420p", plan.width, plan.height, "aac")
        actual = (info.video_codec, info.pix_fmt, info.width, info.height, info.audio_codec)
        if actual != expected:
            raise RuntimeError(f"encoder wrote {actual}, expected {expected}")

    def _store(
        self,
        plan: ComposePlan,
        made: _Artifacts,
        work: Path,
        counts: NarrationCounts,
        warnings: tuple[str, ...] = (),
    ) -> ComposeResult:
        """Store every artifact, or none: a failed upload removes what was stored."""
        stored: list[str] = []

        def put(name: str, path: Path, content_type: str) -> str:
            key = job_key(plan.job_id, "video", name, revision=plan.revision)
            uri = self.store.put_file(key, path, content_type)
            stored.append(uri)
            return uri

        try:
            srt = vtt = ""
            if made.cues:
                (work / SRT_NAME).write_text(to_srt(made.cues), encoding="utf-8")
                (work / VTT_NAME).write_text(to_vtt(made.cues), encoding="utf-8")
                srt = put(SRT_NAME, work / SRT_NAME, "application/x-subrip")
                vtt = put(VTT_NAME, work / VTT_NAME, "text/vtt")
            poster = put(POSTER_NAME, made.poster, "image/png") if made.poster else ""
            sheet = (
                put(CONTACT_SHEET_NAME, made.contact_sheet, "image/png")
                if made.contact_sheet
                else ""
            )
            video = put(VIDEO_NAME, made.video, "video/mp4")
        except BaseException:
            for uri in stored:
                self.store.delete(uri)
            raise
        return ComposeResult(
            video,
            made.timeline.duration_s,
            made.timeline.scene_starts_s,
            captions_srt_uri=srt,
            captions_vtt_uri=vtt,
            poster_uri=poster,
            contact_sheet_uri=sheet,
            width=plan.width,
            height=plan.height,
            fps=plan.fps,
            narration_synthesized=counts.synthesized,
            narration_cached=counts.cached,
            warnings=warnings,
        )


def _choice(name: str, value: str | None, allowed: Sequence[str], default: str | None):
    if not value:
        return default
    if value not in allowed:
        raise InvalidInput(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _narrated(plan: ComposePlan) -> bool:
    return any(scene.narration.strip() for scene in plan.scenes)


def _canvas_name(number: int) -> str:
    return f"canvas-{number:03d}.rgb"


def _narration_name(number: int) -> str:
    return f"narration-{number:03d}.wav"
