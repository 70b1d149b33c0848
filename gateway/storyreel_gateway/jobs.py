"""The job model: what a job is, and every change its state goes through.

A :class:`JobRecord` is the whole job as the database keeps it. Its state
changes only through its own methods (:meth:`JobRecord.begin_run`,
:meth:`~JobRecord.start_stage`, :meth:`~JobRecord.add_image`,
:meth:`~JobRecord.finish`, :meth:`~JobRecord.reset_scene`, ...), so the rules
of a job (progress, stage records, the version history of its artifacts) are
written once, here. No database or gRPC types: :mod:`storyreel_gateway.store`
persists records and :mod:`storyreel_gateway.convert` turns them into messages.

Which name belongs to which layer ("shared": the class of :mod:`storyreel.storyboard`,
kept as the LLM service sent it; the other record types are defined here):

=======================  =========================================  ======================
contract                 service core                               gateway record
=======================  =========================================  ======================
types.v1.Storyboard      storyreel_llm.storyboard.Storyboard        Storyboard (shared)
types.v1.Character       storyreel_llm.storyboard.Character         Character (shared)
types.v1.Scene           storyreel_llm.storyboard.Scene             Scene (shared)
diffusion.v1.SceneImage  storyreel_diffusion.renderer.SceneImage    :class:`SceneImage`
composer.v1              storyreel_composer.composer.ComposeResult  :class:`ComposedVideo`
ComposeResponse
=======================  =========================================  ======================

(The LLM service's three classes subclass the shared ones, adding its rules.)

Who: the **tenant** is whom a job belongs to (the public API's word, named by
the caller's API key); the **owner** is the gateway replica that holds the
job's lease and runs it (the database's ``owner`` column), never the tenant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from storyreel.options import (
    AspectName,
    AudioModeName,
    CaptionsName,
    ConsistencyName,
    ResolutionName,
)
from storyreel.storyboard import Scene, Storyboard


def now() -> datetime:
    return datetime.now(UTC)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # CreateVideoRequest.review: the storyboard is written and waits for
    # UpdateStoryboard / ApproveStoryboard. Not finished, yet not UNFINISHED either:
    # no replica claims it (claims take QUEUED and lapsed RUNNING jobs), it holds no
    # lease and no queue place (the queue limits count QUEUED jobs only), and, being a
    # row like any other, it survives restarts.
    REVIEW = "review"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


#: States a replica may claim or resume (never REVIEW: it waits for a person).
UNFINISHED = (JobState.QUEUED, JobState.RUNNING)


class Stage(StrEnum):
    STORYBOARD = "storyboard"
    RENDER = "render"
    COMPOSE = "compose"


#: Share of the progress bar each stage covers (they add up to 100).
STAGE_WEIGHTS = {Stage.STORYBOARD: 15.0, Stage.RENDER: 60.0, Stage.COMPOSE: 25.0}


def progress_before(stage: Stage) -> float:
    """Progress at the start of ``stage``: the weights of the stages before it."""
    total = 0.0
    for other, weight in STAGE_WEIGHTS.items():
        if other == stage:
            return total
        total += weight
    return total


class SceneImage(BaseModel):
    """One rendered scene, as the diffusion service reported it."""

    index: int
    uri: str
    seed: int
    cached: bool = False
    content_key: str = ""
    safety_flagged: bool = False
    safety_retries: int = 0
    reference_uris: list[str] = Field(default_factory=list)


class ArtifactKind(StrEnum):
    IMAGE = "image"
    VIDEO = "video"
    CAPTIONS_SRT = "captions_srt"
    CAPTIONS_VTT = "captions_vtt"
    POSTER = "poster"
    CONTACT_SHEET = "contact_sheet"


class ArtifactVersion(BaseModel):
    """One artifact a run made. A later run writes new URIs; earlier ones stay readable."""

    kind: ArtifactKind
    uri: str
    generation: int
    # The scene of an IMAGE; 0 for the video and what comes with it.
    scene_index: int = 0
    created_at: datetime = Field(default_factory=now)


class StageRecord(BaseModel):
    stage: Stage
    state: JobState
    started_at: datetime
    finished_at: datetime | None = None
    duration_s: float | None = None

    def close(self, state: JobState) -> None:
        self.state = state
        self.finished_at = now()
        self.duration_s = (self.finished_at - self.started_at).total_seconds()


class JobError(BaseModel):
    stage: Stage | None = None
    # gRPC status code name, e.g. DEADLINE_EXCEEDED.
    code: str
    message: str


class JobSpec(BaseModel):
    """What the caller asked for; fixed once the job exists."""

    prompt: str
    scene_count: int
    style: str = ""
    seed: int
    audio_uri: str = ""
    # 0 x 0 when the shape is asked for by aspect and resolution instead.
    width: int
    height: int
    fps: int
    # Frame shape and short side of the video; "" leaves width and height to decide.
    aspect: AspectName = ""
    resolution: ResolutionName = ""
    # How the images keep each character's look; "" is the diffusion service's default.
    consistency: ConsistencyName = ""
    captions: CaptionsName = ""
    # What audio_uri is: the whole sound track, or music under the narration.
    audio_mode: AudioModeName = ""
    voice: str = ""
    # The caller's own storyboard (CreateVideoRequest.storyboard, prompt then empty): the
    # storyboard stage takes it as written instead of asking the LLM service. None in
    # rows stored before the field existed.
    storyboard: Storyboard | None = None
    # CreateVideoRequest.review: stop in REVIEW once the storyboard is written.
    review: bool = False


@dataclass(frozen=True)
class ComposedVideo:
    """What the composer made of a job's scenes."""

    uri: str
    duration_s: float
    scene_starts_s: tuple[float, ...] = ()
    width: int = 0
    height: int = 0
    fps: int = 0
    captions_srt_uri: str = ""
    captions_vtt_uri: str = ""
    poster_uri: str = ""
    contact_sheet_uri: str = ""
    # Scenes whose narration the composer synthesised, and those served by its cache.
    narration_synthesized: int = 0
    narration_cached: int = 0
    # What the composer said of the video it made (captions shown in part, say).
    warnings: tuple[str, ...] = ()


