"""Images for vision-language models: bomb-safe inspection, the image-token count, model facts.

No torch and no transformers here (Pillow, numpy and JSON only), so the HTTP ingress can refuse a
bad image with a 400 before anything is queued, and the workers run the same checks in local mode.

An image enters a sequence as a run of placeholder tokens (the model's image token id), as many
as the model's image processor makes of it: Qwen-VL processors resize to multiples of
`patch_size * merge_size` pixels within a pixel budget (`smart_resize`), and each merged
`merge_size x merge_size` block of patches is one token. `image_token_count` computes that from the
image's declared width and height; the worker re-checks it against the processor's real output.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twinkle.errors import InvalidInputError, PayloadTooLargeError
from twinkle.types import Datum, ImagePart

FORMATS = {"png": "PNG", "jpeg": "JPEG"}
PENDING = -1  # placeholder id of an image run whose model is not known yet (the ingress fills it in)
MAX_ASPECT_RATIO = 200  # what Qwen-VL image processors accept


@dataclass(frozen=True)
class ImageLimits:
    """What one image (and one request) may hold; see `LimitsConfig`."""

    max_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 16 * 1024 * 1024
    max_images: int = 64

    @classmethod
    def of(cls, limits) -> "ImageLimits":
        """From a `LimitsConfig` (or anything with its three image fields)."""
        return cls(limits.max_image_bytes, limits.max_image_pixels, limits.max_images_per_request)


def _open(data: bytes, fmt: str, limits: ImageLimits, field: str):
    from PIL import Image, UnidentifiedImageError

    if fmt not in FORMATS:
        raise InvalidInputError(f"image format {fmt!r} is not supported; send png or jpeg", field=field)
    try:
        return Image.open(io.BytesIO(data), formats=[FORMATS[fmt]])  # reads the header only
    except Image.DecompressionBombError:  # Pillow's own guard, far above ours: refused unread either way
        raise InvalidInputError(f"image declares more pixels than this server's limit of {limits.max_pixels}; "
                                "downscale it before sending", field=field) from None
    except UnidentifiedImageError:
        pass
    declared = _png_header_size(data) if fmt == "png" else None
    if declared is not None and 0 in declared:
        raise InvalidInputError(f"image declares {declared[0]} x {declared[1]} pixels; both must be positive",
                                field=field)
    try:
        actual = Image.open(io.BytesIO(data)).format
    except Exception:
        actual = None
    if actual:
        raise InvalidInputError(f"the bytes are a {actual} image, not {fmt}: send format "
                                f"{actual.lower()!r} or re-encode the image as {fmt}", field=field)
    raise InvalidInputError(f"the bytes are not a decodable {fmt} image (corrupt or another kind of file)",
                            field=field)


def _png_header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk (what Pillow refuses to open when one is 0)."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def image_size(data: bytes, fmt: str, limits: ImageLimits, field: str) -> tuple[int, int]:
    """(width, height) as the image's header declares them, refusing what must not be decoded."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise InvalidInputError("image data is empty; send the png or jpeg file's bytes", field=field)
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(f"image is {len(data)} bytes; this server takes at most {limits.max_bytes} "
                                   "bytes per image (downscale or recompress it)", field=field)
    with _open(bytes(data), fmt, limits, field) as image:
        width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"image declares {width} x {height} pixels; both must be positive", field=field)
    if width * height > limits.max_pixels:
        raise InvalidInputError(f"image declares {width} x {height} = {width * height} pixels, more than this "
                                f"server's limit of {limits.max_pixels}; downscale it before sending", field=field)
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InvalidInputError(f"image is {width} x {height}: the aspect ratio must stay below "
                                f"{MAX_ASPECT_RATIO}; crop or pad it", field=field)
    return width, height


