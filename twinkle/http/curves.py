"""Loss curves for the status page, read from the store incrementally.

A page refresh every few seconds must not re-read thousands of points per run: this ingress keeps
each shown run's (step, loss) points and reads only those added since its last read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from twinkle.store import Store
from twinkle.store.history import HISTORY_KEEP, bucket_curve


class CurveCache:
    """(step, loss) points of recently shown runs, at most `keep` per run and `max_runs` runs."""

    def __init__(self, keep: int = HISTORY_KEEP, max_runs: int = 256) -> None:
        self.keep = keep
        self.max_runs = max_runs
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, tuple[int, list[tuple[int, float]]]] = OrderedDict()

    def curve(self, store: Store, model_id: str, max_points: int) -> list[list[float]]:
        """[[pass, step, loss], ...] of the run, averaged into at most `max_points` entries."""
        with self._lock:  # one reader per run at a time: no point is appended twice
            last, points = self._runs.pop(model_id, (0, []))
            new = store.loss_points(model_id, after=last)
            if new:
                points = (points + [(step, loss) for _, step, loss in new])[-self.keep:]
                last = new[-1][0]
            self._runs[model_id] = (last, points)
            while len(self._runs) > self.max_runs:
                self._runs.popitem(last=False)
            return bucket_curve(points, max_points)
