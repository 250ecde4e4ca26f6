"""What a host lets one request make it do: how many CPU workers, how long an idle pool lives.

A ComfyUI server takes `devices` from whoever can POST a prompt, so the adapter (nodes/) bounds
the CPU workers one prompt may fork by the cores this process may use, and stops a pool that
sits idle. Library callers (tests, benchmarks, the doctor) choose their own pool sizes and are
not bound here. Everything in this module is pure: the environment and the core count come in
as arguments so the rules can be tested without a server.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import ConfigError

MAX_WORKERS_ENV = "PCPP_MAX_WORKERS"  # most CPU workers one prompt may ask for (default: usable cores)
POOL_IDLE_ENV = "PCPP_POOL_IDLE_S"  # seconds a warm pool may sit idle before it is stopped; 0 = never
DEFAULT_POOL_IDLE_S = 300.0


def cgroup_cpu_quota(root: str | Path = "/sys/fs/cgroup") -> int | None:
    """Whole CPUs allowed by a cgroup quota (Docker `--cpus`), rounded up; None when unlimited.

    Affinity does not see a CFS quota: a container limited to 2 CPUs on a 64-core host still
    has all 64 in its affinity mask. cgroup v2 writes `cpu.max` ("max 100000" or
    "200000 100000"), v1 `cpu.cfs_quota_us` (-1 = none) and `cpu.cfs_period_us`.
    """
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        q, p = int(quota), int(period)
    except (OSError, ValueError):
        try:
            q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            return None
    if q <= 0 or p <= 0:
        return None
    return max(1, math.ceil(q / p))


def usable_cores(affinity: set[int] | None = None, quota: int | None = None) -> int:
    """The cores this process may run on: its affinity mask (taskset, cpuset), capped by a cgroup
    CPU quota; `os.cpu_count()` where the platform has no affinity call.

    Arguments default to the running process's own; tests pass them in.
    """
    if affinity is None and hasattr(os, "sched_getaffinity"):
        affinity = os.sched_getaffinity(0)
    cores = len(affinity) if affinity else (os.cpu_count() or 1)
    if quota is None:
        quota = cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def _positive_int(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value >= 1 else None


def _seconds(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


@dataclass(frozen=True)
class HostLimits:
    """The bounds a server puts on every prompt, read once from its environment at start.

    An unusable variable does not stop the server: its default applies (the safe value, no
    looser than leaving it unset) and `problems` says so; the adapter logs each problem at
    start and repeats it in every refusal it causes.
    """

    max_cpu_workers: int
    max_cpu_workers_source: str  # why this number: the variable, or the cores found
    pool_idle_s: float = DEFAULT_POOL_IDLE_S  # 0: a warm pool is kept until the process exits
    problems: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, cores: int | None = None) -> "HostLimits":
        env = os.environ if env is None else env
        cores = usable_cores() if cores is None else cores
        problems = []
        workers, source = cores, f"the {cores} core(s) this process may use"
        text = env.get(MAX_WORKERS_ENV, "").strip()
        if text:
            value = _positive_int(text)
            if value is None:
                problems.append(f"{MAX_WORKERS_ENV}={text!r} is not a whole number >= 1; "
                                f"using the default, {source}")
            else:
                workers, source = value, f"{MAX_WORKERS_ENV}={value}"
        idle = DEFAULT_POOL_IDLE_S
        text = env.get(POOL_IDLE_ENV, "").strip()
        if text:
            value = _seconds(text)
            if value is None:
                problems.append(f"{POOL_IDLE_ENV}={text!r} is not a number of seconds >= 0 (0 keeps pools "
                                f"warm); using the default, {DEFAULT_POOL_IDLE_S:g} s")
            else:
                idle = value
        return cls(workers, source, idle, tuple(problems))

    def check_cpu_workers(self, spec: str, devices: tuple[str, ...]) -> None:
        """Refuse `devices` (ConfigError naming it) when it asks for more CPU workers than allowed.

        CUDA lists are bounded by the visible GPUs already (one worker per GPU, no duplicates).
        """
        n = sum(1 for d in devices if d == "cpu")
        if n <= self.max_cpu_workers:
            return
        note = f" ({'; '.join(self.problems)})" if self.problems else ""
        raise ConfigError(
            f"devices={spec!r} asks for {n} CPU worker processes; this server allows at most "
            f"{self.max_cpu_workers} ({self.max_cpu_workers_source}){note}. Use cpu:{self.max_cpu_workers} "
            f"or fewer, or start the server with {MAX_WORKERS_ENV}=<N> to change the limit"
        )
