"""How the remote backend reaches a server: HTTP (requests + retries) or a Ray-client handle.

A transport has one method, `request(op, payload) -> dict`, for the operations: session,
heartbeat, finish, submit, retrieve, tokenizer. Retrying a submit is safe because every mutating
call carries a sequence id the server de-duplicates.
"""

from __future__ import annotations

import time
from typing import Protocol

from twinkle import wire
from twinkle.errors import ServerUnavailableError, TwinkleError, error_from_dict

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class Transport(Protocol):
    def request(self, op: str, payload: dict, *, timeout: float | None = None) -> dict: ...
    def close(self) -> None: ...


class _Retryable(Exception):
    pass


class HttpTransport:
    """msgpack over HTTP; connection errors and 5xx are retried with backoff for up to
    `retry_timeout_s`, after which `ServerUnavailableError` says the server is unreachable."""

    def __init__(self, base_url: str, api_key: str | None, *, retry_timeout_s: float = 60.0,
                 connect_timeout_s: float = 5.0) -> None:
        import requests

        self.base_url = base_url.rstrip("/")
        self.retry_timeout_s = retry_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._http = requests.Session()
        self._http.headers["Content-Type"] = wire.CONTENT_TYPE
        if api_key:
            self._http.headers["Authorization"] = f"Bearer {api_key}"

    def _path(self, op: str, payload: dict) -> str:
        if op == "submit":
            return f"/api/v1/twinkle/{payload['method']}"
        if op in ("heartbeat", "finish"):
            return f"/api/v1/twinkle/session/{payload['session_id']}/{op}"
        if op == "tokenizer":
            return f"/api/v1/twinkle/tokenizer/{payload['base_model']}"
        return f"/api/v1/twinkle/{op}"

    def _once(self, op: str, payload: dict, timeout: float | None):
        import requests

        url = self.base_url + self._path(op, payload)
        read_timeout = (timeout or 0) + 30.0
        try:
            if op == "tokenizer":
                reply = self._http.get(url, timeout=(self.connect_timeout_s, read_timeout))
            else:
                body = {k: v for k, v in payload.items() if k != "method"}
                reply = self._http.post(url, data=wire.dumps(body), timeout=(self.connect_timeout_s, read_timeout))
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        if reply.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {reply.status_code}: {reply.text[:200]}")
        if reply.status_code >= 400:
            try:
                detail = reply.json()
            except ValueError:
                detail = {"error": reply.text[:500] or f"HTTP {reply.status_code}"}
            raise error_from_dict(detail, reply.status_code)
        if reply.headers.get("content-type", "").startswith("application/json"):
            return reply.json()
        return wire.loads(reply.content)

    def request(self, op: str, payload: dict, *, timeout: float | None = None) -> dict:
        from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

        retrying = Retrying(retry=retry_if_exception_type(_Retryable), stop=stop_after_delay(self.retry_timeout_s),
                            wait=wait_exponential(multiplier=0.2, max=5.0), reraise=False)
        try:
            for attempt in retrying:
                with attempt:
                    return self._once(op, payload, timeout)
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            raise ServerUnavailableError(
                f"could not reach the Twinkle server at {self.base_url} for {self.retry_timeout_s:.0f}s "
                f"({cause}); check that it is running and the URL is right") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.close()


class RayTransport:
    """Calls the server's ingress deployment through Ray (ray:// client or inside the cluster)."""

    def __init__(self, address: str, api_key: str | None, *, app_name: str = "twinkle",
                 namespace: str = "twinkle") -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            from twinkle.actors.runtime import connect_ray  # plain Ray helpers, no torch

            connect_ray(address, namespace=namespace, log_to_driver=False)
        self._handle = serve.get_app_handle(app_name)
        self._api_key = api_key

    def request(self, op: str, payload: dict, *, timeout: float | None = None) -> dict:
        started = time.time()
        try:
            raw = self._handle.ray_client_call.remote(self._api_key, op, wire.dumps(payload)).result()
        except TwinkleError:
            raise
        except Exception as exc:
            raise ServerUnavailableError(f"the Twinkle server's Ray deployment failed after "
                                         f"{time.time() - started:.1f}s: {type(exc).__name__}: {exc}") from None
        reply = wire.loads(raw)
        if "error" in reply:
            raise error_from_dict(reply["error"], reply["error"].get("status_code"))
        return reply["ok"]

    def close(self) -> None:
        pass
