"""Runs a job through the three stages: storyboard, render, compose.

The stages are reached through the small protocols below; the gRPC clients
that implement them live in :mod:`storyreel_gateway.clients`, so this module
has no gRPC types and can be driven by any implementation.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from storyreel.errors import StoryreelError
from storyreel.logs import job_id_var
from storyreel_gateway.jobs import (
    STAGE_WEIGHTS,
    EventKind,
    JobError,
    JobRecord,
    JobState,
    JobStore,
    SceneImage,
    Stage,
    StageRecord,
    Storyboard,
    now,
)

log = logging.getLogger(__name__)


class StageFailed(Exception):
    """An upstream stage answered with an error (code is a gRPC status name)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RenderSettings:
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance: float = 0.0


@dataclass(frozen=True)
class ComposedVideo:
    uri: str
    duration_s: float
    scene_starts_s: tuple[float, ...] = ()


class StoryStage(Protocol):
    async def write_storyboard(
        self, job_id: str, prompt: str, scene_count: int, style: str, seed: int
    ) -> Storyboard: ...


class RenderStage(Protocol):
    def render(
        self, job_id: str, scenes: list[tuple[int, str, int]], settings: RenderSettings
    ) -> AsyncIterator[SceneImage]:
        """Yield each (index, prompt, seed) scene's image as soon as it is stored."""
        ...


class ComposeStage(Protocol):
    async def compose(
        self,
        job_id: str,
        scenes: list[tuple[str, str]],
        audio_uri: str,
        fps: int,
        width: int,
        height: int,
    ) -> ComposedVideo: ...


def scene_seed(job_seed: int, index: int) -> int:
    """Seed of one scene, derived from the job seed so a job re-renders identically."""
    digest = hashlib.blake2b(f"{job_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # fits a signed 64-bit generator seed


class JobPipeline:
    """Moves a job through its stages and records every transition."""

    def __init__(
        self,
        jobs: JobStore,
        story: StoryStage,
        render: RenderStage,
        compose: ComposeStage,
        render_settings: RenderSettings,
    ) -> None:
        self.jobs = jobs
        self.story = story
        self.render = render
        self.compose = compose
        self.render_settings = render_settings

    async def run(self, record: JobRecord) -> None:
        """Run the job to DONE or FAILED; never raises for an upstream failure."""
        token = job_id_var.set(record.job_id)
        current: Stage | None = None
        try:
            record.state = JobState.RUNNING
            for stage, step in (
                (Stage.STORYBOARD, self._storyboard),
                (Stage.RENDER, self._render),
                (Stage.COMPOSE, self._compose),
            ):
                current = stage
                await self._start_stage(record, stage)
                await step(record)
                await self._finish_stage(record, stage, JobState.DONE)
            record.state = JobState.DONE
            record.progress = 100.0
            log.info("job done", extra={"video_uri": record.video_uri})
            await self.jobs.update(record, EventKind.JOB_FINISHED)
        except asyncio.CancelledError:
            await self._end(record, current, JobState.CANCELLED, None)
            raise
        except StageFailed as exc:
            await self._end(
                record,
                current,
                JobState.FAILED,
                JobError(stage=current, code=exc.code, message=exc.message),
            )
        except StoryreelError as exc:
            await self._end(
                record,
                current,
                JobState.FAILED,
                JobError(stage=current, code=exc.status, message=exc.message),
            )
        except Exception as exc:
            log.exception("job crashed")
            await self._end(
                record,
                current,
                JobState.FAILED,
                JobError(
                    stage=current, code="INTERNAL", message=f"internal error: {type(exc).__name__}"
                ),
            )
        finally:
            job_id_var.reset(token)

    async def _end(
        self, record: JobRecord, stage: Stage | None, state: JobState, error: JobError | None
    ) -> None:
        if stage is not None and record.stages and record.stages[-1].finished_at is None:
            self._close_stage_record(record, state)
        record.state = state
        record.error = error
        if error:
            log.warning(
                "job failed", extra={"stage": stage, "code": error.code, "error": error.message}
            )
        await self.jobs.update(record, EventKind.JOB_FINISHED, stage)

    async def _start_stage(self, record: JobRecord, stage: Stage) -> None:
        record.stage = stage
        record.stages.append(StageRecord(stage=stage, state=JobState.RUNNING, started_at=now()))
        log.info("stage started", extra={"stage": stage.value})
        await self.jobs.update(record, EventKind.STAGE_STARTED, stage)

    def _close_stage_record(self, record: JobRecord, state: JobState) -> None:
        stage_record = record.stages[-1]
        stage_record.state = state
        stage_record.finished_at = now()
        stage_record.duration_s = (
            stage_record.finished_at - stage_record.started_at
        ).total_seconds()

    async def _finish_stage(self, record: JobRecord, stage: Stage, state: JobState) -> None:
        self._close_stage_record(record, state)
        record.progress = self._progress_before(stage) + STAGE_WEIGHTS[stage]
        log.info(
            "stage finished",
            extra={"stage": stage.value, "duration_s": record.stages[-1].duration_s},
        )
        await self.jobs.update(record, EventKind.STAGE_FINISHED, stage)

    @staticmethod
    def _progress_before(stage: Stage) -> float:
        total = 0.0
        for other, weight in STAGE_WEIGHTS.items():
            if other == stage:
                return total
            total += weight
        return total

    async def _storyboard(self, record: JobRecord) -> None:
        spec = record.spec
        record.storyboard = await self.story.write_storyboard(
            record.job_id, spec.prompt, spec.scene_count, spec.style, spec.seed
        )

    async def _render(self, record: JobRecord) -> None:
        assert record.storyboard is not None
        scenes = [
            (scene.index, scene.image_prompt, scene_seed(record.spec.seed, scene.index))
            for scene in record.storyboard.scenes
        ]
        start = self._progress_before(Stage.RENDER)
        record.images = []
        async for image in self.render.render(record.job_id, scenes, self.render_settings):
            record.images.append(image)
            record.progress = start + STAGE_WEIGHTS[Stage.RENDER] * len(record.images) / len(scenes)
            await self.jobs.update(record, EventKind.SCENE_RENDERED, Stage.RENDER, image.index)
        if len(record.images) != len(scenes):
            raise StageFailed(
                "INTERNAL", f"render returned {len(record.images)} of {len(scenes)} images"
            )
        record.images.sort(key=lambda image: image.index)

    async def _compose(self, record: JobRecord) -> None:
        assert record.storyboard is not None
        narration = {scene.index: scene.narration for scene in record.storyboard.scenes}
        scenes = [(image.uri, narration.get(image.index, "")) for image in record.images]
        spec = record.spec
        video = await self.compose.compose(
            record.job_id, scenes, spec.audio_uri, spec.fps, spec.width, spec.height
        )
        record.video_uri = video.uri
        record.duration_s = video.duration_s
        record.scene_starts_s = list(video.scene_starts_s)
