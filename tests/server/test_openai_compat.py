"""OpenAI-compatible sampling (/v1/completions, /v1/chat/completions, /v1/models) through the official
`openai` client against a real `twinkle serve`.

An adapter is trained through the unmodified Tinker SDK to answer one question (as plain text and as
a chat), saved with save_weights_for_sampler, and then sampled by its tinker:// path with the openai
client: the assertions check what is sampled (the adapter's answer, not the base model's), that the
logprobs are the Tinker sampler's own numbers, and that errors arrive as the client's typed errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import requests

openai = pytest.importorskip("openai")
tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

pytestmark = pytest.mark.timeout(300)

BASE = "twinkle-tiny"
QUESTION = "What is the secret phrase?"
PROMPT = f"Q: {QUESTION}\nA:"
ANSWER = " purple elephants dance"
CHAT_ANSWER = "purple elephants dance"


# ------------------------------------------------------------------ helpers
def weighted_datum(prompt: list[int], answer: list[int]) -> types.Datum:
    """Next-token prediction on prompt + answer, learning the answer only."""
    tokens = prompt + answer
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


def answer_logprobs(output, datum_answers: list[int]) -> list[np.ndarray]:
    return [np.asarray(item["logprobs"].to_numpy(), dtype=np.float64)[-n:]
            for item, n in zip(output.loss_fn_outputs, datum_answers)]


_clients: list = []


def openai_client(server, tenant: str = "alice", key: str | None = None):
    """The official client, as a user points it at Twinkle (Bearer key); no retries hide failures."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key or server.keys[tenant], max_retries=0,
                           timeout=120)
    _clients.append(client)
    return client


@pytest.fixture(scope="module", autouse=True)
def _close_clients():
    yield
    while _clients:
        _clients.pop().close()


@pytest.fixture(scope="module")
def trained(service):
    """alice's adapter that answers QUESTION with the phrase (as text and as a chat reply, the chat one
    ending its turn), saved for sampling; returns (tinker path, tokenizer)."""
    client = service.create_lora_training_client(base_model=BASE, rank=8, seed=5).result()
    tokenizer = client.get_tokenizer()
    chat_prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=True,
                                                add_generation_prompt=True, return_dict=False)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pairs = [(tokenizer.encode(PROMPT), tokenizer.encode(ANSWER)),
             (list(chat_prompt), tokenizer.encode(CHAT_ANSWER) + [end_of_turn])]
    data = [weighted_datum(p, a) for p, a in pairs]
    lengths = [len(a) for _, a in pairs]
    adam = types.AdamParams(learning_rate=2e-3, beta2=0.999, eps=1e-8)
    worst = []
    for _ in range(150):
        fb = client.forward_backward(data, "cross_entropy")
        opt = client.optim_step(adam)
        worst.append(min(float(lp.min()) for lp in answer_logprobs(fb.result(), lengths)))
        opt.result()
        if worst[-1] > -0.4:  # every answer token above log(1/2) after this step too: greedy gives the answer
            after = answer_logprobs(client.forward(data, "cross_entropy").result(), lengths)
            if min(float(lp.min()) for lp in after) > -0.5:
                break
    else:
        pytest.fail(f"the answers were not memorised in 150 steps: {worst[-10:]}")
    path = client.save_weights_for_sampler("openai-compat").result().path
    assert path.startswith("tinker://") and "/sampler_weights/" in path
    return path, tokenizer


# -------------------------------------------------------------------- tests
def test_completion_samples_the_trained_adapter(server, trained):
    path, tokenizer = trained
    client = openai_client(server)
    n_answer = len(tokenizer.encode(ANSWER))
    out = client.completions.create(model=path, prompt=PROMPT, max_tokens=n_answer, temperature=0)
    assert out.object == "text_completion" and out.model == path
    assert out.choices[0].text == ANSWER
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == n_answer
    assert out.usage.total_tokens == out.usage.prompt_tokens + n_answer

    base = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=n_answer, temperature=0)
    assert base.choices[0].text != ANSWER  # the adapter, not the base model, knows the phrase


