"""Admission: what a CreateVideo or RegenerateScene may ask for, checked before any work.

Every rule a later stage would enforce is checked here first, so a doomed
request is refused at the door with INVALID_ARGUMENT (FAILED_PRECONDITION when
only the deployment can fix it: no voice for the story's language) and a message
naming the problem, and nothing is stored. Queue limits (in all and per tenant) are checked
by the store, in the same transaction that queues the job
(:meth:`storyreel_gateway.store.JobStore.create`).

What each later stage refuses, and where admission refuses it first:

* **story** (``WriteStoryboard``): a storyboard given instead of a prompt (both
  set, or one that breaks the rules of generated ones,
  :func:`storyreel.storyboard.check_storyboard`, or whose scene count differs
  from ``scene_count``); an empty prompt, or one made only of
  chat-template control tokens (the one shared rule, :func:`storyreel.prompts.check_prompt`);
  more than ``max_prompt_chars``; ``scene_count`` outside ``min_scenes``..``max_scenes``
  (the shared bounds of :mod:`storyreel.limits` unless narrowed); a style over
  200 characters. Same defaults as the LLM service's.
* **render**: sizes are the gateway's own settings or the video's shape;
  scene counts as above; a regenerated prompt empty or over ``max_prompt_chars``.
* **compose**: an unknown voice (the composer's own list, :class:`VoiceCatalog`;
  names are exact and case-sensitive, whatever the audio mode, as the composer
  checks them); a story (the caller's storyboard, else the prompt) clearly in a
  language none of its voices speaks (FAILED_PRECONDITION), or a named voice that
  clearly speaks another language than the story's (:meth:`Admission.check_narration_language`,
  the composer's own rule); width/height/fps out of range; aspect or resolution with
  width or height; audio modes without (or, for narration, with) audio; audio
  the composer cannot use (refused when uploaded: :mod:`storyreel_gateway.uploads`);
  and, as the sound track, audio too short to give every scene one frame
  (from the length the composer's probe stored with the upload).
* **reference images** (a storyboard character's ``reference_uri``): only with
  consistency ``reference_images``, set explicitly (refused with any other
  mode, the default included: the gateway cannot tell which mode the diffusion
  service's default is); each URI must be one of the tenant's stored image
  uploads (:meth:`Admission.check_references`), and the store ties it to the
  job so that it no longer expires.

UpdateStoryboard's storyboard meets the rules of a caller's own storyboard
(:meth:`Admission.check_edited_storyboard`), and it and ApproveStoryboard must
name the job's current storyboard version (:func:`check_storyboard_version`,
ABORTED otherwise).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from storyreel.clip_count import clip_counter
from storyreel.errors import (
    Aborted,
    FailedPrecondition,
    InvalidInput,
    StoryreelError,
    UpstreamFailed,
)
from storyreel.narration_language import detect_language, narration_text, voice_for_language
from storyreel.prompts import check_prompt
from storyreel.seeds import MAX_SEED, choose_seed
from storyreel.storage import ArtifactStore
from storyreel.storyboard import Storyboard, StoryboardProblem, check_storyboard
from storyreel_gateway.jobs import JobRecord, JobSpec
from storyreel_gateway.settings import GatewaySettings
from storyreel_gateway.store import AdmissionLimits, JobStore
from storyreel_gateway.uploads import AudioProber, upload_kind, upload_prefix

log = logging.getLogger(__name__)

#: A voice name (empty: the composer's default voice).
_VOICE = re.compile(r"[A-Za-z0-9_.-]*")

#: How long the composer's voice list is used before it is asked again, and how long
#: after a failed refresh a stale list is used before trying again (seconds).
VOICES_REFRESH_S = 300.0
VOICES_RETRY_S = 15.0


@dataclass(frozen=True)
class VoiceList:
    """The composer's voices (ComposerService.ListVoices): exact names, the default, and
    each voice's language as its config names it (``"en_US"``; missing or ``""``: unknown)."""

    names: tuple[str, ...]
    default: str
    languages: Mapping[str, str] = field(default_factory=dict)


class VoiceSource(Protocol):
    """Asks the composer for its voices (``clients.ComposerClient``); UpstreamFailed if not."""

    async def list_voices(self) -> VoiceList: ...


class ComposerFacts(VoiceSource, AudioProber, Protocol):
    """What admission and uploads ask the composer (``clients.ComposerClient``)."""


