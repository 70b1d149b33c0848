"""Runs a job through the three stages: storyboard, render, compose.

The stages are reached through the small protocols below; the gRPC clients
that implement them live in :mod:`storyreel_gateway.clients`, so this module
has no gRPC types and can be driven by any implementation.

A run picks up where the record says the job is: a job that came with its own
storyboard (``JobSpec.storyboard``) takes it in the storyboard stage, which then
finishes at once without asking the LLM service; a job whose storyboard is
stored skips writing it, only scenes without an image are rendered, and the
video is composed once every image exists. That is how a gateway restart
resumes a job and how one scene is regenerated. A job that asked for review
(``JobSpec.review``) stops once its storyboard is written, in REVIEW (leaving its
claim), until ApproveStoryboard queues it again. Transient upstream failures
(a service restarting, a full queue) are retried with backoff; anything else
fails the job with the stage, the status code and the message.

What each stage is given and gives back, by layer:

=======================  ============================  =========================================
contract                 gateway (these protocols)     service core
=======================  ============================  =========================================
types.v1.Storyboard      storyreel.storyboard          storyreel_llm.storyboard.Storyboard
                         .Storyboard                   (the shared model with the LLM's rules)
diffusion.v1.Scene       :class:`SceneToRender`        storyreel_diffusion.planning.Scene
diffusion.v1.Character   storyreel.storyboard          storyreel_diffusion.planning.CastMember
                         .Character
diffusion.v1.SceneImage  jobs.SceneImage               storyreel_diffusion.renderer.SceneImage
composer.v1.Scene        (image URI, narration)        storyreel_composer.composer.Scene
ComposeRequest options   storyreel.compose_options     the same ComposeOptions; the audio URI,
                         .ComposeOptions               fps, size and revision are arguments
ComposeResponse          jobs.ComposedVideo            storyreel_composer.composer.ComposeResult
=======================  ============================  =========================================
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from storyreel.compose_options import ComposeOptions
from storyreel.errors import StoryreelError, UpstreamFailed
from storyreel.frames import nearest_aspect
from storyreel.logs import job_id_var
from storyreel.retries import RetryPolicy
from storyreel.storyboard import Character, Storyboard
from storyreel_gateway.jobs import (
    ComposedVideo,
    EventKind,
    JobError,
    JobRecord,
    JobSpec,
    JobState,
    SceneImage,
    Stage,
)
from storyreel_gateway.settings import GatewaySettings
from storyreel_gateway.store import JobStore, LeaseLost

log = logging.getLogger(__name__)

#: Status codes worth retrying: the service is restarting, or its queue is full, or it
#: refuses the gateway's internal token (while a new token rolls out, a gateway and a
#: service may hold different ones until both have restarted).
TRANSIENT_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"})


class StageFailed(Exception):
    """An upstream stage answered with an error (code is a gRPC status name)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_CODES


@dataclass(frozen=True)
class RenderSettings:
    """How a job's images are drawn: the gateway's settings, then the job's own options.

    With no size configured the images take the video's shape (``aspect``), so
    the composer crops little; ``consistency`` "" is the diffusion service's default.
    """

    width: int = 0
    height: int = 0
    steps: int = 0
    guidance: float = 0.0
    aspect: str = ""
    consistency: str = ""
    job_seed: int | None = None
    # The job's run: artifacts of run N > 0 get URIs of their own (jobs/<id>/rN/...).
    revision: int = 0


@dataclass(frozen=True)
class SceneToRender:
    """One scene of the storyboard as the render stage draws it (``diffusion.v1.Scene``).

    The storyboard scene's index and image prompt, the seed to draw it from, and
    the cast members in it (scenes sharing one stay in one render call).
    """

    index: int
    prompt: str
    # The scene's own seed, or 0: derived from the job seed by the diffusion service.
    seed: int
    characters: tuple[str, ...] = ()


class StoryStage(Protocol):
    async def write_storyboard(
        self, job_id: str, prompt: str, scene_count: int, style: str, seed: int
    ) -> Storyboard: ...


