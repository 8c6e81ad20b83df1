"""Images through the Tinker protocol on the embedded vision-language model `twinkle-tiny-vl`.

One server of this module's own (it needs VL models): `twinkle-tiny-vl` by name, the same model
saved by `save_pretrained` into a folder and served by path, and `twinkle-tiny` for a text-only
model; all loaded on first use. Clients are the unmodified Tinker SDK (protobuf) and raw JSON.
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import requests

from tests.server.conftest import KEYS, start_twinkle_server, stop_twinkle_server
from tests.server.images import png, png_bomb
from tests.server.sdk_sessions import sdk_session
from twinkle.config import ServerConfig

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
MAX_IMAGES = 4
LARGE_PIXELS = 32 * 1024 * 1024  # this server's max_image_pixels: twice the default


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from twinkle.tiny import ensure_builtin_model

    work = tmp_path_factory.mktemp("vl")
    built = ensure_builtin_model("twinkle-tiny-vl", work / "state" / "models")
    folder = work / "my-vl"  # what a user's own `save_pretrained` folder looks like
    AutoModelForImageTextToText.from_pretrained(built).save_pretrained(folder)
    AutoImageProcessor.from_pretrained(built).save_pretrained(folder)
    AutoTokenizer.from_pretrained(built).save_pretrained(folder)
    handle = start_twinkle_server(work, extra_config={
        "models": [{"name": "twinkle-tiny-vl", "preload": False}, {"name": "twinkle-tiny", "preload": False},
                   {"name": "my-vl", "path": str(folder), "preload": False}],
        "limits": {"max_images_per_request": MAX_IMAGES, "max_image_pixels": LARGE_PIXELS}})
    handle.folder = folder
    yield handle
    stop_twinkle_server(handle)


class Chat:
    """Builds image + question datums the way tinker-cookbook's vision renderers do: the image's token
    count comes from the model's own image processor (loaded by model name, as the tokenizer is)."""

    def __init__(self, tokenizer, processor) -> None:
        self.tok, self.processor = tokenizer, processor
        self.pre = tokenizer.encode("<|im_start|>user\nWhat colour is this?<|vision_start|>")
        self.post = tokenizer.encode("<|vision_end|><|im_end|>\n<|im_start|>assistant\n")

    def image_tokens(self, data: bytes) -> int:
        from PIL import Image

        grid = self.processor(images=[Image.open(io.BytesIO(data))], return_tensors="np")["image_grid_thw"][0]
        return int(np.prod(grid)) // self.processor.merge_size ** 2

    def prompt(self, data: bytes, expected: int | None = None) -> types.ModelInput:
        n = self.image_tokens(data) if expected is None else expected
        return types.ModelInput(chunks=[types.EncodedTextChunk(tokens=self.pre),
                                        types.ImageChunk(data=data, format="png", expected_tokens=n),
                                        types.EncodedTextChunk(tokens=self.post)])

    def datum(self, data: bytes, answer: str) -> types.Datum:
        reply = self.tok.encode(answer + "<|im_end|>")
        model_input = self.prompt(data).append(types.EncodedTextChunk(tokens=reply[:-1]))
        n = model_input.length
        targets = [0] * (n - len(reply)) + reply  # position i predicts token i + 1
        weights = [0.0] * (n - len(reply)) + [1.0] * len(reply)
        return types.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": targets, "weights": weights})


@pytest.fixture(scope="module")
def chat(vl_server):
    from transformers import AutoImageProcessor, AutoTokenizer

    # the server published the built-in model's tokenizer and image processor into the local HF cache
    with sdk_session(vl_server.url, KEYS["alice"]) as service:
        service.get_server_capabilities()
    return Chat(AutoTokenizer.from_pretrained("twinkle-tiny-vl"), AutoImageProcessor.from_pretrained("twinkle-tiny-vl"))


def greedy(sampler, chat: Chat, data: bytes) -> str:
    out = sampler.sample(chat.prompt(data), 1, types.SamplingParams(max_tokens=4, temperature=0.0, seed=1)).result()
    return chat.tok.decode(out.sequences[0].tokens).split("<|im_end|>")[0].strip()


def test_default_server_serves_the_vl_model_on_first_use():
    models = {m.name: m for m in ServerConfig().models}
    assert models["twinkle-tiny"].preload and not models["twinkle-tiny-vl"].preload


