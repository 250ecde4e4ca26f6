"""`bench speed`: one process vs CPU workers with the same total thread count, side by side.

The machine this runs on is usually shared and noisy, so nothing is timed in separate phases:
every round runs one plain forward pass in this process and then one call of every mode on the
same warm worker pool, and the medians of those interleaved rounds are compared. Each mode keeps
its own call slot (so its own stale buffers and warm-up count) on one pool; `Engine.new_run`
would reset every slot, which is why the modes are switched by setting `engine.patch`.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Callable

import torch

from ..config import PatchConfig, PoolConfig
from ..engine import Engine
from .common import (VAE_FACTOR, Row, base_row, build_unet, emit, fmt_bytes, median, mode_label, parse_floats,
                     parse_ints, unet_inputs)

log = logging.getLogger("pcpp.bench.speed")

Mode = tuple[str, float | None]  # (mode, pcpp fraction)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="sd15", help="sd15 (full width, random weights) or sd15-mini (smoke tests)")
    p.add_argument("--sizes", default="512,1024", help="square image sizes in pixels (latent = pixels/8)")
    p.add_argument("--modes", default="sync,pcpp,distrifusion,naive", help="engine modes to time")
    p.add_argument("--fractions", default="0.3", help="pcpp fractions to time")
    p.add_argument("--workers", type=int, default=2, help="CPU worker processes (bands)")
    p.add_argument("--threads", type=int, default=2, help="total torch threads, split evenly over the workers")
    p.add_argument("--batch", type=int, default=1, help="batch per evaluation (1 = one CFG branch)")
    p.add_argument("--steps", type=int, default=3, help="timed rounds per size (median reported)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed leading rounds; also the engine's synchronous warm-up calls")
    p.add_argument("--overhead-size", type=int, default=None,
                   help="pixels at which to time the engine on 1 device vs plain calls (default: smallest "
                        "size; 0 = skip)")
    p.add_argument("--seed", type=int, default=0)


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) used so far by this process and `pids` (Linux /proc; else this
    process only). On a shared machine CPU seconds are far steadier than wall seconds."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                fields = fh.read().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, ValueError, IndexError):
            pass
    return total


def _timed(fn: Callable[[], object], pids: list[int] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and the workers) of one call."""
    pids = pids or []
    cpu, start = _cpu_seconds(pids), time.perf_counter()
    fn()
    return time.perf_counter() - start, _cpu_seconds(pids) - cpu


def _set_patch(engine: Engine, patch: PatchConfig) -> None:
    """Switch mode for the next call without new_run(), which would reset the other slots."""
    engine.patch = patch


def _modes(args: argparse.Namespace) -> list[Mode]:
    out: list[Mode] = []
    for mode in filter(None, (m.strip() for m in args.modes.split(","))):
        out += [(mode, f) for f in parse_floats(args.fractions)] if mode == "pcpp" else [(mode, None)]
    return out


def measure_size(unet: torch.nn.Module, engine: Engine, args: argparse.Namespace, pixels: int,
                 modes: list[Mode]) -> list[Row]:
    """Interleaved rounds of the plain model and every mode on `engine`; one row per config."""
    lat = pixels // VAE_FACTOR
    x, t, kwargs = unet_inputs(args.model, args.batch, lat, lat, "cpu", args.seed)
    patches = {m: PatchConfig(mode=m[0], fraction=m[1] or 0.0, warmup_steps=args.warmup) for m in modes}
    times: dict[Mode | None, list[float]] = {m: [] for m in [None, *modes]}
    cpu: dict[Mode | None, list[float]] = {m: [] for m in [None, *modes]}
    extra: dict[Mode, dict] = {}
    engine.new_run(PatchConfig())
    for rnd in range(args.warmup + args.steps):
        with torch.inference_mode():
            wall, used = _timed(lambda: unet(x, t, **kwargs))
        times[None].append(wall)
        cpu[None].append(used)
        for m in modes:
            _set_patch(engine, patches[m])
            wall, used = _timed(lambda: engine(unet, x, t, slot=f"bench:{m}", **kwargs), engine.pool.pids)
            times[m].append(wall)
            cpu[m].append(used)
            call = engine.stats.calls[-1]
            info = extra.setdefault(m, {"compute": []})
            info.update(bytes_per_step=max(call.bytes_sent.values()), synchronous=call.synchronous)
            info["compute"].append(max(call.compute_seconds.values()))  # the slowest band's forward pass
        log.info("%dpx round %d: %s", pixels, rnd,
                 ", ".join(f"{mode_label(*m) if m else 'one process'} {v[-1]:.2f}s" for m, v in times.items()))
    base = median(times[None][args.warmup:])
    n = engine.pool_config.world_size
    per = args.threads // n
    rows = [base_row("speed", "one-process", None, 1, pixels, pixels, model=args.model, batch=args.batch,
                     layout=f"1 process x {args.threads} threads", seconds_per_step=base, speedup=1.0,
                     cpu_seconds_per_step=median(cpu[None][args.warmup:]),
                     steps=args.steps, _label="one process")]
    for m in modes:
        secs = median(times[m][args.warmup:])
        info = extra[m]
        if info["synchronous"] and m[0] != "sync":
            log.warning("%s: the timed calls were still warm-up calls; raise --steps", mode_label(*m))
        rows.append(base_row(
            "speed", m[0], m[1], n, pixels, pixels, model=args.model, batch=args.batch,
            layout=f"{n} workers x {per} thread{'s' * (per > 1)}", seconds_per_step=secs, speedup=base / secs,
            steps=args.steps, bytes_per_step=info["bytes_per_step"],
            compute_seconds_max=median(info["compute"][args.warmup:]),
            cpu_seconds_per_step=median(cpu[m][args.warmup:]),
            _label=mode_label(*m), _bytes_per_step=fmt_bytes(info["bytes_per_step"])))
    return rows


