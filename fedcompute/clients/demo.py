"""`fedcompute demo`: the whole suite on the embedded default, a simulated fleet, a table, a plot, JSON."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import torch
from tqdm import tqdm

from fedcompute.clients.builder import TaskBuilder
from fedcompute.clients.dataset import Split, non_iid_shards, train_test_split
from fedcompute.clients.device import Trust, download
from fedcompute.clients.fleet import Fleet
from fedcompute.clients.training import evaluate, train_central
from fedcompute.clients.typed import KeyClient, ResourceClient, TaskManagementClient
from fedcompute.core import checkpoints, plans
from fedcompute.core.plans import Optimizer, Training
from fedcompute.core.secrets import operator_token
from fedcompute.core.settings import Settings
from fedcompute.keys.trust import load_trusted
from fedcompute.rpc.channels import channel_for
from fedcompute.suite import start_suite
from fedcompute.v1 import key_pb2
from fedcompute.v1 import task_management_pb2 as tm

log = structlog.get_logger("fedcompute.demo")
ARCHITECTURE = "digits-mlp-v1"
LOCAL_TRAINING = {"local_epochs": 10, "batch_size": 16, "learning_rate": 0.1, "momentum": 0.9}
"""Local training the demo's plans use (tuned for 20 non-IID devices, 16 reporting per round, 5 rounds)."""
POPULATION = "demo-digits"
FINISHED = {
    tm.TASK_STATUS_COMPLETED,
    tm.TASK_STATUS_CANCELED,
    tm.TASK_STATUS_FAILED,
    tm.TASK_STATUS_BUDGET_EXHAUSTED,
}


DEMO_SETTINGS: dict[str, object] = {
    "server_port": 0,
    "key_service_port": 0,
    "verifier_port": 0,
    "retry_delay_min_s": 0.05,
    "retry_delay_max_s": 0.3,
    "poll_interval_s": 0.05,
    "lease_s": 30.0,
    "log_json": False,
    "log_level": "WARNING",
    "job_backoff_max_s": 2.0,
    "plaintext": True,
    "health_port": 0,
    "device_rate_per_s": 0.0,
}
"""Everything on free loopback ports, short retry windows and polls, plaintext on loopback, no per-address rate
limit (every simulated device shares 127.0.0.1): a fleet on one machine, not a real one."""


@dataclass(frozen=True)
class DemoPrivacy:
    """The demo's DP settings; the assumed population is the fleet itself (q = report goal / devices)."""

    epsilon: float
    delta: float
    clip: float
    adaptive_clip: bool
    noise_metrics: bool = False


def default_delta(devices: int) -> float:
    """Below 1/N for any fleet size N, and no looser than 1e-3."""
    return float(min(1e-3, 1 / devices**1.1))


@dataclass(frozen=True)
class RoundRow:
    round: int
    model_version: int
    contributions: int
    accuracy: float
    accepted_contributions: int
    rejected_contributions: int
    epsilon: float = 0.0
    clip_norm: float = 0.0
    device_metrics: dict[str, float] | None = None  # the devices' own training metrics, aggregated (noised, DP)


@dataclass(frozen=True)
class DemoResult:
    rounds: list[RoundRow]
    final_accuracy: float
    initial_accuracy: float
    central_accuracy: float
    devices: int
    key_services: int
    threshold: int
    report_goal: int
    task_id: str
    database: str
    elapsed_s: float
    dp: dict[str, float | bool | str] | None = None
    audit_findings: list[str] | None = None  # `fedcompute audit` of the task at the end: [] means clean
    model: str = ARCHITECTURE
    parameters: int = 0

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["rounds"] = [asdict(r) for r in self.rounds]
        return data


def task_spec(
    devices: int, rounds: int, seed: int, privacy: DemoPrivacy | None = None, model: str | None = None
) -> tm.TaskSpec:
    """The demo task: the built-in MLP, or (``model``) a user's model function built by the TaskBuilder."""
    hp = LOCAL_TRAINING
    report_goal = max(1, math.ceil(0.8 * devices))
    dp = tm.DpConfig()
    if privacy:
        dp = tm.DpConfig(
            enabled=True,
            target_epsilon=privacy.epsilon,
            target_delta=privacy.delta,
            assumed_population_size=devices,
            l2_clip_norm=privacy.clip,
            adaptive_clip=privacy.adaptive_clip,
            noise_metrics=privacy.noise_metrics,
        )
    common = {"dp": dp, "population_name": POPULATION, "rounds": rounds, "report_goal": report_goal}
    if model:
        builder = TaskBuilder.from_function(
            model,
            optimizer=Optimizer("sgd", float(hp["learning_rate"]), momentum=float(hp["momentum"])),
            training=Training(int(hp["local_epochs"]), int(hp["batch_size"])),
        )
        built = builder.build()
        log.warning("model_built", summary=built.summary())
        return builder.spec(built, max_cohort=devices, **common)
    return tm.TaskSpec(
        model_architecture=ARCHITECTURE,
        initial_seed=seed,
        max_cohort=devices,
        hyperparameters=tm.TrainingHyperparameters(
            local_epochs=int(hp["local_epochs"]),
            batch_size=int(hp["batch_size"]),
            learning_rate=float(hp["learning_rate"]),
            momentum=float(hp["momentum"]),
        ),
        **common,  # type: ignore[arg-type]
    )


