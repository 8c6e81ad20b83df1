"""The Tinker wire protocol spoken with plain `requests`, for benchmarks that hold thousands of
sessions: an SDK ServiceClient per session (threads, heartbeats) would cost more than the server.

Only the few routes the benchmarks need, with JSON bodies as the SDK (<= 0.24) sends them.
"""

from __future__ import annotations

import threading
import time

import requests

from twinkle.types import Datum

API = "/api/v1"
POLL_TIMEOUT_S = 120.0  # a result still pending after this long is a failure of the benchmark
TRY_AGAIN = "try_again"


class TinkerError(RuntimeError):
    """A request the server refused or failed."""


class TinkerHttp:
    """One tenant's connection; safe to share between threads (one HTTP session per thread)."""

    def __init__(self, url: str, api_key: str) -> None:
        self.url = url.rstrip("/")
        self.headers = {"X-API-Key": api_key}
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update(self.headers)
        return session

    def post(self, route: str, body: dict) -> dict:
        reply = self._session().post(f"{self.url}{API}/{route}", json=body, timeout=60)
        payload = reply.json()
        if reply.status_code >= 400 or (isinstance(payload, dict) and "error" in payload):
            raise TinkerError(f"{route}: HTTP {reply.status_code}: {payload}")
        return payload

    def status(self) -> dict:
        """Twinkle's per-model batching and residency figures (GET /api/v1/twinkle/status)."""
        reply = self._session().get(f"{self.url}{API}/twinkle/status", timeout=60)
        reply.raise_for_status()
        return reply.json()["models"]

    # ------------------------------------------------------------ routes
    def create_session(self) -> str:
        return self.post("create_session", {"tags": ["bench"]})["session_id"]

    def create_model(self, session_id: str, base_model: str, *, rank: int, seed: int,
                     model_seq_id: int = 0) -> tuple[str, str]:
        """Submit create_model; returns (request id of its future, model id)."""
        body = {"session_id": session_id, "model_seq_id": model_seq_id, "base_model": base_model,
                "lora_config": {"rank": rank, "seed": seed}}
        reply = self.post("create_model", body)
        return reply["request_id"], reply["model_id"]

    def forward(self, model_id: str, seq_id: int, data: list[Datum], *, backward: bool) -> str:
        """Submit forward (backward=False) or forward_backward with cross-entropy; returns the request id."""
        key, route = ("forward_backward_input", "forward_backward") if backward else ("forward_input", "forward")
        body = {"model_id": model_id, "seq_id": seq_id, key: {"data": [_datum(d) for d in data],
                                                              "loss_fn": "cross_entropy"}}
        return self.post(route, body)["request_id"]

    def result(self, request_id: str, timeout_s: float = POLL_TIMEOUT_S) -> dict:
        """Long-poll a future until its result is in (the server answers the moment it is)."""
        deadline = time.monotonic() + timeout_s
        while True:
            payload = self.post("retrieve_future", {"request_id": request_id})
            if payload.get("type") != TRY_AGAIN:
                return payload
            if time.monotonic() > deadline:
                raise TinkerError(f"{request_id} still pending after {timeout_s:.0f}s")


def _datum(datum: Datum) -> dict:
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": datum.input_tokens.tolist()}]},
            "loss_fn_inputs": {k: {"data": v.reshape(-1).tolist(), "dtype": _dtype(v), "shape": list(v.shape)}
                               for k, v in datum.loss_inputs.items()}}


def _dtype(array) -> str:
    return "int64" if array.dtype.kind in "iu" else "float32"
