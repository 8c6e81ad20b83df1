"""Images through Twinkle's own API on the embedded vision-language model `twinkle-tiny-vl`.

Chat messages with image parts become datums and prompts (`twinkle.chat`), sent by the Twinkle
client. One server of this module's own: it opens a Ray-client port, so the recipe runs in all
three modes (in-process, HTTP, Ray client) against real models; the shared server has none.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.server import images
from tests.server.conftest import start_twinkle_server
from tests.server.images import png_bomb
from twinkle import AdamParams, LoraConfig, SamplingParams, TrainingModel
from twinkle.chat import build_prompt, supervised_datum
from twinkle.client.backend import RemoteBackend
from twinkle.client.transports import HttpTransport
from twinkle.devserver import free_port
from twinkle.errors import InvalidInputError
from twinkle.types import Datum

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "cookbook" / "client" / "twinkle" / "self_host" / "multi_modal.py"
KEY = "dana-key"
TINKER_KEY = "tml-alice-vl-key"  # the stock Tinker SDK wants the tml- prefix
SMALL_PIXELS = 2_000_000  # this server's max_image_pixels, well under the default 16 Mpx
NUMBER = r"(-?[0-9.]+(?:e-?\d+)?)"
RED = (220, 30, 30)


def png(rgb=RED, size=(128, 128)) -> bytes:
    return images.png(rgb, size)


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory):
    port = free_port()
    handle = start_twinkle_server(tmp_path_factory.mktemp("vl-twinkle"), keys={"dana": KEY, "alice": TINKER_KEY},
                                  extra_config={
        "ray": {"client_server_port": port}, "limits": {"max_image_pixels": SMALL_PIXELS},
        "models": [{"name": "twinkle-tiny-vl", "preload": False}, {"name": "twinkle-tiny", "preload": False}]})
    handle.ray_address = f"ray://127.0.0.1:{port}"
    yield handle
    handle.stop()


@pytest.fixture
def backend(vl_server):
    remote = RemoteBackend(HttpTransport(vl_server.url, KEY))
    yield remote
    remote.close()


def _recipe(*flags: str, env_extra: dict | None = None) -> tuple[list[str], list[str]]:
    """Run the multi_modal recipe; (its `step N loss X` lines, its accuracy lines)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    done = subprocess.run([sys.executable, str(RECIPE), *flags], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    return ([line for line in lines if re.match(rf"^step \d+ loss {NUMBER}$", line)],
            [line for line in lines if line.startswith(("accuracy ", "final: "))])


def _losses(lines: list[str]) -> list[float]:
    return [float(line.rsplit(" ", 1)[1]) for line in lines]


def test_recipe_learns_the_colours_with_the_same_losses_in_three_modes(vl_server, tmp_path):
    """The Twinkle recipe, unchanged, in-process, over HTTP and through Ray client: the same losses
    (float32 rounding apart: processes differ in thread counts) and the same answers; each run names
    every unseen shade right after training, and none before."""
    local = _recipe("--out", str(tmp_path / "local"), env_extra={"TWINKLE_STATE_DIR": str(tmp_path / "state")})
    over_http = _recipe("--base-url", vl_server.url, "--api-key", KEY, "--out", str(tmp_path / "http"))
    over_ray = _recipe("--ray-address", vl_server.ray_address, "--api-key", KEY, "--out", str(tmp_path / "ray"))
    for steps, accuracy in (local, over_http, over_ray):
        assert len(steps) == 32
        losses = _losses(steps)
        assert losses[-1] < 0.2 * losses[0], losses
        before, after = map(float, re.match(rf"^final: accuracy {NUMBER} -> {NUMBER}$", accuracy[-1]).groups())
        assert before <= 1 / 3 and after >= 5 / 6, accuracy  # chance is 1/3
    np.testing.assert_allclose(_losses(over_http[0]), _losses(local[0]), rtol=1e-6)
    np.testing.assert_allclose(_losses(over_ray[0]), _losses(local[0]), rtol=1e-6)
    assert local[1] == over_http[1] == over_ray[1]
    assert (tmp_path / "http" / "loss.png").is_file()


def test_image_prompt_samples_with_logprobs_compute_logprobs_agrees(backend):
    model = TrainingModel("twinkle-tiny-vl", LoraConfig(rank=4, seed=1), backend=backend)
    tokenizer, processor = model.get_tokenizer(), model.get_image_processor()
    messages = [{"role": "user", "content": [{"type": "image", "image": png()}, {"type": "text", "text": "Colour?"}]}]
    prompt = build_prompt(tokenizer, messages, image_processor=processor)
    assert prompt.images[0].tokens == 16  # 128 x 128 pixels, 32 x 32 per token
    sampler = model.sampler()
    seq = sampler.sample(prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=7)).result().sequences[0]
    scored = sampler.compute_logprobs(prompt.extended(seq.tokens)).result()
    np.testing.assert_allclose(scored[-len(seq.tokens):], seq.logprobs, atol=2e-4)


