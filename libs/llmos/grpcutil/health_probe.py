"""`python -m llmos.grpcutil.health_probe HOST:PORT [SERVICE]`: exit 0 when SERVING.

Used by container health checks and by `llmos status`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.grpcutil.tls import CLIENT_NAME, TlsFiles, channel_credentials


def check(addr: str, service: str = "", timeout_s: float = 2.0, credentials: grpc.ChannelCredentials | None = None) -> str:
    """The health status name of `service` at `addr` (empty service: the whole server)."""
    channel = grpc.secure_channel(addr, credentials) if credentials else grpc.insecure_channel(addr)
    with channel:
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
    # Under TLS (LLMOS_TLS_DIR) the probe presents the `client` certificate.
    tls_dir = os.environ.get("LLMOS_TLS_DIR")
    credentials = channel_credentials(TlsFiles(Path(tls_dir), CLIENT_NAME)) if tls_dir else None
    status = check(argv[1], argv[2] if len(argv) == 3 else "", credentials=credentials)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
