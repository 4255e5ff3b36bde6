"""Small helpers for tests that call the services over gRPC."""

from __future__ import annotations

from tests.conftest import TEST_API_KEY

ADMIN = (("authorization", f"Bearer {TEST_API_KEY}"),)
GLOBEX_USER = (("authorization", "Bearer user-key-globex"),)
