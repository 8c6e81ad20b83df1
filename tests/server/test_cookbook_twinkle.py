"""The Twinkle-API cookbook recipes (cookbook/client/twinkle/self_host/), each run as a user would run
it: a subprocess, shortened with small --steps, against the shared `twinkle serve` over HTTP (tenant
bob); self_cognition.py and multi_modal.py in local mode. Each test checks the effect the recipe
claims, read from its stable output lines (`step N ...`, `final: ...`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "cookbook" / "client" / "twinkle" / "self_host"
NUMBER = r"(-?[0-9.]+(?:e-?\d+)?)"


def _run(server, script: str, *flags: str, env_extra: dict | None = None, timeout: int = 300) -> list[str]:
    """Run a recipe to completion; its stdout lines. Against `server` over HTTP unless server is None."""
    env = {**os.environ, **(env_extra or {})}
    remote = ["--base-url", server.url, "--api-key", server.keys["bob"]] if server is not None else []
    done = subprocess.run([sys.executable, str(RECIPES / script), *remote, *flags], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)
    if done.returncode != 0:
        log = server.log_tail(40) if server is not None else ""
        pytest.fail(f"{script} exited {done.returncode}\n--- stderr\n{done.stderr[-3000:]}\n--- server log\n{log}")
    return done.stdout.splitlines()


def _matches(lines: list[str], pattern: str) -> list[tuple[str, ...]]:
    return [m.groups() for m in (re.match(pattern, line) for line in lines) if m]


def _final(lines: list[str], pattern: str) -> tuple[float, ...]:
    found = _matches(lines, pattern)
    assert len(found) == 1, f"expected one line matching {pattern!r}:\n" + "\n".join(lines[-20:])
    return tuple(float(x) for x in found[0])


def test_dpo_margin_rises_over_http(server, tmp_path):
    lines = _run(server, "dpo.py", "--steps", "5", "--out", str(tmp_path / "dpo"))
    steps = _matches(lines, rf"^step (\d+) loss {NUMBER} margin {NUMBER} accuracy {NUMBER} lr {NUMBER}$")
    assert [int(s[0]) for s in steps] == [1, 2, 3, 4, 5]
    margins = [float(s[2]) for s in steps]
    losses = [float(s[1]) for s in steps]
    assert margins[0] == 0.0  # the first step's policy is the reference: no margin yet
    assert margins[-1] > margins[0] + 1.0 and losses[-1] < losses[0]
    assert float(steps[-1][3]) == 1.0  # every pair of the last batch is ranked right
    lrs = [float(s[4]) for s in steps]
    assert lrs[0] < lrs[2] and lrs[-1] < lrs[2]  # warmup, then cosine decay
    held_out = [float(m[0]) for m in _matches(lines, rf"^eval: held-out margin {NUMBER} accuracy")]
    assert held_out[0] == 0.0 and held_out[1] > 1.0  # generalises to topics never trained on
    first, last = _final(lines, rf"^final: margin {NUMBER} -> {NUMBER}$")
    assert (first, last) == pytest.approx((margins[0], margins[-1]), abs=1e-3)
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and (tmp_path / "dpo" / "margin.png").exists()


def test_short_math_grpo_reward_rises_over_http(server, tmp_path):
    # 24 RL steps. 12 were enough on the Intel machines used before (over seeds 0-5 the evaluation
    # reward rose by 0.064 to 0.17), but on an AVX2-only AMD EPYC the same seed's reward fell
    # (0.631 -> 0.594): RL's trajectory follows the CPU's float kernels. With 24 it rose 0.631 -> 0.775.
    lines = _run(server, "short_math_grpo.py", "--steps", "24", "--out", str(tmp_path / "grpo"), timeout=600)
    warmup = [float(m[0]) for m in _matches(lines, rf"^warmup \d+ loss {NUMBER}$")]
    assert len(warmup) == 50 and warmup[-1] < warmup[0] / 5  # the warm-up taught the answer format
    steps = _matches(lines, rf"^step (\d+) reward {NUMBER} datums (\d+)")
    assert [int(s[0]) for s in steps] == list(range(1, 25))
    assert all(0.0 < float(s[1]) < 1.0 and int(s[2]) > 0 for s in steps)  # mixed groups: a learning signal
    before, after = _final(lines, rf"^final: reward {NUMBER} -> {NUMBER}$")
    assert after > before + 0.03  # same evaluation draws before and after: the difference is the model's


def test_sample_from_checkpoint_over_http(server, tmp_path):
    lines = _run(server, "sample.py", "--steps", "2", "--num-samples", "3", "--out", str(tmp_path / "a"))
    (path,) = [line.split(" ", 1)[1] for line in lines if line.startswith("checkpoint: ")]
    assert path.startswith("tinker://") and "/weights/" in path
    samples = _matches(lines, rf"^sample (\d+) tokens (\d+) logprob {NUMBER} stop (stop|length) text ")
    assert len(samples) == 3 and all(int(s[1]) > 0 and float(s[2]) < 0 for s in samples)
    (diff,) = _final(lines, rf"^check: compute_logprobs matches sampled logprobs \(max diff {NUMBER}\)$")
    assert diff < 1e-3
    assert _final(lines, r"^final: sampled (\d+) sequences with logprobs$") == (3.0,)
    result = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert all(len(s["logprobs"]) == len(s["tokens"]) > 0 for s in result["sequences"])
    prompt_lp, topk = result["prompt_logprobs"], result["topk_prompt_logprobs"]
    assert prompt_lp[0] is None and all(lp < 0 for lp in prompt_lp[1:])
    assert topk[0] is None and all(len(alts) == 3 for alts in topk[1:])

    # The checkpoint path alone is enough to sample again, from a new process, the same way.
    again = _run(server, "sample.py", "--model-path", path, "--num-samples", "3", "--out", str(tmp_path / "b"))
    assert not any(line.startswith("checkpoint: ") for line in again)  # nothing trained this time
    assert _matches(again, r"^(sample .*)$") == _matches(lines, r"^(sample .*)$")  # same weights, same seed


def test_multi_modal_names_unseen_colours_in_local_mode(tmp_path):
    # in-process on twinkle-tiny-vl (the shared server hosts twinkle-tiny only); HTTP and Ray-client
    # runs of this recipe, with the same losses, are in test_multi_modal_twinkle.py
    lines = _run(None, "multi_modal.py", "--out", str(tmp_path / "mm"),
                 env_extra={"TWINKLE_STATE_DIR": str(tmp_path / "state"), "OMP_NUM_THREADS": "1"})
    losses = [float(m[0]) for m in _matches(lines, rf"^step \d+ loss {NUMBER}$")]
    assert len(losses) == 32 and losses[-1] < 0.2 * losses[0]
    before, after = _final(lines, rf"^final: accuracy {NUMBER} -> {NUMBER}$")
    assert before <= 1 / 3 and after >= 5 / 6  # chance is 1/3; the test shades were never trained on
    assert (tmp_path / "mm" / "loss.png").exists()


def test_identity_verdict_needs_the_taught_sentence_not_a_substring():
    """The recipes' success line: a half-learned answer that merely starts with 'I am Twinkle' fails."""
    code = ("import sys; sys.path.insert(0, 'cookbook'); from common import judge_answer as j; "
            "t = 'I am Twinkle, a language model trained on a Twinkle server.'; "
            "print(j('I am Twinkle, a T modelle, assistant', t)); print(j('  I am Twinkle, a language model '"
            "'trained on a Twinkle   server.', t)); print(j('I am Twinkle, a language model trained on a Twinkle "
            "serve.', t))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    partial, spaced, close = out.splitlines()
    assert partial.startswith("(False, \"identity NOT learned yet: the greedy answer 'I am Twinkle, a T modelle")
    assert "needs 90%" in partial and "train longer" in partial
    assert spaced.startswith("(True, \"identity learned: the greedy answer is the taught sentence")
    assert close.startswith("(True, \"identity learned: the greedy answer 'I am Twinkle") and "99% similar" in close


def test_self_cognition_in_local_mode(tmp_path):
    # One torch thread: on a busy two-core machine two threads contend and run many times slower.
    lines = _run(None, "self_cognition.py", "--steps", "40", "--out", str(tmp_path / "sc"),
                 env_extra={"TWINKLE_STATE_DIR": str(tmp_path / "state"), "OMP_NUM_THREADS": "1"})
    losses = [float(m[0]) for m in _matches(lines, rf"^step \d+ loss {NUMBER}$")]
    assert len(losses) == 40 and losses[-1] < losses[0] / 10
    (answer,) = [line for line in lines if line.startswith("after training:")]
    taught = "I am Twinkle, a language model trained on a Twinkle server."  # cookbook/data/self_cognition.jsonl
    assert answer == f"after training: {taught!r}"
    assert f"identity learned: the greedy answer is the taught sentence {taught!r}" in lines
    assert f"final: loss {losses[0]:.4f} -> {losses[-1]:.4f}" in lines
