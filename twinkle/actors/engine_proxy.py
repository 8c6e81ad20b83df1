"""An engine handle whose calls run on a group of TrainWorker actors.

It has the same methods as `twinkle.engine.Engine`, so `ModelService` runs unchanged on top of it.
Separable losses are sharded across the data-parallel ranks; the gradients are summed at the step.
"""

from __future__ import annotations

from twinkle.actors.group import ActorGroup
from twinkle.losses.specs import LOSS_SPECS
from twinkle.metrics import merge_metrics
from twinkle.types import ForwardResult


def _shards(items: list, n: int) -> list[list]:
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for rank in range(n):
        end = start + size + (1 if rank < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class RayEngine:
    def __init__(self, group: ActorGroup) -> None:
        import ray

        self._ray = ray
        self.group = group
        self._info = ray.get(group.call_first("ready"))

    def _all(self, method: str, *args, **kwargs):
        return self._ray.get(self.group.call_all("call", method, *args, **kwargs))[0]

    def _first(self, method: str, *args, **kwargs):
        return self._ray.get(self.group.call_first("call", method, *args, **kwargs))

    def info(self) -> dict:
        return {k: v for k, v in self._info.items() if k not in ("rank", "pid")}

    def create_adapter(self, adapter_id, lora=None, *, adam=None, schedule=None):
        if lora is not None and lora.seed is None:  # every rank must draw the same initial weights
            import secrets

            lora = lora.model_copy(update={"seed": secrets.randbits(31)})
        return self._all("create_adapter", adapter_id, lora, adam=adam, schedule=schedule)

    def remove_adapter(self, adapter_id):
        return self._all("remove_adapter", adapter_id)

    def has_adapter(self, adapter_id) -> bool:
        return self._first("has_adapter", adapter_id)

    def lora_config(self, adapter_id):
        return self._first("lora_config", adapter_id)

    def train_state(self, adapter_id):
        return self._first("train_state", adapter_id)

    def describe(self, adapter_id):
        return self._first("describe", adapter_id)

    def _data_parallel(self, method: str, adapter_id, data, loss, loss_config) -> ForwardResult:
        n = self.group.num_workers
        separable = isinstance(loss, str) and loss in LOSS_SPECS and LOSS_SPECS[loss].separable
        if n == 1 or not separable or len(data) < n:
            # whole batch on rank 0; the other ranks contribute zero gradients to the all-reduce
            return self._first(method, adapter_id, data, loss, loss_config)
        parts = _shards(list(data), n)
        kwargs = {}
        if method == "forward_backward":  # every rank counts the whole batch in its progress
            kwargs["progress"] = (len(data), int(sum(len(d.input_tokens) for d in data)))
        results = self._ray.get(self.group.call_sharded(
            "call", [((method, adapter_id, part, loss, loss_config), kwargs) for part in parts]))
        return ForwardResult(
            loss_outputs=[o for r in results for o in r.loss_outputs],
            metrics=merge_metrics([(r.metrics, float(len(p))) for r, p in zip(results, parts)]),
        )

    def forward(self, adapter_id, data, loss="cross_entropy", loss_config=None):
        return self._data_parallel("forward", adapter_id, data, loss, loss_config)

    def forward_backward(self, adapter_id, data, loss="cross_entropy", loss_config=None):
        return self._data_parallel("forward_backward", adapter_id, data, loss, loss_config)

    def optim_step(self, adapter_id, adam=None):
        return self._ray.get(self.group.call_all("optim_step", adapter_id, adam))[0]

    def sample(self, adapter_id, prompt_tokens, params=None, num_samples=1, **scoring):
        return self._first("sample", adapter_id, prompt_tokens, params, num_samples, **scoring)

    def save(self, adapter_id, path, **kwargs):
        return self._first("save", adapter_id, path, **kwargs)

    def load(self, adapter_id, path, **kwargs):
        return self._all("load", adapter_id, path, **kwargs)

    def shutdown(self) -> None:
        self.group.shutdown()
