"""gRPC side of the composer: storyreel.compose.v1.ComposeService.

The servicer only converts messages to and from the core's domain objects;
validation, narration, encoding and storage live in
:mod:`storyreel_composer.composer`. Domain errors it raises become status codes
in the shared interceptor.
"""

from __future__ import annotations

import asyncio

import grpc

from storyreel.compose.v1 import compose_pb2, compose_pb2_grpc
from storyreel.serving import Service
from storyreel.storage import ArtifactStore
from storyreel_composer.composer import SceneInput, VideoComposer
from storyreel_composer.settings import ComposerSettings
from storyreel_composer.tts import NarrationSynthesizer


class ComposeServicer(compose_pb2_grpc.ComposeServiceServicer):
    """ComposeService backed by a :class:`VideoComposer`."""

    def __init__(self, composer: VideoComposer) -> None:
        self.composer = composer

    async def Compose(
        self, request: compose_pb2.ComposeRequest, context: grpc.aio.ServicerContext
    ) -> compose_pb2.ComposeResponse:
        """Compose the video of the request's scenes and return where it is stored."""
        result = await self.composer.compose(
            request.job_id,
            [SceneInput(scene.image_uri, scene.narration) for scene in request.scenes],
            request.audio_uri or None,
            fps=request.fps,
            width=request.width,
            height=request.height,
        )
        return compose_pb2.ComposeResponse(
            video_uri=result.video_uri,
            duration_s=result.duration_s,
            scene_starts_s=result.scene_starts_s,
        )


class ComposerService(Service):
    """The composer service: its servicer plus the narration voice it loads."""

    service_names = (compose_pb2.DESCRIPTOR.services_by_name["ComposeService"].full_name,)

    def __init__(self, settings: ComposerSettings, store: ArtifactStore) -> None:
        self.store = store
        self.synthesizer = NarrationSynthesizer(
            settings.voice_model_path, settings.voice_config_path
        )
        self.composer = VideoComposer(store, self.synthesizer, settings)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Add the ComposeService servicer to ``server``."""
        compose_pb2_grpc.add_ComposeServiceServicer_to_server(
            ComposeServicer(self.composer), server
        )

    async def load(self) -> None:
        """Check the artifact store, then load the piper voice."""
        await asyncio.to_thread(self.store.check_ready)
        await asyncio.to_thread(self.synthesizer.load)

    async def close(self) -> None:
        """Drop the voice once in-flight compositions have finished."""
        self.synthesizer.close()
