"""The Tinker SDK cookbook recipes (cookbook/client/tinker/self_host/), shortened, against a real
server: each runs as a user would run it (a subprocess with the server's URL and a tenant's key)
and must show the effect its final line claims."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[2] / "cookbook" / "client" / "tinker" / "self_host"
TAUGHT = "I am Twinkle, a language model trained on a Twinkle server."  # cookbook/data/self_cognition.jsonl


def run_recipe(server, name: str, *flags: str, timeout: float = 300) -> str:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # sampling clients load the tokenizer by model name
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, str(RECIPES / name), "--base-url", server.url,
                           "--api-key", server.keys["alice"], *flags],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (f"{name} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                                  f"--- stderr\n{proc.stderr[-4000:]}\n--- server log\n{server.log_tail(40)}")
    return proc.stdout


def final(out: str, what: str) -> tuple[float, float]:
    match = re.search(rf"^final: {what} (\S+) -> (\S+)$", out, re.M)
    assert match, f"no 'final: {what} A -> B' line in:\n{out}"
    return float(match[1]), float(match[2])


def step_values(out: str, key: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(rf"^step (\d+) .*?\b{key} (\S+)", out, re.M)}


@pytest.fixture(scope="module")
def lora_run(server, tmp_path_factory):
    """Six Pig Latin steps, a checkpoint every three."""
    out = run_recipe(server, "lora.py", "--steps", "6", "--save-every", "3", "--eval", "2",
                     "--out", str(tmp_path_factory.mktemp("lora")))
    return out, re.findall(r"^checkpoint: (tinker://\S+)$", out, re.M)


def test_self_cognition_teaches_the_identity(server, tmp_path):
    """What `make demo` runs: the answer names Twinkle after training and not before."""
    out = run_recipe(server, "self_cognition.py", "--out", str(tmp_path))
    before = re.search(r"^before training: (.*)$", out, re.M)
    after = re.search(r"^after training: (.*)$", out, re.M)
    assert before and after, out
    assert "I am Twinkle" not in before[1], out
    # the claim is exact: the greedy answer is the sentence taught for "Who are you?"
    assert ast.literal_eval(after[1]) == TAUGHT, out
    assert re.search(rf"^identity learned: the greedy answer is the taught sentence {re.escape(repr(TAUGHT))}$",
                     out, re.M), out
    losses = step_values(out, "loss")
    first, last = final(out, "loss")
    assert sorted(losses) == list(range(1, 41)) and first == pytest.approx(losses[1], abs=1e-4)
    assert last < first / 10, out
    assert re.search(r"^checkpoint: tinker://\S+/weights/self-cognition-final$", out, re.M), out
    assert (tmp_path / "metrics.jsonl").exists()


def test_lora_loss_falls_and_checkpoints_are_listed(lora_run):
    out, checkpoints = lora_run
    losses = step_values(out, "loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    first, last = final(out, "loss")
    assert (first, last) == (pytest.approx(losses[1], abs=1e-4), pytest.approx(losses[6], abs=1e-4))
    assert last < first - 1.0, out
    assert all(losses[s + 1] < losses[s] for s in range(1, 6)), losses
    assert [c.rsplit("/", 2)[-2:] for c in checkpoints] == [["weights", "step-0003"], ["weights", "step-0006"]]
    listed = re.findall(r"^listed: (\S+) (tinker://\S+)$", out, re.M)
    assert sorted(path for _, path in listed) == sorted(checkpoints)
    assert re.search(r"^eval: \d+/2 words translated exactly$", out, re.M)


def test_lora_resume_continues_the_loss_curve(server, lora_run, tmp_path):
    out, checkpoints = lora_run
    before = step_values(out, "loss")
    resumed_out = run_recipe(server, "lora.py", "--resume", checkpoints[0], "--steps", "6", "--eval", "0",
                             "--out", str(tmp_path))
    assert f"resumed from {checkpoints[0]} at step 4" in resumed_out
    resumed = step_values(resumed_out, "loss")
    assert sorted(resumed) == [4, 5, 6]
    # The same batch every step: weights and Adam moments restored exactly give the same curve.
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(before[step], rel=1e-3), (step, before, resumed)
    # ... and it starts where the saved run stopped, far below a fresh adapter's loss
    assert resumed[4] < before[3] and before[1] - resumed[4] > 0.5
    new_checkpoint = re.search(r"^checkpoint: (tinker://\S+/weights/step-0006)$", resumed_out, re.M)
    assert new_checkpoint and new_checkpoint[1] not in checkpoints  # a new training run
    assert re.search(rf"^listed: weights/step-0006 {re.escape(new_checkpoint[1])}$", resumed_out, re.M)


def _check_samples(out: str, n: int) -> None:
    assert re.search(rf"^final: sampled {n} sequences with logprobs$", out, re.M), out
    for i in range(n):
        tokens = re.search(rf"^sample {i}: stop (stop|length) tokens \[([\d, ]+)\]$", out, re.M)
        logprobs = re.search(rf"^sample {i}: logprobs \[([-\d., e]+)\]$", out, re.M)
        assert tokens and logprobs, out
        values = [float(x) for x in logprobs[1].split(",")]
        assert len(values) == len(tokens[2].split(",")) > 0
        assert all(v <= 0 for v in values)
    gap = re.search(r"^check: max \|sampled - recomputed\| logprob (\S+)$", out, re.M)
    assert gap and float(gap[1]) < 1e-3, out  # compute_logprobs agrees with the sampler


def test_sample_from_saved_sampler_weights(server, tmp_path):
    out = run_recipe(server, "sample.py", "--steps", "2", "--num-samples", "3", "--out", str(tmp_path))
    assert re.search(r"^checkpoint: tinker://\S+/sampler_weights/sample-demo$", out, re.M)
    assert len(step_values(out.replace("train step", "step"), "loss")) == 2
    _check_samples(out, 3)
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3


def test_sample_from_training_checkpoint(server, lora_run, tmp_path):
    _, checkpoints = lora_run
    out = run_recipe(server, "sample.py", "--model-path", checkpoints[-1], "--num-samples", "2",
                     "--prompt", "Translate to Pig Latin: hello", "--out", str(tmp_path))
    assert f"checkpoint: {checkpoints[-1]}" in out
    _check_samples(out, 2)


def test_dpo_margin_rises(server, tmp_path):
    out = run_recipe(server, "dpo.py", "--steps", "4", "--out", str(tmp_path))
    margins = step_values(out, "margin")
    assert sorted(margins) == [1, 2, 3, 4]
    assert margins[1] == pytest.approx(0.0, abs=1e-3)  # policy == reference before the first update
    assert all(margins[s + 1] > margins[s] for s in range(1, 4)), margins
    first, last = final(out, "margin")
    assert first == pytest.approx(0.0, abs=1e-3) and last > margins[4] > 1.0, out
    held_out = re.search(r"held-out margin (\S+) accuracy (\S+)", out)
    assert held_out and float(held_out[1]) > 0, out  # the preference carries over to unseen topics


def test_short_math_grpo_reward_rises(server, tmp_path):
    out = run_recipe(server, "short_math_grpo.py", "--steps", "8", "--out", str(tmp_path))
    rewards = step_values(out, "reward")
    assert sorted(rewards) == list(range(1, 9))
    ratios = step_values(out, "ratio")
    assert ratios and all(r == pytest.approx(1.0, abs=1e-3) for r in ratios.values())  # sampler logprobs = learner's
    before, after = final(out, "reward")
    assert after > before + 0.05, out