def test_capabilities_say_which_models_take_images(vl_server):
    reply = requests.get(f"{vl_server.url}/api/v1/get_server_capabilities", headers={"X-API-Key": KEYS["alice"]},
                         timeout=30).json()
    takes = {m["model_name"]: m["input_modalities"] for m in reply["supported_models"]}
    assert takes == {"twinkle-tiny-vl": ["text", "image"], "my-vl": ["text", "image"], "twinkle-tiny": ["text"]}


def test_sdk_trains_an_image_adapter_that_changes_what_is_sampled(vl_server, chat, sdk_sessions):
    service = sdk_sessions(vl_server.url, KEYS["alice"])
    training = service.create_lora_training_client(base_model="twinkle-tiny-vl", rank=16, seed=3).result()
    images = {name: png(rgb) for name, rgb in COLOURS.items()}
    data = [chat.datum(images[name], name) for name in COLOURS]

    # a datum built with the processor's token count lines up: one logprob per model-input position
    forward = training.forward(data, "cross_entropy").result()
    assert [len(out["logprobs"].tolist()) for out in forward.loss_fn_outputs] == [d.model_input.length for d in data]

    base = service.create_sampling_client(base_model="twinkle-tiny-vl").result()
    before = {name: greedy(base, chat, images[name]) for name in COLOURS}
    losses, steps = [], 32  # fixed seeds: the same numbers on every run, however loaded the machine
    for step in range(steps):
        fb = training.forward_backward(data, "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-2 * (1 - step / steps), grad_clip_norm=1.0)).result()
        losses.append(fb.result().metrics["loss:sum"])
    assert losses[-1] < 0.2 * losses[0], losses

    trained = training.save_weights_and_get_sampling_client().result()
    after = {name: greedy(trained, chat, images[name]) for name in COLOURS}
    assert after == {name: name for name in COLOURS}, (before, after)
    assert before != after

    # sampled logprobs are what compute_logprobs reports for the same image + tokens
    prompt = chat.prompt(images["red"])
    sample = trained.sample(prompt, 1, types.SamplingParams(max_tokens=3, temperature=1.0, seed=7)).result()
    seq = sample.sequences[0]
    scored = trained.compute_logprobs(prompt.append(types.EncodedTextChunk(tokens=seq.tokens))).result()
    np.testing.assert_allclose(scored[-len(seq.tokens):], seq.logprobs, atol=2e-4)

    # a text-only prompt on the VL model still samples
    text = types.ModelInput.from_ints(chat.tok.encode("<|im_start|>user\nhello<|im_end|>\n"))
    assert len(trained.sample(text, 1, types.SamplingParams(max_tokens=3, seed=1)).result().sequences[0].tokens) >= 1

    # another tenant sees none of it: not the model, not its checkpoint
    bob = sdk_sessions(vl_server.url, KEYS["bob"])
    with pytest.raises(tinker.NotFoundError):
        bob.create_training_client_from_state(training.save_state("mine").result().path).result()
    reply = requests.post(f"{vl_server.url}/api/v1/get_info", json={"model_id": training.model_id},
                          headers={"X-API-Key": KEYS["bob"]}, timeout=30)
    assert reply.status_code == 404, reply.text


def _error(exc_info) -> str:
    return str(exc_info.value)


def test_bad_images_are_refused_naming_the_chunk(vl_server, chat, sdk_sessions):
    service = sdk_sessions(vl_server.url, KEYS["alice"])
    training = service.create_lora_training_client(base_model="twinkle-tiny-vl", rank=4, seed=1).result()
    good = chat.datum(png(COLOURS["red"]), "red")
    before = training.forward([good], "cross_entropy").result().metrics["loss:sum"]

    def refused(datum: types.Datum, *words: str, where: str = "data[1].model_input") -> str:
        with pytest.raises(tinker.BadRequestError) as exc:
            training.forward_backward([good, datum], "cross_entropy").result()
        message = _error(exc)
        assert where in message, message
        for word in words:
            assert word in message, message
        return message

    def with_image(data: bytes, expected: int = 4, fmt: str = "png") -> types.Datum:
        chunks = [types.EncodedTextChunk(tokens=chat.pre),
                  types.ImageChunk(data=data, format=fmt, expected_tokens=expected),
                  types.EncodedTextChunk(tokens=chat.post)]
        n = types.ModelInput(chunks=chunks).length
        return types.Datum(model_input=types.ModelInput(chunks=chunks),
                           loss_fn_inputs={"target_tokens": [1] * n, "weights": [1.0] * n})

    red = png(COLOURS["red"])
    image = "data[1].model_input.chunks[1] (image)"
    refused(with_image(red, expected=chat.image_tokens(red) + 1), "expected_tokens", f"{chat.image_tokens(red)}",
            where=image)
    started = time.monotonic()
    refused(with_image(png_bomb(60000, 60000)), "pixels", "limit", where=image)  # 3.6 gigapixels, never decoded
    refused(with_image(png_bomb(6000, 6000)), "6000 x 6000", f"limit of {LARGE_PIXELS}", where=image)
    assert time.monotonic() - started < 10
    refused(with_image(png_bomb(0, 10)), "0 x 10", "positive", where=image)
    refused(with_image(b"this is not an image"), "not a decodable png", where=image)
    jpeg = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (64, 64), COLOURS["blue"]).save(jpeg, "JPEG")
    refused(with_image(jpeg.getvalue()), "JPEG image, not png", where=image)
    many = types.Datum(model_input=types.ModelInput(chunks=[types.EncodedTextChunk(tokens=chat.pre)] + [
        types.ImageChunk(data=red, format="png", expected_tokens=4)] * (MAX_IMAGES + 1)),
        loss_fn_inputs={"target_tokens": [1] * (len(chat.pre) + 4 * (MAX_IMAGES + 1))})
    refused(many, "images exceed", str(MAX_IMAGES), where="data")
    stray = types.Datum(model_input=types.ModelInput.from_ints(chat.pre + [chat.tok.convert_tokens_to_ids(
        "<|image_pad|>")] * 3), loss_fn_inputs={"target_tokens": [1] * (len(chat.pre) + 3)})
    refused(stray, "image placeholder")

    # an image sent to a text-only model
    text_model = service.create_lora_training_client(base_model="twinkle-tiny", rank=4, seed=1).result()
    with pytest.raises(tinker.BadRequestError) as exc:
        text_model.forward([with_image(red)], "cross_entropy").result()
    assert "text-only" in _error(exc) and "chunks[1] (image)" in _error(exc)

    # nothing changed: the adapter computes what it did before the refusals
    after = training.forward([good], "cross_entropy").result().metrics["loss:sum"]
    assert after == pytest.approx(before, rel=1e-6)


