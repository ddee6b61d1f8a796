"""deploy/ agrees with the code: image, compose file, Kubernetes manifests, probe, dashboard and operations page.

No Docker engine or cluster here: every file is parsed and cross-checked against what the code defines: the
Settings fields (an unknown FEDCOMPUTE_ variable stops a component at start), the secret settings, the components
and their ports, the CLI's commands and options, and the metric names the components register.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import re
import sqlite3
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import pytest
import typer
import yaml
from pydantic import TypeAdapter

from fedcompute.cli import app as cli_app
from fedcompute.components import COMPONENTS
from fedcompute.core.settings import PREFIX, SECRET_SETTINGS, Settings, variable

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OPERATIONS = ROOT / "docs" / "operations.md"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"fedcompute/fedcompute:{VERSION}"
HEALTHCHECK = ["/opt/venv/bin/python", "/opt/fedcompute/healthcheck.py"]
MIGRATE_CODE = (
    "from fedcompute.core.settings import Settings; from fedcompute.store.database import Database; "
    "Database(Settings.load().resolved_database_url()).migrate()"
)
MIGRATE = ["/opt/venv/bin/python", "-c", MIGRATE_CODE]
# the gRPC port each component serves: its own RPCs, or gRPC health alone (build_grpc_server / build_health_server)
PORT_SETTING = {
    "server": "server_port",
    "keys": "key_service_port",
    "verifier": "verifier_port",
    "dealer": "health_port",
    "modelupdater": "health_port",
    "aggregator": "health_port",
}
ADDRESS_SETTING = {"server": "server_address", "verifier": "verifier_address", "keys": "key_service_addresses"}
SECRETS = SECRET_SETTINGS | {"database_url"}  # the database URL carries the database password
# the only secrets each component may hold (core.processes.child_env gives `up`'s children the same)
NEEDED_SECRETS = {
    "server": {"database_url", "internal_token", "token_secret", "s3_access_key_id", "s3_secret_access_key"},
    "modelupdater": {"database_url", "s3_access_key_id", "s3_secret_access_key"},
    "aggregator": {"internal_token"},
    "keys": {"key_admin_token", "key_encryption_key", "key_encryption_key_file"},
    "verifier": set(),
    "dealer": {"key_admin_token", "operator_token"},
}
PATH_SETTINGS = {n for n, f in Settings.model_fields.items() if "Path" in str(f.annotation)}
KNOWN_VARIABLES = {variable(n) for n in Settings.model_fields}
PROMETHEUS_SERIES = {"up"}  # what Prometheus adds to every target itself


@functools.cache
def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(K8S.rglob("*.yaml")) for d in load_docs(p)]


def defined(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in k8s_objects() if d["kind"] == kind}


def dockerfile() -> list[tuple[str, str]]:
    """The final stage's instructions (continuation lines joined, comments dropped) as (INSTRUCTION, rest)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    steps = [tuple(line.strip().split(None, 1)) for line in text.splitlines() if line.strip()[:1] not in ("", "#")]
    last_from = max(i for i, s in enumerate(steps) if s[0] == "FROM")
    return [(s[0].upper(), s[1]) for s in steps[last_from:]]


def instruction(name: str) -> str:
    return [rest for step, rest in dockerfile() if step == name][-1]


@dataclass
class Container:
    """One container of either deployment, normalized: where it is, what it runs, what it gets."""

    kind: str  # "k8s" or "compose"
    where: str
    workload: str  # the Deployment, StatefulSet or Job (k8s), the service (compose)
    image: str
    argv: list[str]
    env: dict[str, Any]  # variable -> literal value, or ("secret", name, key)
    mounts: dict[str, tuple[str, bool]]  # mount path -> (volume, read-only)
    raw: dict[str, Any] = field(default_factory=dict)
    pod: dict[str, Any] = field(default_factory=dict)
    claims: list[dict[str, Any]] = field(default_factory=list)  # a StatefulSet's volumeClaimTemplates
    annotations: dict[str, str] = field(default_factory=dict)  # the pod template's

    @property
    def component(self) -> str | None:
        return self.argv[2] if self.argv[:2] == ["fedcompute", "serve"] else None

    def setting(self, name: str) -> Any:
        """The value this container's component reads (its environment, else the default), parsed."""
        if variable(name) not in self.env:
            return Settings.model_fields[name].get_default(call_default_factory=True)
        value = self.env[variable(name)]
        return value if isinstance(value, tuple) else parse(name, value)