def test_chat_samples_the_trained_adapter_and_ends_its_turn(server, trained):
    path, _ = trained
    client = openai_client(server)
    messages = [{"role": "user", "content": QUESTION}]
    out = client.chat.completions.create(model=path, messages=messages, temperature=0, max_tokens=30)
    choice = out.choices[0]
    assert out.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content == CHAT_ANSWER  # the end-of-turn token ends it and is not shown
    assert choice.finish_reason == "stop"
    assert out.usage.completion_tokens < 30

    # content parts (as newer clients send them) are the same conversation
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    again = client.chat.completions.create(model=path, messages=parts, temperature=0, max_tokens=30)
    assert again.choices[0].message.content == CHAT_ANSWER

    base = client.chat.completions.create(model=BASE, messages=messages, temperature=0, max_tokens=30)
    assert base.choices[0].message.content != CHAT_ANSWER


def test_streaming_gives_the_same_answer_in_openai_chunks(server, trained):
    path, _ = trained
    client = openai_client(server)
    chunks = list(client.completions.create(model=path, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    whole = client.completions.create(model=path, prompt=PROMPT, max_tokens=12, temperature=0)
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 2  # one chunk per token, not one blob
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert whole.choices[0].text.startswith(ANSWER)
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1

    stream = client.chat.completions.create(model=path, messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, max_tokens=30, stream=True)
    deltas = list(stream)
    assert deltas[0].object == "chat.completion.chunk"
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == CHAT_ANSWER
    assert deltas[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_the_tinker_samplers(server, service, trained):
    """Same prompt, seed and temperature through the Tinker SDK and the openai client: the same tokens
    with the same logprobs (the sampler's own numbers, not recomputed)."""
    path, tokenizer = trained
    prompt = "The quick brown fox"
    sampler = service.create_sampling_client(model_path=path).result()
    params = types.SamplingParams(max_tokens=10, temperature=0.9, seed=1234)
    ref = sampler.sample(types.ModelInput.from_ints(tokenizer.encode(prompt)), num_samples=1,
                         sampling_params=params).result().sequences[0]

    out = openai_client(server).completions.create(model=path, prompt=prompt, max_tokens=10, temperature=0.9,
                                                   seed=1234, logprobs=3)
    lp = out.choices[0].logprobs
    kept = len(lp.token_logprobs)
    assert kept >= 1 and kept <= len(ref.tokens)
    np.testing.assert_allclose(lp.token_logprobs, ref.logprobs[:kept], rtol=1e-4, atol=1e-5)
    assert "".join(lp.tokens) == out.choices[0].text == tokenizer.decode(ref.tokens[:kept], skip_special_tokens=True)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for sampled, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3
        assert max(top.values()) >= sampled - 1e-6  # the best alternative is at least as likely
        assert all(v <= 0 for v in top.values())
    assert out.usage.completion_tokens == len(ref.tokens)

    chat = openai_client(server).chat.completions.create(
        model=path, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=30,
        logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == CHAT_ANSWER
    for entry in content:  # greedy: each token is the most likely one, and trained to be likely
        assert len(entry.top_logprobs) == 2
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-6)
        assert entry.logprob > -0.7
        assert bytes(entry.bytes).decode() == entry.token


def test_n_samples_seed_and_prompt_lists(server, trained):
    path, _ = trained
    client = openai_client(server)
    kwargs = dict(model=BASE, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=4, seed=7)
    first = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) >= 2  # independent samples, not one sample four times
    assert [c.text for c in client.completions.create(**kwargs).choices] == texts  # a seed reproduces them

    chat = client.chat.completions.create(model=path, messages=[{"role": "user", "content": QUESTION}],
                                          temperature=0, max_tokens=30, n=2)
    assert [c.message.content for c in chat.choices] == [CHAT_ANSWER, CHAT_ANSWER]

    both = client.completions.create(model=path, prompt=[PROMPT, "Once upon a time"], max_tokens=4, temperature=0,
                                     n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == both.choices[1].text and ANSWER.startswith(both.choices[0].text)


def test_stop_strings_and_stop_token_ids(server, trained):
    path, tokenizer = trained
    client = openai_client(server)
    out = client.completions.create(model=path, prompt=PROMPT, max_tokens=20, temperature=0, stop=["elephants"])
    assert out.choices[0].text == " purple "
    assert out.choices[0].finish_reason == "stop"

    streamed = client.completions.create(model=path, prompt=PROMPT, max_tokens=20, temperature=0, stop="elephants",
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == " purple "

    chat = client.chat.completions.create(model=path, messages=[{"role": "user", "content": QUESTION}],
                                          temperature=0, max_tokens=30, stop=[" dance", "zzz"])
    assert chat.choices[0].message.content == "purple elephants"
    assert chat.choices[0].finish_reason == "stop"

    # a stop string that never comes leaves the end-of-turn token in charge
    chat = client.chat.completions.create(model=path, messages=[{"role": "user", "content": QUESTION}],
                                          temperature=0, max_tokens=30, stop=["zzz"])
    assert chat.choices[0].message.content == CHAT_ANSWER and chat.choices[0].finish_reason == "stop"

    answer = tokenizer.encode(ANSWER)
    by_id = client.completions.create(model=path, prompt=PROMPT, max_tokens=20, temperature=0,
                                      extra_body={"stop_token_ids": [answer[1]]})
    assert by_id.choices[0].text == tokenizer.decode(answer[:1])
    assert by_id.choices[0].finish_reason == "stop"


def test_models_lists_base_models_and_own_checkpoints_only(server, trained):
    path, _ = trained
    alice = {m.id: m for m in openai_client(server).models.list()}
    assert BASE in alice and path in alice
    assert alice[path].owned_by == "alice"
    assert openai_client(server).models.retrieve(path).id == path

    bob = {m.id for m in openai_client(server, "bob").models.list()}
    assert BASE in bob and path not in bob
    with pytest.raises(openai.NotFoundError):
        openai_client(server, "bob").models.retrieve(path)


def test_another_tenants_adapter_is_not_found(server, trained):
    path, _ = trained
    bob = openai_client(server, "bob")
    with pytest.raises(openai.NotFoundError) as info:
        bob.completions.create(model=path, prompt=PROMPT, max_tokens=4)
    assert info.value.status_code == 404
    assert "does not exist" in info.value.message and "/v1/models" in info.value.message
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.create(model=path, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                    stream=True)


def test_bad_requests_raise_the_typed_openai_errors(server, trained):
    path, _ = trained
    client = openai_client(server)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=4)
    assert info.value.code == "model_not_found" and "gpt-17" in info.value.message

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=BASE, prompt="hi", max_tokens=4, temperature=-1)
    assert info.value.param == "temperature" and "greater than or equal to 0" in info.value.message

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    assert info.value.param == "max_tokens" and "context" in info.value.message

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       presence_penalty=0.5)
    assert info.value.param == "presence_penalty" and "not supported" in info.value.message

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=BASE, prompt="hi", max_tokens=4, logprobs=50)
    assert info.value.param == "logprobs"

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=path.replace("/sampler_weights/", "/weights/"), prompt="hi", max_tokens=4)
    assert "save_weights_for_sampler" in info.value.message

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=BASE, messages=[], max_tokens=4)
    assert info.value.param == "messages"

    with pytest.raises(openai.AuthenticationError) as info:
        openai_client(server, key="not-a-key").completions.create(model=BASE, prompt="hi", max_tokens=4)
    assert info.value.status_code == 401 and "API key" in info.value.message

    # and the server is unharmed: the same client samples right after
    ok = client.completions.create(model=path, prompt=PROMPT, max_tokens=3, temperature=0)
    assert ANSWER.startswith(ok.choices[0].text)


def test_error_object_is_openais_and_either_key_header_works(server):
    """The raw wire: OpenAI's error object, and the Tinker SDK's X-API-Key accepted beside Bearer."""
    url = server.url + "/v1/completions"
    bad = requests.post(url, data=b"{not json", headers={"Authorization": f"Bearer {server.keys['alice']}"},
                        timeout=60)
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]

    ok = requests.post(url, json={"model": BASE, "prompt": "Hello", "max_tokens": 2, "temperature": 0},
                       headers={"X-API-Key": server.keys["bob"]}, timeout=60)
    assert ok.status_code == 200 and 1 <= ok.json()["usage"]["completion_tokens"] <= 2

    missing = requests.get(server.url + "/v1/models", timeout=60)
    assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