def test_bad_images_through_twinkle_api_are_refused_by_name(backend):
    model = TrainingModel("twinkle-tiny-vl", LoraConfig(rank=4, seed=1), backend=backend)
    tokenizer, processor = model.get_tokenizer(), model.get_image_processor()
    question = [{"type": "text", "text": "What colour is this?"}, {"type": "image", "image": png()}]
    good = supervised_datum(tokenizer, [{"role": "user", "content": question}, {"role": "assistant", "content": "red"}],
                            image_processor=processor)
    before = model.forward([good]).result().metrics["loss:sum"]
    image = good.images[0]

    def with_image(**changes) -> Datum:
        return good.model_copy(update={"images": [image.model_copy(update=changes)]})

    def refused(datum: Datum, *words: str, field: str = "data[1].images[0]", error=InvalidInputError) -> str:
        with pytest.raises(error) as exc:
            model.forward_backward([good, datum]).result()
        assert 400 <= exc.value.status_code < 500 and exc.value.field == field, (exc.value.field, str(exc.value))
        for word in words:
            assert word in exc.value.message, exc.value.message
        return exc.value.message

    refused(with_image(data=b"this is not an image"), "not a decodable png")
    refused(with_image(data=png_bomb(60000, 60000)), "pixels", "limit")  # refused from the header, never decoded
    refused(with_image(data=png_bomb(0, 10)), "0 x 10", "positive")
    refused(with_image(format="jpeg"), "PNG image, not jpeg")
    refused(with_image(data=png(size=(64, 64))), "tokens is 16", "makes 4 tokens", "tokens=4")
    refused(with_image(tokens=0), "token count is 0", "image_processor")
    refused(good.model_copy(update={"images": []}), "image placeholder", field="data[1]")
    many = good.model_copy(update={"images": [image] * 65})
    refused(many, "66 images exceed", "limit of 64", field="data")  # 1 + 65 in the request
    refused(with_image(data=png(size=(5000, 5000))), "5000 x 5000", "limit")  # a real image, over the pixel limit
    with pytest.raises(InvalidInputError) as exc:  # a sample prompt's image is checked the same way
        model.sampler().sample(good.input_tokens.tolist(), images=[image.model_copy(update={"data": b"junk"})]).result()
    assert exc.value.field == "prompt.images[0]" and "not a decodable png" in exc.value.message

    # an image to a text-only model
    text_model = TrainingModel("twinkle-tiny", LoraConfig(rank=4, seed=1), backend=backend)
    with pytest.raises(InvalidInputError) as exc:
        text_model.forward([good]).result()
    assert "text-only" in exc.value.message and exc.value.field == "data[0]"
    with pytest.raises(InvalidInputError, match="text-only"):
        text_model.get_image_processor()

    # nothing changed: the adapter computes what it did before the refusals
    assert model.forward([good]).result().metrics["loss:sum"] == pytest.approx(before, rel=1e-6)


def test_the_servers_smaller_pixel_limit_refuses_through_both_apis(backend, vl_server, sdk_sessions):
    """A real 1500 x 1500 image (2.25 Mpx: the default limit takes it) is refused with this server's
    limit, through Twinkle's API and the Tinker protocol alike."""
    import tinker
    from tinker import types

    big = png(size=(1500, 1500))
    model = TrainingModel("twinkle-tiny-vl", LoraConfig(rank=4, seed=1), backend=backend)
    tokenizer, processor = model.get_tokenizer(), model.get_image_processor()
    messages = [{"role": "user", "content": [{"type": "image", "image": big}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": "red"}]
    datum = supervised_datum(tokenizer, messages, image_processor=processor)
    with pytest.raises(InvalidInputError) as exc:
        model.forward([datum]).result()
    assert exc.value.status_code == 400 and exc.value.field == "data[0].images[0]", exc.value
    assert "1500 x 1500" in exc.value.message and f"limit of {SMALL_PIXELS}" in exc.value.message, exc.value.message
    assert np.isfinite(model.forward([supervised_datum(  # the same request with a small image still runs
        tokenizer, [{**messages[0], "content": [{"type": "image", "image": png()}, messages[0]["content"][1]]},
                    messages[1]], image_processor=processor)]).result().metrics["loss:sum"])

    service = sdk_sessions(vl_server.url, TINKER_KEY)
    training = service.create_lora_training_client(base_model="twinkle-tiny-vl", rank=4, seed=1).result()
    chunks = [types.EncodedTextChunk(tokens=[10, 11]), types.ImageChunk(data=big, format="png", expected_tokens=4),
              types.EncodedTextChunk(tokens=[12])]
    n = types.ModelInput(chunks=chunks).length
    with pytest.raises(tinker.BadRequestError) as refused:
        training.forward([types.Datum(model_input=types.ModelInput(chunks=chunks),
                                      loss_fn_inputs={"target_tokens": [1] * n})], "cross_entropy").result()
    assert "1500 x 1500" in str(refused.value) and f"limit of {SMALL_PIXELS}" in str(refused.value), refused.value


def test_a_vision_tower_lora_trains_through_twinkle_api(backend, vl_server):
    """train_vision=True adapts the vision tower too: it trains on images, and a text-only model refuses it."""
    model = TrainingModel("twinkle-tiny-vl", LoraConfig(rank=4, seed=1, train_vision=True), backend=backend)
    tokenizer, processor = model.get_tokenizer(), model.get_image_processor()
    datum = supervised_datum(tokenizer, [
        {"role": "user", "content": [{"type": "image", "image": png()}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"}], image_processor=processor)
    first = model.forward_backward([datum]).result().metrics["loss:sum"]
    model.step(AdamParams(learning_rate=1e-2)).result()
    assert model.forward([datum]).result().metrics["loss:sum"] < first
    model.save("vision-tower", with_optimizer=False).result()
    [config] = [json.loads(p.read_text()) for p in Path(vl_server.state_dir).rglob("vision-tower/adapter_config.json")]
    assert {"qkv", "linear_fc1"} <= set(config["target_modules"]), config["target_modules"]  # the tower's layers
    with pytest.raises(InvalidInputError) as exc:
        TrainingModel("twinkle-tiny", LoraConfig(rank=4, train_vision=True), backend=backend)
    assert exc.value.field == "lora.train_vision" and "no vision tower" in exc.value.message, exc.value