def parse(name: str, value: str) -> Any:
    """An environment value as pydantic-settings reads it (complex types as JSON), with interpolations filled."""
    annotation: Any = Settings.model_fields[name].annotation
    value = re.sub(r"\$\{[^}]*\}", "x", value)
    return TypeAdapter(annotation).validate_python(json.loads(value) if "list" in str(annotation) else value)


def image_env() -> dict[str, str]:
    """The FEDCOMPUTE_ variables the image itself sets (Dockerfile ENV)."""
    pairs = [word.split("=", 1) for step, rest in dockerfile() if step == "ENV" for word in rest.split()]
    return {k: v for k, v in pairs if k.startswith(PREFIX)}


def k8s_containers() -> list[Container]:
    configmaps = defined("ConfigMap")
    entrypoint = json.loads(instruction("ENTRYPOINT"))
    found = []
    for path, obj in k8s_objects():
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        pod = obj["spec"]["template"]["spec"]
        for raw in pod.get("initContainers", []) + pod["containers"]:
            env: dict[str, Any] = image_env() if raw["image"] == IMAGE else {}
            for source in raw.get("envFrom", []):
                env.update(configmaps[source["configMapRef"]["name"]]["data"])
            for item in raw.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                env[item["name"]] = ("secret", ref["name"], ref["key"]) if ref else item["value"]
            mounts = {m["mountPath"]: (m["name"], bool(m.get("readOnly"))) for m in raw.get("volumeMounts", [])}
            argv = raw.get("command", entrypoint) + raw.get("args", [])
            workload = obj["metadata"]["name"]
            where = f"{path.name}:{workload}/{raw['name']}"
            claims = obj["spec"].get("volumeClaimTemplates", [])
            annotations = obj["spec"]["template"]["metadata"].get("annotations", {})
            found.append(
                Container("k8s", where, workload, raw["image"], argv, env, mounts, raw, pod, claims, annotations)
            )
    return found


def compose() -> dict[str, Any]:
    return load_docs(DEPLOY / "compose.yaml")[0]


def compose_containers() -> list[Container]:
    entrypoint, command = json.loads(instruction("ENTRYPOINT")), json.loads(instruction("CMD"))
    found = []
    for name, service in compose()["services"].items():
        mounts = {}
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            mounts[target] = (source, mode == ["ro"])
        ours = service["image"] == IMAGE
        argv = service.get("entrypoint", entrypoint if ours else []) + service.get("command", command if ours else [])
        env = (image_env() if ours else {}) | service.get("environment", {})
        found.append(Container("compose", name, name, service["image"], argv, env, mounts, service))
    return found


def all_containers() -> list[Container]:
    return k8s_containers() + compose_containers()


def project(containers: list[Container]) -> list[Container]:
    return [c for c in containers if c.image.split(":")[0] == IMAGE.split(":")[0]]


def serving(containers: list[Container]) -> list[Container]:
    return [c for c in containers if c.component]


def mount_for(container: Container, path: str) -> tuple[str, str, bool] | None:
    """The deepest mount holding ``path``: (mount path, volume, read-only)."""
    holders = [m for m in container.mounts if PurePosixPath(path).is_relative_to(m)]
    if not holders:
        return None
    deepest = max(holders, key=len)
    return deepest, *container.mounts[deepest]


# --- settings ------------------------------------------------------------------------------------------------


