"""Health probe of the gateway for container health checks: `python -m services.gateway.probe HOST:PORT`
exits 0 when GET /healthz answers 200 within two seconds, else 1."""

from __future__ import annotations

import sys
import urllib.request


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m services.gateway.probe HOST:PORT", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(f"http://{argv[0]}/healthz", timeout=2) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"gateway at {argv[0]}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
