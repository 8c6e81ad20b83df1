"""twinkle-tiny-vl in-process: the image-token count the ingress computes is the processor's, and
a LoRA adapter trained on the VL model's language layers is a PEFT folder peft loads as it is."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from twinkle.backends.base import ForwardRequest
from twinkle.errors import InvalidInputError
from twinkle.types import Datum, ImagePart, LoraConfig
from twinkle.vision import ImageLimits, image_token_count, resolve_images


def png(size: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from twinkle.backends.transformers import TransformersBackend

    return TransformersBackend("twinkle-tiny-vl", state_dir=str(tmp_path_factory.mktemp("state")))


def test_token_count_matches_the_image_processor(backend):
    from PIL import Image

    facts = backend.info()["vision"]
    for size in [(64, 64), (48, 64), (200, 30), (31, 17), (1000, 700), (128, 128)]:
        grid = backend.vision.processor(images=[Image.new("RGB", size)], return_tensors="np")["image_grid_thw"][0]
        assert image_token_count(*size, facts) == int(np.prod(grid)) // facts["merge_size"] ** 2, size


def test_placeholders_are_filled_counted_and_only_from_images(backend):
    facts = backend.info()["vision"]
    pending = Datum(input_tokens=np.array([10, 11, 12]), images=[ImagePart(position=1, tokens=0, data=png((64, 64)),
                                                                            format="png", chunk=1)])
    [datum] = resolve_images([pending], facts, ImageLimits(), model="twinkle-tiny-vl")
    assert datum.input_tokens.tolist() == [10] + [facts["image_token_id"]] * 4 + [11, 12]
    assert datum.images[0].tokens == 4
    stray = Datum(input_tokens=np.array([10, facts["image_token_id"]]))
    with pytest.raises(InvalidInputError, match="image placeholder"):
        resolve_images([stray], facts, ImageLimits(), model="twinkle-tiny-vl")
    with pytest.raises(InvalidInputError, match="text-only"):
        resolve_images([pending], None, ImageLimits(), model="twinkle-tiny")


def test_vl_adapter_is_a_peft_folder_on_the_language_layers(backend, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    backend.create_adapter("a", LoraConfig(rank=4, seed=1))
    with torch.no_grad():  # a non-zero B, so the adapter changes the model
        for _, param in backend.table.parameters(backend.table.get("a")):
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    backend.save("a", tmp_path / "adapter", with_optimizer=False)
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(backend.model_path),
                                      tmp_path / "adapter")
    assert not any("visual" in name and "lora_" in name for name, _ in model.named_parameters())
    tokens = np.array([10, 11, 12, 13])
    targets = np.array([11, 12, 13, 14])
    ours = backend.forward_backward([ForwardRequest("r", "a", [Datum(input_tokens=tokens, loss_inputs={
        "target_tokens": targets})], backward=False)])["r"].unwrap().loss_outputs[0]["logprobs"]
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens)[None]).logits[0]
    theirs = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(targets)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
