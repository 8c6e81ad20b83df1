"""The engine's training semantics: adapter isolation, gradient accumulation, AdamW, LR schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from twinkle.errors import NotFoundError
from twinkle.types import AdamParams, Datum, LoraConfig, LRSchedule

TEXTS = [
    "The cat sat on the mat.",
    "A long time ago, in a valley far away, there lived an old cartographer with his maps.",
    "def add(x, y):\n    return x + y",
    "Bonjour le monde, ça va? 中文",
    "User: What is 2 + 2?\nAssistant: 4.",
    "Palm trees gave way to olive groves, then to bare hills.",
]


@pytest.fixture(scope="module")
def engine(state_dir):
    """A shared engine; every test uses its own adapter ids (or a fresh engine when it needs one)."""
    from tests.core.solo import Solo
    from twinkle.backends import BackendConfig, make_training_backend

    return Solo(make_training_backend(BackendConfig(base_model="twinkle-tiny", state_dir=state_dir)))


@pytest.fixture(scope="module")
def data(engine) -> list[Datum]:
    return [Datum.from_sequence(engine.tokenizer.encode(t)) for t in TEXTS]


def _params(engine, adapter_id):
    return engine.params(adapter_id)


def _grads(engine, adapter_id) -> dict[str, torch.Tensor | None]:
    return engine.grads(adapter_id)


def _clone_params(engine, adapter_id) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in _params(engine, adapter_id)}


def _train(engine, adapter_id, batches, steps):
    losses = []
    for i in range(steps):
        losses.append(engine.forward_backward(adapter_id, batches[i % len(batches)]).metrics["loss:sum"])
        engine.optim_step(adapter_id)
    return losses


def _same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _same_forward(x, y) -> bool:
    return x.metrics == y.metrics and all(
        np.array_equal(a["logprobs"], b["logprobs"]) for a, b in zip(x.loss_outputs, y.loss_outputs))


# ------------------------------------------------------------------ isolation
def test_adapters_are_independent(engine, data, make_engine):
    adam = AdamParams(learning_rate=1e-2)
    engine.create_adapter("iso-a", LoraConfig(rank=8, seed=1), adam=adam)
    engine.create_adapter("iso-b", LoraConfig(rank=8, seed=2), adam=adam)
    _train(engine, "iso-a", [data[:3]], 2)  # A is non-trivial (lora_B != 0)

    a_weights = engine.adapter_weights("iso-a")
    a_forward = engine.forward("iso-a", data)
    a_optimizer = {(i, k): v.clone() for i, s in enumerate(engine.optimizer("iso-a").state.values())
                   for k, v in s.items()}
    b_initial = engine.adapter_weights("iso-b")

    _train(engine, "iso-b", [data[:2], data[2:4], data[4:]], 4)
    engine.forward_backward("iso-b", data)  # B holds pending gradients

    assert not _same_weights(engine.adapter_weights("iso-b"), b_initial)
    assert _same_weights(engine.adapter_weights("iso-a"), a_weights)
    assert _same_forward(engine.forward("iso-a", data), a_forward)
    assert all(g is None for g in _grads(engine, "iso-a").values())
    a_optimizer_after = {(i, k): v for i, s in enumerate(engine.optimizer("iso-a").state.values())
                         for k, v in s.items()}
    assert a_optimizer.keys() == a_optimizer_after.keys()
    assert all(torch.equal(a_optimizer[k], a_optimizer_after[k]) for k in a_optimizer)
    assert engine.train_state("iso-a").step == 2 and engine.train_state("iso-b").step == 4

    # B's pending gradients do not leak into A's next step: A continues exactly as if it were alone
    engine.forward_backward("iso-a", data[3:])
    engine.optim_step("iso-a")
    alone = make_engine()
    alone.create_adapter("iso-a", LoraConfig(rank=8, seed=1), adam=adam)
    _train(alone, "iso-a", [data[:3]], 2)
    alone.forward_backward("iso-a", data[3:])
    alone.optim_step("iso-a")
    assert _same_weights(engine.adapter_weights("iso-a"), alone.adapter_weights("iso-a"))
    # ... and B's gradients are still pending, untouched by A's step
    assert all(g is not None for g in _grads(engine, "iso-b").values())

    for name in ("iso-a", "iso-b"):
        engine.remove_adapter(name)


def test_same_seed_same_initial_adapter(engine):
    engine.create_adapter("seed-1", LoraConfig(rank=4, seed=7))
    engine.create_adapter("seed-2", LoraConfig(rank=4, seed=7))
    engine.create_adapter("seed-3", LoraConfig(rank=4, seed=8))
    w1, w2, w3 = (engine.adapter_weights(n) for n in ("seed-1", "seed-2", "seed-3"))
    assert _same_weights(w1, w2)
    assert not _same_weights(w1, w3)
    assert all(not v.any() for k, v in w1.items() if "lora_B" in k)  # B = 0: the model starts unchanged
    for name in ("seed-1", "seed-2", "seed-3"):
        engine.remove_adapter(name)


# ------------------------------------------------------- gradient accumulation
def test_gradients_accumulate_until_optim_step(engine, data):
    adam = AdamParams(learning_rate=1e-2)
    for name in ("acc-halves", "acc-whole"):
        engine.create_adapter(name, LoraConfig(rank=8, seed=3), adam=adam)
        _train(engine, name, [data[:2]], 1)  # both identical and non-trivial
    assert _same_weights(engine.adapter_weights("acc-halves"), engine.adapter_weights("acc-whole"))

    # sequences of different lengths: the halves and the whole batch are padded differently
    first = engine.forward_backward("acc-halves", data[:3]).metrics["loss:sum"]
    second = engine.forward_backward("acc-halves", data[3:]).metrics["loss:sum"]
    whole = engine.forward_backward("acc-whole", data).metrics["loss:sum"]
    assert first + second == pytest.approx(whole, rel=1e-6)
    assert engine.train_state("acc-halves").micro_batches == 3
    assert engine.train_state("acc-halves").consumed_samples == 1 * 2 + len(data)

    halves, full = _grads(engine, "acc-halves"), _grads(engine, "acc-whole")
    scale = max(float(g.abs().max()) for g in full.values())
    assert scale > 0
    for name in full:
        assert halves[name] is not None
        diff = float((halves[name] - full[name]).abs().max())
        assert diff <= 1e-6 * max(1.0, scale), (name, diff, scale)

    # the accumulated gradient really is the sum: it differs from one half alone
    engine.create_adapter("acc-one", LoraConfig(rank=8, seed=3), adam=adam)
    _train(engine, "acc-one", [data[:2]], 1)
    engine.forward_backward("acc-one", data[:3])
    one = _grads(engine, "acc-one")
    assert any(not torch.allclose(one[n], full[n]) for n in full)

    result = engine.optim_step("acc-halves")
    assert result.metrics["step"] == 2.0
    assert all(g is None for g in _grads(engine, "acc-halves").values())
    # a step with no gradients is harmless and reports a zero norm
    before = engine.adapter_weights("acc-halves")
    assert engine.optim_step("acc-halves").metrics["grad_norm"] == 0.0
    assert _same_weights(engine.adapter_weights("acc-halves"), before)
    for name in ("acc-halves", "acc-whole", "acc-one"):
        engine.remove_adapter(name)


# -------------------------------------------------------------------- AdamW
def _reference_adamw(start: dict[str, torch.Tensor], adam: AdamParams):
    params = {n: torch.nn.Parameter(t.clone()) for n, t in start.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=adam.learning_rate, betas=(adam.beta1, adam.beta2),
                            eps=adam.eps, weight_decay=adam.weight_decay)
    return params, opt


def _clip_by_hand(grads: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    coef = min(1.0, max_norm / (norm + 1e-6))
    return {n: g * coef for n, g in grads.items()}, norm


def test_grad_clip_norm_matches_reference_adamw(engine, data):
    adam = AdamParams(learning_rate=5e-3, grad_clip_norm=1.0)
    engine.create_adapter("clip", LoraConfig(rank=8, seed=4), adam=adam)
    ref_params, ref_opt = _reference_adamw(_clone_params(engine, "clip"), adam)
    unclipped_params, unclipped_opt = _reference_adamw(_clone_params(engine, "clip"),
                                                       adam.model_copy(update={"grad_clip_norm": 0.0}))
    batches = [data[:3], data[3:], data]
    for step, batch in enumerate(batches):
        engine.forward_backward("clip", batch)
        raw = _grads(engine, "clip")
        clipped, norm = _clip_by_hand(raw, adam.grad_clip_norm)
        assert norm > 10 * adam.grad_clip_norm  # clipping is active
        metrics = engine.optim_step("clip").metrics
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)  # reported before clipping

        for n, p in ref_params.items():
            p.grad = clipped[n].clone()
        ref_opt.step()
        for n, p in unclipped_params.items():
            p.grad = raw[n].clone()
        unclipped_opt.step()

        got = _clone_params(engine, "clip")
        for n in got:
            torch.testing.assert_close(got[n], ref_params[n].detach(), rtol=1e-5, atol=1e-7)
        if step >= 1:  # Adam's first update is scale-free; from the second on clipping shows
            assert any(not torch.allclose(got[n], unclipped_params[n].detach(), rtol=1e-4, atol=1e-6)
                       for n in got)
    engine.remove_adapter("clip")


def test_weight_decay_is_decoupled(engine, data):
    lr, wd = 1e-2, 0.1
    adam = AdamParams(learning_rate=lr, weight_decay=wd)
    engine.create_adapter("wd", LoraConfig(rank=8, seed=5), adam=adam)
    start = _clone_params(engine, "wd")
    ref_params, ref_opt = _reference_adamw(start, adam)

    engine.forward_backward("wd", data)
    grads = _grads(engine, "wd")
    engine.optim_step("wd")
    got = _clone_params(engine, "wd")

    # hand-computed first AdamW step: p1 = p0 * (1 - lr*wd) - lr * g / (|g| + eps)
    # (bias-corrected m = g, v = g^2). With lora_B = 0 the lora_A gradients are exactly zero, so A
    # only shrinks by (1 - lr*wd); L2-coupled Adam would instead move A by ~lr*sign(A).
    for n, p0 in start.items():
        g = grads[n]
        expected = p0 * (1 - lr * wd) - lr * g / (g.abs() + adam.eps)
        torch.testing.assert_close(got[n], expected, rtol=1e-5, atol=1e-7)
        if "lora_A" in n:
            assert not g.any()
            torch.testing.assert_close(got[n], p0 * (1 - lr * wd), rtol=1e-6, atol=0)
            coupled = p0 - lr * torch.sign(p0)
            assert not torch.allclose(got[n], coupled, rtol=1e-3, atol=1e-5)
        else:
            assert not p0.any()

    # and it keeps matching torch's AdamW over further steps
    for n, p in ref_params.items():
        p.grad = grads[n].clone()
    ref_opt.step()
    for batch in (data[:2], data[2:]):
        engine.forward_backward("wd", batch)
        grads = _grads(engine, "wd")
        engine.optim_step("wd")
        for n, p in ref_params.items():
            p.grad = grads[n].clone()
        ref_opt.step()
    got = _clone_params(engine, "wd")
    for n in got:
        torch.testing.assert_close(got[n], ref_params[n].detach(), rtol=1e-5, atol=1e-7)
    engine.remove_adapter("wd")


def test_step_optimizer_override_applies_for_one_step(engine, data):
    engine.create_adapter("override", LoraConfig(rank=4, seed=6), adam=AdamParams(learning_rate=1e-3))
    engine.forward_backward("override", data[:2])
    assert engine.optim_step("override", AdamParams(learning_rate=5e-3)).metrics["learning_rate"] == 5e-3
    engine.forward_backward("override", data[:2])
    assert engine.optim_step("override").metrics["learning_rate"] == 1e-3
    engine.remove_adapter("override")


# ------------------------------------------------------------ LR schedules
LR = 1e-2


def _cosine(step, warmup, total, floor):
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES = {
    "constant-warmup": (LRSchedule(kind="constant", warmup_steps=3),
                        [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0]),
    "constant": (LRSchedule(), [1.0] * 7),
    "linear-warmup": (LRSchedule(kind="linear", warmup_steps=2, total_steps=6),
                      [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]),
    "linear-floor": (LRSchedule(kind="linear", total_steps=4, min_lr_ratio=0.2),
                     [1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2]),
    "cosine-warmup": (LRSchedule(kind="cosine", warmup_steps=2, total_steps=6, min_lr_ratio=0.1),
                      [0.5, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.0)),
                       0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)), 0.1 + 0.9 * 0.5,
                       0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)), 0.1]),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_lr_schedule(engine, data, name):
    schedule, factors = SCHEDULES[name]
    if schedule.kind == "cosine":  # the table above agrees with the closed form
        assert factors == pytest.approx([_cosine(s, 2, 6, 0.1) for s in range(7)], abs=1e-12)
    adapter = f"lr-{name}"
    engine.create_adapter(adapter, LoraConfig(rank=4, seed=9), adam=AdamParams(learning_rate=LR), schedule=schedule)
    lrs = []
    for step, factor in enumerate(factors):
        before = _clone_params(engine, adapter)
        if step in (0, len(factors) - 1):  # the schedule follows the step count, with or without gradients
            engine.forward_backward(adapter, data[:1])
        metrics = engine.optim_step(adapter).metrics
        lrs.append(metrics["learning_rate"])
        assert metrics["step"] == step + 1
        assert engine.optimizer(adapter).param_groups[0]["lr"] == pytest.approx(LR * factor, abs=1e-15)
        if step == 0:  # Adam's first update moves each lora_B entry by ~lr (its gradient is non-zero)
            moved = max(float((p - before[n]).abs().max()) for n, p in _clone_params(engine, adapter).items())
            assert moved == pytest.approx(LR * factor, rel=1e-3)
    assert lrs == pytest.approx([LR * f for f in factors], rel=1e-9, abs=1e-15)
    assert engine.train_state(adapter).learning_rate == pytest.approx(LR * factors[-1], abs=1e-15)
    engine.remove_adapter(adapter)


# ------------------------------------------------------- adapter lifecycle
def test_remove_and_recreate_adapters_returns_to_base(make_engine, data):
    engine = make_engine()
    base = engine.forward(None, data)
    adam = AdamParams(learning_rate=1e-2)

    engine.create_adapter("a", LoraConfig(rank=8, seed=1), adam=adam)
    _train(engine, "a", [data], 2)
    assert not _same_forward(engine.forward("a", data), base)
    assert _same_forward(engine.forward(None, data), base)  # adapters disabled: the base model

    engine.create_adapter("b", LoraConfig(rank=8, seed=2, train_unembed=False), adam=adam)
    _train(engine, "b", [data], 2)
    b_forward = engine.forward("b", data)
    b_weights = engine.adapter_weights("b")

    engine.remove_adapter("a")
    assert not engine.has_adapter("a")
    with pytest.raises(NotFoundError):
        engine.forward("a", data)
    with pytest.raises(NotFoundError):
        engine.remove_adapter("a")
    assert _same_forward(engine.forward("b", data), b_forward)
    assert _same_weights(engine.adapter_weights("b"), b_weights)
    assert _same_forward(engine.forward(None, data), base)

    # a new adapter (even under the removed id) starts from the base model and trains
    engine.create_adapter("a", LoraConfig(rank=4, seed=3), adam=adam)
    assert _same_forward(engine.forward("a", data), base)
    losses = _train(engine, "a", [data], 3)
    assert losses[-1] < losses[0]
    assert _same_forward(engine.forward("b", data), b_forward)

    engine.remove_adapter("a")
    engine.remove_adapter("b")
    assert not engine.table.adapters
    assert not any("lora" in name for name, _ in engine.model.named_modules())
    assert _same_forward(engine.forward(None, data), base)
    assert not any(p.requires_grad for p in engine.model.parameters())

    # and adapters can be created again on the bare model
    engine.create_adapter("c", LoraConfig(rank=4, seed=1), adam=adam)
    assert _same_forward(engine.forward("c", data), base)
    _train(engine, "c", [data], 1)
    assert not _same_forward(engine.forward("c", data), base)
    assert _same_forward(engine.forward(None, data), base)
