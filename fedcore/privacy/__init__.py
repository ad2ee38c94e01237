"""Differential privacy: accounting, plan projection and client-level DP (no Opacus import).

DP-SGD lives in :mod:`fedcore.privacy.dpsgd`, imported on its own: it loads Opacus and
torch.optim, a few seconds of CPU that a site without sample-level DP should not pay.
"""

from fedcore.privacy.accounting import (
    ACCOUNTANTS,
    PLAN_PRIVACY_DEFAULTS,
    PRIVACY_MODES,
    epsilon,
    epsilon_of_history,
    noise_multiplier_for,
    plan_mechanism,
    plan_noise_multiplier,
    project_plan_epsilon,
    resolve_noise_multiplier,
)
from fedcore.privacy.client_dp import (
    AdaptiveClip,
    DistributedNoise,
    DPFedAvg,
    NoiseSource,
    add_noise,
    clip_update,
    distributed_noise_share,
)

__all__ = [
    "ACCOUNTANTS",
    "PLAN_PRIVACY_DEFAULTS",
    "PRIVACY_MODES",
    "AdaptiveClip",
    "DPFedAvg",
    "DistributedNoise",
    "NoiseSource",
    "add_noise",
    "clip_update",
    "distributed_noise_share",
    "epsilon",
    "epsilon_of_history",
    "noise_multiplier_for",
    "plan_mechanism",
    "plan_noise_multiplier",
    "project_plan_epsilon",
    "resolve_noise_multiplier",
]
