"""What each named loss takes: its per-token inputs and its config keys with defaults.

Pure Python, no torch: the HTTP layer and the clients validate requests against these specs
before anything reaches a worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Per-token float inputs that Tinker clients may attach to any datum.
FLOAT_INPUTS = frozenset({
    "weights", "logprobs", "advantages", "clip_low_threshold", "clip_high_threshold",
    "sequence_ratio_mask", "ref_logprobs",
})
INT_INPUTS = frozenset({"target_tokens"})
KNOWN_INPUTS = FLOAT_INPUTS | INT_INPUTS


@dataclass(frozen=True)
class LossSpec:
    """Schema of one loss.

    separable: the loss is a sum of per-datum terms, so a batch may be split into micro-batches
    and the gradients accumulated. Losses that couple datums (pairs, batch normalisation) run the
    whole batch in one pass. `group_size` > 1 means the datums come in consecutive groups.
    """

    name: str
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()
    config_defaults: dict[str, float | str] = field(default_factory=dict)
    separable: bool = True
    group_size: int = 1
    allows_topk_targets: bool = False
    description: str = ""

    def resolve_config(self, config: dict | None) -> dict[str, float | str]:
        """Defaults overlaid with the caller's values (keys are validated elsewhere)."""
        merged = dict(self.config_defaults)
        merged.update(config or {})
        return merged


_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
_CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")

LOSS_SPECS: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("cross_entropy", ("target_tokens",), ("weights",), allows_topk_targets=True,
                 description="-sum(weights * logp(target)); weights are any real numbers (default 1)"),
        LossSpec("importance_sampling", _RL_INPUTS,
                 description="-sum(exp(logp - q) * A)"),
        LossSpec("ppo", _RL_INPUTS, _CLIP_INPUTS, dict(_CLIP),
                 description="-sum(min(r*A, clip(r, lo, hi)*A))"),
        LossSpec("cispo", _RL_INPUTS, _CLIP_INPUTS, dict(_CLIP),
                 description="-sum(sg(clip(r, lo, hi)) * logp * A)"),
        LossSpec("dro", _RL_INPUTS, (), {"beta": 0.05},
                 description="-sum(logp*A - beta/2 * (logp - q)^2)"),
        LossSpec("gspo", _RL_INPUTS, _CLIP_INPUTS + ("sequence_ratio_mask",), dict(_CLIP),
                 description="PPO clipping with the sequence-level geometric-mean ratio (GSPO-token)"),
        LossSpec("dpo", ("target_tokens", "ref_logprobs"), ("weights",), {"beta": 0.1},
                 separable=False, group_size=2,
                 description="sigmoid DPO over consecutive (chosen, rejected) pairs, summed over pairs"),
        LossSpec("grpo", _RL_INPUTS, ("weights", "ref_logprobs"),
                 {"epsilon_low": 0.2, "epsilon_high": 0.2, "kl_beta": 0.0, "normalize": "token_mean"},
                 separable=False,
                 description="clipped policy-gradient objective with optional k3 KL to a reference"),
    )
}

NORMALIZE_CHOICES = ("token_mean", "sequence_mean", "sum")
CUSTOM_LOSS = "custom"


def loss_names() -> list[str]:
    return sorted(LOSS_SPECS)
