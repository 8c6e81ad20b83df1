"""Twinkle serverless on Modal: one GPU container serving Twinkle's ASGI app, scaled to zero.

    modal deploy clusters/modal_app.py        (needs a Modal token; importing this file does not)

What runs: one container with one GPU starts an embedded Ray inside itself (no Ray cluster; Modal's
`@modal.clustered` does not support web functions), the model's scheduler and worker actors in it,
and serves Twinkle's FastAPI app directly (no Ray Serve proxy). Checkpoints, offloaded adapters,
the SQLite store and the Hugging Face cache live on the Modal Volume `twinkle-state`, mounted at
/state.

Scale to zero: with no request for `scaledown_window` seconds the container stops (min_containers=0);
the next request cold-starts one: container start, Ray start and the model load, tens of seconds
for a 8B model from the volume's HF cache (much longer the first time, when it is downloaded). A
restart keeps what is on the volume: saved checkpoints, sessions' records, and every training
model's autosaved or offloaded state (restored on its next request); it loses in-flight requests
(their futures answer "the server restarted, send it again") and training steps taken since the
model's last autosave (`timeouts.autosave_s`). Volume writes are committed when the container stops
and every `COMMIT_EVERY_S` seconds. max_containers=1: the store is one SQLite file, so one container
serves at a time.

API keys: a Modal Secret `twinkle-keys` holding TWINKLE_API_KEYS="alice:KEY1,bob:KEY2".
"""

from __future__ import annotations

import os
from pathlib import Path

import modal

REPO = Path(__file__).resolve().parents[1]
STATE = "/state"
MODEL = os.environ.get("TWINKLE_MODAL_MODEL", "Qwen/Qwen3-8B")
GPU = os.environ.get("TWINKLE_MODAL_GPU", "A100-80GB")
SCALEDOWN_WINDOW_S = 600
COMMIT_EVERY_S = 60.0

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("torch==2.13.0", "ray[serve]==2.60.0")
    .add_local_dir(str(REPO), "/opt/twinkle", copy=True,
                   ignore=["**/.venv*", "**/.git", "**/twinkle_state", "**/__pycache__", "outputs", "bench/results"])
    .run_commands("pip install -e '/opt/twinkle[server]'")
    .env({"HF_HOME": f"{STATE}/hf", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
)
volume = modal.Volume.from_name("twinkle-state", create_if_missing=True)
app = modal.App("twinkle", image=image)


def server_config() -> dict:
    """The Twinkle server config inside the container: one GPU worker, state on the volume."""
    return {"host": "0.0.0.0", "state_dir": f"{STATE}/twinkle",
            "models": [{"name": MODEL, "gpus_per_worker": 1, "dtype": "bfloat16"}]}


def build_asgi(config_data: dict):
    """Start an embedded Ray and the models' schedulers, then hand back Twinkle's FastAPI app."""
    import ray

    from twinkle.actors.runtime import init_ray
    from twinkle.actors.scheduler import spawn_scheduler
    from twinkle.config import ServerConfig
    from twinkle.http.app import app as fastapi_app
    from twinkle.http.common import install_context
    from twinkle.http.context import ServerContext
    from twinkle.store import Store

    config = ServerConfig.model_validate(config_data)
    config.check_secure()
    Path(config.state_dir).mkdir(parents=True, exist_ok=True)
    Store(Path(config.state_dir) / "twinkle.db")
    init_ray(None, namespace=config.ray.namespace)
    handles = [spawn_scheduler(model, config.state_dir, config.timeouts, trust_remote_code=config.trust_remote_code,
                               namespace=config.ray.namespace, quotas=config.quotas) for model in config.models]
    ray.get([handle.start.remote() for handle in handles])
    install_context(ServerContext(config))
    return fastapi_app


def _commit_periodically() -> None:
    import threading

    def loop() -> None:
        while True:
            threading.Event().wait(COMMIT_EVERY_S)
            try:
                volume.commit()
            except Exception:  # noqa: BLE001 - the next commit (or the stop) catches up
                pass

    threading.Thread(target=loop, daemon=True, name="volume-commit").start()


# scale to zero: no warm container is kept; one stops after SCALEDOWN_WINDOW_S without requests
FUNCTION_OPTIONS = dict(gpu=GPU, volumes={STATE: volume}, min_containers=0, max_containers=1,
                        scaledown_window=SCALEDOWN_WINDOW_S, timeout=24 * 3600,
                        secrets=[modal.Secret.from_name("twinkle-keys")])


@app.function(**FUNCTION_OPTIONS)
@modal.concurrent(max_inputs=256)
@modal.asgi_app()
def web():
    """Twinkle's HTTP API (Tinker SDK and Twinkle client) at this function's URL."""
    _commit_periodically()
    return build_asgi(server_config())
