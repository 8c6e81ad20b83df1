"""Twinkle's API against a remote server: the same classes as local mode, over HTTP or Ray client.

Thin-client safe: imports neither torch nor the server; only the Ray transport imports ray.
"""

from twinkle.client.backend import RemoteBackend
from twinkle.client.connect import current_backend, init_ray_client, init_twinkle_client

__all__ = ["RemoteBackend", "current_backend", "init_ray_client", "init_twinkle_client"]
