"""Helpers for tests (importable as `support` from any test module)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from storyreel.storage import ArtifactStore


def stored_uris(store: ArtifactStore) -> list[str]:
    """Every artifact in ``store``; used to prove that a rejected request wrote nothing."""
    return list(store.list())


async def health_status(address: str, service: str = "") -> str:
    """The grpc.health.v1 status name the server at ``address`` reports."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
