"""Small helpers the cookbook recipes share: loading example data, writing metrics and loss plots.

Recipes import this file by path (it sits next to them); nothing in the package imports it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def load_jsonl(name: str) -> list[dict]:
    with open(DATA_DIR / name) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class MetricsLog:
    """Appends one JSON line per step to <out>/metrics.jsonl and can plot a loss curve."""

    def __init__(self, out_dir: str | Path | None) -> None:
        self.out = Path(out_dir) if out_dir else None
        self.rows: list[dict] = []
        self.started = time.time()
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").write_text("")

    def log(self, **row) -> None:
        row.setdefault("time_s", round(time.time() - self.started, 3))
        self.rows.append(row)
        if self.out:
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def plot(self, key: str = "loss", title: str = "training loss") -> Path | None:
        """Save <out>/<key>.png; returns its path (None without --out or matplotlib)."""
        if not self.out or not self.rows:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        steps = [r["step"] for r in self.rows if key in r]
        values = [r[key] for r in self.rows if key in r]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out / f"{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
