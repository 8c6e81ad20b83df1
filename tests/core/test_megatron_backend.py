"""The megatron-core backend against the transformers backend on twinkle-tiny (CPU, gloo).

Each megatron group is real: Ray actors started with .venv-megatron's interpreter, one per rank
(DP x TP x PP), torch.distributed over gloo, megatron-core's GPTModel loaded from the HF checkpoint
(each pipeline stage its own layers). The reference is
the transformers backend in this process, with the same weights, adapter seed and data (fp32).
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from twinkle.backends import BackendConfig, ForwardRequest, StepRequest, make_training_backend
from twinkle.types import AdamParams, Datum, LoraConfig

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.timeout(900)]

MEGATRON_PYTHON = Path(__file__).resolve().parents[2] / ".venv-megatron" / "bin" / "python"
if not MEGATRON_PYTHON.exists() and not os.environ.get("TWINKLE_MEGATRON_PYTHON"):
    pytest.skip("megatron-core's virtualenv is missing: run `make megatron-venv` (make test builds it)",
                allow_module_level=True)

LORA = LoraConfig(rank=4, alpha=8.0, seed=11)
ADAM = AdamParams(learning_rate=1e-2)
LOGPROB_TOL = 1e-5  # fp32 per-token logprobs
LOSS_RTOL = 1e-6  # summed losses (~100): the same sums in a different order


def _datums(seed: int, lengths=(12, 7, 16)) -> list[Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        tokens = rng.integers(10, 2000, size=n + 1)
        out.append(Datum(input_tokens=tokens[:-1], loss_inputs={
            "target_tokens": tokens[1:], "weights": rng.uniform(0.2, 1.0, size=n).astype(np.float32)}))
    return out


# name -> (tensor_parallel, pipeline_parallel, data-parallel replicas): 13 ranks, started side by side
# (each costs ~15 s of CPU importing megatron-core).
LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2pp2": (1, 2, 2), "tp2pp2": (2, 2, 1)}


@pytest.fixture(scope="module")
def groups(state_dir):
    """Megatron groups of every layout (started side by side) and the transformers reference."""
    from twinkle.actors.megatron_group import start_megatron_group

    config = BackendConfig(base_model="twinkle-tiny", state_dir=state_dir, backend="megatron", num_threads=1)
    started = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            starts = {name: pool.submit(start_megatron_group, config, tensor_parallel=tp, pipeline_parallel=pp,
                                        data_parallel=dp, cpus_per_rank=0.5)
                      for name, (tp, pp, dp) in LAYOUTS.items()}
            for name, future in starts.items():
                started[name] = future.result()
        reference = make_training_backend(BackendConfig(base_model="twinkle-tiny", state_dir=state_dir,
                                                        num_threads=1))
        yield {**started, "hf": reference}
    finally:
        for backend in started.values():
            backend.shutdown()


def _forward(backend, adapter, data, loss="cross_entropy", backward=False, config=None):
    request = ForwardRequest("r", adapter, data, loss=loss, loss_config=config, backward=backward)
    return backend.forward_backward([request])["r"].unwrap()


def _train(backend, adapter: str, batches, lora=LORA) -> list[float]:
    if not backend.has_adapter(adapter):
        backend.create_adapter(adapter, lora, adam=ADAM)
    losses = []
    for batch in batches:
        losses.append(_forward(backend, adapter, batch, backward=True).metrics["loss:sum"])
        backend.optim_step([StepRequest("s", adapter)])["s"].unwrap()
    return losses


def _logprobs(result) -> list[np.ndarray]:
    return [out["logprobs"] for out in result.loss_outputs]


def _assert_logprobs_close(a, b, tol=LOGPROB_TOL):
    for x, y in zip(_logprobs(a), _logprobs(b), strict=True):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() <= tol


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_base_model_logprobs_equal_the_transformers_backend(groups, layout):
    data = _datums(0)
    ours, ref = _forward(groups[layout], None, data), _forward(groups["hf"], None, data)
    info = groups[layout].info()
    assert (info["tensor_parallel"], info["pipeline_parallel"], info["data_parallel"]) == LAYOUTS[layout]
    _assert_logprobs_close(ours, ref)
    assert ours.metrics["loss:sum"] == pytest.approx(ref.metrics["loss:sum"], rel=LOSS_RTOL)


def test_lora_training_at_tp2_equals_tp1_and_the_transformers_backend(groups):
    batches = [_datums(1), _datums(2, (9, 20)), _datums(1)] * 2
    curves = {name: _train(groups[name], "sft", batches) for name in ("tp1", "tp2", "hf")}
    assert curves["hf"][-1] < curves["hf"][0] - 1.0  # it trains
    np.testing.assert_allclose(curves["tp2"], curves["tp1"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(curves["tp2"], curves["hf"], rtol=LOSS_RTOL)
    probe = _datums(3)
    _assert_logprobs_close(_forward(groups["tp2"], "sft", probe), _forward(groups["hf"], "sft", probe))


def test_pipeline_and_data_parallel_training_track_the_transformers_backend(groups):
    """N SFT steps at PP=2 and DP=2 x PP=2 and TP=2 x PP=2: the losses, gradient norms and the trained
    adapter's logprobs equal the transformers backend's (fp32). The last batch has one datum, so one
    data-parallel replica runs an empty shard and still joins the step's gradient sum."""
    batches = [_datums(1), _datums(2, (9, 20)), _datums(12, (14,))] * 2
    curves, norms = {}, {}
    layouts = ["pp2", "dp2pp2", "tp2pp2"]
    for name in layouts + ["hf"]:
        backend = groups[name]
        backend.create_adapter("pipe", LORA, adam=ADAM)
        curves[name], norms[name] = [], []
        for batch in batches:
            curves[name].append(_forward(backend, "pipe", batch, backward=True).metrics["loss:sum"])
            norms[name].append(backend.optim_step([StepRequest("s", "pipe")])["s"].unwrap().metrics["grad_norm"])
    assert curves["hf"][-1] < curves["hf"][0] - 1.0  # it trains
    probe = _datums(3)
    expected = _forward(groups["hf"], "pipe", probe)
    for name in layouts:
        np.testing.assert_allclose(curves[name], curves["hf"], rtol=LOSS_RTOL, err_msg=name)
        np.testing.assert_allclose(norms[name], norms["hf"], rtol=1e-5, err_msg=name)
        _assert_logprobs_close(_forward(groups[name], "pipe", probe), expected)
        assert groups[name].describe("pipe")["train_state"].step == len(batches)
        ours, ref = groups[name].adapter_weights("pipe"), groups["hf"].adapter_weights("pipe")
        assert sorted(ours) == sorted(ref)
        assert max(np.abs(ours[k] - ref[k]).max() for k in ref) <= 1e-5