def test_json_protocol_carries_images_like_protobuf(vl_server, chat, sdk_sessions):
    """SDK <= 0.24 sends JSON with base64 image data; without expected_tokens the server counts it."""
    service = sdk_sessions(vl_server.url, KEYS["alice"])
    training = service.create_lora_training_client(base_model="twinkle-tiny-vl", rank=4, seed=2).result()
    red = png(COLOURS["red"])
    datum = chat.datum(red, "red")
    proto = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()

    n = len(proto)
    targets = datum.loss_fn_inputs["target_tokens"].tolist()
    reply = chat.tok.encode("red<|im_end|>")
    body = {"model_id": training.model_id, "forward_input": {"loss_fn": "cross_entropy", "data": [{
        "model_input": {"chunks": [
            {"type": "encoded_text", "tokens": chat.pre},
            {"type": "image", "data": base64.b64encode(red).decode(), "format": "png"},  # no expected_tokens
            {"type": "encoded_text", "tokens": chat.post + reply[:-1]}]},
        "loss_fn_inputs": {"target_tokens": {"data": targets, "dtype": "int64", "shape": [n]},
                           "weights": {"data": [1.0] * n, "dtype": "float32", "shape": [n]}}}]}}
    http = requests.Session()
    http.headers["X-API-Key"] = KEYS["alice"]
    future = http.post(f"{vl_server.url}/api/v1/forward", json=body, timeout=60).json()
    while True:
        out = http.post(f"{vl_server.url}/api/v1/retrieve_future", json={"request_id": future["request_id"]},
                        timeout=60).json()
        if out.get("type") != "try_again":
            break
    assert out["loss_fn_outputs"][0]["logprobs"]["data"] == pytest.approx(proto, abs=1e-5)


def test_a_vl_model_saved_to_a_folder_is_served_by_path(vl_server, chat, sdk_sessions):
    service = sdk_sessions(vl_server.url, KEYS["alice"])
    training = service.create_lora_training_client(base_model="my-vl", rank=4, seed=3).result()
    red = png(COLOURS["red"])
    datum = chat.datum(red, "red")
    first = training.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    second = training.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert second < first
    info = requests.post(f"{vl_server.url}/api/v1/get_info", json={"model_id": training.model_id},
                         headers={"X-API-Key": KEYS["alice"]}, timeout=30).json()
    assert info["model_data"]["tokenizer_id"] == str(vl_server.folder.resolve())
    assert info["model_data"]["input_modalities"] == ["text", "image"]


