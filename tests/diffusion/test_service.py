"""DiffusionService through a real gRPC server on a real port, driven by the generated stub."""

from __future__ import annotations

import io

import grpc
import pytest
from PIL import Image
from storyreel_diffusion.planning import derive_seed
from storyreel_diffusion.service import DiffusionService
from support import health_status, new_job, rendered_images, stored_uris

from storyreel.channels import open_channel
from storyreel.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from storyreel.serving import create_server
from storyreel.types.v1 import types_pb2

SERVICE_NAME = "storyreel.diffusion.v1.DiffusionService"


def request(**fields) -> diffusion_pb2.RenderScenesRequest:
    scenes = fields.pop(
        "scenes",
        [
            diffusion_pb2.Scene(index=1, prompt="a lighthouse at dusk", seed=11),
            diffusion_pb2.Scene(index=2, prompt="a whale under the moon", seed=22),
        ],
    )
    fields = {"job_id": new_job(), "width": 64, "height": 64, "steps": 2} | fields
    return diffusion_pb2.RenderScenesRequest(scenes=scenes, **fields)


@pytest.fixture(scope="module")
async def server(start_server):
    return await start_server(cache_enabled=True, max_batch_size=2)


async def test_health_is_not_serving_until_the_model_is_loaded(diffusion_settings, file_store):
    service = DiffusionService(diffusion_settings, file_store)
    running = await create_server(diffusion_settings, service)
    address = f"127.0.0.1:{running.port}"
    try:
        assert await health_status(address) == "NOT_SERVING"
        assert await health_status(address, SERVICE_NAME) == "NOT_SERVING"
        async with open_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await rendered_images(diffusion_pb2_grpc.DiffusionServiceStub(channel), request())
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stored_uris(file_store) == []

        await service.load()
        await running.set_serving(True)
        assert await health_status(address) == "SERVING"
        assert await health_status(address, SERVICE_NAME) == "SERVING"
    finally:
        await running.stop(0)


async def test_stream_returns_one_stored_image_per_scene(stub, shared_store):
    req = request(width=96, height=64)
    images = await rendered_images(stub, req)
    assert [(image.index, image.seed) for image in images] == [(1, 11), (2, 22)]
    for image in images:
        assert image.uri == shared_store.uri_for(
            f"jobs/{req.job_id}/images/scene-{image.index:03d}.png"
        )
        assert shared_store.exists(image.uri)
        assert Image.open(io.BytesIO(shared_store.get_bytes(image.uri))).size == (96, 64)


async def test_repeated_request_gives_identical_images_from_the_cache(stub, shared_store):
    req = request(scenes=[diffusion_pb2.Scene(index=1, prompt=f"a tide {new_job()}", seed=4)])
    first = await rendered_images(stub, req)
    second = await rendered_images(stub, req)
    assert [image.cached for image in first + second] == [False, True]
    assert shared_store.get_bytes(first[0].uri) == shared_store.get_bytes(second[0].uri)
    assert first[0].content_key == second[0].content_key != ""


async def test_a_later_revision_stores_new_uris_and_leaves_the_first_readable(stub, shared_store):
    job = new_job()
    prompt = f"a harbour at dawn {job}"  # no other request draws it: a cache miss at first
    scenes = [
        diffusion_pb2.Scene(index=1, prompt=prompt, seed=11),
        diffusion_pb2.Scene(index=2, prompt=f"a gull {job}", seed=22),
    ]
    first = await rendered_images(stub, request(job_id=job, scenes=scenes))
    assert [image.uri for image in first] == [
        shared_store.uri_for(f"jobs/{job}/images/scene-00{n}.png") for n in (1, 2)
    ]
    before = [shared_store.get_bytes(image.uri) for image in first]

    # The second run draws scene 1 again with another seed, as a regenerated scene is.
    redrawn = [diffusion_pb2.Scene(index=1, prompt=prompt, seed=12), scenes[1]]
    second = await rendered_images(stub, request(job_id=job, scenes=redrawn, revision=2))
    assert [image.uri for image in second] == [
        shared_store.uri_for(f"jobs/{job}/r2/images/scene-00{n}.png") for n in (1, 2)
    ]
    # Scene 2's pixels do not depend on the revision: a cache hit, copied under r2.
    assert [image.cached for image in second] == [False, True]
    assert second[1].content_key == first[1].content_key
    assert shared_store.get_bytes(second[1].uri) == before[1]
    assert shared_store.get_bytes(second[0].uri) != before[0]
    # The first run's images are still there, byte for byte.
    assert [shared_store.get_bytes(image.uri) for image in first] == before
    assert sorted(shared_store.list(f"jobs/{job}/")) == sorted(
        image.uri for image in first + second
    )


