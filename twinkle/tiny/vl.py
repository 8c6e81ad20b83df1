"""`twinkle-tiny-vl`: a tiny Qwen3-VL vision-language model, built offline and deterministically.

Same recipe as `twinkle-tiny` (byte-level BPE trained on the shipped corpus, weights from a fixed
seed), plus the Qwen-VL special tokens, a two-block vision tower and the real Qwen2-VL image
processor (the PIL backend, so torchvision is not needed) configured for small images: 32 x 32
pixels per image token, 1 to 16 tokens per image. The result is an ordinary Hugging Face folder
(`config.json`, weights, tokenizer with its chat template, `preprocessor_config.json`) that loads with
`AutoModelForImageTextToText`, `AutoTokenizer` and `AutoImageProcessor`. No `processor_config.json`:
transformers' Qwen3-VL processor insists on a video processor, which needs torchvision; Twinkle
expands image placeholders itself (twinkle/vision.py) with the image processor's own token count.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 32 * 32  # one image token
MAX_PIXELS = 128 * 128  # sixteen image tokens

# ChatML with Qwen-VL image parts: content is a string or a list of {"type": "image"|"text", ...}.
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower of a generated VL model (its language model is a `BuiltinModelSpec`)."""

    depth: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_position_embeddings: int = 256  # a 16 x 16 grid of learned positions, interpolated


def build_vl_model(name: str, spec, out_dir: str | os.PathLike, vision: VisionSpec = VisionSpec()) -> Path:
    """Write a Qwen3-VL model (config, weights, tokenizer, image processor) into `out_dir`."""
    import torch
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from twinkle.tiny.build import EOS_TOKEN, _train_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(spec.vocab_size, extra_special_tokens=VISION_TOKENS)
    tokenizer.chat_template = VL_CHAT_TEMPLATE
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    padded_vocab = ((len(tokenizer) + 63) // 64) * 64
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    half = spec.head_dim // 2
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=padded_vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
            max_position_embeddings=spec.max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids[0], bos_token_id=None, dtype="float32",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [half // 2, half // 4, half - half // 2 - half // 4],
                             "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=vision.depth, hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
            num_heads=vision.num_heads, out_hidden_size=spec.hidden_size, patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
            num_position_embeddings=vision.num_position_embeddings, deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, dtype="float32",
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
                                               do_sample=True)
    model.save_pretrained(out, safe_serialization=True)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE,
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "twinkle_builtin.json").write_text(json.dumps(
        {"name": name, "spec": asdict(spec), "vision": asdict(vision)}, indent=2))
    return out
