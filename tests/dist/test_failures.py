"""A worker that dies, raises or hangs gives a WorkerError quickly; nothing is left behind."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from pcpp_core import ConfigError, Engine, PatchConfig, PoolConfig, WorkerError
from conftest import inputs, plain

pytestmark = pytest.mark.dist


def _gone(pids, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in pids):
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.fixture
def model(models):
    return models["comfy"]


def test_killed_worker_mid_call_raises_and_pool_restarts(model):
    # rank 1 sleeps inside the call (test hook), so rank 0 is killed while the call is in flight
    engine = Engine(PoolConfig(devices=("cpu", "cpu"), threads_per_worker=1,
                               env=(("PCPP_TEST_HANG_RANK", "1"),)))
    a, k = inputs("comfy")
    try:
        engine.load(model)
        pids = engine.pool.pids
        threading.Timer(1.0, os.kill, (pids[0], signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="rank 0.*died") as e:
            engine(model, *a, **k)
        assert time.monotonic() - t0 < 10
        assert e.value.rank == 0
        assert _gone(pids), "workers of the failed pool still running"
        # the next run starts a fresh pool (without the hang hook) and succeeds
        engine.pool.config = PoolConfig(devices=("cpu", "cpu"), threads_per_worker=1)
        engine.new_run(PatchConfig(mode="sync"))
        torch.testing.assert_close(engine(model, *a, **k), plain(model, "comfy", a, k), atol=1e-5, rtol=0)
        assert set(engine.pool.pids).isdisjoint(pids)
    finally:
        pids = engine.pool.pids
        engine.shutdown()
    assert _gone(pids)


def test_worker_killed_between_calls_is_reported_by_rank(model):
    engine = Engine(PoolConfig(devices=("cpu", "cpu"), threads_per_worker=1))
    a, k = inputs("comfy")
    try:
        engine(model, *a, **k)
        os.kill(engine.pool.pids[1], signal.SIGKILL)
        time.sleep(0.5)
        with pytest.raises(WorkerError, match="rank 1") as e:
            engine(model, *a, **k)
        assert e.value.rank == 1
        engine(model, *a, **k)  # restarted
    finally:
        engine.shutdown()


def test_hung_worker_times_out(model):
    engine = Engine(PoolConfig(devices=("cpu", "cpu"), threads_per_worker=1, call_timeout_s=3,
                               env=(("PCPP_TEST_HANG_RANK", "0"),)))
    a, k = inputs("comfy")
    try:
        engine.load(model)
        pids = engine.pool.pids
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="within 3 s.*hung"):
            engine(model, *a, **k)
        assert time.monotonic() - t0 < 8
        assert _gone(pids)
    finally:
        engine.shutdown()


def test_worker_exception_carries_remote_traceback(engines, model):
    engine = engines[2]
    a, k = inputs("comfy")
    bad = dict(k, context=torch.randn(2, 5, 7))  # wrong context width: fails inside the worker
    with pytest.raises(WorkerError, match="raised during 'call'") as e:
        engine(model, *a, **bad)
    assert e.value.remote_traceback and "Traceback" in e.value.remote_traceback
    assert "mat1 and mat2" in str(e.value)
    engine.new_run(PatchConfig(mode="sync"))
    torch.testing.assert_close(engine(model, *a, **k), plain(model, "comfy", a, k), atol=1e-5, rtol=0)


def test_latent_too_small_is_refused_before_any_work(engines, model):
    engine = engines[2]
    engine.new_run(PatchConfig())  # a new run: the shared engine's last run had another latent size
    a, k = inputs("comfy", height=4)
    with pytest.raises(ConfigError, match="smallest valid latent height is 8 rows"):
        engine(model, *a, **k)


def test_no_worker_survives_interpreter_exit(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        from pcpp_core import Engine, PoolConfig
        e = Engine(PoolConfig(devices=("cpu", "cpu"), threads_per_worker=1))
        e.start()
        print(" ".join(map(str, e.pool.pids)), flush=True)
        if sys.argv[1] == "term":
            import os, signal, time
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
    """)
    for how in ("exit", "term"):
        proc = subprocess.run([sys.executable, "-c", script, how], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        pids = [int(p) for p in proc.stdout.split()]
        assert len(pids) == 2, proc.stderr
        assert _gone(pids), f"workers left after host {how}"
