"""The store's per-run metrics history (what the status page draws) and the scheduler's telemetry."""

from __future__ import annotations

from twinkle.actors.bookkeeping import history_point
from twinkle.actors.telemetry import Histogram, Throughput
from twinkle.actors.work import WorkItem
from twinkle.http.curves import CurveCache
from twinkle.store import Store
from twinkle.store.history import bucket_curve
from twinkle.types import StepResult


def _fb(model_id: str, tenant: str, step: int, loss: float, tokens: int = 31) -> dict:
    return {"model_id": model_id, "tenant": tenant, "base_model": "tiny", "kind": "forward_backward", "step": step,
            "tokens": tokens, "seconds": 0.01, "metrics": {"loss:sum": loss}}


def test_points_come_back_in_order_for_their_tenant_only(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.add_run_points([_fb("m1", "alice", i, 10.0 - i) for i in range(5)])
    store.add_run_points([{"model_id": "m1", "tenant": "alice", "kind": "step", "step": 5, "seconds": 0.02,
                           "metrics": {"grad_norm": 1.5, "learning_rate": 0.01, "step": 5.0}}])
    points = store.run_points("m1", "alice")
    assert [p["kind"] for p in points] == ["forward_backward"] * 5 + ["step"]
    assert [p["metrics"].get("loss:sum") for p in points[:5]] == [10.0, 9.0, 8.0, 7.0, 6.0]
    assert points[-1]["step"] == 5 and points[-1]["metrics"]["grad_norm"] == 1.5
    assert store.run_points("m1", "bob") == []  # another tenant's run has no points for it
    assert len(store.run_points("m1", None)) == 6  # the operator's view
    later = store.run_points("m1", "alice", after=points[2]["point_id"])
    assert [p["point_id"] for p in later] == [p["point_id"] for p in points[3:]]
    assert [p["kind"] for p in store.run_points("m1", "alice", kind="step")] == ["step"]
    totals = store.run_totals(["m1", "none"])
    assert totals["m1"] == {**totals["m1"], "points": 6, "step": 5, "tokens": 5 * 31, "last_loss": 6.0}
    assert totals["none"]["points"] == 0 and totals["none"]["last_loss"] is None


def test_each_model_keeps_only_its_newest_points(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.history_keep = 50
    for i in range(120):
        store.add_run_points([_fb("busy", "alice", i, float(i)), *([_fb("quiet", "bob", i, 1.0)] if i < 10 else [])])
    busy = store.run_points("busy", None)
    assert len(busy) == 50 and busy[0]["step"] == 70 and busy[-1]["step"] == 119  # the newest 50, in order
    assert len(store.run_points("quiet", None)) == 10  # another model's points are untouched


def test_the_loss_curve_is_averaged_into_at_most_the_points_asked_for(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.add_run_points([_fb("m", "alice", i // 2, float(i)) for i in range(1000)])
    points = store.loss_points("m")
    assert len(points) == 1000 and points[3][1:] == (1, 3.0)
    assert [p[2] for p in store.loss_points("m", after=points[-3][0])] == [998.0, 999.0]
    curve = bucket_curve([(step, loss) for _, step, loss in points], 100)
    assert len(curve) == 100
    passes = [c[0] for c in curve]
    assert passes == sorted(passes) and passes[-1] == 1000  # the last bucket ends at the last pass
    assert curve[0][2] == sum(range(10)) / 10  # the first ten passes averaged
    assert curve[-1][1] == 499  # the step of the newest pass in the bucket
    assert bucket_curve([(0, 5.0), (1, 4.0)], 200) == [[1, 0, 5.0], [2, 1, 4.0]]
    assert bucket_curve([], 200) == []


def test_the_curve_cache_reads_only_new_points(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    cache = CurveCache(keep=30)
    store.add_run_points([_fb("m", "alice", 0, float(i)) for i in range(20)])
    assert len(cache.curve(store, "m", 200)) == 20
    store.add_run_points([_fb("m", "alice", 1, 100.0 + i) for i in range(20)])
    curve = cache.curve(store, "m", 200)
    assert len(curve) == 30 and curve[0][2] == 10.0 and curve[-1] == [30, 1, 119.0]  # the newest 30 passes
    assert cache.curve(store, "m", 200) == curve  # nothing new: the same curve


def test_history_points_of_training_requests():
    fb = WorkItem("r1", "alice", "forward_backward", "m", _Args(tokens=7))
    point = history_point(fb, _Result({"loss:sum": 2.5, "label": "x"}), step=3, seconds=0.5, base_model="tiny")
    assert point == {"model_id": "m", "tenant": "alice", "base_model": "tiny", "kind": "forward_backward", "step": 3,
                     "tokens": 7, "seconds": 0.5, "metrics": {"loss:sum": 2.5}}
    step = WorkItem("r2", "alice", "step", "m", None)
    applied = history_point(step, StepResult(metrics={"step": 4.0, "applied": 1.0, "grad_norm": 0.3}), step=3,
                            seconds=0.1, base_model="tiny")
    assert applied["step"] == 4 and applied["tokens"] == 0 and applied["metrics"]["grad_norm"] == 0.3
    accumulating = StepResult(metrics={"applied": 0.0, "accumulated": 1.0})
    assert history_point(step, accumulating, step=3, seconds=0.1, base_model="tiny") is None
    other = WorkItem("r3", "alice", "save", "m", None)
    assert history_point(other, _Result({}), step=3, seconds=0.1, base_model="tiny") is None


def test_histogram_buckets_are_cumulative_and_throughput_forgets_old_tokens():
    hist = Histogram(buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        hist.observe(value)
    snap = hist.snapshot()
    assert snap["buckets"] == [[0.1, 2], [1.0, 3]] and snap["count"] == 4  # +Inf: the count
    assert abs(snap["sum"] - 3.65) < 1e-9
    rate = Throughput(window=10.0)
    rate.add(100, now=0.0)
    rate.add(50, now=5.0)
    assert rate.rate(now=6.0) == 15.0 and rate.rate(now=12.0) == 5.0 and rate.total == 150


class _Datum:
    def __init__(self, n: int) -> None:
        self.input_tokens = list(range(n))


class _Args:
    def __init__(self, tokens: int) -> None:
        self.data = [_Datum(tokens)]


class _Result:
    def __init__(self, metrics: dict) -> None:
        self.metrics = metrics


def test_the_overview_lists_only_the_viewers_rows(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    for tenant in ("alice", "bob"):
        store.create_session(f"s-{tenant}", tenant)
        for i in range(2):
            store.create_model(f"{tenant}-{i}", tenant, session_id=f"s-{tenant}", base_model="tiny", lora={},
                               run_dir=f"r-{tenant}-{i}")
    store.set_model_status("alice-0", "offloaded")
    store.set_model_status("bob-0", "offloaded")
    store.set_model_status("bob-1", "offloaded")
    store.create_future("f1", "bob", kind="train", target_id="bob-1", seq_id=1, base_model="tiny")
    assert store.offloaded_counts("alice") == {"tiny": 1} and store.offloaded_counts(None) == {"tiny": 3}
    assert {m["model_id"] for m in store.recent_models("alice")} == {"alice-0", "alice-1"}
    assert len(store.recent_models(None)) == 4
    sessions = store.recent_sessions("bob")
    assert [(s["session_id"], s["models"]) for s in sessions] == [("s-bob", 2)]
    summary = store.gauge_summary()
    assert summary["sessions_active"] == {"alice": 1, "bob": 1}
    assert sorted(summary["models"]) == [("tiny", "active", 1), ("tiny", "offloaded", 3)]
    assert summary["futures_pending"] == {"tiny": 1}
