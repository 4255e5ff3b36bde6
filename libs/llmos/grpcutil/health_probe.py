"""`python -m llmos.grpcutil.health_probe HOST:PORT [SERVICE]`: exit 0 when SERVING.

Used by container health checks and by `llmos status`.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(addr: str, service: str = "", timeout_s: float = 2.0) -> str:
    """The health status name of `service` at `addr` (empty service: the whole server)."""
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"UNREACHABLE ({exc.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str]) -> int:
    if not 2 <= len(argv) <= 3:
        print("usage: python -m llmos.grpcutil.health_probe HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    status = check(argv[1], argv[2] if len(argv) == 3 else "")
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
