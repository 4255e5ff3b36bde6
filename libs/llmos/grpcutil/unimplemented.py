"""Servicers for APIs whose logic is not built yet: every RPC answers UNIMPLEMENTED, saying when.

Better than a fake answer: a client learns at once that the call exists but does nothing yet.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from llmos.errors import Unimplemented


def unimplemented_servicer(base: type, service: ServiceDescriptor, reason: str) -> Any:
    """An instance of `base` (a generated servicer) whose RPCs raise `Unimplemented(reason)`."""

    def make(method_name: str) -> Any:
        async def rpc(self: Any, request: Any, context: Any) -> Any:
            raise Unimplemented(f"{service.name}.{method_name} is not available yet: {reason}")

        rpc.__name__ = method_name
        return rpc

    methods = {method.name: make(method.name) for method in service.methods}
    return type(f"Unimplemented{service.name}", (base,), methods)()
