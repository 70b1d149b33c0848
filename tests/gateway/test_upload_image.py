"""UploadImage: characters' reference images, checked before anything is kept.

PNG, JPEG and WebP only, recognised by content; bounded in bytes and in pixels,
the pixels read from the header before anything is decoded (a decompression
bomb costs nothing); decoded once, whole, so a truncated file is refused. A
storyboard character's reference_uri must be one of the caller's image uploads,
and only with the REFERENCE_IMAGES mode.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib
from pathlib import Path

import grpc
import pytest
from PIL import Image, ImageFile
from storyreel_gateway.images import sniff_image
from storyreel_gateway.uploads import upload_kind
from support import ALICE, API_KEYS, BOB, finished_job, upload_audio, upload_requests

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.types.v1 import types_pb2


def _image(fmt: str, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 10)).save(buffer, format=fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(side: int = 10_000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` black pixels that compresses to a few kB."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte, then the packed row
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
        + _chunk(b"IDAT", data)
        + _chunk(b"IEND", b"")
    )


async def _upload(stub, data: bytes, filename: str = "a.png", metadata=ALICE):
    return await stub.UploadImage(
        _image_requests(upload_requests(data, filename)), metadata=metadata
    )


async def _image_requests(audio_requests):
    """upload_requests' stream as UploadImageRequest messages (the same fields)."""
    async for message in audio_requests:
        yield pb.UploadImageRequest.FromString(message.SerializeToString())


def _uploads(store) -> list[str]:
    return [key for key in store.list() if key.startswith("uploads/")]


