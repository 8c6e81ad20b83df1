"""`twinkle.init`: the one place that chooses where Twinkle's API runs for this process.

It composes the registry (`api.context`), local mode (`api.local`) and the clients
(`client.connect`); none of those import each other's modes.
"""

from __future__ import annotations

import os

from twinkle.api import context


def init(mode: str = "local", *, state_dir: str | os.PathLike | None = None, address: str | None = None,
         num_workers: int = 1, engine_options: dict | None = None, allow_custom_loss: bool = True,
         api_key: str | None = None):
    """Choose where Twinkle's API runs for this process.

    mode="local": backends in this process. mode="ray": backends in Ray actors, one group of
    `num_workers` data-parallel ranks per base model, on an embedded Ray or the cluster at `address`.
    If that cluster runs a Twinkle server (address="ray://HOST:10001", or "auto" inside the cluster),
    calls go to the server's models through Ray instead of HTTP, as tenant `api_key`.
    `engine_options` are `BackendConfig` fields (dtype, device, max_lora_rank, ...).
    """
    if mode not in ("local", "ray"):
        raise ValueError(f"unknown mode {mode!r}; use 'local' or 'ray'")
    context.shutdown()
    if mode == "ray" and address and _twinkle_server_on(address):
        from twinkle.client.connect import init_ray_client

        return init_ray_client(address, api_key)  # Ray-client mode: the server's models, without HTTP
    from twinkle.api.local import LocalBackend

    backend = LocalBackend(state_dir, use_ray=mode == "ray", ray_address=address, num_workers=num_workers,
                           engine_options=engine_options, allow_custom_loss=allow_custom_loss)
    context.set_backend(backend)
    return backend


def _twinkle_server_on(address: str) -> bool:
    """Does the Ray cluster at `address` run a Twinkle server (its Serve application)?"""
    from twinkle.actors.runtime import init_ray

    init_ray(address)
    try:
        from ray import serve

        serve.get_app_handle("twinkle")
        return True
    except Exception:
        return False


shutdown = context.shutdown
