"""Many LoRA adapters on one frozen base model, trained and sampled in one pass.

peft runs one adapter per training pass (its mixed-adapter batches are inference-only), so Twinkle
has a LoRA layer of its own. Every adaptable linear layer of the base model is wrapped in a
`MultiLoraLinear`, and the weights of all resident adapters live in a `LoraBank`, stacked in slots:

    A: (slots, R, in)     B: (slots, out, R)     R = the largest resident rank

Smaller ranks are zero-padded. Slot 0 is the bare base model and stays zero. A forward pass runs
under a `LoraPass` that lists its entries (a slot each; one entry per request) and which entry each
row of the batch belongs to. The batch's rows are sorted by entry, so every adapted layer runs the
frozen base matmul once for all rows and then adds `scale * (x A^T) B^T` over each entry's run of
rows, at that entry's own rank: the same shapes as a pass of that request alone, so batching
changes no request's numbers (a grouped matmul over the same runs is the GPU-scale refinement).

Gradients never touch the bank during a pass: a training pass copies its entries' weights into leaf
tensors, backward fills their `.grad`, and `LoraPass.commit` adds the gradients of the requests that
succeeded into the bank's per-slot gradient buffers. One request's failure therefore leaves every
adapter as it was, and each tenant's gradients accumulate in its own slot until its optimizer step.

Some layers do not see the batch's rows: a vision tower runs over the patches of all the pass's
images as one sequence. A pass names those `shared` layers and the one entry (`shared_entry`)
whose adapter they apply for every row; the backend gives such a pass only images of that entry.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

_ACTIVE_PASS: contextvars.ContextVar[LoraPass | None] = contextvars.ContextVar("twinkle_lora_pass", default=None)
RANK_ALIGNMENT = 8  # the bank's rank grows in steps of this many


class MultiLoraLinear(nn.Module):
    """A frozen linear layer plus the LoRA delta of each row's adapter in the active pass."""

    def __init__(self, base: nn.Linear, name: str) -> None:
        super().__init__()
        self.base = base
        self.lora_name = name  # the module's path in the base model, as PEFT names it

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the layer (tied weights, dtype) sees the base
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        active = _ACTIVE_PASS.get()
        if active is None:
            return out
        return active.apply(self.lora_name, x, out)


def active_pass() -> LoraPass | None:
    """The pass the enclosed forward calls run under (layer kinds of other backends read it)."""
    return _ACTIVE_PASS.get()


@contextlib.contextmanager
def lora_pass(active: LoraPass | None) -> Iterator[LoraPass | None]:
    """Run the enclosed forward calls with `active`'s adapters (None: the bare base model).

    A context variable, so concurrent passes on other threads (a sampling lane beside training)
    each see their own."""
    token = _ACTIVE_PASS.set(active)
    try:
        yield active
    finally:
        _ACTIVE_PASS.reset(token)


