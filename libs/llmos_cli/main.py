"""`llmos`: run the embedded platform, build models, and look inside it."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from llmos import errors
from llmos.settings import SERVICE_NAMES, PlatformSettings, SettingsError, load_settings
from llmos.telemetry import SPAN_FILE, read_spans
from llmos_cli.output import add_json_option

# Modules that add subcommands of their area: each exposes `register(commands, evals)`, adding
# its commands to `commands` and its `llmos eval <task>` evaluations to `evals`.
COMMAND_MODULES: tuple[str, ...] = ("llmos_cli.keys", "llmos_cli.audit", "llmos_cli.speech", "llmos_cli.kb", "llmos_cli.dialogue")
# What to do about a platform error a command could not handle, beside its message.
NEXT_STEPS: dict[type[errors.LlmosError], str] = {
    errors.Unavailable: "is the platform running? Start it with `llmos up --detach`; `llmos status` shows each service's health",
    errors.Unauthenticated: "pass an API key with --api-key or set LLMOS_API_KEY (an administrator issues one with `llmos keys create`)",
    errors.PermissionDenied: "this API key's role may not do that: use a key whose role may (`llmos keys create --role ...`)",
    errors.DeadlineExceeded: "the service did not answer in time: it may be busy or still loading; retry, or see `llmos status`",
}


def _settings() -> PlatformSettings:
    return load_settings(PlatformSettings)


def cmd_up(args: argparse.Namespace) -> int:
    from llmos.stack import Stack

    settings = _settings()
    if args.cluster:
        return _up_cluster(settings, args.detach)
    stack = Stack(settings)
    print(f"starting nats-server and {len(SERVICE_NAMES)} services (logs in {settings.logs_dir}) …")
    elapsed = stack.start()
    print(f"all services SERVING after {elapsed:.1f} s")
    print(f"  {'nats':<10} {settings.nats_url}  (monitoring http://127.0.0.1:{settings.nats_monitor_port})")
    for name in SERVICE_NAMES:
        print(f"  {name:<10} grpc://{settings.service_addr(name)}")
    print(f"  {'gateway':<10} http://{settings.gateway_addr}  (OpenAI-compatible API and REST; docs /docs)")
    print(f"web: http://{settings.gateway_addr}")
    print(f"traces: {settings.telemetry_dir / SPAN_FILE} (`llmos trace --last`)")
    if args.detach:
        print("running in the background; stop with `llmos down`")
        return 0
    def watch() -> int | None:
        exited = stack.exited()
        if exited:
            print(f"stopping: {', '.join(exited)} exited; see {settings.logs_dir}", file=sys.stderr)
            return 1
        return None

    code = _until_stopped(watch)
    stack.stop()
    return code


def _up_cluster(settings: PlatformSettings, detach: bool) -> int:
    """`llmos up --cluster`: three nats-servers and replicas of the services (llmos.cluster)."""
    from llmos.cluster import JETSTREAM_REPLICAS, NODES, REPLICAS, PlatformCluster

    cluster = PlatformCluster(settings)
    print(
        f"starting {NODES} clustered nats-servers and {sum(REPLICAS.values())} replicas of {len(SERVICE_NAMES)} services "
        f"(state and logs under {cluster.folder}) …"
    )
    elapsed = cluster.start()
    assert cluster.stack is not None
    print(f"all replicas SERVING after {elapsed:.1f} s; streams and buckets at {JETSTREAM_REPLICAS} replicas")
    print(f"  {'nats':<10} {','.join(cluster.stack.nats.urls)}")
    for name in SERVICE_NAMES:
        print(f"  {name:<10} {cluster.stack.addr(name)}")
    print(f"  {'gateway':<10} http://{settings.gateway_addr}  (OpenAI-compatible API and REST; docs /docs)")
    print("clients balance over every replica with these settings (the first address alone reaches one replica):")
    for name in SERVICE_NAMES:
        print(f"  LLMOS_{name.upper()}_ADDR={cluster.stack.addr(name)}")
    if detach:
        print("running in the background; `llmos status` shows each replica, `llmos down` stops them")
        return 0
    reported: set[str] = set()

    def watch() -> int | None:
        # A cluster is there to outlive a replica or a node: one that exits is reported, not fatal.
        for name in sorted(set(cluster.exited()) - reported):
            print(f"{name} exited; the others go on (its log: under {cluster.folder} or {settings.logs_dir})", file=sys.stderr)
            reported.add(name)
        return None

    code = _until_stopped(watch)
    cluster.stop()
    return code


def _until_stopped(watch: Callable[[], int | None]) -> int:
    """Run `watch` every half second until Ctrl-C or SIGTERM (0) or until it returns an exit code."""
    print("press Ctrl-C to stop")
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    while not stopping:
        code = watch()
        if code is not None:
            return code
        time.sleep(0.5)
    print("stopping …")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from llmos.stack import stop_stack

    stopped = stop_stack(_settings())
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from llmos_cli.status import print_status

    return asyncio.run(print_status(_settings(), as_json=args.json))


def cmd_streams(args: argparse.Namespace) -> int:
    from llmos.stack import declare_as_admin

    settings = _settings()
    asyncio.run(declare_as_admin(settings))
    print(f"streams and buckets match this version's configuration, at {settings.jetstream_replicas} replica(s) each")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from llmos.tracetree import last_trace_id, render_tree, trace_spans

    settings = _settings()
    spans = read_spans(settings.telemetry_dir / SPAN_FILE)
    trace_id = last_trace_id(spans) if args.last else args.trace_id
    if not trace_id:
        print("no traces recorded yet" if args.last else "give a trace id or --last", file=sys.stderr)
        return 1
    selected = trace_spans(spans, trace_id)
    if not selected:
        print(f"no spans for trace {trace_id} in {settings.telemetry_dir / SPAN_FILE}", file=sys.stderr)
        return 1
    print(f"trace {trace_id}: {len(selected)} spans in {len({span['service'] for span in selected})} services")
    print("\n".join(render_tree(selected)))
    return 0


def cmd_models_build(args: argparse.Namespace) -> int:
    from llmos.models import build_models

    settings = _settings()
    build_models(settings.home, cuda=args.cuda, int8=args.int8, force=args.force)
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from llmos.grpcutil.tls import CLIENT_NAME, make_certificates

    ca_folder = make_certificates(args.out, (*SERVICE_NAMES, CLIENT_NAME), tuple(args.host), args.ca_dir)
    print(f"certificates for {', '.join(SERVICE_NAMES)} and {CLIENT_NAME} in {args.out}; the CA's key in {ca_folder} (keep it apart)")
    print(f"serve TLS with LLMOS_TLS_DIR={args.out} (and LLMOS_TLS_MUTUAL=true for mutual TLS)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from llmos_cli.demo import run_demo

    return run_demo(_settings())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmos", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start nats-server and every service on this machine")
    up.add_argument("--detach", action="store_true", help="return once everything is SERVING")
    up.add_argument(
        "--cluster", action="store_true",
        help="three clustered nats-servers (streams at 3 replicas) and two replicas of each stateless service",
    )
    up.set_defaults(run=cmd_up)
    commands.add_parser("down", help="stop what `llmos up --detach` started").set_defaults(run=cmd_down)
    add_json_option(commands.add_parser("status", help="health of each service, streams and consumer lag")).set_defaults(run=cmd_status)
    commands.add_parser(
        "streams", help="as admin: create missing streams and buckets, bring existing ones to this version's configuration"
    ).set_defaults(run=cmd_streams)

    trace = commands.add_parser("trace", help="print one trace as a span tree")
    trace.add_argument("trace_id", nargs="?", help="32 hex digits")
    trace.add_argument("--last", action="store_true", help="the most recent trace")
    trace.set_defaults(run=cmd_trace)

    models = commands.add_parser("models", help="served model artefacts").add_subparsers(dest="models_command", required=True)
    build = models.add_parser("build", help="turn packaged weights into served artefacts (idempotent)")
    build.add_argument("--cuda", action="store_true", help="also build the fp16 CUDA generation model")
    build.add_argument("--int8", action="store_true", help="also build the int8 embedding model")
    build.add_argument("--force", action="store_true", help="rebuild even when artefacts are up to date")
    build.set_defaults(run=cmd_models_build)
    importlib.import_module("llmos_cli.models").register(models)

    certs = commands.add_parser("certs", help="make a development CA and a certificate per service")
    certs.add_argument("--out", type=Path, required=True, help="folder for ca.pem, <service>.pem, <service>-key.pem")
    certs.add_argument("--host", action="append", default=["localhost", "127.0.0.1"], help="extra host names or IPs")
    certs.add_argument("--ca-dir", type=Path, help="the CA's folder, kept from services (default: OUT-ca); an existing CA there signs")
    certs.set_defaults(run=cmd_certs)

    commands.add_parser("demo", help="start the stack, show the main flows, stop it").set_defaults(run=cmd_demo)
    evals = commands.add_parser("eval", help="measure quality on a data folder, beside published references")
    eval_tasks = evals.add_subparsers(dest="eval_task", required=True, metavar="TASK")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands, eval_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except SettingsError as exc:
        print(f"llmos: {exc}", file=sys.stderr)
        return 2
    except errors.LlmosError as exc:
        print(f"llmos: {exc.message}", file=sys.stderr)
        next_step = next((step for kind, step in NEXT_STEPS.items() if isinstance(exc, kind)), "")
        if next_step:
            print(f"  {next_step}", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"llmos: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
