"""One real Twinkle server (the `twinkle serve` CLI in a subprocess) shared by the server tests."""

from __future__ import annotations

import pytest

from tests.server.sdk_sessions import end_sdk_session
from twinkle.devserver import DevServer, start_dev_server

KEYS = {"alice": "tml-alice-key", "bob": "tml-bob-key", "quota": "tml-quota-key", "slow": "tml-slow-key"}
TEST_TIMEOUTS = {"timeouts": {"seq_gap_s": 3.0, "sweep_interval_s": 1.0}}
# a tenant with small quotas on the shared server (test_multi_tenant_server checks the 429s)
QUOTA_TENANT = {"max_models": 2, "max_tokens_per_request": 256, "max_queued_requests": 3, "max_checkpoints": 1}
OPERATOR_KEY = "ops-operator-key"
# alice and bob create models across the whole suite: their model quota is not what these tests are about
SLOW_TENANT = {"max_requests_per_s": 2.0}
SHARED_CONFIG = {**TEST_TIMEOUTS, "quotas": {"default": {"max_models": 1000},
                                             "tenants": {"quota": QUOTA_TENANT, "slow": SLOW_TENANT}},
                 "auth": {"admin_keys": {"ops": OPERATOR_KEY}}}

ServerHandle = DevServer  # what the fixtures yield: url, keys, state_dir, log_tail(), stop()


def start_twinkle_server(tmp_dir, *, extra_config: dict | None = None, keys: dict | None = None) -> DevServer:
    config = {**TEST_TIMEOUTS, **(extra_config or {})}
    return start_dev_server(tmp_dir, config=config, keys=KEYS if keys is None else keys)


def stop_twinkle_server(handle: DevServer) -> int:
    return handle.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> DevServer:
    """A server with tenants alice, bob (and quota, with small quotas) serving twinkle-tiny; client code
    not trusted."""
    handle = start_twinkle_server(tmp_path_factory.mktemp("server"), extra_config=SHARED_CONFIG)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def service(server):
    """One alice ServiceClient (one session) shared by the tests of a module."""
    import tinker

    client = tinker.ServiceClient(base_url=server.url, api_key=server.keys["alice"])
    yield client
    end_sdk_session(client)


@pytest.fixture
def sdk_sessions():
    """Factory: an unmodified Tinker SDK ServiceClient for (url, key), its session ended at teardown."""
    import tinker

    made = []

    def make(url: str, api_key: str):
        made.append(tinker.ServiceClient(base_url=url, api_key=api_key))
        return made[-1]

    yield make
    for service in made:
        end_sdk_session(service)


@pytest.fixture
def tinker_client(server, sdk_sessions):
    """Factory: an unmodified Tinker SDK ServiceClient for a tenant of the shared server."""
    return lambda tenant="alice": sdk_sessions(server.url, server.keys[tenant])
