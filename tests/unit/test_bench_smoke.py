"""SMOKE tests of `python -m pcpp_core bench`: each part that needs no worker runs at a tiny size.

Benchmarks are not tests; these only prove that every part runs, prints the documented JSON
fields, and that the figures are sane (the dist twin covers the parts that start workers).
"""
from __future__ import annotations

import json

import pytest

from pcpp_core.bench import main

pytest.importorskip("diffusers")

COMMON = {"bench", "mode", "fraction", "bands", "height", "width"}


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[dict]:
    assert main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    rows = [json.loads(ln) for ln in lines]
    assert rows, f"{argv} printed no rows"
    return rows


def test_comm_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_json(capsys, ["comm", "--json", "--no-check", "--cases", "sd15-mini:256,sdxl-mini:256",
                             "--bands", "2,4", "--fractions", "0.3,1.0"])
    assert {r["model"] for r in rows} == {"sd15-mini", "sdxl-mini"}
    for r in rows:
        assert COMMON | {"bytes_per_step", "ratio_vs_distrifusion"} <= r.keys()
        assert r["bench"] == "comm" and r["height"] == r["width"] == 256
    for case in {(r["model"], r["bands"]) for r in rows}:
        by = {(r["mode"], r["fraction"]): r for r in rows if (r["model"], r["bands"]) == case
              and r["compress"] == "none" and not r["far_refresh"]}
        coded = {(r["mode"], r["compress"], r["far_refresh"], r["far_pool"]): r["bytes_per_step"] for r in rows
                 if (r["model"], r["bands"]) == case and r["fraction"] in (None, 0.3)}
        # every codec's row for pcpp f=0.3 and distrifusion, each smaller than uncompressed
        assert coded[("pcpp", "residual-1bit", 0, 1)] < coded[("pcpp", "residual-2bit", 0, 1)] < \
            coded[("pcpp", "int8", 0, 1)] < coded[("pcpp", "none", 0, 1)]
        assert coded[("distrifusion", "residual-2bit", 0, 1)] < coded[("distrifusion", "none", 0, 1)]
        assert coded[("pcpp", "none", 0, 1)] < coded[("pcpp", "none", 2, 1)] < coded[("distrifusion", "none", 0, 1)]
        # the default far rows: pooled for the residual codecs only, pooling saves bytes
        assert ("pcpp", "int8", 2, 16) not in coded and ("pcpp", "none", 2, 16) not in coded
        assert coded[("pcpp", "residual-2bit", 0, 1)] < coded[("pcpp", "residual-2bit", 2, 16)] < \
            coded[("pcpp", "residual-2bit", 2, 1)]
        distri = by[("distrifusion", None)]["bytes_per_step"]
        assert by[("naive", None)]["bytes_per_step"] == 0
        assert 0 < by[("pcpp", 0.3)]["bytes_per_step"] < distri
        assert by[("pcpp", 0.3)]["bytes_per_step"] <= by[("pcpp", 1.0)]["bytes_per_step"] <= distri
        assert by[("distrifusion", None)]["ratio_vs_distrifusion"] == 1.0
    with_2 = {r["mode"]: r for r in rows if (r["model"], r["bands"], r["fraction"]) == ("sd15-mini", 2, 1.0)
              and r["compress"] == "none"}
    assert with_2["pcpp"]["bytes_per_step"] == next(  # f=1 with 2 bands sees the whole image
        r["bytes_per_step"] for r in rows if (r["model"], r["bands"], r["mode"], r["compress"]) ==
        ("sd15-mini", 2, "distrifusion", "none"))


def test_comm_table_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["comm", "--no-check", "--cases", "sd15-mini:128", "--bands", "2", "--fractions", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "bytes/step" in out and "pcpp f=0.3" in out and "distrifusion" in out


def test_model_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_json(capsys, ["model", "--json", "--model", "sdxl-mini", "--sizes", "256,512", "--gpus", "2,4",
                             "--ref-size", "256", "--gpu-step-ms", "100", "--fixed-ms", "10"])
    for r in rows:
        assert COMMON | {"predicted_speedup", "predicted_compute_ms", "predicted_comm_ms", "link"} <= r.keys()
        assert r["modelled"] is True and 0 < r["predicted_speedup"] <= r["bands"] * 1.5
    one = {(r["mode"], r["link"]): r for r in rows if (r["height"], r["bands"]) == (512, 4)}
    # fewer bytes never predict a slower run; a faster link never predicts a slower run
    assert one[("pcpp", "pcie4")]["predicted_comm_ms"] < one[("distrifusion", "pcie4")]["predicted_comm_ms"]
    assert one[("sync", "nvlink")]["predicted_speedup"] >= one[("sync", "pcie4")]["predicted_speedup"]
    assert one[("naive", "pcie4")]["predicted_comm_ms"] == 0


def test_speed_call_path_fields() -> None:
    """bench speed's host/worker/overhead figures, from per-call seconds (the workers' part is
    in the dist smoke test)."""
    from pcpp_core.bench.speed import call_path

    f = call_path([0.100, 0.120, 0.300], [0.080, 0.110, 0.050])  # host s, worker s: the same three calls
    assert f["host_ms"] == pytest.approx(120.0) and f["worker_ms"] == pytest.approx(80.0)
    assert f["overhead_ms"] == pytest.approx(20.0)  # median of 20, 10 and 250 ms, not 120 - 80
    assert f["overhead_pct"] == pytest.approx(25.0)
    assert f["worker_ms"] <= f["host_ms"]


def test_plot_smoke(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    rows = [
        {"bench": "speed", "mode": m, "fraction": f, "bands": b, "height": 128, "width": 128, "speedup": s,
         "model": "sd15-mini"}
        for m, f, b, s in [("one-process", None, 1, 1.0), ("pcpp", 0.3, 2, 1.4), ("naive", None, 2, 1.8)]
    ] + [
        {"bench": "quality", "mode": m, "fraction": f, "bands": 2, "height": 64, "width": 64, "psnr_db": p}
        for m, f, p in [("pcpp", 0.1, 20.0), ("pcpp", 0.3, 24.0), ("distrifusion", None, 26.0), ("naive", None, 15.0)]
    ] + [
        {"bench": "quality", "mode": m, "fraction": f, "bands": 2, "height": 64, "width": 64, "psnr_db": p,
         "model": "pcpp-tiny-dit"}
        for m, f, p in [("pcpp", 0.3, 28.0), ("distrifusion", None, 41.0)]
    ] + [
        {"bench": "comm", "mode": m, "fraction": f, "bands": 2, "height": 512, "width": 512, "model": "sd15",
         "bytes_per_step": v}
        for m, f, v in [("pcpp", 0.3, 2e7), ("pcpp", 1.0, 5e7), ("distrifusion", None, 5e7), ("naive", None, 0)]
    ]
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json, a captured table line\n")
    out = tmp_path / "charts"
    assert main(["plot", str(src), "--out", str(out)]) == 0
    for name in ("comm", "speed", "quality", "quality_dit"):  # each model's quality rows on their own chart
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (out / "model.png").exists()  # no model rows given: skipped, not invented
