"""TextCodec: sampled tokens to the text an OpenAI-style API shows (end tokens, stop strings, pieces)."""

from __future__ import annotations

import pytest

from twinkle.textcodec import TextCodec


@pytest.fixture(scope="module")
def codec(tiny_path) -> TextCodec:
    return TextCodec.load(tiny_path)


def test_end_tokens_are_the_samplers(codec):
    end = codec.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in codec.end_token_ids()
    assert "<|im_end|>" in codec.stop_texts()


def test_pieces_add_up_to_the_text_and_never_split_a_character(codec):
    tokens = codec.encode("héllo wörld 日本 end")
    out = codec.render(tokens)
    assert out.text == "héllo wörld 日本 end" and not out.stop_hit
    assert "".join(out.pieces) == out.text and len(out.pieces) == len(tokens)
    assert all("\ufffd" not in piece for piece in out.pieces)  # a split character waits for its last byte


def test_pieces_of_a_long_mixed_text_decode_it_exactly(codec):
    text = " ".join(["naïve café 🙂 Straße 東京 — ok."] * 40)
    tokens = codec.encode(text)
    out = codec.render(tokens)
    assert out.text == codec.tokenizer.decode(tokens, skip_special_tokens=True) == text
    assert len(out.pieces) == len(tokens)


def test_end_token_ends_the_text_and_counts_as_a_stop(codec):
    end = codec.end_token_ids()[0]
    tokens = codec.encode("yes") + [end] + codec.encode(" more")
    out = codec.render(tokens)
    assert out.text == "yes" and out.stop_hit and len(out.pieces) == len(codec.encode("yes"))


def test_text_is_cut_before_the_first_stop_string(codec):
    tokens = codec.encode("purple elephants dance all night")
    out = codec.render(tokens, stop=["night", "dance"])
    assert out.text == "purple elephants " and out.stop_hit
    assert "".join(out.pieces) == out.text
    assert len(out.pieces) < len(tokens)  # tokens after the stop string are not part of the answer
    assert codec.render(tokens, stop=["zzz"]).text == "purple elephants dance all night"


def test_stop_token_ids_end_the_text_like_end_tokens(codec):
    tokens = codec.encode("one two three")
    out = codec.render(tokens, stop_token_ids=[tokens[1]])
    assert out.text == codec.tokenizer.decode(tokens[:1]) and out.stop_hit


def test_chat_prompt_opens_the_assistant_turn(codec):
    prompt = codec.chat_prompt([{"role": "user", "content": "hi"}])
    assert codec.tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
