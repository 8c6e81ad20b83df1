"""Self-cognition SFT with Twinkle's own API: teach a model to answer "Who are you?" with
"I am Twinkle ...".

The same script runs
  in-process (no flags):                  python self_cognition.py
  against a Twinkle server over HTTP:     python self_cognition.py --base-url http://HOST:8000 --api-key KEY
  on a server's Ray actors (power users): python self_cognition.py --ray-address ray://HOST:10001
and prints one `step N loss X` line per step, where X is the mean per-token loss of that step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # cookbook/common.py

from common import (MetricsLog, add_twinkle_connection_flags, connect_twinkle, judge_answer,  # noqa: E402
                    load_jsonl, taught_answer)

QUESTION = "Who are you?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_twinkle_connection_flags(parser)
    parser.add_argument("--base-model", default="twinkle-tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/twinkle_self_cognition", help="metrics JSONL and loss plot")
    args = parser.parse_args()

    api = connect_twinkle(args)
    from twinkle.chat import build_prompt, decode, supervised_datum

    model = api.TrainingModel(args.base_model, api.LoraConfig(rank=args.rank, seed=args.seed),
                              optimizer=api.AdamParams(learning_rate=args.learning_rate))
    tokenizer = model.get_tokenizer()
    batch = [supervised_datum(tokenizer, example["messages"]) for example in load_jsonl("self_cognition.jsonl")]
    n_tokens = sum(float(d.loss_inputs["weights"].sum()) for d in batch)
    prompt = build_prompt(tokenizer, [{"role": "user", "content": QUESTION}])
    greedy = api.SamplingParams(max_tokens=32, temperature=0.0, seed=args.seed)

    def answer() -> str:
        sampled = model.sampler().sample(prompt, greedy).result()
        return decode(tokenizer, sampled.sequences[0].tokens)

    print(f"Q: {QUESTION}\nbefore training: {answer()!r}", flush=True)
    log = MetricsLog(args.out)
    losses = []
    for step in range(1, args.steps + 1):
        fb = model.forward_backward(batch)  # submitted together: the server queues the step
        opt = model.step()
        loss = fb.result().metrics["loss:sum"] / n_tokens
        opt.result()
        losses.append(loss)
        log.log(step=step, loss=loss)
        print(f"step {step} loss {loss!r}", flush=True)
    after = answer()
    plot = log.plot(title="self-cognition SFT (per-token loss)")
    print(f"after training: {after!r}")
    if plot:
        print(f"plot: {plot}")
    _, verdict = judge_answer(after, taught_answer("self_cognition.jsonl", QUESTION))
    print(verdict)
    print(f"final: loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
