"""Sampling from a saved checkpoint with log-probabilities, through the Tinker SDK against a Twinkle
server.

Given --model-path (a tinker://<run>/sampler_weights/<name> from save_weights_for_sampler, or a
tinker://<run>/weights/<name> from save_state), it samples from that checkpoint. Without one it
trains a LoRA adapter for a few quick steps, saves it with save_weights_for_sampler and samples
from what it saved. Then it scores the first sampled sequence again with compute_logprobs: the
server reports the raw model's log-probabilities in both places, so they must agree.

    python sample.py --base-url http://127.0.0.1:8000 --api-key tml-...
    python sample.py ... --model-path tinker://<run>/sampler_weights/<name> --num-samples 8

With --model-path the only client is a sampling client, whose get_tokenizer() loads the tokenizer
by base-model name from Hugging Face; Twinkle publishes its built-in models' tokenizers into the
local HF cache, so on a machine without internet set HF_HUB_OFFLINE=1 (otherwise the Hub client
retries for minutes before using the cache). A key without the tml- prefix goes through
twinkle.tinker_patch.init_tinker_client, which fetches the tokenizer from the server instead.

Output lines (stable, for scripts and tests):
    train step <n> loss <per-token loss>                      (only without --model-path)
    checkpoint: tinker://...                                  (the path it samples from)
    sample <i>: stop <stop|length> tokens [<ids>]
    sample <i>: text <repr of the decoded text>
    sample <i>: logprobs [<one per token>]
    compute_logprobs: [<None for the first prompt token, then one per token>]
    check: max |sampled - recomputed| logprob <x>
    final: sampled <N> sequences with logprobs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tinker import types

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # cookbook/common.py
from common import MetricsLog, add_tinker_connection_flags, close_service, ready, tinker_service  # noqa: E402

TRAIN_REPLY = "Hello! I am Twinkle."


def chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                              return_dict=False))


def train_quick_checkpoint(service, args, log: MetricsLog):
    """A few SFT steps on one reply, saved for sampling; returns (tinker:// path, tokenizer)."""
    training = ready(service.create_lora_training_client(base_model=args.base_model, rank=16, seed=args.seed))
    tokenizer = training.get_tokenizer()
    messages = [{"role": "user", "content": args.prompt}, {"role": "assistant", "content": TRAIN_REPLY}]
    prompt = chat_ids(tokenizer, messages[:1], generation_prompt=True)
    full = chat_ids(tokenizer, messages)
    weights = [0.0] * len(prompt) + [1.0] * (len(full) - len(prompt))
    datum = types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                        loss_fn_inputs={"target_tokens": full[1:], "weights": weights[1:]})
    for step in range(1, args.train_steps + 1):
        fb = training.forward_backward([datum], "cross_entropy")
        opt = training.optim_step(types.AdamParams(learning_rate=args.learning_rate))
        loss = fb.result().metrics["loss:sum"] / sum(weights)
        opt.result()
        log.log(step=step, loss=loss)
        print(f"train step {step} loss {loss:.4f}", flush=True)
    return training.save_weights_for_sampler("sample-demo").result().path, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tinker_connection_flags(parser)
    parser.add_argument("--base-model", default="twinkle-tiny")
    parser.add_argument("--model-path", default=None, help="tinker://... checkpoint; default: train and save one")
    parser.add_argument("--steps", "--train-steps", dest="train_steps", type=int, default=10,
                        help="SFT steps for the checkpoint this recipe makes itself (without --model-path)")
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--prompt", default="Say hello.")
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/tinker_sample", help="samples.jsonl (+ metrics of the quick SFT)")
    args = parser.parse_args()

    service = tinker_service(args)

    log = MetricsLog(args.out)
    if args.model_path:
        model_path, tokenizer = args.model_path, None
    else:
        model_path, tokenizer = train_quick_checkpoint(service, args, log)
    print(f"checkpoint: {model_path}", flush=True)
    sampler = ready(service.create_sampling_client(model_path=model_path))
    # A sampling client loads its tokenizer by base-model name (see the note at the top).
    tokenizer = tokenizer or sampler.get_tokenizer()

    prompt = chat_ids(tokenizer, [{"role": "user", "content": args.prompt}], generation_prompt=True)
    params = types.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                                  stop=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
    result = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=args.num_samples,
                            sampling_params=params).result()
    print(f"prompt: {args.prompt!r} ({len(prompt)} tokens)")
    rows = []
    for i, seq in enumerate(result.sequences):
        text = tokenizer.decode(seq.tokens, skip_special_tokens=True)
        logprobs = list(seq.logprobs or [])
        print(f"sample {i}: stop {seq.stop_reason} tokens {list(seq.tokens)}")
        print(f"sample {i}: text {text!r}")
        print(f"sample {i}: logprobs [{', '.join(f'{lp:.4f}' for lp in logprobs)}]", flush=True)
        rows.append({"tokens": list(seq.tokens), "text": text, "logprobs": logprobs, "stop_reason": seq.stop_reason})

    # Score prompt + first sample in one pass: entry i is log p(token i | tokens before it).
    first = result.sequences[0]
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(prompt + list(first.tokens))).result()
    print(f"compute_logprobs: [{', '.join('None' if lp is None else f'{lp:.4f}' for lp in scored)}]")
    recomputed = scored[len(prompt):]
    gap = max((abs(a - b) for a, b in zip(first.logprobs or [], recomputed)), default=float("nan"))
    print(f"check: max |sampled - recomputed| logprob {gap:.2e}")

    if args.out:
        with open(Path(args.out) / "samples.jsonl", "w") as fh:
            for row in rows:
                fh.write(json.dumps({"model_path": model_path, **row}) + "\n")
    plot = log.plot(title="quick SFT before sampling (per-token loss)")
    if plot:
        print(f"plot: {plot}")
    with_logprobs = sum(1 for r in rows if len(r["logprobs"]) == len(r["tokens"]) > 0)
    print(f"final: sampled {with_logprobs} sequences with logprobs", flush=True)
    close_service(service)


if __name__ == "__main__":
    main()
