"""`GET /metrics`: Prometheus metrics for operators (an operator key when keys are configured).

Two sources, one exposition:
- HTTP requests are counted in this ingress replica by an ASGI middleware, labelled by route
  template (never the raw path: ids would explode the series), method and status code. Each replica
  counts its own requests.
- Models, queues, adapters, sessions and futures are read at scrape time from the schedulers' stats
  and the store (one aggregate query, off the event loop) by a collector built for that scrape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from twinkle.http.common import context
from twinkle.http.observe import model_stats

router = APIRouter()
UNMATCHED = "unmatched"  # the route label of requests no route matched (their raw path is not a label)


class HttpMetrics:
    """This replica's HTTP figures, in a registry of our own (not the process-global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("twinkle_http_requests", "HTTP requests answered, by route template, method and "
                                "status code", ["route", "method", "status"], registry=self.registry)
        self.duration = Histogram("twinkle_http_request_duration_seconds", "Time to answer an HTTP request (a long "
                                  "poll counts its wait)", ["route", "method"], registry=self.registry,
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                           30, 60))
        self.in_flight = Gauge("twinkle_http_requests_in_flight", "HTTP requests being answered now",
                               registry=self.registry)


class MetricsMiddleware:
    """Counts every HTTP request once it is answered (pure ASGI: streaming bodies pass untouched)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            method = scope.get("method", "")
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.duration.labels(route, method).observe(time.perf_counter() - started)


def install(app: FastAPI) -> None:
    """Count the app's requests and serve `/metrics`."""
    app.state.http_metrics = HttpMetrics()
    app.add_middleware(MetricsMiddleware, metrics=app.state.http_metrics)
    app.include_router(router)


class ClusterCollector:
    """The models' and the store's figures at one scrape (a prometheus_client custom collector)."""

    def __init__(self, stats: dict[str, dict | None], summary: dict) -> None:
        self.stats = stats
        self.summary = summary

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("twinkle_model_up", "1 when the model's scheduler answered this scrape",
                               labels=["model"])
        workers = GaugeMetricFamily("twinkle_workers_running", "Worker ranks running for the model (0: released "
                                    "while idle)", labels=["model"])
        depth = GaugeMetricFamily("twinkle_queue_depth", "Requests released to a lane and not yet run",
                                  labels=["model", "lane"])
        queued = GaugeMetricFamily("twinkle_tenant_queued_requests", "Requests a tenant has accepted and not yet "
                                   "resolved", labels=["model", "tenant"])
        wait = HistogramMetricFamily("twinkle_queue_wait_seconds", "Time from a request's acceptance to the start "
                                     "of the batch that runs it", labels=["model"])
        passes = HistogramMetricFamily("twinkle_pass_duration_seconds", "Time a batch takes to run: kind=pass is a "
                                       "shared forward(/backward) pass, ops the steps and saves between passes, "
                                       "sample a sampling batch", labels=["model", "kind"])
        tokens = CounterMetricFamily("twinkle_tokens", "Tokens processed: lane=train counts forward(/backward) input "
                                     "tokens, lane=sample generated tokens", labels=["model", "lane"])
        rate = GaugeMetricFamily("twinkle_tokens_per_second", "Tokens per second over the last minute",
                                 labels=["model", "lane"])
        batches = CounterMetricFamily("twinkle_batches", "Batches run: shared train passes and sampling batches",
                                      labels=["model", "lane"])
        shared = CounterMetricFamily("twinkle_shared_train_passes", "Train passes that held more than one model",
                                     labels=["model"])
        moves = CounterMetricFamily("twinkle_adapter_moves", "Adapters offloaded from or restored to the workers",
                                    labels=["model", "direction"])
        losses = CounterMetricFamily("twinkle_worker_losses", "Worker groups lost and replaced", labels=["model"])
        adapters = GaugeMetricFamily("twinkle_adapters", "Training adapters by where they are: resident on the "
                                     "workers or offloaded to disk", labels=["model", "state"])
        for model, view in sorted(self.stats.items()):
            up.add_metric([model], 0.0 if view is None else 1.0)
            if view is None:
                continue
            workers.add_metric([model], float(view["workers"]["configured"] if view["running"] else 0))
            for lane, count in view.get("queued_by_lane", {}).items():
                depth.add_metric([model, lane], float(count))
            for tenant, count in sorted(view.get("queued_by_tenant", {}).items()):
                queued.add_metric([model, tenant], float(count))
            telemetry = view.get("telemetry") or {}
            if "queue_wait_seconds" in telemetry:
                _histogram(wait, [model], telemetry["queue_wait_seconds"])
            for kind, snapshot in sorted(telemetry.get("batch_seconds", {}).items()):
                _histogram(passes, [model, kind], snapshot)
            for lane, total in telemetry.get("tokens_total", {}).items():
                tokens.add_metric([model, lane], float(total))
            for lane, value in view.get("tokens_per_s", {}).items():
                rate.add_metric([model, lane], float(value))
            batches.add_metric([model, "train"], float(view["train_passes"]))
            batches.add_metric([model, "sample"], float(view["sample_batches"]))
            shared.add_metric([model], float(view["shared_train_passes"]))
            moves.add_metric([model, "offload"], float(view["offloads"]))
            moves.add_metric([model, "restore"], float(view["restores"]))
            losses.add_metric([model], float(view["worker_losses"]))
            adapters.add_metric([model, "resident"], float(view["resident"]))
        offloaded = {base: n for base, status, n in self.summary.get("models", []) if status == "offloaded"}
        for model in sorted(self.stats):
            adapters.add_metric([model, "offloaded"], float(offloaded.get(model, 0)))
        yield from (up, workers, depth, queued, wait, passes, tokens, rate, batches, shared, moves, losses, adapters)
        yield from self._store_families()

    def _store_families(self) -> Iterable[Metric]:
        sessions = GaugeMetricFamily("twinkle_sessions_active", "Sessions whose client is alive (heartbeating)",
                                     labels=["tenant"])
        for tenant, count in sorted(self.summary.get("sessions_active", {}).items()):
            sessions.add_metric([tenant], float(count))
        runs = GaugeMetricFamily("twinkle_training_runs", "Training models by status (active, offloaded, unloaded)",
                                 labels=["model", "status"])
        for base, status, count in sorted(self.summary.get("models", [])):
            runs.add_metric([base, status], float(count))
        pending = GaugeMetricFamily("twinkle_futures_pending", "Futures (requests) accepted and not yet finished",
                                    labels=["model"])
        for base, count in sorted(self.summary.get("futures_pending", {}).items()):
            pending.add_metric([base], float(count))
        return sessions, runs, pending


def _histogram(family: HistogramMetricFamily, labels: list[str], snapshot: dict) -> None:
    buckets = [(repr(float(bound)), float(count)) for bound, count in snapshot["buckets"]]
    family.add_metric(labels, [*buckets, ("+Inf", float(snapshot["count"]))], float(snapshot["sum"]))


class _Scrape:
    """One scrape's metrics: this replica's HTTP registry, then the cluster's collector."""

    def __init__(self, *collectors) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus exposition: the text format, or OpenMetrics when the scraper's Accept asks for it
    (an operator key is needed when keys are configured)."""
    ctx = context(request)
    await ctx.ensure_started()
    ctx.keys.operator_for(request.headers)
    stats = await model_stats(ctx)
    summary = await ctx.db(ctx.store.gauge_summary)
    scrape = _Scrape(request.app.state.http_metrics.registry, ClusterCollector(stats, summary))
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    body = await asyncio.to_thread(encode, scrape)
    return Response(body, headers={"Content-Type": content_type})
