"""Shared fixtures: one state dir (with the built-in models built once) for the whole session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory) -> str:
    """A state dir shared by the session; built-in models are generated into it once."""
    path = tmp_path_factory.mktemp("twinkle-state")
    os.environ["TWINKLE_STATE_DIR"] = str(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_path(state_dir) -> str:
    from twinkle.modeling import resolve_model_path

    return resolve_model_path("twinkle-tiny", state_dir)


@pytest.fixture
def make_engine(state_dir):
    """Factory for fresh in-process backends on twinkle-tiny (or another model), driven one request at a time."""
    from tests.core.solo import Solo
    from twinkle.backends import BackendConfig, make_training_backend

    def factory(base_model: str = "twinkle-tiny", **overrides):
        return Solo(make_training_backend(BackendConfig(base_model=base_model, state_dir=state_dir, **overrides)))

    return factory


@pytest.fixture(scope="session")
def local_ray():
    """One embedded Ray for the session, in a private short temp dir under /tmp (removed at the end)."""
    import shutil
    import tempfile

    import ray

    from twinkle.actors import init_ray

    temp_dir = tempfile.mkdtemp(prefix="tw-ray-", dir="/tmp")
    started = not ray.is_initialized()
    init_ray(temp_dir=temp_dir)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
