"""The diffusion service answers only callers that present the deployment's internal token.

Finding 2 of issue 11: a direct RenderScenes call from loopback overwrote another
tenant's scene image. RenderScenes reads no object a request names (its only input
from the store is its own content-addressed cache); what it writes is under the
request's job, so the token is what keeps a stranger from naming someone else's job.
A real DiffusionService on a real port; no model is loaded (the refusal comes first).
"""

from __future__ import annotations

import grpc
import pytest
from storyreel_diffusion.service import DiffusionService
from support import health_status, stored_uris

from storyreel.channels import open_channel
from storyreel.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from storyreel.serving import create_server
from storyreel.settings import InternalSettings

TOKEN = "render-internal-token-0123456789"
VICTIM = "job-of-another-tenant"


@pytest.fixture
async def server(diffusion_settings, file_store, monkeypatch):
    monkeypatch.setenv("STORYREEL_INTERNAL_TOKEN", TOKEN)
    running = await create_server(
        diffusion_settings, DiffusionService(diffusion_settings, file_store)
    )
    yield running
    await running.stop(0)


def overwrite() -> diffusion_pb2.RenderScenesRequest:
    """Draw scene 1 of someone else's job again: it would replace their image."""
    return diffusion_pb2.RenderScenesRequest(
        job_id=VICTIM,
        scenes=[diffusion_pb2.Scene(index=1, prompt="something else entirely", seed=1)],
        width=64,
        height=64,
        steps=1,
    )


async def test_a_direct_render_call_without_the_token_is_unauthenticated(server, file_store):
    victim = file_store.put_bytes(f"jobs/{VICTIM}/images/scene-001.png", b"their image")
    address = f"127.0.0.1:{server.port}"
    for metadata in ((), (("authorization", "Bearer a-guess-at-the-internal-token"),)):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.RenderScenes(overwrite(), metadata=metadata, timeout=60):
                    pass
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert file_store.get_bytes(victim) == b"their image"
    assert stored_uris(file_store) == [victim]
    # Probes still get their answer without the token.
    assert await health_status(address) == "NOT_SERVING"


async def test_the_gateways_channel_gets_through(server):
    internal = InternalSettings(token=TOKEN)
    address = f"127.0.0.1:{server.port}"
    async with open_channel(address, internal=internal) as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.RenderScenes(overwrite(), timeout=60):
                pass
    # Past the token: the renderer itself answers (its model is not loaded here).
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not loaded" in caught.value.details()
