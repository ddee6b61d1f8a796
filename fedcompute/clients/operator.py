"""The operator's side of task creation: build the task's access policy, register it with every key service
(each checks it and signs it with its own key), then create the task at the server with the signed policy.

The key-admin credential used here belongs to the operator, never to the orchestration server: the server can
relay a policy but cannot register one, so it cannot weaken what devices bind their updates to.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

import grpc
import structlog
from cryptography.hazmat.primitives.asymmetric import ec

from fedcompute.clients.typed import KeyClient, TaskManagementClient
from fedcompute.core.policy import AccessPolicy, for_task
from fedcompute.keys.policy import check_signed, to_message
from fedcompute.server.encoding import decode_spec
from fedcompute.v1 import common_pb2, key_pb2
from fedcompute.v1 import task_management_pb2 as tm

log = structlog.get_logger("fedcompute.operator")


class RegistrationFailed(Exception):
    """Too few key services registered the policy; the task was not created."""


def resolve_policy(spec: tm.TaskSpec, measurements: Sequence[str]) -> tuple[tm.TaskSpec, AccessPolicy]:
    """Validate the spec here (raising ``InvalidArgument``), calibrate DP, and build its access policy."""
    domain = decode_spec(spec)
    domain.validate()
    resolved = domain.resolved()
    sent = tm.TaskSpec()
    sent.CopyFrom(spec)
    sent.plan = resolved.plan_bytes()  # a built-in's plan too: the policy names this plan's hash, and so the server
    # runs exactly the plan the operator hashed, wherever and however it would have built it
    if resolved.dp is not None:  # the server re-checks the calibrated z against the budget
        sent.dp.noise_multiplier = resolved.dp.noise_multiplier
        sent.dp.min_clients = resolved.dp.min_clients
    return sent, for_task(resolved, secrets.token_hex(16), measurements)


def register_policy(
    policy: AccessPolicy,
    key_admins: Sequence[KeyClient],
    trusted: Mapping[str, ec.EllipticCurvePublicKey],
    threshold: int,
) -> common_pb2.SignedAccessPolicy:
    """Register with every key service; at least ``threshold`` valid signatures from pinned providers are needed.
    A DP policy needs t > n/2: its key services refuse DP releases of keys held otherwise (keys/service.py)."""
    if policy.dp is not None and 2 * threshold <= len(trusted):
        raise RegistrationFailed(
            f"a DP task needs population keys that more than half of the key services must release (t > n/2), "
            f"not {threshold} of {len(trusted)}: its key services would refuse every release; raise the threshold"
        )
    message = to_message(policy)
    signed = common_pb2.SignedAccessPolicy(policy=message)
    errors = []
    for client in key_admins:
        try:
            signed.signatures.append(client.register_policy(key_pb2.RegisterPolicyRequest(policy=message)).signature)
        except grpc.RpcError as exc:
            errors.append(f"{exc.code().name}: {exc.details()}")
    try:
        check_signed(signed, trusted, threshold)
    except Exception as exc:
        raise RegistrationFailed(f"{exc} ({'; '.join(errors) or 'no errors reported'})") from None
    log.info("access_policy_signed", policy=policy.sha256_hex(), signatures=len(signed.signatures))
    return signed


def create_task(
    operators: TaskManagementClient,
    key_admins: Sequence[KeyClient],
    trusted: Mapping[str, ec.EllipticCurvePublicKey],
    threshold: int,
    spec: tm.TaskSpec,
    measurements: Sequence[str],
) -> tm.Task:
    sent, policy = resolve_policy(spec, measurements)
    signed = register_policy(policy, key_admins, trusted, threshold)
    return operators.create_task(tm.CreateTaskRequest(spec=sent, access_policy=signed)).task
