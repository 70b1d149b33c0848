"""Scene rendering: prompts in, PNGs in the artifact store out.

The core of the render service, with no gRPC in it. :class:`SceneRenderer`
loads a diffusers text-to-image pipeline once, checks every request against
the limits in :class:`~storyreel_diffusion.settings.DiffusionSettings` before
doing any work, then draws the scenes one at a time and stores each PNG as
soon as it is drawn. Each image's noise comes from a generator seeded with the
scene's seed, so a repeated request gives byte-identical PNGs.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from storyreel.errors import InvalidInput, NotReady, Overloaded
from storyreel.ids import check_job_id, job_key
from storyreel.storage import ArtifactStore
from storyreel_diffusion.settings import DiffusionSettings

log = logging.getLogger(__name__)

_MAX_SEED = 2**64 - 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SceneToRender:
    """One image to draw: ``index`` is the scene's 1-based position."""

    index: int
    prompt: str
    seed: int


@dataclass(frozen=True)
class RenderedImage:
    """A stored scene image."""

    index: int
    uri: str
    seed: int


@dataclass(frozen=True)
class RenderPlan:
    """A checked request with every default filled in."""

    job_id: str
    scenes: tuple[SceneToRender, ...]
    width: int
    height: int
    steps: int
    guidance: float
    negative_prompt: str


def image_key(job_id: str, index: int) -> str:
    """Object key of scene ``index``'s image: ``jobs/<job_id>/images/scene-NNN.png``."""
    return job_key(job_id, "images", f"scene-{index:03d}.png")


def plan_render(
    settings: DiffusionSettings,
    job_id: str,
    scenes: Sequence[SceneToRender],
    *,
    width: int = 0,
    height: int = 0,
    steps: int = 0,
    guidance: float = 0.0,
    negative_prompt: str = "",
) -> RenderPlan:
    """Check a request against the limits and fill in defaults (0 or "" selects one).

    Raises InvalidInput naming the field and its bounds. Does no work and
    touches no storage, so a rejected request leaves nothing behind.
    """
    check_job_id(job_id)
    if not 1 <= len(scenes) <= settings.max_scenes:
        raise InvalidInput(f"scenes must hold 1 to {settings.max_scenes} scenes, got {len(scenes)}")
    seen: set[int] = set()
    for position, scene in enumerate(scenes):
        where = f"scenes[{position}] (index {scene.index})"
        if scene.index < 1:
            raise InvalidInput(f"{where}: index must be 1 or more")
        if scene.index in seen:
            raise InvalidInput(f"{where}: index {scene.index} appears more than once")
        seen.add(scene.index)
        if not scene.prompt.strip():
            raise InvalidInput(f"{where}: prompt must not be empty")
        if len(scene.prompt) > settings.max_prompt_chars:
            raise InvalidInput(
                f"{where}: prompt is {len(scene.prompt)} characters, "
                f"the maximum is {settings.max_prompt_chars}"
            )
        if not 0 <= scene.seed <= _MAX_SEED:
            raise InvalidInput(f"{where}: seed must be between 0 and 2**64-1, got {scene.seed}")
    if len(negative_prompt) > settings.max_prompt_chars:
        raise InvalidInput(
            f"negative_prompt is {len(negative_prompt)} characters, "
            f"the maximum is {settings.max_prompt_chars}"
        )

    sides = {}
    for name, value, default in (
        ("width", width, settings.default_width),
        ("height", height, settings.default_height),
    ):
        side = sides[name] = value or default
        if not settings.min_side <= side <= settings.max_side or side % settings.side_multiple:
            raise InvalidInput(
                f"{name} must be a multiple of {settings.side_multiple} between "
                f"{settings.min_side} and {settings.max_side} pixels "
                f"(0 selects the default {default}), got {side}"
            )
    steps = steps or settings.default_steps
    if not 1 <= steps <= settings.max_steps:
        raise InvalidInput(
            f"steps must be between 1 and {settings.max_steps} "
            f"(0 selects the default {settings.default_steps}), got {steps}"
        )
    guidance = guidance or settings.default_guidance
    if not (math.isfinite(guidance) and 0 < guidance <= settings.max_guidance):
        raise InvalidInput(
            f"guidance must be above 0 and at most {settings.max_guidance} "
            f"(0 selects the default {settings.default_guidance}), got {guidance}"
        )
    return RenderPlan(
        job_id=job_id,
        scenes=tuple(scenes),
        width=sides["width"],
        height=sides["height"],
        steps=steps,
        guidance=float(guidance),
        negative_prompt=negative_prompt,
    )


