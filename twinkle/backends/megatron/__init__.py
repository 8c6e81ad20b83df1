"""The megatron-core training backend (tensor-parallel LoRA over a Ray actor group).

Modules: `convert` (HF checkpoints -> GPTModel shards), `tp_lora` (TP-aware per-projection LoRA),
`backend` (one rank's TrainingBackend), `cpu_shims` (loaded only by CPU runs). megatron-core lives in
its own virtualenv (`make megatron-venv`); importing this package does not import it.
"""
