"""gRPC side of the composer: storyreel.compose.v1.ComposeService.

The servicer only converts messages to and from the core's domain objects;
validation, narration, rendering and storage live in
:mod:`storyreel_composer.composer`. Domain errors it raises become status codes
in the shared interceptor.
"""

from __future__ import annotations

import asyncio

import grpc

from storyreel.compose.v1 import compose_pb2, compose_pb2_grpc
from storyreel.serving import Service
from storyreel.storage import ArtifactStore
from storyreel_composer.composer import ComposeOptions, SceneInput, VideoComposer
from storyreel_composer.settings import ComposerSettings
from storyreel_composer.tts import NarrationSynthesizer

# Proto enum values to the core's names; the zero (UNSPECIFIED) value maps to
# None, which selects the service default.
_ASPECTS = {
    compose_pb2.ASPECT_16_9: "16:9",
    compose_pb2.ASPECT_9_16: "9:16",
    compose_pb2.ASPECT_1_1: "1:1",
}
_RESOLUTIONS = {
    compose_pb2.RESOLUTION_480P: "480p",
    compose_pb2.RESOLUTION_720P: "720p",
    compose_pb2.RESOLUTION_1080P: "1080p",
}
_FITS = {compose_pb2.FIT_COVER: "cover", compose_pb2.FIT_BLUR: "blur"}
_TRANSITIONS = {
    compose_pb2.TRANSITION_CROSSFADE: "crossfade",
    compose_pb2.TRANSITION_CUT: "cut",
}
_MOTIONS = {compose_pb2.MOTION_KEN_BURNS: "ken_burns", compose_pb2.MOTION_NONE: "none"}
_CAPTIONS = {
    compose_pb2.CAPTIONS_BURNED: "burned",
    compose_pb2.CAPTIONS_SIDECAR: "sidecar",
    compose_pb2.CAPTIONS_OFF: "off",
}
_AUDIO_MODES = {
    compose_pb2.AUDIO_MODE_NARRATION: "narration",
    compose_pb2.AUDIO_MODE_SOUNDTRACK: "soundtrack",
    compose_pb2.AUDIO_MODE_MUSIC: "music",
}


def options_of(request: compose_pb2.ComposeRequest) -> ComposeOptions:
    """The core's options of a request (unknown enum numbers select the default)."""
    return ComposeOptions(
        aspect=_ASPECTS.get(request.aspect),
        resolution=_RESOLUTIONS.get(request.resolution),
        fit=_FITS.get(request.fit),
        transition=_TRANSITIONS.get(request.transition),
        crossfade_s=request.crossfade_s,
        motion=_MOTIONS.get(request.motion),
        seed=request.seed,
        captions=_CAPTIONS.get(request.captions),
        audio_mode=_AUDIO_MODES.get(request.audio_mode),
        voice=request.voice,
        speaking_rate=request.speaking_rate,
    )


class ComposeServicer(compose_pb2_grpc.ComposeServiceServicer):
    """ComposeService backed by a :class:`VideoComposer`."""

    def __init__(self, composer: VideoComposer) -> None:
        self.composer = composer

    async def Compose(
        self, request: compose_pb2.ComposeRequest, context: grpc.aio.ServicerContext
    ) -> compose_pb2.ComposeResponse:
        """Compose the video of the request's scenes and return where it is stored.

        Only the job's own images and an upload are read (checked before anything is).
        """
        scenes = [SceneInput(scene.image_uri, scene.narration) for scene in request.scenes]
        self.composer.check_job_inputs(request.job_id, scenes, request.audio_uri or None)
        result = await self.composer.compose(
            request.job_id,
            scenes,
            request.audio_uri or None,
            fps=request.fps,
            width=request.width,
            height=request.height,
            options=options_of(request),
            revision=request.revision,
        )
        return compose_pb2.ComposeResponse(
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
        )

    async def ListVoices(
        self, request: compose_pb2.ListVoicesRequest, context: grpc.aio.ServicerContext
    ) -> compose_pb2.ListVoicesResponse:
        """The voices a ComposeRequest may name, and the default one."""
        catalog = self.composer.voices()
        return compose_pb2.ListVoicesResponse(
            voices=[
                compose_pb2.Voice(name=v.name, language=v.language, sample_rate=v.sample_rate)
                for v in catalog.voices
            ],
            default_voice=catalog.default_voice,
        )

    async def ProbeAudio(
        self, request: compose_pb2.ProbeAudioRequest, context: grpc.aio.ServicerContext
    ) -> compose_pb2.ProbeAudioResponse:
        """Check an upload as Compose would check it as audio_uri; what it holds."""
        facts = await self.composer.probe_audio(request.uri)
        return compose_pb2.ProbeAudioResponse(
            duration_s=facts.duration_s,
            codec=facts.codec,
            sample_rate=facts.sample_rate,
            channels=facts.channels,
            format=facts.format,
        )


class ComposerService(Service):
    """The composer service: its servicer plus the narration voices it loads."""

    service_names = (compose_pb2.DESCRIPTOR.services_by_name["ComposeService"].full_name,)

    def __init__(self, settings: ComposerSettings, store: ArtifactStore) -> None:
        self.store = store
        self.synthesizer = NarrationSynthesizer.from_settings(settings)
        self.composer = VideoComposer(store, self.synthesizer, settings)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Add the ComposeService servicer to ``server``."""
        compose_pb2_grpc.add_ComposeServiceServicer_to_server(
            ComposeServicer(self.composer), server
        )

    async def load(self) -> None:
        """Check the artifact store, then load the piper voices."""
        await asyncio.to_thread(self.store.check_ready)
        await asyncio.to_thread(self.synthesizer.load)

    async def close(self) -> None:
        """Drop the voices once in-flight compositions have finished."""
        self.synthesizer.close()
