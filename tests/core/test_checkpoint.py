"""Checkpoints: exact resume, plain-PEFT compatibility, atomic writes."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from twinkle.errors import ConflictError, InvalidInputError
from twinkle.types import AdamParams, Datum, LoraConfig, LRSchedule

TEXTS = [
    "The cat sat on the mat.",
    "A long time ago, in a valley far away, there lived an old cartographer with his maps.",
    "def add(x, y):\n    return x + y",
    "Bonjour le monde, ça va? 中文",
    "User: What is 2 + 2?\nAssistant: 4.",
    "Palm trees gave way to olive groves, then to bare hills.",
]
LORA = LoraConfig(rank=8, seed=11)
ADAM = AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=5.0)
SCHEDULE = LRSchedule(kind="cosine", warmup_steps=2, total_steps=10, min_lr_ratio=0.1)


@pytest.fixture(scope="module")
def new_engine(state_dir):
    from tests.core.solo import Solo
    from twinkle.backends import BackendConfig, make_training_backend

    def factory():
        return Solo(make_training_backend(BackendConfig(base_model="twinkle-tiny", state_dir=state_dir)))

    return factory


@pytest.fixture(scope="module")
def batches(new_engine) -> list[list[Datum]]:
    tok = new_engine().tokenizer
    data = [Datum.from_sequence(tok.encode(t)) for t in TEXTS]
    return [data[:2], data[2:4], data[4:], data[1:5]]


@pytest.fixture(scope="module")
def trained(new_engine, batches, tmp_path_factory):
    """An adapter trained 3 steps and saved with optimizer, then trained 4 more steps uninterrupted."""
    engine = new_engine()
    engine.create_adapter("run", LORA, adam=ADAM, schedule=SCHEDULE)
    for i in range(3):
        engine.forward_backward("run", batches[i % len(batches)])
        engine.optim_step("run")
    folder = tmp_path_factory.mktemp("ckpt") / "step3"
    info = engine.save("run", folder, with_optimizer=True)
    saved_weights = engine.adapter_weights("run")
    losses, lrs = _continue(engine, "run", batches, start=3, steps=4)
    return {"engine": engine, "folder": folder, "info": info, "losses": losses, "lrs": lrs,
            "saved_weights": saved_weights, "final_weights": engine.adapter_weights("run"),
            "state": engine.train_state("run")}


def _continue(engine, adapter_id, batches, start, steps):
    losses, lrs = [], []
    for i in range(start, start + steps):
        losses.append(engine.forward_backward(adapter_id, batches[i % len(batches)]).metrics["loss:sum"])
        lrs.append(engine.optim_step(adapter_id).metrics["learning_rate"])
    return losses, lrs


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------- resume
def test_save_reports_checkpoint_info(trained):
    info = trained["info"]
    assert info.path == str(trained["folder"]) and info.name == "step3"
    assert info.has_optimizer and info.step == 3 and info.kind == "weights"
    names = {p.name for p in trained["folder"].iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= names


def test_resume_in_new_engine_is_exact(trained, new_engine, batches):
    engine = new_engine()
    state = engine.load("resumed", trained["folder"], with_optimizer=True)
    assert state.step == 3 and state.micro_batches == 3
    assert engine.lora_config("resumed") == LORA
    loaded = engine.adapter_weights("resumed")
    assert all(np.array_equal(loaded[k], trained["saved_weights"][k]) for k in trained["saved_weights"])

    losses, lrs = _continue(engine, "resumed", batches, start=3, steps=4)
    assert losses == trained["losses"]  # exact float equality
    assert lrs == trained["lrs"]
    final = engine.adapter_weights("resumed")
    assert all(np.array_equal(final[k], trained["final_weights"][k]) for k in final)
    assert engine.train_state("resumed") == trained["state"]


def test_resume_without_optimizer_differs(trained, new_engine, batches):
    """Control for the test above: a fresh optimizer (and step counter) gives different losses."""
    engine = new_engine()
    state = engine.load("weights-only", trained["folder"], with_optimizer=False)
    assert state.step == 0
    losses, _ = _continue(engine, "weights-only", batches, start=3, steps=4)
    assert losses[0] == trained["losses"][0]  # same weights before the first step
    assert losses[1:] != trained["losses"][1:]


def test_resume_through_training_model_in_local_mode(state_dir, batches):
    from twinkle import TrainingModel
    from twinkle.api.local import LocalBackend

    name = f"resume-{uuid.uuid4().hex[:8]}"
    first = LocalBackend(state_dir)
    try:
        model = TrainingModel("twinkle-tiny", LORA, optimizer=ADAM, schedule=SCHEDULE, backend=first)
        for i in range(3):
            model.forward_backward(batches[i % len(batches)])
            model.step()
        info = model.save(name).result()
        expected = []
        for i in range(3, 7):
            fb = model.forward_backward(batches[i % len(batches)])
            step = model.step()
            expected.append((fb.result().metrics["loss:sum"], step.result().metrics["learning_rate"]))
    finally:
        first.close()

    second = LocalBackend(state_dir)
    try:
        resumed = TrainingModel.from_checkpoint(info.path, backend=second)
        assert resumed.info.base_model == "twinkle-tiny"
        assert resumed.info.lora == LORA
        assert resumed.train_state().result().step == 3
        got = []
        for i in range(3, 7):
            fb = resumed.forward_backward(batches[i % len(batches)])
            step = resumed.step()
            got.append((fb.result().metrics["loss:sum"], step.result().metrics["learning_rate"]))
        assert got == expected
    finally:
        second.close()


# -------------------------------------------------------------------- PEFT
def test_checkpoint_loads_with_plain_peft(trained, tiny_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    engine, folder = trained["engine"], trained["folder"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == LORA.rank and config["lora_alpha"] == LORA.alpha
    assert config["peft_type"] == "LORA"

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
        lm_head_shapes = {k: tuple(fh.get_tensor(k).shape) for k in keys if "lm_head" in k}
    assert keys
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys), keys
    assert not any("embed_tokens" in k for k in keys)
    assert lm_head_shapes and all(LORA.rank in shape for shape in lm_head_shapes.values())
    size = (folder / "adapter_model.safetensors").stat().st_size
    n_params = sum(v.size for v in trained["saved_weights"].values())
    assert size < 4 * n_params + 64 * 1024  # no full-size tensor copies beside the LoRA factors

    # the engine has trained on since the save: load the saved weights into a fresh engine adapter
    engine.load("peft-check", folder, with_optimizer=False)
    ids = engine.tokenizer.encode("The old cartographer kept his maps in long wooden drawers.")
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=torch.tensor([ids])).logits[0].float()
        with engine.active("peft-check") as network:
            engine_logits = network(input_ids=torch.tensor([ids])).logits[0].float()
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(peft_logits, engine_logits, rtol=0, atol=1e-5)
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter does change the model

    # the same through the public forward: full-vocabulary logprobs
    vocab = engine.vocab_size
    datum = Datum(input_tokens=np.asarray(ids),
                  loss_inputs={"target_tokens": np.tile(np.arange(vocab), (len(ids), 1))})
    logprobs = engine.forward("peft-check", [datum]).loss_outputs[0]["logprobs"]
    torch.testing.assert_close(torch.log_softmax(peft_logits, -1), torch.from_numpy(logprobs), rtol=0, atol=1e-5)
    engine.remove_adapter("peft-check")


# ------------------------------------------------------------------ atomic
def test_atomic_save_overwrite_and_failure(new_engine, batches, tmp_path, monkeypatch):
    import safetensors.torch

    engine = new_engine()
    engine.create_adapter("atomic", LORA, adam=ADAM)
    engine.forward_backward("atomic", batches[0])
    engine.optim_step("atomic")
    target = tmp_path / "ckpts" / "latest"
    engine.save("atomic", target)
    assert _hidden(target.parent) == []
    before = _digests(target)
    saved = engine.adapter_weights("atomic")

    with pytest.raises(ConflictError):
        engine.save("atomic", target, overwrite=False)
    assert _digests(target) == before
    assert _hidden(target.parent) == []

    engine.forward_backward("atomic", batches[1])
    engine.optim_step("atomic")

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        engine.save("atomic", target, overwrite=True)
    monkeypatch.undo()
    assert _digests(target) == before  # the previous checkpoint is intact
    assert _hidden(target.parent) == []  # and no temporary folder is left behind
    other = new_engine()
    other.load("check", target, with_optimizer=True)
    restored = other.adapter_weights("check")
    assert all(np.array_equal(restored[k], saved[k]) for k in saved)

    # a failure while writing the optimizer also keeps the old folder
    def broken_torch_save(*args, **kwargs):
        raise OSError("no space")

    monkeypatch.setattr(torch, "save", broken_torch_save)
    with pytest.raises(OSError, match="no space"):
        engine.save("atomic", target)
    monkeypatch.undo()
    assert _digests(target) == before
    assert _hidden(target.parent) == []

    # a successful overwrite replaces the folder and cleans up
    engine.save("atomic", target, overwrite=True)
    assert _digests(target) != before
    assert _hidden(target.parent) == []
    assert sorted(p.name for p in target.parent.iterdir()) == ["latest"]


def test_load_with_optimizer_from_weights_only_checkpoint(new_engine, batches, tmp_path):
    from twinkle.errors import NotFoundError

    engine = new_engine()
    engine.create_adapter("weights-only", LORA, adam=ADAM)
    engine.forward_backward("weights-only", batches[0])
    engine.optim_step("weights-only")
    info = engine.save("weights-only", tmp_path / "no-opt", with_optimizer=False)
    assert not info.has_optimizer
    assert not (tmp_path / "no-opt" / "optimizer.pt").exists()

    with pytest.raises(InvalidInputError) as err:
        engine.load("fresh", tmp_path / "no-opt", with_optimizer=True)
    assert err.value.field == "path"
    assert not engine.has_adapter("fresh")  # nothing was created on the failed load
    with pytest.raises(InvalidInputError):
        engine.load("weights-only", tmp_path / "no-opt", with_optimizer=True, create=False)

    state = engine.load("fresh", tmp_path / "no-opt", with_optimizer=False)
    assert state.step == 0
    assert all(np.array_equal(a, b) for a, b in zip(engine.adapter_weights("fresh").values(),
                                                     engine.adapter_weights("weights-only").values()))
    with pytest.raises(NotFoundError):
        engine.load("missing", tmp_path / "nothing-here")