def test_an_adapter_trained_with_pipeline_parallelism_loads_in_the_transformers_backend(groups, tmp_path):
    probe = _datums(7)
    _train(groups["pp2"], "pp-export", [_datums(8)] * 3)
    saved = tmp_path / "from-pp2"
    groups["pp2"].save("pp-export", str(saved))
    groups["hf"].load("pp-export", str(saved), with_optimizer=False)
    _assert_logprobs_close(_forward(groups["hf"], "pp-export", probe), _forward(groups["pp2"], "pp-export", probe))


@pytest.mark.parametrize("loss", ["importance_sampling", "ppo"])
def test_rl_losses_at_ratio_one_give_minus_the_sum_of_advantages(groups, loss):
    data = _datums(4)
    own = _logprobs(_forward(groups["tp2"], None, data))
    rng = np.random.default_rng(5)
    rl = [Datum(input_tokens=d.input_tokens, loss_inputs={
        "target_tokens": d.loss_inputs["target_tokens"], "logprobs": lp.astype(np.float32),
        "advantages": rng.normal(size=len(lp)).astype(np.float32)}) for d, lp in zip(data, own)]
    groups["tp2"].create_adapter(f"rl-{loss}", LORA, adam=ADAM)
    result = _forward(groups["tp2"], f"rl-{loss}", rl, loss=loss, backward=True)
    expected = -sum(float(d.loss_inputs["advantages"].sum()) for d in rl)
    assert result.metrics["loss:sum"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("layout", ["tp2", "dp2pp2"])  # DP: a coupled loss runs whole on replica 0
def test_custom_loss_runs_on_megatron_with_the_same_math(groups, layout):
    def weighted_sum(logprobs, inputs):  # pickled by value into the workers
        return -sum((lp * inp["weights"]).sum() for lp, inp in zip(logprobs, inputs)) * 0.5

    data = _datums(6)
    adapter = f"custom-{layout}"
    for name in (layout, "hf"):
        groups[name].create_adapter(adapter, LORA, adam=ADAM)
    ours = _forward(groups[layout], adapter, data, loss=weighted_sum, backward=True)
    ref = _forward(groups["hf"], adapter, data, loss=weighted_sum, backward=True)
    assert ours.metrics["loss:sum"] == pytest.approx(ref.metrics["loss:sum"], rel=LOSS_RTOL)
    steps = [groups[n].optim_step([StepRequest("s", adapter)])["s"].unwrap() for n in (layout, "hf")]
    assert steps[0].metrics["grad_norm"] == pytest.approx(steps[1].metrics["grad_norm"], rel=1e-5)


def _peft_logprobs(tiny_path: str, folder: str, data: list[Datum]) -> list[np.ndarray]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32), folder)
    model.eval()
    out = []
    with torch.no_grad():
        for d in data:
            logits = model(input_ids=torch.as_tensor(d.input_tokens)[None]).logits[0].float()
            lp = torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(d.loss_inputs["target_tokens"])[:, None])
            out.append(lp[:, 0].numpy())
    return out


