"""Chat messages with image parts (twinkle.chat): image runs as long as the model's image processor
makes them, weights only on the reply, the same datum from a PIL image, bytes or a path, and
clear errors for what cannot work."""

from __future__ import annotations

import io

import numpy as np
import pytest

from twinkle.chat import Prompt, build_prompt, supervised_datum
from twinkle.chat_images import load_image_processor

QUESTION = "What colour is this?"


def png(size=(128, 128), rgb=(220, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vl(state_dir):
    from twinkle.modeling import load_tokenizer, resolve_model_path

    path = resolve_model_path("twinkle-tiny-vl", state_dir)
    return load_tokenizer(path), load_image_processor(path)


def conversation(image, answer: str | None = "red") -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image", "image": image}]}]
    return messages + ([{"role": "assistant", "content": answer}] if answer else [])


def test_image_run_has_the_processor_count_and_no_weight(vl):
    tokenizer, processor = vl
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for size, count in [((128, 128), 16), ((64, 64), 4), ((64, 128), 8), ((20, 20), 1)]:
        datum = supervised_datum(tokenizer, conversation(png(size)), image_processor=processor)
        [image] = datum.images
        assert image.tokens == count and image.format == "png", size
        tokens, weights = datum.input_tokens, datum.loss_inputs["weights"]
        run = slice(image.position, image.position + image.tokens)
        assert (tokens[run] == image_id).all() and (tokens == image_id).sum() == count
        # weights only on the reply: "red<|im_end|>\n" as the targets of the last three positions
        assert weights.tolist() == [0.0] * (len(tokens) - 3) + [1.0] * 3
        assert tokenizer.decode(datum.loss_inputs["target_tokens"][-3:].tolist()) == "red<|im_end|>\n"
        assert len(datum.loss_inputs["target_tokens"]) == len(tokens)


def test_prompt_is_the_datum_up_to_the_reply(vl):
    tokenizer, processor = vl
    datum = supervised_datum(tokenizer, conversation(png()), image_processor=processor)
    prompt = build_prompt(tokenizer, conversation(png(), answer=None), image_processor=processor)
    assert isinstance(prompt, Prompt) and isinstance(prompt, list)
    assert list(prompt) == datum.input_tokens[: len(prompt)].tolist()
    def runs(images):
        return [(i.position, i.tokens, i.data) for i in images]

    assert runs(prompt.images) == runs(datum.images)
    longer = prompt.extended([5, 6])
    assert list(longer) == [*prompt, 5, 6] and longer.images == prompt.images
    text_only = build_prompt(tokenizer, [{"role": "user", "content": QUESTION}])
    assert text_only.images == [] and all(isinstance(t, int) for t in text_only)


def test_pil_image_bytes_and_path_give_the_same_datum(vl, tmp_path):
    from PIL import Image

    tokenizer, processor = vl
    data = png((96, 64))
    (tmp_path / "red.png").write_bytes(data)
    from_bytes = supervised_datum(tokenizer, conversation(data), image_processor=processor)
    from_path = supervised_datum(tokenizer, conversation(str(tmp_path / "red.png")), image_processor=processor)
    from_pil = supervised_datum(tokenizer, conversation(Image.open(io.BytesIO(data))), image_processor=processor)
    assert from_bytes.images[0].data == from_path.images[0].data == data  # png and jpeg files travel as they are
    for other in (from_path, from_pil):
        np.testing.assert_array_equal(other.input_tokens, from_bytes.input_tokens)
        assert other.images[0].tokens == from_bytes.images[0].tokens
    assert Image.open(io.BytesIO(from_pil.images[0].data)).size == (96, 64)
    gif = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 0, 200)).save(gif, "GIF")  # another format: re-encoded as png
    [image] = supervised_datum(tokenizer, conversation(gif.getvalue()), image_processor=processor).images
    assert image.format == "png" and Image.open(io.BytesIO(image.data)).format == "PNG"


def test_what_cannot_work_is_refused_with_what_to_do(vl):
    tokenizer, processor = vl
    with pytest.raises(ValueError, match="pass image_processor="):
        supervised_datum(tokenizer, conversation(png()))
    with pytest.raises(ValueError, match="image 0: not an image Pillow can read"):
        supervised_datum(tokenizer, conversation(b"not an image"), image_processor=processor)
    with pytest.raises(ValueError, match="no image file at"):
        supervised_datum(tokenizer, conversation("/nonexistent/red.png"), image_processor=processor)
    with pytest.raises(ValueError, match=r"content\[0\]: an image part needs the image"):
        build_prompt(tokenizer, [{"role": "user", "content": [{"type": "image"}]}], image_processor=processor)
    typed = [{"type": "text", "text": "<|image_pad|>"}, {"type": "image", "image": png()}]
    smuggled = [{"role": "user", "content": typed}]
    with pytest.raises(ValueError, match="placed 2 image tokens for 1 images"):
        build_prompt(tokenizer, smuggled, image_processor=processor)


def test_a_text_only_model_has_no_image_processor(tiny_path):
    from twinkle.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="twinkle-tiny is a text-only model"):
        load_image_processor(tiny_path, "twinkle-tiny")
