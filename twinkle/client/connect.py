"""Connecting Twinkle's API to a server: `init_twinkle_client` (HTTP) and `init_ray_client`."""

from __future__ import annotations

import os

from twinkle.api import context
from twinkle.client.backend import RemoteBackend
from twinkle.client.transports import HttpTransport, RayTransport

SERVER_URL_ENV = "TWINKLE_SERVER_URL"
API_KEY_ENV = "TWINKLE_API_KEY"


def init_twinkle_client(base_url: str | None = None, api_key: str | None = None, *,
                        retry_timeout_s: float = 60.0, heartbeat_s: float = 10.0) -> RemoteBackend:
    """Open a session on a Twinkle server and make it the default for TrainingModel and Sampler.

    `base_url` and `api_key` fall back to $TWINKLE_SERVER_URL and $TWINKLE_API_KEY. A server that
    stays unreachable for `retry_timeout_s` raises `twinkle.errors.ServerUnavailableError`.
    """
    base_url = base_url or os.environ.get(SERVER_URL_ENV)
    if not base_url:
        raise ValueError(f"give base_url or set {SERVER_URL_ENV}, e.g. http://127.0.0.1:8000")
    api_key = api_key or os.environ.get(API_KEY_ENV)
    backend = RemoteBackend(HttpTransport(base_url, api_key, retry_timeout_s=retry_timeout_s),
                            heartbeat_s=heartbeat_s)
    context.set_backend(backend)
    return backend


def init_ray_client(address: str, api_key: str | None = None) -> RemoteBackend:
    """Use a running Twinkle server through Ray (`ray://HOST:10001`, or "auto" inside its cluster)."""
    backend = RemoteBackend(RayTransport(address, api_key or os.environ.get(API_KEY_ENV)))
    context.set_backend(backend)
    return backend


def current_backend():
    """The remote backend in use, connecting from the environment on first use."""
    backend = context.peek_backend()
    if isinstance(backend, RemoteBackend):
        return backend
    return init_twinkle_client()
