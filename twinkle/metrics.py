"""Metrics named `name:reduction` (Tinker's convention), and how to combine them across parts."""

from __future__ import annotations

Metrics = dict[str, float]


def merge_metrics(parts: list[tuple[Metrics, float]]) -> Metrics:
    """Combine metrics of micro-batches or data-parallel shards, each given with its weight
    (number of datums): sums add, means are weighted, min/max combine."""
    if len(parts) == 1:
        return dict(parts[0][0])
    merged: Metrics = {}
    total_weight = sum(w for _, w in parts) or 1.0
    for key in {k for m, _ in parts for k in m}:
        values = [(m[key], w) for m, w in parts if key in m]
        reduction = key.rsplit(":", 1)[-1]
        if reduction == "sum":
            merged[key] = sum(v for v, _ in values)
        elif reduction == "max":
            merged[key] = max(v for v, _ in values)
        elif reduction == "min":
            merged[key] = min(v for v, _ in values)
        else:
            merged[key] = sum(v * w for v, w in values) / total_weight
    return merged
