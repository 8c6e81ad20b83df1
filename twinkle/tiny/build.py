"""Build the embedded models offline and deterministically.

`twinkle-tiny` is a small Qwen3-architecture causal LM with a byte-level BPE tokenizer trained on
the text files shipped in `twinkle/tiny/corpus/`. Nothing is downloaded: the tokenizer is trained
in a fraction of a second and the weights come from a fixed seed. The result is an ordinary
Hugging Face folder, loaded through the same `from_pretrained` path as any real model.

`bench-small` uses the same tokenizer with a wider network (twice the parameters), sized so that one
LoRA training step on a 8 x 128 token batch takes roughly 100-150 ms on two CPU cores.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"
BUILD_VERSION = 1  # bump when the recipe changes so cached folders are rebuilt

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"

# ChatML, as Qwen models use; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BuiltinModelSpec:
    """Architecture of a generated model (Qwen3 family)."""

    vocab_size: int  # target BPE vocabulary; the model's embedding is padded to a multiple of 64
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    seed: int = 1234
    vision: bool = False  # a Qwen3-VL vision-language model (twinkle/tiny/vl.py) instead of a Qwen3 LM


BUILTIN_MODELS: dict[str, BuiltinModelSpec] = {
    "twinkle-tiny": BuiltinModelSpec(
        vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    ),
    "bench-small": BuiltinModelSpec(
        vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32,
    ),
    "twinkle-tiny-vl": BuiltinModelSpec(
        vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vision=True,
    ),
}


def _corpus_files() -> list[Path]:
    files = sorted(CORPUS_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no corpus files in {CORPUS_DIR}; the package is incomplete")
    return files


def _fingerprint(name: str, spec: BuiltinModelSpec) -> str:
    fields = asdict(spec)
    vision = fields.pop("vision")  # text models keep the fingerprint they had before VL models existed
    digest = hashlib.sha256(json.dumps({"name": name, "spec": fields, "v": BUILD_VERSION}).encode())
    if vision:
        digest.update((Path(__file__).parent / "vl.py").read_bytes())
    for path in _corpus_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _train_tokenizer(vocab_size: int, extra_special_tokens: list[str] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS + list(extra_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(p) for p in _corpus_files()], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_builtin_model(name: str, out_dir: str | os.PathLike) -> Path:
    """Write the named built-in model (config, weights, tokenizer) into `out_dir`."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    spec = BUILTIN_MODELS[name]
    if spec.vision:
        from twinkle.tiny.vl import build_vl_model

        return build_vl_model(name, spec, out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(spec.vocab_size)
    padded_vocab = ((len(tokenizer) + 63) // 64) * 64
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    config = Qwen3Config(
        vocab_size=padded_vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids[0],
        bos_token_id=None,
        dtype="float32",
    )
    config.architectures = ["Qwen3ForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "twinkle_builtin.json").write_text(json.dumps({"name": name, "spec": asdict(spec)}, indent=2))
    return out


def ensure_builtin_model(name: str, models_dir: str | os.PathLike) -> Path:
    """Return the folder of a built-in model under `models_dir`, building it on first use.

    Safe to call from many processes at once: one builds under a file lock into a temporary
    folder and renames it into place; the others wait and reuse it.
    """
    if name not in BUILTIN_MODELS:
        raise KeyError(name)
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}-{_fingerprint(name, BUILTIN_MODELS[name])}"
    if (target / "config.json").exists():
        return target
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            build_builtin_model(name, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json")


def publish_to_hub_cache(name: str, folder: str | os.PathLike) -> Path | None:
    """Make `AutoTokenizer.from_pretrained(name)` find a built-in model's tokenizer offline.

    Clients on the server's machine (the Tinker SDK's sampling client asks for the tokenizer by
    model name) then load it from the Hugging Face cache as if it had been downloaded. Only the
    tokenizer and config files are linked; nothing is fetched.
    """
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:
        return None
    source = Path(folder)
    revision = "twinkle-" + source.name.rsplit("-", 1)[-1]
    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="model")
    snapshot = repo / "snapshots" / revision
    try:
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in TOKENIZER_FILES:
            if (source / file).exists() and not (snapshot / file).exists():
                shutil.copyfile(source / file, snapshot / file)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    except OSError:
        return None
    return snapshot
