"""Twenty runs in a row with changing settings, devices and models: nothing accumulates."""
import os

import pytest
import torch

from pcpp_core import PatchConfig, PoolConfig, shared_engine, shutdown_shared
from conftest import inputs, plain

pytestmark = pytest.mark.dist


def _children() -> set[int]:
    me, kids = os.getpid(), set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == me and fields[0] != "Z":
                kids.add(int(pid))
        except OSError:
            pass
    return kids


def _rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_twenty_runs_stay_flat(models):
    plan = []
    for i in range(20):
        plan.append({
            "devices": ("cpu",) * (2 if (i // 5) % 2 == 0 else 3),  # a device change every 5 runs
            "kind": "comfy" if (i // 2) % 2 == 0 else "diffusers",  # a model change every 2 runs
            "patch": PatchConfig(mode=("pcpp", "distrifusion", "naive", "sync")[i % 4], fraction=0.1 + 0.05 * i,
                                 warmup_steps=1),
        })
    samples = []
    baseline = _children()  # pools other test modules keep warm
    try:
        for i, run in enumerate(plan):
            engine = shared_engine(PoolConfig(devices=run["devices"], threads_per_worker=1))
            engine.new_run(run["patch"])
            kind = run["kind"]
            for step in range(2):
                a, k = inputs(kind, seed=step)
                out = engine(models[kind], *a, **k)
                assert torch.isfinite(out).all()
            if run["patch"].mode.value == "sync":
                torch.testing.assert_close(out, plain(models[kind], kind, a, k), atol=1e-5, rtol=0)
            kids = _children() - baseline
            assert kids == set(engine.pool.pids), f"run {i}: children {kids} != pool {engine.pool.pids}"
            samples.append((_fds(), _rss_mb(), max(_rss_mb(p) for p in engine.pool.pids)))
    finally:
        shutdown_shared()
    assert _children() <= baseline  # nothing of ours left; a pool of another module may have ended meanwhile
    # after the first full cycle (both models, both pools seen) nothing grows
    fds, host_rss, worker_rss = zip(*samples[10:])
    assert max(fds) - min(fds) <= 4, fds
    assert max(host_rss) - min(host_rss) < 60, host_rss
    assert max(worker_rss) - min(worker_rss) < 120, worker_rss