class JobRecord(BaseModel):
    job_id: str
    spec: JobSpec
    # The tenant the job belongs to (whom the caller's API key names); every read
    # and action is checked against it.
    tenant: str = ""
    idempotency_key: str = ""
    # Fingerprint of the original request, to tell a retry from a different request.
    request_hash: str = ""
    state: JobState = JobState.QUEUED
    stage: Stage | None = None
    progress: float = 0.0
    stages: list[StageRecord] = Field(default_factory=list)
    error: JobError | None = None
    storyboard: Storyboard | None = None
    images: list[SceneImage] = Field(default_factory=list)
    video_uri: str = ""
    duration_s: float = 0.0
    scene_starts_s: list[float] = Field(default_factory=list)
    # What the composer made besides the video, and the video's size.
    video_width: int = 0
    video_height: int = 0
    video_fps: int = 0
    captions_srt_uri: str = ""
    captions_vtt_uri: str = ""
    poster_uri: str = ""
    contact_sheet_uri: str = ""
    # Of the latest composition: narration synthesised and served by the composer's cache.
    narration_synthesized: int = 0
    narration_cached: int = 0
    # Of the latest composition: the composer's warnings, told in the compose stage's
    # STAGE_FINISHED event and as Job.warnings (cleared when a new run starts).
    compose_warnings: list[str] = Field(default_factory=list)
    # Every artifact of every run, oldest first (the current ones included).
    versions: list[ArtifactVersion] = Field(default_factory=list)
    # Seeds chosen for single scenes by RegenerateScene (scene index -> seed, never 0: a
    # scene without one is drawn from the seed derived from the job's, storyreel.seeds).
    seed_overrides: dict[int, int] = Field(default_factory=dict)
    # Set by CancelJob: a run interrupted without it (the gateway stopping) resumes later.
    cancel_requested: bool = False
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)
    # When the current run began (a resumed or regenerated job runs again).
    run_started_at: datetime | None = None
    eta_s: float = 0.0
    # Runs started by the user: 0 for CreateVideo, +1 for each RegenerateScene and
    # each UpdateStoryboard of a finished job.
    generation: int = 0
    # Bumped by every change of the storyboard (the storyboard stage, UpdateStoryboard,
    # RegenerateScene with a prompt); UpdateStoryboard and ApproveStoryboard must name
    # the current one. Kept in the record's JSON (no column: it is read and written
    # under the job's row lock, with the storyboard it counts).
    storyboard_version: int = 0
    # ApproveStoryboard let this job (spec.review) go on past REVIEW.
    approved: bool = False
    # The gateway replica running the job, which holds its lease (the database's
    # ``owner`` column, shown for operators); never the tenant.
    owner: str = Field(default="", exclude=True)
    # The claim this replica holds on the job; its writes are fenced on it.
    lease_id: str = Field(default="", exclude=True)

    # -- runs -------------------------------------------------------------------------

    def begin_run(self) -> list[Stage]:
        """Start (or resume) a run; returns the stages still to do, in order.

        A stage left open by an interrupted run is closed FAILED; a stored
        storyboard is not written again, and only scenes without an image
        are drawn.
        """
        self.state = JobState.RUNNING
        self.error = None
        self.run_started_at = now()
        if self.stages and self.stages[-1].finished_at is None:
            self.stages[-1].close(JobState.FAILED)
        todo = []
        if self.storyboard is None:
            todo.append(Stage.STORYBOARD)
        if self.storyboard is None or self.missing_scenes():
            todo.append(Stage.RENDER)
        todo.append(Stage.COMPOSE)
        self.progress = progress_before(todo[0])
        return todo

    def start_stage(self, stage: Stage) -> None:
        self.stage = stage
        self.stages.append(StageRecord(stage=stage, state=JobState.RUNNING, started_at=now()))

    def finish_stage(self, stage: Stage) -> None:
        self.stages[-1].close(JobState.DONE)
        self.progress = progress_before(stage) + STAGE_WEIGHTS[stage]

    def finish(self, state: JobState, error: JobError | None = None) -> None:
        """End the run DONE, FAILED or CANCELLED (closing the stage in progress)."""
        assert state.finished
        if self.stages and self.stages[-1].finished_at is None:
            self.stages[-1].close(state)
        self.state = state
        self.error = error
        if state is JobState.DONE:
            self.stage = Stage.COMPOSE
            self.progress = 100.0
        self.eta_s = 0.0

    def estimate_eta(self) -> None:
        """Extrapolate the time left from the progress made since this run began."""
        if self.state.finished or not self.run_started_at or self.progress <= 0:
            self.eta_s = 0.0
            return
        elapsed = (now() - self.run_started_at).total_seconds()
        self.eta_s = round(elapsed * (100.0 - self.progress) / self.progress, 1)

    # -- what a run makes -------------------------------------------------------------

    def set_storyboard(self, storyboard: Storyboard) -> None:
        self.storyboard = storyboard
        self.storyboard_version += 1

    # -- review and edits of the storyboard -------------------------------------------

    def needs_review(self) -> bool:
        """Whether the run stops here: a storyboard to review, not approved yet."""
        return self.spec.review and not self.approved and self.storyboard is not None

    def enter_review(self) -> None:
        """Stop the run in REVIEW once the storyboard is written (nothing rendered)."""
        if self.stages and self.stages[-1].finished_at is None:
            self.stages[-1].close(JobState.DONE)
        self.state = JobState.REVIEW
        self.stage = Stage.STORYBOARD
        self.progress = progress_before(Stage.RENDER)
        self.eta_s = 0.0

    def approve(self) -> None:
        """A job in REVIEW goes on: queued, to render and compose its storyboard."""
        self.approved = True
        self.state = JobState.QUEUED
        self.error = None
        self.updated_at = now()

    def replace_storyboard(self, storyboard: Storyboard, hints: Sequence[int] = ()) -> list[int]:
        """Take an edited storyboard (scenes already numbered 1..N); ``hints[i]`` is the
        index the caller sent scene ``i + 1`` with (which earlier scene it was).

        In REVIEW nothing else changes. On a finished (DONE or FAILED) job this
        prepares a new run, as :meth:`reset_scene` does: a scene keeps its image
        when an earlier scene showed the same picture (:func:`picture_of`: image
        prompt, characters and their appearances), preferring the earlier scene of
        the index the caller sent it with; the others (and new scenes) are drawn
        again; the video is composed again. Returns the indices to draw.
        """
        old = self.storyboard
        self.storyboard = storyboard
        self.storyboard_version += 1
        self.updated_at = now()
        # The request's scene count follows the storyboard (Job.scene_count).
        self.spec = self.spec.model_copy(update={"scene_count": len(storyboard.scenes)})
        if self.state is JobState.REVIEW:
            return []
        kept = {image.index: image for image in self.images}
        old_scenes = old.scenes if old else ()
        available = {s.index: picture_of(s, old) for s in old_scenes if s.index in kept}
        images: list[SceneImage] = []
        overrides: dict[int, int] = {}
        redraw: list[int] = []
        for position, scene in enumerate(storyboard.scenes, start=1):
            hint = hints[position - 1] if position <= len(hints) else position
            picture = picture_of(scene, storyboard)
            source = hint if available.get(hint) == picture else None
            if source is None:
                source = next((i for i, p in available.items() if p == picture), None)
            if source is not None:
                del available[source]
                images.append(kept[source].model_copy(update={"index": position}))
                if source in self.seed_overrides:
                    overrides[position] = self.seed_overrides[source]
            else:
                redraw.append(position)
                if hint in self.seed_overrides:
                    overrides[position] = self.seed_overrides[hint]
        self.images = images
        self.seed_overrides = overrides
        self._start_new_run()
        return redraw

    def _start_new_run(self) -> None:
        self.video_uri = ""
        self.captions_srt_uri = self.captions_vtt_uri = ""
        self.poster_uri = self.contact_sheet_uri = ""
        self.compose_warnings = []
        self.state = JobState.QUEUED
        self.error = None
        self.cancel_requested = False
        self.generation += 1
        self.updated_at = now()

    def missing_scenes(self) -> list[Scene]:
        if self.storyboard is None:
            return []
        done = {image.index for image in self.images}
        return [scene for scene in self.storyboard.scenes if scene.index not in done]

    def requested_seed(self, index: int) -> int:
        """The seed scene ``index`` is rendered with: its own (from RegenerateScene), or 0.

        0 asks the diffusion service to derive the scene's seed from the job seed
        (:func:`storyreel.seeds.scene_seed`) and lets its seed lock apply.
        """
        return self.seed_overrides.get(index, 0)

    def add_image(self, image: SceneImage) -> None:
        """A scene's image is stored: keep it, record the version, move the progress."""
        self.images = sorted(
            [i for i in self.images if i.index != image.index] + [image], key=lambda i: i.index
        )
        self._record_version(ArtifactKind.IMAGE, image.uri, image.index)
        total = len(self.storyboard.scenes) if self.storyboard else len(self.images)
        self.progress = progress_before(Stage.RENDER) + STAGE_WEIGHTS[Stage.RENDER] * len(
            self.images
        ) / max(total, 1)

    def set_video(self, video: ComposedVideo) -> None:
        spec = self.spec
        self.video_uri = video.uri
        self.duration_s = video.duration_s
        self.scene_starts_s = list(video.scene_starts_s)
        self.video_width = video.width or spec.width
        self.video_height = video.height or spec.height
        self.video_fps = video.fps or spec.fps
        self.captions_srt_uri = video.captions_srt_uri
        self.captions_vtt_uri = video.captions_vtt_uri
        self.poster_uri = video.poster_uri
        self.contact_sheet_uri = video.contact_sheet_uri
        self.narration_synthesized = video.narration_synthesized
        self.narration_cached = video.narration_cached
        self.compose_warnings = list(video.warnings)
        for kind, uri in (
            (ArtifactKind.VIDEO, video.uri),
            (ArtifactKind.CAPTIONS_SRT, video.captions_srt_uri),
            (ArtifactKind.CAPTIONS_VTT, video.captions_vtt_uri),
            (ArtifactKind.POSTER, video.poster_uri),
            (ArtifactKind.CONTACT_SHEET, video.contact_sheet_uri),
        ):
            if uri:
                self._record_version(kind, uri, 0)

    def _record_version(self, kind: ArtifactKind, uri: str, scene_index: int) -> None:
        # A resumed run may report the same artifact again: keep one entry per URI.
        self.versions = [v for v in self.versions if not (v.uri == uri and v.kind is kind)] + [
            ArtifactVersion(kind=kind, uri=uri, generation=self.generation, scene_index=scene_index)
        ]

    def reset_scene(self, index: int, prompt: str | None, seed: int | None) -> Scene:
        """Prepare a new run that draws scene ``index`` again and composes the video again.

        ``seed`` None keeps the scene's seed; 0 drops its own seed (back to the one
        derived from the job seed); any other value becomes its own. The scene's
        current image and the video stay in :attr:`versions`.
        """
        assert self.storyboard is not None
        scene = next(s for s in self.storyboard.scenes if s.index == index)
        if prompt is not None:
            scene = scene.model_copy(update={"image_prompt": prompt})
            self.storyboard = self.storyboard.with_scene(scene)
            self.storyboard_version += 1
        if seed:
            self.seed_overrides[index] = seed
        elif seed == 0:  # 0: back to the seed derived from the job's
            self.seed_overrides.pop(index, None)
        self.images = [i for i in self.images if i.index != index]
        self._start_new_run()
        return scene


def picture_of(scene: Scene, board: Storyboard | None) -> tuple:
    """What decides a scene's picture: its image prompt, its characters, and each one's
    appearance (and reference image) in ``board``. Narration, setting, action and camera
    do not: the image prompt is what is drawn."""
    cast = {c.name.strip().casefold(): c for c in (board.characters if board else ())}
    looks = []
    for name in scene.characters:
        character = cast.get(name.strip().casefold())
        looks.append(
            (character.appearance, getattr(character, "reference_uri", "")) if character else None
        )
    return (scene.image_prompt, tuple(scene.characters), tuple(looks))


class EventKind(StrEnum):
    SNAPSHOT = "snapshot"
    STAGE_STARTED = "stage_started"
    STAGE_FINISHED = "stage_finished"
    SCENE_RENDERED = "scene_rendered"
    JOB_FINISHED = "job_finished"
    RETRYING = "retrying"
    # The job entered REVIEW: its watchers' streams end there.
    REVIEW = "review"


@dataclass(frozen=True)
class JobEvent:
    kind: EventKind
    job: JobRecord
    stage: Stage | None = None
    scene_index: int = 0
    message: str = ""