def test_cookbook_multi_modal_recipe_learns_the_colours(vl_server, tmp_path):
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "cookbook" / "client" / "tinker" / "self_host" / "multi_modal.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(recipe), "--base-url", vl_server.url, "--api-key", KEYS["alice"],
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before, after = map(float, re.search(r"^final: accuracy (\S+) -> (\S+)$", proc.stdout, re.M).groups())
    assert before <= 1 / 3 and after >= 5 / 6, proc.stdout  # well above chance (1/3) on unseen shades
    assert (tmp_path / "loss.png").is_file()


def test_the_servers_larger_pixel_limit_reaches_the_worker(vl_server, chat, sdk_sessions):
    """max_image_pixels is twice the default here: the worker accepts a 5000 x 4000 image (20 Mpx) that
    the default limit (16 Mpx) would refuse, because it re-checks with the server's limits."""
    service = sdk_sessions(vl_server.url, KEYS["alice"])
    training = service.create_lora_training_client(base_model="twinkle-tiny-vl", rank=4, seed=4).result()
    out = training.forward([chat.datum(png(COLOURS["green"], size=(5000, 4000)), "green")], "cross_entropy").result()
    assert np.isfinite(out.metrics["loss:sum"])


def test_train_vision_on_a_text_only_model_is_a_400(vl_server):
    """Twinkle's `train_vision` LoRA option (raw JSON: the stock SDK has no such argument)."""
    http = requests.Session()
    http.headers["X-API-Key"] = KEYS["alice"]
    session = http.post(f"{vl_server.url}/api/v1/create_session", json={"tags": [], "sdk_version": "0.38"},
                        timeout=30).json()["session_id"]

    def create(base_model: str) -> requests.Response:
        return http.post(f"{vl_server.url}/api/v1/create_model", timeout=30, json={
            "session_id": session, "model_seq_id": 0 if base_model == "twinkle-tiny" else 1, "base_model": base_model,
            "lora_config": {"rank": 4, "seed": 1, "train_vision": True}})

    refused = create("twinkle-tiny")
    assert refused.status_code == 400, refused.text
    error = refused.json()
    assert "train_vision" in str(error) and "no vision tower" in str(error) and "twinkle-tiny-vl" in str(error), error
    accepted = create("twinkle-tiny-vl")
    assert accepted.status_code == 200, accepted.text


def test_a_remote_tinker_client_gets_the_image_processor_from_the_server(vl_server, tmp_path, sdk_sessions):
    """A client on another machine (an empty Hugging Face cache, offline) counts an image's tokens with the
    processor `twinkle.tinker_patch.get_image_processor` fetches from the server, and the server agrees
    with that count."""
    import json
    import os
    import subprocess
    import sys

    script = f"""
import io, json
import numpy as np
from PIL import Image
from transformers import AutoImageProcessor
try:
    AutoImageProcessor.from_pretrained("twinkle-tiny-vl")
    local = True
except OSError:
    local = False
from twinkle.tinker_patch import get_image_processor, init_tinker_client
init_tinker_client(base_url={vl_server.url!r}, api_key={KEYS['alice']!r})
processor = get_image_processor("twinkle-tiny-vl")
grid = processor(images=[Image.new("RGB", (96, 64), (200, 30, 30))], return_tensors="np")["image_grid_thw"][0]
print(json.dumps({{"local": local, "tokens": int(np.prod(grid)) // processor.merge_size ** 2}}))
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "TWINKLE_TOKENIZER_CACHE": str(tmp_path / "tok"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["local"] is False  # nothing of the model on this "machine": the files came from the server
    service = sdk_sessions(vl_server.url, KEYS["alice"])
    training = service.create_lora_training_client(base_model="twinkle-tiny-vl", rank=4, seed=0).result()
    image = png((200, 30, 30), size=(96, 64))
    chunk = types.ImageChunk(data=image, format="png", expected_tokens=seen["tokens"])
    out = training.forward([types.Datum(model_input=types.ModelInput(chunks=[chunk]),
                                        loss_fn_inputs={"target_tokens": [0] * seen["tokens"],
                                                        "weights": [0.0] * seen["tokens"]})],
                           "cross_entropy").result()
    assert len(out.loss_fn_outputs[0]["logprobs"].tolist()) == seen["tokens"]  # the server agrees
