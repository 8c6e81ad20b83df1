"""Sampling from a saved checkpoint with Twinkle's own API: several samples with their logprobs,
the prompt's logprobs with the top-k alternatives at every position, and `compute_logprobs` to
score any token sequence.

The same script runs
  in-process (no flags):                  python sample.py
  against a Twinkle server over HTTP:     python sample.py --base-url http://HOST:8000 --api-key KEY
  on a server's Ray actors (power users): python sample.py --ray-address ray://HOST:10001

Which weights
  --model-path PATH   a checkpoint: `model.save(name).result().path` (a `tinker://...` path on a
                      server, a folder in local mode), or a sampler snapshot's path
                      (`model.sampler().info.model_path`)
  (none)              first trains a LoRA adapter for --steps steps on cookbook/data/self_cognition.jsonl,
                      saves it, and samples from that checkpoint with a fresh `Sampler(model_path=...)`

Output lines (stable, for scripts and tests):
    checkpoint: <path>                                  (only when this script trained and saved it)
    sample <i> tokens <n> logprob <sum> stop <stop|length> text <repr>
    prompt: <n> tokens, logprob <sum over positions 1..n-1>
    topk <position> <token repr> <logprob> | <alt token repr> <logprob> ...   (last few prompt positions)
    check: compute_logprobs matches sampled logprobs (max diff <d>)
    samples: <out>/samples.json                         (the whole SampleResult as JSON)
    final: sampled <N> sequences with logprobs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # cookbook/common.py

from common import add_twinkle_connection_flags, connect_twinkle, load_jsonl  # noqa: E402

QUESTION = "Who are you?"


def train_and_save(api, args) -> str:
    """A few SFT steps on the self-cognition examples, then a checkpoint; returns its path."""
    from twinkle.chat import supervised_datum

    model = api.TrainingModel(args.base_model, api.LoraConfig(rank=16, seed=args.seed),
                              optimizer=api.AdamParams(learning_rate=args.learning_rate))
    tokenizer = model.get_tokenizer()
    batch = [supervised_datum(tokenizer, example["messages"]) for example in load_jsonl("self_cognition.jsonl")]
    n_tokens = sum(float(d.loss_inputs["weights"].sum()) for d in batch)
    for step in range(1, args.steps + 1):
        fb = model.forward_backward(batch)
        model.step().result()
        print(f"train {step} loss {fb.result().metrics['loss:sum'] / n_tokens!r}", flush=True)
    saved = model.save("sample-demo", with_optimizer=False).result()
    print(f"checkpoint: {saved.path}", flush=True)
    return saved.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_twinkle_connection_flags(parser)
    parser.add_argument("--base-model", default="twinkle-tiny", help="used only when training a checkpoint here")
    parser.add_argument("--model-path", help="checkpoint or sampler-snapshot path to sample from")
    parser.add_argument("--steps", type=int, default=30, help="training steps when no --model-path is given")
    parser.add_argument("--learning-rate", type=float, default=5e-3, help="for the training steps")
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--topk", type=int, default=3, help="top-k prompt logprobs per position")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/twinkle_sample", help="writes samples.json (the full result) here")
    args = parser.parse_args()

    api = connect_twinkle(args)
    from twinkle.chat import build_prompt, decode

    model_path = args.model_path or train_and_save(api, args)
    sampler = api.Sampler(model_path=model_path)  # the base model is read from the checkpoint
    tokenizer = sampler.get_tokenizer()
    prompt = build_prompt(tokenizer, [{"role": "user", "content": QUESTION}])
    params = api.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)

    # Several samples in one call, with the prompt's logprobs and top-k alternatives
    result = sampler.sample(prompt, params, num_samples=args.num_samples, include_prompt_logprobs=True,
                            topk_prompt_logprobs=args.topk).result()
    print(f"Q: {QUESTION}  (sampler for {sampler.info.model_path})", flush=True)
    for i, seq in enumerate(result.sequences):
        print(f"sample {i} tokens {len(seq.tokens)} logprob {sum(seq.logprobs):.4f} stop {seq.stop_reason} "
              f"text {decode(tokenizer, seq.tokens)!r}", flush=True)

    # prompt_logprobs[0] is None: the first token has no context
    print(f"prompt: {len(prompt)} tokens, logprob {sum(result.prompt_logprobs[1:]):.4f}")
    for pos in range(max(1, len(prompt) - 4), len(prompt)):
        alternatives = " | ".join(f"{tokenizer.decode([tok])!r} {lp:.3f}"
                                  for tok, lp in result.topk_prompt_logprobs[pos])
        print(f"topk {pos} {tokenizer.decode([prompt[pos]])!r} {result.prompt_logprobs[pos]:.3f} | {alternatives}")

    # compute_logprobs scores a whole sequence: here, prompt + the first sample again
    first = result.sequences[0]
    scored = sampler.compute_logprobs(prompt + first.tokens).result()
    diff = max(abs(a - b) for a, b in zip(scored[len(prompt):], first.logprobs))
    print(f"check: compute_logprobs matches sampled logprobs (max diff {diff:.2e})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples.json").write_text(result.model_dump_json(indent=1))
        print(f"samples: {out / 'samples.json'}")
    n_with_logprobs = sum(len(s.logprobs) == len(s.tokens) > 0 for s in result.sequences)
    print(f"final: sampled {n_with_logprobs} sequences with logprobs")


if __name__ == "__main__":
    main()
