"""`llmos audit tail|query|verify|checkpoint`: read and check the audit trail through AuditService."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime, timezone
from pathlib import Path

from google.protobuf import json_format

from llmos.clients import AuditClient
from llmos.settings import PlatformSettings, load_settings
from llmos.v1 import audit_pb2, events_pb2
from llmos_cli.client import connect
from llmos_cli.output import add_api_key_option, add_json_option, print_json, print_table

PAGE_SIZE = 200


def _decision(event: events_pb2.AuditEvent) -> str:
    return events_pb2.AuditDecision.Name(event.decision).removeprefix("AUDIT_DECISION_").lower()


def _when(event: events_pb2.AuditEvent) -> str:
    return datetime.fromtimestamp(event.time.ToSeconds(), timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _line(record: audit_pb2.AuditRecord) -> str:
    """One record as a line of `llmos audit tail`."""
    event = record.event
    reason = f"  ({event.reason})" if event.reason else ""
    return f"#{record.sequence:<6} {_when(event)} {event.tenant:<10} {event.principal:<14} {_decision(event):<5} {event.action} {event.resource}{reason}"


def _row(record: audit_pb2.AuditRecord) -> list[str]:
    """One record as a row of `llmos audit query`'s table."""
    event = record.event
    return [str(record.sequence), _when(event), event.tenant, event.principal, _decision(event), event.action, event.resource, event.reason]


def _record_json(record: audit_pb2.AuditRecord) -> dict[str, object]:
    event = record.event
    return {
        "sequence": record.sequence, "time": event.time.ToJsonString(), "tenant": event.tenant, "principal": event.principal,
        "service": event.service, "action": event.action, "resource": event.resource, "decision": _decision(event),
        "reason": event.reason, "trace_id": event.trace_id, "event_id": event.event_id,
    }


async def _query(settings: PlatformSettings, args: argparse.Namespace, follow: bool, as_json: bool = False) -> int:
    since = datetime.fromisoformat(args.since).replace(tzinfo=timezone.utc) if args.since else None
    found: list[audit_pb2.AuditRecord] = []
    async with connect(settings, AuditClient, args.api_key) as audit:
        after = 0
        while True:
            records = audit.query(
                tenant=args.tenant, principal=args.principal, action=args.action, since=since, after_sequence=after, page_size=PAGE_SIZE
            )
            async for record in records:
                if follow:
                    print(_line(record), flush=True)
                else:
                    found.append(record)
                after = record.sequence
            if not follow:
                if as_json:
                    print_json({"records": [_record_json(record) for record in found]})
                else:
                    print_table(["#", "time (UTC)", "tenant", "principal", "decision", "action", "resource", "reason"], [_row(r) for r in found])
                return 0
            await asyncio.sleep(1.0)


def cmd_query(args: argparse.Namespace) -> int:
    return asyncio.run(_query(load_settings(PlatformSettings), args, follow=False, as_json=args.json))


def cmd_tail(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_query(load_settings(PlatformSettings), args, follow=True))
    except KeyboardInterrupt:
        return 0


def _kept_checkpoint(path: str) -> audit_pb2.AuditCheckpoint | None:
    """A checkpoint printed by `llmos audit checkpoint` and kept in a file."""
    if not path:
        return None
    try:
        return json_format.Parse(Path(path).read_text(), audit_pb2.AuditCheckpoint())
    except (OSError, json_format.ParseError) as exc:
        raise SystemExit(f"llmos audit: {path} is not a checkpoint printed by `llmos audit checkpoint`: {exc}") from None


def _verified(args: argparse.Namespace) -> audit_pb2.VerifyAuditResponse:
    async def verify() -> audit_pb2.VerifyAuditResponse:
        async with connect(load_settings(PlatformSettings), AuditClient, args.api_key) as audit:
            return await audit.verify(checkpoint=_kept_checkpoint(args.checkpoint))

    return asyncio.run(verify())


def _broken(result: audit_pb2.VerifyAuditResponse) -> str:
    return f"BROKEN at record {result.first_broken_sequence}: {result.reason} ({result.records_checked} good before it)"


def cmd_verify(args: argparse.Namespace) -> int:
    result = _verified(args)
    if not result.intact:
        print(_broken(result))
        return 1
    print(f"intact: {result.records_checked} records chained, ending where the service's checkpoint says")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Print the checkpoint of a verified log, to keep where the audit service's host cannot write."""
    result = _verified(args)
    if not result.intact:
        print(_broken(result), file=sys.stderr)
        return 1
    print(json_format.MessageToJson(result.checkpoint, indent=None))
    return 0


def register(commands: argparse._SubParsersAction, evals: argparse._SubParsersAction) -> None:
    audit = commands.add_parser("audit", help="read and verify the audit trail").add_subparsers(dest="audit_command", required=True)
    for name, run, help_text in (("query", cmd_query, "records matching filters"), ("tail", cmd_tail, "follow new records")):
        parser = audit.add_parser(name, help=help_text)
        parser.add_argument("--tenant", default="", help="administrators: another tenant")
        parser.add_argument("--principal", default="")
        parser.add_argument("--action", default="", help="e.g. llmos.v1.IngestService/SubmitDocument")
        parser.add_argument("--since", default="", help="ISO time, UTC (e.g. 2026-11-29T06:00)")
        add_api_key_option(parser)
        if name == "query":
            add_json_option(parser)
        parser.set_defaults(run=run)
    for name, run, help_text in (
        ("verify", cmd_verify, "walk the hash chain and check it against its checkpoint; exit 1 if broken"),
        ("checkpoint", cmd_checkpoint, "verify, then print the log's signed checkpoint (JSON) to keep elsewhere"),
    ):
        parser = audit.add_parser(name, help=help_text)
        add_api_key_option(parser)
        parser.add_argument("--checkpoint", default="", help="a file kept from `llmos audit checkpoint`: the log must still hold it")
        parser.set_defaults(run=run)
