"""Staging directories: named after the host, space checked, removed on exit, signals and after SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pcpp_core import StagingError
from pcpp_core.staging import check_space, host_tag, make_private_dir, process_start_time, staging_root, sweep_stale


def test_staging_root_env_wins_over_config_and_defaults_to_temp(monkeypatch, tmp_path):
    monkeypatch.delenv("PCPP_STAGING_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert staging_root() == str(tmp_path)
    assert staging_root("/x") == "/x"
    monkeypatch.setenv("PCPP_STAGING_DIR", "/y")
    assert staging_root("/x") == "/y"


def test_too_little_space_names_the_directory_the_bytes_and_the_variable(tmp_path):
    with pytest.raises(StagingError) as e:
        check_space(str(tmp_path), 1 << 62)
    assert str(tmp_path) in str(e.value) and str(1 << 62) in str(e.value) and "PCPP_STAGING_DIR" in str(e.value)
    with pytest.raises(StagingError, match="does not exist.*PCPP_STAGING_DIR"):
        make_private_dir(str(tmp_path / "missing"), "stage")


def test_sweep_removes_dirs_of_dead_hosts_and_reused_pids_only(tmp_path):
    me = os.getpid()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = tmp_path / f"{host_tag()}-pool-a"
    gone = tmp_path / f"pcpp-{dead.pid}-{12345}-pool-b"
    reused = tmp_path / f"pcpp-{me}-{process_start_time(me) + 1}-stage-c"  # my pid, another start time
    other = tmp_path / "pcpp-notours"
    for d in (mine, gone, reused, other):
        d.mkdir()
    removed = sweep_stale([str(tmp_path)])
    assert sorted(removed) == sorted([str(gone), str(reused)])
    assert mine.is_dir() and other.is_dir() and not gone.exists() and not reused.exists()


_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pcpp_core.staging import install_cleanup, make_private_dir
    seen = []
    # Python's own SIGINT handler, as in any interactive or foreground run (a background job may
    # have inherited SIGINT ignored, and then Python installs none)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.argv[2] == "chain":
        signal.signal(signal.SIGTERM, lambda s, f: (seen.append(s), print("previous handler ran", flush=True), sys.exit(7)))
    install_cleanup()
    d = make_private_dir(sys.argv[1], "stage")
    try:  # the signal may come as soon as the path is printed
        print(d, flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
        sys.exit(5)
""")


@pytest.mark.parametrize("sig,mode,code,says", [
    (signal.SIGTERM, "default", -signal.SIGTERM, ""),
    (signal.SIGTERM, "chain", 7, "previous handler ran"),
    (signal.SIGINT, "default", 5, "KeyboardInterrupt"),  # Ctrl-C still raises KeyboardInterrupt
])
def test_signals_remove_private_dirs_and_chain_to_the_previous_handler(tmp_path, sig, mode, code, says):
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), mode], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    path = proc.stdout.readline().strip()
    assert os.path.isdir(path)
    proc.send_signal(sig)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == code and says in out
    assert not os.listdir(tmp_path)


def test_pool_config_staging_dir_must_be_a_path():
    from pcpp_core import ConfigError, PoolConfig

    assert PoolConfig(staging_dir="/data/pcpp").staging_dir == "/data/pcpp"
    with pytest.raises(ConfigError, match="staging_dir=5"):
        PoolConfig(staging_dir=5)
