"""gRPC side of the diffusion service: storyreel.diffusion.v1.DiffusionService.

The servicer only converts messages to and from the core's domain objects (an
enum number it does not know is INVALID_ARGUMENT already there). Every other
check of a request, its defaults, seeds and content keys are
:func:`storyreel_diffusion.planning.plan_render`'s; the model, queue, drawing,
cache and storage are :mod:`storyreel_diffusion.renderer`'s. Domain errors
become status codes in the shared interceptor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from storyreel.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from storyreel.options import ASPECTS, CONSISTENCY, from_enum
from storyreel.serving import Service
from storyreel.storage import ArtifactStore
from storyreel.storyboard import scene_image_fields
from storyreel_diffusion.planning import CastMember, Scene
from storyreel_diffusion.renderer import SceneRenderer
from storyreel_diffusion.settings import DiffusionSettings

log = logging.getLogger(__name__)


class DiffusionServicer(diffusion_pb2_grpc.DiffusionServiceServicer):
    """DiffusionService backed by a :class:`SceneRenderer`."""

    def __init__(self, renderer: SceneRenderer) -> None:
        self.renderer = renderer

    async def RenderScenes(
        self, request: diffusion_pb2.RenderScenesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[diffusion_pb2.RenderScenesResponse]:
        """Render every scene, streaming each image's URI as soon as it is stored."""
        consistency = from_enum(CONSISTENCY, request.consistency, "consistency")
        aspect = from_enum(ASPECTS, request.aspect, "aspect")
        scenes = [
            Scene(
                index=scene.index,
                prompt=scene.prompt,
                seed=scene.seed,
                characters=tuple(scene.characters),
            )
            for scene in request.scenes
        ]
        characters = [
            CastMember(
                name=c.name, appearance=c.appearance, seed=c.seed, reference_uri=c.reference_uri
            )
            for c in request.characters
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
            yield diffusion_pb2.RenderScenesResponse(
                image=diffusion_pb2.SceneImage(**scene_image_fields(image))
            )


class DiffusionService(Service):
    """The diffusion service: its servicer, the pipeline it loads and its metrics endpoint."""

    service_names = (diffusion_pb2.DESCRIPTOR.services_by_name["DiffusionService"].full_name,)

    def __init__(self, settings: DiffusionSettings, store: ArtifactStore) -> None:
        self.settings = settings
        self.store = store
        self.renderer = SceneRenderer(settings, store)
        self._metrics_server: Any = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Add the DiffusionService servicer to ``server``."""
        diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(
            DiffusionServicer(self.renderer), server
        )

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
