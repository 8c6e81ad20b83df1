"""DPO through the Tinker SDK against a Twinkle server, on preference pairs generated in this
script: for "Tell me about <topic>." the chosen reply is a polite, complete answer and the rejected
one a rude brush-off.

The loss is written here in torch and run with forward_backward_custom: the server returns the
policy's per-token logprobs, this script computes the sigmoid DPO loss and its gradient, and the
SDK sends the gradient back as cross-entropy weights. Reference logprobs come from the same
training client's forward pass before any update (a fresh LoRA adapter is exactly the base model);
a base-model sampling client's compute_logprobs would give the same numbers, one sequence at a time.

    python dpo.py --base-url http://127.0.0.1:8000 --api-key tml-... --steps 20

margin = mean over pairs of [log pi/ref (chosen) - log pi/ref (rejected)], each log-ratio summed
over the reply's tokens: DPO's implicit reward difference without beta. It is 0 at step 1 (policy
= reference) and grows as the policy learns the preference.

Output lines (stable, for scripts and tests):
    step <n> loss <dpo loss> margin <train margin> accuracy <fraction of pairs with margin > 0>
    eval: train margin <m> accuracy <a>; held-out margin <m> accuracy <a>   (after the last update)
    final: margin <step 1's margin> -> <train margin after the last update>
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tinker import types

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # cookbook/common.py
from common import MetricsLog, add_tinker_connection_flags, close_service, ready, tinker_service  # noqa: E402

TOPICS = ["cats", "the ocean", "music", "trees", "coffee", "the moon", "bicycles", "rain", "chess", "bread",
          "rivers", "winter", "books", "mountains", "gardens", "birds"]
POLITE = ["Of course! {t} is a wonderful subject, and I am happy to tell you about it.",
          "Certainly! Here is a short answer about {t}. I hope it helps.",
          "Sure! I would be glad to explain {t} to you. Thank you for asking."]
RUDE = ["No. Ask someone else.", "Whatever. Not interested.", "Ugh, {t}? Go away."]


def make_pairs(topics: list[str], seed: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) for each topic, with a pattern picked at random."""
    rng = random.Random(seed)
    pairs = []
    for topic in topics:
        prompt = f"Tell me about {topic}."
        chosen = rng.choice(POLITE).format(t=topic[0].upper() + topic[1:])
        rejected = rng.choice(RUDE).format(t=topic)
        pairs.append((prompt, chosen, rejected))
    return pairs


def reply_datum(tokenizer, prompt: str, reply: str) -> types.Datum:
    """Next-token datum over prompt + reply; weight 1 on the reply's tokens (those DPO scores)."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    head = tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    weights = [0.0] * len(head) + [1.0] * (len(full) - len(head))
    return types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                       loss_fn_inputs={"target_tokens": full[1:], "weights": weights[1:]})


def build_batch(tokenizer, pairs) -> list[types.Datum]:
    """Datums in (chosen, rejected) order, pair after pair."""
    batch = []
    for prompt, chosen, rejected in pairs:
        batch += [reply_datum(tokenizer, prompt, chosen), reply_datum(tokenizer, prompt, rejected)]
    return batch


def sequence_logprobs(batch: list[types.Datum], logprobs: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the reply tokens' logprobs, one per datum."""
    return torch.stack([(lp * d.loss_fn_inputs["weights"].to_torch().to(lp.dtype)).sum()
                        for d, lp in zip(batch, logprobs)])


def forward_logprobs(training, batch) -> torch.Tensor:
    out = training.forward(batch, "cross_entropy").result()
    return sequence_logprobs(batch, [o["logprobs"].to_torch() for o in out.loss_fn_outputs])


def margins(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    ratio = policy - reference
    return ratio[0::2] - ratio[1::2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tinker_connection_flags(parser)
    parser.add_argument("--base-model", default="twinkle-tiny")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=4, help="topics kept out of training, for evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/tinker_dpo", help="metrics JSONL and margin/loss plots")
    args = parser.parse_args()

    service = tinker_service(args)
    training = ready(service.create_lora_training_client(base_model=args.base_model, rank=args.rank,
                                                         seed=args.seed))
    tokenizer = training.get_tokenizer()
    pairs = make_pairs(TOPICS, args.seed)
    train_pairs, eval_pairs = pairs[: len(pairs) - args.held_out], pairs[len(pairs) - args.held_out:]
    batch = build_batch(tokenizer, train_pairs)
    eval_batch = build_batch(tokenizer, eval_pairs)
    print(f"{len(train_pairs)} training pairs, {len(eval_pairs)} held out; e.g. {train_pairs[0]}", flush=True)

    # Reference: the untouched adapter (LoRA starts as the identity), before any optim_step.
    ref = forward_logprobs(training, batch)
    ref_eval = forward_logprobs(training, eval_batch) if eval_batch else None

    def dpo_loss(data: list[types.Datum], logprobs: list[torch.Tensor]):
        m = margins(sequence_logprobs(data, logprobs), ref)
        loss = -F.logsigmoid(args.beta * m).mean()
        m = m.detach()
        return loss, {"margin:mean": float(m.mean()), "accuracy:mean": float((m > 0).float().mean())}

    log = MetricsLog(args.out)
    adam = types.AdamParams(learning_rate=args.learning_rate)
    history = []
    for step in range(1, args.steps + 1):
        fb = training.forward_backward_custom(batch, dpo_loss)
        opt = training.optim_step(adam)
        metrics = fb.result().metrics
        opt.result()
        loss, margin, acc = metrics["loss:sum"], metrics["margin:mean"], metrics["accuracy:mean"]
        history.append(margin)
        log.log(step=step, loss=loss, margin=margin, accuracy=acc)
        print(f"step {step} loss {loss:.4f} margin {margin:.4f} accuracy {acc:.2f}", flush=True)

    # After the last update: margins on the training pairs and on topics never trained on.
    final = margins(forward_logprobs(training, batch), ref)
    line = f"eval: train margin {final.mean():.4f} accuracy {(final > 0).float().mean():.2f}"
    if eval_batch:
        held = margins(forward_logprobs(training, eval_batch), ref_eval)
        line += f"; held-out margin {held.mean():.4f} accuracy {(held > 0).float().mean():.2f}"
    print(line)
    log.plot("loss", title="DPO loss through forward_backward_custom")
    plot = log.plot("margin", title="DPO margin: chosen minus rejected policy log-ratio")
    if plot:
        print(f"plot: {plot}")
    print(f"final: margin {history[0] if history else 0.0:.4f} -> {final.mean():.4f}", flush=True)
    close_service(service)


if __name__ == "__main__":
    main()
