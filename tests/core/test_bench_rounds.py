"""The benchmark's rounds: each variant measured in every round, alternating order, rounds pooled."""

import pytest

from bench.rounds import SAMPLES, pool, round_orders, run_in_rounds, summary_with_samples


def test_rounds_alternate_the_order_so_no_variant_always_runs_first():
    assert round_orders(["direct", "haproxy", "proxy"], rounds=3) == [
        ["direct", "haproxy", "proxy"], ["proxy", "haproxy", "direct"], ["direct", "haproxy", "proxy"]]


def test_every_variant_runs_once_per_round_in_that_rounds_order():
    calls = []

    def run(label, number):
        calls.append((label, number))
        return {"step": summary_with_samples([0.1 * (number + 1)])}

    pooled = run_in_rounds(["a", "b"], run, rounds=2)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1)]
    assert pooled["a"]["step"][SAMPLES] == [0.1, 0.2] and pooled["a"]["step"]["n"] == 2


def test_pooling_joins_samples_averages_figures_and_keeps_the_rest():
    first = {"pipelined": summary_with_samples([0.30, 0.20, 0.25]), "cpu": {"worker": 300.0, "sdk": 20.0},
             "healthz_ms": 4.0, "front": "direct", "compute": None}
    second = {"pipelined": summary_with_samples([0.40, 0.10, 0.35]), "cpu": {"worker": 340.0, "ingress": 30.0},
              "healthz_ms": 6.0, "front": "direct", "compute": None}
    pooled = pool([first, second])
    assert pooled["pipelined"]["n"] == 6
    assert pooled["pipelined"]["p50_s"] == pytest.approx(0.275)  # the median of all six samples
    assert pooled["pipelined"]["min_s"] == pytest.approx(0.10)
    assert pooled["cpu"] == {"worker": pytest.approx(320.0), "sdk": 20.0, "ingress": 30.0}  # only rounds that had it
    assert pooled["healthz_ms"] == pytest.approx(5.0)
    assert pooled["front"] == "direct" and pooled["compute"] is None