def run_demo(
    settings: Settings,
    devices: int,
    rounds: int,
    seed: int,
    timeout_s: float,
    privacy: DemoPrivacy | None = None,
    model: str | None = None,
) -> DemoResult:
    started = time.monotonic()
    torch.set_num_threads(1)  # many small models on few cores: avoid thread oversubscription
    train, test = train_test_split(seed)
    shards = non_iid_shards(train, devices, seed)
    suite = start_suite(settings)
    fleet: Fleet | None = None
    try:
        channel = channel_for(suite.settings, suite.server_address)
        operators = TaskManagementClient(channel, settings.rpc_timeout_s, operator_token(suite.settings))
        resources = ResourceClient(channel, settings.rpc_timeout_s)
        task = suite.create_task(task_spec(devices, rounds, seed, privacy, model))
        plan = plans.parse(download(resources, task.plan))
        start = checkpoints.decode(
            download(
                resources,
                operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task.task_id)).versions[0].checkpoint,
            )
        )
        _wait_for_key(suite.settings, suite.key_addresses[0])
        trust = Trust(load_trusted(suite.settings.trusted_providers_path()), settings.threshold)
        fleet = Fleet(suite.server_address, POPULATION, shards, seed, trust, max_sleep_s=0.5).start()
        rows, initial = _follow(operators, resources, task.task_id, rounds, test, timeout_s, plan)
        findings = suite.audit(task.task_id).findings
    finally:
        if fleet:
            fleet.stop()
        suite.stop()
    central = train_central(plan, start, train, 30, seed)
    return DemoResult(
        rounds=rows,
        final_accuracy=rows[-1].accuracy if rows else initial,
        initial_accuracy=initial,
        central_accuracy=evaluate(plan, central, test)["accuracy"],
        devices=devices,
        key_services=settings.key_services,
        threshold=settings.threshold,
        report_goal=task.spec.report_goal,
        task_id=task.task_id,
        database="postgres" if settings.resolved_database_url().startswith("postgresql") else "sqlite",
        elapsed_s=round(time.monotonic() - started, 1),
        dp=_dp_summary(task) if privacy else None,
        audit_findings=findings,
        model=task.model_name,
        parameters=task.parameter_count,
    )


def _wait_for_key(settings: Settings, key_address: str) -> None:
    """The dealer runs the population's key ceremony within a poll interval; start the fleet after it."""
    keys = KeyClient(channel_for(settings, key_address), settings.rpc_timeout_s)
    deadline = time.monotonic() + settings.rpc_timeout_s
    request = key_pb2.GetPublicKeysRequest(population_name=POPULATION)
    while not keys.get_public_keys(request).keys:
        if time.monotonic() > deadline:
            raise TimeoutError("no key ceremony completed for the demo population")
        time.sleep(0.05)


def _dp_summary(task: tm.Task) -> dict[str, float | bool | str]:
    dp = task.spec.dp
    return {
        "target_epsilon": dp.target_epsilon,
        "delta": dp.target_delta,
        "noise_multiplier": dp.noise_multiplier,
        "clip": dp.l2_clip_norm,
        "adaptive_clip": dp.adaptive_clip,
        "assumed_population": dp.assumed_population_size,
        "accountant": dp.accountant,
    }


