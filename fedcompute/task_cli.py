"""`fedcompute task`: create (a built-in model or your own, via the TaskBuilder), get, list, cancel; and the
helpers every operator command shares."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf.json_format import MessageToDict

from fedcompute.core.logs import configure_logging
from fedcompute.core.settings import SettingError, Settings

ServerOpt = Annotated[
    str,
    typer.Option("--server", envvar="FEDCOMPUTE_SERVER_ADDRESS", help="Address of the fedcompute server (host:port)."),
]
task_app = typer.Typer(help="Operator commands for tasks.", no_args_is_help=True)
TOKEN_HINT = (
    "set FEDCOMPUTE_OPERATOR_TOKEN to a valid operator token: an admin makes one with "
    "`fedcompute token create --name NAME --role operator`; `fedcompute up` registers WORKDIR/operator/operator-token"
)


def settings_or_exit(**overrides: Any) -> Settings:
    """The settings, or one line naming the bad variable and exit 2."""
    try:
        return Settings.load(**overrides)
    except SettingError as exc:
        typer.echo(f"invalid setting: {exc}", err=True)
        raise typer.Exit(2) from None


def operators(server: str) -> Any:
    """TaskManagementService as the operator: every call presents FEDCOMPUTE_OPERATOR_TOKEN."""
    from fedcompute.clients.typed import TaskManagementClient
    from fedcompute.rpc.channels import channel_for

    settings = settings_or_exit()
    return TaskManagementClient(setting_or_exit(lambda: channel_for(settings, server)), 30.0, settings.operator_token)


def setting_or_exit(build: Any) -> Any:
    """``build()``, or one line naming the setting that stops it (TLS files, plaintext), and exit 2."""
    try:
        return build()
    except SettingError as exc:
        typer.echo(f"invalid setting: {exc}", err=True)
        raise typer.Exit(2) from None


def print_message(message: Any) -> None:
    typer.echo(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))


def call(action: Any) -> None:
    try:
        action()
    except grpc.RpcError as exc:
        typer.echo(f"{exc.code().name}: {exc.details()}", err=True)
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            typer.echo(TOKEN_HINT, err=True)
        raise typer.Exit(1) from None


@task_app.command("create")
def task_create(
    population: Annotated[str, typer.Option(help="Population name (required unless --spec names it).")] = "",
    server: ServerOpt = "127.0.0.1:8700",
    spec_file: Annotated[
        Path | None,
        typer.Option(
            "--spec",
            help='A whole TaskSpec as JSON (proto field names, e.g. {"population_name": ..., "dp": {...}}); '
            "replaces every other spec flag but --model.",
        ),
    ] = None,
    dp: Annotated[bool, typer.Option("--dp", help="Train with user-level differential privacy.")] = False,
    epsilon: Annotated[float, typer.Option(help="DP: the task's budget ε.")] = 10.0,
    delta: Annotated[float, typer.Option(help="DP: δ.")] = 1e-5,
    population_size: Annotated[int, typer.Option(help="DP: assumed population N (q = report goal / N).")] = 10_000,
    clip: Annotated[float, typer.Option(help="DP: L2 clip norm C.")] = 1.0,
    noise_metrics: Annotated[
        bool, typer.Option("--noise-metrics", help="DP: release devices' metrics noised.")
    ] = False,
    architecture: Annotated[str, typer.Option(help="A built-in model (ignored with --model).")] = "digits-mlp-v1",
    model: Annotated[
        str, typer.Option(help="Your model: PATH.py:FUNCTION or MODULE:FUNCTION returning (nn.Module, example batch).")
    ] = "",
    loss: Annotated[str, typer.Option(help="--model: cross_entropy, mse or bce_with_logits.")] = "cross_entropy",
    optimizer: Annotated[str, typer.Option(help="--model: sgd or adam.")] = "sgd",
    metric: Annotated[list[str] | None, typer.Option(help="--model: loss, accuracy, auc (repeat).")] = None,
    collection: Annotated[str, typer.Option(help="--model: the devices' example collection.")] = "digits",
    max_steps: Annotated[int, typer.Option(min=0, help="--model: local steps per round (0: no limit).")] = 0,
    evaluation: Annotated[
        bool, typer.Option("--evaluation", help="--model: evaluate only (metrics, no training).")
    ] = False,
    rounds: Annotated[int, typer.Option()] = 5,
    report_goal: Annotated[int, typer.Option()] = 16,
    max_cohort: Annotated[int, typer.Option()] = 20,
    seed: Annotated[int, typer.Option(help="Initial weights seed.")] = 0,
    weights: Annotated[Path | None, typer.Option(help="Initial weights (safetensors).")] = None,
    min_client_version: Annotated[str, typer.Option()] = "",
    max_client_version: Annotated[str, typer.Option()] = "",
    local_epochs: Annotated[int, typer.Option()] = 5,
    batch_size: Annotated[int, typer.Option()] = 16,
    learning_rate: Annotated[float, typer.Option()] = 0.1,
    momentum: Annotated[float, typer.Option()] = 0.9,
    min_clients: Annotated[int, typer.Option(help="Fewest contributions a release may cover (0: report goal).")] = 0,
    round_deadline_s: Annotated[int, typer.Option(help="Round deadline in seconds (0: default 3600).")] = 0,
    upload_deadline_s: Annotated[int, typer.Option(help="Upload deadline after reporting (0: 600).")] = 0,
    local_compute_deadline_s: Annotated[int, typer.Option(help="Report deadline after check-in (0: 600).")] = 0,
) -> None:
    """Create a training task: register its access policy with every key service (FEDCOMPUTE_KEY_SERVICE_ADDRESSES,
    the operator's FEDCOMPUTE_KEY_ADMIN_TOKEN), then create it at the server."""
    from fedcompute.attestation.measure import measure
    from fedcompute.clients.builder import BuildError, TaskBuilder, check_plan_size
    from fedcompute.clients.dealer import operator_key_clients
    from fedcompute.clients.operator import RegistrationFailed, create_task
    from fedcompute.core.errors import FedcomputeError, InvalidArgument
    from fedcompute.core.plans import ExampleSelector, Optimizer, Training
    from fedcompute.core.secrets import key_admin_token
    from fedcompute.keys.trust import load_trusted
    from fedcompute.v1 import task_management_pb2 as tm

    settings = settings_or_exit()
    fields: dict[str, Any] = {
        "model_architecture": architecture,
        "initial_seed": seed,
        "initial_weights": weights.read_bytes() if weights else b"",
    }
    if model:  # built and checked here, before anything is registered or stored
        try:
            builder = TaskBuilder.from_function(
                model,
                loss=loss,
                optimizer=Optimizer(optimizer, learning_rate, momentum=momentum if optimizer == "sgd" else 0.0),
                training=Training(local_epochs, batch_size, max_steps),
                metrics=tuple(metric or ("loss", "accuracy")),
                example_selector=ExampleSelector(collection),
                kind="evaluation" if evaluation else "training",
            )
            built = builder.build()
            check_plan_size(built, settings.max_plan_bytes)
        except (BuildError, InvalidArgument) as exc:
            typer.echo(f"task not created: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(built.summary(), err=True)
        fields = {"plan": built.plan_bytes, "initial_weights": built.initial_weights, "kind": 2 if evaluation else 1}
    spec = tm.TaskSpec(
        population_name=population,
        dp=tm.DpConfig(
            enabled=True,
            target_epsilon=epsilon,
            target_delta=delta,
            assumed_population_size=population_size,
            l2_clip_norm=clip,
            noise_metrics=noise_metrics,
        )
        if dp
        else None,
        rounds=rounds,
        report_goal=report_goal,
        max_cohort=max_cohort,
        min_client_version=min_client_version,
        max_client_version=max_client_version,
        hyperparameters=tm.TrainingHyperparameters(
            local_epochs=local_epochs, batch_size=batch_size, learning_rate=learning_rate, momentum=momentum
        ),
        min_clients=min_clients,
        round_deadline_s=round_deadline_s,
        upload_deadline_s=upload_deadline_s,
        local_compute_deadline_s=local_compute_deadline_s,
        **fields,
    )
    if spec_file is not None:
        spec = _spec_from_file(spec_file, fields if model else {})
    if not spec.population_name:
        typer.echo("task not created: name the population (--population, or population_name in --spec)", err=True)
        raise typer.Exit(1)
    configure_logging(json_lines=False, level=logging.WARNING)
    measurements = settings.allowed_measurements or [measure()]
    try:
        keys = operator_key_clients(settings, key_admin_token(settings))
        trusted = load_trusted(settings.trusted_providers_path())
        call(
            lambda: print_message(create_task(operators(server), keys, trusted, settings.threshold, spec, measurements))
        )
    except InvalidArgument as exc:
        typer.echo(f"INVALID_ARGUMENT: {exc.public_message}", err=True)
        raise typer.Exit(1) from None
    except (FedcomputeError, RegistrationFailed, OSError, ValueError) as exc:  # ValueError: no trusted providers
        typer.echo(f"task not created: {exc}", err=True)
        raise typer.Exit(1) from None


def _spec_from_file(path: Path, model_fields: dict[str, Any]) -> Any:
    """The TaskSpec a JSON file holds (proto field names); a --model's plan and weights go on top."""
    from google.protobuf.json_format import ParseDict, ParseError

    from fedcompute.v1 import task_management_pb2 as tm

    try:
        spec = ParseDict(json.loads(path.read_text()), tm.TaskSpec())
    except (OSError, ValueError, ParseError) as exc:  # JSONDecodeError is a ValueError; ParseError names the field
        typer.echo(f"task not created: spec file {path}: {exc}", err=True)
        raise typer.Exit(1) from None
    for name, value in model_fields.items():
        if name in ("plan", "initial_weights", "kind"):
            setattr(spec, name, value)
    return spec


@task_app.command("evaluate")
def task_evaluate(
    task_id: str,
    server: ServerOpt = "127.0.0.1:8700",
    version: Annotated[int, typer.Option(help="Model version to evaluate (0: the latest).")] = 0,
    population: Annotated[str, typer.Option(help="Devices to evaluate on (default: the task's population).")] = "",
    rounds: Annotated[int, typer.Option()] = 1,
    report_goal: Annotated[int, typer.Option()] = 16,
    max_cohort: Annotated[int, typer.Option()] = 20,
) -> None:
    """Evaluate a published version of a task's model on devices: a new EVALUATION task with the same plan and that
    version's weights; devices report metrics only (in their envelopes) and no version is published."""
    from fedcompute.attestation.measure import measure
    from fedcompute.clients.builder import BuildError, evaluation_spec
    from fedcompute.clients.dealer import operator_key_clients
    from fedcompute.clients.device import download
    from fedcompute.clients.operator import RegistrationFailed, create_task
    from fedcompute.clients.typed import ResourceClient
    from fedcompute.core.errors import FedcomputeError
    from fedcompute.core.secrets import key_admin_token
    from fedcompute.keys.trust import load_trusted
    from fedcompute.rpc.channels import channel_for
    from fedcompute.v1 import task_management_pb2 as tm

    settings = settings_or_exit()
    configure_logging(json_lines=False, level=logging.WARNING)

    def run() -> None:
        ops = operators(server)
        task = ops.get_task(tm.GetTaskRequest(task_id=task_id)).task
        versions = ops.list_model_versions(tm.ListModelVersionsRequest(task_id=task_id)).versions
        chosen = [v for v in versions if v.version == (version or task.latest_model_version)]
        if not chosen:
            raise FedcomputeError(f"task {task_id} has no model version {version}")
        resources = ResourceClient(channel_for(settings, server), settings.rpc_timeout_s)
        spec = evaluation_spec(
            download(resources, task.plan),
            download(resources, chosen[0].checkpoint),
            population_name=population or task.spec.population_name,
            rounds=rounds,
            report_goal=report_goal,
            max_cohort=max_cohort,
        )
        keys = operator_key_clients(settings, key_admin_token(settings))
        trusted = load_trusted(settings.trusted_providers_path())
        measurements = settings.allowed_measurements or [measure()]
        print_message(create_task(ops, keys, trusted, settings.threshold, spec, measurements))

    try:
        call(run)
    except (FedcomputeError, BuildError, RegistrationFailed, OSError) as exc:
        typer.echo(f"task not created: {exc}", err=True)
        raise typer.Exit(1) from None


@task_app.command("get")
def task_get(task_id: str, server: ServerOpt = "127.0.0.1:8700") -> None:
    """Show a task."""
    from fedcompute.v1 import task_management_pb2 as tm

    call(lambda: print_message(operators(server).get_task(tm.GetTaskRequest(task_id=task_id)).task))


@task_app.command("list")
def task_list(
    server: ServerOpt = "127.0.0.1:8700",
    population: Annotated[str, typer.Option(help="Only this population.")] = "",
    status: Annotated[str, typer.Option(help="Only tasks in this status (open, completed, canceled, ...).")] = "",
) -> None:
    """List tasks."""
    from fedcompute.v1 import task_management_pb2 as tm

    code, known = f"TASK_STATUS_{status.upper()}" if status else "TASK_STATUS_UNSPECIFIED", tm.TaskStatus.keys()
    if code not in known:
        names = ", ".join(k.removeprefix("TASK_STATUS_").lower() for k in known[1:])
        raise typer.BadParameter(f"unknown status {status!r}; one of {names}", param_hint="--status")
    request = tm.ListTasksRequest(population_name=population, status=tm.TaskStatus.Value(code))
    call(lambda: print_message(operators(server).list_tasks(request)))


@task_app.command("cancel")
def task_cancel(
    task_id: str, server: ServerOpt = "127.0.0.1:8700", reason: Annotated[str, typer.Option()] = ""
) -> None:
    """Cancel a task (its open round stops admitting devices)."""
    from fedcompute.v1 import task_management_pb2 as tm

    call(
        lambda: print_message(operators(server).cancel_task(tm.CancelTaskRequest(task_id=task_id, reason=reason)).task)
    )
