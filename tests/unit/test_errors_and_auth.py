from __future__ import annotations

import grpc
import pytest

from llmos import errors
from llmos.auth import Principal, acting_as, effective_tenant
from llmos.keys import KeyAuthenticator, parse_static_keys
from llmos.policy import RPC_PERMISSIONS, SERVICE_CALLS
from llmos.grpcutil.status import RETRY_AFTER_MS_KEY, error_from_rpc, status_for, trailing_metadata_for

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument("text", "must not be empty"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("no such document"), grpc.StatusCode.NOT_FOUND),
        (errors.PermissionDenied("no"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.Unauthenticated("who?"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.ResourceExhausted("queue full", 2.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unimplemented("later"), grpc.StatusCode.UNIMPLEMENTED),
        (errors.Unavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (errors.FailedPrecondition("build models"), grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_each_error_maps_to_its_status(error: errors.LlmosError, code: grpc.StatusCode) -> None:
    assert status_for(error) == code


def test_invalid_argument_names_the_field() -> None:
    assert errors.InvalidArgument("max_new_tokens", "must be 1..2048").message == "max_new_tokens: must be 1..2048"


def test_resource_exhausted_tells_when_to_retry() -> None:
    error = errors.ResourceExhausted("queue full", 2.5)
    assert "retry after 2.5 s" in error.message
    assert trailing_metadata_for(error) == ((RETRY_AFTER_MS_KEY, "2500"),)


def test_a_relayed_refusal_states_the_callee_hint_once() -> None:
    refused = errors.ResourceExhausted("queue full", 2.5)
    rpc_error = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
        grpc.aio.Metadata(*trailing_metadata_for(refused)), details=refused.message,
    )
    relayed = error_from_rpc(rpc_error, "inference")
    assert isinstance(relayed, errors.ResourceExhausted) and relayed.retry_after_s == 2.5
    assert relayed.message == "inference: queue full (retry after 2.5 s)"


AUTH = KeyAuthenticator(parse_static_keys("k1=alice:acme:admin,k2=bob:globex:user|operator"))


async def test_valid_keys_resolve_to_their_principal() -> None:
    assert await AUTH.authenticate("Bearer k1") == Principal("alice", "acme", frozenset({"admin"}))
    assert (await AUTH.authenticate("bearer k2")).roles == frozenset({"user", "operator"})


@pytest.mark.parametrize(
    ("header", "message"),
    [(None, "missing credentials"), ("Basic abc", "must be 'Bearer"), ("Bearer nope", "unknown or revoked")],
)
async def test_bad_credentials_are_unauthenticated(header: str | None, message: str) -> None:
    with pytest.raises(errors.Unauthenticated, match=message):
        await AUTH.authenticate(header)


def test_malformed_key_spec_fails_fast() -> None:
    with pytest.raises(errors.InvalidArgument, match="LLMOS_API_KEYS"):
        parse_static_keys("k1=alice")
    with pytest.raises(errors.InvalidArgument, match="roles"):
        parse_static_keys("k1=alice:acme:superuser")


def test_tenant_comes_from_the_principal_unless_an_admin_names_another() -> None:
    with acting_as(Principal("bob", "globex", frozenset({"user"}))):
        assert effective_tenant("") == "globex"
        assert effective_tenant("globex") == "globex"
        with pytest.raises(errors.PermissionDenied, match="only administrators"):
            effective_tenant("acme")
    with acting_as(Principal("alice", "acme", frozenset({"admin"}))):
        assert effective_tenant("globex") == "globex"
    # A bus handler acts for its event's tenant and no other, even through a service.
    with acting_as(Principal("bus:llmos.docs.indexed", "acme", frozenset({"service"}), service="speech")):
        assert effective_tenant("acme") == "acme"
        with pytest.raises(errors.PermissionDenied):
            effective_tenant("globex")
    with acting_as(Principal("olga", "acme", frozenset({"operator"}))):
        with pytest.raises(errors.PermissionDenied):
            effective_tenant("globex")


def test_a_service_role_key_is_refused() -> None:
    with pytest.raises(errors.InvalidArgument, match="own identities"):
        parse_static_keys("svc=platform:platform:service")


def test_no_principal_outside_a_request() -> None:
    with pytest.raises(errors.Unauthenticated):
        effective_tenant("")


def test_every_call_a_service_may_make_is_an_rpc_with_a_policy() -> None:
    for service, methods in SERVICE_CALLS.items():
        assert methods <= set(RPC_PERMISSIONS), f"{service}: {sorted(methods - set(RPC_PERMISSIONS))}"