class VoiceCatalog:
    """The composer's voice list, cached.

    Asked for again once it is ``refresh_s`` old. When the composer cannot be
    reached the last list is used (and asked for again after ``retry_s``);
    with no list at all, :meth:`get` raises UpstreamFailed (UNAVAILABLE): a
    voice is never guessed to exist.
    """

    def __init__(
        self,
        source: VoiceSource,
        refresh_s: float = VOICES_REFRESH_S,
        retry_s: float = VOICES_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.refresh_s = refresh_s
        self.retry_s = retry_s
        self.clock = clock
        self._voices: VoiceList | None = None
        self._next_ask = 0.0
        self._lock = asyncio.Lock()

    def expire(self) -> None:
        """Ask the composer at the next :meth:`get` (the list stays as the fallback)."""
        self._next_ask = 0.0

    async def get(self) -> VoiceList:
        """The voice list, asked for again when it is stale; UpstreamFailed if there is none."""
        if self._voices is not None and self.clock() < self._next_ask:
            return self._voices
        async with self._lock:  # one question at a time; the others use its answer
            if self._voices is not None and self.clock() < self._next_ask:
                return self._voices
            try:
                voices = await self.source.list_voices()
            except StoryreelError as exc:
                if self._voices is None:
                    raise UpstreamFailed(
                        f"the voice cannot be checked now: {exc.message}; try again shortly"
                    ) from None
                log.warning(
                    "voice list refresh failed; using the last one", extra={"error": exc.message}
                )
                self._next_ask = self.clock() + self.retry_s
                return self._voices
            self._voices = voices
            self._next_ask = self.clock() + self.refresh_s
            return voices


class Admission:
    """Checks requests against the gateway's limits and fills in its defaults."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: ArtifactStore,
        voices: VoiceCatalog | None = None,
        jobs: JobStore | None = None,
    ) -> None:
        """``voices`` and ``jobs`` are the composer's voice list and the upload records;
        without them (benchmarks, core tests) voices and audio lengths go unchecked."""
        self.settings = settings
        self.store = store
        self.voices = voices
        self.jobs = jobs

    @property
    def limits(self) -> AdmissionLimits:
        s = self.settings
        return AdmissionLimits(
            max_queued=s.max_jobs_queued, max_queued_per_tenant=s.max_jobs_queued_per_tenant
        )

    def check_idempotency_key(self, key: str) -> None:
        limit = self.settings.max_idempotency_key_chars
        if len(key) > limit:
            raise InvalidInput(f"idempotency_key is longer than {limit} characters")
        if "\x00" in key:
            # The key is a column of its own: PostgreSQL text cannot hold a NUL.
            raise InvalidInput("idempotency_key must not contain a NUL character")

    async def admit(self, spec: JobSpec, tenant: str) -> JobSpec:
        """Everything :meth:`validate` checks, then what needs the composer or the database:
        the voice, and the uploaded audio's length against the scenes."""
        checked = await asyncio.to_thread(self.validate, spec, tenant)
        await self.check_voice(checked.voice)
        await self.check_narration_language(checked)
        await self._check_audio(checked, tenant)
        await self._check_reference_uploads(checked, tenant)
        return checked

    async def check_voice(self, voice: str) -> None:
        """InvalidInput unless the composer has ``voice`` (exact, case-sensitive; "" is its
        default). UpstreamFailed when the composer's list is unknown and cannot be had."""
        if not voice or self.voices is None:
            return
        known = await self.voices.get()
        if voice not in known.names:
            raise InvalidInput(
                f"voice {voice!r} is not one of the composer's voices: "
                f"{', '.join(known.names) or '(none)'} (names are exact and case-sensitive; "
                f"leave it empty for the default, {known.default!r})"
            )

    async def check_narration_language(
        self, spec: JobSpec, storyboard: Storyboard | None = None
    ) -> None:
        """A voice must speak the story's language, unless the caller's audio is the whole
        sound track (then nothing is spoken).

        The story is ``storyboard`` (a written one), else the caller's own storyboard,
        else the prompt (before the story is written, its language is the prompt's): the
        shared rule, :func:`storyreel.narration_language.choose_voice`, over the composer's
        voices. FailedPrecondition when the story is clearly in a language none of them
        speaks; InvalidInput when the job names a voice that clearly speaks another
        language while one of the story's exists. Text too short or mixed to tell is
        admitted: the composer then speaks with the named or default voice.
        """
        if self.voices is None or (spec.audio_uri and spec.audio_mode in ("", "soundtrack")):
            return
        board = storyboard or spec.storyboard
        if board is not None:
            text = narration_text(scene.narration for scene in board.scenes)
            subject = "the storyboard's narration"
        else:
            text, subject = spec.prompt, "the prompt"
        # The composer is asked only about a language that is clear.
        language = await asyncio.to_thread(detect_language, text)
        if language is None:
            return
        known = await self.voices.get()
        languages = {name: known.languages.get(name, "") for name in known.names}
        voice_for_language(language, languages, known.default, spec.voice, subject=subject)

    async def _check_audio(self, spec: JobSpec, tenant: str) -> None:
        """The upload must exist; as the whole sound track it must give each scene a frame."""
        if not spec.audio_uri or self.jobs is None:
            return
        audio = await self.jobs.stored_audio(tenant, spec.audio_uri)
        if audio is None:
            raise InvalidInput(f"audio_uri {spec.audio_uri} does not exist; upload it first")
        soundtrack = spec.audio_mode in ("", "soundtrack")
        # The composer's rule (timeline.shared_timeline): at least one frame per scene.
        if (
            soundtrack
            and audio.duration_s is not None
            and round(audio.duration_s * spec.fps) < spec.scene_count
        ):
            raise InvalidInput(
                f"the audio lasts {audio.duration_s:.3f} s: too short to show "
                f"{spec.scene_count} scenes at {spec.fps} fps (at least one frame each)"
            )

    async def _check_reference_uploads(self, spec: JobSpec, tenant: str) -> None:
        """Every reference image must be a stored upload of the tenant (not one being sent,
        nor one that expired)."""
        if self.jobs is None or spec.storyboard is None:
            return
        for i, character in enumerate(spec.storyboard.characters):
            uri = character.reference_uri
            if uri and not await self.jobs.has_upload(tenant, uri):
                raise InvalidInput(_no_image(i, uri))

    def check_references(self, spec: JobSpec, tenant: str) -> None:
        """InvalidInput unless every character's reference_uri (if any) is one of the
        tenant's image uploads, and the consistency mode is reference_images."""
        if spec.storyboard is None:
            return
        for i, character in enumerate(spec.storyboard.characters):
            uri = character.reference_uri
            if not uri:
                continue
            if spec.consistency != "reference_images":
                raise InvalidInput(
                    f"storyboard.characters[{i}].reference_uri needs consistency "
                    "CONSISTENCY_MODE_REFERENCE_IMAGES, set explicitly (got "
                    f"{spec.consistency or 'unspecified'}); leave reference_uri empty "
                    "with other modes"
                )
            try:
                key = self.store.key_of(uri)
            except InvalidInput:
                raise InvalidInput(_no_image(i, uri)) from None
            if not key.startswith(upload_prefix(tenant)) or upload_kind(key) != "image":
                raise InvalidInput(_no_image(i, uri))

    def validate(self, spec: JobSpec, tenant: str) -> JobSpec:
        """Apply defaults and limits; InvalidInput names the first problem found."""
        s = self.settings
        if spec.storyboard is not None:
            prompt = ""
            scene_count = self.check_storyboard(spec)
        else:
            # Empty, or only chat-template markup: the LLM service's own rule.
            prompt = check_prompt(spec.prompt)
            if len(prompt) > s.max_prompt_chars:
                raise InvalidInput(
                    f"prompt is {len(prompt)} characters; the limit is {s.max_prompt_chars}"
                )
            scene_count = spec.scene_count or s.default_scenes
        if not s.min_scenes <= scene_count <= s.max_scenes:
            raise InvalidInput(
                f"scene_count must be between {s.min_scenes} and {s.max_scenes} (got {scene_count})"
            )
        if len(spec.style) > s.max_style_chars:
            raise InvalidInput(f"style is longer than {s.max_style_chars} characters")
        if spec.aspect or spec.resolution:
            if spec.width or spec.height:
                raise InvalidInput("set aspect and resolution, or width and height, not both")
            width = height = 0  # the composer sizes the video from aspect and resolution
        else:
            width = spec.width or s.video_width
            height = spec.height or s.video_height
            for name, value in (("width", width), ("height", height)):
                if value < 64 or value > s.max_video_side or value % 8:
                    raise InvalidInput(
                        f"{name} must be a multiple of 8 between 64 and {s.max_video_side} "
                        f"(got {value})"
                    )
        if spec.audio_mode in ("soundtrack", "music") and not spec.audio_uri:
            raise InvalidInput(f"audio_mode {spec.audio_mode} needs an audio_uri (upload it first)")
        if spec.audio_mode == "narration" and spec.audio_uri:
            raise InvalidInput("audio_mode narration takes no audio_uri")
        if len(spec.voice) > s.max_voice_chars or not _VOICE.fullmatch(spec.voice):
            raise InvalidInput(
                f"voice must be a voice name of at most {s.max_voice_chars} letters, digits, "
                "'-', '_' or '.'"
            )
        fps = spec.fps or s.video_fps
        if not 1 <= fps <= 60:
            raise InvalidInput(f"fps must be between 1 and 60 (got {fps})")
        if spec.audio_uri:
            key = self.store.key_of(spec.audio_uri)  # InvalidInput: not one of our artifacts
            if not key.startswith(upload_prefix(tenant)) or upload_kind(key) != "audio":
                raise InvalidInput(f"audio_uri {spec.audio_uri} does not exist; upload it first")
            # The store checks, when it queues the job, that the upload is there.
        self.check_references(spec, tenant)
        check_seed(spec.seed)
        seed = spec.seed or choose_seed()
        return spec.model_copy(
            update={
                "prompt": prompt,
                "scene_count": scene_count,
                "width": width,
                "height": height,
                "fps": fps,
                "seed": seed,
            }
        )

    def check_storyboard(self, spec: JobSpec) -> int:
        """A caller's storyboard (given instead of a prompt) against the rules generated
        storyboards meet (:func:`storyreel.storyboard.check_storyboard`, image prompts
        counted in CLIP tokens); returns its scene count."""
        board = spec.storyboard
        assert board is not None
        if spec.prompt.strip():
            raise InvalidInput("set prompt or storyboard, not both")
        try:
            check_storyboard(board, self.settings.max_scenes, clip_counter())
        except StoryboardProblem as exc:
            raise InvalidInput(f"storyboard.{exc}") from None
        if len(board.style) > self.settings.max_style_chars:
            raise InvalidInput(
                f"storyboard.style is longer than {self.settings.max_style_chars} characters"
            )
        count = len(board.scenes)
        if spec.scene_count and spec.scene_count != count:
            raise InvalidInput(
                f"scene_count is {spec.scene_count} but the storyboard has {count} scenes "
                "(leave scene_count 0 with a storyboard)"
            )
        return count

    @staticmethod
    def request_hash(spec: JobSpec) -> str:
        """Fingerprint of a request, to tell a retry from a different request.

        The storyboard counts when there is one; without one the fingerprint is the
        same as before the field existed, so a retry across an upgrade still matches.
        """
        exclude = set()
        if spec.storyboard is None:
            exclude.add("storyboard")
        if not spec.review:  # likewise for the review option
            exclude.add("review")
        return hashlib.sha256(spec.model_dump_json(exclude=exclude or None).encode()).hexdigest()

    def check_edited_storyboard(self, board: Storyboard) -> None:
        """UpdateStoryboard's storyboard (scenes numbered 1..N by position) against the
        rules a caller's own storyboard meets at CreateVideo; InvalidInput names the
        field (``storyboard.scenes[2].image_prompt: ...``)."""
        s = self.settings
        try:
            check_storyboard(board, s.max_scenes, clip_counter())
        except StoryboardProblem as exc:
            raise InvalidInput(f"storyboard.{exc}") from None
        if len(board.scenes) < s.min_scenes:
            raise InvalidInput(
                f"storyboard.scenes: has {len(board.scenes)} scenes; "
                f"this gateway makes videos of {s.min_scenes} to {s.max_scenes}"
            )
        if len(board.style) > s.max_style_chars:
            raise InvalidInput(f"storyboard.style is longer than {s.max_style_chars} characters")

    def check_regeneration(
        self, record: JobRecord, index: int, prompt: str | None, seed: int | None
    ) -> str | None:
        """Check a RegenerateScene against the job; returns the cleaned prompt."""
        if record.storyboard is None:
            raise FailedPrecondition(f"job {record.job_id} has no storyboard to regenerate from")
        indices = [scene.index for scene in record.storyboard.scenes]
        if index not in indices:
            raise InvalidInput(
                f"index must be between {min(indices)} and {max(indices)} (got {index})"
            )
        if prompt is not None:
            prompt = prompt.strip()
            if not prompt:
                raise InvalidInput("prompt, when given, must not be empty")
            if len(prompt) > self.settings.max_prompt_chars:
                raise InvalidInput(f"prompt is longer than {self.settings.max_prompt_chars}")
        if seed is not None:
            check_seed(seed)
        return prompt


def _no_image(position: int, uri: str) -> str:
    return (
        f"storyboard.characters[{position}].reference_uri {uri} is not one of your image "
        "uploads; upload it first (UploadImage)"
    )


def check_storyboard_version(record: JobRecord, version: int) -> None:
    """Aborted unless ``version`` is the job's storyboard version: someone (or the
    storyboard stage) changed it since the caller read it."""
    if version != record.storyboard_version:
        raise Aborted(
            f"the storyboard changed since version {version}; fetch it again "
            f"(job {record.job_id} is at version {record.storyboard_version})"
        )


def check_seed(seed: int) -> None:
    """InvalidInput unless ``seed`` is in the public range, 0 to 2^63-1 (storyreel.seeds)."""
    if not 0 <= seed <= MAX_SEED:
        raise InvalidInput(
            f"seed must be between 0 and 2^63-1 ({MAX_SEED}); 0 lets storyreel choose"
        )
