"""The link between neighbouring pipeline stages: activations forward, their gradients back.

Micro-batches run one after another through the stages: stage k receives micro-batch m's hidden
states, runs its layers, sends them on, and (when training) waits for their gradient before it
starts micro-batch m + 1. There is no 1F1B or interleaved overlap, so with P stages each rank idles
while the others compute; the pipeline buys memory (a stage holds 1/P of the layers), not speed.

Why plain torch.distributed send/recv and not megatron.core.pipeline_parallel's schedules: those
drive one loss function per micro-batch over fixed (seq_length x micro_batch_size) shapes and a
megatron DDP-wrapped model with its gradient-finalisation hooks. A Twinkle pass packs rows of many
tenants' requests, of varying lengths, into micro-batches; its loss code keeps per-request errors,
outputs and metrics, and LoRA gradients live in the adapter bank, not in the model. Every rank
already knows each micro-batch's shape (all ranks receive the same requests), so a stage needs
nothing but blocking send/recv of known shapes, plus one broadcast of the loss errors the last stage
found (the other stages must agree on which requests failed).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class StageLink:
    """This rank's neighbours in its pipeline (megatron's pipeline groups; one per TP rank)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        from megatron.core import parallel_state as ps

        self.size = ps.get_pipeline_model_parallel_world_size()
        self.stage = ps.get_pipeline_model_parallel_rank()
        self.first = self.stage == 0
        self.last = self.stage == self.size - 1
        self.prev = ps.get_pipeline_model_parallel_prev_rank()
        self.next = ps.get_pipeline_model_parallel_next_rank()
        self.last_rank = ps.get_pipeline_model_parallel_last_rank()
        self.group = ps.get_pipeline_model_parallel_group()
        self.device = device
        self.dtype = dtype

    def _recv(self, shape: tuple[int, ...], src: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        dist.recv(buffer, src=src)
        return buffer

    def recv_forward(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The previous stage's output hidden states ([seq, batch, hidden])."""
        return self._recv(shape, self.prev)

    def send_forward(self, hidden: torch.Tensor) -> None:
        dist.send(hidden.detach().to(self.dtype).contiguous(), dst=self.next)

    def recv_backward(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The gradient of this stage's output, from the next stage."""
        return self._recv(shape, self.next)

    def send_backward(self, received: torch.Tensor) -> None:
        """The gradient of the hidden states this stage received (zeros when nothing reached them)."""
        grad = received.grad if received.grad is not None else torch.zeros_like(received)
        dist.send(grad.to(self.dtype).contiguous(), dst=self.prev)

    def share(self, values: list) -> list:
        """The last stage's `values` (picklable), on every stage of this pipeline."""
        box = [values if self.last else None]
        dist.broadcast_object_list(box, src=self.last_rank, group=self.group,
                                   device=self.device if self.device.type == "cuda" else None)
        return box[0]
