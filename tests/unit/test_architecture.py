"""The code's shape: import direction between packages, and every RPC has a servicer and a typed client method."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from fedcompute.attestation.verifier import VerifierServicer
from fedcompute.clients import typed
from fedcompute.keys.servicer import KeyServicer
from fedcompute.server.api_devices import ResourceServicer, TaskAssignmentServicer, UploadServicer
from fedcompute.server.api_operators import TaskManagementServicer
from fedcompute.server.api_workers import AggregationServicer

ROOT = Path(__file__).resolve().parents[2] / "fedcompute"

# package -> packages it must never import
FORBIDDEN = {
    "core": {"store", "server", "keys", "aggregator", "modelupdater", "clients", "rpc", "v1", "grpc", "sqlalchemy"},
    "store": {"server", "keys", "aggregator", "modelupdater", "clients", "rpc", "grpc"},
    "keys": {"store", "server", "aggregator", "modelupdater", "clients", "sqlalchemy"},
    "aggregator": {"store", "server", "modelupdater", "sqlalchemy"},
    "modelupdater": {"server", "keys", "aggregator", "clients", "rpc", "grpc"},
    "rpc": {"store", "server", "keys", "aggregator", "modelupdater", "clients", "sqlalchemy"},
    "attestation": {"store", "server", "keys", "aggregator", "modelupdater", "clients", "sqlalchemy"},
}
SERVICE_MODULES = ["tasks", "assignment", "uploads", "resources", "jobs", "operator_auth"]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    found = set()
    for name in names:
        parts = name.split(".")
        found.add(parts[1] if parts[0] == "fedcompute" and len(parts) > 1 else parts[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package: str) -> None:
    for path in (ROOT / package).rglob("*.py"):
        bad = _imports(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_services_never_import_grpc_or_stubs() -> None:
    for name in SERVICE_MODULES:
        imports = _imports(ROOT / "server" / f"{name}.py")
        assert not imports & {"grpc"}, name
        assert "v1" not in imports or name == "assignment", name  # assignment relays the key message as-is


def _rpcs(service: str) -> list[str]:
    protos = (ROOT.parent / "protos" / "fedcompute" / "v1").glob("*.proto")
    text = "\n".join(p.read_text() for p in protos)
    body = re.search(rf"service {service} \{{(.*?)\n\}}", text, re.S)
    assert body, service
    return re.findall(r"rpc (\w+)\(", body.group(1))


@pytest.mark.parametrize(
    ("service", "servicer", "client"),
    [
        ("TaskManagementService", TaskManagementServicer, typed.TaskManagementClient),
        ("TaskAssignmentService", TaskAssignmentServicer, typed.TaskAssignmentClient),
        ("UploadService", UploadServicer, typed.UploadClient),
        ("ResourceService", ResourceServicer, typed.ResourceClient),
        ("AggregationService", AggregationServicer, typed.AggregationClient),
        ("KeyService", KeyServicer, typed.KeyClient),
        ("VerifierService", VerifierServicer, typed.VerifierClient),
    ],
)
def test_every_rpc_has_a_servicer_and_a_client_method(service: str, servicer: type, client: type) -> None:
    rpcs = _rpcs(service)
    assert rpcs
    for rpc in rpcs:
        assert rpc in servicer.__dict__, f"{servicer.__name__} lacks {rpc}"
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", rpc).lower()
        assert snake in client.__dict__, f"{client.__name__} lacks {snake}"


def test_modules_are_small() -> None:
    sizes = {p: len(p.read_text().splitlines()) for p in ROOT.rglob("*.py") if "v1" not in p.parts}
    too_big = {str(p.relative_to(ROOT)): n for p, n in sizes.items() if n > 400}
    assert not too_big
    importlib.import_module("fedcompute.cli")


def test_key_services_verifier_and_dealer_start_without_torch(tmp_path: Path) -> None:
    """They read policies and plans as data; torch (seconds to import, hundreds of MB) is for those that train,
    aggregate or build plans. The probe takes `fedcompute serve keys`'s own path (the CLI, the component runtime,
    a key service started and stopped) and imports what the verifier and the dealer need to start: the key
    services once imported torch through a helper in the suite module and took 1.8 s instead of 0.3 s to serve."""
    import subprocess
    import sys

    probe = (
        "import sys, fedcompute.cli\n"
        "from fedcompute.components import start_component\n"
        "from fedcompute.core.settings import Settings\n"
        "import fedcompute.attestation.app, fedcompute.clients.dealer, fedcompute.keys.trust\n"
        f"settings = Settings(workdir={str(tmp_path)!r}, plaintext=True, key_service_port=0)\n"
        "start_component('keys', settings).stop(0)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr


# a key service as `serve keys` builds it, in a fresh interpreter: which policies make it load Opacus' accountants
# (and torch with them), printed as it goes; argv[1]: its workdir
_DP_PROBE = """
import sys, time
from fedcompute.clients.typed import KeyClient
from fedcompute.components import start_component
from fedcompute.core.policy import AccessPolicy, PolicyDp
from fedcompute.core.secrets import key_admin_token
from fedcompute.core.settings import Settings
from fedcompute.keys.policy import to_message
from fedcompute.rpc.channels import open_channel
from fedcompute.v1 import key_pb2

