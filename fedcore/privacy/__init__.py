"""Differential privacy: accounting, plan projection and client-level DP (no Opacus import).

DP-SGD lives in :mod:`fedcore.privacy.dpsgd`, imported on its own: it loads Opacus and
torch.optim, a few seconds of CPU that a site without sample-level DP should not pay.
Client-level DP (:mod:`fedcore.privacy.client_dp`) needs torch, so its names load on first use:
the plan language reads the accounting's privacy defaults through this package without torch.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from fedcore.privacy.client_dp import (
        AdaptiveClip,
        DistributedNoise,
        DPFedAvg,
        NoiseSource,
        add_noise,
        clip_update,
        distributed_noise_share,
    )

_CLIENT_DP = frozenset(
    {
        "AdaptiveClip",
        "DistributedNoise",
        "DPFedAvg",
        "NoiseSource",
        "add_noise",
        "clip_update",
        "distributed_noise_share",
    }
)


def __getattr__(name: str) -> Any:
    """Client-level DP's names, imported (with torch) when first asked for."""
    if name in _CLIENT_DP:
        from fedcore.privacy import client_dp

        return getattr(client_dp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
