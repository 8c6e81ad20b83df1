"""`sampler: {backend: vllm}` configs: what starts, what is refused (with the fix named), what the engine gets."""

from __future__ import annotations

import pytest

from twinkle.actors.vllm_group import PYTHON_ENV, sampler_settings, vllm_runtime_env
from twinkle.config import ServerConfig

INFO = {"model_path": "/models/tiny", "eos_token_ids": [2, 0], "vocab_size": 2048, "max_context": 2048}


def config(sampler: dict, **model) -> ServerConfig:
    return ServerConfig.model_validate({"models": [{"name": "twinkle-tiny", **model, "sampler": sampler}]})


def test_a_vllm_sampler_config_is_runnable():
    cfg = config({"backend": "vllm", "num_workers": 2, "max_loras": 4}, max_lora_rank=16)
    cfg.check_runnable()  # no longer refused
    settings = sampler_settings(cfg.models[0], INFO)
    assert (settings.max_lora_rank, settings.max_loras, settings.max_context) == (16, 4, 2048)
    assert settings.eos_token_ids == [2, 0]  # the trainer's stop tokens, so both samplers stop alike
    assert settings.dtype == "float32" and settings.max_cpu_loras == 8


@pytest.mark.parametrize("sampler, model, message", [
    ({"backend": "vllm"}, {}, "set num_workers to 1 or more"),
    ({"backend": "vllm", "num_workers": 1, "max_lora_rank": 8}, {"max_lora_rank": 16}, "raise it or lower"),
    ({"backend": "vllm", "num_workers": 1, "gpus_per_worker": 1, "tensor_parallel_size": 2}, {},
     "set gpus_per_worker to it"),
    ({"backend": "transformers", "num_workers": 1}, {}, "or use backend: vllm"),
])
def test_unrunnable_sampler_configs_are_refused_naming_the_fix(sampler, model, message):
    with pytest.raises(ValueError, match=message):
        config(sampler, **model).check_runnable()


def test_lora_rank_must_be_one_vllm_accepts():
    with pytest.raises(ValueError, match="vLLM accepts max_lora_rank in"):
        config({"backend": "vllm", "num_workers": 1, "max_lora_rank": 12})


def test_default_lora_rank_is_the_smallest_vllm_rank_holding_the_models():
    cfg = config({"backend": "vllm", "num_workers": 1}, max_lora_rank=20)
    assert sampler_settings(cfg.models[0], INFO).max_lora_rank == 32


def test_runtime_env_names_the_interpreter_and_refuses_a_missing_default(monkeypatch, tmp_path):
    cfg = config({"backend": "vllm", "num_workers": 1, "cpu_kv_cache_gb": 2})
    monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "venv-vllm" / "bin" / "python"))
    env = vllm_runtime_env(cfg.models[0])  # an operator's path need only exist on the sampler's nodes
    assert env["py_executable"].endswith("venv-vllm/bin/python")
    assert env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "2"  # vLLM parses it as an integer
    monkeypatch.delenv(PYTHON_ENV)
    monkeypatch.setattr("twinkle.actors.vllm_group.vllm_python", lambda: str(tmp_path / "missing" / "python"))
    with pytest.raises(RuntimeError, match="make vllm-venv"):
        vllm_runtime_env(cfg.models[0])
