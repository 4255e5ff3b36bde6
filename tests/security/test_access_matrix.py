"""Every RPC × every kind of caller answers the right status, and every denial is audited.

Each call sends a request a healthy service answers (`rpc_calls.canary`), so an allowed call must
succeed and answer what it should: not merely avoid a refusal. A refused call is refused because
of who calls, since nothing else is wrong with the request. Every RPC whose request names a tenant
(top-level or in a nested config, client-streaming ones too) is probed from another tenant by
every non-administrator, including an operator, who may write in their own tenant: the design is
that a tenant named in a request is never trusted (`llmos.auth.effective_tenant`), so naming
another tenant is PERMISSION_DENIED, never served for the caller's own tenant instead.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import grpc
import nats
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from llmos.bus.follow import follow, last_sequence
from llmos.bus.subjects import AUDIT_ALL
from llmos.policy import RPC_PERMISSIONS, permissions_of
from llmos.v1 import audit_pb2, common_pb2, events_pb2
from tests.conftest import TEST_API_KEY, RunningStack
from tests.security.rpc_calls import (
    CALLERS,
    PRINCIPAL_OF,
    Caller,
    CanaryDocument,
    CanaryState,
    all_rpcs,
    canary,
    names_a_tenant,
    new_trace_id,
    path,
    seed_canary_documents,
)

pytestmark = pytest.mark.security

TENANTS = ("acme", "globex")
UNAUTHENTICATED_KEYS = (None, "not-a-key", "llmos_0123456789ab_forged")
# The reason a request naming another tenant is refused (llmos.auth.effective_tenant).
OTHER_TENANT_REASON = "may not act on tenant"


@dataclass(frozen=True)
class Denial:
    trace_id: str
    action: str
    principal: str  # "anonymous" for an unauthenticated call
    tenant: str  # the principal's tenant ("" when unauthenticated)
    reason: str  # the refusal's details, which the audit record must hold too


@pytest.fixture(scope="module")
async def canary_documents(stack: RunningStack) -> dict[str, CanaryDocument]:
    async with Caller(stack) as caller:
        return await seed_canary_documents(caller, TENANTS)


def test_every_rpc_has_an_access_policy() -> None:
    assert {path(method) for _, method in all_rpcs()} == set(RPC_PERMISSIONS)


@dataclass(frozen=True)
class MatrixRun:
    denials: list[Denial]
    after_seq: int  # the AUDIT stream's last sequence before the matrix ran
    since: Timestamp  # when it started


@pytest.fixture(scope="module")
async def matrix(stack: RunningStack, canary_documents: dict[str, CanaryDocument]) -> MatrixRun:
    """Run the whole matrix; the denials it caused, each with the trace id it was called under."""
    connection = await nats.connect(stack.settings.nats_url)
    try:
        after_seq = await last_sequence(connection.jetstream(), AUDIT_ALL)
    finally:
        await connection.close()
    since = Timestamp()
    since.GetCurrentTime()
    denials: list[Denial] = []
    outcomes: Counter[str] = Counter()
    states = {key: CanaryState(canary_documents[principal.tenant]) for key, principal in PRINCIPAL_OF.items()}
    # Another tenant's canary state: its document and a session of its own, for the cross-tenant probes.
    foreign = {tenant: CanaryState(document) for tenant, document in canary_documents.items()}
    chat = next(method for _, method in all_rpcs() if method.name == "Chat")
    async with Caller(stack) as caller:
        for tenant, state in foreign.items():  # a session in each tenant, for the probes of its sessions
            opened = canary(chat, state, tenant)
            outcome = await caller.call("dialogue", chat, TEST_API_KEY, opened.requests)
            assert outcome.status == grpc.StatusCode.OK, outcome
            opened.check(outcome.responses)
        for service, method in all_rpcs():
            action = path(method)
            permission = RPC_PERMISSIONS[action]
            for key in UNAUTHENTICATED_KEYS:
                trace_id = new_trace_id()
                outcome = await caller.call(service, method, key, canary(method, CanaryState(canary_documents["acme"])).requests,
                                            trace_id=trace_id)
                assert outcome.status == grpc.StatusCode.UNAUTHENTICATED, f"{action} with key {key!r}: {outcome}"
                denials.append(Denial(trace_id, action, "anonymous", "", outcome.details))
                outcomes["unauthenticated"] += 1
            for key, principal in PRINCIPAL_OF.items():
                trace_id = new_trace_id()
                request = canary(method, states[key])
                outcome = await caller.call(service, method, key, request.requests, trace_id=trace_id)
                if permission in permissions_of(principal):
                    # Allowed: the call is served, and answers what it should.
                    assert outcome.status == grpc.StatusCode.OK, f"{principal.subject} on {action}: {outcome}"
                    request.check(outcome.responses)
                    outcomes["allowed and served"] += 1
                else:
                    assert outcome.status == grpc.StatusCode.PERMISSION_DENIED, f"{principal.subject} on {action}: {outcome}"
                    assert permission.value in outcome.details, outcome.details
                    denials.append(Denial(trace_id, action, principal.subject, principal.tenant, outcome.details))
                    outcomes["insufficient role"] += 1
            if not names_a_tenant(canary(method, CanaryState(canary_documents["acme"]), "acme").requests):
                continue
            for key, principal in PRINCIPAL_OF.items():
                other = next(tenant for tenant in TENANTS if tenant != principal.tenant)
                trace_id = new_trace_id()
                probe = canary(method, foreign[other], other)
                outcome = await caller.call(service, method, key, probe.requests, trace_id=trace_id)
                if principal.is_admin:
                    # The control: the tenant field is honoured for whoever may act across tenants.
                    assert outcome.status == grpc.StatusCode.OK, f"admin on {action} for {other}: {outcome}"
                    probe.check(outcome.responses)
                    outcomes["admin in another tenant"] += 1
                    continue
                assert outcome.status == grpc.StatusCode.PERMISSION_DENIED, f"{principal.subject} on {action} in {other}: {outcome}"
                if permission in permissions_of(principal):
                    # The role would do: the tenant is what is refused (an operator writing in another tenant too).
                    assert OTHER_TENANT_REASON in outcome.details, f"{principal.subject} on {action}: {outcome.details}"
                    outcomes[f"{'operator' if 'operator' in principal.roles else 'user'} in another tenant"] += 1
                else:
                    outcomes["insufficient role in another tenant"] += 1
                denials.append(Denial(trace_id, action, principal.subject, principal.tenant, outcome.details))
    print(f"access matrix: {sum(outcomes.values())} calls over {len(all_rpcs())} RPCs and {len(CALLERS)} principals "
          f"+ {len(UNAUTHENTICATED_KEYS)} unauthenticated callers: {dict(outcomes)}")
    assert outcomes["operator in another tenant"] >= 2  # SubmitDocument and DeleteDocument at least
    return MatrixRun(denials, after_seq, since)


async def test_access_matrix(matrix: MatrixRun) -> None:
    actions = {denial.action for denial in matrix.denials}
    assert actions == set(RPC_PERMISSIONS), "every RPC refused someone"


async def audit_records_on_the_bus(stack: RunningStack, after_seq: int, trace_ids: set[str], timeout_s: float = 30.0
                                   ) -> dict[str, events_pb2.AuditEvent]:
    """The audit events published after `after_seq`, by trace id, for those in `trace_ids`."""
    found: dict[str, events_pb2.AuditEvent] = {}
    connection = await nats.connect(stack.settings.nats_url)
    try:
        async with asyncio.timeout(timeout_s):
            async for message in follow(connection.jetstream(), AUDIT_ALL, after_seq):
                event = events_pb2.AuditEvent.FromString(message.data)
                if event.trace_id in trace_ids and event.decision == events_pb2.AUDIT_DECISION_DENY:
                    found[event.trace_id] = event
                    if len(found) == len(trace_ids):
                        break
    except TimeoutError:
        pass
    finally:
        await connection.close()
    return found


async def stored_denials(stack: RunningStack, tenant: str, since: Timestamp) -> dict[str, audit_pb2.AuditRecord]:
    """The audit service's DENY records of `tenant` since `since`, by trace id (queried as the administrator)."""
    query = next(method for _, method in all_rpcs() if method.name == "Query")
    records: dict[str, audit_pb2.AuditRecord] = {}
    token = ""
    async with Caller(stack) as caller:
        while True:
            outcome = await caller.call("audit", query, TEST_API_KEY, audit_pb2.QueryAuditRequest(
                tenant=tenant, start_time=since, page=common_pb2.PageRequest(page_size=500, page_token=token)))
            assert outcome.status == grpc.StatusCode.OK, outcome
            for record in outcome.responses:
                if record.event.decision == events_pb2.AUDIT_DECISION_DENY:
                    records[record.event.trace_id] = record
            if len(outcome.responses) < 500:
                return records
            token = str(outcome.responses[-1].sequence)


