"""The gateway's upstream doubles answer as the real services do.

The compose double reports the frame size of the video it pretends to make; the gateway
passes it on in the job. Here the same ComposeRequests go to the double and to the real
composer (its core behind its own servicer; tiny images, two scenes, half a second of
audio), and both must report the same width, height and frame rate.
"""

from __future__ import annotations

import io

import grpc
import pytest
from PIL import Image
from storyreel_composer.composer import VideoComposer
from storyreel_composer.service import ComposerServicer
from storyreel_composer.settings import ComposerSettings
from storyreel_composer.tts import NarrationSynthesizer
from support import wav_bytes

from storyreel.composer.v1 import composer_pb2, composer_pb2_grpc
from storyreel.types.v1 import types_pb2

JOB = "job-doubles"

#: Frame options of a ComposeRequest, and the size the real composer gives them.
FRAMES = {
    "nothing": ({}, (1280, 720)),
    "width-and-height": ({"width": 320, "height": 240}, (320, 240)),
    "9:16-1080p": (
        {"aspect": types_pb2.ASPECT_9_16, "resolution": types_pb2.RESOLUTION_1080P},
        (1080, 1920),
    ),
    "9:16-only": ({"aspect": types_pb2.ASPECT_9_16}, (720, 1280)),
    "1:1-only": ({"aspect": types_pb2.ASPECT_1_1}, (720, 720)),
    "4:5-1080p": (
        {"aspect": types_pb2.ASPECT_4_5, "resolution": types_pb2.RESOLUTION_1080P},
        (1080, 1350),
    ),
    "21:9-480p": (
        {"aspect": types_pb2.ASPECT_21_9, "resolution": types_pb2.RESOLUTION_480P},
        (1120, 480),
    ),
    "480p-only": ({"resolution": types_pb2.RESOLUTION_480P}, (854, 480)),
    "16:9-1080p-at-12-fps": (
        {
            "aspect": types_pb2.ASPECT_16_9,
            "resolution": types_pb2.RESOLUTION_1080P,
            "fps": 12,
        },
        (1920, 1080),
    ),
}


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
async def real_composer(file_store, tmp_path):
    """The composer core with its default settings behind the composer's own servicer, on a
    plain gRPC server: its address. (No voice is loaded: the requests bring a soundtrack.)"""
    settings = ComposerSettings(port=0, work_dir=tmp_path / "composer-work")
    core = VideoComposer(file_store, NarrationSynthesizer.from_settings(settings), settings)
    server = grpc.aio.server()
    composer_pb2_grpc.add_ComposerServiceServicer_to_server(ComposerServicer(core), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def _compose(address: str, request: composer_pb2.ComposeRequest):
    async with grpc.aio.insecure_channel(address) as channel:
        return await composer_pb2_grpc.ComposerServiceStub(channel).Compose(request, timeout=120)


@pytest.mark.parametrize("case", list(FRAMES))
async def test_the_compose_double_reports_the_frame_the_real_composer_makes(
    case, upstream, file_store, real_composer
):
    fields, expected = FRAMES[case]
    images = [
        file_store.put_bytes(f"jobs/{JOB}/images/scene-{n:03d}.png", _png(colour))
        for n, colour in enumerate([(200, 30, 30), (30, 30, 200)], start=1)
    ]
    audio_uri = file_store.put_bytes("uploads/t/a/audio.wav", wav_bytes(0.5))
    request = composer_pb2.ComposeRequest(
        job_id=JOB,
        scenes=[composer_pb2.Scene(image_uri=uri) for uri in images],
        audio_uri=audio_uri,
        audio_mode=types_pb2.AUDIO_MODE_SOUNDTRACK,
        captions=types_pb2.CAPTIONS_OFF,
        motion=composer_pb2.MOTION_NONE,
        transition=composer_pb2.TRANSITION_CUT,
        **fields,
    )

    real = await _compose(real_composer, request)
    double = await _compose(upstream.address, request)

    assert (real.width, real.height) == expected
    assert (double.width, double.height, double.fps) == (real.width, real.height, real.fps)
