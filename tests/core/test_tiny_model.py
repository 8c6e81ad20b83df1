"""The built-in twinkle-tiny model: a deterministic, ordinary Hugging Face folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from twinkle.errors import InvalidInputError
from twinkle.tiny.build import EOS_TOKEN, build_builtin_model

TEXTS = [
    "The train left the coast at 6:40 in the morning.",
    "Café crème, déjà vu, naïve résumé: é è ê ë.",
    "中文测试：你好，世界！",
    "Emoji 🎉🚀 and a family 👨‍👩‍👧 in one line.",
]


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built_twice(tmp_path_factory) -> tuple[Path, Path]:
    first = build_builtin_model("twinkle-tiny", tmp_path_factory.mktemp("tiny-a"))
    second = build_builtin_model("twinkle-tiny", tmp_path_factory.mktemp("tiny-b"))
    return Path(first), Path(second)


@pytest.fixture(scope="module")
def tiny_folder(built_twice) -> Path:
    return built_twice[0]


@pytest.fixture(scope="module")
def tokenizer(tiny_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_folder))


def test_build_is_byte_identical(built_twice):
    first, second = built_twice
    a, b = _digests(first), _digests(second)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(a)
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"files differ between two builds: {different}"


def test_folder_loads_with_plain_transformers(tiny_folder, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_folder))
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.vocab_size % 64 == 0
    assert model.config.vocab_size >= len(tokenizer)
    assert not model.config.tie_word_embeddings
    ids = tokenizer("Hello world", return_tensors="pt").input_ids
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_engine_from_local_folder_matches_builtin_name(tiny_folder, state_dir):
    from tests.core.solo import Solo
    from twinkle.backends import BackendConfig, make_training_backend
    from twinkle.types import Datum

    local = Solo(make_training_backend(BackendConfig(base_model=str(tiny_folder))))
    builtin = Solo(make_training_backend(BackendConfig(base_model="twinkle-tiny", state_dir=state_dir)))
    assert local.model_path == str(tiny_folder.resolve())
    assert builtin.model_path != local.model_path
    assert local.info()["vocab_size"] == builtin.info()["vocab_size"]
    assert local.eos_token_ids == builtin.eos_token_ids

    data = [Datum.from_sequence(local.tokenizer.encode(t)) for t in TEXTS]
    assert [list(d.input_tokens) for d in data] == \
        [list(Datum.from_sequence(builtin.tokenizer.encode(t)).input_tokens) for t in TEXTS]
    a = local.forward(None, data)
    b = builtin.forward(None, data)
    assert a.metrics["loss:sum"] == b.metrics["loss:sum"]
    for x, y in zip(a.loss_outputs, b.loss_outputs):
        assert np.array_equal(x["logprobs"], y["logprobs"])


@pytest.mark.parametrize("text", TEXTS + ["é", "中文", "🙂", "  leading and trailing  ", "line\nbreak\ttab"])
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids and all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_tokens(tokenizer):
    for token in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token


def test_chat_template_and_eos(tokenizer, tiny_folder):
    from transformers import GenerationConfig

    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! 🙂"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! 🙂<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"

    assert tokenizer.eos_token == EOS_TOKEN == "<|im_end|>"
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == eos_id
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != eos_id
    generation = GenerationConfig.from_pretrained(str(tiny_folder))
    eos_ids = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert eos_ids[0] == eos_id

    # the tokenized template ends each turn with the eos token
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
    assert list(ids).count(eos_id) == 2
    assert tokenizer.decode(ids) == text


def test_resolve_model_path_rejects_bad_local_folders(tmp_path):
    from twinkle.modeling import resolve_model_path

    with pytest.raises(InvalidInputError) as missing:
        resolve_model_path(str(tmp_path / "does-not-exist"))
    assert missing.value.field == "base_model"
    with pytest.raises(InvalidInputError):
        resolve_model_path("./no-such-model-folder")

    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(InvalidInputError) as no_config:
        resolve_model_path(str(empty))
    assert "config.json" in str(no_config.value)


def test_resolve_model_path_accepts_local_folder(tiny_folder):
    from twinkle.modeling import resolve_model_path

    assert resolve_model_path(str(tiny_folder)) == str(tiny_folder.resolve())
