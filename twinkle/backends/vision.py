"""What the transformers backend adds for a vision-language model: pixels in, LoRA on the language half.

The model's own image processor turns each image into patches (`pixel_values`) and a grid
(`image_grid_thw`); the model's forward merges the vision tower's features into the placeholder
positions of `input_ids`. Each image is checked against the token count its datum declared, so a
count that the ingress computed differently from the processor fails that request alone (400).

LoRA: the batched multi-LoRA layers carry over to the language model unchanged (its rows are the
batch's rows, one adapter per row). The vision tower sees patches of all images of a batch
concatenated into one sequence, so a per-row adapter is undefined there: an adapter created with
`train_vision` also adapts every linear layer of the tower, and the backend runs a pass's images
under one adapter only (`vision_groups`), so an image's gradients reach only its own request.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from twinkle.errors import InvalidInputError
from twinkle.types import ImagePart
from twinkle.vision import ImageLimits, decode_image, vision_facts

VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model")


def language_layers(layer_kinds: dict[str, str]) -> dict[str, str]:
    """The adaptable layers outside the vision tower (see the module docstring)."""
    return {path: kind for path, kind in layer_kinds.items()
            if not any(part in VISION_TOWER_NAMES for part in path.split("."))}


def vision_layers(model: torch.nn.Module) -> dict[str, str]:
    """Every linear layer inside the vision tower (patch blocks and mergers): path -> 'vision'."""
    return {path: "vision" for path, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and any(part in VISION_TOWER_NAMES for part in path.split("."))}


def vision_groups(keys: Sequence[int | None], has_images: Sequence[bool]) -> list[list[int]]:
    """Split a pass's requests so each part's images run the vision tower under one adapter.

    `keys[i]`: the entry whose vision-tower adapter request i's images need (None: the bare tower).
    Requests with images and different keys go to different parts; text-only requests join the
    first part. Returns the parts as lists of request indices, in order."""
    parts: dict[int | None, list[int]] = {}
    text = []
    for i, (key, images) in enumerate(zip(keys, has_images)):
        (parts.setdefault(key, []) if images else text).append(i)
    groups = list(parts.values()) or [[]]
    groups[0] = sorted(groups[0] + text)
    return [g for g in groups if g]


class VisionInputs:
    """The image processor of a vision-language model and the forward arguments it produces."""

    def __init__(self, model_path: str, device: torch.device, limits: ImageLimits | None = None) -> None:
        from transformers import AutoImageProcessor

        facts = vision_facts(model_path)
        if facts is None:
            raise ValueError(f"{model_path} is not a vision-language model")
        self.facts = facts
        self.image_token_id = int(facts["image_token_id"])
        self.processor = AutoImageProcessor.from_pretrained(model_path)
        self.merge = int(facts["merge_size"])
        self.device = device
        self.limits = limits or ImageLimits()

    @classmethod
    def maybe(cls, model, model_path: str, device: torch.device,
              limits: ImageLimits | None = None) -> "VisionInputs | None":
        """The model's VisionInputs, checking images against `limits`; None for a text-only model."""
        return cls(model_path, device, limits) if hasattr(model.config, "vision_config") else None

    def encode(self, images: Sequence[ImagePart], field: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels and grids of one sequence's images, each checked against its declared token count."""
        pictures = [decode_image(image.data, image.format, self.limits, f"{field}.images[{k}]")
                    for k, image in enumerate(images)]
        out = self.processor(images=pictures, return_tensors="pt")
        grids = out["image_grid_thw"]
        for k, (image, grid) in enumerate(zip(images, grids)):
            made = int(grid.prod()) // (self.merge * self.merge)
            if made != image.tokens:
                raise InvalidInputError(f"image {k} takes {made} tokens with this model's image processor, but its "
                                        f"placeholder run has {image.tokens}; send expected_tokens={made}",
                                        field=f"{field}.images[{k}]")
        return out["pixel_values"], grids

    def check_placeholders(self, tokens, images: Sequence[ImagePart], field: str) -> None:
        """Every image token of the sequence lies in one of its images' runs, and every run is whole."""
        ids = torch.from_numpy(np.array(tokens, dtype=np.int64))
        inside = torch.zeros(ids.shape[0], dtype=torch.bool)
        for k, image in enumerate(images):
            end = image.position + image.tokens
            if end > ids.shape[0] or not bool((ids[image.position:end] == self.image_token_id).all()):
                raise InvalidInputError(f"image {k}'s {image.tokens} placeholder tokens at position {image.position} "
                                        f"are not all the image token {self.image_token_id}", field=field)
            inside[image.position:end] = True
        if bool(((ids == self.image_token_id) & ~inside).any()):
            raise InvalidInputError(f"token id {self.image_token_id} is the image placeholder and only an image may "
                                    "produce it; send the image as an image chunk", field=field)

    def forward_kwargs(self, encoded: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
                       input_ids: torch.Tensor) -> dict:
        """Extra forward arguments for a batch whose row i has `encoded[i]` images (None: text only)."""
        present = [e for e in encoded if e is not None]
        if not present:
            return {}
        return {"pixel_values": torch.cat([p for p, _ in present]).to(self.device),
                "image_grid_thw": torch.cat([g for _, g in present]).to(self.device),
                "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32)}