def test_adapters_move_between_megatron_peft_and_transformers(groups, tiny_path, tmp_path):
    from safetensors import safe_open

    probe = _datums(7)
    _train(groups["tp2"], "export", [_datums(8)] * 3)
    saved = tmp_path / "from-megatron"
    groups["tp2"].save("export", str(saved))
    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight" in names  # fused qkv split back
    assert "base_model.model.model.layers.3.mlp.gate_proj.lora_A.weight" in names
    ours = _forward(groups["tp2"], "export", probe)
    groups["hf"].load("export", str(saved), with_optimizer=False)
    _assert_logprobs_close(_forward(groups["hf"], "export", probe), ours)
    for mine, peft in zip(_logprobs(ours), _peft_logprobs(tiny_path, str(saved), probe)):
        assert np.abs(mine - peft).max() <= LOGPROB_TOL

    _train(groups["hf"], "hf-made", [_datums(9)] * 3)
    back = tmp_path / "from-transformers"
    groups["hf"].save("hf-made", str(back))
    groups["tp2"].load("hf-made", str(back), with_optimizer=False)
    _assert_logprobs_close(_forward(groups["tp2"], "hf-made", probe), _forward(groups["hf"], "hf-made", probe))


def test_resume_with_optimizer_state_continues_exactly(groups, tmp_path):
    backend = groups["tp2"]
    batches = [_datums(10), _datums(11, (5, 18))]
    _train(backend, "resume", batches)
    backend.save("resume", str(tmp_path / "ckpt"), with_optimizer=True)
    straight = _train(backend, "resume", batches * 2)
    backend.load("resumed", str(tmp_path / "ckpt"), with_optimizer=True)
    assert backend.describe("resumed")["train_state"].step == 2
    np.testing.assert_array_equal(_train(backend, "resumed", batches * 2), straight)


def test_sampling_on_megatron_workers_is_refused_saying_where_to_sample(groups):
    from twinkle.backends import SampleRequest

    outcome = groups["tp2"].sample([SampleRequest("q", None, [5, 6, 7])])["q"]
    assert outcome.error["status_code"] == 400 and "vLLM sampler" in outcome.error["error"]
