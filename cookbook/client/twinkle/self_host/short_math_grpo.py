"""GRPO on short arithmetic with Twinkle's own API and the named "grpo" loss: a model learns to
answer "What is 3 + 4?" with "7", rewarded only for correct answers.

The same script runs
  in-process (no flags):                  python short_math_grpo.py
  against a Twinkle server over HTTP:     python short_math_grpo.py --base-url http://HOST:8000 --api-key KEY
  on a server's Ray actors (power users): python short_math_grpo.py --ray-address ray://HOST:10001

How it works
  1. warm-up: --warmup-steps supervised steps (forward_backward(..., loss="cross_entropy"),
     overriding the model's default loss for those calls) teach the answer format and some sums,
     so the model can earn reward (about half of its sampled answers are right afterwards);
  2. every RL step takes a snapshot sampler (`model.sampler()`), samples --group-size answers to
     each of --problems problems (temperature 1, stopping at the end of the assistant's turn),
     scores them on the client (1 if the answer is right, else 0) and normalises rewards within
     each problem's group into advantages;
  3. each sample becomes a datum: target_tokens, the sampler's own `logprobs`, `advantages`
     (0 on the prompt) and `weights` (1 on the answer tokens only); groups where every answer
     scored the same carry no signal and are left out;
  4. forward_backward with the model's loss "grpo" (clipped ratio, epsilon 0.2; --kl-beta > 0 adds
     a k3 KL penalty to `ref_logprobs` from the frozen warm-up model) and one optimizer step.
Progress is measured by an evaluation after the warm-up and after RL: --eval-samples answers to
every problem, drawn with the same sampling seed both times, so the difference between the two is
the model's and not the dice's. (A single step's reward moves by +-0.05 from sampling alone.)

Output lines (stable, for scripts and tests):
    warmup <n> loss <per-token loss>
    eval: reward <r> greedy accuracy <k>/<n> (<label>)  (every problem, after warm-up and after RL)
    step <n> reward <mean reward of this step's samples> datums <trained on> [kl <k>]
    training reward <a> (first quarter of the steps) -> <b> (last quarter)
    final: reward <A> -> <B>       the evaluation's mean reward after warm-up and after RL
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # cookbook/common.py

from common import MetricsLog, add_twinkle_connection_flags, connect_twinkle  # noqa: E402


def make_problems(max_operand: int) -> list[tuple[str, str]]:
    """("What is a + b?", "a+b") for 1 <= a, b <= max_operand."""
    return [(f"What is {a} + {b}?", str(a + b)) for a in range(1, max_operand + 1) for b in range(1, max_operand + 1)]


def reward(answer_text: str, expected: str) -> float:
    return 1.0 if answer_text.strip() == expected else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_twinkle_connection_flags(parser)
    parser.add_argument("--base-model", default="twinkle-tiny")
    parser.add_argument("--steps", type=int, default=30, help="RL steps")
    parser.add_argument("--warmup-steps", type=int, default=50, help="supervised warm-up steps")
    parser.add_argument("--warmup-learning-rate", type=float, default=3e-3)
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="RL learning rate")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="RL gradient-norm clip (0: none)")
    parser.add_argument("--max-operand", type=int, default=4, help="problems a + b with 1 <= a, b <= this")
    parser.add_argument("--problems", type=int, default=16, help="problems per RL step")
    parser.add_argument("--group-size", type=int, default=8, help="samples per problem")
    parser.add_argument("--normalize", default="token_mean", choices=["token_mean", "sequence_mean", "sum"],
                        help="how grpo reduces the per-token terms")
    parser.add_argument("--eval-samples", type=int, default=32, help="samples per problem in the evaluations")
    parser.add_argument("--kl-beta", type=float, default=0.0, help="> 0: KL penalty to the warm-up model")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/twinkle_short_math_grpo", help="metrics JSONL and reward plot")
    args = parser.parse_args()

    api = connect_twinkle(args)
    from twinkle.chat import build_prompt, decode, supervised_datum

    model = api.TrainingModel(args.base_model, api.LoraConfig(rank=args.rank, seed=args.seed),
                              optimizer=api.AdamParams(learning_rate=args.learning_rate, grad_clip_norm=args.grad_clip),
                              loss="grpo", loss_config={"epsilon_low": 0.2, "epsilon_high": 0.2,
                                                        "kl_beta": args.kl_beta, "normalize": args.normalize})
    tokenizer = model.get_tokenizer()
    rng = random.Random(args.seed)
    problems = make_problems(args.max_operand)
    prompts = {question: build_prompt(tokenizer, [{"role": "user", "content": question}]) for question, _ in problems}

    # 1. supervised warm-up (cross_entropy for these calls only; the model's own loss stays grpo)
    warmup = [supervised_datum(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
              for q, a in problems]
    # Losses are token sums; weights of 1/n make this one a per-token mean, on the same scale as
    # grpo's token_mean, so the Adam statistics carried into RL match the RL gradients.
    n_tokens = sum(float(d.loss_inputs["weights"].sum()) for d in warmup)
    for datum in warmup:
        datum.loss_inputs["weights"] = datum.loss_inputs["weights"] / n_tokens
    warmup_adam = api.AdamParams(learning_rate=args.warmup_learning_rate)
    pending = []  # every call is submitted at once; the backend runs them in order
    for _ in range(args.warmup_steps):
        pending.append((model.forward_backward(warmup, loss="cross_entropy"), model.step(warmup_adam)))
    for step, (fb, opt) in enumerate(pending, start=1):
        opt.result()
        print(f"warmup {step} loss {fb.result().metrics['loss:sum']!r}", flush=True)

    def evaluate(label: str) -> float:
        """Mean reward of --eval-samples answers per problem (a fixed seed, so before and after
        see the same random draws and their difference is the model's), plus greedy accuracy."""
        sampler = model.sampler()
        sampled = api.SamplingParams(max_tokens=8, temperature=1.0, seed=args.seed + 1)
        greedy = api.SamplingParams(max_tokens=8, temperature=0.0)
        futures = [(a, sampler.sample(prompts[q], sampled, num_samples=args.eval_samples),
                    sampler.sample(prompts[q], greedy)) for q, a in problems]
        scores, correct = [], 0
        for answer, many, one in futures:
            scores.extend(reward(decode(tokenizer, s.tokens), answer) for s in many.result().sequences)
            correct += int(reward(decode(tokenizer, one.result().sequences[0].tokens), answer))
        mean = float(np.mean(scores))
        print(f"eval: reward {mean:.4f} greedy accuracy {correct}/{len(problems)} ({label})", flush=True)
        return mean

    log = MetricsLog(args.out)
    before = evaluate("after warm-up")
    log.log(step=0, eval_reward=before)
    reference = None
    if args.kl_beta > 0:  # a frozen copy of the warm-up model supplies ref_logprobs
        saved = model.save("warmup", with_optimizer=False).result()
        reference = api.TrainingModel.from_checkpoint(saved.path, with_optimizer=False)

    # 2-4. RL
    rewards = []
    for step in range(1, args.steps + 1):
        sampler = model.sampler()  # a snapshot of the current weights
        batch = rng.sample(problems, min(args.problems, len(problems)))
        params = api.SamplingParams(max_tokens=8, temperature=1.0, seed=rng.randrange(2**31))
        futures = [(q, a, sampler.sample(prompts[q], params, num_samples=args.group_size)) for q, a in batch]
        data, step_rewards = [], []
        for question, answer, future in futures:
            prompt = prompts[question]
            sequences = future.result().sequences
            r = np.array([reward(decode(tokenizer, s.tokens), answer) for s in sequences])
            step_rewards.extend(r.tolist())
            if r.std() == 0:
                continue  # every answer scored the same: no advantage, nothing to learn
            advantages = (r - r.mean()) / (r.std() + 1e-6)
            n_prompt = len(prompt) - 1  # positions that predict prompt tokens
            for seq, adv in zip(sequences, advantages):
                full = prompt + seq.tokens
                n_answer = len(seq.tokens)
                data.append(api.Datum(input_tokens=full[:-1], loss_inputs={
                    "target_tokens": full[1:],
                    "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                    "advantages": [0.0] * n_prompt + [float(adv)] * n_answer,
                    "weights": [0.0] * n_prompt + [1.0] * n_answer,
                }))
        mean_reward = float(np.mean(step_rewards))
        rewards.append(mean_reward)
        row = {"step": step, "reward": mean_reward, "datums": len(data)}
        if data:
            if reference is not None:
                ref = reference.forward(data, loss="cross_entropy").result()
                data = [api.Datum(input_tokens=d.input_tokens,
                                  loss_inputs={**d.loss_inputs, "ref_logprobs": out["logprobs"]})
                        for d, out in zip(data, ref.loss_outputs)]
            fb = model.forward_backward(data)  # the model's loss: grpo
            model.step().result()
            metrics = fb.result().metrics
            row.update(loss=metrics["loss:sum"], importance_ratio=metrics.get("importance_ratio:mean"))
            if "kl:mean" in metrics:
                row["kl"] = metrics["kl:mean"]
        log.log(**row)
        print(f"step {step} reward {mean_reward!r} datums {len(data)}"
              + (f" kl {row['kl']:.4g}" if "kl" in row else ""), flush=True)

    after = evaluate("after RL")
    log.log(step=args.steps, eval_reward=after)
    plot = log.plot(key="reward", title="GRPO: mean reward of sampled answers")
    if plot:
        print(f"plot: {plot}")
    if rewards:
        k = max(1, len(rewards) // 4)
        print(f"training reward {np.mean(rewards[:k]):.4f} (first quarter of the steps) -> "
              f"{np.mean(rewards[-k:]):.4f} (last quarter)")
    print(f"final: reward {before:.4f} -> {after:.4f}")


if __name__ == "__main__":
    main()
