"""The three shims megatron-core 0.16 needs to run on a CPU (gloo) machine. GPU runs never import this.

megatron-core is written for CUDA; on CPU exactly three places fail (reference: engines.md D):
1. RoPE and attention buffers ask `torch.cuda.current_device()` for a device: it answers "cpu".
2. `model_parallel_cuda_manual_seed` needs CUDA RNG states: the public `initialize_rng_tracker(
   inference_rng_tracker=True)` gives a tracker whose `fork()` is a null context instead.
3. The default causal mask is built on `device="cuda"`: CPU forwards pass an explicit boolean mask
   (`causal_mask`).
"""

from __future__ import annotations

import torch

_applied = False


def apply_cpu_shims() -> None:
    """Shims 1 and 2 (idempotent); call after torch.distributed and parallel_state are initialised."""
    global _applied
    if _applied:
        return
    from megatron.core.tensor_parallel import random as mc_random

    torch.cuda.current_device = lambda: "cpu"  # shim 1: device for RoPE/attention buffers
    mc_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # shim 2: null fork
    _applied = True


def causal_mask(seq_len: int) -> torch.Tensor:
    """Shim 3: megatron's attention mask (True = masked) for a causal pass, shaped [1, 1, s, s]."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)[None, None]
