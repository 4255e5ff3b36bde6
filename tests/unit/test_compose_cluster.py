"""docker-compose.yml's `cluster` profile (issue 16, item 4), checked offline like the default
topology (tests/unit/test_compose.py validates the whole file against the Compose schema):
three NATS nodes routed to each other with JetStream and the generated users, three Qdrant
nodes in distributed mode, two replicas of each service but audit, each with the same checks
as the single topology's (shared image, health probe on its port, own NATS user, own secrets),
and every service of a profile depending only on services of that profile."""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

import pytest
import yaml

from llmos.assertions import CALLING_SERVICES
from llmos.natsauth import ADMIN_USER, BUS_USERS, password_variable
from llmos.settings import GATEWAY, SERVICE_NAMES, load_settings
from llmos.stack import nats_server_binary
from services.retrieval.settings import RetrievalSettings
from tests.unit.test_compose import (
    ENV_FILE,
    HEALTH_PROBE,
    HTTP_PROBES,
    LOOPBACK,
    NATS_CONF,
    ROOT,
    as_list,
    compose_secret_values,
    depends_on,
    environment_of,
    load_compose,
    mounts,
    published_ports,
    read_dotenv,
)

pytestmark = pytest.mark.unit

CLUSTER = "cluster"
SINGLE = "single"
CLUSTER_CONF = ROOT / "deploy" / "nats" / "cluster.conf"
NODES = 3
SERVICES = (*SERVICE_NAMES, GATEWAY)
# audit's chain is one SQLite file: one writer.
REPLICAS = {name: 1 if name == "audit" else 2 for name in SERVICES}
NATS_NODES = tuple(f"nats-{index}" for index in range(1, NODES + 1))
QDRANT_NODES = tuple(f"qdrant-{index}" for index in range(1, NODES + 1))
QDRANT_PEER_PORT = 6335
# The settings a cluster replica has beyond its single-topology twin.
REPLICATION = {
    "LLMOS_JETSTREAM_REPLICAS",
    "LLMOS_QDRANT_SHARD_NUMBER",
    "LLMOS_QDRANT_REPLICATION_FACTOR",
    "LLMOS_QDRANT_WRITE_CONSISTENCY_FACTOR",
}


@pytest.fixture(scope="module")
def secrets() -> dict[str, str]:
    return compose_secret_values()


@pytest.fixture(scope="module")
def services(secrets: dict[str, str]) -> dict[str, dict[str, Any]]:
    return dict(load_compose(secrets=secrets)["services"])


def active(services: dict[str, dict[str, Any]], profile: str) -> dict[str, dict[str, Any]]:
    """What `docker compose --profile <profile> up` starts: the profile's services and those without profiles."""
    return {name: s for name, s in services.items() if not s.get("profiles") or profile in s["profiles"]}