def test_every_fedcompute_variable_named_anywhere_is_a_setting() -> None:
    kinds = {".yaml", ".yml", ".json", ".py", ".dockerignore"}
    files = [p for p in DEPLOY.rglob("*") if p.suffix in kinds or p.name == "Dockerfile"] + [OPERATIONS]
    named = {(p.name, v) for p in files for v in re.findall(rf"\b{PREFIX}[A-Z0-9_]+\b", p.read_text())}
    assert len(named) > 20
    assert not {n for n in named if n[1] not in KNOWN_VARIABLES}, "unknown settings are refused at start"


def test_secrets_are_never_literal_values() -> None:
    for name, configmap in defined("ConfigMap").items():
        assert not {variable(s) for s in SECRETS} & set(configmap.get("data", {})), name
    for container in all_containers():
        for var, value in container.env.items():
            if var.removeprefix(PREFIX).lower() in SECRETS and container.kind == "k8s":
                assert isinstance(value, tuple), (container.where, var)
                assert value[0] == "secret", (container.where, var)
            elif var.removeprefix(PREFIX).lower() in SECRETS or re.search("PASSWORD|SECRET|TOKEN", var):
                assert re.search(r"\$\{[A-Z0-9_]+", value), (container.where, var)  # from .env (make_env.py)
    assert not {variable(s) for s in SECRETS} & set(image_env())


def test_every_literal_setting_parses_and_tls_is_on() -> None:
    for container in project(all_containers()):
        values = {}
        for var, value in container.env.items():
            if not var.startswith(PREFIX) or isinstance(value, tuple):
                continue
            name = var.removeprefix(PREFIX).lower()
            if name not in PATH_SETTINGS:  # files exist only in the container
                values[name] = parse(name, value)
        Settings.model_validate(values)
        if container.component:
            assert container.setting("host") == "0.0.0.0", container.where
            assert not container.setting("plaintext"), container.where
            for name in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
                assert container.setting(name), (container.where, name)
            client_auth = container.component in ("keys", "verifier")
            assert bool(container.setting("tls_client_auth")) == client_auth, container.where


def test_file_settings_lie_in_mounted_volumes() -> None:
    secrets, configmaps = defined("Secret"), defined("ConfigMap")
    for container in serving(all_containers()):
        volumes = {v["name"]: v for v in container.pod.get("volumes", [])}
        for name in sorted(PATH_SETTINGS - {"attester_socket", "confidential_space_jwks_file"}):
            path = container.setting(name)
            if name == "trusted_providers_file" and path is None:
                path = f"{container.setting('workdir')}/public/trusted-providers.json"
            if path is None or (name == "key_encryption_key_file" and container.component != "keys"):
                continue
            found = mount_for(container, str(path))  # a setting's file must be in the container
            assert found, (container.where, name, path)
            mount, volume, read_only = found
            if name == "workdir":
                assert mount == str(path), container.where
                assert not read_only, container.where
            if container.kind == "k8s" and name != "workdir":
                spec = volumes[volume]
                relative = str(PurePosixPath(path).relative_to(mount))
                source = spec.get("secret") or spec.get("configMap") or {}
                items = [i["path"] for i in source.get("items", [])]
                obj = secrets.get(source.get("secretName", "")) or configmaps.get(source.get("name", ""), {})
                assert relative in (items or list(obj.get("stringData", obj.get("data", {})))), (container.where, name)
        kek = container.setting("key_encryption_key_file")
        if container.component == "keys" and kek is not None:
            assert not PurePosixPath(kek).is_relative_to(str(container.setting("workdir"))), "KEK beside shares"


# --- what runs where -----------------------------------------------------------------------------------------