async def test_every_denial_is_audited(stack: RunningStack, matrix: MatrixRun) -> None:
    expected = {denial.trace_id: denial for denial in matrix.denials}
    published = await audit_records_on_the_bus(stack, matrix.after_seq, set(expected))
    missing = [denial for trace_id, denial in expected.items() if trace_id not in published]
    by_kind = Counter(f"{d.action.split('/')[-1]} by {d.principal}: {d.reason[:60]}" for d in missing)
    assert not missing, f"{len(missing)} of {len(expected)} denials were not audited: {dict(by_kind)}"
    for trace_id, event in published.items():
        denial = expected[trace_id]
        assert (event.action, event.principal, event.tenant) == (denial.action.lstrip("/"), denial.principal, denial.tenant)
        assert event.reason, f"{denial.action}: a denial without its reason"
    # The audit service stored each denial of a tenant where that tenant's operator can read it.
    for tenant in TENANTS:
        ours = {trace_id for trace_id, denial in expected.items() if denial.tenant == tenant}
        for _ in range(100):
            stored = await stored_denials(stack, tenant, matrix.since)
            if ours <= set(stored):
                break
            await asyncio.sleep(0.2)
        assert ours <= set(stored), f"{len(ours - set(stored))} denials of {tenant} not stored by the audit service"
    print(f"denials audited: {len(expected)} over {len({d.action for d in matrix.denials})} RPCs "
          f"({sum(1 for d in matrix.denials if d.principal == 'anonymous')} unauthenticated)")
