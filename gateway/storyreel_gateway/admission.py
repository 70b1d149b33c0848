"""Admission: what a CreateVideo or RegenerateScene may ask for, checked before any work.

Every rule a later stage would enforce is checked here first, so a doomed
request is refused at the door with INVALID_ARGUMENT and a message naming the
problem. Queue limits (in all and per tenant) are checked by the store, in the
same transaction that queues the job (:meth:`storyreel_gateway.store.JobStore.create`).
"""

from __future__ import annotations

import hashlib
import re
import secrets

from storyreel.errors import FailedPrecondition, InvalidInput
from storyreel.storage import ArtifactStore
from storyreel_gateway.jobs import JobRecord, JobSpec
from storyreel_gateway.settings import GatewaySettings
from storyreel_gateway.store import AdmissionLimits
from storyreel_gateway.uploads import upload_prefix

#: A voice name (empty: the composer's default voice).
_VOICE = re.compile(r"[A-Za-z0-9_.-]*")


class Admission:
    """Checks requests against the gateway's limits and fills in its defaults."""

    def __init__(self, settings: GatewaySettings, store: ArtifactStore) -> None:
        self.settings = settings
        self.store = store

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

    def validate(self, spec: JobSpec, tenant: str) -> JobSpec:
        """Apply defaults and limits; InvalidInput names the first problem found."""
        s = self.settings
        prompt = spec.prompt.strip()
        if not prompt:
            raise InvalidInput("prompt must not be empty")
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
            if not key.startswith(upload_prefix(tenant)):
                raise InvalidInput(f"audio_uri {spec.audio_uri} does not exist; upload it first")
            # The store checks, when it queues the job, that the upload is there.
        seed = spec.seed or secrets.randbits(62)
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

    @staticmethod
    def request_hash(spec: JobSpec) -> str:
        """Fingerprint of a request, to tell a retry from a different request."""
        return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()

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
        if seed is not None and not 0 <= seed < 2**63:
            raise InvalidInput("seed must be between 0 and 2**63-1")
        return prompt
