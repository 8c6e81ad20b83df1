"""Metrics named `name:reduction` (Tinker's convention), and how to combine them across parts."""

from __future__ import annotations

Metrics = dict[str, float]


def merge_metrics(parts: list[tuple[Metrics, float]], counts: list[dict[str, float]] | None = None) -> Metrics:
    """Combine metrics of micro-batches or data-parallel shards: sums add, min/max combine, and
    means are weighted by their own counts where given (`counts[i][key]`), else by the part's
    weight (its number of datums)."""
    if len(parts) == 1:
        return dict(parts[0][0])
    counts = counts or [{} for _ in parts]
    merged: Metrics = {}
    for key in {k for m, _ in parts for k in m}:
        values = [(m[key], c.get(key, w)) for (m, w), c in zip(parts, counts) if key in m]
        reduction = key.rsplit(":", 1)[-1]
        if reduction == "sum":
            merged[key] = sum(v for v, _ in values)
        elif reduction == "max":
            merged[key] = max(v for v, _ in values)
        elif reduction == "min":
            merged[key] = min(v for v, _ in values)
        else:
            total = sum(w for _, w in values)
            merged[key] = sum(v * w for v, w in values) / total if total else 0.0
    return merged