class RenderStage(Protocol):
    def render(
        self,
        job_id: str,
        scenes: list[SceneToRender],
        settings: RenderSettings,
        characters: Sequence[Character] = (),
    ) -> AsyncIterator[SceneImage]:
        """Yield each scene's image as soon as it is stored.

        ``characters`` are those the scenes name, each with its fixed appearance.
        """
        ...

    @property
    def parallelism(self) -> int:
        """How many render calls one job may spread its scenes over."""
        ...


class ComposeStage(Protocol):
    async def compose(
        self,
        job_id: str,
        scenes: list[tuple[str, str]],
        audio_uri: str = "",
        *,
        fps: int = 0,
        width: int = 0,
        height: int = 0,
        options: ComposeOptions | None = None,
        revision: int = 0,
    ) -> ComposedVideo:
        """Compose (image URI, narration) scenes into the job's video.

        As :meth:`storyreel_composer.composer.VideoComposer.compose`: the request's
        own values (the user's audio, frame rate, explicit size, the job's run) are
        arguments, the look and sound are ``options``; "" and 0 are the defaults.
        """
        ...


def split_scenes(scenes: list[SceneToRender], parts: int) -> list[list[SceneToRender]]:
    """Spread scenes over at most ``parts`` render calls, balancing their sizes.

    Scenes that share a character stay in one call, so that a consistency mode
    that draws a character from shared identity images sees all of its scenes.
    """
    # Union scenes that share a character into groups, keeping scene order.
    groups: list[list[SceneToRender]] = []
    group_of: dict[str, int] = {}
    for scene in scenes:
        joined = sorted({group_of[name] for name in scene.characters if name in group_of})
        if joined:
            target = joined[0]
            for other in reversed(joined[1:]):
                groups[target].extend(groups[other])
                groups[other] = []
            groups[target].append(scene)
        else:
            target = len(groups)
            groups.append([scene])
        for group_index, group in enumerate(groups):
            for member in group:
                for name in member.characters:
                    group_of[name] = group_index
    groups = [sorted(group, key=lambda s: s.index) for group in groups if group]
    parts = max(1, min(parts, len(groups)))
    bins: list[list[SceneToRender]] = [[] for _ in range(parts)]
    for group in sorted(groups, key=len, reverse=True):
        min(bins, key=len).extend(group)
    return [sorted(b, key=lambda s: s.index) for b in bins if b]


#: Admission's check that a voice speaks a written storyboard's language
#: (:meth:`storyreel_gateway.admission.Admission.check_narration_language`).
NarrationCheck = Callable[[JobSpec, Storyboard], Awaitable[None]]


