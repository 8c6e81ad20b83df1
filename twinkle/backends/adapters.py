"""The resident adapters of a base model: their slots in the LoRA bank, optimizers and checkpoints.

Each adapter owns one slot of the `LoraBank`. Its optimizer is a plain `torch.optim.AdamW` over
views of that slot at the adapter's own rank, so Adam state, weight decay and gradient clipping
touch only the tenant's own weights. Checkpoints are standard PEFT folders (`adapter_config.json`
+ `adapter_model.safetensors`) with Twinkle's trainer state and AdamW state beside them.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from twinkle import checkpoint as ckpt
from twinkle.backends.multi_lora import LoraBank, PassEntry
from twinkle.errors import ConflictError, InvalidInputError, NotFoundError
from twinkle.lora import lora_from_peft, peft_config, peft_targets, peft_weight_name, targets_for
from twinkle.types import AdamParams, CheckpointInfo, LoraConfig, LRSchedule, StepResult, TrainState
from twinkle.vision import vision_refusal


@dataclass
class Adapter:
    """One resident adapter: where its weights are and everything that belongs to it besides them."""

    slot: int
    lora: LoraConfig
    layers: tuple[str, ...]  # adapted layer paths, sorted
    scale: float
    optimizer: torch.optim.AdamW
    adam: AdamParams
    schedule: LRSchedule | None
    state: TrainState = field(default_factory=TrainState)
    metadata: dict = field(default_factory=dict)  # the API layer's settings, kept in checkpoints
    has_grads: bool = False
    layout_version: int = -1  # the bank layout its optimizer's parameter views point into

    def entry(self, trainable: bool = False) -> PassEntry:
        return PassEntry(self.slot, self.lora.rank, self.scale, frozenset(self.layers), trainable)


class AdapterTable:
    """Adapters by id on one bank; thread-safe for a training lane and a sampling lane side by side."""

    def __init__(self, bank: LoraBank, layer_kinds: dict[str, str], *, model_path: str, base_model: str,
                 module_paths: frozenset[str] | None = None) -> None:
        self.bank = bank
        self.layer_kinds = layer_kinds  # adaptable layer path -> kind, in the model's module order
        # every module path of the base model (as peft sees it), so saved targets select exactly our layers
        self.module_paths = module_paths if module_paths is not None else frozenset(layer_kinds)
        self.leaf_kinds = {path.rsplit(".", 1)[-1]: kind for path, kind in layer_kinds.items()}
        self.model_path = model_path
        self.base_model = base_model
        self.adapters: dict[str, Adapter] = {}
        self.lock = threading.RLock()

    # ---------------------------------------------------------- lifecycle
    def get(self, adapter_id: str) -> Adapter:
        try:
            return self.adapters[adapter_id]
        except KeyError:
            raise NotFoundError(f"no adapter {adapter_id!r} on {self.base_model}", field="model_id") from None

    def create(self, adapter_id: str, lora: LoraConfig, adam: AdamParams, schedule: LRSchedule | None,
               *, initialise: bool = True) -> Adapter:
        with self.lock:
            if adapter_id in self.adapters:
                raise ConflictError(f"adapter {adapter_id!r} already exists", field="model_id")
            if lora.rank > self.bank.max_rank:
                raise InvalidInputError(f"rank {lora.rank} exceeds this model's maximum LoRA rank "
                                        f"{self.bank.max_rank}", field="lora_config.rank")
            if self.bank.slots_in_use >= self.bank.max_slots - 1:
                raise InvalidInputError(f"this model already holds {self.bank.max_slots - 1} adapters",
                                        field="model_id")
            if lora.train_vision and "vision" not in self.layer_kinds.values():
                raise InvalidInputError(vision_refusal(self.base_model), field="lora_config.train_vision")
            try:
                layers = tuple(targets_for(self.layer_kinds, lora))
            except ValueError as exc:
                raise InvalidInputError(str(exc), field="lora_config") from None
            slot = self.bank.allocate(lora.rank)
            with self.bank.lock:
                params = [torch.nn.Parameter(view) for _, view in self._views(slot, lora.rank, layers)]
                optimizer = torch.optim.AdamW(params, lr=adam.learning_rate, betas=(adam.beta1, adam.beta2),
                                              eps=adam.eps, weight_decay=adam.weight_decay)
                adapter = Adapter(slot, lora, layers, lora.alpha / lora.rank, optimizer, adam, schedule,
                                  TrainState(learning_rate=adam.learning_rate), layout_version=self.bank.layout_version)
            self.adapters[adapter_id] = adapter
            if initialise:
                self._initialise(adapter)
            return adapter

    def _initialise(self, adapter: Adapter) -> None:
        """Draw the adapter's starting weights exactly as peft's default LoRA init does for the same
        seed (B = 0, so the model starts unchanged): walking the model's layers in order, each
        adapted layer's `nn.Linear(in, r)` and `nn.Linear(r, out)` initialise themselves, then A is
        drawn again with kaiming_uniform(a=sqrt(5)). A seed gives the same adapter here as in peft."""
        generator = torch.Generator().manual_seed(int(adapter.lora.seed or 0))
        rank = adapter.lora.rank

        def kaiming(shape: tuple[int, int]) -> torch.Tensor:
            return torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)

        with self.bank.lock:
            for layer in self.layer_kinds:  # the model's module order, as peft walks it
                if layer not in adapter.layers:
                    continue
                fan_in, fan_out = self.bank.shapes[layer]
                kaiming((rank, fan_in))  # nn.Linear(in, r) initialising itself
                kaiming((fan_out, rank))  # nn.Linear(r, out)
                a, _ = self.bank.weight_views(adapter.slot, rank, layer)
                a.copy_(kaiming((rank, fan_in)))

    def remove(self, adapter_id: str) -> None:
        with self.lock:
            adapter = self.get(adapter_id)
            del self.adapters[adapter_id]
            self.bank.release(adapter.slot)

    # --------------------------------------------------------- parameters
    def _views(self, slot: int, rank: int, layers: tuple[str, ...]) -> list[tuple[str, torch.Tensor]]:
        views = []
        for layer in layers:
            a, b = self.bank.weight_views(slot, rank, layer)
            views += [(peft_weight_name(layer, "lora_A"), a), (peft_weight_name(layer, "lora_B"), b)]
        return sorted(views, key=lambda item: item[0])

    def parameters(self, adapter: Adapter) -> list[tuple[str, torch.nn.Parameter]]:
        """(PEFT name, parameter viewing the bank) of every weight of the adapter, sorted by name.

        The optimizer holds these views; after the bank re-lays out they are rebuilt and the
        optimizer's state moves over to them."""
        with self.bank.lock:
            group = adapter.optimizer.param_groups[0]
            if adapter.layout_version != self.bank.layout_version:
                fresh = [torch.nn.Parameter(view) for _, view in self._views(adapter.slot, adapter.lora.rank,
                                                                              adapter.layers)]
                state = adapter.optimizer.state
                for old, new in zip(group["params"], fresh):
                    if old in state:
                        state[new] = state.pop(old)
                group["params"] = fresh
                adapter.layout_version = self.bank.layout_version
            return list(zip(self.param_names(adapter), group["params"]))

    @staticmethod
    def param_names(adapter: Adapter) -> list[str]:
        return sorted(peft_weight_name(layer, m) for layer in adapter.layers for m in ("lora_A", "lora_B"))

    def gradients(self, adapter: Adapter) -> list[torch.Tensor]:
        """The adapter's accumulated gradients, in parameter order (views of the bank's buffers)."""
        grads = {}
        for layer in adapter.layers:
            ga, gb = self.bank.grad_views(adapter.slot, adapter.lora.rank, layer)
            grads[peft_weight_name(layer, "lora_A")], grads[peft_weight_name(layer, "lora_B")] = ga, gb
        return [grads[name] for name in self.param_names(adapter)]

    def weights(self, adapter_id: str) -> dict[str, np.ndarray]:
        """A copy of the adapter's weights by PEFT name."""
        with self.bank.lock:
            return {name: p.detach().cpu().numpy().copy() for name, p in self.parameters(self.get(adapter_id))}

    # ----------------------------------------------------------- training
    def step(self, adapter_id: str, adam: AdamParams | None) -> StepResult:
        """AdamW (scaled by the LR schedule) on the accumulated gradients, then clear them."""
        with self.lock, self.bank.lock:
            adapter = self.get(adapter_id)
            adam = adam or adapter.adam
            factor = adapter.schedule.factor(adapter.state.step) if adapter.schedule else 1.0
            lr = adam.learning_rate * factor
            params = [p for _, p in self.parameters(adapter)]
            grad_norm = 0.0
            if adapter.has_grads:
                grads = self.gradients(adapter)
                for p, g in zip(params, grads):
                    p.grad = g
                grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
                if adam.grad_clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, adam.grad_clip_norm)
            for group in adapter.optimizer.param_groups:
                group.update(lr=lr, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay)
            adapter.optimizer.step()
            adapter.optimizer.zero_grad(set_to_none=True)
            self.bank.zero_grads(adapter.slot)
            adapter.has_grads = False
            adapter.state.step += 1
            adapter.state.learning_rate = lr
            return StepResult(metrics={"grad_norm": grad_norm, "learning_rate": lr,
                                       "step": float(adapter.state.step)})

    # -------------------------------------------------------- checkpoints
    def save(self, adapter_id: str, path: str | Path, *, with_optimizer: bool, overwrite: bool, kind: str,
             include_gradients: bool, metadata: dict | None) -> CheckpointInfo:
        from safetensors.torch import save_file

        path = Path(path)
        with self.lock, self.bank.lock:
            adapter = self.get(adapter_id)
            params = self.parameters(adapter)
            weights = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params}
            optimizer = adapter.optimizer.state_dict() if with_optimizer else None
            grads = {name: g.detach().to("cpu", copy=True) for (name, _), g in zip(params, self.gradients(adapter))} \
                if include_gradients and adapter.has_grads else None
            trainer_state = {
                "lora": adapter.lora.model_dump(),
                "adam": adapter.adam.model_dump(),
                "schedule": adapter.schedule.model_dump() if adapter.schedule else None,
                "train_state": adapter.state.model_dump(),
                "has_optimizer": with_optimizer,
                "base_model": self.base_model,
                "metadata": {**adapter.metadata, **(metadata or {})},
            }
            step = adapter.state.step
        with ckpt.atomic_folder(path, overwrite=overwrite) as tmp:
            peft_config(self.leaf_kinds, adapter.lora, self.model_path,
                        targets=peft_targets(adapter.layers, self.module_paths)).save_pretrained(str(tmp))
            save_file(weights, str(tmp / ckpt.ADAPTER_WEIGHTS), metadata={"format": "pt"})
            ckpt.write_json(tmp / ckpt.TRAINER_STATE, trainer_state)
            if optimizer is not None:
                torch.save({"param_names": [n for n, _ in params], "optimizer": _to_cpu(optimizer)},
                           tmp / ckpt.OPTIMIZER_STATE)
            if grads is not None:
                torch.save(grads, tmp / ckpt.GRADIENTS)
        return CheckpointInfo(path=str(path), name=path.name, kind=kind, has_optimizer=with_optimizer, step=step)

    def load(self, adapter_id: str, path: str | Path, *, with_optimizer: bool, create: bool) -> TrainState:
        """Load a PEFT folder (saved by Twinkle or by peft) into `adapter_id`."""
        from safetensors.torch import load_file

        folder = ckpt.require_adapter_folder(path)
        lora, saved = self._read_config(folder)
        if with_optimizer and not (folder / ckpt.OPTIMIZER_STATE).exists():
            raise InvalidInputError(f"checkpoint {folder.name!r} has no optimizer state; load it without the "
                                    "optimizer or save it with the optimizer", field="path")
        weights = _peft_weights(load_file(str(folder / ckpt.ADAPTER_WEIGHTS)))
        saved_opt = torch.load(folder / ckpt.OPTIMIZER_STATE, weights_only=True) if with_optimizer else None
        grads = torch.load(folder / ckpt.GRADIENTS, weights_only=True) \
            if with_optimizer and (folder / ckpt.GRADIENTS).exists() else None
        with self.lock:
            created = False
            if adapter_id in self.adapters:
                existing = self.adapters[adapter_id].lora
                if (existing.rank, existing.train_attn, existing.train_mlp, existing.train_unembed,
                        existing.train_vision) != \
                        (lora.rank, lora.train_attn, lora.train_mlp, lora.train_unembed, lora.train_vision):
                    raise InvalidInputError(f"checkpoint has LoRA rank {lora.rank} and targets different from this "
                                            f"model's (rank {existing.rank}); create a new model from it instead",
                                            field="path")
            elif create:
                adam = AdamParams(**saved["adam"]) if saved.get("adam") else AdamParams()
                schedule = LRSchedule(**saved["schedule"]) if saved.get("schedule") else None
                self.create(adapter_id, lora, adam, schedule, initialise=False)
                created = True
            else:
                self.get(adapter_id)
            try:
                return self._restore(self.adapters[adapter_id], folder, saved, weights, saved_opt, grads)
            except BaseException:
                if created:
                    self.remove(adapter_id)
                raise

    def _read_config(self, folder: Path) -> tuple[LoraConfig, dict]:
        from peft import LoraConfig as PeftLoraConfig

        peft_cfg = PeftLoraConfig.from_pretrained(str(folder))
        unsupported = [name for name, on in (("use_dora", peft_cfg.use_dora), ("rank_pattern", peft_cfg.rank_pattern),
                                             ("alpha_pattern", peft_cfg.alpha_pattern),
                                             ("modules_to_save", peft_cfg.modules_to_save)) if on]
        if unsupported or peft_cfg.bias != "none":
            raise InvalidInputError(f"adapter {folder.name!r} uses {unsupported or ['bias']}, which Twinkle does not "
                                    "train; use a plain LoRA adapter", field="path")
        saved = ckpt.read_json(folder / ckpt.TRAINER_STATE) if (folder / ckpt.TRAINER_STATE).exists() else {}
        lora = LoraConfig(**saved["lora"]) if saved.get("lora") else lora_from_peft(peft_cfg, self.layer_kinds)
        if lora.rank > self.bank.max_rank:
            raise InvalidInputError(f"adapter rank {lora.rank} exceeds this model's maximum LoRA rank "
                                    f"{self.bank.max_rank}", field="path")
        return lora, saved

    def _restore(self, adapter: Adapter, folder: Path, saved: dict, weights: dict[str, torch.Tensor],
                 saved_opt: dict | None, grads: dict | None) -> TrainState:
        params = self.parameters(adapter)
        names = {name for name, _ in params}
        unexpected = sorted(set(weights) - names)
        if unexpected:
            raise InvalidInputError(f"checkpoint weights do not fit this base model or adapter (e.g. {unexpected[0]})",
                                    field="path")
        missing = sorted(names - set(weights))
        if missing:
            raise InvalidInputError(f"checkpoint {folder.name!r} lacks weights the adapter needs (e.g. {missing[0]})",
                                    field="path")
        for name, p in params:
            if tuple(weights[name].shape) != tuple(p.shape):
                raise InvalidInputError(f"{name} has shape {tuple(weights[name].shape)} in the checkpoint, "
                                        f"expected {tuple(p.shape)}", field="path")
        if saved_opt is not None and saved_opt["param_names"] != [n for n, _ in params]:
            raise InvalidInputError("optimizer state does not match this adapter's parameters", field="path")
        with self.bank.lock:
            for name, p in params:
                p.data.copy_(weights[name])
            self.bank.zero_grads(adapter.slot)
            adapter.has_grads = False
            adapter.metadata = dict(saved.get("metadata") or {})
            if saved_opt is not None:
                adapter.optimizer.load_state_dict(saved_opt["optimizer"])
                if saved.get("train_state"):
                    adapter.state = TrainState(**saved["train_state"])
                if grads:
                    for (name, _), g in zip(params, self.gradients(adapter)):
                        if name in grads:
                            g.copy_(grads[name])
                    adapter.has_grads = True
            else:
                adapter.optimizer.state.clear()
        return adapter.state.model_copy()


def _peft_weights(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT weight names as Twinkle uses them (tolerating a saved adapter name such as `.default`)."""
    out = {}
    for name, tensor in raw.items():
        for matrix in ("lora_A", "lora_B"):
            name = name.replace(f".{matrix}.default.weight", f".{matrix}.weight")
        if not name.startswith("base_model.model."):
            name = "base_model.model." + name
        out[name] = tensor.float()
    return out


def _to_cpu(state_dict: dict) -> dict:
    return {"state": {k: {n: (v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in s.items()}
                      for k, s in state_dict["state"].items()},
            "param_groups": state_dict["param_groups"]}
