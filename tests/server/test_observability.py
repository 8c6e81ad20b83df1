"""What operators and users watch: Prometheus metrics at /metrics, each run's metrics history as
JSON, and the live status page in a real headless Chromium (a screenshot is kept)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import OPERATOR_KEY
from tests.server.raw import Raw

BASE = "twinkle-tiny"
STEPS = 6
LEARNING_RATE = 1e-3  # small enough that the loss of the repeated batch falls steadily
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


class Run:
    """A tenant's training run on the shared server: forward_backward + optim_step, STEPS times."""

    def __init__(self, server, tenant: str, seed: int) -> None:
        self.raw = Raw(server, server.keys[tenant])
        self.model_id = self.raw.create_model(seed=seed)
        self.seq = 1  # create_model took seq_id 0
        self.losses: list[float] = []

    def train(self, steps: int) -> None:
        for _ in range(steps):
            fb = self.raw.forward_backward(self.model_id, self.seq)
            step = self.raw.post("optim_step", {"model_id": self.model_id, "seq_id": self.seq + 1,
                                                "adam_params": {"learning_rate": LEARNING_RATE}})["request_id"]
            self.seq += 2
            self.losses.append(self.raw.loss(fb))
            self.raw.result(step)


@pytest.fixture(scope="module")
def alice_run(server) -> Run:
    run = Run(server, "alice", seed=71)
    run.train(STEPS)
    return run


def _get(server, path: str, key: str | None = OPERATOR_KEY, headers: dict | None = None,
         **params) -> requests.Response:
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return requests.get(f"{server.url}{path}", headers=headers, params=params, timeout=30)


def _scrape(server) -> dict:
    reply = _get(server, "/metrics")
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain; version=")
    return {family.name: family for family in text_string_to_metric_families(reply.text)}


