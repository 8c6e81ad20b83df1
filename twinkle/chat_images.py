"""Image parts of chat messages, turned into image placeholder runs for a vision-language model.

A message's content may be a list of parts, as transformers chat templates take them:
`{"type": "image", "image": <PIL.Image | bytes | path>}` and `{"type": "text", "text": "..."}`.
The chat template renders each image part as one image token; the model sees as many image tokens
as its image processor makes of that image, so each one is widened into a run of that length and
the image's bytes ride along as an `ImagePart` (what the server decodes and checks again). The count
comes from the model's own image processor, as tinker-cookbook's vision renderers count it, so the
targets and weights of a datum line up with the sequence the model sees.

No torch here (thin clients use it): Pillow, and the tokenizer and image processor the caller passes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twinkle.types import ImagePart

IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpeg"}  # sent as they are; other formats are re-encoded as PNG
QWEN_IMAGE_TOKEN = "<|image_pad|>"  # the Qwen-VL family's image placeholder


def load_image_processor(folder: str, name: str | None = None):
    """The image processor of a vision-language model's folder (or Hub id); a text-only model is refused
    by name, since it takes no images."""
    from twinkle.errors import InvalidInputError
    from twinkle.vision import vision_facts

    if vision_facts(folder) is None:
        raise InvalidInputError(f"{name or folder} is a text-only model: it has no image processor and takes "
                                "no images (get_capabilities lists which models take images)", field="base_model")
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and (part.get("type") == "image" or "image" in part)


def images_in(messages: Sequence[dict]) -> list[Any]:
    """The images of the messages' image parts, in the order the chat template renders them."""
    found = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if is_image_part(part):
                    image = part.get("image", part.get("path"))
                    if image is None:
                        raise ValueError(f"messages[{i}].content[{j}]: an image part needs the image under "
                                         "'image' (a PIL image, the file's bytes or a local path)")
                    found.append(image)
    return found


def template_messages(messages: Sequence[dict]) -> list[dict]:
    """Copies the chat template can render: each image part becomes `{"type": "image"}` (templates
    need only its place; the pixels travel beside the tokens)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "image"} if is_image_part(part) else part for part in content]
        out.append({**message, "content": content})
    return out


def image_token_id(tokenizer, override: int | None = None) -> int:
    """The model's image placeholder id: `override`, the tokenizer's `image_token_id`, or the Qwen-VL
    family's `<|image_pad|>`."""
    if override is not None:
        return int(override)
    known = getattr(tokenizer, "image_token_id", None)
    if isinstance(known, int):
        return known
    token = getattr(tokenizer, "image_token", None) or QWEN_IMAGE_TOKEN
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or found == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(f"this tokenizer has no image token {token!r}; pass image_token_id= (the model "
                         "config's image_token_id)")
    return int(found)


def encode_image(image: Any, where: str):
    """(bytes, "png" | "jpeg", RGB PIL image) of a PIL image, an image file's bytes, or a local path."""
    from PIL import Image

    data = None
    if isinstance(image, Image.Image):
        picture = image
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise ValueError(f"{where}: no image file at {str(path)!r} (URLs are not fetched; pass the bytes)")
        data = path.read_bytes()
    else:
        raise ValueError(f"{where}: an image must be a PIL image, the file's bytes or a local path, "
                         f"not {type(image).__name__}")
    if data is not None:
        try:
            picture = Image.open(io.BytesIO(data))
            picture.load()
        except Exception as exc:
            raise ValueError(f"{where}: not an image Pillow can read ({type(exc).__name__}: {exc})"[:300]) from None
        fmt = IMAGE_FORMATS.get(picture.format or "")
        if fmt is not None:
            return data, fmt, picture.convert("RGB")
    rgb = picture.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    return buf.getvalue(), "png", rgb


def count_image_tokens(image_processor, picture) -> int:
    """Tokens a Qwen-VL-family image processor makes of `picture`: its patch grid over merge_size^2."""
    grid = image_processor(images=[picture], return_tensors="np")["image_grid_thw"][0]
    merge = int(getattr(image_processor, "merge_size", 1) or 1)
    cells = 1
    for side in grid:
        cells *= int(side)
    return cells // (merge * merge)


def widen_image_tokens(ids: Sequence[int], weights: Sequence[float], images: Sequence[Any], image_processor,
                       token_id: int) -> tuple[list[int], list[float], list[ImagePart]]:
    """Each image token of `ids` (one per image, as the template placed them) widened into the run
    its image takes, weighted 0; the images as `ImagePart`s at their runs."""
    slots = [i for i, t in enumerate(ids) if int(t) == token_id]
    if len(slots) != len(images):
        raise ValueError(f"the chat template placed {len(slots)} image tokens for {len(images)} images; "
                         "images go in image parts only, never as the image token in text")
    if images and image_processor is None:
        raise ValueError("the messages hold images: pass image_processor= (model.get_image_processor()) so "
                         "each image gets as many placeholder tokens as the model gives it")
    tokens: list[int] = []
    out_weights: list[float] = []
    parts: list[ImagePart] = []
    cursor = 0
    for k, (slot, image) in enumerate(zip(slots, images)):
        tokens.extend(int(t) for t in ids[cursor:slot])
        out_weights.extend(weights[cursor:slot])
        data, fmt, picture = encode_image(image, f"image {k}")
        count = count_image_tokens(image_processor, picture)
        parts.append(ImagePart(position=len(tokens), tokens=count, data=data, format=fmt))
        tokens.extend([token_id] * count)
        out_weights.extend([0.0] * count)
        cursor = slot + 1
    tokens.extend(int(t) for t in ids[cursor:])
    out_weights.extend(weights[cursor:])
    return tokens, out_weights, parts
