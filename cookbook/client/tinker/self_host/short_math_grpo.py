"""GRPO on short arithmetic through the Tinker SDK against a Twinkle server: the model learns to
answer "What is 3+4?" with "7", rewarded on the client for correct answers.

Plain Tinker code: only the base URL and key point it at Twinkle.

    python short_math_grpo.py --base-url http://127.0.0.1:8000 --api-key tml-... --steps 20

How it works
  1. warm-up: supervised steps (cross_entropy) on correctly answered problems, so that the tiny
     model answers with a bare number, is sometimes right, and so can earn reward;
  2. every RL step calls save_weights_and_get_sampling_client() and samples --group-size answers
     to each of --problems problems (temperature 1, stopping at the end-of-turn token);
  3. rewards are computed here: 1 for the right number, plus FORMAT_BONUS for a well-formed reply
     (only a number, ended by the end-of-turn token). Advantages are the rewards minus their
     group's mean (--std-normalize also divides by the group's std, which would blow a 0.1
     format-only difference up to full size); groups whose answers all scored the same carry no
     signal and are left out;
  4. each sample becomes a datum with target_tokens, the sampler's own logprobs and the advantages
     (0 on the prompt), trained with forward_backward(..., "importance_sampling") and optim_step.
     The loss reports the mean importance ratio exp(learner - sampler logprob): 1.0 here, as the
     weights have not moved since sampling and the sampler reports the model's own logprobs.
  Before and after RL every problem is sampled --eval-samples times at temperature 1 with fixed
  seeds; the mean reward of those samples is the "reward" of the final line.

RL on a model this small is sensitive to the learning rate: above ~2e-3 an unlucky update can
flatten the answer distribution into gibberish, from which it recovers only slowly.

Output lines (stable, for scripts and tests):
    warmup <n> loss <per-token loss>
    eval: reward <mean> accuracy <fraction correct> (<before RL|after RL>)
    step <n> reward <mean reward of this step's samples> accuracy <fraction correct> datums <trained on> [ratio <r>]
    final: reward <A> -> <B>       A, B: evaluation reward before and after RL
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

import numpy as np
from tinker import types

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # cookbook/common.py
from common import MetricsLog, add_tinker_connection_flags, close_service, ready, tinker_service  # noqa: E402

FORMAT_BONUS = 0.1


def make_problems(max_operand: int) -> list[tuple[str, int]]:
    """("What is a+b?", a+b) for 1 <= a, b <= max_operand."""
    return [(f"What is {a}+{b}?", a + b) for a in range(1, max_operand + 1) for b in range(1, max_operand + 1)]


def score(text: str, stop_reason: str, answer: int) -> tuple[float, bool]:
    """(reward, correct): 1 for the right number, + FORMAT_BONUS for a bare number that ended the turn."""
    text = text.strip()
    found = re.search(r"-?\d+", text)
    correct = found is not None and int(found.group()) == answer
    well_formed = stop_reason == "stop" and re.fullmatch(r"-?\d+", text) is not None
    return float(correct) + FORMAT_BONUS * well_formed, correct


def prompt_ids(tokenizer, question: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False))


def sft_datum(tokenizer, question: str, answer: int) -> types.Datum:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": str(answer)}]
    prompt = prompt_ids(tokenizer, question)
    full = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    weights = [0.0] * len(prompt) + [1.0] * (len(full) - len(prompt))
    return types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                       loss_fn_inputs={"target_tokens": full[1:], "weights": weights[1:]})


def sample_groups(sampler, prompts, batch, num_samples: int, stop: int, seed: int):
    """Sample every problem of the batch at once (temperature 1, its own seed per request);
    returns [(question, answer, sequences)]."""
    futures = []
    for i, (q, a) in enumerate(batch):
        params = types.SamplingParams(max_tokens=6, temperature=1.0, stop=[stop], seed=seed + i)
        futures.append((q, a, sampler.sample(types.ModelInput.from_ints(prompts[q]), num_samples=num_samples,
                                             sampling_params=params)))
    return [(q, a, f.result().sequences) for q, a, f in futures]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tinker_connection_flags(parser)
    parser.add_argument("--base-model", default="twinkle-tiny")
    parser.add_argument("--steps", type=int, default=20, help="RL steps")
    parser.add_argument("--warmup-steps", type=int, default=40, help="supervised warm-up steps")
    parser.add_argument("--warmup-learning-rate", type=float, default=3e-3)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="RL learning rate")
    parser.add_argument("--max-operand", type=int, default=3, help="problems a+b with 1 <= a, b <= this")
    parser.add_argument("--problems", type=int, default=9, help="problems per RL step")
    parser.add_argument("--group-size", type=int, default=8, help="samples per problem (GRPO group)")
    parser.add_argument("--eval-samples", type=int, default=16, help="samples per problem in the evaluations")
    parser.add_argument("--std-normalize", action="store_true", help="divide advantages by the group's std")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/tinker_short_math_grpo", help="metrics JSONL and reward plot")
    args = parser.parse_args()

    service = tinker_service(args)
    training = ready(service.create_lora_training_client(base_model=args.base_model, rank=args.rank,
                                                         seed=args.seed))
    tokenizer = training.get_tokenizer()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rng = random.Random(args.seed)
    problems = make_problems(args.max_operand)
    prompts = {q: prompt_ids(tokenizer, q) for q, _ in problems}

    # 1. supervised warm-up on correct answers
    warmup = [sft_datum(tokenizer, q, a) for q, a in problems]
    n_tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in warmup)
    for step in range(1, args.warmup_steps + 1):
        fb = training.forward_backward(warmup, "cross_entropy")
        opt = training.optim_step(types.AdamParams(learning_rate=args.warmup_learning_rate))
        print(f"warmup {step} loss {fb.result().metrics['loss:sum'] / n_tokens:.4f}", flush=True)
        opt.result()

    def evaluate(label: str) -> float:
        """Mean reward over every problem, --eval-samples samples each, fixed seeds."""
        sampler = ready(training.save_weights_and_get_sampling_client())
        groups = sample_groups(sampler, prompts, problems, args.eval_samples, end_of_turn,
                               seed=10_000 * (args.seed + 1))
        scores = [score(tokenizer.decode(s.tokens, skip_special_tokens=True), s.stop_reason, a)
                  for _, a, seqs in groups for s in seqs]
        mean_reward = float(np.mean([r for r, _ in scores]))
        print(f"eval: reward {mean_reward:.4f} accuracy {np.mean([c for _, c in scores]):.4f} ({label})", flush=True)
        return mean_reward

    before = evaluate("before RL")

    # 2-4. RL
    log = MetricsLog(args.out)
    adam = types.AdamParams(learning_rate=args.learning_rate)
    for step in range(1, args.steps + 1):
        sampler = ready(training.save_weights_and_get_sampling_client())  # the current weights
        batch = rng.sample(problems, min(args.problems, len(problems)))
        groups = sample_groups(sampler, prompts, batch, args.group_size, end_of_turn, seed=rng.randrange(2**31))
        data, rewards, correct = [], [], []
        for question, answer, sequences in groups:
            scored = [score(tokenizer.decode(s.tokens, skip_special_tokens=True), s.stop_reason, answer)
                      for s in sequences]
            r = np.array([x for x, _ in scored])
            rewards += r.tolist()
            correct += [c for _, c in scored]
            if r.std() == 0:
                continue  # every answer scored the same: no advantage, nothing to learn
            advantages = (r - r.mean()) / (r.std() + 1e-6) if args.std_normalize else r - r.mean()
            prompt = prompts[question]
            n_prompt = len(prompt) - 1  # positions that predict prompt tokens
            for seq, adv in zip(sequences, advantages):
                tokens = prompt + list(seq.tokens)
                data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "logprobs": [0.0] * n_prompt + list(seq.logprobs),  # what the sampler reported
                    "advantages": [0.0] * n_prompt + [float(adv)] * len(seq.tokens),
                }))
        mean_reward, accuracy = float(np.mean(rewards)), float(np.mean(correct))
        row = {"step": step, "reward": mean_reward, "accuracy": accuracy, "datums": len(data)}
        if data:
            fb = training.forward_backward(data, "importance_sampling")
            opt = training.optim_step(adam)
            metrics = fb.result().metrics
            opt.result()
            # ratio = exp(learner logprob - sampler logprob), ~1 here: the weights have not moved
            # since sampling, and the server reports the model's own (temperature-1) logprobs
            row.update(loss=metrics["loss:sum"], ratio=metrics.get("importance_ratio:mean", float("nan")))
        log.log(**row)
        print(f"step {step} reward {mean_reward:.4f} accuracy {accuracy:.4f} datums {len(data)}"
              + (f" ratio {row['ratio']:.4f}" if "ratio" in row else ""), flush=True)

    after = evaluate("after RL")
    plot = log.plot(key="reward", title="GRPO: mean reward of sampled answers")
    if plot:
        print(f"plot: {plot}")
    print(f"final: reward {before:.4f} -> {after:.4f}", flush=True)
    close_service(service)


if __name__ == "__main__":
    main()