def _value(families: dict, family: str, sample: str | None = None, **labels: str) -> float:
    """The sum of a family's samples named `sample` (default: the family's name) with these labels."""
    found = families[family]
    name = sample or found.name
    return sum(s.value for s in found.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# --------------------------------------------------------------------------------------- /metrics
def test_metrics_are_for_operators_only(server):
    refused = _get(server, "/metrics", server.keys["alice"])
    assert refused.status_code == 403, refused.text
    assert "operator key" in refused.json()["error"] and refused.json()["category"] == "user"
    assert _get(server, "/metrics", None).status_code == 401
    assert _get(server, "/metrics", "not-a-key").status_code == 401
    families = _scrape(server)
    assert families["twinkle_http_requests"].type == "counter"
    assert families["twinkle_queue_depth"].type == "gauge"
    assert families["twinkle_pass_duration_seconds"].type == "histogram"
    assert families["twinkle_queue_wait_seconds"].type == "histogram"
    assert _value(families, "twinkle_model_up", model=BASE) == 1.0
    # a Prometheus server asks for OpenMetrics, and gets it
    open_metrics = _get(server, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    parsed = {f.name: f for f in openmetrics_families(open_metrics.text)}
    assert parsed["twinkle_http_requests"].type == "counter" and open_metrics.text.endswith("# EOF\n")


def test_metrics_move_when_work_runs(server):
    before = _scrape(server)
    run = Run(server, "alice", seed=72)
    run.train(3)
    sampler = run.raw.post("asample", {"base_model": BASE, "num_samples": 2,
                                       "prompt": {"chunks": [{"type": "encoded_text", "tokens": [30, 31, 32]}]},
                                       "sampling_params": {"max_tokens": 5, "temperature": 1.0, "seed": 3}})
    sampled = run.raw.result(sampler["request_id"])
    generated = sum(len(s["tokens"]) for s in sampled["sequences"])
    assert _get(server, f"/api/v1/twinkle/runs/{run.model_id}/metrics", server.keys["alice"]).status_code == 200
    assert _get(server, "/no/such/route/42").status_code == 404
    after = _scrape(server)

    def moved(family: str, sample: str | None = None, **labels: str) -> float:
        return _value(after, family, sample, **labels) - _value(before, family, sample, **labels)

    # requests, by route template (never the raw path) and status
    assert moved("twinkle_http_requests", "twinkle_http_requests_total", route="/api/v1/forward_backward",
                 method="POST", status="200") >= 3
    assert moved("twinkle_http_requests", "twinkle_http_requests_total",
                 route="/api/v1/twinkle/runs/{model_id}/metrics", method="GET", status="200") >= 1
    assert moved("twinkle_http_requests", "twinkle_http_requests_total", route="unmatched", status="404") >= 1
    routes = {s.labels["route"] for s in after["twinkle_http_requests"].samples}
    assert not any(run.model_id in route for route in routes) and "/no/such/route/42" not in routes
    assert moved("twinkle_http_request_duration_seconds", "twinkle_http_request_duration_seconds_count",
                 route="/api/v1/optim_step") >= 3
    # the model's work: tokens, passes, queue waits
    tokens = 3 * (len(Raw.forward_body(run.model_id, 0)[1]["forward_backward_input"]["data"][0]["model_input"]
                      ["chunks"][0]["tokens"]))
    assert moved("twinkle_tokens", "twinkle_tokens_total", model=BASE, lane="train") >= tokens
    assert moved("twinkle_tokens", "twinkle_tokens_total", model=BASE, lane="sample") >= generated > 0
    assert _value(after, "twinkle_tokens_per_second", model=BASE, lane="train") > 0
    assert moved("twinkle_pass_duration_seconds", "twinkle_pass_duration_seconds_count", model=BASE, kind="pass") >= 1
    assert moved("twinkle_pass_duration_seconds", "twinkle_pass_duration_seconds_count", model=BASE, kind="ops") >= 1
    assert moved("twinkle_pass_duration_seconds", "twinkle_pass_duration_seconds_sum", model=BASE, kind="pass") > 0
    assert moved("twinkle_queue_wait_seconds", "twinkle_queue_wait_seconds_count", model=BASE) >= 7
    inf = [s for s in after["twinkle_queue_wait_seconds"].samples if s.labels.get("le") == "+Inf"]
    assert inf and inf[0].value == _value(after, "twinkle_queue_wait_seconds", "twinkle_queue_wait_seconds_count")
    assert moved("twinkle_batches", "twinkle_batches_total", model=BASE, lane="train") >= 1
    # what is held: adapters, sessions, runs, futures
    assert _value(after, "twinkle_adapters", model=BASE, state="resident") >= 1
    assert _value(after, "twinkle_workers_running", model=BASE) >= 1
    assert _value(after, "twinkle_sessions_active", tenant="alice") >= 1
    assert _value(after, "twinkle_training_runs", model=BASE, status="active") >= 1
    assert "twinkle_futures_pending" in after and "twinkle_queue_depth" in after


# -------------------------------------------------------------------------------- run metrics JSON
def test_a_runs_metrics_history_is_its_tenants_own(server, alice_run):
    path = f"/api/v1/twinkle/runs/{alice_run.model_id}/metrics"
    reply = _get(server, path, server.keys["alice"])
    assert reply.status_code == 200, reply.text
    points = reply.json()["points"]
    passes = [p for p in points if p["kind"] == "forward_backward"]
    steps = [p for p in points if p["kind"] == "step"]
    assert [p["metrics"]["loss:sum"] for p in passes] == pytest.approx(alice_run.losses)
    assert [p["step"] for p in passes] == list(range(STEPS))  # optimizer steps taken before each pass
    assert [p["step"] for p in steps] == list(range(1, STEPS + 1))
    assert all(p["tokens"] > 0 and p["seconds"] > 0 for p in passes)
    assert all("grad_norm" in p["metrics"] for p in steps)
    assert alice_run.losses[-1] < alice_run.losses[0], alice_run.losses  # it trained: the drawn curve goes down

    page = _get(server, path, server.keys["alice"], after=points[1]["point_id"], limit=2, kind="forward_backward")
    assert [p["point_id"] for p in page.json()["points"]] == [p["point_id"] for p in passes[1:3]]
    assert page.json()["next_after"] == passes[2]["point_id"]

    hidden = _get(server, path, server.keys["bob"])
    assert hidden.status_code == 404 and alice_run.model_id in hidden.json()["error"]
    bad = _get(server, path, server.keys["alice"], limit=0)
    assert bad.status_code == 400 and bad.json()["field"] == "limit"


# ----------------------------------------------------------------------------- the status page
def _browser(playwright):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make setup-browser` (installs Debian's chromium) and run again")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _sign_in(browser, server, key: str):
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(f"{server.url}/status")
    assert "sign in" in page.inner_text("#message").lower()
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_selector("#models [data-base-model]")
    return page


def test_the_status_page_in_a_headless_browser(server, alice_run, tmp_path):
    from playwright.sync_api import sync_playwright

    bob = Run(server, "bob", seed=73)
    bob.train(1)
    with sync_playwright() as playwright:
        browser = _browser(playwright)
        try:
            page = _sign_in(browser, server, server.keys["alice"])
            assert "tenant alice" in page.inner_text("#who")
            card = page.locator(f'.run[data-model-id="{alice_run.model_id}"]')
            card.wait_for()
            assert card.locator("svg.curve").get_attribute("data-points") == str(STEPS)
            line = card.locator("svg.curve polyline").get_attribute("points").split()
            heights = [float(xy.split(",")[1]) for xy in line]
            assert len(heights) == STEPS and heights[-1] > heights[0]  # the loss falls: the line goes down (SVG y)
            assert f"{alice_run.losses[-1]:.4f}" in card.inner_text()
            assert BASE in page.inner_text("#models") and "resident" in page.inner_text("#models")
            assert alice_run.raw.session_id in page.inner_text("#sessions")
            assert bob.model_id not in page.content() and bob.raw.session_id not in page.content()
            assert page.locator("#tenants-section").is_hidden()

            # it refreshes by itself: more training shows up without a reload
            renders = int(page.get_attribute("body", "data-renders"))
            alice_run.train(1)
            page.wait_for_function(
                f'document.querySelector(\'.run[data-model-id="{alice_run.model_id}"] svg.curve\')'
                f'.getAttribute("data-points") === "{STEPS + 1}"', timeout=20_000)
            assert int(page.get_attribute("body", "data-renders")) > renders
            screenshot = tmp_path / "status-alice.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000
            ARTIFACTS.mkdir(exist_ok=True)
            kept = ARTIFACTS / "status-alice.png"
            shutil.copyfile(screenshot, kept)
            print(f"\nstatus page screenshot: {screenshot} (copied to {kept})")

            bobs = _sign_in(browser, server, server.keys["bob"])
            bobs.locator(f'.run[data-model-id="{bob.model_id}"]').wait_for()
            assert alice_run.model_id not in bobs.content() and alice_run.raw.session_id not in bobs.content()

            ops = _sign_in(browser, server, OPERATOR_KEY)
            ops.locator(f'.run[data-model-id="{alice_run.model_id}"]').wait_for()
            assert bob.model_id in ops.content() and "operator view" in ops.inner_text("#who")
            assert {"alice", "bob"} <= set(ops.locator("#tenants td:first-child").all_inner_texts())
            ops.screenshot(path=str(tmp_path / "status-operator.png"), full_page=True)
            shutil.copyfile(tmp_path / "status-operator.png", ARTIFACTS / "status-operator.png")
        finally:
            browser.close()


def test_the_status_page_refuses_bad_keys_and_keeps_the_key_out_of_scripts(server):
    page = requests.get(f"{server.url}/status", timeout=30)
    assert page.status_code == 401 and 'action="/status/login"' in page.text
    wrong = requests.post(f"{server.url}/status/login", data={"key": "nope"}, timeout=30, allow_redirects=False)
    assert wrong.status_code == 401 and "not valid" in wrong.text
    good = requests.post(f"{server.url}/status/login", data={"key": server.keys["alice"]}, timeout=30,
                         allow_redirects=False)
    assert good.status_code == 303 and good.headers["location"] == "/status"
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/status" in cookie
    data = requests.get(f"{server.url}/status/data", cookies=good.cookies, timeout=30)
    assert data.status_code == 200 and data.json()["viewer"] == {"name": "alice", "operator": False}
    assert requests.get(f"{server.url}/status/data", timeout=30).status_code == 401
    # a key sent as a header works too, and the page's refreshes reuse it through the cookie
    direct = _get(server, "/status", server.keys["bob"])
    assert direct.status_code == 200 and "twinkle_status_key" in direct.headers["set-cookie"]
    assert server.keys["bob"] not in direct.text


class _Keys:
    """The part of the server context the viewer check reads: the key ring, and the tenant lookup."""

    def __init__(self, keys: dict, admin: dict) -> None:
        from twinkle.http.auth import KeyRing

        self.keys = KeyRing(keys, admin)

    def tenant_for(self, headers) -> str:
        return self.keys.tenant_for(headers)


def test_who_sees_what_on_the_status_page():
    from twinkle.errors import AuthenticationError
    from twinkle.http.observe import Viewer, viewer_for

    keyed = _Keys({"alice": "ka", "bob": "kb"}, {"ops": "ko"})
    assert viewer_for(keyed, "ka") == Viewer("alice", operator=False)
    assert viewer_for(keyed, "ko") == Viewer("ops", operator=True)
    assert viewer_for(keyed, "ko").tenant is None and viewer_for(keyed, "kb").tenant == "bob"
    for key in (None, "wrong"):
        with pytest.raises(AuthenticationError):
            viewer_for(keyed, key)
    open_server = _Keys({}, {})  # an open loopback server: the page shows everything
    assert viewer_for(open_server, None).operator
    open_with_operators = _Keys({}, {"ops": "ko"})  # operators hold a key; everyone else is the open tenant
    assert viewer_for(open_with_operators, None) == Viewer("default", operator=False)
    assert viewer_for(open_with_operators, "ko").operator
