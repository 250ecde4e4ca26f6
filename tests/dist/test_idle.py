"""A pool left idle is stopped after PoolConfig.idle_timeout_s, never during a run; the next call restarts it.

(At most one pool per process through shared_engine: tests/dist/test_repeated_use.py.)
"""
import logging
import os
import threading
import time

import pytest
import torch

from pcpp_core import Engine, PatchConfig, PoolConfig
from conftest import inputs, plain

pytestmark = pytest.mark.dist

IDLE_S = 1.0


def _running(pids: list[int]) -> list[int]:
    """Those of `pids` that are still processes (the pool reaps its workers, so a stopped one has no /proc entry)."""
    return [p for p in pids if os.path.exists(f"/proc/{p}")]


def _wait_stopped(engine: Engine, pids: list[int], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while engine.pool.started or _running(pids):
        assert time.monotonic() < deadline, f"pool not stopped {limit_s} s after it fell idle: {_running(pids)}"
        time.sleep(0.1)


def _idle_timers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pcpp-idle-timer" and t.is_alive()]


@pytest.fixture
def engine():
    e = Engine(PoolConfig(devices=("cpu", "cpu"), threads_per_worker=1, call_timeout_s=120, idle_timeout_s=IDLE_S))
    yield e
    e.shutdown()
    deadline = time.monotonic() + 5
    while _idle_timers() and time.monotonic() < deadline:  # a cancelled timer wakes at once and exits
        time.sleep(0.05)
    assert not _idle_timers(), "shutdown() left an idle timer thread behind"


def test_idle_pool_is_stopped_and_the_next_call_starts_a_fresh_one_with_the_same_output(engine, models, caplog):
    model = models["comfy"]
    a, k = inputs("comfy")
    first = engine(model, *a, **k)  # outside a run (the first call is synchronous: exact)
    old = engine.pool.pids
    assert len(_running(old)) == 2
    with caplog.at_level(logging.INFO, logger="pcpp.engine"):
        _wait_stopped(engine, old)  # outside a run, the clock starts after each call
    assert any("idle for" in r.getMessage() for r in caplog.records if r.name == "pcpp.engine"), caplog.text
    engine.new_run(PatchConfig(mode="sync"))
    again = engine(model, *a, **k)
    new = engine.pool.pids
    assert len(_running(new)) == 2 and not set(new) & set(old)
    assert engine.model_loads == 2  # the fresh workers got the model again
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(again, plain(model, "comfy", a, k), atol=1e-5, rtol=0)
    engine.end_run()  # within a run, the clock starts when it ends
    _wait_stopped(engine, new)
    assert not _idle_timers()  # the timer that stopped the pool is done


def test_pool_is_not_stopped_during_a_run_however_long_the_pause(engine, models):
    model = models["comfy"]
    a, k = inputs("comfy")
    engine.new_run(PatchConfig(mode="pcpp", warmup_steps=1))
    engine(model, *a, **k)
    pids = engine.pool.pids
    time.sleep(3 * IDLE_S)  # a sampler paused between steps (a preview, a slow callback)
    assert engine.pool.started and _running(pids) == pids
    engine(model, *a, **k)  # the second call of the run, on the same workers and buffers
    assert engine.pool.pids == pids and engine.model_loads == 1 and len(engine.stats.calls) == 2
    engine.end_run()
    _wait_stopped(engine, pids)
