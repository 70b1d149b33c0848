"""Messages to records and back: every conversion between protobuf and the job model.

The servicer and the upstream clients call these and nothing else, so a field
added to a contract is handled in one place. The storyboard's conversions are
the shared model's (:func:`storyreel.storyboard.storyboard_to_proto` and
``storyboard_from_proto``), which the LLM service sends with.
``tests/gateway/test_convert.py`` walks the message descriptors: a field of
``Job`` or of an upstream reply that is dropped here fails the suite.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from storyreel.composer.v1 import composer_pb2
from storyreel.diffusion.v1 import diffusion_pb2
from storyreel.gateway.v1 import gateway_pb2
from storyreel.options import (
    ASPECTS,
    AUDIO_MODES,
    CAPTIONS,
    CONSISTENCY,
    RESOLUTIONS,
    from_enum,
    to_enum,
)
from storyreel.storyboard import (
    Storyboard,
    scene_image_fields,
    storyboard_from_proto,
    storyboard_to_proto,
)
from storyreel_gateway.jobs import (
    ArtifactKind,
    ComposedVideo,
    EventKind,
    JobEvent,
    JobRecord,
    JobSpec,
    JobState,
    SceneImage,
    Stage,
)
from storyreel_gateway.uploads import StoredImage, StoredUpload

STATES = {
    JobState.QUEUED: gateway_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: gateway_pb2.JOB_STATE_RUNNING,
    JobState.DONE: gateway_pb2.JOB_STATE_DONE,
    JobState.FAILED: gateway_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: gateway_pb2.JOB_STATE_CANCELLED,
    JobState.REVIEW: gateway_pb2.JOB_STATE_REVIEW,
}
STAGES = {
    None: gateway_pb2.STAGE_UNSPECIFIED,
    Stage.STORYBOARD: gateway_pb2.STAGE_STORYBOARD,
    Stage.RENDER: gateway_pb2.STAGE_RENDER,
    Stage.COMPOSE: gateway_pb2.STAGE_COMPOSE,
}
EVENTS = {
    EventKind.SNAPSHOT: gateway_pb2.EVENT_KIND_SNAPSHOT,
    EventKind.STAGE_STARTED: gateway_pb2.EVENT_KIND_STAGE_STARTED,
    EventKind.STAGE_FINISHED: gateway_pb2.EVENT_KIND_STAGE_FINISHED,
    EventKind.SCENE_RENDERED: gateway_pb2.EVENT_KIND_SCENE_RENDERED,
    EventKind.JOB_FINISHED: gateway_pb2.EVENT_KIND_JOB_FINISHED,
    EventKind.RETRYING: gateway_pb2.EVENT_KIND_RETRYING,
    EventKind.REVIEW: gateway_pb2.EVENT_KIND_REVIEW,
}
ARTIFACTS = {
    ArtifactKind.IMAGE: gateway_pb2.ARTIFACT_KIND_IMAGE,
    ArtifactKind.VIDEO: gateway_pb2.ARTIFACT_KIND_VIDEO,
    ArtifactKind.CAPTIONS_SRT: gateway_pb2.ARTIFACT_KIND_CAPTIONS_SRT,
    ArtifactKind.CAPTIONS_VTT: gateway_pb2.ARTIFACT_KIND_CAPTIONS_VTT,
    ArtifactKind.POSTER: gateway_pb2.ARTIFACT_KIND_POSTER,
    ArtifactKind.CONTACT_SHEET: gateway_pb2.ARTIFACT_KIND_CONTACT_SHEET,
}


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


# -- the public API ------------------------------------------------------------------------


def spec_from_request(request: gateway_pb2.CreateVideoRequest) -> JobSpec:
    """What a CreateVideo asks for (InvalidInput for an enum value this gateway lacks)."""
    return JobSpec(
        prompt=request.prompt,
        scene_count=request.scene_count,
        style=request.style,
        seed=request.seed,
        audio_uri=request.audio_uri,
        width=request.width,
        height=request.height,
        fps=request.fps,
        aspect=from_enum(ASPECTS, request.aspect, "aspect"),
        resolution=from_enum(RESOLUTIONS, request.resolution, "resolution"),
        consistency=from_enum(CONSISTENCY, request.consistency, "consistency"),
        captions=from_enum(CAPTIONS, request.captions, "captions"),
        audio_mode=from_enum(AUDIO_MODES, request.audio_mode, "audio_mode"),
        voice=request.voice,
        storyboard=(
            storyboard_from_proto(request.storyboard) if request.HasField("storyboard") else None
        ),
        review=request.review,
    )


def job_to_proto(
    record: JobRecord, public_url: Callable[[str], str] | None = None
) -> gateway_pb2.Job:
    """The job as the API shows it; ``public_url`` turns a finished job's URIs into URLs."""
    spec = record.spec
    done = record.state is JobState.DONE and public_url is not None

    def url(uri: str) -> str:
        return public_url(uri) if done and uri else ""

    def artifact(uri: str) -> gateway_pb2.JobArtifact | None:
        return gateway_pb2.JobArtifact(uri=uri, url=url(uri)) if uri else None

    job = gateway_pb2.Job(
        job_id=record.job_id,
        state=STATES[record.state],
        stage=STAGES[record.stage],
        progress=record.progress,
        prompt=spec.prompt,
        seed=spec.seed,
        scene_count=spec.scene_count,
        style=spec.style,
        audio_uri=spec.audio_uri,
        video_uri=record.video_uri,
        video_url=url(record.video_uri),
        duration_s=record.duration_s,
        scene_starts_s=record.scene_starts_s,
        eta_s=record.eta_s,
        idempotency_key=record.idempotency_key,
        created_at=_timestamp(record.created_at),
        updated_at=_timestamp(record.updated_at),
        aspect=to_enum(ASPECTS, spec.aspect),
        resolution=to_enum(RESOLUTIONS, spec.resolution),
        consistency=to_enum(CONSISTENCY, spec.consistency),
        captions=to_enum(CAPTIONS, spec.captions),
        audio_mode=to_enum(AUDIO_MODES, spec.audio_mode),
        voice=spec.voice,
        width=record.video_width or spec.width,
        height=record.video_height or spec.height,
        fps=record.video_fps or spec.fps,
        captions_srt=artifact(record.captions_srt_uri),
        captions_vtt=artifact(record.captions_vtt_uri),
        poster=artifact(record.poster_uri),
        contact_sheet=artifact(record.contact_sheet_uri),
        generation=record.generation,
        storyboard_version=record.storyboard_version,
        review=spec.review,
        narration_synthesized=record.narration_synthesized,
        narration_cached=record.narration_cached,
        warnings=record.compose_warnings,
    )
    for stage in record.stages:
        job.stages.add(
            stage=STAGES[stage.stage],
            state=STATES[stage.state],
            started_at=_timestamp(stage.started_at),
            finished_at=_timestamp(stage.finished_at),
            duration_s=stage.duration_s or 0.0,
        )
    if record.error:
        job.error.CopyFrom(
            gateway_pb2.JobError(
                stage=STAGES[record.error.stage],
                code=record.error.code,
                message=record.error.message,
            )
        )
    # A job that came with its own storyboard shows it from the start.
    board = record.storyboard or spec.storyboard
    if board:
        job.storyboard.CopyFrom(storyboard_to_proto(board))
    for image in record.images:
        job.images.add(**scene_image_fields(image))
    for version in record.versions:
        job.versions.add(
            kind=ARTIFACTS[version.kind],
            uri=version.uri,
            generation=version.generation,
            scene_index=version.scene_index,
            created_at=_timestamp(version.created_at),
        )
    return job