def test_containers_run_a_component_the_migration_or_a_set_up_step() -> None:
    for container in project(all_containers()):
        argv = container.argv
        if container.component:
            assert argv == ["fedcompute", "serve", container.component]
            assert container.component in COMPONENTS
        elif argv[:2] == MIGRATE[:2]:
            assert argv == MIGRATE, container.where
        elif container.raw.get("profiles") == ["tools"]:
            assert argv[0] == "fedcompute", container.where
        else:  # a shell step: the dev certificates (compose) or copying a public file in (verifier's init)
            assert argv[:2] == ["/bin/sh", "-c"] or argv[:2] == ["sh", "-c"], container.where
            assert "fedcompute certs dev" in argv[2] or argv[2].startswith("mkdir -p"), container.where
    for containers in (k8s_containers(), compose_containers()):
        components = [c.component for c in serving(containers)]
        assert set(components) == set(COMPONENTS)
        providers = [c.setting("provider_id") for c in serving(containers) if c.component == "keys"]
        assert len(providers) == len(set(providers)) == 3
        assert 2 <= serving(containers)[0].setting("threshold") <= len(providers)


def test_images_are_the_project_image_or_pinned() -> None:
    images = [c.image for c in all_containers()] + [s["image"] for s in compose()["services"].values()]
    for image in images:
        repository, _, tag = image.rpartition(":")
        assert repository, image
        assert tag not in ("", "latest"), image
        if repository == IMAGE.split(":")[0]:
            assert image == IMAGE, image
    for service in compose()["services"].values():
        if "build" in service:
            assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
            assert service["image"] == IMAGE
    kustomization = load_docs(K8S / "kustomization.yaml")[0]
    assert kustomization["images"] == [{"name": IMAGE.split(":")[0], "newTag": VERSION}]


def test_ports_and_probes_follow_the_settings() -> None:
    for container in serving(k8s_containers()):
        assert container.component is not None
        port = container.setting(PORT_SETTING[container.component])
        metrics = container.setting("metrics_port")
        ports = {p["name"]: p["containerPort"] for p in container.raw["ports"]}
        assert metrics, container.where
        assert sorted(ports.values()) == sorted([port, metrics]), container.where
        assert ports["metrics"] == metrics
        assert container.annotations["prometheus.io/scrape"] == "true", container.where
        assert container.annotations["prometheus.io/port"] == str(metrics), container.where
        for probe in ("startupProbe", "livenessProbe"):
            target = container.raw[probe]["tcpSocket"]["port"]
            assert ports.get(target, target) == port, (container.where, probe)
        assert container.raw["readinessProbe"]["exec"]["command"] == [*HEALTHCHECK, str(port)], container.where
    for container in serving(compose_containers()):
        assert container.component is not None
        port = container.setting(PORT_SETTING[container.component])
        assert container.raw["healthcheck"]["test"] == ["CMD", *HEALTHCHECK, str(port)], container.where


def test_services_and_addresses_reach_the_components() -> None:
    workloads = [d for _, d in k8s_objects() if d["kind"] in ("Deployment", "StatefulSet")]
    serves = {c.workload: c for c in serving(k8s_containers())}
    reach: dict[str, Container] = {}
    for name, service in defined("Service").items():
        selector = service["spec"]["selector"]
        chosen = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(chosen) == 1, name
        container = serves[chosen[0]["metadata"]["name"]]
        ports = {p["name"]: p["containerPort"] for p in container.raw["ports"]}
        for port in service["spec"]["ports"]:
            assert ports.get(port["targetPort"], port["targetPort"]) == port["port"], name
            reach[f"{name}:{port['port']}"] = container
    for workload in workloads:
        if workload["kind"] == "StatefulSet":
            assert workload["spec"]["serviceName"] in defined("Service")
    compose_serving = {c.where: c for c in serving(compose_containers())}
    for containers, targets in ((serving(k8s_containers()), reach), (list(compose_serving.values()), None)):
        for container in containers:
            for component, setting in ADDRESS_SETTING.items():
                addresses = container.setting(setting)
                addresses = addresses if isinstance(addresses, list) else [addresses]
                for address in addresses:
                    host, port = address.rsplit(":", 1)
                    target = compose_serving[host] if targets is None else targets[address]
                    assert target.component == component, (container.where, address)
                    assert int(port) == target.setting(PORT_SETTING[component]), (container.where, address)


