"""SMOKE tests of the bench parts that start CPU workers, each at a tiny size.

Not benchmarks: they prove the parts run end to end, print the documented JSON fields, and that
the figures are sane (analytic bytes == bytes really sent, sync == one process, naive sends 0).
"""
from __future__ import annotations

import json

import pytest

from pcpp_core.bench import main

pytest.importorskip("diffusers")
pytestmark = pytest.mark.dist

COMMON = {"bench", "mode", "fraction", "bands", "height", "width"}


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[dict]:
    assert main(argv) == 0
    return [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.strip()]


def test_comm_cross_check_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_json(capsys, ["comm", "--json", "--cases", "sd15-mini:128", "--bands", "2", "--fractions", "0.3",
                             "--check-size", "64", "--check-bands", "2", "--compress", "residual-2bit"])
    checks = [r for r in rows if r["bench"] == "comm-check"]
    assert {r["mode"] for r in checks} == {"naive", "pcpp", "distrifusion", "sync"}
    assert {(r["compress"], r["far_refresh"], r["far_pool"]) for r in checks if r["mode"] == "pcpp"} == \
        {("none", 0, 1), ("none", 2, 1), ("residual-2bit", 0, 1), ("residual-2bit", 2, 1), ("residual-2bit", 2, 16)}
    for r in checks:
        assert COMMON <= r.keys()
        assert r["match"] and r["per_rank_analytic"] == r["per_rank_measured"]
    steady = {(r["mode"], r["compress"], r["far_refresh"]): r["bytes_measured"] for r in checks
              if r["call"] == "steady"}
    assert steady[("naive", "none", 0)] == 0 < steady[("pcpp", "none", 0)] < steady[("distrifusion", "none", 0)]
    assert steady[("pcpp", "residual-2bit", 0)] < steady[("pcpp", "none", 0)] / 8


def test_speed_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_json(capsys, ["speed", "--json", "--model", "sd15-mini", "--sizes", "128", "--steps", "1",
                             "--warmup", "1", "--modes", "pcpp", "--tiny-size", "64", "--tiny-steps", "1"])
    assert {(r["model"], r["height"]) for r in rows} == {("sd15-mini", 128), ("tiny", 64)}
    for model in ("sd15-mini", "tiny"):
        by = {r["mode"]: r for r in rows if r["model"] == model}
        assert set(by) == {"one-process", "pcpp", "engine-1-device"}
        for r in by.values():
            assert COMMON | {"seconds_per_step", "speedup", "cpu_seconds_per_step"} <= r.keys()
            assert r["seconds_per_step"] > 0 and r["speedup"] > 0
        assert by["one-process"]["speedup"] == 1.0 and by["pcpp"]["bands"] == 2
        assert by["pcpp"]["bytes_per_step"] > 0  # a steady pcpp call: neighbour rows only
        one = by["engine-1-device"]
        assert one["overhead_seconds"] == pytest.approx(one["seconds_per_step"] - one["plain_seconds_per_step"])
        assert one["engine_vs_plain_pct"] == pytest.approx(100 * (one["seconds_per_step"] / one["plain_seconds_per_step"] - 1))
        for r in (by["pcpp"], one):  # the call path, from the same calls: compute lies inside the host's wall time
            assert 0 < r["worker_ms"] <= r["host_ms"] == pytest.approx(1000 * r["seconds_per_step"])
            assert r["overhead_ms"] >= 0
            assert r["overhead_pct"] == pytest.approx(100 * r["overhead_ms"] / r["worker_ms"])


def test_quality_smoke(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_json(capsys, ["quality", "--json", "--sizes", "64", "--bands", "2", "--steps", "3", "--warmup", "1",
                             "--modes", "sync,pcpp", "--fractions", "0.3", "--ids", "0",
                             "--images", str(tmp_path), "--compress", "residual-1bit", "--far-refresh", ""])
    models = ["pcpp-tiny-unet", "pcpp-tiny-dit"]  # the default --models: both built-in models
    assert [(r["model"], r["mode"], r["compress"]) for r in rows] == [
        (m, mode, codec) for m in models for mode, codec in (("sync", "none"), ("pcpp", "none"), ("pcpp", "residual-1bit"))]
    for r in rows:
        assert COMMON | {"psnr_db", "max_abs"} <= r.keys()
    for m in models:
        by = {r["mode"]: r for r in rows if r["compress"] == "none" and r["model"] == m}
        assert by["sync"]["max_abs"] < 1e-3 and by["sync"]["psnr_db"] > 60  # exact up to round-off
        assert by["pcpp"]["max_abs"] > by["sync"]["max_abs"]  # step 2 used stale neighbour rows (steps 0 and 1
        # are exact: step 0's slots are never read stale, step 1 opens the next slot)
    for name in ("quality_64px_2bands.png", "quality_dit_64px_2bands.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