MIRA = diffusion_pb2.Character(name="Mira", appearance="a girl with red braids", seed=77)


async def test_characters_and_seed_lock_travel_through_grpc(stub):
    scenes = [
        diffusion_pb2.Scene(index=1, prompt="Mira on a cliff", characters=["Mira"]),
        diffusion_pb2.Scene(index=2, prompt="Mira at sea", characters=["Mira"]),
        diffusion_pb2.Scene(index=3, prompt="an empty beach"),
    ]

    async def seeds(consistency: int) -> list[int]:
        req = request(scenes=scenes, characters=[MIRA], consistency=consistency, job_seed=5)
        return [image.seed for image in await rendered_images(stub, req)]

    assert await seeds(types_pb2.CONSISTENCY_MODE_SEED_LOCK) == [77, 77, derive_seed(5, 3)]
    assert await seeds(types_pb2.CONSISTENCY_MODE_NONE) == [derive_seed(5, i) for i in (1, 2, 3)]


async def test_aspect_ratio_sets_the_frame(stub, shared_store):
    [image] = await rendered_images(
        stub,
        request(
            width=0,
            height=0,
            aspect=types_pb2.ASPECT_16_9,
            scenes=[diffusion_pb2.Scene(index=1, prompt="a road", seed=1)],
        ),
    )
    picture = Image.open(io.BytesIO(shared_store.get_bytes(image.uri)))
    assert picture.size == (112, 64)  # about the 64x80 default area, at least 64 px a side