def _spooled(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"]


@pytest.fixture
def loads(monkeypatch):
    """The size of every image Pillow decodes (ImageFile.load) in this process."""
    seen: list[tuple[int, int]] = []
    real = ImageFile.ImageFile.load

    def load(self):
        seen.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return seen


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp")])
async def test_png_jpeg_and_webp_are_stored_with_their_size(
    start_gateway, file_store, loads, fmt, name
):
    stub = (await start_gateway(api_keys=API_KEYS)).stub
    data = _image(fmt, (40, 30))
    # The name does not matter: the content says what it is.
    response = await _upload(stub, data, filename="picture.txt")
    assert (response.width, response.height, response.format) == (40, 30, name)
    assert response.size_bytes == len(data)
    key = file_store.key_of(response.image_uri)
    assert key.startswith("uploads/") and upload_kind(key) == "image"
    assert file_store.get_bytes(response.image_uri) == data
    assert (40, 30) in loads  # decoded once, whole


async def test_what_is_not_a_whole_supported_image_is_refused_and_nothing_kept(
    start_gateway, file_store, tmp_path
):
    stub = (await start_gateway(api_keys=API_KEYS, max_image_upload_bytes=60_000)).stub
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    png = _image("PNG", (200, 200))
    cases = {
        "text": (b"hello, this is not an image at all", "supported format"),
        "gif": (buffer.getvalue(), "supported format"),
        "a WAV": (open_wav(), "supported format"),
        "truncated png": (png[: len(png) // 2], "cannot be decoded"),
        # Its pixels all there, its last chunks not: decodes, but is not a whole file.
        "png without its end": (png[:-20], "truncated or damaged"),
        "too many bytes": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 70_000, "larger than 60000 bytes"),
        "empty": (b"", "empty"),
    }
    for name, (data, reason) in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _upload(stub, data)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert reason in caught.value.details(), (name, caught.value.details())
        # Pillow's reasons name the file it read: never the gateway's own spool path.
        assert "/" not in caught.value.details(), (name, caught.value.details())
    assert _uploads(file_store) == []
    assert _spooled(tmp_path / "upload-spool") == []
    # The refused uploads left no row behind: the quota of uploads at once is free.
    assert (await _upload(stub, _image("PNG"))).format == "png"


def open_wav() -> bytes:
    from support import wav_bytes

    return wav_bytes(0.1)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
async def test_a_decompression_bomb_is_refused_from_its_header_without_decoding(
    start_gateway, file_store, loads
):
    stub = (await start_gateway(api_keys=API_KEYS)).stub
    bomb = _png_bomb()
    assert len(bomb) < 20_000 and sniff_image(bomb) == "png"
    with Image.open(io.BytesIO(bomb)) as header:
        assert header.size == (10_000, 10_000)  # a real PNG: it would decode to 100 Mpx
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _upload(stub, bomb)
    assert time.perf_counter() - started < 2.0
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "10000x10000 pixels" in caught.value.details()
    assert (10_000, 10_000) not in loads  # never decoded
    assert _uploads(file_store) == []


async def test_the_pixel_bound_is_a_setting(start_gateway):
    stub = (await start_gateway(api_keys=API_KEYS, max_image_pixels=40 * 30)).stub
    assert (await _upload(stub, _image("PNG", (40, 30)))).width == 40
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _upload(stub, _image("PNG", (41, 30)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _board(reference_uri: str) -> types_pb2.Storyboard:
    return types_pb2.Storyboard(
        title="The keeper",
        characters=[
            types_pb2.Character(
                name="Ada", appearance="a keeper in a red coat", reference_uri=reference_uri
            )
        ],
        scenes=[
            types_pb2.Scene(
                index=1,
                narration="Ada climbs the stairs.",
                image_prompt="ink, a keeper in a red coat climbs a spiral stair",
                characters=["Ada"],
            )
        ],
    )


def _request(reference_uri: str, **fields) -> pb.CreateVideoRequest:
    return pb.CreateVideoRequest(
        storyboard=_board(reference_uri),
        consistency=types_pb2.CONSISTENCY_MODE_REFERENCE_IMAGES,
        **fields,
    )


async def test_a_reference_uri_must_be_the_callers_own_image_upload(start_gateway, upstream):
    stub = (await start_gateway(api_keys=API_KEYS)).stub
    mine = (await _upload(stub, _image("PNG"))).image_uri
    bobs = (await _upload(stub, _image("PNG"), metadata=BOB)).image_uri
    audio = (await upload_audio(stub, metadata=ALICE)).audio_uri

    refused = {
        "another tenant's image": (_request(bobs), "is not one of your image uploads"),
        "an audio upload": (_request(audio), "is not one of your image uploads"),
        "not in the store": (_request("file:///etc/passwd"), "is not one of your image uploads"),
        "an unknown upload": (
            _request(mine.rsplit("/", 2)[0] + "/0123/image.png"),
            "is not one of your image uploads",
        ),
        "the default mode": (
            pb.CreateVideoRequest(storyboard=_board(mine)),
            "needs consistency CONSISTENCY_MODE_REFERENCE_IMAGES",
        ),
        "seed lock": (
            pb.CreateVideoRequest(
                storyboard=_board(mine), consistency=types_pb2.CONSISTENCY_MODE_SEED_LOCK
            ),
            "needs consistency CONSISTENCY_MODE_REFERENCE_IMAGES",
        ),
        "an image as audio": (
            pb.CreateVideoRequest(prompt="a lighthouse", audio_uri=mine),
            "does not exist",
        ),
    }
    for name, (request, reason) in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateVideo(request, metadata=ALICE)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert reason in caught.value.details(), (name, caught.value.details())

    job_id = (await stub.CreateVideo(_request(mine, seed=3), metadata=ALICE)).job_id
    job = await finished_job(stub, job_id, metadata=ALICE)
    assert job.state == pb.JOB_STATE_DONE, job.error
    assert job.storyboard.characters[0].reference_uri == mine
    [render] = upstream.render_messages
    assert render.consistency == types_pb2.CONSISTENCY_MODE_REFERENCE_IMAGES
    assert [c.reference_uri for c in render.characters] == [mine]


async def test_the_first_message_must_carry_the_filename(start_gateway):
    stub = (await start_gateway(api_keys=API_KEYS)).stub

    async def chunk_first():
        yield pb.UploadImageRequest(chunk=_image("PNG"))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UploadImage(chunk_first(), metadata=ALICE)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first UploadImage message" in caught.value.details()


async def test_an_edit_naming_another_tenants_image_is_refused_and_changes_nothing(
    start_gateway, upstream
):
    stub = (await start_gateway(api_keys=API_KEYS)).stub
    mine = (await _upload(stub, _image("PNG"))).image_uri
    bobs = (await _upload(stub, _image("PNG"), metadata=BOB)).image_uri
    job_id = (await stub.CreateVideo(_request(mine, review=True), metadata=ALICE)).job_id
    for _ in range(100):
        job = (await stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=ALICE)).job
        if job.state == pb.JOB_STATE_REVIEW:
            break
        await asyncio.sleep(0.05)
    assert job.state == pb.JOB_STATE_REVIEW
    edit = pb.UpdateStoryboardRequest(
        job_id=job_id, storyboard=_board(bobs), version=job.storyboard_version
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdateStoryboard(edit, metadata=ALICE)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not one of your image uploads" in caught.value.details()
    after = (await stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=ALICE)).job
    assert after.storyboard == job.storyboard
    assert after.storyboard_version == job.storyboard_version
