"""gRPC side of the render service: storyreel.render.v1.RenderService.

The servicer only converts messages to and from the core's domain objects;
validation, rendering, caching and storage live in
:mod:`storyreel_diffusion.renderer`. Domain errors it raises become status
codes in the shared interceptor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from storyreel.errors import InvalidInput
from storyreel.render.v1 import render_pb2, render_pb2_grpc
from storyreel.serving import Service
from storyreel.storage import ArtifactStore
from storyreel_diffusion.planning import AspectRatio, Character, ConsistencyMode, SceneToRender
from storyreel_diffusion.renderer import RenderedImage, SceneRenderer
from storyreel_diffusion.settings import DiffusionSettings

log = logging.getLogger(__name__)

_CONSISTENCY = {
    render_pb2.CONSISTENCY_MODE_UNSPECIFIED: None,
    render_pb2.CONSISTENCY_MODE_NONE: ConsistencyMode.NONE,
    render_pb2.CONSISTENCY_MODE_SEED_LOCK: ConsistencyMode.SEED_LOCK,
    render_pb2.CONSISTENCY_MODE_CONSISTENT_SELF_ATTENTION: (
        ConsistencyMode.CONSISTENT_SELF_ATTENTION
    ),
    render_pb2.CONSISTENCY_MODE_REFERENCE_IMAGES: ConsistencyMode.REFERENCE_IMAGES,
}
_ASPECT = {
    render_pb2.ASPECT_RATIO_UNSPECIFIED: None,
    render_pb2.ASPECT_RATIO_SQUARE: AspectRatio.SQUARE,
    render_pb2.ASPECT_RATIO_LANDSCAPE_16_9: AspectRatio.LANDSCAPE,
    render_pb2.ASPECT_RATIO_PORTRAIT_9_16: AspectRatio.PORTRAIT,
}


def _enum(value: int, table: dict, field: str, enum: Any) -> Any:
    """Map a proto enum number; unknown numbers (a newer client's) are bad input."""
    try:
        return table[value]
    except KeyError:
        names = ", ".join(enum.Name(number) for number in table)
        raise InvalidInput(f"{field} has unknown value {value}; use one of {names}") from None


def _image_message(image: RenderedImage) -> render_pb2.RenderedImage:
    return render_pb2.RenderedImage(
        index=image.index,
        uri=image.uri,
        seed=image.seed,
        cached=image.cached,
        content_key=image.content_key,
        safety_flagged=image.safety_flagged,
        safety_retries=image.safety_retries,
        reference_uris=list(image.reference_uris),
    )


class RenderServicer(render_pb2_grpc.RenderServiceServicer):
    """RenderService backed by a :class:`SceneRenderer`."""

    def __init__(self, renderer: SceneRenderer) -> None:
        self.renderer = renderer

    async def RenderScenes(
        self, request: render_pb2.RenderScenesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[render_pb2.RenderScenesResponse]:
        """Render every scene, streaming each image's URI as soon as it is stored."""
        consistency = _enum(
            request.consistency, _CONSISTENCY, "consistency", render_pb2.ConsistencyMode
        )
        aspect = _enum(request.aspect_ratio, _ASPECT, "aspect_ratio", render_pb2.AspectRatio)
        scenes = [
            SceneToRender(
                index=scene.index,
                prompt=scene.prompt,
                seed=scene.seed,
                characters=tuple(scene.characters),
            )
            for scene in request.scenes
        ]
        characters = [
            Character(name=c.name, appearance=c.appearance, seed=c.seed) for c in request.characters
        ]
        images = self.renderer.render(
            request.job_id,
            scenes,
            width=request.width,
            height=request.height,
            aspect=aspect,
            steps=request.steps,
            guidance=request.guidance,
            negative_prompt=request.negative_prompt,
            scheduler=request.scheduler,
            characters=characters,
            consistency=consistency,
            consistency_strength=request.consistency_strength,
            job_seed=request.job_seed if request.HasField("job_seed") else None,
            revision=request.revision,
        )
        async for image in images:
            yield render_pb2.RenderScenesResponse(image=_image_message(image))


class DiffusionService(Service):
    """The render service: its servicer, the pipeline it loads and its metrics endpoint."""

    service_names = (render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name,)

    def __init__(self, settings: DiffusionSettings, store: ArtifactStore) -> None:
        self.settings = settings
        self.store = store
        self.renderer = SceneRenderer(settings, store)
        self._metrics_server: Any = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Add the RenderService servicer to ``server``."""
        render_pb2_grpc.add_RenderServiceServicer_to_server(RenderServicer(self.renderer), server)

    async def load(self) -> None:
        """Start the metrics endpoint, check the store, load the model and warm it up."""
        port = self.settings.metrics_port
        if port and self._metrics_server is None:
            from prometheus_client import start_http_server

            self._metrics_server, _ = start_http_server(
                port, addr=self.settings.metrics_host, registry=self.renderer.metrics.registry
            )
            log.info("metrics", extra={"host": self.settings.metrics_host, "port": port})
        await asyncio.to_thread(self.store.check_ready)
        await self.renderer.load()

    async def close(self) -> None:
        """Release the model once in-flight renders have finished; stop the metrics endpoint."""
        await self.renderer.close()
        server, self._metrics_server = self._metrics_server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
