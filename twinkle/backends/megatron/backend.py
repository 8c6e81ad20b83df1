"""The megatron-core training backend: one TP x PP rank of a GPTModel with many LoRA adapters.

Every rank of a model-parallel group (TP x PP ranks of one data-parallel replica) builds this backend
and runs the same calls in the same order (the actor layer sends each call to all of the replica's
ranks); the collectives inside megatron's layers and the LoRA layers keep the ranks in step. The
base model comes from a Hugging Face Qwen3/Llama folder (`convert`); adapters, their optimizers and checkpoints are the transformers backend's adapter table
and LoRA bank, keyed by PEFT's per-projection names, so checkpoints move freely between backends.

Planning, micro-batching, the loss math (twinkle/losses) and gradient commits are inherited from
`TransformersBackend`; this class supplies the model and its per-token logprobs. Requests of many
adapters share one pass (rows in segments by adapter), as in the transformers backend.

Pipeline parallelism: each stage builds its part of GPTModel (megatron's even layer split) and loads
only its weights. A pass runs its micro-batches one after another through the stages (`pipeline`:
hidden states forward, their gradients back; no 1F1B overlap); the last stage computes the logprobs,
the losses and the outcome. Every rank holds every adapter's full A and B: after each pass the LoRA
gradients are summed over TP x PP (zeros for layers a rank does not run), so every rank commits,
steps and saves the same adapters. Data-parallel replicas (world = DP x TP x PP) each run a shard
of the data; their gradients are summed over the DP group at `optim_step`, as the transformers
backend's data-parallel workers do.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import megatron.core  # noqa: F401  (fail at import, not mid-build, where megatron-core is missing)
import numpy as np
import torch

from twinkle.backends.adapters import AdapterTable
from twinkle.backends.base import BackendConfig, Outcome, Outcomes, SampleRequest, StepRequest
from twinkle.backends.megatron import convert
from twinkle.backends.megatron.pipeline import StageLink
from twinkle.backends.megatron.tp_lora import reduce_gradients, wrap_gpt_model
from twinkle.backends.multi_lora import LoraBank, LoraPass, PassEntry, lora_pass
from twinkle.backends.transformers import TransformersBackend, _Planned, resolve_device, target_logprobs
from twinkle.errors import InvalidInputError
from twinkle.lora import adaptable_layers
from twinkle.modeling import load_tokenizer, resolve_model_path, torch_dtype


def ensure_model_parallel(tensor_parallel: int = 1, device: str = "cpu", pipeline_parallel: int = 1) -> None:
    """torch.distributed and megatron's parallel state; a one-rank group when nothing set them up
    (local mode). Workers of a TP x PP x DP group initialise both before building the backend."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                                 pipeline_model_parallel_size=pipeline_parallel)


