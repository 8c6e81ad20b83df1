"""End-to-end smoke test of local mode: a LoRA learns a reply and the sampler shows it."""

from twinkle import AdamParams, LoraConfig, SamplingParams, TrainingModel
from twinkle.api.local import LocalBackend
from twinkle.chat import build_prompt, decode, supervised_datum


def test_lora_learns_identity_in_local_mode(state_dir):
    backend = LocalBackend(state_dir)
    try:
        model = TrainingModel("twinkle-tiny", LoraConfig(rank=16, seed=0),
                              optimizer=AdamParams(learning_rate=5e-3), backend=backend)
        tok = model.get_tokenizer()
        messages = [{"role": "user", "content": "Who are you?"},
                    {"role": "assistant", "content": "I am Twinkle."}]
        datum = supervised_datum(tok, messages)
        prompt = build_prompt(tok, messages[:1])
        greedy = SamplingParams(max_tokens=12, temperature=0)
        before = decode(tok, model.sampler().sample(prompt, greedy).result().sequences[0].tokens)
        losses = []
        for _ in range(30):
            fb = model.forward_backward([datum])
            model.step()
            losses.append(fb.result().metrics["loss:sum"])
        after = decode(tok, model.sampler().sample(prompt, greedy).result().sequences[0].tokens)
        assert losses[-1] < 0.1 * losses[0]
        assert "I am Twinkle" not in before
        assert "I am Twinkle" in after
    finally:
        backend.close()
