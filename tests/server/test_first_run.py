"""A first run that explains itself: `twinkle serve` and `twinkle check-config` refuse what cannot
work in a second or two, with one line that says what is wrong and what to do, before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

TWINKLE = str(Path(sys.executable).with_name("twinkle"))
FAST_S = 15.0  # generous on a loaded 2-core machine; starting Ray alone takes longer than the checks


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[int, str, str, float]:
    """Run the real `twinkle` script; return (exit code, stdout, stderr, seconds)."""
    base = {k: v for k, v in os.environ.items() if k not in ("TWINKLE_API_KEYS", "TWINKLE_ADMIN_KEYS")}
    base["HF_HUB_OFFLINE"] = "1"
    started = time.monotonic()
    done = subprocess.run([TWINKLE, *args], capture_output=True, text=True, env={**base, **(env or {})},
                          cwd=cwd, timeout=120)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


def test_serve_missing_model_folder_fails_fast(tmp_path):
    rc, _, err, took = run_cli("serve", "--model", "/missing/folder", "--state-dir", str(tmp_path / "s"),
                               cwd=tmp_path)
    line = one_line(err)
    assert rc != 0 and took < FAST_S, (rc, took)
    assert "/missing/folder" in line and "does not exist" in line and "config.json" in line
    assert not (tmp_path / "s").exists(), "nothing may start (or be created) for a model that cannot load"


def test_serve_uncached_hub_id_offline_fails_fast(tmp_path):
    rc, _, err, took = run_cli("serve", "--model", "no-such-org/no-such-model", "--state-dir", str(tmp_path / "s"),
                               env={"HF_HUB_CACHE": str(tmp_path / "empty-cache")}, cwd=tmp_path)
    line = one_line(err)
    assert rc != 0 and took < FAST_S, (rc, took)
    assert "no-such-org/no-such-model" in line and "HF_HUB_OFFLINE" in line
    assert "local folder" in line and str(tmp_path / "empty-cache") in line  # says where it looked, what to do


def test_serve_typo_of_builtin_suggests_it(tmp_path):
    rc, _, err, _ = run_cli("serve", "--model", "twinkle-tny", cwd=tmp_path)
    assert rc != 0 and "did you mean the built-in 'twinkle-tiny'" in one_line(err)


def test_check_config_yaml_syntax_error_is_one_line_with_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: 8000\nmodels:\n  - name: twinkle-tiny\n   num_workers: [1\n")
    rc, _, err, took = run_cli("check-config", str(bad))
    line = one_line(err)
    assert rc == 1 and took < FAST_S
    assert line.startswith(f"{bad}:4:4: YAML syntax error"), line


def test_check_config_schema_errors_one_line_each_with_field_path(tmp_path):
    bad = tmp_path / "typos.yaml"
    bad.write_text("prot: 8000\nmodels:\n  - name: twinkle-tiny\n    num_wrokers: 2\n")
    rc, _, err, _ = run_cli("check-config", str(bad))
    lines = err.strip().splitlines()
    assert rc == 1 and "Traceback" not in err and len(lines) == 2, err
    assert any("prot: unknown key; did you mean 'port'?" in line for line in lines), err
    assert any("models.0.num_wrokers: unknown key; did you mean 'num_workers'?" in line for line in lines), err


def test_check_config_refuses_a_key_shared_by_two_tenants(tmp_path):
    in_config = tmp_path / "shared.yaml"
    in_config.write_text("auth:\n  api_keys: {alice: tml-same, bob: tml-same}\n")
    rc, _, err, _ = run_cli("check-config", str(in_config))
    line = one_line(err)
    assert rc == 1 and "alice and bob share one key" in line

    # one tenant's key in the config, another's in the environment: the same refusal, both named
    across = tmp_path / "across.yaml"
    across.write_text("auth:\n  api_keys: {alice: tml-same}\n")
    rc, _, err, _ = run_cli("check-config", str(across), env={"TWINKLE_API_KEYS": "carol:tml-same"})
    line = one_line(err)
    assert rc == 1 and "alice and carol share one key" in line and "TWINKLE_API_KEYS" in line


def test_serve_refuses_shared_keys_before_starting(tmp_path):
    rc, _, err, took = run_cli("serve", "--state-dir", str(tmp_path / "s"),
                               env={"TWINKLE_API_KEYS": "alice:tml-k,bob:tml-k"}, cwd=tmp_path)
    assert rc != 0 and took < FAST_S and "alice and bob share one key" in one_line(err)


def test_check_config_refuses_malformed_api_keys_env(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("port: 8100\n")
    rc, _, err, _ = run_cli("check-config", str(good), env={"TWINKLE_API_KEYS": "alice-without-a-key"})
    line = one_line(err)
    assert rc == 1 and "TWINKLE_API_KEYS" in line and "tenant:key" in line and "alice-without-a-key" in line


def test_check_config_refuses_an_unknown_model(tmp_path):
    cfg = tmp_path / "unknown.yaml"
    cfg.write_text("models:\n  - name: my-model\n    path: /nowhere/my-model\n")
    rc, _, err, _ = run_cli("check-config", str(cfg))
    line = one_line(err)
    assert rc == 1 and "models[my-model]" in line and "/nowhere/my-model" in line and "does not exist" in line

    no_config = tmp_path / "empty-model"
    no_config.mkdir()
    cfg.write_text(f"models:\n  - name: mine\n    path: {no_config}\n")
    rc, _, err, _ = run_cli("check-config", str(cfg))
    assert rc == 1 and "has no config.json" in one_line(err)


def test_check_config_checks_a_megatron_layout_against_the_model(tmp_path):
    cfg = tmp_path / "megatron.yaml"
    layout = "models:\n  - name: twinkle-tiny\n    backend: megatron\n    num_workers: {dp}\n    parallelism: {par}\n"
    cfg.write_text(layout.format(dp=1, par="{pipeline_parallel: 3}"))
    rc, _, err, _ = run_cli("check-config", str(cfg))
    line = one_line(err)
    assert rc == 1 and "models[twinkle-tiny].parallelism: pipeline_parallel 3" in line and "divisor of 4" in line
    cfg.write_text(layout.format(dp=2, par="{tensor_parallel: 2, pipeline_parallel: 2}"))
    rc, out, err, _ = run_cli("check-config", str(cfg))
    assert rc == 0 and "TP=2 x PP=2: 8 rank(s)" in out and "cannot run" not in out, out + err


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from twinkle.tiny import build_builtin_model

    return build_builtin_model("twinkle-tiny", tmp_path_factory.mktemp("models") / "my-tiny")


def test_check_config_accepts_a_local_model_folder_and_keys(tmp_path, tiny_folder):
    cfg = tmp_path / "local.yaml"
    cfg.write_text(f"models:\n  - name: my-tiny\n    path: {tiny_folder}\n")
    rc, out, err, took = run_cli("check-config", str(cfg), env={"TWINKLE_API_KEYS": "alice:tml-a,bob:tml-b"})
    assert rc == 0 and took < FAST_S, err
    assert "OK" in out and f"local folder {tiny_folder.resolve()}" in out and "2 tenant key(s)" in out