def test_each_provider_has_its_own_key_volume_and_no_one_else_has_operator_secrets() -> None:
    statefulsets = [d for _, d in k8s_objects() if d["kind"] == "StatefulSet"]
    keks = []
    for obj in statefulsets:
        assert obj["spec"]["replicas"] == 1, obj["metadata"]["name"]
        assert obj["spec"]["volumeClaimTemplates"], obj["metadata"]["name"]
        assert obj["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
        keks += [v["secret"]["secretName"] for v in obj["spec"]["template"]["spec"]["volumes"] if "kek" in v["name"]]
    assert len(keks) == len(set(keks)) == 3
    compose_keks = [c.env.get(variable("key_encryption_key")) for c in serving(compose_containers())]
    assert len({k for k in compose_keks if k}) == 3
    for container in serving(all_containers()):  # the trust boundary of docs/architecture.md, as `up` keeps it
        given = {v.removeprefix(PREFIX).lower() for v in container.env} & (SECRETS | {"key_encryption_key_file"})
        assert given <= NEEDED_SECRETS[str(container.component)], (container.where, given)


# --- Kubernetes specifics ------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_references_are_defined() -> None:
    kustomization = load_docs(K8S / "kustomization.yaml")[0]
    listed = {K8S / r for r in kustomization["resources"]}
    assert all(p.is_file() for p in listed)
    assert listed == set(K8S.glob("*.yaml")) - {K8S / "kustomization.yaml"}
    applied = {d["metadata"]["name"] for p in listed for d in load_docs(p)}
    docs = OPERATIONS.read_text()
    for path, obj in k8s_objects():
        if obj["kind"] != "Namespace" and path.name != "kustomization.yaml":
            assert obj["metadata"]["namespace"] == "fedcompute", obj["metadata"]["name"]
        if path.parent.name == "templates":  # made by the operator from generated values, as the page says
            name = obj["metadata"]["name"]
            assert re.search(rf"kubectl [^\n]*create (secret generic|configmap) {name}\b", docs), name
    secrets, configmaps = defined("Secret"), defined("ConfigMap")
    for container in k8s_containers():
        volumes = {v["name"]: v for v in container.pod.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in container.claims}
        assert {volume for volume, _ in container.mounts.values()} <= set(volumes) | claims, container.where
        for value in container.env.values():
            if isinstance(value, tuple):
                assert value[2] in secrets[value[1]]["stringData"], (container.where, value)
        for volume in volumes.values():
            if "secret" in volume:
                keys = secrets[volume["secret"]["secretName"]]["stringData"]
                assert {i["key"] for i in volume["secret"].get("items", [])} <= set(keys)
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
                assert volume["configMap"]["name"] in applied or volume["configMap"].get("optional")


def test_pods_are_restricted_and_sized() -> None:
    user = instruction("USER").split(":")[0]
    for container in k8s_containers():
        pod, raw = container.pod, container.raw
        # Kubernetes would inject FEDCOMPUTE_SERVER_PORT=tcp://... for the fedcompute-server Service: refused at start
        assert pod["enableServiceLinks"] is False, container.where
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"]
        assert str(pod["securityContext"]["runAsUser"]) == user
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        context = raw["securityContext"]
        assert context == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                           "capabilities": {"drop": ["ALL"]}}, container.where  # fmt: skip
        assert set(raw["resources"]["requests"]) == {"cpu", "memory"}
        assert raw["resources"]["limits"]["memory"]
        if container.component:
            assert pod["terminationGracePeriodSeconds"] > float(container.setting("shutdown_grace_s")) + 5
            assert mount_for(container, "/tmp"), container.where


# --- image ---------------------------------------------------------------------------------------------------