def edited_storyboard_from_request(
    request: gateway_pb2.UpdateStoryboardRequest,
) -> tuple[Storyboard, list[int]]:
    """UpdateStoryboard's storyboard, its scenes numbered 1..N by position, and the index
    each scene was sent with (a hint of which earlier scene it was)."""
    board = storyboard_from_proto(request.storyboard)
    hints = [scene.index for scene in board.scenes]
    scenes = tuple(
        scene.model_copy(update={"index": position})
        for position, scene in enumerate(board.scenes, start=1)
    )
    return board.model_copy(update={"scenes": scenes}), hints


def event_to_proto(
    event: JobEvent, public_url: Callable[[str], str] | None = None
) -> gateway_pb2.WatchJobResponse:
    return gateway_pb2.WatchJobResponse(
        kind=EVENTS[event.kind],
        stage=STAGES[event.stage],
        scene_index=event.scene_index,
        job=job_to_proto(event.job, public_url),
        message=event.message,
    )


# -- upstream replies ----------------------------------------------------------------------


def image_from_proto(message: diffusion_pb2.SceneImage) -> SceneImage:
    return SceneImage(**scene_image_fields(message))


def video_from_proto(message: composer_pb2.ComposeResponse) -> ComposedVideo:
    return ComposedVideo(
        uri=message.video_uri,
        duration_s=message.duration_s,
        scene_starts_s=tuple(message.scene_starts_s),
        width=message.width,
        height=message.height,
        fps=message.fps,
        captions_srt_uri=message.captions_srt_uri,
        captions_vtt_uri=message.captions_vtt_uri,
        poster_uri=message.poster_uri,
        contact_sheet_uri=message.contact_sheet_uri,
        narration_synthesized=message.narration_synthesized,
        narration_cached=message.narration_cached,
        warnings=tuple(message.warnings),
    )


def image_upload_to_proto(stored: StoredImage) -> gateway_pb2.UploadImageResponse:
    return gateway_pb2.UploadImageResponse(
        image_uri=stored.uri,
        size_bytes=stored.size_bytes,
        width=stored.image.width,
        height=stored.image.height,
        format=stored.image.format,
    )


def upload_to_proto(stored: StoredUpload) -> gateway_pb2.UploadAudioResponse:
    audio = stored.audio
    return gateway_pb2.UploadAudioResponse(
        audio_uri=stored.uri,
        size_bytes=stored.size_bytes,
        duration_s=audio.duration_s if audio else 0.0,
        codec=audio.codec if audio else "",
        sample_rate=audio.sample_rate if audio else 0,
        channels=audio.channels if audio else 0,
        format=audio.format if audio else "",
    )
