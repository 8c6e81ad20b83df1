"""The server's periodic progress line: one line per interval while a model works, none while idle."""

from __future__ import annotations

import asyncio
import logging

from twinkle.actors.progress import ProgressLine, report_progress


def stats(passes: int, requests: int, samples: int, train_tokens: int, sample_tokens: int, queued: int) -> dict:
    return {"train_passes": passes, "train_pass_requests": requests, "sample_batches": samples, "queued": queued,
            "telemetry": {"tokens_total": {"train": train_tokens, "sample": sample_tokens}}}


def test_line_reports_the_interval_and_stays_quiet_when_idle():
    line = ProgressLine("twinkle-tiny")
    assert line.update(stats(0, 0, 0, 0, 0, 0), now=100.0) is None  # the first snapshot is the baseline
    text = line.update(stats(10, 30, 2, 20_000, 500, 4), now=110.0)
    assert text == ("twinkle-tiny: last 10s: 10 train passes (30 requests), 2 sample batches; 2,000 train tok/s, "
                    "50 sampled tok/s; queue 4")
    assert line.update(stats(10, 30, 2, 20_000, 500, 0), now=120.0) is None  # idle, empty queue: no line
    assert "queue 3" in line.update(stats(10, 30, 2, 20_000, 500, 3), now=130.0)  # stuck work still shows


def test_report_progress_logs_while_work_runs(caplog):
    snapshots = iter([stats(0, 0, 0, 0, 0, 0), stats(5, 5, 0, 1000, 0, 1)] + [stats(5, 5, 0, 1000, 0, 0)] * 50)

    async def fake_stats() -> dict:
        return next(snapshots)

    async def run() -> None:
        task = asyncio.create_task(report_progress("m", fake_stats, interval_s=0.01))
        await asyncio.sleep(0.2)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="twinkle.progress"):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if r.name == "twinkle.progress"]
    assert len(lines) == 1 and lines[0].startswith("m: last ") and "5 train passes (5 requests)" in lines[0]
