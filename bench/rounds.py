"""Run the variants of a benchmark in rounds of alternating order, and pool each variant's rounds.

On a shared VM the host's load drifts over minutes. Measured one after another, whichever variant
runs in a slow stretch, or first while the machine's caches warm, looks worse than it is. Rounds in
alternating order spread that drift over every variant, and pooling keeps one figure per variant:
sample lists are joined and summarised again, other figures averaged over the rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bench.workloads import summarize

ROUNDS = 2
SAMPLES = "samples_s"  # the key under which a summary keeps its raw samples, so rounds can be pooled


def summary_with_samples(times: list[float]) -> dict:
    """`summarize(times)` that keeps the samples, for pooling across rounds."""
    return {**summarize(times), SAMPLES: [float(t) for t in times]}


def round_orders(labels: Sequence[str], rounds: int = ROUNDS) -> list[list[str]]:
    """The order of the variants in each round: as given, then reversed, and so on."""
    return [list(labels) if r % 2 == 0 else list(reversed(labels)) for r in range(rounds)]


def run_in_rounds(labels: Sequence[str], run: Callable[[str, int], dict], rounds: int = ROUNDS) -> dict[str, Any]:
    """`run(label, round)` for every variant in every round; each variant's rounds pooled."""
    results: dict[str, list] = {label: [] for label in labels}
    for number, order in enumerate(round_orders(labels, rounds)):
        for label in order:
            results[label].append(run(label, number))
    return {label: pool(parts) for label, parts in results.items()}


def pool(parts: list) -> Any:
    """One result from a variant's rounds: summaries with samples re-summarised over all of them,
    numbers averaged, dicts pooled key by key; anything else (text, None, a mix) from the first round."""
    first = parts[0]
    if isinstance(first, dict):
        if SAMPLES in first:
            return summary_with_samples([t for part in parts for t in part[SAMPLES]])
        keys = dict.fromkeys(key for part in parts for key in part)
        return {key: pool([part[key] for part in parts if key in part]) for key in keys}
    if all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in parts):
        return round(sum(parts) / len(parts), 6)  # no float noise (0.66999...) in the JSON
    return first