def measure_overhead(unet: torch.nn.Module, args: argparse.Namespace, pixels: int) -> Row:
    """The engine on one worker (all threads, nothing exchanged) vs plain calls, interleaved."""
    lat = pixels // VAE_FACTOR
    x, t, kwargs = unet_inputs(args.model, args.batch, lat, lat, "cpu", args.seed)
    engine = Engine(PoolConfig(devices=("cpu",), threads_per_worker=args.threads))
    plain: list[tuple[float, float]] = []
    wrapped: list[tuple[float, float]] = []
    try:
        engine.new_run(PatchConfig(warmup_steps=args.warmup))
        for _ in range(args.warmup + args.steps):
            with torch.inference_mode():
                plain.append(_timed(lambda: unet(x, t, **kwargs)))
            wrapped.append(_timed(lambda: engine(unet, x, t, slot="bench:overhead", **kwargs), engine.pool.pids))
    finally:
        engine.shutdown()
    base = median([w for w, _ in plain[args.warmup:]])
    eng = median([w for w, _ in wrapped[args.warmup:]])
    return base_row("speed", "engine-1-device", None, 1, pixels, pixels, model=args.model, batch=args.batch,
                    layout=f"1 worker x {args.threads} threads", seconds_per_step=eng, speedup=base / eng,
                    steps=args.steps, plain_seconds_per_step=base, overhead_seconds=eng - base,
                    cpu_seconds_per_step=median([c for _, c in wrapped[args.warmup:]]),
                    plain_cpu_seconds_per_step=median([c for _, c in plain[args.warmup:]]),
                    _label="engine, 1 device")


def run(args: argparse.Namespace) -> int:
    if args.threads % args.workers:
        raise SystemExit(f"--threads {args.threads} must be a multiple of --workers {args.workers}")
    torch.set_num_threads(args.threads)
    sizes = parse_ints(args.sizes)
    modes = _modes(args)
    t0 = time.perf_counter()
    unet = build_unet(args.model, "cpu", args.seed)
    log.info("built %s with random weights in %.1f s", args.model, time.perf_counter() - t0)
    rows: list[Row] = []
    engine = Engine(PoolConfig(devices=("cpu",) * args.workers, threads_per_worker=args.threads // args.workers))
    try:
        for pixels in sizes:
            rows += measure_size(unet, engine, args, pixels, modes)
    finally:
        engine.shutdown()
    overhead = min(sizes) if args.overhead_size is None else args.overhead_size
    if overhead:
        rows.append(measure_overhead(unet, args, overhead))
    emit(rows, [("model", "model"), ("pixels", "height"), ("mode", "label"), ("layout", "layout"),
                ("s/step", "seconds_per_step"), ("speedup", "speedup"), ("overhead s", "overhead_seconds"),
                ("CPU s/step", "cpu_seconds_per_step"), ("max band compute s", "compute_seconds_max"),
                ("bytes/step", "bytes_per_step")],
         as_json=args.json, save=args.save,
         title="bench speed: seconds per step, one process vs CPU workers (same total threads)",
         notes=[f"one step = one model evaluation, batch {args.batch}; median of {args.steps} interleaved rounds "
                f"after {args.warmup} untimed round(s) (= the engine's synchronous warm-up calls)",
                "speedup = one process s/step / this row's s/step, measured in the same rounds",
                "CPU s/step: CPU seconds of every process involved (host + workers), steadier than wall time "
                "on a shared machine; less CPU than one process = less work (smaller attention windows)",
                "engine, 1 device: the whole engine path (pickling, worker, band layers inactive) vs plain "
                "model calls in this process; its speedup < 1 is the overhead",
                f"{args.model} with random weights (seed {args.seed}): speed only, the output is noise"])
    return 0