def test_dockerfile_builds_the_image_the_manifests_expect() -> None:
    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert json.loads(instruction("ENTRYPOINT")) == ["fedcompute"]
    assert json.loads(instruction("CMD")) == ["serve", "server"]
    assert int(instruction("USER").split(":")[0]) >= 1000
    defaults = {Settings.model_fields[s].default for s in set(PORT_SETTING.values())}
    metrics = {c.setting("metrics_port") for c in serving(all_containers())}
    assert {int(p) for p in instruction("EXPOSE").split()} == defaults | metrics
    assert ("COPY", f"deploy/healthcheck.py {HEALTHCHECK[1]}") in steps  # where the probes run it
    text = (DEPLOY / "Dockerfile").read_text()
    assert "python -m venv /opt/venv" in text
    assert HEALTHCHECK[0].startswith("/opt/venv/")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text
    copied = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line]
    sources = {source for line in copied for source in line}
    assert {"pyproject.toml", "fedcompute", "deploy/healthcheck.py"} <= sources
    allowed = [line[1:] for line in (DEPLOY / "Dockerfile.dockerignore").read_text().split() if line[:1] == "!"]
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source == a or source.startswith(f"{a}/") for a in allowed), source


def test_the_migration_command_migrates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_environment(monkeypatch)
    database = tmp_path / "fedcompute.sqlite"
    monkeypatch.setenv(variable("database_url"), f"sqlite:///{database}")
    exec(compile(MIGRATE_CODE, "migrate", "exec"), {})
    with sqlite3.connect(database) as connection:
        assert connection.execute("select version_num from alembic_version").fetchone()


def test_the_probe_asks_the_component_over_its_own_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcompute.rpc.certs import make_dev_certs
    from fedcompute.rpc.serving import build_grpc_server

    healthcheck = _module(DEPLOY / "healthcheck.py")
    certs = make_dev_certs(tmp_path, ["fedcompute-kp-0"])
    _clean_environment(monkeypatch)
    for name, value in [("host", "0.0.0.0"), ("tls_cert_file", certs.cert("keys")), ("tls_key_file", certs.key("keys")),
                        ("tls_ca_file", certs.ca), ("tls_client_auth", "true"), ("health_port", "0")]:  # fmt: skip
        monkeypatch.setenv(variable(name), str(value))
    server = build_grpc_server(Settings.load(), "dealer", "health_port", [], threads=2)  # mTLS, as key services
    try:
        assert healthcheck.main([str(server.port)]) == 0
        server.set_serving(False)
        assert healthcheck.main([str(server.port)]) == 1
    finally:
        server.stop(0)
    assert healthcheck.main([str(server.port)]) == 1
    assert healthcheck.main([]) == 2


def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith(PREFIX)]:
        monkeypatch.delenv(name)


def _module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- compose -------------------------------------------------------------------------------------------------


def test_compose_secrets_come_from_make_env_and_files_exist() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    wanted = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    made = {line.split("=", 1)[0] for line in _module(DEPLOY / "make_env.py").lines()}
    assert wanted == made
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            if volume.startswith("./"):
                assert (DEPLOY / volume.split(":")[0]).exists(), volume
        for condition in service.get("depends_on", {}):
            assert condition in compose()["services"]


def test_prometheus_scrapes_every_component() -> None:
    config = load_docs(DEPLOY / "prometheus" / "compose.yml")[0]
    targets = {t: g["labels"]["component"] for g in config["scrape_configs"][0]["static_configs"] for t in g["targets"]}
    expected = {f"{c.where}:{c.setting('metrics_port')}": c.component for c in serving(compose_containers())}
    assert targets == expected
    kubernetes = load_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"][0]
    assert kubernetes["job_name"] == config["scrape_configs"][0]["job_name"] == "fedcompute"
    assert {r.get("target_label") for r in kubernetes["relabel_configs"]} >= {"component", "instance"}


# --- dashboard -----------------------------------------------------------------------------------------------


