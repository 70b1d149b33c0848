"""Scene rendering: prompts in, PNGs in the artifact store out.

The core of the diffusion service, with no gRPC in it. :class:`SceneRenderer`
loads one diffusers pipeline at start, checks every request before doing any
work (:func:`~storyreel_diffusion.planning.plan_render`), serves what it can
from the content-addressed cache, and draws the rest in micro-batches on a
single render thread. Each image is stored as soon as its batch is decoded and
handed back in request order while the next batch is being drawn.

Each image's noise comes from its own generator seeded with the image's seed,
so a repeated request gives byte-identical PNGs on the same device, and a
scene's image does not depend on the scenes drawn before it. (Drawn in a batch
of another size, an image may differ from the one drawn alone by one level in
a few pixels: batched kernels round differently.)

Names by layer: a request's scenes and characters are
:class:`~storyreel_diffusion.planning.Scene` and
:class:`~storyreel_diffusion.planning.CastMember` (``diffusion.v1.Scene`` and
``diffusion.v1.Character`` in the contract); what is drawn is :class:`SceneImage`
(``diffusion.v1.SceneImage``; ``storyreel_gateway.jobs.SceneImage`` in the gateway's
records).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from storyreel.errors import InvalidInput, NotFound, NotReady, Overloaded
from storyreel.seeds import derive_seed
from storyreel.storage import ArtifactStore
from storyreel_diffusion.metrics import RenderMetrics
from storyreel_diffusion.models import (
    LoadedModel,
    load_pipeline,
    names_local_folder,
    resolve_device,
    resolve_dtype,
    should_compile,
)
from storyreel_diffusion.planning import (
    CastMember,
    ConsistencyMode,
    ImagePlan,
    ModelFacts,
    RenderPlan,
    Scene,
    cache_key,
    check_reference_uri,
    image_key,
    plan_batches,
    plan_render,
    portrait_key,
)
from storyreel_diffusion.settings import DiffusionSettings

__all__ = [
    "CastMember",
    "ConsistencyMode",
    "Scene",
    "SceneImage",
    "SceneRenderer",
    "image_key",
    "names_local_folder",
    "plan_render",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

#: PNG text chunk holding what a cached image's caller must be told (seed used, safety).
PNG_META = "storyreel"
#: Formats an uploaded reference image may be in (Pillow's names).
REFERENCE_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class _Upload:
    """A character's uploaded reference image, read and made ready for the image encoder."""

    #: SHA-256 of the stored bytes (part of the content keys of the scenes it conditions).
    sha256: str
    image: Image.Image


def _encoder_side(pipe: Any) -> int:
    """Side of the square the IP-Adapter's image encoder reads (its processor's crop)."""
    crop = getattr(getattr(pipe, "feature_extractor", None), "crop_size", None)
    if isinstance(crop, dict) and crop.get("height") and crop.get("width"):
        return int(min(crop["height"], crop["width"]))
    return 224


