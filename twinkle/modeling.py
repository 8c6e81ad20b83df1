"""Loading base models and tokenizers: built-in names, local folders and Hugging Face ids.

All three go through `from_pretrained`; a built-in name is first generated into the state dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from twinkle.errors import InvalidInputError
from twinkle.paths import default_state_dir
from twinkle.tiny import BUILTIN_MODELS, ensure_builtin_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str, state_dir: str | os.PathLike | None = None) -> str:
    """Turn a model name into something `from_pretrained` accepts.

    Built-in names are generated under `<state_dir>/models`; an existing local folder must hold a
    `config.json`; anything else is treated as a Hugging Face id (served from the local cache when
    `HF_HUB_OFFLINE=1`).
    """
    if not name_or_path or not isinstance(name_or_path, str):
        raise InvalidInputError("give a built-in model name, a local folder or a Hugging Face id",
                                field="base_model")
    if name_or_path in BUILTIN_MODELS:
        root = Path(state_dir) if state_dir else default_state_dir()
        return str(ensure_builtin_model(name_or_path, root / "models"))
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise InvalidInputError(f"{name_or_path!r} is a local path without a config.json",
                                    field="base_model")
        return str(local.resolve())
    if name_or_path.startswith(("/", ".", "~")):
        raise InvalidInputError(f"local model folder {name_or_path!r} does not exist", field="base_model")
    return name_or_path


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise InvalidInputError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}", field="dtype") from None


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu"):
    """Load a causal LM for LoRA training: frozen weights, eval mode (no dropout).

    A vision-language model (its config has a `vision_config`) loads whole, vision tower included,
    as the image-text-to-text model that transformers maps its architecture to."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    loader = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = loader.from_pretrained(path, dtype=torch_dtype(dtype))
    model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def vocab_size_of(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])
