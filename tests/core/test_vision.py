"""twinkle-tiny-vl in-process: the image-token count the ingress computes is the processor's; a LoRA
adapter on the VL model's language layers (and, with train_vision, its vision tower) is a PEFT folder
peft loads as it is; images of a shared pass train only their own request's vision-tower adapter."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from twinkle.backends.base import ForwardRequest
from twinkle.errors import InvalidInputError
from twinkle.types import AdamParams, Datum, ImagePart, LoraConfig
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


def image_datum(backend, colour: tuple[int, int, int], seed: int = 0) -> Datum:
    """A datum [text, image, text] with targets on every position, so the image's features matter."""
    facts = backend.info()["vision"]
    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (64, 64), colour).save(buf, "PNG")
    pending = Datum(input_tokens=np.array([10, 11, 12, 13]),
                    images=[ImagePart(position=1, tokens=0, data=buf.getvalue(), format="png", chunk=1)])
    [datum] = resolve_images([pending], facts, ImageLimits(), model="twinkle-tiny-vl")
    targets = np.random.default_rng(seed).integers(20, 200, size=len(datum.input_tokens))
    return datum.model_copy(update={"loss_inputs": {"target_tokens": targets}})


def _perturb(backend, adapter_id: str) -> None:
    with torch.no_grad():  # a non-zero B, so the adapter changes the model
        for _, param in backend.table.parameters(backend.table.get(adapter_id)):
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("train_vision", [False, True])
def test_vl_adapter_is_a_peft_folder_with_peft_logprobs(backend, tmp_path, train_vision):
    """Language layers only by default; with train_vision the vision tower too; peft agrees either way
    on a datum with an image."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    name = f"peft-{train_vision}"
    backend.create_adapter(name, LoraConfig(rank=4, seed=1, train_vision=train_vision))
    _perturb(backend, name)
    backend.save(name, tmp_path / "adapter", with_optimizer=False)
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(backend.model_path),
                                      tmp_path / "adapter")
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if "lora_" in n}
    on_vision = {n for n in adapted if ".visual." in n}
    assert bool(on_vision) == train_vision
    if train_vision:  # every linear layer of the tower, and nothing but linear layers
        assert len(on_vision) == len(backend.vision_layers), sorted(on_vision)
    datum = image_datum(backend, (200, 40, 40))
    ours = backend.forward_backward([ForwardRequest("r", name, [datum], backward=False)])["r"].unwrap()
    ours = ours.loss_outputs[0]["logprobs"]
    extra = backend.vision.forward_kwargs([backend.vision.encode(datum.images, "d")],
                                          torch.from_numpy(np.array(datum.input_tokens))[None])
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(np.array(datum.input_tokens))[None], **extra).logits[0]
    targets = torch.from_numpy(np.array(datum.loss_inputs["target_tokens"]))
    theirs = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    reloaded = f"{name}-reloaded"
    backend.load_adapter(reloaded, tmp_path / "adapter")
    assert backend.describe(reloaded)["lora"].train_vision == train_vision


def _vision_grads(backend, adapter_id: str) -> dict[str, np.ndarray]:
    adapter = backend.table.get(adapter_id)
    return {name: g.numpy().copy() for name, g in zip(backend.table.param_names(adapter),
                                                       backend.table.gradients(adapter)) if ".visual." in name}


def test_images_of_a_shared_pass_train_only_their_own_vision_adapter(backend):
    """Three requests in one call: two vision adapters with images, one with text only. Each adapter's
    vision-tower gradients are exactly those of its request run alone; the text request's are zero."""
    lora = LoraConfig(rank=4, seed=2, train_vision=True)
    red, blue = image_datum(backend, (220, 30, 30), seed=1), image_datum(backend, (30, 30, 220), seed=2)
    text = Datum(input_tokens=np.array([10, 11, 12]), loss_inputs={"target_tokens": np.array([11, 12, 13])})
    alone = {}
    for adapter_id, datum in (("red", red), ("blue", blue)):
        backend.create_adapter(f"{adapter_id}-alone", lora)
        backend.forward_backward([ForwardRequest("r", f"{adapter_id}-alone", [datum])])["r"].unwrap()
        alone[adapter_id] = _vision_grads(backend, f"{adapter_id}-alone")
        assert any(np.abs(g).sum() > 0 for g in alone[adapter_id].values())
    for adapter_id in ("red", "blue", "text"):
        backend.create_adapter(adapter_id, lora)
    passes = backend.passes
    out = backend.forward_backward([ForwardRequest("a", "red", [red]), ForwardRequest("b", "text", [text]),
                                    ForwardRequest("c", "blue", [blue])])
    assert all(o.error is None for o in out.values())
    assert backend.passes - passes == 2  # the images need different vision adapters: two passes
    for adapter_id in ("red", "blue"):
        got = _vision_grads(backend, adapter_id)
        assert got.keys() == alone[adapter_id].keys()
        for name in got:
            np.testing.assert_allclose(got[name], alone[adapter_id][name], atol=1e-6, err_msg=name)
    assert all(np.abs(g).sum() == 0 for g in _vision_grads(backend, "text").values())


def test_images_under_language_only_adapters_share_one_pass(backend):
    """Adapters that leave the tower frozen keep sharing a pass, images or not."""
    for adapter_id in ("lang-a", "lang-b"):
        backend.create_adapter(adapter_id, LoraConfig(rank=4, seed=3))
    passes = backend.passes
    out = backend.forward_backward([ForwardRequest("a", "lang-a", [image_datum(backend, (10, 200, 10))]),
                                    ForwardRequest("b", "lang-b", [image_datum(backend, (10, 10, 200))])])
    assert all(o.error is None for o in out.values()) and backend.passes - passes == 1


def test_train_vision_on_a_text_only_model_is_refused(tmp_path):
    from twinkle.backends.adapters import AdapterTable
    from twinkle.backends.multi_lora import LoraBank

    table = AdapterTable(LoraBank({"q_proj": (8, 8)}, max_slots=2, max_rank=8), {"q_proj": "attn"},
                         model_path=str(tmp_path), base_model="twinkle-tiny")
    with pytest.raises(InvalidInputError, match="no vision tower.*train_vision=false") as caught:
        table.create("a", LoraConfig(rank=4, train_vision=True), AdamParams(), None)
    assert caught.value.field == "lora_config.train_vision"
