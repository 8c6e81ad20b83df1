"""Runs under the old JSON-protocol Tinker SDK (0.24.x) in its own venv; prints a JSON report.

Not a test module: test_tinker_json_sdk.py runs it in a subprocess against the shared server.
"""

import json
import os
import sys

import tinker
from tinker import types

service = tinker.ServiceClient(base_url=os.environ["TINKER_BASE_URL"], api_key=os.environ["TINKER_API_KEY"])
training = service.create_lora_training_client(base_model="twinkle-tiny", rank=8, seed=11)
tokens = list(range(40, 72))
datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
losses = []
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
    fb = training.forward_backward([datum], "cross_entropy")
    opt = training.optim_step(types.AdamParams(learning_rate=1e-2))
    losses.append(fb.result().metrics["loss:sum"])
    opt.result()
forward = training.forward([datum], "cross_entropy").result()
logprobs = forward.loss_fn_outputs[0]["logprobs"].tolist()
sampler = training.save_weights_and_get_sampling_client(name="json-sdk")
sample = sampler.sample(types.ModelInput.from_ints(tokens[:4]), num_samples=2,
                        sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=3)).result()
path = training.save_state("json-sdk-state").result().path
print(json.dumps({
    "version": tinker.__version__,
    "losses": losses,
    "forward_loss": forward.metrics["loss:sum"],
    "forward_logprobs": logprobs,
    "samples": [{"tokens": s.tokens, "logprobs": s.logprobs} for s in sample.sequences],
    "state_path": path,
}))
