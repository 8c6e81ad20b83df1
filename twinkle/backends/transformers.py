"""The transformers backend: a Hugging Face causal LM with many LoRA adapters, trained and sampled
in shared passes.

Requests of different adapters run in one forward (and backward) over the frozen base model: the
batch's rows carry their request's adapter (see `multi_lora`), each request's loss is computed on
its own rows, and each adapter's gradients land in its own slot. Micro-batches bound the padded
tokens per forward; a request whose loss couples its datums (DPO pairs, GRPO normalisation) stays
in one micro-batch. Sampling batches requests of many adapters into one generation. The same class
serves local mode in-process and the Ray workers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from twinkle.backends.adapters import AdapterTable
from twinkle.backends.base import (BackendConfig, ForwardRequest, Outcome, Outcomes, SampleRequest, SamplingBackend,
                                   StepRequest, TrainingBackend)
from twinkle.backends.multi_lora import LoraBank, LoraPass, PassEntry, lora_pass, wrap_linear_layers
from twinkle.backends.vision import VisionInputs, language_layers, vision_groups, vision_layers
from twinkle.errors import InvalidInputError, TwinkleError
from twinkle.losses.custom import call_custom_loss
from twinkle.losses.functions import LOSS_FUNCTIONS, LossContext
from twinkle.lora import adaptable_layers
from twinkle.metrics import merge_metrics
from twinkle.modeling import load_causal_lm, load_tokenizer, resolve_model_path, vocab_size_of
from twinkle.sampling import sample_batch
from twinkle.vision_sampling import sample_with_images
from twinkle.types import AdamParams, CheckpointInfo, Datum, ForwardResult, LoraConfig, LRSchedule, TrainState
from twinkle.validation import lookup_loss, validate_batch, validate_sampling

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

BASE_ENTRY = PassEntry(slot=0, rank=0, scale=0.0, layers=frozenset())


@dataclass
class _Planned:
    """A validated request inside a pass: its entry in the pass and its resolved loss."""

    request: ForwardRequest
    entry: int
    loss_name: str | None  # None: a custom loss
    config: dict
    separable: bool
    parts: list[tuple[dict, float]] = field(default_factory=list)  # (metrics, datums) per micro-batch part
    counts: list[dict] = field(default_factory=list)
    outputs: list = field(default_factory=list)
    error: TwinkleError | None = None
    pixels: dict = field(default_factory=dict)  # datum index -> (pixel_values, image_grid_thw) of its images


def resolve_device(device: str) -> str:
    """'auto' is cuda when this process can see a GPU (a Ray worker whose bundle holds one), else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def target_logprobs(logits: torch.Tensor, lengths: Sequence[int], data: Sequence[Datum]) -> list[torch.Tensor]:
    """Each datum's log-probabilities of its target tokens (one per position, or k per position for
    top-k targets) from a padded batch of logits; shared by every backend that produces logits."""
    out = []
    for i, d in enumerate(data):
        row = logits[i, : lengths[i]]
        targets = torch.from_numpy(np.array(d.loss_inputs["target_tokens"], dtype=np.int64)).to(logits.device)
        lse = torch.logsumexp(row, dim=-1)
        if targets.ndim == 1:
            out.append(row.gather(-1, targets[:, None])[:, 0] - lse)
        else:
            out.append(row.gather(-1, targets) - lse[:, None])
    return out


