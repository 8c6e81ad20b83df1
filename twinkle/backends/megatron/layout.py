"""Whether a megatron layout (TP x PP ranks per replica) fits a model, from its config alone.

`twinkle check-config` and `twinkle serve` run this before anything starts (no torch, no
megatron-core), so a layout that cannot split the model fails in a second with one line saying
which divisor to choose; the workers run the same check again on the checkpoint they load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Dims:
    """The sizes TP and PP must divide."""

    layers: int
    heads: int
    groups: int
    ffn: int

    @classmethod
    def of_config(cls, cfg: dict) -> "Dims":
        """From a Hugging Face config.json's fields."""
        heads = int(cfg["num_attention_heads"])
        return cls(layers=int(cfg["num_hidden_layers"]), heads=heads,
                   groups=int(cfg.get("num_key_value_heads") or heads), ffn=int(cfg["intermediate_size"]))


def parallel_problems(dims: Dims, tp: int, pp: int) -> list[str]:
    """One line per size that TP or PP does not divide, each naming the divisors to choose from."""
    problems = [f"tensor_parallel {tp} does not divide this model's {n} {what}; choose a divisor of {n}"
                for what, n in (("KV heads", dims.groups), ("attention heads", dims.heads),
                                ("intermediate size", dims.ffn)) if n % tp]
    if dims.layers % pp:
        problems.append(f"pipeline_parallel {pp} does not divide this model's {dims.layers} decoder layers; "
                        f"choose a divisor of {dims.layers}")
    return problems


def model_dims(name: str, folder: str | None) -> Dims | None:
    """A model's sizes: a built-in's spec, or the config.json of its (local or cached) folder;
    None when they cannot be known before it is downloaded."""
    from twinkle.tiny import BUILTIN_MODELS

    spec = BUILTIN_MODELS.get(name)
    if spec is not None:
        return Dims(layers=spec.num_hidden_layers, heads=spec.num_attention_heads, groups=spec.num_key_value_heads,
                    ffn=spec.intermediate_size)
    path = Path(folder or "") / "config.json"
    if not folder or not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    cfg = cfg.get("text_config", cfg)  # a multi-modal config keeps the decoder's sizes in text_config
    try:
        return Dims.of_config(cfg)
    except (KeyError, TypeError, ValueError):
        return None  # not a decoder config the megatron mapping knows: the workers say so at start
