"""torch's intra-op thread count, chosen once when an engine starts.

More threads than the cores the process may actually run on makes OpenMP threads spin and wait
for each other; on a 2-core machine that cost 10-15x (BENCHMARKS.md). torch's own default counts
the machine's cores, not the CPU affinity mask or a container's CPU quota, so the engine picks:

1. the ``num_threads`` engine argument, when given;
2. else ``OMP_NUM_THREADS``, when set to a positive integer (the user's explicit choice; read here,
   at engine start, and nowhere deeper);
3. else the usable cores: the affinity mask (``os.sched_getaffinity``), capped by the cgroup CPU
   quota (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``) rounded down,
   at least 1.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadChoice:
    num_threads: int
    source: str  # "engine argument", "OMP_NUM_THREADS" or "usable cores ..."


def check_num_threads(num_threads: int | None) -> None:
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads={num_threads!r} is invalid: allowed None (automatic) or an integer >= 1")


def affinity_cores() -> int:
    """Cores in this process's CPU affinity mask (all online cores where the OS has no masks)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup quota (e.g. 1.5), or None when there is no quota."""
    v2 = root / "cpu.max"  # "max 100000" or "<quota> <period>"
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores(root: Path = CGROUP_ROOT) -> tuple[int, str]:
    """(cores, how they were counted): the affinity mask, capped by the cgroup quota."""
    cores = affinity_cores()
    limit = cgroup_cpu_limit(root)
    if limit is not None and math.floor(limit) < cores:
        return max(1, math.floor(limit)), f"usable cores (cgroup CPU quota {limit:g} of {cores} in the affinity mask)"
    return cores, f"usable cores ({cores} in the affinity mask)"


def choose_num_threads(num_threads: int | None, environ: dict[str, str] | None = None) -> ThreadChoice:
    check_num_threads(num_threads)
    if num_threads is not None:
        return ThreadChoice(num_threads, "engine argument")
    env = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return ThreadChoice(int(env), "OMP_NUM_THREADS")
    cores, source = usable_cores()
    return ThreadChoice(cores, source)


def configure_threads(num_threads: int | None = None) -> ThreadChoice:
    """Set torch's intra-op threads (once, at engine start) and log the choice."""
    choice = choose_num_threads(num_threads)
    if torch.get_num_threads() != choice.num_threads:
        torch.set_num_threads(choice.num_threads)
    logger.info("torch CPU threads: %d (%s)", choice.num_threads, choice.source)
    return choice
