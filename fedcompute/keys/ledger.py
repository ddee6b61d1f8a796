"""A key provider's release ledger: what each (access policy, round) has released, and the budget it spent.

The rules, applied independently by every provider before its share leaves:
- the input set is the one the attested worker bound (its digest), names each contribution once, and holds at
  least the policy's ``min_clients`` contributions;
- releases are pinned per (policy, round), whatever aggregation or job id a request names: the same input set
  again (a worker that died and retried, or a server replaying a job) is allowed, and charged as another release
  when it comes from another aggregation attempt (another recipient key, which the attestation result binds: an
  attempt yields one output, whatever key ids it asks for and however often it asks);
  another input set for the round is allowed only if it shares no contribution with any earlier one (a retried
  attempt with other devices), so no two releases can be differenced;
- under DP every attempt's release is one more Gaussian release, a repeat of an input set by another attempt too,
  and the policy's accountant must keep ε after it within the policy's budget. A repeat used to be free, on the
  ground that the worker's noise, derived from the key and the input set, made its output bit-identical; but the
  output also depends on what the server writes in the job (the clip norm under adaptive clipping, the model
  version the contributions are checked against), so two "repeats" with the same noise and another clip norm gave
  the exact un-noised sum by a linear combination (found by a review, 2026-12-02). The worker now draws fresh
  noise for every job attempt, and every attempt is charged.
- under DP a release is numbered over every key service: the attempt asks with ``release_number`` = 1 + the
  highest count the key services report (``GetReleaseCount``), bound by its attestation result; a provider grants
  it only past its own count (or the same number again to the same attempt, a repeat) and charges the policy that
  many releases: its count becomes the number. Until 2026-12-03 each provider charged only the releases it took
  part in, so a server that kept a different provider away from each attempt had up to n/t x the budget released
  in all (1.5x at 2 of 3), each provider within its own. Now, as long as every key that carries a device's
  contributions is held only by providers the device pins and needs more than half of them (devices check it,
  ``keys/statement.py check_dp_holders``; ``service.py`` refuses DP releases of a key held t <= n/2 of its own
  list), any two releases of that device's data share a provider, which granted the later one a higher number:
  R releases carry R distinct numbers, and the provider that granted the highest charged at least R.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedcompute.core.context import input_set_digest
from fedcompute.core.errors import BudgetSpent, InvalidArgument, PermissionDenied, StaleReleaseNumber
from fedcompute.core.policy import AccessPolicy, PolicyDp
from fedcompute.keys.keystore import KeysetState, RoundRelease


@dataclass(frozen=True)
class Decision:
    repeat: bool  # the same input set as an earlier release of this round (charged if another attempt's)
    releases_charged: int  # DP releases charged to the policy so far, this one included
    epsilon_after: float  # 0 without DP


# the most releases a DP policy may have: the accountant's cost grows with the count (PRV: ~20 MB and 1.4 s at
# 1,000 releases, 19 GB at a million), and the number comes from counts read over the network
MAX_RELEASE_NUMBER = 10_000


def over_budget(dp: PolicyDp, eps: float) -> bool:
    """ε past the policy's budget; an ε that is not a number (an accountant's failure) is past it too."""
    return not eps <= dp.epsilon


def budget_spent(dp: PolicyDp, number: int, eps: float, asked: int = 0) -> BudgetSpent:
    """The refusal of release ``number``, whose ε is over the budget (``asked``: the higher number requested)."""
    more = f", and release {asked} more so" if asked > number else ""
    return BudgetSpent(
        f"the task's privacy budget is spent: release {number} would bring epsilon to {eps:.4g}, "
        f"over the access policy's {dp.epsilon:g}{more}"
    )


def check_number(number: int) -> None:
    """A DP release's number is 1 to ``MAX_RELEASE_NUMBER``."""
    if not 1 <= number <= MAX_RELEASE_NUMBER:
        raise InvalidArgument(
            "release_number", f"a release under a DP access policy must be numbered 1 to {MAX_RELEASE_NUMBER}: 1 + "
            "the highest count the key services report (GetReleaseCount)"
        )  # fmt: skip


def check_inputs(policy: AccessPolicy, input_set_sha256_hex: str, inputs: list[tuple[str, str]]) -> None:
    try:
        digest = input_set_digest(inputs)
    except ValueError as exc:
        raise InvalidArgument("inputs", str(exc)) from None
    if digest != input_set_sha256_hex:
        raise InvalidArgument("inputs", "do not hash to input_set_sha256_hex (send the job's whole input set)")
    if len({a for a, _ in inputs}) != len(inputs) or len({e for _, e in inputs}) != len(inputs):
        raise InvalidArgument("inputs", "name one contribution twice")
    if len(inputs) < policy.min_clients:
        raise PermissionDenied(
            f"the input set holds {len(inputs)} contributions; the task's access policy needs at least "
            f"{policy.min_clients} before anything is released"
        )


def decide(
    state: KeysetState,
    policy_sha256_hex: str,
    policy: AccessPolicy,
    round_: int,
    input_set_sha256_hex: str,
    inputs: list[tuple[str, str]],
    epsilon_after: Callable[[int], float],
    recipient: bytes = b"",
    number: int = 0,
) -> Decision:
    """Decide one release and record it in ``state`` (the caller saves it), or raise why it is refused.
    ``recipient``: the attempt's recipient public key (bound by its attestation result): an attempt that was
    charged for this input set is not charged again (its other key ids, a retried call: one output). ``number``:
    under DP, the release number the attempt asks with (the module's last rule); without DP it is not used."""
    slot = f"{policy_sha256_hex}|{round_}"
    earlier = state.releases.get(slot, [])
    charged = state.charged.get(policy_sha256_hex, 0)
    same = next((r for r in earlier if r.input_set_sha256_hex == input_set_sha256_hex), None)
    repeat, attempt = same is not None, recipient.hex()
    granted = same.numbers.get(attempt, []) if same is not None else []
    if same is not None and attempt in same.recipients and (policy.dp is None or number in granted):
        return Decision(True, charged, epsilon_after(charged) if policy.dp else 0.0)
    ids, envelopes = {a for a, _ in inputs}, {e for _, e in inputs}
    for previous in [] if repeat else earlier:
        shared = len(ids & set(previous.assignment_ids)) + len(envelopes & set(previous.envelope_sha256s))
        if shared:
            raise PermissionDenied(
                f"round {round_} of this access policy was already released for an input set that shares "
                f"contributions with this one; a further input set for the round must be disjoint"
            )
    eps = 0.0
    if policy.dp is not None:
        check_number(number)
        if number <= charged:
            raise StaleReleaseNumber(
                f"release number {number} is not past the {charged} releases this key service has charged the "
                "access policy; read GetReleaseCount again and number the release past the highest"
            )
        eps = epsilon_after(number)
        if over_budget(policy.dp, eps):
            raise budget_spent(policy.dp, number, eps)
        charged = state.charged[policy_sha256_hex] = number
    if same is None:
        same = RoundRelease(input_set_sha256_hex, sorted(ids), sorted(envelopes))
        earlier = [*earlier, same]
    if attempt not in same.recipients:
        same.recipients.append(attempt)
    if policy.dp is not None:
        same.numbers.setdefault(attempt, []).append(number)
    state.releases[slot] = earlier  # assigned, also when only a recipient was added: the store saves what is set
    return Decision(repeat, charged, eps)
