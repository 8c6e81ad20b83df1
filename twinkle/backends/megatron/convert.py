"""Hugging Face Qwen3 / Llama checkpoints into megatron-core's GPTModel, sharded for one TP x PP rank.

Layouts (megatron-core, local layer spec):
- `linear_qkv` (column-parallel) fuses q, k and v per query group: for each KV group its query
  heads, then its key head, then its value head; TP rank t holds a contiguous run of groups.
- `linear_fc1` (column-parallel) is [gate; up] of this rank's shard of the intermediate size.
- `linear_proj` and `linear_fc2` (row-parallel) hold a column slice of o_proj / down_proj.
- Word embeddings and the output layer are vocab-parallel (rows), the vocab padded to a multiple
  of the TP size; logits beyond the real vocab are dropped.
Norms are replicated. With pipeline parallelism each stage holds an even run of decoder layers
(HF layer i sits on stage i // (layers / PP) as local layer i % (layers / PP), megatron's default
layer offsets); the first stage adds the embedding, the last the final norm and output layer.
The base model stays frozen, so nothing is converted back: adapters are
saved in PEFT's per-projection names by the adapter table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from twinkle.backends.megatron.layout import Dims, parallel_problems

SUPPORTED = ("qwen3", "qwen2", "llama", "mistral")


@dataclass(frozen=True)
class HfShape:
    """The facts of a HF decoder config that the mapping needs."""

    model_type: str
    num_layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    eps: float
    rope_theta: float
    max_positions: int
    tied: bool
    qk_norm: bool
    qkv_bias: bool

    @classmethod
    def read(cls, model_path: str | Path) -> "HfShape":
        cfg = json.loads((Path(model_path) / "config.json").read_text())
        kind = cfg.get("model_type", "")
        if kind not in SUPPORTED:
            raise ValueError(f"the megatron backend maps {', '.join(SUPPORTED)} checkpoints; {model_path} is "
                             f"{kind!r}: use backend: transformers for it")
        if cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type", "default") != "default":
            raise ValueError("the megatron backend supports default RoPE only (no rope_scaling); "
                             "use backend: transformers for this model")
        heads = int(cfg["num_attention_heads"])
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
        return cls(model_type=kind, num_layers=int(cfg["num_hidden_layers"]), hidden=int(cfg["hidden_size"]),
                   heads=heads, groups=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                   ffn=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
                   eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                   max_positions=int(cfg.get("max_position_embeddings", 2048)),
                   tied=bool(cfg.get("tie_word_embeddings", False)), qk_norm=kind == "qwen3",
                   qkv_bias=bool(cfg.get("attention_bias", kind == "qwen2")))

    def padded_vocab(self, tp: int) -> int:
        return -(-self.vocab // tp) * tp

    def check_parallel(self, tp: int, pp: int) -> None:
        """Refuse a TP size that does not divide the heads, groups and MLP, or a PP size that does
        not split the decoder layers evenly."""
        problems = parallel_problems(Dims(self.num_layers, self.heads, self.groups, self.ffn), tp, pp)
        if problems:
            raise ValueError("; ".join(problems))

    def stage_layers(self, pp: int, pp_rank: int) -> range:
        """The HF decoder layers pipeline stage `pp_rank` holds (an even split, in order)."""
        per = self.num_layers // pp
        return range(pp_rank * per, (pp_rank + 1) * per)


def transformer_config(shape: HfShape, tp: int, dtype: torch.dtype, on_cpu: bool, pp: int = 1):
    """megatron-core's TransformerConfig for the HF model (fusions off, dropout 0: the same math as HF)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
        num_query_groups=shape.groups, kv_channels=shape.head_dim, ffn_hidden_size=shape.ffn,
        normalization="RMSNorm", layernorm_epsilon=shape.eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=shape.qkv_bias, qk_layernorm=shape.qk_norm,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype if pp > 1 else None,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=on_cpu, perform_initialization=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
    )