def loaded(wait_s):
    deadline = time.monotonic() + wait_s
    while "opacus.accountants" not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.05)
    return "opacus.accountants" in sys.modules

settings = Settings(workdir=sys.argv[1], plaintext=True, key_service_port=0)
running = start_component("keys", settings)
print("started", loaded(0), "torch" in sys.modules, flush=True)
client = KeyClient(open_channel(running.address), 30.0, key_admin_token(settings))
if sys.argv[2] == "register":
    plain = AccessPolicy("plain", "pop", ("sha256:" + "11" * 32,), 2, None, plan_sha256_hex="cd" * 32)
    client.register_policy(key_pb2.RegisterPolicyRequest(policy=to_message(plain)))
    print("plain", loaded(1.0), flush=True)
    dp = PolicyDp(1.0, 2.0, 2, epsilon=5.0, delta=1e-5, accountant="rdp", assumed_population_size=10)
    private = AccessPolicy("private", "pop", ("sha256:" + "11" * 32,), 2, dp, plan_sha256_hex="cd" * 32)
    client.register_policy(key_pb2.RegisterPolicyRequest(policy=to_message(private)))
else:  # a restart: its start began the import in the background; a release waits for that one, not a second
    from fedcompute.core import privacy
    privacy.load_accountants()
    print("joined", not privacy._loader[0].is_alive(), flush=True)
print("dp", loaded(120), flush=True)
running.stop(0)
"""


def test_a_key_service_loads_the_dp_accountants_once_it_holds_a_dp_policy_not_at_its_first_release(
    tmp_path: Path,
) -> None:
    """Opacus' accountants import torch (8.7 s on a loaded 2-core VM): a key service that imported them in its first
    DP release, under its store's lock, ran past a worker's deadline. It starts without them, does not load them
    for a policy without DP, loads them in the background when a DP policy is registered (the registration does not
    wait), and at start when it already holds one (a restart)."""
    import subprocess
    import sys

    def probe(step: str) -> dict[str, list[str]]:
        done = subprocess.run(
            [sys.executable, "-c", _DP_PROBE, str(tmp_path), step],
            capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}

    first = probe("register")
    assert first["started"] == ["False", "False"]  # neither the accountants nor torch at start
    assert first["plain"] == ["False"]  # a policy without DP needs no accountant
    assert first["dp"] == ["True"]  # loaded once a DP policy was registered
    restarted = probe("restart")  # the same key service again, its store holding the DP policy
    assert restarted["joined"] == ["True"]
    assert restarted["dp"] == ["True"]