class TransformersBackend(TrainingBackend, SamplingBackend):
    """A base model with resident LoRA adapters in slots; batched training and sampling across them."""

    vision_layers: frozenset[str] = frozenset()  # the vision tower's adaptable layers (none: text-only)

    def __init__(self, config: BackendConfig | str, **overrides) -> None:
        if isinstance(config, str):
            config = BackendConfig(base_model=config, **overrides)
        config = replace(config, device=resolve_device(config.device))
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_path = resolve_model_path(config.base_model, config.state_dir)
        self.tokenizer = load_tokenizer(self.model_path)
        self.model = load_causal_lm(self.model_path, config.dtype, config.device)
        self.device = self.model.get_input_embeddings().weight.device
        self.vocab_size = vocab_size_of(self.model)
        self.max_context = int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 2048))
        self.eos_token_ids = self._eos_ids()
        self.vision = VisionInputs.maybe(self.model, self.model_path, self.device, config.image_limits)
        layer_kinds = adaptable_layers(self.model)
        module_paths = [path for path, _ in self.model.named_modules()]
        if self.vision is not None:
            kinds = {**language_layers(layer_kinds), **vision_layers(self.model)}
            layer_kinds = {path: kinds[path] for path in module_paths if path in kinds}  # the model's order
            self.vision_layers = frozenset(p for p, kind in layer_kinds.items() if kind == "vision")
        shapes = wrap_linear_layers(self.model, sorted(layer_kinds))
        self.bank = LoraBank(shapes, max_slots=config.max_adapters, max_rank=config.max_lora_rank, device=self.device)
        self.table = AdapterTable(self.bank, layer_kinds, model_path=self.model_path, base_model=config.base_model,
                                  module_paths=frozenset(module_paths))
        self.passes = 0  # shared training passes run so far (counters tests and benchmarks read)
        self.forwards = 0  # forward calls of the base model in those passes (one per micro-batch)

    def _eos_ids(self) -> list[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None) or self.tokenizer.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return [int(i) for i in ids if i is not None]

    def info(self) -> dict:
        return {"base_model": self.config.base_model, "model_path": self.model_path, "vocab_size": self.vocab_size,
                "max_context": self.max_context, "eos_token_ids": self.eos_token_ids,
                "arch": type(self.model).__name__, "max_lora_rank": self.config.max_lora_rank,
                "device": str(self.device), "dtype": self.config.dtype,
                "vision": self.vision.facts if self.vision is not None else None}

    def stats(self) -> dict:
        return {"passes": self.passes, "forwards": self.forwards, "resident_adapters": len(self.table.adapters),
                "bank_slots": self.bank.capacity - 1, "bank_rank": self.bank.rank}

    # ------------------------------------------------------------ adapters
    def create_adapter(self, adapter_id: str, lora: LoraConfig | None = None, *, adam: AdamParams | None = None,
                       schedule: LRSchedule | None = None) -> TrainState:
        lora = lora or LoraConfig()
        if lora.seed is None:
            import secrets

            lora = lora.model_copy(update={"seed": secrets.randbits(31)})
        adapter = self.table.create(adapter_id, lora, adam or AdamParams(), schedule)
        return adapter.state.model_copy()

    def remove_adapter(self, adapter_id: str) -> None:
        self.table.remove(adapter_id)

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self.table.adapters

    def describe(self, adapter_id: str) -> dict:
        adapter = self.table.get(adapter_id)
        return {"lora": adapter.lora, "adam": adapter.adam, "schedule": adapter.schedule,
                "train_state": adapter.state.model_copy(), "metadata": dict(adapter.metadata)}

    def adapter_weights(self, adapter_id: str) -> dict[str, np.ndarray]:
        """A copy of the adapter's weights by PEFT name (for tests and inspection)."""
        return self.table.weights(adapter_id)

    def load_adapter(self, adapter_id: str, path: str | Path) -> None:
        if self.has_adapter(adapter_id):
            self.remove_adapter(adapter_id)
        self.load(adapter_id, path, with_optimizer=False, create=True)

    def save(self, adapter_id: str, path: str | Path, *, with_optimizer: bool = True, overwrite: bool = True,
             kind: str = "weights", include_gradients: bool = False, metadata: dict | None = None) -> CheckpointInfo:
        return self.table.save(adapter_id, path, with_optimizer=with_optimizer, overwrite=overwrite, kind=kind,
                               include_gradients=include_gradients, metadata=metadata)

    def load(self, adapter_id: str, path: str | Path, *, with_optimizer: bool = True,
             create: bool = True) -> TrainState:
        return self.table.load(adapter_id, path, with_optimizer=with_optimizer, create=create)

    def sync_gradients(self, adapter_ids: Sequence[str], all_reduce) -> None:
        with self.table.lock, self.bank.lock:
            for adapter_id in adapter_ids:
                adapter = self.table.adapters.get(adapter_id)
                if adapter is None:  # the step fails on every rank alike
                    continue
                flag = torch.tensor([1.0 if adapter.has_grads else 0.0], device=self.device)
                all_reduce(flag)
                for grad in self.table.gradients(adapter):
                    buffer = grad if grad.is_contiguous() else grad.contiguous()
                    all_reduce(buffer)
                    if buffer is not grad:
                        grad.copy_(buffer)
                adapter.has_grads = bool(flag.item() > 0)

    # ------------------------------------------------------------ training
    def optim_step(self, requests: Sequence[StepRequest]) -> Outcomes:
        outcomes = {}
        for request in requests:
            try:
                outcomes[request.request_id] = Outcome(self.table.step(request.adapter_id, request.adam))
            except TwinkleError as exc:
                outcomes[request.request_id] = Outcome.failure(exc)
        return outcomes

    def forward_backward(self, requests: Sequence[ForwardRequest]) -> Outcomes:
        outcomes: Outcomes = {}
        planned: list[_Planned] = []
        entries: list[PassEntry] = []
        for request in requests:
            try:
                plan = self._plan(request, len(entries))
            except TwinkleError as exc:
                outcomes[request.request_id] = Outcome.failure(exc)
                continue
            entries.append(BASE_ENTRY if request.adapter_id is None
                           else self.table.get(request.adapter_id).entry(trainable=request.backward))
            planned.append(plan)
        if planned and not self.vision_layers:
            self._run_pass(planned, entries)
        for group in self._vision_groups(planned, entries) if self.vision_layers else []:
            sub = [entries[planned[i].entry] for i in group]
            shared = None
            for k, i in enumerate(group):
                planned[i].entry = k
                if planned[i].pixels and sub[k].layers & self.vision_layers:
                    shared = k
            self._run_pass([planned[i] for i in group], sub, shared=shared)
        for plan in planned:
            request = plan.request
            if plan.error is not None:
                outcomes[request.request_id] = Outcome.failure(plan.error)
                continue
            outcomes[request.request_id] = Outcome(ForwardResult(
                loss_outputs=plan.outputs, metrics=merge_metrics(plan.parts, plan.counts)))
            if request.backward:
                self._count_progress(request)
        return outcomes

    def _vision_groups(self, planned: list[_Planned], entries: list[PassEntry]) -> list[list[int]]:
        """The passes these requests run in: one, unless images need different vision-tower adapters
        (the tower sees all images of a pass as one sequence, so it runs one adapter per pass)."""
        if not planned:
            return []
        keys = [i if entries[p.entry].layers & self.vision_layers else None for i, p in enumerate(planned)]
        return vision_groups(keys, [bool(p.pixels) for p in planned])

    def _plan(self, request: ForwardRequest, entry: int) -> _Planned:
        """Validate a request before it joins a pass; errors here are the request's own."""
        if request.adapter_id is not None or request.backward:  # forward of None: the bare base model
            self.table.get(request.adapter_id)
        if callable(request.loss):
            validate_batch(request.data, "custom", request.loss_config, self.vocab_size, allow_custom=True,
                           max_context=self.max_context)
            return _Planned(request, entry, None, dict(request.loss_config or {}), separable=False,
                            pixels=self._pixels(request))
        config = validate_batch(request.data, request.loss, request.loss_config, self.vocab_size,
                                max_context=self.max_context)
        spec = lookup_loss(request.loss)
        return _Planned(request, entry, spec.name, config, separable=spec.separable, pixels=self._pixels(request))

    def _pixels(self, request: ForwardRequest) -> dict:
        """Each datum's images, decoded and checked against their placeholder runs (vision models)."""
        pixels = {}
        for i, datum in enumerate(request.data):
            field = f"data[{i}].model_input"
            if self.vision is None:
                if datum.images:
                    raise InvalidInputError(f"{self.config.base_model} is a text-only model and takes no images",
                                            field=field)
                continue
            self.vision.check_placeholders(datum.input_tokens, datum.images, field)
            if datum.images:
                pixels[i] = self.vision.encode(datum.images, field)
        return pixels

    def _count_progress(self, request: ForwardRequest) -> None:
        state = self.table.get(request.adapter_id).state
        samples, tokens = request.progress or (len(request.data), request.num_tokens)
        state.micro_batches += 1
        state.consumed_samples += samples
        state.consumed_tokens += tokens

    def _micro_batches(self, planned: list[_Planned]) -> list[list[tuple[_Planned, list[int]]]]:
        """Pack the requests' datums into micro-batches of at most `micro_batch_tokens` padded tokens.

        A separable request may be split across micro-batches; one whose loss couples its datums is
        kept whole (alone if it is larger than the budget)."""
        budget = self.config.micro_batch_tokens
        batches: list[list[tuple[_Planned, list[int]]]] = []
        current: list[tuple[_Planned, list[int]]] = []
        rows = longest = 0

        def fits(lengths: list[int]) -> bool:
            return max([longest] + lengths) * (rows + len(lengths)) <= budget

        def close() -> None:
            nonlocal current, rows, longest
            if current:
                batches.append(current)
            current, rows, longest = [], 0, 0

        for plan in planned:
            lengths = [len(d.input_tokens) for d in plan.request.data]
            if not plan.separable:
                if not fits(lengths):
                    close()
                current.append((plan, list(range(len(lengths)))))
                rows, longest = rows + len(lengths), max([longest] + lengths)
                continue
            part: list[int] = []
            for i, n in enumerate(lengths):
                if (rows or part) and not fits([n]):
                    if part:
                        current.append((plan, part))
                    close()
                    part = []
                part.append(i)
                rows, longest = rows + 1, max(longest, n)
            current.append((plan, part))
        close()
        return batches

    def _run_pass(self, planned: list[_Planned], entries: list[PassEntry], shared: int | None = None) -> None:
        """One shared pass; `shared`: the entry whose vision-tower adapter the pass's images run under."""
        train = any(p.request.backward for p in planned)
        active = LoraPass(self.bank, entries, train=train, shared=self.vision_layers, shared_entry=shared)
        for plan in planned:
            plan.outputs = [None] * len(plan.request.data)
        with lora_pass(active), torch.set_grad_enabled(train):
            for batch in self._micro_batches(planned):
                self._run_micro_batch(active, batch)
        self.passes += 1
        slots = active.commit([p.error is None and p.request.backward for p in planned])
        with self.table.lock:
            for adapter in self.table.adapters.values():
                if adapter.slot in slots:
                    adapter.has_grads = True

    def _run_micro_batch(self, active: LoraPass, batch: list[tuple[_Planned, list[int]]]) -> None:
        live = [(plan, idx) for plan, idx in batch if plan.error is None]
        if not live:
            return
        data = [plan.request.data[i] for plan, idx in live for i in idx]
        pixels = [plan.pixels.get(i) for plan, idx in live for i in idx]
        active.set_rows([plan.entry for plan, idx in live for _ in idx])
        logprobs = self._target_logprobs(data, pixels)
        self.forwards += 1
        total = None
        offset = 0
        for plan, idx in live:
            part = logprobs[offset: offset + len(idx)]
            offset += len(idx)
            try:
                loss, metrics, counts = self._loss(plan, part, idx)
            except TwinkleError as exc:
                plan.error = exc
                continue
            for i, lp in zip(idx, part):
                plan.outputs[i] = {"logprobs": lp.detach().float().cpu().numpy()}
            plan.parts.append((metrics, float(len(idx))))
            plan.counts.append(counts)
            if plan.request.backward and loss.requires_grad:
                total = loss if total is None else total + loss
        if total is not None:
            total.backward()

    def _loss(self, plan: _Planned, logprobs: list[torch.Tensor], idx: list[int]):
        inputs = [_loss_inputs(plan.request.data[i], self.device) for i in idx]
        if plan.loss_name is None:
            loss, metrics = call_custom_loss(plan.request.loss, logprobs, inputs, plan.config)
            return loss, metrics, {}
        loss, (metrics, counts) = LOSS_FUNCTIONS[plan.loss_name](LossContext(logprobs, inputs, plan.config))
        return loss, metrics, counts

    def _target_logprobs(self, data, pixels: list | None = None) -> list[torch.Tensor]:
        """Log-probabilities of each datum's target tokens (rows use the active pass's adapters);
        `pixels[i]`: row i's encoded images, if any."""
        lengths = [len(d.input_tokens) for d in data]
        longest = max(lengths)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(data), longest), pad, dtype=torch.long)
        for i, d in enumerate(data):
            ids[i, : lengths[i]] = torch.from_numpy(np.array(d.input_tokens, dtype=np.int64))
        mask = None
        if min(lengths) != longest:
            mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long().to(self.device)
        ids = ids.to(self.device)
        extra = self.vision.forward_kwargs(pixels, ids) if self.vision is not None and pixels else {}
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits.float()
        return target_logprobs(logits, lengths, data)

    # ------------------------------------------------------------ sampling
    def sample(self, requests: Sequence[SampleRequest]) -> Outcomes:
        outcomes: Outcomes = {}
        entries, accepted = [], []
        for request in requests:
            try:
                prompt = np.asarray(request.prompt_tokens, dtype=np.int64)
                validate_sampling(prompt, request.params, request.num_samples, self.vocab_size, self.max_context,
                                  topk_prompt_logprobs=request.topk_prompt_logprobs,
                                  topk_sample_logprobs=request.topk_sample_logprobs,
                                  target_prompt_logprobs=request.target_prompt_logprobs,
                                  prompt_alt_tokens_k=request.prompt_alt_tokens_k)
                entry = BASE_ENTRY if request.adapter_id is None else self.table.get(request.adapter_id).entry()
                pixels = self._prompt_pixels(request, prompt)
            except TwinkleError as exc:
                outcomes[request.request_id] = Outcome.failure(exc)
                continue
            if pixels is not None:
                outcomes[request.request_id] = self._sample_with_images(request, entry, pixels)
                continue
            entries.append(entry)
            accepted.append(request)
        if not accepted:
            return outcomes
        active = None if all(e is BASE_ENTRY for e in entries) else LoraPass(self.bank, entries,
                                                                             shared=self.vision_layers)
        with lora_pass(active):
            results = sample_batch(
                self.model, accepted, eos_token_ids=self.eos_token_ids,
                decode=lambda toks: self.tokenizer.decode(toks, skip_special_tokens=False),
                max_context=self.max_context, default_max_tokens=self.config.default_max_tokens,
                on_rows=active.set_rows if active is not None else None)
        for request, result in zip(accepted, results):
            outcomes[request.request_id] = Outcome(result)
        return outcomes

    def _prompt_pixels(self, request: SampleRequest, prompt: np.ndarray):
        """The prompt's encoded images (None: a text prompt), checked like a datum's."""
        if self.vision is None:
            if request.images:
                raise InvalidInputError(f"{self.config.base_model} is a text-only model and takes no images",
                                        field="prompt")
            return None
        self.vision.check_placeholders(prompt, request.images, "prompt")
        return self.vision.encode(request.images, "prompt") if request.images else None

    def _sample_with_images(self, request: SampleRequest, entry: PassEntry, pixels) -> Outcome:
        """One image prompt's samples (see twinkle/vision_sampling.py for why it runs alone)."""
        active = None if entry is BASE_ENTRY else LoraPass(self.bank, [entry], shared=self.vision_layers,
                                                           shared_entry=0)
        with lora_pass(active):
            result = sample_with_images(
                self.model, request, lambda ids: self.vision.forward_kwargs([pixels] * ids.shape[0], ids),
                eos_token_ids=self.eos_token_ids,
                decode=lambda toks: self.tokenizer.decode(toks, skip_special_tokens=False),
                max_context=self.max_context, default_max_tokens=self.config.default_max_tokens,
                on_rows=active.set_rows if active is not None else None)
        return Outcome(result)


def _loss_inputs(datum, device) -> dict[str, torch.Tensor]:
    # a copy: arrays decoded from a request body are read-only, and torch wants to own what it wraps
    return {k: torch.from_numpy(np.array(v)).to(device) for k, v in datum.loss_inputs.items() if k != "target_tokens"}
