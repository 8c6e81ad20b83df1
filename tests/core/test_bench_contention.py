"""The benchmark's split of the server's overhead into CPU contention and request-path latency."""

import resource

import pytest

from bench.contention import other_core_share, split_overhead
from bench.cpu_load import MAX_SHARE_PER_HELPER, cpu_load, duty_cycles


def _share(cycles):
    return sum(busy / (busy + idle) for busy, idle in cycles)


@pytest.mark.parametrize("share", [0.05, 0.35, 0.9, 1.4, 2.5])
def test_the_helpers_together_keep_the_requested_share_of_a_core_busy(share):
    cycles = duty_cycles(share)
    assert _share(cycles) == pytest.approx(share)
    assert all(busy / (busy + idle) <= MAX_SHARE_PER_HELPER + 1e-9 for busy, idle in cycles)
    assert len(cycles) == (1 if share <= MAX_SHARE_PER_HELPER else 2 if share < 1.8 else 3)


def test_no_load_means_no_helper():
    assert duty_cycles(0.0) == [] and duty_cycles(-1.0) == []


def test_the_load_counts_every_process_but_the_worker():
    cpu = {"model_worker": 370.0, "ingress_replica": 35.0, "scheduler": 25.0, "sdk_client": 20.0}
    assert other_core_share(cpu, step_s=0.4) == pytest.approx(80.0 / 400.0)


def test_the_load_runs_in_helper_processes_only_while_the_block_runs():
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with cpu_load(0.5):
        import time

        time.sleep(1.0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the helpers were joined: their CPU is counted
    used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert used >= 0.15, used  # about 0.5 s of bursts; a helper's start alone takes a few tens of ms


def test_the_overhead_splits_into_slower_compute_and_the_request_path():
    """In-process 200 ms; in the server the workers computed 230 + 20 ms of a 300 ms SDK step."""
    split = split_overhead(0.200, 0.300, {"pass": 230.0, "ops": 20.0, "sample": 99.0})
    assert split["worker_compute_ms_per_step"] == pytest.approx(250.0)
    assert split["contention_ms_per_step"] == pytest.approx(50.0)
    assert split["request_path_ms_per_step"] == pytest.approx(50.0)
    assert split["contention_ms_per_step"] + split["request_path_ms_per_step"] == pytest.approx(300.0 - 200.0)
    assert split["ratio_without_contention"] == pytest.approx(200.0 / 250.0)  # compute at in-process speed


def test_cpu_per_call_is_each_roles_growth_over_the_calls_largest_first():
    from bench.remote import cpu_ms_per_call

    before = {"model_worker": 1.0, "sdk_client": 0.5}
    after = {"model_worker": 1.2, "sdk_client": 1.5, "scheduler": 0.1}  # the scheduler started meanwhile
    per_call = cpu_ms_per_call(before, after, calls=10)
    assert per_call == pytest.approx({"sdk_client": 100.0, "model_worker": 20.0, "scheduler": 10.0})
    assert list(per_call) == ["sdk_client", "model_worker", "scheduler"]


def test_a_round_trip_is_no_faster_than_its_cpu_spread_over_the_cores():
    from bench.remote import cpu_floor_ms

    assert cpu_floor_ms({"model_worker": 16.0, "ingress_replica": 11.0, "sdk_client": 9.0}, cores=2) == 18.0
    assert cpu_floor_ms({"model_worker": 16.0}, cores=4) == 4.0
    assert cpu_floor_ms({}) is None and cpu_floor_ms(None) is None


def test_the_bench_worker_holds_a_gpu_only_when_asked(monkeypatch):
    from bench.remote import GPU_ENV, bench_device, bench_model
    from twinkle.config import ModelConfig

    monkeypatch.delenv(GPU_ENV, raising=False)
    cpu = ModelConfig.model_validate(bench_model())
    assert cpu.gpus_per_worker == 0 and bench_device() == "cpu"
    monkeypatch.setenv(GPU_ENV, "1")
    gpu = ModelConfig.model_validate(bench_model())  # a strict schema: the keys are real server settings
    assert gpu.gpus_per_worker == 1 and gpu.device == "auto" and bench_device() == "cuda"
    assert gpu.placement()[1].get("GPU") == 1
