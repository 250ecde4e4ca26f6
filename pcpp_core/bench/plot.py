"""`bench plot`: PNG charts from the JSON lines the other parts write with `--save` (or `--json`).

Reads rows, never measures (so charts of an hour-long speed run cost nothing to redraw); when
no comm rows are given it counts the default comm table itself, which is analytic and quick.
matplotlib is a development dependency (requirements-dev.txt), imported only here.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections import defaultdict
from typing import Any

from .common import Row, mode_label

log = logging.getLogger("pcpp.bench.plot")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="JSON-lines files written by the other parts (--save or --json)")
    p.add_argument("--out", default="bench-charts", help="folder for the PNG files")


def load_rows(paths: list[str]) -> list[Row]:
    rows: list[Row] = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                line = line.strip()
                if not line.startswith("{"):
                    continue  # tolerate tables or logs mixed into a captured stdout
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: not a JSON object: {e}") from None
    return rows


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("bench plot needs matplotlib: pip install -r requirements-dev.txt") from e
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_comm(plt: Any, rows: list[Row], path: str) -> None:
    """Bytes per step against the pcpp fraction, one panel per model/size, one line per band
    count; distrifusion as a dashed level of the same colour (uncompressed rows only)."""
    rows = [r for r in rows if r.get("compress", "none") == "none"]
    cases = sorted({(r["model"], r["height"]) for r in rows}, key=lambda c: (c[0], c[1]))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.6), squeeze=False)
    for ax, (model, px) in zip(axes[0], cases):
        sub = [r for r in rows if (r["model"], r["height"]) == (model, px)]
        for i, n in enumerate(sorted({r["bands"] for r in sub})):
            color = f"C{i}"
            pcpp = sorted((r["fraction"], r["bytes_per_step"] / 1e6) for r in sub if r["bands"] == n and r["mode"] == "pcpp")
            if pcpp:
                ax.plot(*zip(*pcpp), "o-", color=color, label=f"pcpp, {n} devices")
            for r in sub:
                if r["bands"] == n and r["mode"] == "distrifusion":
                    ax.axhline(r["bytes_per_step"] / 1e6, color=color, ls="--", lw=1,
                               label=f"distrifusion, {n} devices")
        ax.set_title(f"{model} {px}x{px}")
        ax.set_xlabel("pcpp fraction f")
        ax.set_ylabel("MB sent per device per step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Communication per step (analytic, max over devices; naive sends 0)")
    _save(fig, plt, path)


def plot_speed(plt: Any, rows: list[Row], path: str) -> None:
    """Speed-up over one process per mode, grouped by image size; the 1-device engine row
    shows the overhead (below 1)."""
    sizes = sorted({r["height"] for r in rows})
    labels = list(dict.fromkeys(mode_label(r["mode"], r["fraction"]) for r in rows if r["mode"] != "one-process"))
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(labels) * len(sizes) / 2, 3.8))
    width = 0.8 / max(1, len(sizes))
    for j, px in enumerate(sizes):
        by = {mode_label(r["mode"], r["fraction"]): r["speedup"] for r in rows if r["height"] == px}
        xs = [i + j * width for i in range(len(labels))]
        ax.bar(xs, [by.get(lab, 0) for lab in labels], width, label=f"{px}x{px}")
    ax.axhline(1.0, color="black", lw=1)
    ax.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(labels))], labels, rotation=20)
    ax.set_ylabel("speed-up vs one process")
    model = rows[0].get("model", "")
    ax.set_title(f"{model}: CPU workers vs one process, same total threads (measured)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, plt, path)


def plot_quality(plt: Any, rows: list[Row], path: str) -> None:
    """PSNR of the final sample against the fraction; other modes as levels (uncompressed rows)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[tuple[int, int], list[Row]] = defaultdict(list)
    for r in (r for r in rows if r.get("compress", "none") == "none"):
        groups[(r["height"], r["bands"])].append(r)
    for i, ((px, n), sub) in enumerate(sorted(groups.items())):
        color = f"C{i}"
        pcpp = sorted((r["fraction"], r["psnr_db"]) for r in sub if r["mode"] == "pcpp")
        if pcpp:
            ax.plot(*zip(*pcpp), "o-", color=color, label=f"pcpp {px}px {n} bands")
        for r in sub:
            style = {"distrifusion": "--", "naive": ":"}.get(r["mode"])
            if style:
                ax.axhline(r["psnr_db"], color=color, ls=style, lw=1, label=f"{r['mode']} {px}px {n} bands")
    ax.set_xlabel("pcpp fraction f")
    ax.set_ylabel("PSNR vs one process (dB)")
    ax.set_title(f"Final-sample fidelity ({rows[0].get('model', 'tiny trained model')}; sync is exact)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    _save(fig, plt, path)


def plot_model(plt: Any, rows: list[Row], path: str) -> None:
    """Modelled speed-up against GPU count: a row of panels per link, a column per image size,
    a line per mode; the paper's DistriFusion 3840^2 figures as stars where they apply."""
    links = sorted({r["link"] for r in rows})
    sizes = sorted({r["height"] for r in rows})
    fig, axes = plt.subplots(len(links), len(sizes), figsize=(4 * len(sizes), 3.4 * len(links)), squeeze=False,
                             sharey=True)
    for i, link in enumerate(links):
        for j, px in enumerate(sizes):
            ax = axes[i][j]
            sub = [r for r in rows if (r["link"], r["height"]) == (link, px)]
            series: dict[str, list[tuple[int, float]]] = defaultdict(list)
            for r in sub:
                series[mode_label(r["mode"], r["fraction"])].append((r["bands"], r["predicted_speedup"]))
            for label, pts in series.items():
                ax.plot(*zip(*sorted(pts)), "o-", label=label)
            gpus = sorted({r["bands"] for r in sub})
            ax.plot(gpus, gpus, color="grey", lw=0.8, ls=":", label="linear")
            paper = sorted((r["bands"], r["paper_speedup"]) for r in sub if r.get("paper_speedup"))
            if paper:
                ax.plot(*zip(*paper), "k*", ms=10, label="paper: distrifusion")
            ax.set_xticks(gpus)
            ax.set_title(f"{px}x{px}, {link} ({sub[0]['bandwidth_gbps']:g} GB/s)", fontsize=9)
            ax.set_xlabel("GPUs")
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("predicted speed-up")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{rows[0].get('model', '')}: MODELLED multi-GPU speed-up (not measured)")
    _save(fig, plt, path)


def plot_codecs(plt: Any, rows: list[Row], path: str) -> None:
    """Bytes against PSNR per mode and codec (quality rows that carry bytes_per_step): bytes as a
    fraction of uncompressed distrifusion's at the same size and band count; the Pareto front
    (fewest bytes for at least that PSNR) as a line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    groups: dict[tuple[int, int], list[Row]] = defaultdict(list)
    for r in rows:
        if r.get("bytes_per_step") and r["mode"] in ("pcpp", "distrifusion"):
            groups[(r["height"], r["bands"])].append(r)
    for i, ((px, n), sub) in enumerate(sorted(groups.items())):
        base = next((r["bytes_per_step"] for r in sub if r["mode"] == "distrifusion"
                     and r.get("compress", "none") == "none"), None)
        if not base:
            continue
        pts = sorted((r["bytes_per_step"] / base, r["psnr_db"],
                      mode_label(r["mode"], r["fraction"], r.get("compress"), r.get("far_refresh"), r.get("far_pool"))) for r in sub)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", s=14, label=f"{px}px {n} bands")
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=5, xytext=(3, 2), textcoords="offset points")
        front, best = [], -1e9
        for x, y, _ in pts:
            if y > best:
                front.append((x, y))
                best = y
        ax.plot(*zip(*front), "-", color=f"C{i}", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per step / uncompressed distrifusion's")
    ax.set_ylabel("PSNR vs one process (dB)")
    ax.set_title("Bytes vs fidelity per codec (tiny trained model, fp32); line: Pareto front", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6)
    _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("wrote %s", path)


CHARTS = {"comm": plot_comm, "speed": plot_speed, "quality": plot_quality, "model": plot_model}
DERIVED = {"codecs": ("quality", plot_codecs)}  # more charts from another part's rows


def _by_model(rows: list[Row]) -> dict[str, list[Row]]:
    """Quality rows by chart suffix: "" for the tiny UNet (and rows without a model, from older
    files), "_dit" for pcpp-tiny-dit, so the two models' PSNRs are never drawn as one curve."""
    out: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        model = r.get("model") or "pcpp-tiny-unet"
        out["" if model == "pcpp-tiny-unet" else "_" + model.removeprefix("pcpp-tiny-")].append(r)
    return out


def run(args: argparse.Namespace) -> int:
    plt = _pyplot()
    rows = load_rows(args.inputs)
    by_bench: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_bench[r.get("bench", "")].append(r)
    if not by_bench["comm"]:
        from .comm import DEFAULT_CASES, comm_rows

        cases = [(m, int(px)) for m, _, px in (c.partition(":") for c in DEFAULT_CASES.split(","))]
        by_bench["comm"] = comm_rows(cases, [2, 4, 8], [0.1, 0.3, 0.5, 1.0], 2, 2)
    parts = {name: {"": by_bench[name]} for name in CHARTS}  # chart -> file suffix -> rows
    parts["quality"] = _by_model(by_bench["quality"])
    os.makedirs(args.out, exist_ok=True)
    written: list[tuple[str, str]] = []
    for name, chart in CHARTS.items():
        if not any(parts[name].values()):
            log.warning("no %s rows given: %s chart skipped", name, name)
        for suffix, sub in parts[name].items():
            if sub:
                path = os.path.join(args.out, f"{name}{suffix}.png")
                chart(plt, sub, path)
                written.append((name + suffix, path))
    for name, (source, chart) in DERIVED.items():
        for suffix, sub in parts[source].items():
            if any(r.get("compress", "none") != "none" for r in sub):
                path = os.path.join(args.out, f"{name}{suffix}.png")
                chart(plt, sub, path)
                written.append((name + suffix, path))
    for name, path in written:
        print(json.dumps({"bench": "plot", "chart": name, "path": path}) if args.json else f"wrote {path}")
    return 0
