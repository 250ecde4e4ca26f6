"""`python -m pcpp_core doctor` as a user runs it: a subprocess, JSON lines, exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]


def doctor(*args: str, timeout: float = 400) -> tuple[int, list[dict], str]:
    """(exit code, every stdout line parsed as JSON, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "pcpp_core", "doctor", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    return proc.returncode, lines, proc.stderr


def test_doctor_on_three_cpu_workers_passes_every_check():
    code, lines, err = doctor("--devices", "cpu:3", "--json")
    final = lines[-1]
    assert set(final) == {"ok", "checks"}
    failed = [c for c in final["checks"] if not c["passed"]]
    assert final["ok"] is True, (failed, err[-3000:])
    assert code == 0
    names = [c["name"] for c in final["checks"]]
    assert len(names) >= 5
    assert {"discovery", "p2p", "sync", "stale", "bytes", "overhead"} <= set(names)
    # the progress lines carry the figures: 3 workers send in all 6 directions, every byte checked
    progress = {ln["check"]: ln for ln in lines[:-1]}
    assert list(progress) == names
    transfers = progress["p2p"]["transfers"]
    assert {(t["src"], t["dst"]) for t in transfers} == {(a, b) for a in range(3) for b in range(3) if a != b}
    assert all(t["correct"] and t["gbps"] > 0 for t in transfers)
    assert max(progress["stale"]["vs_fresh"][1:]) > 1e-3  # the stale steps really used stale data


def test_doctor_with_missing_gpus_fails_with_a_hint_and_no_traceback():
    code, lines, err = doctor("--devices", "cuda:0,cuda:99", "--json", timeout=120)
    final = lines[-1]
    assert final["ok"] is False and code == 1
    first = final["checks"][0]
    assert first["name"] == "discovery" and not first["passed"] and first["hint"]
    assert all(not c["passed"] and c["detail"].startswith("skipped") for c in final["checks"][1:])
    assert "Traceback" not in err


def test_doctor_bad_devices_exit_2_naming_the_flag():
    code, lines, err = doctor("--devices", "cuda:0,cpu", timeout=120)
    assert code == 2 and "--devices" in err and not lines
