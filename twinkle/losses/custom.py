"""Running a client's own loss function (a cloudpickled callable) safely inside a pass."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from twinkle.errors import InvalidInputError

CustomLoss = Callable[..., object]


def call_custom_loss(fn: CustomLoss, logprobs: list[torch.Tensor], inputs: list[dict[str, torch.Tensor]],
                     config: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Run a user's loss: fn(logprobs, loss_inputs[, config]) -> loss or (loss, metrics).

    Whatever the user's code raises is reported as that request's bad input, not a server fault."""
    try:
        result = fn(logprobs, inputs, config) if _takes_three(fn) else fn(logprobs, inputs)
    except Exception as exc:
        raise InvalidInputError(f"custom loss raised {type(exc).__name__}: {exc}", field="loss_fn") from exc
    loss, metrics = (result if isinstance(result, tuple) else (result, {}))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise InvalidInputError("custom loss must return a scalar tensor (and optionally a metrics dict)",
                                field="loss_fn")
    try:
        metrics = {str(k): float(v) for k, v in dict(metrics).items()}
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"custom loss metrics must be a dict of numbers: {exc}", field="loss_fn") from None
    metrics.setdefault("loss:sum", float(loss.detach()))
    return loss.reshape(()), metrics


def _takes_three(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
