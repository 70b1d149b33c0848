"""Client channels to storyreel services, with retries on transient failures."""

from __future__ import annotations

import json

import grpc

#: Retry UNAVAILABLE (a replica restarting) and RESOURCE_EXHAUSTED (a full
#: queue) with exponential backoff. Applies to every method of the channel.
RETRY_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
            },
        }
    ],
}


def open_channel(
    address: str, *, max_message_bytes: int = 4 * 1024 * 1024, retries: bool = True
) -> grpc.aio.Channel:
    """An aio channel to ``address`` (host:port, or dns:///name:port for every replica)."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1 if retries else 0),
        ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG)),
    ]
    return grpc.aio.insecure_channel(address, options=options)
