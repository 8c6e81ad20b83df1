"""Direct Preference Optimisation (DPO) with Twinkle's own API and the named "dpo" loss: teach a
model to prefer friendly, helpful replies over curt refusals, from preference pairs generated here.

The same script runs
  in-process (no flags):                  python dpo.py
  against a Twinkle server over HTTP:     python dpo.py --base-url http://HOST:8000 --api-key KEY
  on a server's Ray actors (power users): python dpo.py --ray-address ray://HOST:10001

How it works
  * every prompt ("Tell me about rivers.") gets a chosen reply (friendly, on topic) and a rejected
    one (a curt refusal); a batch lists them as consecutive (chosen, rejected) datums, with
    `weights` = 1 on the reply tokens only;
  * `ref_logprobs` are the per-token logprobs of the same tokens under the reference (base) model,
    read once before training with `model.forward(batch, loss="cross_entropy")`: a fresh LoRA
    adapter has B = 0, so before its first step the model *is* the base model (to start from a
    trained adapter instead, read them from a frozen `TrainingModel.from_checkpoint(path)`);
  * the model is created with loss="dpo", loss_config={"beta": ...}; each step is one
    forward_backward over a random mini-batch of pairs and one optimizer step, under a
    warmup + cosine LRSchedule.
A pair's reward margin is sum(w * (logp - ref)) of chosen minus rejected; it starts at exactly 0.

Output lines (stable, for scripts and tests):
    step <n> loss <per-pair loss> margin <mean reward margin> accuracy <fraction of pairs with margin > 0> lr <lr>
    eval: held-out margin <m> accuracy <a>            (pairs on topics never trained on, before and after)
    final: margin <first step's margin> -> <last step's margin>
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # cookbook/common.py

from common import MetricsLog, add_twinkle_connection_flags, connect_twinkle  # noqa: E402

TRAIN_TOPICS = """rivers mountains cats dogs music bread gardens trains stars oceans books coffee forests
bicycles clouds birds""".split()
EVAL_TOPICS = "apples winter boats candles".split()
PROMPTS = ["Tell me about {t}.", "What do you think of {t}?", "Can you describe {t}?"]
CHOSEN = ["Happy to help! {T} are wonderful, and there is a lot to enjoy about them.",
          "Of course. {T} are fascinating; I would be glad to tell you more.",
          "Sure! I really like {t}. Let me share a few things about them."]
REJECTED = ["No.", "I will not answer that.", "Go away."]


def make_pairs(topics: list[str], rng: random.Random) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, chosen reply, rejected reply) for every topic and prompt wording."""
    pairs = []
    for topic in topics:
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt.format(t=topic)}]
            chosen = rng.choice(CHOSEN).format(t=topic, T=topic.capitalize())
            pairs.append((messages, chosen, rng.choice(REJECTED)))
    rng.shuffle(pairs)
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_twinkle_connection_flags(parser)
    parser.add_argument("--base-model", default="twinkle-tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-pairs", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO temperature (loss_config beta)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/twinkle_dpo", help="metrics JSONL and margin plot")
    args = parser.parse_args()

    api = connect_twinkle(args)
    from twinkle.chat import supervised_datum

    schedule = api.LRSchedule(kind="cosine", warmup_steps=min(3, args.steps), total_steps=max(1, args.steps),
                              min_lr_ratio=0.1)
    model = api.TrainingModel(args.base_model, api.LoraConfig(rank=args.rank, seed=args.seed),
                              optimizer=api.AdamParams(learning_rate=args.learning_rate), schedule=schedule,
                              loss="dpo", loss_config={"beta": args.beta})
    tokenizer = model.get_tokenizer()
    rng = random.Random(args.seed)

    def pair_batch(pairs) -> list:
        """Consecutive (chosen, rejected) datums, weights on the reply, ref_logprobs from the base model."""
        batch = []
        for messages, chosen, rejected in pairs:
            for reply in (chosen, rejected):
                batch.append(supervised_datum(tokenizer, messages + [{"role": "assistant", "content": reply}]))
        # Before the first step the adapter is a no-op (LoRA B = 0): this forward pass is the reference.
        reference = model.forward(batch, loss="cross_entropy").result()
        return [api.Datum(input_tokens=d.input_tokens,
                          loss_inputs={**d.loss_inputs, "ref_logprobs": out["logprobs"]})
                for d, out in zip(batch, reference.loss_outputs)]

    train = pair_batch(make_pairs(TRAIN_TOPICS, rng))
    held_out = pair_batch(make_pairs(EVAL_TOPICS, rng))
    train_pairs = [train[i:i + 2] for i in range(0, len(train), 2)]
    n_pairs = min(args.batch_pairs, len(train_pairs))
    print(f"{len(train_pairs)} training pairs ({n_pairs} per step), {len(held_out) // 2} held-out pairs, "
          f"beta {args.beta}", flush=True)

    def evaluate(label: str) -> dict:
        metrics = model.forward(held_out).result().metrics  # the model's loss (dpo), no gradients
        print(f"eval: held-out margin {metrics['reward_margin:mean']:.4f} "
              f"accuracy {metrics['reward_accuracy:mean']:.3f} ({label})", flush=True)
        return metrics

    evaluate("before training")
    log = MetricsLog(args.out)
    margins = []
    for step in range(1, args.steps + 1):
        batch = [datum for pair in rng.sample(train_pairs, n_pairs) for datum in pair]
        fb = model.forward_backward(batch)  # submitted together: the server queues the step
        opt = model.step()
        metrics = fb.result().metrics
        lr = opt.result().metrics.get("learning_rate", float("nan"))
        margin, accuracy = metrics["reward_margin:mean"], metrics["reward_accuracy:mean"]
        loss = metrics["loss:sum"] / n_pairs
        margins.append(margin)
        log.log(step=step, loss=loss, margin=margin, accuracy=accuracy, lr=lr,
                chosen_reward=metrics["chosen_reward:mean"], rejected_reward=metrics["rejected_reward:mean"])
        print(f"step {step} loss {loss!r} margin {margin!r} accuracy {accuracy!r} lr {lr:.3g}", flush=True)
    evaluate("after training")
    plot = log.plot(key="margin", title="DPO reward margin (chosen - rejected)")
    if plot:
        print(f"plot: {plot}")
    if margins:
        print(f"final: margin {margins[0]:.4f} -> {margins[-1]:.4f}")


if __name__ == "__main__":
    main()
