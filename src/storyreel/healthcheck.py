"""Ask a storyreel service whether it serves: ``python -m storyreel.healthcheck ADDRESS``.

The container images run this as their ``HEALTHCHECK`` (Kubernetes uses its native
gRPC probes instead), as ``--port-env STORYREEL_<SERVICE>_PORT`` so that the check
follows the port the service was told to listen on. It calls the standard
``grpc.health.v1`` service, which every storyreel server reports NOT_SERVING until
its model is loaded and again while it drains. Exit status 0 means SERVING; 1 means
anything else: not serving, unknown service name, unreachable, or no answer in time.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 3.0) -> str:
    """The health status name (``SERVING``, ``NOT_SERVING``, ...) reported at ``address``.

    Raises :class:`grpc.RpcError` when the server cannot be reached, does not
    know ``service``, or does not answer within ``timeout_s`` seconds.
    """
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    """Print what the service at ADDRESS reports; exit 0 only when it is SERVING."""
    parser = argparse.ArgumentParser(
        prog="python -m storyreel.healthcheck",
        description="Exit 0 when the gRPC health service at ADDRESS reports SERVING.",
    )
    parser.add_argument("address", nargs="?", help="host:port of the service, e.g. 127.0.0.1:50050")
    parser.add_argument(
        "--port-env",
        metavar="VAR",
        help="check 127.0.0.1 on the port held by this environment variable instead",
    )
    parser.add_argument(
        "--service", default="", help="service name to ask about (default: the whole server)"
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for an answer (default 3)"
    )
    args = parser.parse_args(argv)
    if (args.address is None) == (args.port_env is None):
        parser.error("give either ADDRESS or --port-env VAR")
    address = args.address
    if args.port_env is not None:
        port = os.environ.get(args.port_env, "")
        if not port.isdigit():
            print(f"{args.port_env} must hold a port number, not {port!r}", file=sys.stderr)
            return 1
        address = f"127.0.0.1:{port}"
    label = f"{address} {args.service}".rstrip()
    try:
        status = check(address, args.service, args.timeout)
    except grpc.RpcError as exc:
        print(f"{label}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"{label}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
