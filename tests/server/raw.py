"""A minimal JSON client speaking the Tinker wire protocol (the 0.24 JSON forms), for tests that
need control the SDK does not give: chosen seq_ids, retries, out-of-order sends."""

from __future__ import annotations

import requests

TOKENS = list(range(30, 62))


class Raw:
    """A minimal JSON client speaking the Tinker wire protocol (the 0.24 JSON forms)."""

    def __init__(self, server, key: str) -> None:
        self.url = server.url + "/api/v1"
        self.http = requests.Session()
        self.http.headers["X-API-Key"] = key
        self.session_id = self.post("create_session", {})["session_id"]
        self.models = 0

    def post(self, route: str, body: dict, expect: int = 200) -> dict:
        reply = self.http.post(f"{self.url}/{route}", json=body, timeout=60)
        assert reply.status_code == expect, reply.text
        return reply.json()

    def result(self, request_id: str) -> dict:
        while True:
            out = self.post("retrieve_future", {"request_id": request_id})
            if out.get("type") != "try_again":
                assert "error" not in out, out
                return out

    def create_model(self, seed: int = 5) -> str:
        future = self.post("create_model", {"session_id": self.session_id, "model_seq_id": self.models,
                                            "base_model": "twinkle-tiny", "lora_config": {"rank": 4, "seed": seed}})
        self.models += 1
        return self.result(future["request_id"])["model_id"]

    def forward_backward(self, model_id: str, seq_id: int, forward_only: bool = False, tokens=TOKENS,
                         copies: int = 1) -> str:
        route, body = self.forward_body(model_id, seq_id, forward_only, tokens, copies)
        return self.post(route, body)["request_id"]

    @staticmethod
    def forward_body(model_id: str, seq_id: int, forward_only: bool = False, tokens=TOKENS,
                     copies: int = 1) -> tuple[str, dict]:
        """The route and JSON body of a cross-entropy forward(_backward) on `copies` of one sequence."""
        key = "forward_input" if forward_only else "forward_backward_input"
        datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": list(tokens[:-1])}]},
                 "loss_fn_inputs": {"target_tokens": {"data": list(tokens[1:]), "dtype": "int64"},
                                    "weights": {"data": [1.0] * (len(tokens) - 1), "dtype": "float32"}}}
        route = "forward" if forward_only else "forward_backward"
        return route, {key: {"data": [datum] * copies, "loss_fn": "cross_entropy"}, "model_id": model_id,
                       "seq_id": seq_id}

    def optim_step(self, model_id: str, seq_id: int) -> str:
        return self.post("optim_step", {"model_id": model_id, "seq_id": seq_id,
                                        "adam_params": {"learning_rate": 0.01}})["request_id"]

    def loss(self, request_id: str) -> float:
        return self.result(request_id)["metrics"]["loss:sum"]