def decode_reference(where: str, uri: str, data: bytes, max_pixels: int, side: int) -> Image.Image:
    """An uploaded reference image as the image encoder reads it: RGB, ``side`` square.

    The pixel count is checked from the header before anything is decoded; the
    image is then decoded whole, converted to RGB and scaled and centre-cropped to
    ``side`` (as the encoder's processor would, so a large upload is not kept).
    """
    refused = f"{where}: reference_uri {uri}"
    try:
        with Image.open(io.BytesIO(data), formats=REFERENCE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidInput(
                    f"{refused} is {width}x{height} pixels; the limit is {max_pixels} pixels"
                )
            image.load()
            rgb = image.convert("RGB")
    except InvalidInput:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"{refused} is too large to decode: {exc}") from None
    except Exception as exc:  # Pillow raises many kinds for a file it cannot read
        raise InvalidInput(
            f"{refused} is not a decodable PNG, JPEG or WebP image ({exc})"
        ) from None
    return ImageOps.fit(rgb, (side, side), Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class SceneImage:
    """A stored scene image."""

    index: int
    uri: str
    #: The seed the image was drawn from (a safety retry's seed when there was one).
    seed: int
    #: Served from the content-addressed cache without the model.
    cached: bool = False
    #: Hash of everything that decides the pixels; the image is cached under it.
    content_key: str = ""
    #: Every attempt was flagged by the safety checker; the stored image is blacked out.
    safety_flagged: bool = False
    #: Times the image was drawn again with a new seed because it was flagged.
    safety_retries: int = 0
    #: URIs of the reference portraits that conditioned the image.
    reference_uris: tuple[str, ...] = ()


@dataclass
class _Drawn:
    image: Image.Image
    seed: int
    retries: int
    flagged: bool


class _RenderCancelled(Exception):
    """Raised from the step callback to stop a pipeline call whose caller went away."""


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _png_meta(png: bytes) -> dict:
    try:
        return json.loads(Image.open(io.BytesIO(png)).info.get(PNG_META, "{}"))
    except (OSError, ValueError):
        return {}


def _reference_uris(image: ImagePlan, references: dict[str, str]) -> tuple[str, ...]:
    return tuple(references[name] for name in image.conditioned_on if name in references)


def _settle(future: asyncio.Future | None) -> None:
    """Cancel ``future`` or consume its outcome, so nothing is logged as never retrieved."""
    if future is None:
        return
    if future.done():
        if not future.cancelled():
            future.exception()
    else:
        future.cancel()


class SceneRenderer:
    """Draws scene images with one diffusers pipeline and stores them as PNGs.

    Inference runs on a single worker thread, never on the event loop; requests
    interleave batch by batch. Call :meth:`load` before :meth:`render`.
    """

    def __init__(
        self,
        settings: DiffusionSettings,
        store: ArtifactStore,
        metrics: RenderMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics or RenderMetrics()
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self._model: LoadedModel | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._admitted = 0
        #: Largest batch that fitted in memory, by image size, once one did not: batches
        #: are sized to the device's memory as it turns out, below MAX_BATCH_SIZE.
        self._batch_caps: dict[tuple[int, int], int] = {}

    @property
    def loaded(self) -> bool:
        """Whether the pipeline is loaded and passed its warm-up render."""
        return self._model is not None

    @property
    def facts(self) -> ModelFacts | None:
        """What the loaded model fixes about requests; None before :meth:`load`."""
        return self._model.facts if self._model is not None else None

    @property
    def pipeline(self) -> Any:
        """The loaded diffusers pipeline; None before :meth:`load`."""
        return self._model.pipe if self._model is not None else None

    def swap_pipeline(self, pipe: Any) -> Any:
        """Replace the loaded pipeline with ``pipe`` and return the one it replaces.

        For instrumentation and tests: ``pipe`` is normally a wrapper of the
        loaded pipeline that observes (or fails) its calls and passes every
        other attribute through. Takes effect from the next pipeline call.
        """
        if self._model is None:
            raise NotReady("the render model is not loaded")
        previous, self._model.pipe = self._model.pipe, pipe
        return previous

    async def load(self) -> None:
        """Load the pipeline and render one small image; raises if either fails."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    async def close(self) -> None:
        """Wait for the batch being drawn, then release the pipeline."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    async def render(
        self,
        job_id: str,
        scenes: Sequence[Scene],
        *,
        width: int = 0,
        height: int = 0,
        aspect: str = "",
        steps: int = 0,
        guidance: float = 0.0,
        negative_prompt: str = "",
        scheduler: str = "",
        characters: Sequence[CastMember] = (),
        consistency: ConsistencyMode | str | None = None,
        consistency_strength: float = 0.0,
        job_seed: int | None = None,
        revision: int = 0,
    ) -> AsyncIterator[SceneImage]:
        """Render every scene, yielding each image in request order once it is stored.

        Every object is stored under the job's run ``revision`` (``jobs/<job_id>/``
        for 0, ``jobs/<job_id>/r<N>/`` for N), cache hits included: the cache is
        keyed by content alone, and a hit is copied to the revision's key.
        0 (or "" or None) selects a field's default. Raises InvalidInput (or
        FailedPrecondition) before any work for a request outside the limits (see
        :func:`~storyreel_diffusion.planning.plan_render`), NotReady before
        :meth:`load`, Overloaded when the queue is full or the device runs out of
        memory. Closing the iterator early (the caller cancelled) stops the
        drawing at the next denoising step.
        """
        model, executor = self._model, self._executor
        if model is None or executor is None:
            raise NotReady("the render model is not loaded")
        uploads = await self._read_uploads(characters, consistency, model)
        plan = plan_render(
            self.settings,
            model.facts,
            job_id,
            scenes,
            width=width,
            height=height,
            aspect=aspect,
            steps=steps,
            guidance=guidance,
            negative_prompt=negative_prompt,
            scheduler=scheduler,
            characters=characters,
            consistency=consistency,
            consistency_strength=consistency_strength,
            job_seed=job_seed,
            revision=revision,
            reference_hashes={uri: upload.sha256 for uri, upload in uploads.items()},
        )
        cached = await self._lookup(plan)
        wanted = [*plan.images, *plan.portraits.values()]
        if all(image.key in cached for image in wanted):
            async for image in self._produce(plan, cached, uploads):
                yield image
            return
        if self._admitted >= self.settings.max_queue:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise Overloaded(
                f"the render queue is full ({self.settings.max_queue} requests); retry later"
            )
        self._admitted += 1
        self.metrics.queue_depth.set(self._admitted)
        try:
            async for image in self._produce(plan, cached, uploads):
                yield image
        finally:
            self._admitted -= 1
            self.metrics.queue_depth.set(self._admitted)

    async def _produce(
        self,
        plan: RenderPlan,
        cached: dict[str, bytes],
        uploads: dict[str, _Upload] | None = None,
    ) -> AsyncIterator[SceneImage]:
        """Copy the hits, draw the misses batch by batch, yield in request order."""
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        stores: dict[int, asyncio.Future[SceneImage]] = {}
        drawing: asyncio.Future | None = None
        started = time.perf_counter()

        def submit(images: list[ImagePlan], kind: str, references: dict) -> asyncio.Future:
            executor = self._executor
            if executor is None:
                raise NotReady("the diffusion service is stopping")
            try:
                return loop.run_in_executor(
                    executor, self._draw_batch, plan, images, kind, references, cancel
                )
            except RuntimeError:  # executor shut down
                raise NotReady("the diffusion service is stopping") from None

        try:
            references, reference_uris = await self._references(plan, cached, submit, uploads)
            for position, image in enumerate(plan.images):
                if image.key in cached:
                    stores[position] = asyncio.ensure_future(
                        asyncio.to_thread(
                            self._store_hit, plan, image, cached[image.key], reference_uris
                        )
                    )
            misses = [p for p in range(len(plan.images)) if p not in stores]
            most = self._batch_caps.get((plan.width, plan.height), self.settings.max_batch_size)
            batches = iter(plan_batches(plan, misses, most))
            batch = next(batches, None)
            if batch is not None:
                drawing = submit([plan.images[p] for p in batch], "scene", references)
            for position in range(len(plan.images)):
                while position not in stores:
                    assert drawing is not None and batch is not None
                    drawn = await drawing
                    for p, outcome in zip(batch, drawn, strict=True):
                        stores[p] = asyncio.ensure_future(
                            asyncio.to_thread(
                                self._store_drawn, plan, plan.images[p], outcome, reference_uris
                            )
                        )
                    # Start the next batch before waiting on storage: the model keeps busy.
                    batch = next(batches, None)
                    drawing = (
                        submit([plan.images[p] for p in batch], "scene", references)
                        if batch is not None
                        else None
                    )
                image = await stores[position]
                log.info(
                    "scene rendered",
                    extra={
                        "scene": image.index,
                        "seed": image.seed,
                        "size": f"{plan.width}x{plan.height}",
                        "steps": plan.steps,
                        "consistency": plan.mode.value,
                        "cached": image.cached,
                        "seconds": round(time.perf_counter() - started, 3),
                    },
                )
                yield image
        finally:
            cancel.set()
            _settle(drawing)
            for future in stores.values():
                _settle(future)

    async def _lookup(self, plan: RenderPlan) -> dict[str, bytes]:
        """Cached PNGs of the plan's images and portraits, by content key."""
        if not self.settings.cache_enabled:
            return {}
        keys = list(dict.fromkeys(i.key for i in (*plan.images, *plan.portraits.values())))
        found = await asyncio.gather(*(asyncio.to_thread(self._read_cached, k) for k in keys))
        hits = {key: png for key, png in zip(keys, found, strict=True) if png is not None}
        self.metrics.cache_hits.inc(len(hits))
        self.metrics.cache_misses.inc(len(keys) - len(hits))
        return hits

    def _read_cached(self, key: str) -> bytes | None:
        try:
            return self.store.get_bytes(
                self.store.uri_for(cache_key(self.settings.cache_prefix, key))
            )
        except NotFound:
            return None

    async def _read_uploads(
        self,
        characters: Sequence[CastMember],
        consistency: ConsistencyMode | str | None,
        model: LoadedModel,
    ) -> dict[str, _Upload]:
        """The characters' uploaded reference images, by URI (REFERENCE_IMAGES only).

        Only URIs under the store's uploads/ folder are read (InvalidInput otherwise);
        NotFound when one is not stored; InvalidInput when it is too large or does not
        decode. Another mode reads nothing: :func:`plan_render` refuses the request.
        """
        wanted: dict[str, str] = {}
        for position, character in enumerate(characters):
            if character.reference_uri:
                where = f"characters[{position}] ({character.name})"
                wanted.setdefault(character.reference_uri, where)
        mode = consistency or self.settings.consistency
        if not wanted or mode != ConsistencyMode.REFERENCE_IMAGES or not model.facts.ip_adapter:
            return {}  # nothing to read, or plan_render refuses the request
        side = _encoder_side(model.pipe)
        uris = list(wanted)
        read = await asyncio.gather(
            *(asyncio.to_thread(self._read_upload, wanted[uri], uri, side) for uri in uris)
        )
        return dict(zip(uris, read, strict=True))

    def _read_upload(self, where: str, uri: str, side: int) -> _Upload:
        key = self.store.key_of(uri)  # InvalidInput: not in this store, or not a safe key
        check_reference_uri(where, uri, key)
        try:
            data = self.store.get_bytes(uri)
        except NotFound:
            raise NotFound(f"{where}: reference_uri {uri} is not stored") from None
        limit = self.settings.max_reference_bytes
        if len(data) > limit:
            raise InvalidInput(f"{where}: reference_uri {uri} is over {limit} bytes")
        image = decode_reference(where, uri, data, self.settings.max_reference_pixels, side)
        return _Upload(hashlib.sha256(data).hexdigest(), image)

    async def _references(
        self,
        plan: RenderPlan,
        cached: dict[str, bytes],
        submit,
        uploads: dict[str, _Upload] | None = None,
    ) -> tuple[dict[str, Image.Image], dict[str, str]]:
        """The images the scenes are conditioned on, by character: uploaded images as
        they are, reference portraits drawn or cached and stored under the job's revision."""
        uploads = uploads or {}
        given = {
            name: character.reference_uri
            for name, character in plan.characters.items()
            if character.reference_uri in uploads
        }
        uploaded_images = {name: uploads[uri].image for name, uri in given.items()}
        if not plan.portraits:
            return uploaded_images, dict(given)
        missing = [name for name, p in plan.portraits.items() if p.key not in cached]
        drawn: dict[str, _Drawn] = {}
        size = self.settings.max_batch_size
        for start in range(0, len(missing), size):
            names = missing[start : start + size]
            outcomes = await submit([plan.portraits[n] for n in names], "reference", {})
            drawn.update(zip(names, outcomes, strict=True))

        def store(name: str) -> tuple[Image.Image, str]:
            portrait = plan.portraits[name]
            character = plan.characters[name]
            key = portrait_key(plan.job_id, character.slot, name, plan.revision)
            if name in drawn:
                png = self._encode(portrait, drawn[name])
                self._put_cached(portrait.key, png)
                image = drawn[name].image
            else:
                png = cached[portrait.key]
                image = Image.open(io.BytesIO(png)).convert("RGB")
            return image, self.store.put_bytes(key, png, "image/png")

        names = list(plan.portraits)
        stored = await asyncio.gather(*(asyncio.to_thread(store, n) for n in names))
        images = {name: image for name, (image, _) in zip(names, stored, strict=True)}
        uris = {name: uri for name, (_, uri) in zip(names, stored, strict=True)}
        return {**images, **uploaded_images}, {**uris, **given}

    # Storage helpers: run on worker threads (asyncio.to_thread).

    def _encode(self, image: ImagePlan, drawn: _Drawn) -> bytes:
        info = PngInfo()
        meta = {
            "content_key": image.key,
            "seed": drawn.seed,
            "safety_retries": drawn.retries,
            "safety_flagged": drawn.flagged,
        }
        info.add_text(PNG_META, json.dumps(meta, sort_keys=True))
        buffer = io.BytesIO()
        drawn.image.save(
            buffer, format="PNG", pnginfo=info, compress_level=self.settings.png_compress_level
        )
        return buffer.getvalue()

    def _put_cached(self, key: str, png: bytes) -> None:
        if self.settings.cache_enabled:
            self.store.put_bytes(cache_key(self.settings.cache_prefix, key), png, "image/png")

    def _store_drawn(
        self, plan: RenderPlan, image: ImagePlan, drawn: _Drawn, references: dict[str, str]
    ) -> SceneImage:
        png = self._encode(image, drawn)
        self._put_cached(image.key, png)
        uri = self.store.put_bytes(
            image_key(plan.job_id, image.index, plan.revision), png, "image/png"
        )
        return SceneImage(
            index=image.index,
            uri=uri,
            seed=drawn.seed,
            cached=False,
            content_key=image.key,
            safety_flagged=drawn.flagged,
            safety_retries=drawn.retries,
            reference_uris=_reference_uris(image, references),
        )

    def _store_hit(
        self, plan: RenderPlan, image: ImagePlan, png: bytes, references: dict[str, str]
    ) -> SceneImage:
        meta = _png_meta(png)
        # A copy under the job's revision: the job's images stay whole when cache entries are
        # evicted, and a hit for a later revision leaves the earlier revisions' copies alone.
        uri = self.store.put_bytes(
            image_key(plan.job_id, image.index, plan.revision), png, "image/png"
        )
        return SceneImage(
            index=image.index,
            uri=uri,
            seed=int(meta.get("seed", image.seed)),
            cached=True,
            content_key=image.key,
            safety_flagged=bool(meta.get("safety_flagged", False)),
            safety_retries=int(meta.get("safety_retries", 0)),
            reference_uris=_reference_uris(image, references),
        )

    # Everything below runs on the render thread.

    def _load(self) -> None:
        started = time.perf_counter()
        model = load_pipeline(self.settings)
        compiled = should_compile(self.settings.torch_compile, self.device)
        warmup = plan_render(
            self.settings,
            model.facts,
            "warmup",
            [Scene(index=1, prompt="warm-up", seed=0)],
            # A compiled model compiles on its first call at each size: warm up at the
            # default size, so that requests do not pay for it.
            width=0 if compiled else self.settings.warmup_side,
            height=0 if compiled else self.settings.warmup_side,
            steps=self.settings.warmup_steps,
            consistency=ConsistencyMode.NONE,
        )
        self._draw_batch(warmup, list(warmup.images), "warmup", {}, threading.Event(), model)
        self._model = model
        log.info(
            "model loaded",
            extra={
                "model": self.settings.model,
                "pipeline": model.facts.pipeline,
                "device": str(self.device),
                "dtype": model.facts.dtype,
                "side_multiple": model.facts.side_multiple,
                "native_size": model.facts.native_width,
                "ip_adapter": model.facts.ip_adapter is not None,
                "safety_checker": model.facts.safety_retries is not None,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )

    def _draw_batch(
        self,
        plan: RenderPlan,
        images: list[ImagePlan],
        kind: str,
        references: dict[str, Image.Image],
        cancel: threading.Event,
        model: LoadedModel | None = None,
    ) -> list[_Drawn]:
        """Draw ``images`` in one pipeline call, redrawing safety-flagged ones with new seeds."""
        model = model or self._model
        if model is None:
            raise NotReady("the render model is not loaded")
        retries = model.facts.safety_retries or 0
        seeds = [image.seed for image in images]
        outcomes: list[_Drawn | None] = [None] * len(images)
        todo = list(range(len(images)))
        attempt = 0
        out_of_memory = False
        try:
            while todo:
                pictures, flags = self._call_pipeline(
                    model,
                    plan,
                    [images[i] for i in todo],
                    [seeds[i] for i in todo],
                    kind,
                    references,
                    cancel,
                )
                again = []
                for i, picture, flagged in zip(todo, pictures, flags, strict=True):
                    if flagged and attempt < retries:
                        seeds[i] = derive_seed(images[i].seed, "safety", attempt + 1)
                        again.append(i)
                    else:
                        outcomes[i] = _Drawn(picture, seeds[i], attempt, flagged)
                todo, attempt = again, attempt + 1
        except _RenderCancelled:
            self.metrics.cancelled.inc()
            raise
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            out_of_memory = True
        if out_of_memory:
            # Out of the except block, the failed call's tensors are unreferenced: free them.
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(images) > 1:
                # Too big a batch for the memory: draw it in halves, and size later
                # batches of this image size to fit. Each image keeps its own seed.
                half = (len(images) + 1) // 2
                log.warning(
                    "out of memory: drawing the batch in halves",
                    extra={"size": f"{plan.width}x{plan.height}", "batch": len(images)},
                )
                drawn = [
                    *self._draw_batch(plan, images[:half], kind, references, cancel, model),
                    *self._draw_batch(plan, images[half:], kind, references, cancel, model),
                ]
                # The halves fitted: later batches of this size are no bigger.
                size = (plan.width, plan.height)
                self._batch_caps[size] = min(self._batch_caps.get(size, half), half)
                return drawn
            self.metrics.rejected.labels(reason="out_of_memory").inc()
            raise Overloaded(
                f"out of {self.device.type} memory drawing {len(images)} image(s) at "
                f"{plan.width}x{plan.height}; retry later or ask for a smaller size"
            )
        return [outcome for outcome in outcomes if outcome is not None]

    def _call_pipeline(
        self,
        model: LoadedModel,
        plan: RenderPlan,
        images: list[ImagePlan],
        seeds: list[int],
        kind: str,
        references: dict[str, Image.Image],
        cancel: threading.Event,
    ) -> tuple[list[Image.Image], list[bool]]:
        if cancel.is_set():
            raise _RenderCancelled
        pipe = model.pipe
        prompts = [image.prompt for image in images]
        identities = 0
        if plan.mode is ConsistencyMode.CONSISTENT_SELF_ATTENTION and any(
            image.conditioned_on for image in images
        ):
            # Identity images first, then the scenes, each linked to its characters'.
            positions: dict[str, list[int]] = {}
            id_prompts: list[str] = []
            id_seeds: list[int] = []
            for name in dict.fromkeys(n for image in images for n in image.conditioned_on):
                character = plan.characters[name]
                for seed in character.identity_seeds(plan.identity_images):
                    positions.setdefault(name, []).append(len(id_prompts))
                    id_prompts.append(character.portrait_prompt)
                    id_seeds.append(seed)
            identities = len(id_prompts)
            links = [()] * identities + [
                tuple(p for name in image.conditioned_on for p in positions[name])
                for image in images
            ]
            prompts = id_prompts + prompts
            seeds = id_seeds + seeds
            model.identity_links.links = tuple(links)
            model.identity_links.strength = plan.strength

        options: dict[str, Any] = {}
        if model.idle_ip_embeds is not None:
            refs = images[0].conditioned_on if plan.mode is ConsistencyMode.REFERENCE_IMAGES else ()
            if refs:
                pipe.set_ip_adapter_scale(plan.strength)
                options["ip_adapter_image"] = [[references[name] for name in refs]]
            else:
                # The adapter stays loaded; scale 0 makes its layers skip their image branch.
                pipe.set_ip_adapter_scale(0.0)
                guided = plan.guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
                options["ip_adapter_image_embeds"] = [
                    torch.cat([e, e]) if guided else e for e in model.idle_ip_embeds
                ]
        scheduler = model.scheduler(plan.scheduler)
        if pipe.scheduler is not scheduler:
            pipe.scheduler = scheduler

        def on_step_end(_pipe: Any, _step: int, _timestep: Any, tensors: dict) -> dict:
            self.metrics.steps.inc()
            if cancel.is_set():
                raise _RenderCancelled
            return tensors

        if model.step_end_callback:
            options.update(callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=[])
        else:  # PixArt-Σ: the older per-step callback
            options.update(
                callback=lambda step, timestep, _latents: on_step_end(pipe, step, timestep, {}),
                callback_steps=1,
            )
        options.update(model.call_options)
        if plan.negative_prompt:
            # Left out otherwise: each pipeline keeps its own default (PixArt-Σ's is "").
            options["negative_prompt"] = [plan.negative_prompt] * len(prompts)

        # One CPU generator per image: the image depends on its own seed only, and the
        # starting noise is the same on every device.
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                result = pipe(
                    prompt=prompts,
                    width=plan.width,
                    height=plan.height,
                    num_inference_steps=plan.steps,
                    guidance_scale=plan.guidance,
                    generator=generators,
                    output_type="pil",
                    **options,
                )
        finally:
            model.identity_links.clear()
        seconds = time.perf_counter() - started
        drawn = len(result.images)
        for _ in range(drawn):
            self.metrics.image_seconds.observe(seconds / drawn)
        self.metrics.images.labels(kind=kind).inc(drawn - identities)
        if identities:
            self.metrics.images.labels(kind="identity").inc(identities)
        flags = getattr(result, "nsfw_content_detected", None) or [False] * drawn
        flagged = [bool(flag) for flag in flags[identities:]]
        self.metrics.safety_flagged.inc(sum(flagged))
        return list(result.images[identities:]), flagged