def wrap_linear_layers(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Replace each named nn.Linear of `model` by a MultiLoraLinear; returns name -> (in, out)."""
    shapes: dict[str, tuple[int, int]] = {}
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, leaf)
        if isinstance(layer, MultiLoraLinear):
            layer = layer.base
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{name} is a {type(layer).__name__}, not a linear layer")
        setattr(parent, leaf, MultiLoraLinear(layer, name))
        shapes[name] = (layer.in_features, layer.out_features)
    return shapes


class LoraBank:
    """Stacked LoRA weights and gradient buffers of every adapted layer, one slot per adapter.

    Capacity (slots) and rank grow on demand up to the configured maximum; growing re-lays out the
    tensors, so holders of views (optimizers) re-bind through `layout_version`. `lock` guards the
    layout and in-place writes against a pass gathering on another thread.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], *, max_slots: int, max_rank: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.shapes = dict(shapes)
        self.max_slots = max_slots + 1  # slot 0 is the base model
        self.max_rank = max_rank
        self.device = torch.device(device)
        self.dtype = dtype
        self.capacity = 0
        self.rank = 0
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.grad_A: dict[str, torch.Tensor] = {}
        self.grad_B: dict[str, torch.Tensor] = {}
        self.layout_version = 0
        self.lock = threading.RLock()
        self._free: list[int] = []
        self._used: set[int] = set()
        self._reserve(2, RANK_ALIGNMENT)

    # ------------------------------------------------------------ layout
    def _reserve(self, capacity: int, rank: int) -> None:
        capacity = min(max(capacity, self.capacity), self.max_slots)
        rank = min(max(rank, self.rank), _align(self.max_rank))
        if capacity == self.capacity and rank == self.rank:
            return
        for name, (fan_in, fan_out) in self.shapes.items():
            for store, shape in ((self.A, (capacity, rank, fan_in)), (self.B, (capacity, fan_out, rank)),
                                 (self.grad_A, (capacity, rank, fan_in)), (self.grad_B, (capacity, fan_out, rank))):
                new = torch.zeros(shape, device=self.device, dtype=self.dtype)
                old = store.get(name)
                if old is not None:
                    new[: old.shape[0], : old.shape[1], : old.shape[2]] = old
                store[name] = new
        self._free.extend(range(max(self.capacity, 1), capacity))
        self.capacity, self.rank = capacity, rank
        self.layout_version += 1

    def allocate(self, rank: int) -> int:
        """A free slot (zeroed) able to hold an adapter of `rank`."""
        with self.lock:
            if rank > self.max_rank:
                raise ValueError(f"rank {rank} exceeds the bank's maximum {self.max_rank}")
            if not self._free:
                if self.capacity >= self.max_slots:
                    raise RuntimeError(f"all {self.max_slots - 1} adapter slots are in use")
                self._reserve(self.capacity * 2, rank)
            self._reserve(self.capacity, _align(rank))
            slot = min(self._free)
            self._free.remove(slot)
            self._used.add(slot)
            self.clear(slot)
            return slot

    def release(self, slot: int) -> None:
        with self.lock:
            self.clear(slot)
            self._used.discard(slot)
            self._free.append(slot)

    @property
    def slots_in_use(self) -> int:
        return len(self._used)

    def clear(self, slot: int) -> None:
        with self.lock:
            for store in (self.A, self.B, self.grad_A, self.grad_B):
                for tensor in store.values():
                    tensor[slot].zero_()

    # ------------------------------------------------------------- views
    def weight_views(self, slot: int, rank: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's (A, B) of layer `name` at its own rank: views into the bank, (r, in) and (out, r)."""
        return self.A[name][slot, :rank], self.B[name][slot, :, :rank]

    def grad_views(self, slot: int, rank: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.grad_A[name][slot, :rank], self.grad_B[name][slot, :, :rank]

    def zero_grads(self, slot: int) -> None:
        with self.lock:
            for store in (self.grad_A, self.grad_B):
                for tensor in store.values():
                    tensor[slot].zero_()

    def add_grads(self, name: str, slot: int, grad_a: torch.Tensor, grad_b: torch.Tensor) -> None:
        with self.lock:
            ga, gb = self.grad_views(slot, grad_a.shape[0], name)
            ga.add_(grad_a)
            gb.add_(grad_b)


def _align(rank: int) -> int:
    return -(-rank // RANK_ALIGNMENT) * RANK_ALIGNMENT


@dataclass(frozen=True)
class PassEntry:
    """One participant of a pass: an adapter's slot, rank, scale and layers (empty slot 0: the base)."""

    slot: int
    rank: int
    scale: float
    layers: frozenset[str]
    trainable: bool = False


class LoraPass:
    """The adapters of one forward (and backward) pass, and which entry each batch row uses."""

    def __init__(self, bank: LoraBank, entries: Sequence[PassEntry], *, train: bool = False,
                 shared: frozenset[str] = frozenset(), shared_entry: int | None = None) -> None:
        self.bank = bank
        self.entries = list(entries)
        self.shared = shared  # layers whose rows are not the batch's rows (a vision tower)
        self.shared_entry = shared_entry  # the entry those layers apply to all their rows (None: no adapter)
        self.train = train and any(e.trainable for e in self.entries)
        self.layers = frozenset().union(*(e.layers for e in self.entries))
        self._weights: dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self._segments: list[tuple[int, int, int]] = []

    def set_rows(self, entry_of_row: Sequence[int]) -> None:
        """Which entry each row of the next forward's batch belongs to, as runs of equal entries."""
        segments: list[tuple[int, int, int]] = []
        for row, entry in enumerate(entry_of_row):
            if segments and segments[-1][0] == entry:
                segments[-1] = (entry, segments[-1][1], row + 1)
            else:
                segments.append((entry, row, row + 1))
        self._segments = segments

    @property
    def segments(self) -> list[tuple[int, int, int]]:
        """(entry, first row, end row) of each run of rows (other layer kinds, e.g. megatron's, read it)."""
        return list(self._segments)

    def weights(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each entry's (A, B) of layer `name` at its rank (None where it does not adapt the layer).

        Gathered once per pass: views of the bank when only sampling, leaf copies when training."""
        cached = self._weights.get(name)
        if cached is None:
            cached = []
            with self.bank.lock:
                for entry in self.entries:
                    if name not in entry.layers:
                        cached.append(None)
                        continue
                    a, b = self.bank.weight_views(entry.slot, entry.rank, name)
                    if self.train:
                        a = a.detach().clone().requires_grad_(entry.trainable)
                        b = b.detach().clone().requires_grad_(entry.trainable)
                    cached.append((a, b))
            self._weights[name] = cached
        return cached

    def apply(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` plus each row's adapter delta, one segment of rows at a time.

        Each segment is computed with the same shapes as a pass of that request alone, so a request's
        results do not depend on what shares its pass."""
        if name not in self.layers:
            return out
        weights = self.weights(name)
        if name in self.shared:
            pair = weights[self.shared_entry] if self.shared_entry is not None else None
            if pair is None:
                return out
            a, b = pair
            delta = (x.to(a.dtype) @ a.transpose(0, 1)) @ (b.transpose(0, 1) * self.entries[self.shared_entry].scale)
            return out + delta.to(out.dtype)
        # split, not slices: the backward of a split is one concatenation, where every slice would
        # back-propagate into a zero-filled copy of the whole batch
        parts = x.split([end - start for _, start, end in self._segments]) if len(self._segments) > 1 else (x,)
        pieces = []
        for (j, start, end), part in zip(self._segments, parts):
            pair = weights[j]
            if pair is None:
                pieces.append(out.new_zeros((end - start, *out.shape[1:]), dtype=torch.float32))
                continue
            a, b = pair
            pieces.append((part.to(a.dtype) @ a.transpose(0, 1)) @ (b.transpose(0, 1) * self.entries[j].scale))
        delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out + delta.to(out.dtype)

    def commit(self, succeeded: Sequence[bool]) -> list[int]:
        """Add the gradients of trainable entries that succeeded to their slots; returns those slots."""
        if not self.train:
            return []
        slots = []
        for j, (entry, ok) in enumerate(zip(self.entries, succeeded)):
            if not (ok and entry.trainable):
                continue
            for name, weights in self._weights.items():
                pair = weights[j]
                if pair is not None and pair[0].grad is not None:
                    self.bank.add_grads(name, entry.slot, pair[0].grad, pair[1].grad)
            slots.append(entry.slot)
        return slots
