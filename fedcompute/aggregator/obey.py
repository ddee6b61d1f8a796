"""The worker obeys the task's signed access policy, never the job: DP parameters and min_clients come from the
policy whose key-service signatures it verified, and a job that disagrees with it is refused with the reason."""

from __future__ import annotations

from dataclasses import fields

from fedcompute.aggregator.dp import DpParams
from fedcompute.core.policy import AccessPolicy
from fedcompute.v1 import aggregation_pb2


class PolicyConflict(Exception):
    """The job asks for something the task's access policy does not allow; the message says what."""


def dp_params(policy: AccessPolicy, job: aggregation_pb2.AggregationJob) -> DpParams | None:
    """The DP parameters the policy prescribes for this job (None: no DP), or ``PolicyConflict``."""
    if job.population_name != policy.population_name:
        raise PolicyConflict("the job's population differs from the access policy's; refused")
    if policy.dp is None:
        if job.dp.enabled:
            raise PolicyConflict("the job asks for DP settings the task's access policy does not have; refused")
        return None
    if not job.dp.enabled:
        raise PolicyConflict(
            "the job switches differential privacy off, but the task's signed access policy requires it"
        )
    d = policy.dp
    z = d.update_multiplier()
    # With adaptive clipping the current C comes from the previous round; sensitivity C and noise z·C move
    # together, so any C gives the same ε. Without it, C is the policy's.
    clip = job.dp.clip_norm if d.adaptive_clip else d.clip_norm
    if not clip > 0:
        raise PolicyConflict(f"the job's clip norm {clip!r} is not positive; refused")
    want = DpParams(
        clip_norm=clip,
        noise_multiplier=z,
        expected_clients=d.expected_clients,
        min_clients=policy.min_clients,
        adaptive_clip=d.adaptive_clip,
        target_unclipped_quantile=d.target_unclipped_quantile,
        clip_learning_rate=d.clip_learning_rate,
        clipped_count_stddev=d.clipped_count_stddev,
        metric_bounds=d.metric_bounds,  # from the policy alone: the job does not carry them
    )
    for f in fields(DpParams):
        if f.name == "metric_bounds":
            continue
        got, expected = getattr(job.dp, f.name), getattr(want, f.name)
        if got != expected:
            raise PolicyConflict(
                f"the job's dp.{f.name} is {got!r}, the task's signed access policy says {expected!r}; refused"
            )
    return want
