"""How busy the host was during a benchmark: the share of CPU time the hypervisor gave to other guests.

Our machines are shared VMs. When the host is overcommitted, the guest's vCPUs are descheduled
("steal" time in /proc/stat): every remote path, which synchronises several processes and threads,
then slows far more than the single-threaded in-process floor, and a ratio from such a run says
little. Each result records the steal share over its run so a reader can tell a noisy run apart.
"""

from __future__ import annotations

from pathlib import Path

NOISY_STEAL_SHARE = 0.03  # above this, repeat the run before trusting its ratios
_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_counters(stat_path: str = "/proc/stat") -> dict[str, int] | None:
    """The machine's cumulative CPU time per kind (Linux /proc/stat, in ticks); None off Linux."""
    try:
        first_line = Path(stat_path).read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first_line or first_line[0] != "cpu":
        return None
    return dict(zip(_FIELDS, map(int, first_line[1:1 + len(_FIELDS)])))


def steal_share(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
    """Share of all CPU time between two `cpu_counters` snapshots that was stolen by the hypervisor."""
    if not before or not after:
        return None
    total = sum(after.get(k, 0) - before.get(k, 0) for k in _FIELDS)
    if total <= 0:
        return None
    return (after.get("steal", 0) - before.get("steal", 0)) / total


def describe_host(before: dict[str, int] | None) -> dict:
    """The `env` fields about host load since `before`, warning on stdout when the run was noisy."""
    share = steal_share(before, cpu_counters())
    if share is not None and share > NOISY_STEAL_SHARE:
        print(f"warning: the hypervisor took {share:.0%} of this machine's CPU time during the run; "
              "remote-vs-in-process ratios from it are unreliable, repeat it on a quieter host")
    return {"cpu_steal_share": share}