def aliases(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks") or {}
    return set((networks.get("default") or {}).get("aliases") or [])


def replicas_of(services: dict[str, dict[str, Any]], name: str) -> list[str]:
    """The cluster's services answering to `name` on the network."""
    return sorted(n for n, s in active(services, CLUSTER).items() if name in aliases(s) and n != name)


# --------------------------------------------------------------------------- the two topologies


def test_docker_compose_up_starts_the_single_topology() -> None:
    assert read_dotenv(ENV_FILE)["COMPOSE_PROFILES"] == SINGLE


def test_every_service_belongs_to_a_topology_or_to_both(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert set(service.get("profiles", [])) <= {SINGLE, CLUSTER}, name
    shared = {name for name, service in services.items() if not service.get("profiles")}
    assert shared == {"otel-collector", "jaeger"}


@pytest.mark.parametrize("profile", (SINGLE, CLUSTER))
def test_each_topology_depends_only_on_its_own_services(services: dict[str, dict[str, Any]], profile: str) -> None:
    running = active(services, profile)
    for name, service in running.items():
        missing = set(depends_on(service)) - set(running)
        assert not missing, f"{profile}: {name} waits for {missing}, which this profile does not start"


@pytest.mark.parametrize("profile", (SINGLE, CLUSTER))
def test_each_topology_resolves_every_address_the_services_dial(services: dict[str, dict[str, Any]], profile: str) -> None:
    running = active(services, profile)
    names = set(running) | {alias for service in running.values() for alias in aliases(service)}
    environment = environment_of(running["ingest" if profile == SINGLE else "ingest-1"])
    for variable, value in environment.items():
        if variable.endswith("_ADDR"):
            assert value.rpartition(":")[0] in names, (profile, variable, value)
    for variable in ("LLMOS_NATS_URL", "LLMOS_QDRANT_URL", "LLMOS_OTLP_ENDPOINT"):
        host = re.match(r"\w+://([^:/]+)", environment[variable])
        assert host and host.group(1) in names, (profile, variable)


# --------------------------------------------------------------------------- NATS


def test_three_nats_nodes_with_their_own_names_and_stores(services: dict[str, dict[str, Any]]) -> None:
    cluster = active(services, CLUSTER)
    assert replicas_of(services, "nats") == list(NATS_NODES)
    names, stores = set(), set()
    for node in NATS_NODES:
        service = cluster[node]
        assert as_list(service["command"]) == ["nats-server", "--config", "/etc/nats/cluster.conf"]
        binds = {(ROOT / source).resolve(): target for kind, source, target in mounts(service) if kind == "bind"}
        # cluster.conf includes the single server's file and its users from its own folder.
        assert binds == {
            CLUSTER_CONF: "/etc/nats/cluster.conf",
            NATS_CONF: "/etc/nats/nats-server.conf",
            (ROOT / "deploy" / "nats" / "authorization.conf"): "/etc/nats/authorization.conf",
        }
        (volume,) = [(source, target) for kind, source, target in mounts(service) if kind == "volume"]
        assert volume[1] == "/data", "JetStream's store_dir (nats-server.conf)"
        stores.add(volume[0])
        names.add(service["environment"]["LLMOS_NATS_SERVER_NAME"])
        assert ":8222/healthz" in " ".join(service["healthcheck"]["test"])
    assert names == set(NATS_NODES) and len(stores) == NODES


def test_the_nats_nodes_route_to_each_other() -> None:
    text = CLUSTER_CONF.read_text()
    assert re.search(r'^include "nats-server.conf"', text, re.MULTILINE)
    assert re.search(r"^server_name: \$LLMOS_NATS_SERVER_NAME", text, re.MULTILINE)
    routes = re.findall(r'"nats://([\w-]+):6222"', text)
    assert routes == list(NATS_NODES)
    assert 'listen: "0.0.0.0:6222"' in text


def test_each_nats_node_has_every_password_and_the_jetstream_key(secrets: dict[str, str]) -> None:
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for node in NATS_NODES:
        environment = raw[node]["environment"]
        for variable in (*(password_variable(user) for user in (ADMIN_USER, *BUS_USERS)), "LLMOS_JETSTREAM_KEY"):
            assert environment[variable].startswith(f"${{{variable}:?"), (node, variable)


def test_cluster_conf_parses_with_nats_server(secrets: dict[str, str]) -> None:
    for node in NATS_NODES:
        result = subprocess.run(
            [nats_server_binary(), "-t", "-c", str(CLUSTER_CONF)],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, **secrets, "LLMOS_NATS_SERVER_NAME": node},
        )
        assert result.returncode == 0 and "is valid" in result.stdout + result.stderr, result.stdout + result.stderr


# --------------------------------------------------------------------------- Qdrant


def test_three_qdrant_nodes_in_distributed_mode(services: dict[str, dict[str, Any]], secrets: dict[str, str]) -> None:
    cluster = active(services, CLUSTER)
    assert replicas_of(services, "qdrant") == list(QDRANT_NODES)
    first = QDRANT_NODES[0]
    volumes = set()
    for node in QDRANT_NODES:
        service = cluster[node]
        environment = environment_of(service)
        assert environment["QDRANT__CLUSTER__ENABLED"] == "true"
        assert environment["QDRANT__CLUSTER__P2P__PORT"] == str(QDRANT_PEER_PORT)
        assert environment["QDRANT__SERVICE__API_KEY"] == secrets["LLMOS_QDRANT_API_KEY"]
        command = as_list(service["command"])
        assert command[command.index("--uri") + 1] == f"http://{node}:{QDRANT_PEER_PORT}"
        if node == first:
            assert "--bootstrap" not in command
        else:
            assert command[command.index("--bootstrap") + 1] == f"http://{first}:{QDRANT_PEER_PORT}"
            assert depends_on(service)[first]["condition"] == "service_healthy"
        (volume,) = [(source, target) for kind, source, target in mounts(service) if kind == "volume"]
        assert volume[1] == "/qdrant/storage"
        volumes.add(volume[0])
        assert service.get("healthcheck")
    assert len(volumes) == NODES


# --------------------------------------------------------------------------- the services


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_runs_its_replicas_from_the_shared_image(services: dict[str, dict[str, Any]], name: str) -> None:
    replicas = replicas_of(services, name)
    assert replicas == [f"{name}-{index}" for index in range(1, REPLICAS[name] + 1)]
    single = services[name]
    volumes = set()
    for replica in replicas:
        service = services[replica]
        assert service["profiles"] == [CLUSTER]
        assert as_list(service["command"]) == [f"services.{name}"]
        assert (service["image"], service["build"]) == (single["image"], single["build"])
        (volume,) = [source for kind, source, target in mounts(service) if kind == "volume" and target == "/var/lib/llmos"]
        volumes.add(volume)
        for node in NATS_NODES:
            assert depends_on(service)[node]["condition"] == "service_healthy", (replica, node)
    assert len(volumes) == len(replicas), "each replica its own LLMOS_HOME"


@pytest.mark.parametrize("name", SERVICES)
def test_each_replica_is_probed_on_its_port_and_the_first_is_published(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    port = int(read_dotenv(ENV_FILE)[f"LLMOS_{name.upper()}_ADDR"].rpartition(":")[2])
    for replica in replicas_of(services, name):
        check = services[replica]["healthcheck"]
        test = as_list(check["test"])
        assert test[:4] == ["CMD", "python", "-m", HTTP_PROBES.get(name, HEALTH_PROBE)]
        assert test[4].rpartition(":")[0] in LOOPBACK and int(test[4].rpartition(":")[2]) == port
        assert "start_period" in check
        published = published_ports(services[replica])
        if replica.endswith("-1"):
            assert published == [("127.0.0.1", port, port)], replica
        else:
            assert published == [], f"{replica}: replica 1 has the host port"


@pytest.mark.parametrize("name", SERVICES)
def test_each_replica_has_the_single_settings_replicated_and_only_its_own_secrets(
    services: dict[str, dict[str, Any]], secrets: dict[str, str], name: str
) -> None:
    single = environment_of(services[name])
    for replica in replicas_of(services, name):
        environment = environment_of(services[replica])
        assert {k: v for k, v in environment.items() if k not in REPLICATION} == single, replica
        assert environment["LLMOS_JETSTREAM_REPLICAS"] == str(NODES)
        assert environment["LLMOS_NATS_USER"] == name
        assert environment["LLMOS_NATS_PASSWORD"] == secrets[password_variable(name)]
        own_key = secrets[f"LLMOS_{name.upper()}_SIGNING_KEY"] if name in CALLING_SERVICES else ""
        assert environment["LLMOS_SERVICE_SIGNING_KEYS"] == own_key
        assert environment["LLMOS_JETSTREAM_KEY"] == ""



def test_retrieval_settings_of_the_cluster_are_valid_and_survive_a_node(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in list(os.environ):
        if variable.startswith("LLMOS_"):
            monkeypatch.delenv(variable)
    for variable, value in environment_of(services["retrieval-1"]).items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("LLMOS_DEV", "true")
    settings = load_settings(RetrievalSettings)
    assert settings.qdrant_url == "http://qdrant:6333"
    layout = settings.qdrant_layout
    assert 2 <= layout.replication_factor <= NODES, "each shard on two nodes or more"
    assert layout.write_consistency_factor < layout.replication_factor, "writes go on with a node down"
    assert settings.jetstream_replicas == NODES
