"""Self-cognition SFT with the Tinker SDK against a Twinkle server: teach the model to answer
"Who are you?" with "I am Twinkle ...".

Plain Tinker code: only the base URL and key point it at Twinkle.

    python self_cognition.py --base-url http://127.0.0.1:8000 --api-key tml-...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinker import types

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # cookbook/common.py
from common import (MetricsLog, add_tinker_connection_flags, close_service, judge_answer,  # noqa: E402
                    load_jsonl, ready, taught_answer, tinker_service)

QUESTION = "Who are you?"


def build_datum(tokenizer, messages: list[dict]) -> types.Datum:
    """Next-token datum over the conversation; weight 1 only on the assistant's reply."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                           return_dict=False)
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    weights = [0.0] * len(prompt) + [1.0] * (len(full) - len(prompt))
    return types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                       loss_fn_inputs={"target_tokens": full[1:], "weights": weights[1:]})


def ask(sampling_client, tokenizer, question: str) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                           add_generation_prompt=True, return_dict=False)
    params = types.SamplingParams(max_tokens=32, temperature=0.0)
    result = sampling_client.sample(types.ModelInput.from_ints(prompt), num_samples=1, sampling_params=params).result()
    return tokenizer.decode(result.sequences[0].tokens, skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tinker_connection_flags(parser)
    parser.add_argument("--base-model", default="twinkle-tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/tinker_self_cognition", help="metrics JSONL and loss plot")
    args = parser.parse_args()

    service = tinker_service(args)
    training = ready(service.create_lora_training_client(base_model=args.base_model, rank=args.rank,
                                                         seed=args.seed))
    tokenizer = training.get_tokenizer()
    batch = [build_datum(tokenizer, example["messages"]) for example in load_jsonl("self_cognition.jsonl")]
    n_tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)

    base_sampler = ready(service.create_sampling_client(base_model=args.base_model))
    print(f"Q: {QUESTION}\nbefore training: {ask(base_sampler, tokenizer, QUESTION)!r}", flush=True)

    log = MetricsLog(args.out)
    adam = types.AdamParams(learning_rate=args.learning_rate)
    losses = []
    for step in range(1, args.steps + 1):
        fb = training.forward_backward(batch, "cross_entropy")  # both submitted before waiting
        opt = training.optim_step(adam)
        loss = fb.result().metrics["loss:sum"] / n_tokens
        opt.result()
        losses.append(loss)
        log.log(step=step, loss=loss)
        print(f"step {step} loss {loss!r}", flush=True)

    sampler = ready(training.save_weights_and_get_sampling_client())
    after = ask(sampler, tokenizer, QUESTION)
    checkpoint = training.save_state("self-cognition-final").result().path
    plot = log.plot(title="self-cognition SFT through the Tinker SDK (per-token loss)")
    print(f"after training: {after!r}")
    print(f"checkpoint: {checkpoint}")
    if plot:
        print(f"plot: {plot}")
    _, verdict = judge_answer(after, taught_answer("self_cognition.jsonl", QUESTION))
    print(verdict)
    print(f"final: loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    close_service(service)


if __name__ == "__main__":
    main()
