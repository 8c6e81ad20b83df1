"""The training and sampling engine: one base model, many LoRA adapters, each with its own optimizer.

This is the core every mode runs: local mode calls it in-process, the Ray workers wrap it, and the
server reaches it through those workers. It holds live tensors; everything it takes and returns is
plain data from `twinkle.types`. Adapters are time-shared on the frozen base model through peft:
training one adapter never touches another's weights, gradients or optimizer state.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from twinkle import checkpoint as ckpt
from twinkle.errors import ConflictError, InvalidInputError, NotFoundError
from twinkle.losses.functions import LOSS_FUNCTIONS, LossContext
from twinkle.metrics import merge_metrics
from twinkle.lora import lora_from_peft, module_kinds, peft_config
from twinkle.modeling import load_causal_lm, load_tokenizer, resolve_model_path, vocab_size_of
from twinkle.sampling import sample as sample_tokens
from twinkle.types import (AdamParams, CheckpointInfo, Datum, ForwardResult, LoraConfig, LRSchedule, SampleResult,
                           SamplingParams, StepResult, TrainState)
from twinkle.validation import lookup_loss, validate_batch, validate_sampling

CustomLoss = Callable[..., object]

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


@dataclass
class AdapterState:
    """Everything that belongs to one adapter besides its weights inside the peft model."""

    internal_name: str
    lora: LoraConfig
    params: list[tuple[str, torch.nn.Parameter]]  # sorted, names without the adapter name
    optimizer: torch.optim.AdamW
    adam: AdamParams
    schedule: LRSchedule | None
    state: TrainState = field(default_factory=TrainState)
    metadata: dict = field(default_factory=dict)  # the API layer's settings, kept in checkpoints


@dataclass
class EngineConfig:
    base_model: str
    state_dir: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    max_lora_rank: int = 128
    max_adapters: int = 64
    micro_batch_tokens: int = 8192  # padded tokens per forward pass; bounds activation memory
    default_max_tokens: int = 1024
    num_threads: int | None = None


class Engine:
    """A base model with named LoRA adapters: forward, forward_backward, optim_step, sample, save, load."""

    def __init__(self, config: EngineConfig | str, **overrides) -> None:
        if isinstance(config, str):
            config = EngineConfig(base_model=config, **overrides)
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_path = resolve_model_path(config.base_model, config.state_dir)
        self.tokenizer = load_tokenizer(self.model_path)
        self.model = load_causal_lm(self.model_path, config.dtype, config.device)
        self.vocab_size = vocab_size_of(self.model)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.eos_token_ids = self._eos_ids()
        self._module_kinds = module_kinds(self.model)
        self.peft = None  # created with the first adapter
        self.adapters: dict[str, AdapterState] = {}
        self._active: str | None = None
        self._counter = 0

    # ----------------------------------------------------------------- info
    def _eos_ids(self) -> list[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None) or self.tokenizer.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return [int(i) for i in ids if i is not None]

    def info(self) -> dict:
        return {
            "base_model": self.config.base_model,
            "model_path": self.model_path,
            "vocab_size": self.vocab_size,
            "max_context": self.max_context,
            "eos_token_ids": self.eos_token_ids,
            "arch": type(self.model).__name__,
            "max_lora_rank": self.config.max_lora_rank,
        }

    # ------------------------------------------------------------- adapters
    def _require(self, adapter_id: str) -> AdapterState:
        try:
            return self.adapters[adapter_id]
        except KeyError:
            raise NotFoundError(f"no adapter {adapter_id!r} on {self.config.base_model}", field="model_id") from None

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self.adapters

    def create_adapter(self, adapter_id: str, lora: LoraConfig | None = None, *, adam: AdamParams | None = None,
                       schedule: LRSchedule | None = None) -> TrainState:
        """Add a freshly initialised adapter (B = 0, so the model is unchanged until trained)."""
        lora = lora or LoraConfig()
        if adapter_id in self.adapters:
            raise ConflictError(f"adapter {adapter_id!r} already exists", field="model_id")
        if lora.rank > self.config.max_lora_rank:
            raise InvalidInputError(f"rank {lora.rank} exceeds this model's maximum LoRA rank "
                                    f"{self.config.max_lora_rank}", field="lora_config.rank")
        if len(self.adapters) >= self.config.max_adapters:
            raise InvalidInputError(f"this model already holds {self.config.max_adapters} adapters",
                                    field="model_id")
        if lora.seed is None:
            lora = lora.model_copy(update={"seed": secrets.randbits(31)})
        self._counter += 1
        internal = f"adapter{self._counter}"
        try:
            cfg = peft_config(self._module_kinds, lora, self.model_path)
        except ValueError as exc:
            raise InvalidInputError(str(exc), field="lora_config") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(lora.seed)
            if self.peft is None:
                from peft import get_peft_model

                self.peft = get_peft_model(self.model, cfg, adapter_name=internal)
                self.peft.eval()
            else:
                self.peft.add_adapter(internal, cfg)
        marker = f".{internal}."
        params = sorted(
            ((name.replace(marker, "."), p) for name, p in self.peft.named_parameters() if marker in name),
            key=lambda item: item[0],
        )
        for _, p in params:
            p.requires_grad_(True)
        adam = adam or AdamParams()
        optimizer = torch.optim.AdamW([p for _, p in params], lr=adam.learning_rate, betas=(adam.beta1, adam.beta2),
                                      eps=adam.eps, weight_decay=adam.weight_decay)
        self.adapters[adapter_id] = AdapterState(internal, lora, params, optimizer, adam, schedule,
                                                 TrainState(learning_rate=adam.learning_rate))
        self._active = None
        return self.adapters[adapter_id].state

    def remove_adapter(self, adapter_id: str) -> None:
        state = self._require(adapter_id)
        self.peft.delete_adapter(state.internal_name)
        del self.adapters[adapter_id]
        self._active = None
        if not self.adapters:  # back to the bare model; peft cannot run without an adapter
            self.model = self.peft.unload()
            self.peft = None

    def _activate(self, adapter_id: str | None):
        """Make `adapter_id` the only active adapter (None: the bare base model)."""
        if adapter_id is None:
            return self.peft.disable_adapter() if self.peft is not None else _null_context()
        state = self._require(adapter_id)
        if self._active != adapter_id:
            self.peft.base_model.set_adapter(state.internal_name)
            for other in self.adapters.values():
                for _, p in other.params:
                    p.requires_grad_(other is state)
            self._active = adapter_id
        return _null_context()

    @property
    def _network(self):
        return self.peft if self.peft is not None else self.model

    # --------------------------------------------------------------- compute
    def _micro_batches(self, data: Sequence[Datum], separable: bool) -> list[list[int]]:
        if not separable:
            return [list(range(len(data)))]
        batches, current, longest = [], [], 0
        for i, datum in enumerate(data):
            n = len(datum.input_tokens)
            if current and max(longest, n) * (len(current) + 1) > self.config.micro_batch_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, n)
        batches.append(current)
        return batches

    def _target_logprobs(self, data: Sequence[Datum]) -> list[torch.Tensor]:
        """Log-probabilities of each datum's target tokens under the active adapter."""
        lengths = [len(d.input_tokens) for d in data]
        longest = max(lengths)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(data), longest), pad, dtype=torch.long)
        for i, d in enumerate(data):
            ids[i, : lengths[i]] = torch.as_tensor(d.input_tokens, dtype=torch.long)
        mask = None
        if min(lengths) != longest:
            mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
        logits = self._network(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        out = []
        for i, d in enumerate(data):
            row = logits[i, : lengths[i]]
            targets = torch.as_tensor(d.loss_inputs["target_tokens"], dtype=torch.long)
            lse = torch.logsumexp(row, dim=-1)
            if targets.ndim == 1:
                out.append(row.gather(-1, targets[:, None])[:, 0] - lse)
            else:
                out.append(row.gather(-1, targets) - lse[:, None])
        return out

    @staticmethod
    def _loss_inputs(datum: Datum) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in datum.loss_inputs.items() if k != "target_tokens"}

    def _run_loss(self, data: Sequence[Datum], loss: str | CustomLoss, loss_config: dict | None,
                  backward: bool) -> ForwardResult:
        custom = callable(loss)
        if custom:
            validate_batch(data, "custom", loss_config, self.vocab_size, allow_custom=True)
            spec, config = None, dict(loss_config or {})
        else:
            config = validate_batch(data, loss, loss_config, self.vocab_size)
            spec = lookup_loss(loss)
        separable = spec.separable if spec else False
        outputs: list[dict[str, np.ndarray]] = [None] * len(data)  # type: ignore[list-item]
        parts, counts = [], []
        for indices in self._micro_batches(data, separable):
            batch = [data[i] for i in indices]
            with torch.set_grad_enabled(backward):
                logprobs = self._target_logprobs(batch)
                inputs = [self._loss_inputs(d) for d in batch]
                if custom:
                    loss_value, metrics = _call_custom_loss(loss, logprobs, inputs, config)
                    mean_counts: dict[str, float] = {}
                else:
                    loss_value, (metrics, mean_counts) = LOSS_FUNCTIONS[spec.name](LossContext(logprobs, inputs, config))
                if backward and loss_value.requires_grad:
                    loss_value.backward()
            for i, lp in zip(indices, logprobs):
                outputs[i] = {"logprobs": lp.detach().numpy().astype(np.float32)}
            parts.append((metrics, float(len(indices))))
            counts.append(mean_counts)
        return ForwardResult(loss_outputs=outputs, metrics=merge_metrics(parts, counts))

    def forward(self, adapter_id: str | None, data: Sequence[Datum], loss: str | CustomLoss = "cross_entropy",
                loss_config: dict | None = None) -> ForwardResult:
        """Loss and per-token target logprobs, without gradients (adapter None: the base model)."""
        with self._activate(adapter_id):
            return self._run_loss(data, loss, loss_config, backward=False)

    def forward_backward(self, adapter_id: str, data: Sequence[Datum], loss: str | CustomLoss = "cross_entropy",
                         loss_config: dict | None = None, *, progress: tuple[int, int] | None = None) -> ForwardResult:
        """Like forward, and accumulate the loss's gradients into the adapter until `optim_step`.

        `progress` = (samples, tokens) of the whole batch when `data` is one data-parallel shard.
        """
        state = self._require(adapter_id)
        with self._activate(adapter_id):
            result = self._run_loss(data, loss, loss_config, backward=True)
        samples, tokens = progress or (len(data), int(sum(len(d.input_tokens) for d in data)))
        state.state.micro_batches += 1
        state.state.consumed_samples += samples
        state.state.consumed_tokens += tokens
        return result

    def optim_step(self, adapter_id: str, adam: AdamParams | None = None) -> StepResult:
        """Apply AdamW to the accumulated gradients (scaled by the LR schedule), then clear them."""
        state = self._require(adapter_id)
        adam = adam or state.adam
        factor = state.schedule.factor(state.state.step) if state.schedule else 1.0
        lr = adam.learning_rate * factor
        params = [p for _, p in state.params]
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
            if grads else 0.0
        if adam.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grad_norm_(params, adam.grad_clip_norm)
        for group in state.optimizer.param_groups:
            group.update(lr=lr, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.state.step += 1
        state.state.learning_rate = lr
        return StepResult(metrics={"grad_norm": grad_norm, "learning_rate": lr, "step": float(state.state.step)})

    def sample(self, adapter_id: str | None, prompt_tokens: Sequence[int], params: SamplingParams | None = None,
               num_samples: int = 1, include_prompt_logprobs: bool = False,
               topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0,
               target_prompt_logprobs: np.ndarray | None = None, prompt_alt_tokens_k: int = 0) -> SampleResult:
        params = params or SamplingParams()
        prompt = np.asarray(prompt_tokens, dtype=np.int64)
        validate_sampling(prompt, params, num_samples, self.vocab_size, self.max_context,
                          topk_prompt_logprobs=topk_prompt_logprobs, topk_sample_logprobs=topk_sample_logprobs,
                          target_prompt_logprobs=target_prompt_logprobs, prompt_alt_tokens_k=prompt_alt_tokens_k)
        with self._activate(adapter_id):
            return sample_tokens(
                self._network, prompt.tolist(), params, num_samples, eos_token_ids=self.eos_token_ids,
                decode=lambda toks: self.tokenizer.decode(toks, skip_special_tokens=False),
                max_context=self.max_context, default_max_tokens=self.config.default_max_tokens,
                include_prompt_logprobs=include_prompt_logprobs, topk_prompt_logprobs=topk_prompt_logprobs,
                topk_sample_logprobs=topk_sample_logprobs, target_prompt_logprobs=target_prompt_logprobs,
                prompt_alt_tokens_k=prompt_alt_tokens_k,
            )

    def train_state(self, adapter_id: str) -> TrainState:
        return self._require(adapter_id).state.model_copy()

    def lora_config(self, adapter_id: str) -> LoraConfig:
        return self._require(adapter_id).lora

    def describe(self, adapter_id: str) -> dict:
        """The adapter's settings and progress (what a resumed model reports about itself)."""
        state = self._require(adapter_id)
        return {"lora": state.lora, "adam": state.adam, "schedule": state.schedule,
                "train_state": state.state.model_copy(), "metadata": dict(state.metadata)}

    def adapter_weights(self, adapter_id: str) -> dict[str, np.ndarray]:
        """A copy of the adapter's weights (names without the adapter name)."""
        return {name: p.detach().numpy().copy() for name, p in self._require(adapter_id).params}

    # ---------------------------------------------------------- checkpoints
    def save(self, adapter_id: str, path: str | Path, *, with_optimizer: bool = True, overwrite: bool = True,
             kind: str = "weights", include_gradients: bool = False, metadata: dict | None = None) -> CheckpointInfo:
        """Write the adapter as a PEFT folder, atomically; with_optimizer adds optimizer + trainer state."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = self._require(adapter_id)
        path = Path(path)
        weights = get_peft_model_state_dict(self.peft, adapter_name=state.internal_name, save_embedding_layers=False)
        with ckpt.atomic_folder(path, overwrite=overwrite) as tmp:
            self.peft.peft_config[state.internal_name].save_pretrained(str(tmp))
            save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / ckpt.ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
            trainer_state = {
                "lora": state.lora.model_dump(),
                "adam": state.adam.model_dump(),
                "schedule": state.schedule.model_dump() if state.schedule else None,
                "train_state": state.state.model_dump(),
                "has_optimizer": with_optimizer,
                "base_model": self.config.base_model,
                "metadata": {**state.metadata, **(metadata or {})},
            }
            ckpt.write_json(tmp / ckpt.TRAINER_STATE, trainer_state)
            if with_optimizer:
                torch.save({"param_names": [n for n, _ in state.params],
                            "optimizer": state.optimizer.state_dict()}, tmp / ckpt.OPTIMIZER_STATE)
            if include_gradients:
                grads = {n: p.grad.detach().clone() for n, p in state.params if p.grad is not None}
                torch.save(grads, tmp / ckpt.GRADIENTS)
        return CheckpointInfo(path=str(path), name=path.name, kind=kind, has_optimizer=with_optimizer,
                              step=state.state.step)

    def load(self, adapter_id: str, path: str | Path, *, with_optimizer: bool = True,
             create: bool = True) -> TrainState:
        """Load a PEFT folder into `adapter_id` (created if needed); optionally restore the optimizer."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = ckpt.require_adapter_folder(path)
        peft_cfg = PeftLoraConfig.from_pretrained(str(folder))
        saved = ckpt.read_json(folder / ckpt.TRAINER_STATE) if (folder / ckpt.TRAINER_STATE).exists() else {}
        lora = LoraConfig(**saved["lora"]) if saved.get("lora") else lora_from_peft(peft_cfg, self._module_kinds)
        if with_optimizer and not (folder / ckpt.OPTIMIZER_STATE).exists():
            raise InvalidInputError(f"checkpoint {folder.name!r} has no optimizer state; load it without the "
                                    "optimizer or save it with the optimizer", field="path")
        if adapter_id in self.adapters:
            existing = self.adapters[adapter_id].lora
            if (existing.rank, existing.train_attn, existing.train_mlp, existing.train_unembed) != \
                    (lora.rank, lora.train_attn, lora.train_mlp, lora.train_unembed):
                raise InvalidInputError(f"checkpoint has LoRA rank {lora.rank} and targets different from this "
                                        f"model's (rank {existing.rank}); create a new model from it instead",
                                        field="path")
        elif create:
            adam = AdamParams(**saved["adam"]) if saved.get("adam") else None
            schedule = LRSchedule(**saved["schedule"]) if saved.get("schedule") else None
            self.create_adapter(adapter_id, lora, adam=adam, schedule=schedule)
        state = self._require(adapter_id)
        weights = load_file(str(folder / ckpt.ADAPTER_WEIGHTS))
        result = set_peft_model_state_dict(self.peft, weights, adapter_name=state.internal_name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise InvalidInputError(f"checkpoint weights do not fit this base model (e.g. {unexpected[0]})",
                                    field="path")
        for _, p in state.params:
            p.grad = None
        state.metadata = dict(saved.get("metadata") or {})
        if with_optimizer:
            saved_opt = torch.load(folder / ckpt.OPTIMIZER_STATE, weights_only=True)
            if saved_opt["param_names"] != [n for n, _ in state.params]:
                raise InvalidInputError("optimizer state does not match this adapter's parameters", field="path")
            state.optimizer.load_state_dict(saved_opt["optimizer"])
            if saved.get("train_state"):
                state.state = TrainState(**saved["train_state"])
            if (folder / ckpt.GRADIENTS).exists():
                grads = torch.load(folder / ckpt.GRADIENTS, weights_only=True)
                for name, p in state.params:
                    if name in grads:
                        p.grad = grads[name].clone()
        else:
            state.optimizer.state.clear()
        return state.state.model_copy()


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _call_custom_loss(fn: CustomLoss, logprobs, inputs, config):
    """Run a user's loss: fn(logprobs, loss_inputs[, config]) -> loss or (loss, metrics)."""
    try:
        result = fn(logprobs, inputs, config) if _takes_three(fn) else fn(logprobs, inputs)
    except Exception as exc:  # the user's code failed: report it as bad input, not a server fault
        raise InvalidInputError(f"custom loss raised {type(exc).__name__}: {exc}", field="loss_fn") from exc
    loss, metrics = (result if isinstance(result, tuple) else (result, {}))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise InvalidInputError("custom loss must return a scalar tensor (and optionally a metrics dict)",
                                field="loss_fn")
    metrics = {str(k): float(v) for k, v in dict(metrics).items()}
    metrics.setdefault("loss:sum", float(loss.detach()))
    return loss.reshape(()), metrics


def _takes_three(fn) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