async def test_reference_images_without_an_adapter_is_failed_precondition(stub, shared_store):
    before = stored_uris(shared_store)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await rendered_images(
            stub, request(consistency=types_pb2.CONSISTENCY_MODE_REFERENCE_IMAGES)
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "IP-Adapter" in raised.value.details()
    assert stored_uris(shared_store) == before


async def test_zero_size_and_steps_select_the_service_defaults(
    stub, shared_store, diffusion_settings
):
    [image] = await rendered_images(
        stub,
        request(
            width=0,
            height=0,
            steps=0,
            scenes=[diffusion_pb2.Scene(index=1, prompt="a fox", seed=1)],
        ),
    )
    picture = Image.open(io.BytesIO(shared_store.get_bytes(image.uri)))
    assert picture.size == (diffusion_settings.default_width, diffusion_settings.default_height)


INVALID = {
    "width not a multiple of 8": (dict(width=100), "width must be a multiple of 8"),
    "size above 4096": (dict(height=4104), "between 64 and 4096 pixels"),
    "negative steps": (dict(steps=-1), "steps must be between 1 and 150"),
    "steps above the maximum": (dict(steps=151), "steps must be between 1 and 150"),
    "empty prompt": (
        dict(
            scenes=[
                diffusion_pb2.Scene(index=1, prompt="a cliff", seed=1),
                diffusion_pb2.Scene(index=2, prompt="", seed=2),
            ]
        ),
        "(index 2): prompt must not be empty",
    ),
    "no scenes": (dict(scenes=[]), "scenes must hold 1 to"),
    "bad job id": (dict(job_id="../../etc"), "job_id must be"),
    "guidance above the maximum": (dict(guidance=31.0), "guidance must be above 0 and at most 30"),
    "unknown consistency mode": (
        dict(consistency=99),
        "consistency has no value 99; known values: none, seed_lock",
    ),
    "unknown aspect ratio": (dict(aspect=7), "aspect has no value 7; known values: 16:9"),
    "unknown scene character": (
        dict(scenes=[diffusion_pb2.Scene(index=1, prompt="a", seed=1, characters=["Bob"])]),
        "character 'Bob' is not in the request's characters",
    ),
    "unknown scheduler": (dict(scheduler="magic"), "scheduler must be one of"),
    "revision of 2**31": (
        dict(revision=2**31),
        "revision must be a whole number from 0 to 2**31-1, got 2147483648",
    ),
    "largest uint32 revision": (
        dict(revision=2**32 - 1),
        "revision must be a whole number from 0 to 2**31-1, got 4294967295",
    ),
}


@pytest.mark.parametrize("case", INVALID.values(), ids=INVALID.keys())
async def test_invalid_request_is_invalid_argument_and_stores_nothing(stub, shared_store, case):
    fields, message = case
    before = stored_uris(shared_store)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await rendered_images(stub, request(**fields))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
    assert stored_uris(shared_store) == before


@pytest.fixture(scope="module")
async def adapter_server(start_server, ip_adapter_settings):
    """A render server with the tiny IP-Adapter and the cache on."""
    return await start_server(**ip_adapter_settings, cache_enabled=True, max_batch_size=2)


async def test_a_later_revision_stores_its_reference_portraits_under_its_own_folder(
    adapter_server, shared_store
):
    job = new_job()
    mira = diffusion_pb2.Character(name="Mira", appearance=f"a girl with red braids {job}", seed=77)
    scenes = [diffusion_pb2.Scene(index=1, prompt="Mira on a cliff", seed=1, characters=["Mira"])]

    def run(character, revision):
        return request(
            job_id=job,
            scenes=scenes,
            characters=[character],
            consistency=types_pb2.CONSISTENCY_MODE_REFERENCE_IMAGES,
            revision=revision,
        )

    async with open_channel(f"127.0.0.1:{adapter_server.port}") as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        [first] = await rendered_images(stub, run(mira, 0))
        [portrait_uri] = first.reference_uris
        assert portrait_uri == shared_store.uri_for(f"jobs/{job}/characters/01-mira.png")
        portrait, scene = shared_store.get_bytes(portrait_uri), shared_store.get_bytes(first.uri)

        # The same request as run 3: everything from the cache, copied under r3.
        [again] = await rendered_images(stub, run(mira, 3))
        assert again.cached
        assert again.uri == shared_store.uri_for(f"jobs/{job}/r3/images/scene-001.png")
        assert list(again.reference_uris) == [
            shared_store.uri_for(f"jobs/{job}/r3/characters/01-mira.png")
        ]
        assert shared_store.get_bytes(again.reference_uris[0]) == portrait

        # Run 4 gives Mira another portrait: drawn afresh, stored under r4 only.
        other = diffusion_pb2.Character(name="Mira", appearance=mira.appearance, seed=78)
        [redrawn] = await rendered_images(stub, run(other, 4))
        assert not redrawn.cached
        assert list(redrawn.reference_uris) == [
            shared_store.uri_for(f"jobs/{job}/r4/characters/01-mira.png")
        ]
        assert shared_store.get_bytes(redrawn.reference_uris[0]) != portrait

    # Run 0's portrait and scene are untouched.
    assert shared_store.get_bytes(portrait_uri) == portrait
    assert shared_store.get_bytes(first.uri) == scene


async def test_a_reference_uri_travels_through_grpc_and_a_missing_one_is_not_found(
    adapter_server, shared_store
):
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (30, 120, 200)).save(buffer, format="WEBP")
    uploaded = shared_store.put_bytes(f"uploads/t3st/{new_job()}/image.webp", buffer.getvalue())
    scenes = [diffusion_pb2.Scene(index=1, prompt="Mira on a cliff", seed=1, characters=["Mira"])]

    def run(reference_uri: str, consistency=types_pb2.CONSISTENCY_MODE_REFERENCE_IMAGES):
        mira = diffusion_pb2.Character(
            name="Mira", appearance="a girl", seed=77, reference_uri=reference_uri
        )
        return request(job_id=new_job(), scenes=scenes, characters=[mira], consistency=consistency)

    async with open_channel(f"127.0.0.1:{adapter_server.port}") as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        [image] = await rendered_images(stub, run(uploaded))
        assert list(image.reference_uris) == [uploaded]
        refusals = [
            (run(shared_store.uri_for("uploads/t3st/gone/image.png")), "NOT_FOUND"),
            (run(image.uri), "INVALID_ARGUMENT"),  # another job's image
            (run(uploaded, types_pb2.CONSISTENCY_MODE_SEED_LOCK), "INVALID_ARGUMENT"),
        ]
        for message, code in refusals:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await rendered_images(stub, message)
            assert raised.value.code().name == code, raised.value.details()
