"""The math of every named loss.

Each loss gets the learner's log-probabilities of the target tokens, one tensor per datum (with
gradient), the datum's loss inputs as tensors, and the resolved config. It returns the scalar
loss to back-propagate and metrics named `name:reduction`. Tinker's losses are token-level sums,
never means: the client chooses any normalisation through the weights or advantages it sends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Metrics = dict[str, float]
LossOutput = tuple[torch.Tensor, tuple[Metrics, dict[str, float]]]  # loss, (metrics, counts of means)


@dataclass
class LossContext:
    logprobs: list[torch.Tensor]  # per datum: (N,) or (N, K) for top-K targets
    inputs: list[dict[str, torch.Tensor]]
    config: dict[str, float | str]

    def cat(self, key: str, default: float | None = None) -> torch.Tensor:
        """Concatenate a per-token input over all datums (a constant where a datum lacks it)."""
        parts = []
        for lp, inp in zip(self.logprobs, self.inputs):
            if key in inp:
                parts.append(inp[key].reshape(-1).to(lp.dtype))
            elif default is not None:
                parts.append(torch.full((lp.numel(),), float(default), dtype=lp.dtype))
            else:
                raise KeyError(key)
        return torch.cat(parts)

    def all_logprobs(self) -> torch.Tensor:
        return torch.cat([lp.reshape(-1) for lp in self.logprobs])


def _sum_metrics(loss: torch.Tensor, **means: torch.Tensor | tuple[torch.Tensor, torch.Tensor]):
    """`loss:sum` plus `name:mean` metrics; a mean given as (value, count) merges across
    micro-batches weighted by its count (e.g. tokens with a non-zero advantage)."""
    metrics = {"loss:sum": float(loss.detach())}
    counts: dict[str, float] = {}
    for name, value in means.items():
        if isinstance(value, tuple):
            value, count = value
            counts[f"{name}:mean"] = float(count)
        metrics[f"{name}:mean"] = float(value.detach())
    return metrics, counts


def cross_entropy(ctx: LossContext) -> LossOutput:
    lp = ctx.all_logprobs()
    weights = ctx.cat("weights", default=1.0)
    loss = -(weights * lp).sum()
    return loss, _sum_metrics(loss)


def _rl_terms(ctx: LossContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lp = ctx.all_logprobs()
    return lp, ctx.cat("logprobs"), ctx.cat("advantages")


def _clip_bounds(ctx: LossContext) -> tuple[torch.Tensor, torch.Tensor]:
    low = ctx.cat("clip_low_threshold", default=float(ctx.config["clip_low_threshold"]))
    high = ctx.cat("clip_high_threshold", default=float(ctx.config["clip_high_threshold"]))
    return low, high


def _active_mean(values: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    count = active.sum()
    mean = (values * active).sum() / count if count > 0 else values.new_zeros(())
    return mean, count


def importance_sampling(ctx: LossContext) -> LossOutput:
    lp, q, adv = _rl_terms(ctx)
    ratio = torch.exp(lp - q)
    loss = -(ratio * adv).sum()
    return loss, _sum_metrics(loss, importance_ratio=_active_mean(ratio, (adv != 0).to(lp.dtype)))


def ppo(ctx: LossContext) -> LossOutput:
    lp, q, adv = _rl_terms(ctx)
    low, high = _clip_bounds(ctx)
    ratio = torch.exp(lp - q)
    clipped = torch.clamp(ratio, min=low, max=high)
    loss = -torch.minimum(ratio * adv, clipped * adv).sum()
    active = (adv != 0).to(lp.dtype)
    clip_frac = _active_mean(((ratio < low) | (ratio > high)).to(lp.dtype), active)
    return loss, _sum_metrics(loss, importance_ratio=_active_mean(ratio, active), clip_fraction=clip_frac)


def cispo(ctx: LossContext) -> LossOutput:
    lp, q, adv = _rl_terms(ctx)
    low, high = _clip_bounds(ctx)
    ratio = torch.exp(lp - q)
    weight = torch.clamp(ratio, min=low, max=high).detach()
    loss = -(weight * lp * adv).sum()
    active = (adv != 0).to(lp.dtype)
    clip_frac = _active_mean(((ratio < low) | (ratio > high)).to(lp.dtype), active)
    return loss, _sum_metrics(loss, importance_ratio=_active_mean(ratio, active), clip_fraction=clip_frac)


def dro(ctx: LossContext) -> LossOutput:
    lp, q, adv = _rl_terms(ctx)
    beta = float(ctx.config["beta"])
    loss = -(lp * adv - 0.5 * beta * (lp - q) ** 2).sum()
    return loss, _sum_metrics(loss)


def gspo(ctx: LossContext) -> LossOutput:
    """GSPO-token: every token's ratio has the value of its sequence's geometric-mean ratio and
    the gradient of its own log-probability."""
    low_all, high_all = _clip_bounds(ctx)
    total = ctx.logprobs[0].new_zeros(())
    seq_ratios = []
    offset = 0
    for lp, inp in zip(ctx.logprobs, ctx.inputs):
        n = lp.numel()
        q, adv = inp["logprobs"].to(lp.dtype), inp["advantages"].to(lp.dtype)
        if "sequence_ratio_mask" in inp:
            mask = inp["sequence_ratio_mask"].to(lp.dtype)
        else:
            mask = (adv != 0).to(lp.dtype)
        low, high = low_all[offset:offset + n], high_all[offset:offset + n]
        offset += n
        count = mask.sum()
        # the mask picks the tokens that form the sequence ratio; the objective covers every token
        log_seq_ratio = ((lp - q) * mask).sum() / count if count > 0 else lp.new_zeros(())
        token_ratio = torch.exp(log_seq_ratio.detach() + lp - lp.detach())
        clipped = torch.clamp(token_ratio, min=low, max=high)
        total = total - torch.minimum(token_ratio * adv, clipped * adv).sum()
        seq_ratios.append(torch.exp(log_seq_ratio.detach()))
    mean_ratio = torch.stack(seq_ratios).mean()
    return total, _sum_metrics(total, sequence_ratio=(mean_ratio, torch.tensor(float(len(seq_ratios)))))


def dpo(ctx: LossContext) -> LossOutput:
    """Sigmoid DPO; datums come as consecutive (chosen, rejected) pairs.

    A sequence's reward is sum(weights * (logp - ref_logprobs)); the loss is
    sum over pairs of -log sigmoid(beta * (reward_chosen - reward_rejected)).
    """
    beta = float(ctx.config["beta"])
    rewards = []
    for lp, inp in zip(ctx.logprobs, ctx.inputs):
        w = inp.get("weights")
        w = torch.ones_like(lp) if w is None else w.to(lp.dtype)
        rewards.append((w * (lp - inp["ref_logprobs"].to(lp.dtype))).sum())
    rewards_t = torch.stack(rewards)
    chosen, rejected = rewards_t[0::2], rewards_t[1::2]
    margin = chosen - rejected
    loss = -F.logsigmoid(beta * margin).sum()
    return loss, _sum_metrics(
        loss,
        reward_margin=margin.mean(),
        reward_accuracy=(margin > 0).to(margin.dtype).mean(),
        chosen_reward=chosen.mean(),
        rejected_reward=rejected.mean(),
    )


def grpo(ctx: LossContext) -> LossOutput:
    """Clipped policy-gradient objective with an optional k3 KL penalty to reference logprobs.

    Tokens count where `weights` is non-zero (default: where the advantage is non-zero).
    `normalize`: token_mean (over all counted tokens of the batch), sequence_mean (per sequence,
    then over sequences) or sum.
    """
    eps_low, eps_high = float(ctx.config["epsilon_low"]), float(ctx.config["epsilon_high"])
    kl_beta = float(ctx.config["kl_beta"])
    normalize = ctx.config["normalize"]
    per_seq, masks, ratios, kls = [], [], [], []
    for lp, inp in zip(ctx.logprobs, ctx.inputs):
        adv = inp["advantages"].to(lp.dtype)
        mask = inp["weights"].to(lp.dtype) if "weights" in inp else (adv != 0).to(lp.dtype)
        ratio = torch.exp(lp - inp["logprobs"].to(lp.dtype))
        objective = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
        per_token = -objective
        if kl_beta > 0:
            delta = inp["ref_logprobs"].to(lp.dtype) - lp
            kl = torch.exp(delta) - delta - 1
            per_token = per_token + kl_beta * kl
            kls.append((kl.detach() * mask).sum())
        per_seq.append((per_token * mask).sum())
        masks.append(mask.sum())
        ratios.append((ratio.detach() * mask).sum())
    seq_sums, counts = torch.stack(per_seq), torch.stack(masks)
    n_tokens = counts.sum().clamp(min=1)
    if normalize == "token_mean":
        loss = seq_sums.sum() / n_tokens
    elif normalize == "sequence_mean":
        loss = (seq_sums / counts.clamp(min=1)).mean()
    else:
        loss = seq_sums.sum()
    means = {"importance_ratio": (torch.stack(ratios).sum() / n_tokens, n_tokens)}
    if kls:
        means["kl"] = (torch.stack(kls).sum() / n_tokens, n_tokens)
    return loss, _sum_metrics(loss, **means)


LOSS_FUNCTIONS: dict[str, Callable[[LossContext], LossOutput]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
    "dpo": dpo,
    "grpo": grpo,
}