def build_gpt_model(shape: HfShape, tp: int, dtype: torch.dtype, on_cpu: bool, pp: int = 1, pp_rank: int = 0):
    """An (uninitialised) GPTModel shaped like the HF model, with the local (non-TE) layer spec; with
    PP > 1 only stage `pp_rank`'s part (megatron places the layers by its pipeline rank)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=shape.qk_norm, normalization="RMSNorm")
    return GPTModel(config=transformer_config(shape, tp, dtype, on_cpu, pp), transformer_layer_spec=spec,
                    vocab_size=shape.padded_vocab(tp), max_sequence_length=shape.max_positions,
                    pre_process=pp_rank == 0, post_process=pp_rank == pp - 1, parallel_output=False,
                    share_embeddings_and_output_weights=shape.tied, position_embedding_type="rope",
                    rotary_base=int(shape.rope_theta) if float(shape.rope_theta).is_integer() else shape.rope_theta)


class HfWeights(Mapping):
    """The checkpoint's tensors by name, each read from its safetensors file when asked for, so a rank
    holds one full tensor at a time (plus its own shards), never the whole model."""

    def __init__(self, model_path: str | Path) -> None:
        from safetensors import safe_open

        files = sorted(Path(model_path).glob("*.safetensors"))
        if not files:
            raise ValueError(f"{model_path} has no .safetensors weights; the megatron backend reads safetensors")
        self._handles = [safe_open(str(file), "pt") for file in files]
        self._where = {name: handle for handle in self._handles for name in handle.keys()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_hf_weights(model_path: str | Path) -> HfWeights:
    """The checkpoint's weights (read lazily; each rank slices what it holds)."""
    return HfWeights(model_path)


def fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: HfShape) -> torch.Tensor:
    """[q_g; k_g; v_g] for every query group g, along dim 0 (works for weights, biases and LoRA B)."""
    per = shape.heads // shape.groups
    d = shape.head_dim
    q = q.reshape(shape.groups, per * d, *q.shape[1:])
    k = k.reshape(shape.groups, d, *k.shape[1:])
    v = v.reshape(shape.groups, d, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def _rows(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return t.chunk(tp, dim=0)[rank].clone()  # a copy: a view would keep the whole tensor alive


def _cols(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return t.chunk(tp, dim=1)[rank].contiguous().clone()


def _pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros((padded - t.shape[0], *t.shape[1:]))])


def megatron_shard(hf: Mapping[str, torch.Tensor], shape: HfShape, tp: int, rank: int, pp: int = 1,
                   pp_rank: int = 0) -> dict[str, torch.Tensor]:
    """This TP x PP rank's GPTModel state dict from the HF weights (only its stage's tensors are read)."""
    out: dict[str, torch.Tensor] = {}
    padded = shape.padded_vocab(tp)
    first, last = pp_rank == 0, pp_rank == pp - 1
    if first:
        out["embedding.word_embeddings.weight"] = _rows(_pad_vocab(hf["model.embed_tokens.weight"], padded), tp, rank)
    layers = shape.stage_layers(pp, pp_rank)
    for i in layers:
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i - layers.start}."
        attn = src + "self_attn."
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        qkv = fused_qkv(hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], shape)
        out[dst + "self_attention.linear_qkv.weight"] = _rows(qkv, tp, rank)
        if shape.qkv_bias:
            bias = fused_qkv(hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"], shape)
            out[dst + "self_attention.linear_qkv.bias"] = _rows(bias, tp, rank)
        if shape.qk_norm:
            out[dst + "self_attention.q_layernorm.weight"] = hf[attn + "q_norm.weight"]
            out[dst + "self_attention.k_layernorm.weight"] = hf[attn + "k_norm.weight"]
        out[dst + "self_attention.linear_proj.weight"] = _cols(hf[attn + "o_proj.weight"], tp, rank)
        out[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
        mlp = src + "mlp."
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([_rows(hf[mlp + "gate_proj.weight"], tp, rank),
                                                        _rows(hf[mlp + "up_proj.weight"], tp, rank)])
        out[dst + "mlp.linear_fc2.weight"] = _cols(hf[mlp + "down_proj.weight"], tp, rank)
    if last:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if not shape.tied:
            out["output_layer.weight"] = _rows(_pad_vocab(hf["lm_head.weight"], padded), tp, rank)
        elif not first:  # tied, on a stage of its own: the output layer holds a copy of the embedding
            out["output_layer.weight"] = _rows(_pad_vocab(hf["model.embed_tokens.weight"], padded), tp, rank)
    return out


def load_into(model: torch.nn.Module, shard: dict[str, torch.Tensor]) -> None:
    """Copy the shard into the model's parameters; every parameter must be covered, shapes equal."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(shard))
    unknown = sorted(set(shard) - set(params))
    if missing or unknown:
        raise ValueError(f"HF -> megatron mapping mismatch: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in shard.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: HF gives {tuple(tensor.shape)}, megatron expects "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(tensor.to(params[name].dtype))
