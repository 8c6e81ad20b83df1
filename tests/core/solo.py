"""A backend driven one request at a time, the way these engine-level tests read best.

Each call wraps one request into the backend's batched entry points (and unwraps its outcome, so
a request's error is raised); the accessors at the end reach the adapter's weights, pending
gradients and optimizer in the LoRA bank.
"""

from __future__ import annotations

import contextlib
import itertools

import torch

from twinkle.backends.base import ForwardRequest, SampleRequest, StepRequest, run_one
from twinkle.backends.multi_lora import LoraPass, lora_pass

_ids = itertools.count()


class Solo:
    def __init__(self, backend) -> None:
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def forward(self, adapter_id, data, loss="cross_entropy", loss_config=None):
        return run_one(self.backend.forward_backward,
                       ForwardRequest(f"f{next(_ids)}", adapter_id, data, loss, loss_config, backward=False))

    def forward_backward(self, adapter_id, data, loss="cross_entropy", loss_config=None):
        return run_one(self.backend.forward_backward, ForwardRequest(f"fb{next(_ids)}", adapter_id, data, loss,
                                                                     loss_config))

    def optim_step(self, adapter_id, adam=None):
        return run_one(self.backend.optim_step, StepRequest(f"s{next(_ids)}", adapter_id, adam))

    def sample(self, adapter_id, prompt_tokens, params=None, num_samples=1, **scoring):
        from twinkle.types import SamplingParams

        return run_one(self.backend.sample, SampleRequest(f"x{next(_ids)}", adapter_id, prompt_tokens,
                                                          params or SamplingParams(), num_samples, **scoring))

    # ---------------------------------------------------------- inspection
    def params(self, adapter_id) -> list[tuple[str, torch.nn.Parameter]]:
        """The adapter's weights by PEFT name: views into the bank (writing them changes the adapter)."""
        table = self.backend.table
        return table.parameters(table.get(adapter_id))

    def grads(self, adapter_id) -> dict[str, torch.Tensor | None]:
        """Pending gradients by PEFT name (None when the adapter has none)."""
        table = self.backend.table
        adapter = table.get(adapter_id)
        names = table.param_names(adapter)
        if not adapter.has_grads:
            return {n: None for n in names}
        return {n: g.detach().clone() for n, g in zip(names, table.gradients(adapter))}

    def zero_grads(self, adapter_id) -> None:
        adapter = self.backend.table.get(adapter_id)
        self.backend.bank.zero_grads(adapter.slot)
        adapter.has_grads = False

    def optimizer(self, adapter_id) -> torch.optim.AdamW:
        return self.backend.table.get(adapter_id).optimizer

    @contextlib.contextmanager
    def active(self, adapter_id):
        """Run raw `self.model(...)` calls with this adapter on every row."""
        entry = self.backend.table.get(adapter_id).entry()
        active = LoraPass(self.backend.bank, [entry])
        original = self.backend.model.forward

        def forward(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            active.set_rows([0] * ids.shape[0])
            return original(*args, **kwargs)

        self.backend.model.forward = forward
        try:
            with lora_pass(active):
                yield self.backend.model
        finally:
            del self.backend.model.forward