def decode_image(data: bytes, fmt: str, limits: ImageLimits, field: str):
    """The image as RGB pixels (a PIL image), after `image_size` has accepted its header."""
    from PIL import Image

    width, height = image_size(data, fmt, limits, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open(bytes(data), fmt, limits, field) as image:
                if image.size != (width, height):
                    raise InvalidInputError("image dimensions changed while decoding", field=field)
                return image.convert("RGB")
    except InvalidInputError:
        raise
    except Exception as exc:  # truncated data, bad chunks, a bomb warning: the image's own fault
        raise InvalidInputError(f"the {fmt} image could not be decoded: {exc}"[:300], field=field) from None


# ------------------------------------------------------------ model facts
def vision_refusal(model: str) -> str:
    """Why a LoRA with train_vision cannot be created on a text-only model, and what to do instead."""
    return (f"{model} has no vision tower to adapt; train_vision needs a vision-language model "
            "(e.g. twinkle-tiny-vl), or set train_vision=false")


def vision_facts(model_path: str) -> dict | None:
    """What the ingress needs to place image tokens for a model; None for a text-only model.

    Read from the model folder's `config.json` and `preprocessor_config.json` (a Hub id is looked
    up in the local Hugging Face cache)."""
    config = _read_json(model_path, "config.json")
    if not config or "vision_config" not in config or "image_token_id" not in config:
        return None
    processor = _read_json(model_path, "preprocessor_config.json") or {}
    vision = config["vision_config"]
    size = processor.get("size") or {}
    patch = int(processor.get("patch_size") or vision.get("patch_size", 14))
    merge = int(processor.get("merge_size") or vision.get("spatial_merge_size", 2))
    return {
        "image_token_id": int(config["image_token_id"]),
        "vision_start_token_id": config.get("vision_start_token_id"),
        "vision_end_token_id": config.get("vision_end_token_id"),
        "patch_size": patch,
        "merge_size": merge,
        "min_pixels": int(size.get("shortest_edge") or processor.get("min_pixels") or 56 * 56),
        "max_pixels": int(size.get("longest_edge") or processor.get("max_pixels") or 28 * 28 * 1280),
        "image_formats": sorted(FORMATS),
    }


def _read_json(model_path: str, name: str) -> dict | None:
    folder = Path(model_path)
    path = folder / name if folder.is_dir() else None
    if path is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_path, name)
        except Exception:
            cached = None
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def image_token_count(width: int, height: int, facts: dict) -> int:
    """Tokens the model's image processor makes of a width x height image (Qwen-VL `smart_resize`)."""
    factor = facts["patch_size"] * facts["merge_size"]
    min_pixels, max_pixels = facts["min_pixels"], facts["max_pixels"]
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return (h_bar // factor) * (w_bar // factor)


# ------------------------------------------------------- sequences with images
def resolve_images(data: Sequence[Datum], facts: dict | None, limits: ImageLimits, *, model: str,
                   where: str = "data", datum_field: str | None = "model_input") -> list[Datum]:
    """Datums whose image runs hold the model's image token, each image checked and counted.

    An image sent with `tokens == 0` (its count unknown to the client) gets the processor's count
    and the sequence grows by it; an image with a count that disagrees is refused (400). Text that
    holds the image token itself is refused: only images may produce it. Errors name
    `<where>[i].<datum_field>` (Tinker: `data[i].model_input`; Twinkle's API: `data[i]`)."""
    total = sum(len(d.images) for d in data)
    if total > limits.max_images:
        raise InvalidInputError(f"{total} images exceed this server's limit of {limits.max_images} per request",
                                field=where)
    out = []
    for i, datum in enumerate(data):
        field = (f"{where}[{i}].{datum_field}" if datum_field else f"{where}[{i}]") if where == "data" else where
        out.append(_resolve(datum, facts, limits, model, field))
    return out


def _resolve(datum: Datum, facts: dict | None, limits: ImageLimits, model: str, field: str) -> Datum:
    tokens = np.asarray(datum.input_tokens)
    if not datum.images:
        if facts is not None and tokens.size and np.any(tokens == facts["image_token_id"]):
            raise InvalidInputError(f"token id {facts['image_token_id']} is {model}'s image placeholder and only "
                                    "an image chunk may produce it; send the image as an image chunk",
                                    field=field)
        return datum
    if facts is None:
        raise InvalidInputError(f"{_chunk_label(datum.images[0], 0)}: {model} is a text-only model and takes no "
                                "images; send images to a vision-language model (get_capabilities lists which "
                                "take images)", field=field)
    pieces, images, cursor, shift = [], [], 0, 0
    image_id = facts["image_token_id"]
    for k, image in enumerate(datum.images):
        label = f"{field}.{_chunk_label(image, k)}"
        width, height = image_size(image.data, image.format, limits, label)
        count = image_token_count(width, height, facts)
        if image.tokens and image.tokens != count:
            name = "expected_tokens" if image.chunk is not None else "tokens"  # the Tinker chunk's or ImagePart's
            raise InvalidInputError(f"{name} is {image.tokens} but {model}'s image processor makes "
                                    f"{count} tokens of this {width} x {height} image; send "
                                    f"{name}={count} (count it with the model's image processor)",
                                    field=label)
        pieces.append(tokens[cursor: image.position])
        pieces.append(np.full(count, image_id, dtype=np.int64))
        cursor = image.position + image.tokens
        images.append(image.model_copy(update={"position": image.position + shift, "tokens": count}))
        shift += count - image.tokens
    pieces.append(tokens[cursor:])
    full = np.concatenate(pieces).astype(np.int64)
    text_only = np.ones(full.size, dtype=bool)
    for image in images:
        text_only[image.position: image.position + image.tokens] = False
    if np.any(full[text_only] == image_id):
        raise InvalidInputError(f"token id {image_id} is {model}'s image placeholder and only an image chunk may "
                                "produce it; send the image as an image chunk", field=field)
    return datum.model_copy(update={"input_tokens": full, "images": images})


def _chunk_label(image: ImagePart, index: int) -> str:
    """How errors name an image: its Tinker chunk, else its place in the datum's `images`."""
    if image.chunk is not None:
        return f"chunks[{image.chunk}] (image)"
    return f"images[{index}]"
