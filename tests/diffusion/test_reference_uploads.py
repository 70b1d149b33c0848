"""REFERENCE_IMAGES with a character's uploaded image (CastMember.reference_uri).

On the tiny model with the tiny IP-Adapter: the uploaded image conditions the
character's scenes instead of a drawn portrait, its content is part of the
content key, and only the store's uploads/ folder is ever read.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from storyreel_diffusion.renderer import CastMember, Scene, SceneRenderer
from support import image_pixels, new_job

from storyreel.errors import InvalidInput, NotFound

SCENE = [Scene(1, "Mira on a cliff", 1, ("Mira",))]


@pytest.fixture(scope="module")
async def adapter(diffusion_settings, ip_adapter_settings, shared_store):
    """A renderer with the tiny IP-Adapter and the cache, 64 px images in 2 steps."""
    settings = diffusion_settings.model_copy(
        update={**ip_adapter_settings, "default_height": 64, "cache_enabled": True}
    )
    renderer = SceneRenderer(settings, shared_store)
    await renderer.load()
    yield renderer
    await renderer.close()


def upload(store, color: tuple[int, int, int], fmt: str = "PNG", size=(96, 80)) -> str:
    """Store an image as the gateway's UploadImage does (under uploads/)."""
    buffer = io.BytesIO()
    image = Image.new("RGB", size, color)
    # Some structure, so that the encoder sees more than a flat colour.
    image.paste((255 - color[0], color[1] // 2, 40), (10, 10, 50, 40))
    image.save(buffer, format=fmt)
    ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    return store.put_bytes(f"uploads/t3st/{new_job()}/image.{ext}", buffer.getvalue())


async def render(renderer, characters, scenes=SCENE, **options):
    job = new_job()
    return [
        image
        async for image in renderer.render(
            job, scenes, characters=characters, consistency="reference_images", **options
        )
    ]


def distance(store, a, b) -> float:
    return float(np.abs(image_pixels(store, a) - image_pixels(store, b)).mean())


async def test_an_uploaded_image_conditions_the_scene_instead_of_a_portrait(
    adapter, shared_store, record_calls
):
    red = upload(shared_store, (200, 30, 30))
    blue = upload(shared_store, (20, 40, 220), fmt="JPEG")
    recorder = record_calls(adapter)
    [with_red] = await render(adapter, [CastMember("Mira", "a girl", 7, reference_uri=red)])
    [with_blue] = await render(adapter, [CastMember("Mira", "a girl", 7, reference_uri=blue)])
    # One pipeline call per scene, none for a portrait.
    assert recorder.calls == [["Mira on a cliff, Mira, a girl"]] * 2
    assert with_red.reference_uris == (red,) and with_blue.reference_uris == (blue,)
    assert with_red.content_key != with_blue.content_key
    assert distance(shared_store, with_red, with_blue) > 0.1

    # The drawn portrait's scene differs again, and draws the portrait.
    [drawn] = await render(adapter, [CastMember("Mira", "a girl", 7)])
    assert drawn.reference_uris[0].endswith("/characters/01-mira.png")
    assert drawn.content_key not in (with_red.content_key, with_blue.content_key)
    assert len(recorder.calls) == 4  # the portrait, then the scene


async def test_the_same_image_bytes_hit_the_cache_under_another_uri(adapter, shared_store):
    first = upload(shared_store, (10, 150, 60))
    again = upload(shared_store, (10, 150, 60))  # same bytes, another upload
    [a] = await render(adapter, [CastMember("Mira", "a girl", 7, reference_uri=first)])
    [b] = await render(adapter, [CastMember("Mira", "a girl", 7, reference_uri=again)])
    assert a.content_key == b.content_key and b.cached
    assert b.reference_uris == (again,)


async def test_only_uploads_of_this_store_are_read(adapter, shared_store):
    [other_jobs_image] = await render(adapter, [CastMember("Mira", "a girl", 7)])
    for uri in (
        other_jobs_image.uri,  # another job's artifact
        other_jobs_image.reference_uris[0],
        "file:///etc/passwd",
        shared_store.uri_for("uploads/x") + "/../../jobs/a/b.png",
    ):
        with pytest.raises(InvalidInput):
            await render(adapter, [CastMember("Mira", "a girl", 7, reference_uri=uri)])
    with pytest.raises(NotFound, match="not stored"):
        missing = shared_store.uri_for("uploads/t3st/gone/image.png")
        await render(adapter, [CastMember("Mira", "a girl", 7, reference_uri=missing)])


async def test_a_reference_that_is_not_a_whole_image_is_refused(adapter, shared_store):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    truncated = shared_store.put_bytes("uploads/t3st/cut/image.png", buffer.getvalue()[:60])
    text = shared_store.put_bytes("uploads/t3st/txt/image.png", b"hello, not an image")
    for uri in (truncated, text):
        with pytest.raises(InvalidInput, match="not a decodable"):
            await render(adapter, [CastMember("Mira", "a girl", 7, reference_uri=uri)])


async def test_a_reference_needs_the_reference_images_mode(adapter, shared_store):
    red = upload(shared_store, (200, 30, 30))
    job = new_job()
    for mode in ("seed_lock", "consistent_self_attention", "none"):
        with pytest.raises(InvalidInput, match="reference_uri needs consistency"):
            async for _ in adapter.render(
                job,
                SCENE,
                characters=[CastMember("Mira", "a girl", 7, reference_uri=red)],
                consistency=mode,
            ):
                pass
