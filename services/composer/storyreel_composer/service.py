"""gRPC side of the composer: storyreel.composer.v1.ComposerService.

The servicer only converts messages to and from the core's domain objects (the
options through the shared :func:`storyreel.compose_options.options_from_request`,
which refuses an enum number it does not know with INVALID_ARGUMENT). Every
other check (:meth:`storyreel_composer.composer.VideoComposer.check_request`),
narration, the render (one ffmpeg filtergraph, :mod:`storyreel_composer.filtergraph`)
and storage are run by :mod:`storyreel_composer.composer`. Domain errors it
raises become status codes in the shared interceptor.
"""

from __future__ import annotations

import asyncio

import grpc

from storyreel.compose_options import options_from_request
from storyreel.composer.v1 import composer_pb2, composer_pb2_grpc
from storyreel.serving import Service
from storyreel.storage import ArtifactStore
from storyreel_composer.composer import Scene, VideoComposer
from storyreel_composer.settings import ComposerSettings
from storyreel_composer.tts import NarrationSynthesizer


class ComposerServicer(composer_pb2_grpc.ComposerServiceServicer):
    """ComposerService backed by a :class:`VideoComposer`."""

    def __init__(self, composer: VideoComposer) -> None:
        self.composer = composer

    async def Compose(
        self, request: composer_pb2.ComposeRequest, context: grpc.aio.ServicerContext
    ) -> composer_pb2.ComposeResponse:
        """Compose the video of the request's scenes and return where it is stored.

        Only the job's own images and an upload are read (checked before anything is).
        """
        scenes = [Scene(scene.image_uri, scene.narration) for scene in request.scenes]
        self.composer.check_job_inputs(request.job_id, scenes, request.audio_uri or None)
        result = await self.composer.compose(
            request.job_id,
            scenes,
            request.audio_uri or None,
            fps=request.fps,
            width=request.width,
            height=request.height,
            options=options_from_request(request),
            revision=request.revision,
        )
        return composer_pb2.ComposeResponse(
            video_uri=result.video_uri,
            duration_s=result.duration_s,
            scene_starts_s=result.scene_starts_s,
            captions_srt_uri=result.captions_srt_uri,
            captions_vtt_uri=result.captions_vtt_uri,
            poster_uri=result.poster_uri,
            contact_sheet_uri=result.contact_sheet_uri,
            width=result.width,
            height=result.height,
            fps=result.fps,
            narration_synthesized=result.narration_synthesized,
            narration_cached=result.narration_cached,
            warnings=result.warnings,
        )

    async def ListVoices(
        self, request: composer_pb2.ListVoicesRequest, context: grpc.aio.ServicerContext
    ) -> composer_pb2.ListVoicesResponse:
        """The voices a ComposeRequest may name, and the default one."""
        catalog = self.composer.voices()
        return composer_pb2.ListVoicesResponse(
            voices=[
                composer_pb2.Voice(name=v.name, language=v.language, sample_rate=v.sample_rate)
                for v in catalog.voices
            ],
            default_voice=catalog.default_voice,
        )

    async def ProbeAudio(
        self, request: composer_pb2.ProbeAudioRequest, context: grpc.aio.ServicerContext
    ) -> composer_pb2.ProbeAudioResponse:
        """Check an upload as Compose would check it as audio_uri; what it holds."""
        facts = await self.composer.probe_audio(request.uri)
        return composer_pb2.ProbeAudioResponse(
            duration_s=facts.duration_s,
            codec=facts.codec,
            sample_rate=facts.sample_rate,
            channels=facts.channels,
            format=facts.format,
        )


class ComposerService(Service):
    """The composer service: its servicer plus the narration voices it loads."""

    service_names = (composer_pb2.DESCRIPTOR.services_by_name["ComposerService"].full_name,)

    def __init__(self, settings: ComposerSettings, store: ArtifactStore) -> None:
        self.store = store
        self.synthesizer = NarrationSynthesizer.from_settings(settings)
        self.composer = VideoComposer(store, self.synthesizer, settings)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Add the ComposerService servicer to ``server``."""
        composer_pb2_grpc.add_ComposerServiceServicer_to_server(
            ComposerServicer(self.composer), server
        )

    async def load(self) -> None:
        """Check the artifact store, then load the piper voices."""
        await asyncio.to_thread(self.store.check_ready)
        await asyncio.to_thread(self.synthesizer.load)

    async def close(self) -> None:
        """Drop the voices once in-flight compositions have finished."""
        self.synthesizer.close()
