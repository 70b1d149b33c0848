"""gRPC side of the render service: storyreel.render.v1.RenderService.

The servicer only converts messages to and from the core's domain objects;
validation, rendering and storage live in :mod:`storyreel_diffusion.renderer`.
Domain errors it raises become status codes in the shared interceptor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from storyreel.render.v1 import render_pb2, render_pb2_grpc
from storyreel.serving import Service
from storyreel.storage import ArtifactStore
from storyreel_diffusion.renderer import SceneRenderer, SceneToRender
from storyreel_diffusion.settings import DiffusionSettings


class RenderServicer(render_pb2_grpc.RenderServiceServicer):
    """RenderService backed by a :class:`SceneRenderer`."""

    def __init__(self, renderer: SceneRenderer) -> None:
        self.renderer = renderer

    async def RenderScenes(
        self, request: render_pb2.RenderScenesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[render_pb2.RenderScenesResponse]:
        """Render every scene, streaming each image's URI as soon as it is stored."""
        scenes = [
            SceneToRender(index=scene.index, prompt=scene.prompt, seed=scene.seed)
            for scene in request.scenes
        ]
        images = self.renderer.render(
            request.job_id,
            scenes,
            width=request.width,
            height=request.height,
            steps=request.steps,
            guidance=request.guidance,
            negative_prompt=request.negative_prompt,
        )
        async for image in images:
            yield render_pb2.RenderScenesResponse(
                image=render_pb2.RenderedImage(index=image.index, uri=image.uri, seed=image.seed)
            )


class DiffusionService(Service):
    """The render service: its servicer plus the diffusion pipeline it loads."""

    service_names = (render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name,)

    def __init__(self, settings: DiffusionSettings, store: ArtifactStore) -> None:
        self.store = store
        self.renderer = SceneRenderer(settings, store)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Add the RenderService servicer to ``server``."""
        render_pb2_grpc.add_RenderServiceServicer_to_server(RenderServicer(self.renderer), server)

    async def load(self) -> None:
        """Check the artifact store, then load the model and run its warm-up render."""
        await asyncio.to_thread(self.store.check_ready)
        await self.renderer.load()

    async def close(self) -> None:
        """Release the model once in-flight renders have finished."""
        await self.renderer.close()