def _hf_layers(model_path: str) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """The adaptable HF layers (path -> kind, in module order) and their (in, out), from an empty
    meta-device copy of the HF model: the same names and order as the transformers backend."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    kinds = adaptable_layers(hf)
    modules = dict(hf.named_modules())
    return kinds, {p: (modules[p].in_features, modules[p].out_features) for p in kinds}


class MegatronBackend(TransformersBackend):
    """A TP x PP rank of megatron-core's GPTModel; adapters and losses shared with the transformers backend."""

    def __init__(self, config: BackendConfig | str, **overrides) -> None:
        # not super().__init__(): that loads the HF model; this builds megatron's and sets the same attributes
        if isinstance(config, str):
            config = BackendConfig(base_model=config, backend="megatron", **overrides)
        config = replace(config, device=resolve_device(config.device))
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        ensure_model_parallel(1, config.device)
        from megatron.core import parallel_state

        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.on_cpu = not config.device.startswith("cuda")
        if self.on_cpu:
            from twinkle.backends.megatron.cpu_shims import apply_cpu_shims

            apply_cpu_shims()
        else:
            from megatron.core import tensor_parallel

            torch.cuda.set_device(torch.device(config.device).index or 0)
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
        self.model_path = resolve_model_path(config.base_model, config.state_dir)
        self.tokenizer = load_tokenizer(self.model_path)
        self.shape = convert.HfShape.read(self.model_path)
        self.shape.check_parallel(self.tp, self.pp)
        dtype = torch_dtype(config.dtype)
        self.model = convert.build_gpt_model(self.shape, self.tp, dtype, self.on_cpu, self.pp, self.pp_rank)
        held = [layer.layer_number - 1 for layer in self.model.decoder.layers]
        if held != list(self.shape.stage_layers(self.pp, self.pp_rank)):
            raise RuntimeError(f"megatron placed layers {held} on pipeline stage {self.pp_rank}; the checkpoint "
                               f"mapping expects {list(self.shape.stage_layers(self.pp, self.pp_rank))}")
        convert.load_into(self.model, convert.megatron_shard(convert.read_hf_weights(self.model_path), self.shape,
                                                             self.tp, self.tp_rank, self.pp, self.pp_rank))
        self.model.to(config.device)
        self.model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.device = torch.device(config.device)
        self.link = StageLink(self.device, dtype) if self.pp > 1 else None
        self._received: torch.Tensor | None = None  # this micro-batch's input from the previous stage
        self.vocab_size = self.shape.vocab
        self.max_context = self.shape.max_positions
        self.eos_token_ids = self._eos_ids()
        self.vision = None  # text-only: requests with images are refused by the inherited planning
        layer_kinds, shapes = _hf_layers(self.model_path)
        wrap_gpt_model(self.model, self.shape, self.tp, self.tp_rank, layer_kinds)
        self.bank = LoraBank(shapes, max_slots=config.max_adapters, max_rank=config.max_lora_rank, device=self.device)
        self.table = AdapterTable(self.bank, layer_kinds, model_path=self.model_path, base_model=config.base_model)
        self.passes = 0
        self.forwards = 0

    def _eos_ids(self) -> list[int]:
        path = Path(self.model_path) / "generation_config.json"
        ids = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
        ids = ids if ids is not None else self.tokenizer.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return [int(i) for i in ids if i is not None]

    def info(self) -> dict:
        return {**super().info(), "arch": f"megatron-core GPTModel ({self.shape.model_type}, TP={self.tp}, "
                f"PP={self.pp}, DP={self.dp})", "tensor_parallel": self.tp, "pipeline_parallel": self.pp,
                "data_parallel": self.dp}

    def coordinates(self) -> dict[str, int]:
        """This rank's place in the group (which ranks answer for a replica is read from it)."""
        return {"tp_rank": self.tp_rank, "pp_rank": self.pp_rank, "dp_rank": self.dp_rank}

    # ------------------------------------------------------------ training
    def optim_step(self, requests: Sequence[StepRequest]) -> Outcomes:
        """With data-parallel replicas, first sum the stepped adapters' gradients over the DP group
        (each replica ran a shard of the data); then every rank takes the same step."""
        if self.dp > 1:
            import torch.distributed as dist
            from megatron.core import parallel_state

            group = parallel_state.get_data_parallel_group()
            self.sync_gradients([r.adapter_id for r in requests], lambda t: dist.all_reduce(t, group=group))
        return super().optim_step(requests)

    def _run_pass(self, planned: list[_Planned], entries: list[PassEntry]) -> None:
        """The transformers backend's pass, plus: sum the LoRA gradients over TP x PP before they are
        committed, so every rank's slots hold the full gradient. Every rank reduces the same list:
        each trainable entry's (A, B) of every layer of the pass, zeros where this rank ran none."""
        train = any(p.request.backward for p in planned)
        active = LoraPass(self.bank, entries, train=train)
        for plan in planned:
            plan.outputs = [None] * len(plan.request.data)
        with lora_pass(active), torch.set_grad_enabled(train):
            for batch in self._micro_batches(planned):
                self._run_micro_batch(active, batch)
        self.passes += 1
        if active.train:
            grads = []
            for name in sorted(active.layers):
                for entry, pair in zip(active.entries, active.weights(name)):
                    if pair is None or not entry.trainable:
                        continue
                    for t in pair:
                        if t.grad is None:
                            t.grad = torch.zeros_like(t)
                        grads.append(t.grad)
            reduce_gradients(grads)
        slots = active.commit([p.error is None and p.request.backward for p in planned])
        with self.table.lock:
            for adapter in self.table.adapters.values():
                if adapter.slot in slots:
                    adapter.has_grads = True

    def _run_micro_batch(self, active: LoraPass, batch: list[tuple[_Planned, list[int]]]) -> None:
        """One micro-batch through the pipeline (the plain pass without PP). The last stage runs the
        inherited micro-batch (its `_target_logprobs` receives the hidden states; loss, outputs,
        backward); the other stages run their layers and pass hidden states on and gradients back.
        Then every stage takes the last stage's verdict on which requests failed."""
        if self.link is None:
            return super()._run_micro_batch(active, batch)
        live = [(plan, idx) for plan, idx in batch if plan.error is None]
        if not live:
            return
        if self.link.last:
            self._received = None
            super()._run_micro_batch(active, batch)
            if active.train and self._received is not None:
                self.link.send_backward(self._received)
            self._received = None
        else:
            self._run_stage(active, [plan.request.data[i] for plan, idx in live for i in idx],
                            [plan.entry for plan, idx in live for _ in idx])
            for plan, idx in live:  # the outputs live on the last stage, which answers
                for i in idx:
                    plan.outputs[i] = {}
        errors = self.link.share([plan.error for plan, _ in live])
        for (plan, _), error in zip(live, errors):
            plan.error = error

    def _run_stage(self, active: LoraPass, data, entry_of_row: list[int]) -> None:
        """A first or middle stage's part of a micro-batch."""
        active.set_rows(entry_of_row)
        ids, positions, mask = self._inputs(data)
        shape = (ids.shape[1], ids.shape[0], self.shape.hidden)  # megatron is sequence-first
        received = self._receive(shape, active.train)
        hidden = self.model(ids, positions, mask)
        self.forwards += 1
        self.link.send_forward(hidden)
        if active.train:
            grad = self.link.recv_backward(shape)
            if hidden.requires_grad:
                torch.autograd.backward(hidden, grad)
            if received is not None:
                self.link.send_backward(received)

    def _receive(self, shape: tuple[int, ...], train: bool) -> torch.Tensor | None:
        """The previous stage's hidden states, set as this stage's input (None on the first stage)."""
        if self.link is None or self.link.first:
            return None
        received = self.link.recv_forward(shape).requires_grad_(train)
        self.model.set_input_tensor(received)
        return received

    def _inputs(self, data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Right-padded token ids, positions and (on CPU) the explicit causal mask of a micro-batch."""
        lengths = [len(d.input_tokens) for d in data]
        longest = max(lengths)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(data), longest), pad, dtype=torch.long)
        for i, d in enumerate(data):
            ids[i, : lengths[i]] = torch.from_numpy(np.array(d.input_tokens, dtype=np.int64))
        positions = torch.arange(longest, device=self.device)[None].expand(len(data), -1)
        mask = None  # causal: right padding never reaches a real token
        if self.on_cpu:
            from twinkle.backends.megatron.cpu_shims import causal_mask

            mask = causal_mask(longest)
        return ids.to(self.device), positions, mask

    def _target_logprobs(self, data, pixels: list | None = None) -> list[torch.Tensor]:
        """Log-probabilities of each datum's target tokens from the full-vocab (gathered) logits
        (on the last pipeline stage, from the hidden states the previous stage sends)."""
        ids, positions, mask = self._inputs(data)
        self._received = self._receive((ids.shape[1], ids.shape[0], self.shape.hidden), torch.is_grad_enabled())
        logits = self.model(ids, positions, mask)[..., : self.vocab_size].float()
        return target_logprobs(logits, [len(d.input_tokens) for d in data], data)

    # ------------------------------------------------------------ sampling
    def sample(self, requests: Sequence[SampleRequest]) -> Outcomes:
        """Not on megatron workers: sampling needs a sampler (transformers or vLLM) beside them."""
        error = InvalidInputError("this model trains on megatron-core, whose workers do not sample; save the "
                                  "weights for a sampler and sample there (a transformers-backend model or a "
                                  "vLLM sampler)", field="base_model")
        return {r.request_id: Outcome.failure(error) for r in requests}