def _follow(
    operators: TaskManagementClient,
    resources: ResourceClient,
    task_id: str,
    rounds: int,
    test: Split,
    timeout_s: float,
    plan: plans.Plan,
) -> tuple[list[RoundRow], float]:
    """Watch model versions appear; evaluate each on the held-out split; stop when the task finishes."""
    rows: list[RoundRow] = []
    initial = 0.0
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    with tqdm(total=rounds, desc="rounds", unit="round") as bar:
        while True:
            # The status first: a task that is finished now has published every version listed after it.
            status = operators.get_task(tm.GetTaskRequest(task_id=task_id)).task
            versions = operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task_id)).versions
            for version in versions:
                if version.version in seen:
                    continue
                seen.add(version.version)
                weights = checkpoints.decode(download(resources, version.checkpoint))
                accuracy = evaluate(plan, weights, test)["accuracy"]
                if version.version == 1:
                    initial = accuracy
                    continue
                it = _completed_round(operators, task_id, version.round)
                rows.append(
                    RoundRow(
                        version.round,
                        version.version,
                        version.contributions,
                        round(accuracy, 4),
                        it.accepted_contributions if it else 0,
                        it.rejected_contributions if it else 0,
                        epsilon=round(version.epsilon_spent, 4),
                        clip_norm=round(version.clip_norm, 4),
                        device_metrics={m.name: round(m.value, 4) for m in it.metrics} if it else None,
                    )
                )
                bar.set_postfix(accuracy=f"{accuracy:.3f}")
                bar.update(1)
            if status.status in FINISHED and len(seen) == len(versions):
                if status.status not in (tm.TASK_STATUS_COMPLETED, tm.TASK_STATUS_BUDGET_EXHAUSTED):
                    raise RuntimeError(f"task ended {tm.TaskStatus.Name(status.status)}: {status.status_reason}")
                return rows, initial
            if time.monotonic() > deadline:
                raise TimeoutError(f"the demo did not finish within {timeout_s:.0f} s")
            time.sleep(0.2)


def _completed_round(operators: TaskManagementClient, task_id: str, round_: int) -> tm.Iteration | None:
    """The round attempt that completed (its counts and aggregated device metrics)."""
    for it in operators.list_iterations(tm.ListIterationsRequest(task_id=task_id)).iterations:
        if it.round == round_ and it.status == tm.ITERATION_STATUS_COMPLETED:
            return it
    return None


def format_table(result: DemoResult) -> str:
    dp = result.dp is not None
    extra = (f"  {'epsilon':>8}  {'clip':>7}" if dp else "") + f"  {'device loss':>11}  {'device acc':>10}"
    lines = [
        f"model {result.model}: {result.parameters:,} parameters",
        f"{'round':>5}  {'model version':>13}  {'contributions':>13}  {'rejected':>8}  {'accuracy':>8}{extra}",
        f"{0:>5}  {1:>13}  {'-':>13}  {'-':>8}  {result.initial_accuracy:>8.4f}"
        + (f"  {0:>8.3f}  {'-':>7}" if dp else "")
        + f"  {'-':>11}  {'-':>10}",
    ]
    for r in result.rounds:
        m = r.device_metrics or {}  # under DP: noised, or absent when the policy leaves them out
        tail = (f"  {r.epsilon:>8.3f}  {r.clip_norm:>7.3f}" if dp else "") + (
            f"  {_fmt(m.get('loss')):>11}  {_fmt(m.get('accuracy')):>10}"
        )
        lines.append(
            f"{r.round:>5}  {r.model_version:>13}  {r.contributions:>13}  {r.rejected_contributions:>8}  "
            f"{r.accuracy:>8.4f}{tail}"
        )
    if result.dp:
        lines.append(
            f"DP: ε spent {result.rounds[-1].epsilon if result.rounds else 0:.3f} of {result.dp['target_epsilon']:g} "
            f"(δ={result.dp['delta']:.2g}, z={result.dp['noise_multiplier']:.3f}, "
            f"q={result.report_goal}/{result.dp['assumed_population']}, {result.dp['accountant']})"
        )
    findings = result.audit_findings or []
    lines.append(f"audit of the key services' release logs: {'clean' if not findings else '; '.join(findings)}")
    lines.append(
        f"final held-out accuracy {result.final_accuracy:.4f} with {result.devices} devices "
        f"(report goal {result.report_goal}); centrally trained baseline {result.central_accuracy:.4f}; "
        f"{result.key_services} key services, threshold {result.threshold}; "
        f"{result.elapsed_s:.0f} s on {result.database}"
    )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_plot(result: DemoResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    xs = [0] + [r.round for r in result.rounds]
    ys = [result.initial_accuracy] + [r.accuracy for r in result.rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, marker="o", label="federated (held-out)")
    ax.axhline(result.central_accuracy, color="grey", linestyle="--", label="central baseline")
    device = [
        (r.round, (r.device_metrics or {})["accuracy"]) for r in result.rounds if "accuracy" in (r.device_metrics or {})
    ]
    if device:
        ax.plot(*zip(*device, strict=True), marker="^", linestyle=":", label="devices' own (aggregated)")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"fedcompute demo: {result.devices} devices, digits, {result.model}")
    if result.dp:
        eps_ax = ax.twinx()
        eps_ax.plot(xs, [0.0] + [r.epsilon for r in result.rounds], color="tab:red", marker="s", label="ε spent")
        eps_ax.set_ylabel("ε spent", color="tab:red")
        eps_ax.legend(loc="center right")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(result: DemoResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
