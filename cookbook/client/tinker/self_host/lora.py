"""LoRA SFT with save and resume, through the Tinker SDK against a Twinkle server: teach the model
Pig Latin ("Translate to Pig Latin: hello" -> "ellohay"), with the translations of a word list
generated in this script.

Plain Tinker code: only the base URL and key point it at Twinkle.

    python lora.py --base-url http://127.0.0.1:8000 --api-key tml-... --steps 60 --save-every 20
    python lora.py ... --resume tinker://<run>/weights/step-0020 --steps 60   # continues at step 21

save_state stores the adapter and its Adam moments; --resume restores both with
create_training_client_from_state_with_optimizer (a new training run). Every step trains on the
same batch (all the words), so a resumed run picks up the loss curve exactly where the saved run
left it. --steps is the last step number, also when resuming.

Output lines (stable, for scripts and tests):
    resumed from <tinker path> at step <n>               (with --resume)
    training run: <training run id>
    step <n> loss <per-token loss>
    checkpoint: tinker://<run>/weights/<name>           (one per save)
    eval: <k>/<n> words translated exactly               (greedy sampling after training)
    listed: <name> <tinker path>                          (RestClient: this run's checkpoints)
    final: loss <first step's loss> -> <last step's loss>
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tinker
from tinker import types

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # cookbook/common.py
from common import MetricsLog, add_tinker_connection_flags, close_service, ready, tinker_service  # noqa: E402

WORDS = """hello world apple banana cat dog egg fish green house ice jump king lemon moon
night orange pig queen river stone tree smile string""".split()
VOWELS = "aeiou"


def pig_latin(word: str) -> str:
    """hello -> ellohay, string -> ingstray, apple -> appleway."""
    if word[0] in VOWELS:
        return word + "way"
    cut = next((i for i, ch in enumerate(word) if ch in VOWELS), len(word))
    return word[cut:] + word[:cut] + "ay"


def chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                              return_dict=False))


def build_datum(tokenizer, word: str) -> types.Datum:
    """Next-token datum over the conversation; weight 1 only on the assistant's reply."""
    messages = [{"role": "user", "content": f"Translate to Pig Latin: {word}"},
                {"role": "assistant", "content": pig_latin(word)}]
    prompt = chat_ids(tokenizer, messages[:1], generation_prompt=True)
    full = chat_ids(tokenizer, messages)
    weights = [0.0] * len(prompt) + [1.0] * (len(full) - len(prompt))
    return types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                       loss_fn_inputs={"target_tokens": full[1:], "weights": weights[1:]})


def translate_all(sampling_client, tokenizer, words: list[str]) -> list[str]:
    """Greedy answers for every word, all requests in flight at once."""
    params = types.SamplingParams(max_tokens=16, temperature=0.0, stop=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
    futures = [sampling_client.sample(
        types.ModelInput.from_ints(chat_ids(tokenizer, [{"role": "user", "content": f"Translate to Pig Latin: {w}"}],
                                            generation_prompt=True)),
        num_samples=1, sampling_params=params) for w in words]
    return [tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True).strip() for f in futures]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tinker_connection_flags(parser)
    parser.add_argument("--base-model", default="twinkle-tiny")
    parser.add_argument("--steps", type=int, default=60, help="last step number (also when resuming)")
    parser.add_argument("--save-every", type=int, default=20, help="save_state every N steps (0: only at the end)")
    parser.add_argument("--resume", default=None, help="tinker://.../weights/<name> saved by this recipe")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", type=int, default=8, help="words to translate greedily at the end (0: skip)")
    parser.add_argument("--out", default="outputs/tinker_lora", help="metrics JSONL and loss plot")
    args = parser.parse_args()

    service = tinker_service(args)

    if args.resume:
        # Weights *and* Adam moments, so the next update is the one the saved run would have made.
        training = ready(service.create_training_client_from_state_with_optimizer(args.resume))
        match = re.search(r"step-(\d+)$", args.resume)
        first_step = int(match.group(1)) + 1 if match else 1
        print(f"resumed from {args.resume} at step {first_step}", flush=True)
    else:
        training = ready(service.create_lora_training_client(base_model=args.base_model, rank=args.rank,
                                                             seed=args.seed))
        first_step = 1
    print(f"training run: {training.model_id}", flush=True)
    tokenizer = training.get_tokenizer()
    batch = [build_datum(tokenizer, word) for word in WORDS]
    n_tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)

    log = MetricsLog(args.out)
    adam = types.AdamParams(learning_rate=args.learning_rate)
    losses = []
    for step in range(first_step, args.steps + 1):
        fb = training.forward_backward(batch, "cross_entropy")  # both submitted before waiting
        opt = training.optim_step(adam)
        loss = fb.result().metrics["loss:sum"] / n_tokens
        opt.result()
        losses.append(loss)
        log.log(step=step, loss=loss)
        print(f"step {step} loss {loss:.6f}", flush=True)
        if (args.save_every and step % args.save_every == 0) or step == args.steps:
            checkpoint = training.save_state(f"step-{step:04d}").result().path
            print(f"checkpoint: {checkpoint}", flush=True)

    if args.eval and losses:
        words = WORDS[: args.eval]
        sampler = ready(training.save_weights_and_get_sampling_client())
        answers = translate_all(sampler, tokenizer, words)
        for word, answer in zip(words, answers):
            print(f"  {word} -> {answer!r} (want {pig_latin(word)!r})")
        exact = sum(a == pig_latin(w) for w, a in zip(words, answers))
        print(f"eval: {exact}/{len(words)} words translated exactly", flush=True)

    # The REST API knows every checkpoint this training run saved.
    rest = tinker.RestClient(base_url=args.base_url, api_key=args.api_key)
    for ckpt in rest.list_checkpoints(training.model_id).result().checkpoints:
        print(f"listed: {ckpt.checkpoint_id} {ckpt.tinker_path}")

    plot = log.plot(title="Pig Latin LoRA SFT through the Tinker SDK (per-token loss)")
    if plot:
        print(f"plot: {plot}")
    if losses:
        print(f"final: loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    else:
        print(f"nothing to train: the checkpoint is already at step {first_step - 1} >= --steps {args.steps}")
    close_service(service)


if __name__ == "__main__":
    main()