class JobPipeline:
    """Moves a job through its stages and records every transition."""

    def __init__(
        self,
        jobs: JobStore,
        story: StoryStage,
        render: RenderStage,
        compose: ComposeStage,
        render_settings: RenderSettings,
        retry: RetryPolicy,
        narration_check: NarrationCheck | None = None,
    ) -> None:
        self.jobs = jobs
        self.story = story
        self.render = render
        self.compose = compose
        self.render_settings = render_settings
        # Transient stage failures, bounded by time (GatewaySettings.retry_policy).
        self.retry = retry
        # Run before any image is drawn (the JobRunner gives its admission's); None: none.
        self.narration_check = narration_check

    @classmethod
    def from_settings(
        cls,
        settings: GatewaySettings,
        jobs: JobStore,
        story: StoryStage,
        render: RenderStage,
        compose: ComposeStage,
    ) -> JobPipeline:
        """The pipeline the gateway's settings describe, over any stage implementations."""
        return cls(
            jobs,
            story,
            render,
            compose,
            RenderSettings(
                width=settings.render_width,
                height=settings.render_height,
                steps=settings.render_steps,
                guidance=settings.render_guidance,
            ),
            settings.retry_policy(),
        )

    async def run(self, record: JobRecord) -> None:
        """Run the job to DONE, FAILED or CANCELLED.

        Upstream failures end the job FAILED; they are never raised. A
        cancellation without ``cancel_requested`` (the gateway stopping) leaves
        the job as it is, to be resumed by another run; so does a lost claim
        (:class:`~storyreel_gateway.store.LeaseLost`), which is raised.
        """
        token = job_id_var.set(record.job_id)
        current: Stage | None = None
        try:
            steps = {
                Stage.STORYBOARD: self._storyboard,
                Stage.RENDER: self._render,
                Stage.COMPOSE: self._compose,
            }
            for stage in record.begin_run():
                if stage is not Stage.STORYBOARD and record.needs_review():
                    # Written (now, or by an earlier run): a person looks at it first.
                    await self._enter_review(record)
                    return
                current = stage
                record.start_stage(stage)
                log.info("stage started", extra={"stage": stage.value})
                await self.jobs.save(record, EventKind.STAGE_STARTED, stage)
                await self._with_retries(record, stage, steps[stage])
                record.finish_stage(stage)
                log.info(
                    "stage finished",
                    extra={"stage": stage.value, "duration_s": record.stages[-1].duration_s},
                )
                # The composer's warnings reach the caller in this event's message.
                said = record.compose_warnings if stage is Stage.COMPOSE else []
                await self.jobs.save(
                    record, EventKind.STAGE_FINISHED, stage, message="\n".join(said)
                )
            log.info("job done", extra={"video_uri": record.video_uri})
            await self.end(record, JobState.DONE, None)
        except asyncio.CancelledError:
            if record.cancel_requested:
                await self.end(record, JobState.CANCELLED, None)
            raise
        except LeaseLost:
            raise
        except StageFailed as exc:
            await self.end(
                record,
                JobState.FAILED,
                JobError(stage=current, code=exc.code, message=exc.message),
            )
        except StoryreelError as exc:
            await self.end(
                record,
                JobState.FAILED,
                JobError(stage=current, code=exc.status, message=exc.message),
            )
        except Exception as exc:
            log.exception("job crashed")
            await self.end(
                record,
                JobState.FAILED,
                JobError(
                    stage=current,
                    code="INTERNAL",
                    message=f"internal error: {type(exc).__name__}",
                ),
            )
        finally:
            job_id_var.reset(token)

    async def end(self, record: JobRecord, state: JobState, error: JobError | None) -> None:
        """Finish the job in ``state`` (closing the stage in progress) and tell watchers."""
        record.finish(state, error)
        if error:
            log.warning(
                "job failed",
                extra={"stage": error.stage, "code": error.code, "error": error.message},
            )
        elif state is not JobState.DONE:
            log.info("job %s", state.value)
        await self.jobs.save(record, EventKind.JOB_FINISHED, record.stage)

    async def _enter_review(self, record: JobRecord) -> None:
        record.enter_review()
        log.info("job waits for review", extra={"version": record.storyboard_version})
        await self.jobs.save(record, EventKind.REVIEW, Stage.STORYBOARD)

    async def _with_retries(
        self, record: JobRecord, stage: Stage, step: Callable[[JobRecord], Awaitable[None]]
    ) -> None:
        # The one retry of calls to the services: the channels retry nothing
        # (storyreel.channels), and this loop also covers streaming calls, logs each
        # retry, tells watchers and ends at once when the job is cancelled.
        loop = asyncio.get_running_loop()
        started = loop.time()
        retry = 0
        while True:
            try:
                return await step(record)
            except StageFailed as exc:
                retry += 1
                backoff = self.retry.wait_before(retry, loop.time() - started)
                if not exc.transient or backoff is None:
                    raise
                log.warning(
                    "stage failed, retrying",
                    extra={"stage": stage.value, "code": exc.code, "retry_in_s": backoff},
                )
                await self.jobs.save(
                    record, EventKind.RETRYING, stage, message=f"{exc.code}: {exc.message}"
                )
                await asyncio.sleep(backoff)

    async def _storyboard(self, record: JobRecord) -> None:
        spec = record.spec
        if spec.storyboard is not None:
            # The caller wrote it (checked at admission): the stage finishes at once.
            record.set_storyboard(spec.storyboard)
            return
        storyboard = await self.story.write_storyboard(
            record.job_id, spec.prompt, spec.scene_count, spec.style, spec.seed
        )
        if len(storyboard.scenes) != spec.scene_count:
            raise StageFailed(
                "INTERNAL",
                f"LLM service wrote {len(storyboard.scenes)} scenes, "
                f"{spec.scene_count} were asked for",
            )
        record.set_storyboard(storyboard)

    async def _render(self, record: JobRecord) -> None:
        await self._check_narration(record)
        board = record.storyboard
        cast = {c.name for c in (board.characters if board else ()) if c.appearance}
        requests = [
            SceneToRender(
                index=scene.index,
                prompt=scene.image_prompt,
                seed=record.requested_seed(scene.index),
                characters=tuple(name for name in scene.characters if name in cast),
            )
            for scene in record.missing_scenes()
        ]
        settings, characters = self._render_options(record, requests)

        async def draw(part: list[SceneToRender]) -> None:
            async for image in self.render.render(record.job_id, part, settings, characters):
                record.add_image(image)
                await self.jobs.save(record, EventKind.SCENE_RENDERED, Stage.RENDER, image.index)

        tasks = [
            asyncio.create_task(draw(part))
            for part in split_scenes(requests, self.render.parallelism)
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # One call failed (or the job was cancelled): stop the others before retrying.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        still_missing = record.missing_scenes()
        if still_missing:
            raise StageFailed(
                "INTERNAL",
                "render finished without scenes " + ", ".join(str(s.index) for s in still_missing),
            )

    async def _check_narration(self, record: JobRecord) -> None:
        """A voice must speak the storyboard's language before any GPU time is spent on it.

        A generated storyboard's language is known only now (one edited in review too):
        the job fails with the check's own error (FAILED_PRECONDITION: no voice speaks
        it; INVALID_ARGUMENT: the job's voice speaks another), its storyboard kept to
        read. A voice list that cannot be had now is retried as a transient failure.
        """
        if self.narration_check is None or record.storyboard is None:
            return
        try:
            await self.narration_check(record.spec, record.storyboard)
        except UpstreamFailed as exc:
            raise StageFailed(exc.status, exc.message) from None

    def _render_options(
        self, record: JobRecord, scenes: list[SceneToRender]
    ) -> tuple[RenderSettings, tuple[Character, ...]]:
        """The job's render settings and the characters its scenes name.

        Images take the video's shape unless the gateway's settings fix a size.
        Seeds are the diffusion service's to derive: the job seed travels with
        every call, and each scene is sent with its own seed or 0
        (:meth:`JobRecord.requested_seed`), so the job's consistency mode applies
        as the diffusion service defines it (:mod:`storyreel.seeds`).
        """
        spec = record.spec
        base = self.render_settings
        aspect = ""
        if not (base.width or base.height):
            aspect = spec.aspect or nearest_aspect(spec.width, spec.height)
        settings = replace(
            base,
            aspect=aspect,
            consistency=spec.consistency,
            job_seed=spec.seed,
            revision=record.generation,
        )
        # The scenes name only cast members with an appearance (see _render).
        named = {name for scene in scenes for name in scene.characters}
        board = record.storyboard
        characters = tuple(c for c in (board.characters if board else ()) if c.name in named)
        return settings, characters

    async def _compose(self, record: JobRecord) -> None:
        assert record.storyboard is not None
        narration = {scene.index: scene.narration for scene in record.storyboard.scenes}
        scenes = [(image.uri, narration.get(image.index, "")) for image in record.images]
        spec = record.spec
        options = ComposeOptions(
            aspect=spec.aspect,
            resolution=spec.resolution,
            seed=spec.seed,
            captions=spec.captions,
            audio_mode=spec.audio_mode,
            voice=spec.voice,
        )
        video = await self.compose.compose(
            record.job_id,
            scenes,
            spec.audio_uri,
            fps=spec.fps,
            width=spec.width,
            height=spec.height,
            options=options,
            revision=record.generation,
        )
        record.set_video(video)
