"""Tensor-parallel LoRA on megatron-core's linear layers, per projection as PEFT names them.

Each adapted megatron layer is wrapped in a `TpLoraLayer` that adds the LoRA delta of every row's
adapter in the active `LoraPass` (the same pass object, slots and gradient commit as the
transformers backend). Adapter weights are looked up by their Hugging Face layer name, in full
shape; each TP rank computes with its shard of them:

- column-parallel (`linear_qkv`, `linear_fc1`, `output_layer`): A replicated, B sharded by output
  rows. `linear_qkv` fuses q_proj, k_proj and v_proj per query group and `linear_fc1` is
  [gate_proj; up_proj], so each projection keeps its own A and B and the deltas are laid out
  like the fused weight. The input goes through `copy_to_tensor_model_parallel_region` so its
  gradient is summed over the ranks, as megatron does for the base weight.
- row-parallel (`linear_proj`, `linear_fc2`): A sharded by input columns, B replicated; the partial
  deltas are summed with `reduce_from_tensor_model_parallel_region`.

Every rank holds the adapter's full A and B (so the optimizer and checkpoints are the adapter
table's, unchanged) but computes only with its shard, so each rank's gradient is its shard's part
and zero elsewhere: summing the gradients over the TP group (`reduce_gradients`, after each pass)
gives exactly the single-device gradient. With pipeline parallelism a stage wraps only its own
layers (HF names from megatron's global layer numbers); the same sum over TP x PP fills in the rest.
Rows run in segments by adapter, batch dimension 1 (megatron is sequence-first).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from twinkle.backends.megatron.convert import HfShape
from twinkle.backends.multi_lora import active_pass


class TpLoraLayer(nn.Module):
    """A megatron linear layer plus per-row LoRA deltas; `parts` are the HF layers it fuses."""

    def __init__(self, base: nn.Module, kind: str, parts: list[str], shape: HfShape, tp: int, rank: int) -> None:
        super().__init__()
        self.base = base
        self.kind = kind  # "qkv" | "fc1" | "row" | "unembed"
        self.parts = parts
        self.shape = shape
        self.tp = tp
        self.tp_rank = rank

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        active = active_pass()
        if active is None or not any(p in active.layers for p in self.parts):
            return out, bias
        from megatron.core import tensor_parallel as mtp

        x_in = x if self.kind == "row" else mtp.copy_to_tensor_model_parallel_region(x)
        segments = active.segments or [(0, 0, x.shape[1])]
        pieces = x_in.split([end - start for _, start, end in segments], dim=1) if len(segments) > 1 else (x_in,)
        deltas = [self._delta(active, j, piece) for (j, _, _), piece in zip(segments, pieces)]
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=1)
        if self.kind == "row":
            delta = mtp.reduce_from_tensor_model_parallel_region(delta)
        elif self.kind == "unembed" and out.shape[-1] != delta.shape[-1]:
            delta = mtp.gather_from_tensor_model_parallel_region(delta)
        return out + delta.to(out.dtype), bias

    def _shard_b(self, b: torch.Tensor, name: str) -> torch.Tensor:
        if self.kind == "unembed":
            padded = self.shape.padded_vocab(self.tp)
            if b.shape[0] != padded:
                b = torch.cat([b, b.new_zeros((padded - b.shape[0], b.shape[1]))])
        return b.chunk(self.tp, dim=0)[self.tp_rank]

    def _delta(self, active, entry: int, x: torch.Tensor) -> torch.Tensor:
        scale = active.entries[entry].scale
        outs = []
        for name in self.parts:
            pair = active.weights(name)[entry] if name in active.layers else None
            if self.kind == "row":
                fan_in, fan_out = active.bank.shapes[name]
                if pair is None:
                    return x.new_zeros((*x.shape[:-1], fan_out), dtype=torch.float32)
                a, b = pair
                a_local = a.chunk(self.tp, dim=1)[self.tp_rank]
                return (x.to(a.dtype) @ a_local.transpose(0, 1)) @ (b.transpose(0, 1) * scale)
            fan_in, fan_out = active.bank.shapes[name]
            if pair is None:
                rows = self.shape.padded_vocab(self.tp) if self.kind == "unembed" else fan_out
                outs.append(x.new_zeros((*x.shape[:-1], rows // self.tp), dtype=torch.float32))
                continue
            a, b = pair
            b_local = self._shard_b(b, name)
            outs.append((x.to(a.dtype) @ a.transpose(0, 1)) @ (b_local.transpose(0, 1) * scale))
        if self.kind == "qkv":
            return _fuse_qkv_last(outs, self.shape, self.tp)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _fuse_qkv_last(parts: list[torch.Tensor], shape: HfShape, tp: int) -> torch.Tensor:
    """This rank's [q_g; k_g; v_g] per local query group, along the last dim."""
    q, k, v = parts
    groups = shape.groups // tp
    lead = q.shape[:-1]
    q = q.reshape(*lead, groups, -1)
    k = k.reshape(*lead, groups, shape.head_dim)
    v = v.reshape(*lead, groups, shape.head_dim)
    return torch.cat([q, k, v], dim=-1).reshape(*lead, -1)


def wrap_gpt_model(model: nn.Module, shape: HfShape, tp: int, rank: int, adaptable: dict[str, str]) -> None:
    """Wrap the GPTModel's adaptable linear layers; `adaptable` are the HF layer paths (-> kind)."""
    for layer in model.decoder.layers:
        hf = f"model.layers.{layer.layer_number - 1}."  # megatron numbers layers globally from 1 (PP offsets)
        attn, mlp = layer.self_attention, layer.mlp
        attn.linear_qkv = TpLoraLayer(attn.linear_qkv, "qkv", [hf + f"self_attn.{p}_proj" for p in "qkv"],
                                      shape, tp, rank)
        attn.linear_proj = TpLoraLayer(attn.linear_proj, "row", [hf + "self_attn.o_proj"], shape, tp, rank)
        mlp.linear_fc1 = TpLoraLayer(mlp.linear_fc1, "fc1", [hf + "mlp.gate_proj", hf + "mlp.up_proj"],
                                     shape, tp, rank)
        mlp.linear_fc2 = TpLoraLayer(mlp.linear_fc2, "row", [hf + "mlp.down_proj"], shape, tp, rank)
    if "lm_head" in adaptable and getattr(model, "post_process", True):  # the last pipeline stage
        model.output_layer = TpLoraLayer(model.output_layer, "unembed", ["lm_head"], shape, tp, rank)


def reduce_gradients(grads: list[torch.Tensor]) -> None:
    """Sum LoRA gradients over the model-parallel group (TP x PP): each rank holds its TP shard's part
    of the layers its pipeline stage runs and zeros elsewhere, so the sum is the full gradient. Every
    rank passes the same tensors in the same order (one flat all-reduce)."""
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    if not grads or torch.distributed.get_world_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset: offset + n].view_as(g))
        offset += n