def _names_local_folder(model: str) -> bool:
    """Whether ``model`` means a folder here rather than a model hub id.

    A hub id (``org/name``) also looks like a relative path, so a relative
    name counts as local only when its first folder exists here
    (``models/tiny-sd`` beside a ``models`` folder).
    """
    path = Path(model).expanduser()
    return (
        path.is_absolute() or model.startswith(".") or path.exists() or Path(path.parts[0]).is_dir()
    )


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is cuda when a GPU is visible, else cpu; anything else is taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` is float16 on cuda, float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class SceneRenderer:
    """Draws scene images with one diffusers pipeline and stores them as PNGs.

    Inference runs on a single worker thread: one image at a time per process,
    never on the event loop. Call :meth:`load` before :meth:`render`.
    """

    def __init__(self, settings: DiffusionSettings, store: ArtifactStore) -> None:
        self.settings = settings
        self.store = store
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self._pipe: Any = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def loaded(self) -> bool:
        """Whether the pipeline is loaded and passed its warm-up render."""
        return self._pipe is not None

    async def load(self) -> None:
        """Load the pipeline and render one small image; raises if either fails."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load_pipeline)

    async def close(self) -> None:
        """Wait for the image being drawn, then release the pipeline."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        self._pipe = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    async def render(
        self,
        job_id: str,
        scenes: Sequence[SceneToRender],
        *,
        width: int = 0,
        height: int = 0,
        steps: int = 0,
        guidance: float = 0.0,
        negative_prompt: str = "",
    ) -> AsyncIterator[RenderedImage]:
        """Draw every scene in order, yielding each image once it is stored.

        0 (or "") selects a field's default. Raises InvalidInput before any
        work for a request outside the limits (see :func:`plan_render`),
        NotReady before :meth:`load`, Overloaded when the device runs out of memory.
        """
        plan = plan_render(
            self.settings,
            job_id,
            scenes,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            negative_prompt=negative_prompt,
        )
        loop = asyncio.get_running_loop()
        for scene in plan.scenes:
            pipe, executor = self._pipe, self._executor
            if pipe is None or executor is None:
                raise NotReady("the render model is not loaded")
            started = time.perf_counter()
            png = await loop.run_in_executor(executor, self._draw_png, pipe, plan, scene)
            uri = await asyncio.to_thread(
                self.store.put_bytes, image_key(plan.job_id, scene.index), png, "image/png"
            )
            log.info(
                "scene rendered",
                extra={
                    "scene": scene.index,
                    "seed": scene.seed,
                    "size": f"{plan.width}x{plan.height}",
                    "steps": plan.steps,
                    "seconds": round(time.perf_counter() - started, 3),
                },
            )
            yield RenderedImage(index=scene.index, uri=uri, seed=scene.seed)

    # Everything below runs on the render thread.

    def _load_pipeline(self) -> None:
        from diffusers import AutoPipelineForText2Image
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        # Progress bars would interleave with the service's JSON log lines.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        model = self.settings.model
        started = time.perf_counter()
        source: str | Path = model
        if _names_local_folder(model):
            source = Path(model).expanduser()
            if not source.is_dir():
                # Fail at once: asking the hub for a folder's name only retries, then times out.
                raise FileNotFoundError(
                    f"model folder {model!r} does not exist (for the offline tiny model "
                    "run `make models`)"
                )
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(
                source,
                dtype=self.dtype,
                local_files_only=self.settings.local_files_only,
            )
        except OSError as exc:
            raise FileNotFoundError(f"could not load model {model!r}: {exc}") from exc
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        side = self.settings.warmup_side
        scene = SceneToRender(index=1, prompt="warm-up", seed=0)
        warmup = RenderPlan(
            job_id="warmup",
            scenes=(scene,),
            width=side,
            height=side,
            steps=self.settings.warmup_steps,
            guidance=self.settings.default_guidance,
            negative_prompt="",
        )
        self._draw_png(pipe, warmup, scene)
        self._pipe = pipe
        log.info(
            "model loaded",
            extra={
                "model": model,
                "pipeline": type(pipe).__name__,
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "seconds": round(time.perf_counter() - started, 3),
            },
        )

    def _draw_png(self, pipe: Any, plan: RenderPlan, scene: SceneToRender) -> bytes:
        # A fresh generator per image: the image depends on its own seed only,
        # not on which scenes were drawn before it.
        generator = torch.Generator(device=self.device).manual_seed(scene.seed)
        try:
            with torch.inference_mode():
                image = pipe(
                    prompt=scene.prompt,
                    negative_prompt=plan.negative_prompt or None,
                    width=plan.width,
                    height=plan.height,
                    num_inference_steps=plan.steps,
                    guidance_scale=plan.guidance,
                    generator=generator,
                    output_type="pil",
                ).images[0]
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise Overloaded(
                f"out of GPU memory drawing scene {scene.index} at {plan.width}x{plan.height}; "
                "retry later or ask for a smaller size"
            ) from None
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