def registered_metric_names() -> set[str]:
    """Every series name the components expose: their real registries, plus metrics created with a literal name."""
    from fedcompute.core.telemetry import (
        JobsCollector,
        KeyMetrics,
        LoopMetrics,
        ServerMetrics,
        UpdaterMetrics,
        WorkerMetrics,
    )
    from fedcompute.rpc.metrics import RpcMetrics, announce, process_registry

    registry = process_registry()
    for component in COMPONENTS:  # every component serves gRPC: its own port or FEDCOMPUTE_HEALTH_PORT
        RpcMetrics.create(component, registry)
        announce(registry, component, VERSION)
    for component in _literal_arguments("LoopMetrics.create"):
        LoopMetrics.create(component, registry)
    for create in (ServerMetrics.create, KeyMetrics.create, WorkerMetrics.create, UpdaterMetrics.create):
        create(registry)
    registry.register(JobsCollector(dict, ["PENDING"]))
    families = [(f.name, f.type) for f in registry.collect()] + list(_literal_metrics())
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["", "_sum", "_count", "_created"], "info": ["_info"]}  # fmt: skip
    return {name + s for name, kind in families for s in suffixes.get(kind, [""])}


METRIC_CALLS = ("LoopMetrics.create", "Counter", "Gauge", "Histogram", "Summary", "Info")


@functools.cache
def _calls() -> list[ast.Call]:
    """Calls in the package's modules that may create a metric."""
    texts = [p.read_text() for p in (ROOT / "fedcompute").rglob("*.py") if "v1" not in p.parts]
    trees = [ast.parse(t) for t in texts if any(f"{name}(" in t for name in METRIC_CALLS)]
    return [node for tree in trees for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _literal_arguments(function: str) -> set[str]:
    """The first arguments of calls to ``function`` that are string literals (f-strings are skipped)."""
    return {
        call.args[0].value
        for call in _calls()
        if ast.unparse(call.func) == function
        and call.args
        and isinstance(call.args[0], ast.Constant)
        and isinstance(call.args[0].value, str)
    }


def _literal_metrics() -> Iterator[tuple[str, str]]:
    kinds = {name: name.lower() for name in METRIC_CALLS[1:]}
    for kind, name in kinds.items():
        yield from ((value, name) for value in _literal_arguments(kind))


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers left once strings, label matchers, ranges, grouping
    clauses and Grafana variables are removed, that are not calls, keywords or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\{?\w+\}?", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        after = text[match.end() :].lstrip()
        if not after.startswith("(") and match.group() not in {"and", "or", "unless", "bool", "offset", "inf"}:
            names.add(match.group())
    return names


def test_promql_names_are_found() -> None:
    expr = 'histogram_quantile(0.95, sum by (le, method) (rate(a_bucket{code!="OK"}[$__rate_interval]))) / b'
    assert promql_metric_names(expr) == {"a_bucket", "b"}
    assert promql_metric_names("time() - max by (instance) (c)") == {"c"}


def test_dashboard_uses_only_metrics_the_code_registers() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "fedcompute.json").read_text())
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    known = registered_metric_names() | PROMETHEUS_SERIES
    used = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names, target["expr"]
            assert names <= known, (panel["title"], names - known)
            used |= names
    assert len(used) > 30


# --- operations page -----------------------------------------------------------------------------------------


# `fedcompute ARGS` where a shell runs it, or ARGS given to the image's fedcompute in Compose
COMMAND = re.compile(
    r"(?:(?:^|\$\(|--\s|&&\s|;\s)\s*(?:[A-Z][A-Z0-9_]*=\S*\s+)*fedcompute|run --rm operator"
    r"|--entrypoint fedcompute migrate)\s+([^|;&)`>]*)"
)


def _cli_lines() -> Iterator[str]:
    """The CLI arguments of every command in the page's code blocks (continuation lines joined)."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", OPERATIONS.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            yield from COMMAND.findall(line)


def test_the_operations_page_uses_real_commands_options_and_files() -> None:
    root = typer.main.get_command(cli_app)
    checked = 0
    for line in _cli_lines():
        command: Any = root
        words = line.split()
        while words and words[0] in getattr(command, "commands", {}):
            command = command.commands[words.pop(0)]
        assert command is not root, line
        options = {o for p in command.params for o in p.opts} | {"--help"}
        assert {w.split("=")[0] for w in words if w.startswith("--")} <= options, line
        checked += 1
    assert checked >= 8
    for path in re.findall(r"\bdeploy/[\w./-]+\w", OPERATIONS.read_text()):
        assert (ROOT / path).exists(), path
