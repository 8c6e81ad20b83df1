"""Teach a vision-language model to name the colour of an image, through the Tinker SDK.

The recipe draws its own images (squares of red, green or blue, in a few sizes and shades), builds
each datum the way tinker-cookbook's vision renderers do (text chunks around an ImageChunk whose
`expected_tokens` comes from the model's own image processor, loaded by model name like the
tokenizer), trains a LoRA adapter with cross-entropy on the answer, and asks the model before and
after training. Runs on the embedded default `twinkle-tiny-vl` in about a minute on CPU.

    python multi_modal.py --base-url http://127.0.0.1:8000 --api-key tml-...

Output lines (stable, for scripts and tests):
    step <n> loss <per-token loss>
    accuracy before <a>   /   accuracy after <a>
    final: accuracy <before> -> <after>
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from tinker import types

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # cookbook/common.py, cookbook/colours.py
from colours import QUESTION, answer_of, test_set, train_set  # noqa: E402
from common import MetricsLog, add_tinker_connection_flags, close_service, ready, tinker_service  # noqa: E402


class Renderer:
    """Chat turns with an image, as token chunks; the image's token count from the image processor."""

    def __init__(self, tokenizer, image_processor) -> None:
        self.tok, self.processor = tokenizer, image_processor
        self.pre = tokenizer.encode(f"<|im_start|>user\n{QUESTION}<|vision_start|>")
        self.post = tokenizer.encode("<|vision_end|><|im_end|>\n<|im_start|>assistant\n")

    def image_tokens(self, data: bytes) -> int:
        from PIL import Image

        grid = self.processor(images=[Image.open(io.BytesIO(data))], return_tensors="np")["image_grid_thw"][0]
        return int(grid.prod()) // self.processor.merge_size ** 2

    def prompt(self, data: bytes) -> types.ModelInput:
        return types.ModelInput(chunks=[
            types.EncodedTextChunk(tokens=self.pre),
            types.ImageChunk(data=data, format="png", expected_tokens=self.image_tokens(data)),
            types.EncodedTextChunk(tokens=self.post)])

    def datum(self, data: bytes, answer: str) -> types.Datum:
        reply = self.tok.encode(answer + "<|im_end|>")
        model_input = self.prompt(data).append(types.EncodedTextChunk(tokens=reply[:-1]))
        n = model_input.length
        return types.Datum(model_input=model_input, loss_fn_inputs={
            "target_tokens": [0] * (n - len(reply)) + reply,  # position i predicts token i + 1
            "weights": [0.0] * (n - len(reply)) + [1.0] * len(reply)})


def accuracy(sampler, renderer: Renderer, examples: list[tuple[bytes, str]]) -> float:
    futures = [sampler.sample(renderer.prompt(data), 1, types.SamplingParams(max_tokens=4, temperature=0.0))
               for data, _ in examples]
    answers = [answer_of(renderer.tok.decode(f.result().sequences[0].tokens)) for f in futures]
    return sum(a == name for a, (_, name) in zip(answers, examples)) / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_tinker_connection_flags(parser)
    parser.add_argument("--base-model", default="twinkle-tiny-vl")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for metrics.jsonl and loss.png")
    args = parser.parse_args()

    from transformers import AutoImageProcessor

    service = tinker_service(args)
    training = ready(service.create_lora_training_client(base_model=args.base_model, rank=args.rank,
                                                         seed=args.seed))
    # the image processor is found the way the tokenizer is: by model name (published by the server)
    renderer = Renderer(training.get_tokenizer(), AutoImageProcessor.from_pretrained(args.base_model))
    train, test = train_set(), test_set()  # the test images are in shades never trained on
    data = [renderer.datum(image, name) for image, name in train]
    tokens = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in data)

    before = accuracy(ready(service.create_sampling_client(base_model=args.base_model)), renderer, test)
    print(f"accuracy before {before:.2f}", flush=True)
    log = MetricsLog(args.out)
    for step in range(args.steps):
        lr = args.learning_rate * (1 - step / args.steps)
        fb = training.forward_backward(data, "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=lr, grad_clip_norm=1.0)).result()
        loss = fb.result().metrics["loss:sum"] / tokens
        log.log(step=step, loss=loss)
        print(f"step {step} loss {loss:.4f}", flush=True)
    after = accuracy(ready(training.save_weights_and_get_sampling_client()), renderer, test)
    print(f"accuracy after {after:.2f}")
    plot = log.plot("loss", "colour naming: loss per answer token")
    if plot:
        print(f"plot: {plot}")
    print(f"final: accuracy {before:.2f} -> {after:.2f}", flush=True)
    close_service(service)


if __name__ == "__main__":
    main()
