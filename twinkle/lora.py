"""Choosing LoRA target modules from Tinker's options, for any transformers causal LM."""

from __future__ import annotations

import torch.nn as nn

from twinkle.types import LoraConfig

_ATTN_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "feed_forward", "ffn")


def target_modules(model: nn.Module, lora: LoraConfig) -> list[str]:
    """Names (last path component) of the linear layers to adapt.

    Attention and MLP projections are recognised by their parent module's name; the unembedding
    is the model's output embedding. Returns sorted unique names, as peft's `target_modules` takes.
    """
    unembed = model.get_output_embeddings()
    names: set[str] = set()
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = path.rsplit(".", 1)[-1]
        parents = path.lower().split(".")[:-1]
        if module is unembed:
            if lora.train_unembed:
                names.add(leaf)
        elif any(h in p for p in parents for h in _ATTN_HINTS):
            if lora.train_attn:
                names.add(leaf)
        elif any(h in p for p in parents for h in _MLP_HINTS):
            if lora.train_mlp:
                names.add(leaf)
    if not names:
        raise ValueError("no linear layers match the requested train_attn/train_mlp/train_unembed options")
    return sorted(names)


def targets_for(kinds: dict[str, str], lora: LoraConfig) -> list[str]:
    """Target names for `lora` given layer kinds ('attn', 'mlp', 'unembed', 'vision') by leaf name or path."""
    wanted = {"attn": lora.train_attn, "mlp": lora.train_mlp, "unembed": lora.train_unembed,
              "vision": lora.train_vision}
    names = sorted(name for name, kind in kinds.items() if wanted[kind])
    if not names:
        raise ValueError("no linear layers match the requested train_attn/train_mlp/train_unembed/train_vision "
                         "options")
    return names


def peft_targets(layers: list[str] | tuple[str, ...], module_paths: frozenset[str]) -> list[str]:
    """peft `target_modules` that select exactly `layers` among the model's `module_paths`.

    A leaf name (`q_proj`) where every module of that name is adapted, else the full paths: a vision
    tower may reuse its language model's leaf names, and peft matches a name on any path ending in it."""
    chosen = set(layers)
    targets: set[str] = set()
    for layer in chosen:
        leaf = layer.rsplit(".", 1)[-1]
        namesakes = {p for p in module_paths if p.rsplit(".", 1)[-1] == leaf} | {layer}
        targets.add(leaf if namesakes <= chosen else layer)
    return sorted(targets)


def peft_config(kinds: dict[str, str], lora: LoraConfig, base_model_name: str, *,
                targets: list[str] | None = None):
    """The peft LoraConfig of `lora`: on `targets` (see `peft_targets`), else on `kinds`' names it selects."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=targets if targets is not None else targets_for(kinds, lora),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name,
    )


def lora_from_peft(peft_cfg, layer_kinds: dict[str, str]) -> LoraConfig:
    """Recover Tinker-style options from a PEFT adapter config (for adapters made elsewhere).

    `layer_kinds`: adaptable layer path -> kind; a target names a layer by its path or any suffix."""
    targets = set(peft_cfg.target_modules or [])
    kinds = {kind for path, kind in layer_kinds.items()
             if any(path == t or path.endswith("." + t) for t in targets)}
    return LoraConfig(
        rank=int(peft_cfg.r),
        alpha=float(peft_cfg.lora_alpha),
        train_attn="attn" in kinds,
        train_mlp="mlp" in kinds,
        train_unembed="unembed" in kinds,
        train_vision="vision" in kinds,
    )


def module_kinds(model: nn.Module) -> dict[str, str]:
    """Map each linear leaf name to 'attn', 'mlp' or 'unembed'."""
    kinds: dict[str, str] = {}
    for kind, flags in (("attn", dict(train_attn=True, train_mlp=False, train_unembed=False)),
                        ("mlp", dict(train_attn=False, train_mlp=True, train_unembed=False)),
                        ("unembed", dict(train_attn=False, train_mlp=False, train_unembed=True))):
        try:
            for name in target_modules(model, LoraConfig(**flags)):
                kinds[name] = kind
        except ValueError:
            pass
    return kinds


def adaptable_layers(model: nn.Module) -> dict[str, str]:
    """Every linear layer a LoRA adapter may target: module path -> 'attn', 'mlp' or 'unembed'.

    Paths are those PEFT uses in its weight names (`base_model.model.<path>.lora_A.weight`)."""
    kinds = module_kinds(model)
    return {path: kinds[path.rsplit(".", 1)[-1]] for path, module in model.named_modules()
            if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in kinds}


def peft_weight_name(layer: str, matrix: str) -> str:
    """The name PEFT saves a layer's lora_A / lora_B weight under."""
    return f"base_model.model.{layer}.{matrix}.weight"
