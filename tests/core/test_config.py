"""The server config schema: the cookbook's configs validate, typos and unsafe settings do not."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from twinkle.config import ServerConfig, load_config, parse_api_keys

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "cookbook" / "client" / "server").glob("*/server_config*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_cookbook_configs_validate(path, monkeypatch):
    monkeypatch.setenv("TWINKLE_API_KEYS", "ops:tml-key")
    config = load_config(path)
    config.check_secure()
    assert config.models


def test_shipped_transformer_config_runs_here():
    config = load_config(next(p for p in CONFIGS if p.parent.name == "transformer"))
    config.check_runnable()
    assert config.models[0].name == "twinkle-tiny"


def test_shipped_megatron_config_runs_and_places_one_bundle_per_rank():
    config = load_config(next(p for p in CONFIGS if p.parent.name == "megatron" and p.name == "server_config.yaml"))
    config.check_runnable()
    model = config.models[0]
    assert model.backend == "megatron" and model.placement() == (2, {"CPU": 0.5})


def test_megatron_layouts_this_build_cannot_run_are_refused_naming_the_field():
    def megatron(**fields):
        return load_config(None, models=[{"name": "twinkle-tiny", "backend": "megatron", **fields}])

    pipelined = megatron(num_workers=2, cpus_per_worker=2, parallelism={"tensor_parallel": 2, "pipeline_parallel": 2})
    pipelined.check_runnable()  # data-parallel replicas of TP x PP run
    assert pipelined.models[0].placement() == (8, {"CPU": 0.5})
    with pytest.raises(ValueError, match="sequence_parallel"):
        megatron(parallelism={"sequence_parallel": True}).check_runnable()
    with pytest.raises(ValidationError, match=r"gpus_per_worker \(4\).*tensor_parallel x pipeline_parallel = 2"):
        megatron(gpus_per_worker=4, parallelism={"tensor_parallel": 2})
    assert megatron(gpus_per_worker=2, parallelism={"tensor_parallel": 2}).models[0].placement() == (
        2, {"CPU": 0.5, "GPU": 1.0})


def test_typos_and_bad_values_are_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: twinkle-tiny\n    max_lora_rnak: 8\n")
    with pytest.raises(ValidationError, match="max_lora_rnak"):
        load_config(bad)
    with pytest.raises(ValidationError):
        load_config(None, port=70000)
    with pytest.raises(ValidationError, match="unique"):
        load_config(None, models=[{"name": "a"}, {"name": "a"}])


def test_keys_required_beyond_loopback(monkeypatch):
    monkeypatch.delenv("TWINKLE_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="API keys"):
        load_config(None, host="0.0.0.0").check_secure()
    load_config(None, host="127.0.0.1").check_secure()
    monkeypatch.setenv("TWINKLE_API_KEYS", "alice:k1,bob:k2")
    load_config(None, host="0.0.0.0").check_secure()
    assert load_config(None).resolved_keys() == {"alice": "k1", "bob": "k2"}


def test_api_key_env_format():
    assert parse_api_keys("alice:KEY1, bob:KEY2") == {"alice": "KEY1", "bob": "KEY2"}
    with pytest.raises(ValueError, match="tenant:key"):
        parse_api_keys("alice")


def test_cli_flags_override_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("port: 9000\n")
    config = load_config(path, port=9100, model="some/model", state_dir=str(tmp_path / "s"))
    assert config.port == 9100 and config.models[0].name == "some/model" and config.state_dir.endswith("s")


def test_http_front_defaults_to_direct_ingress_and_refuses_what_cannot_work(monkeypatch):
    monkeypatch.delenv("TWINKLE_API_KEYS", raising=False)
    assert ServerConfig().resolved_http_front == "direct"  # one ingress replica: it listens on the port itself
    assert ServerConfig(ingress_replicas=2).resolved_http_front == "proxy"
    assert ServerConfig(http_front="proxy").resolved_http_front == "proxy"
    with pytest.raises(ValueError, match="ingress_replicas is 3: use http_front 'haproxy'"):
        ServerConfig(http_front="direct", ingress_replicas=3)
    with pytest.raises(ValueError, match="http_front"):
        ServerConfig(http_front="nginx")
    # HAProxy's replicas listen on every interface: never without keys, even on a loopback host
    with pytest.raises(ValueError, match="'haproxy' makes the ingress replicas listen on every interface"):
        ServerConfig(http_front="haproxy").check_secure()
    monkeypatch.setenv("TWINKLE_API_KEYS", "alice:tml-alice-key")
    ServerConfig(http_front="haproxy", ingress_replicas=2).check_secure()


def test_megatron_layout_is_checked_against_the_models_heads_and_layers(tmp_path):
    """What `check-config` and `serve` run first: TP must divide the heads and MLP, PP the layers."""
    import json

    from twinkle.preflight import PreflightError, check_models

    def megatron(source, tp, pp):
        return load_config(None, models=[{"name": "m", "path": source, "backend": "megatron",
                                          "parallelism": {"tensor_parallel": tp, "pipeline_parallel": pp}}])

    check_models(megatron("twinkle-tiny", 2, 4))  # 4 layers, 2 KV heads: fits
    with pytest.raises(PreflightError) as refused:
        check_models(megatron("twinkle-tiny", 4, 3))
    assert refused.value.lines == [
        "models[m].parallelism: tensor_parallel 4 does not divide this model's 2 KV heads; choose a divisor of 2",
        "models[m].parallelism: pipeline_parallel 3 does not divide this model's 4 decoder layers; "
        "choose a divisor of 4"]
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 6, "num_attention_heads": 8,
                                                    "num_key_value_heads": 8, "intermediate_size": 64}))
    check_models(megatron(str(folder), 8, 3))
    with pytest.raises(PreflightError, match="pipeline_parallel 4 does not divide this model's 6 decoder layers"):
        check_models(megatron(str(folder), 1, 4))
