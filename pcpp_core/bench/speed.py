"""`bench speed`: one process vs CPU workers with the same total thread count, side by side.

The machine this runs on is usually shared and noisy, so nothing is timed in separate phases:
every round runs one plain forward pass in this process and then one call of every mode on the
same warm worker pool, and the medians of those interleaved rounds are compared. Each mode keeps
its own call slot (so its own stale buffers and warm-up count) on one pool; `Engine.new_run`
would reset every slot, which is why the modes are switched by setting `engine.patch`.

The call path's cost is read off the same calls: host ms (the call's wall time on the host)
against worker ms (the slowest worker's model forward, timed inside the worker, the device
synchronised before each clock reading); overhead % = (host - worker) / worker. The bundled
tiny model at 64² (--tiny-size), where a step is tens of milliseconds as on a GPU, shows it
most plainly.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

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
    p.add_argument("--tiny-size", type=int, default=64,
                   help="pixels at which to time the bundled tiny trained model too (every mode and the "
                        "1-device engine), where the call path's overhead shows; 0 = skip")
    p.add_argument("--tiny-steps", type=int, default=10, help="timed rounds for the tiny model (median)")
    p.add_argument("--seed", type=int, default=0)


@dataclass
class Case:
    """One model at one size: what every row of it is measured on."""

    model: str  # the rows' model field
    pixels: int
    unet: torch.nn.Module
    inputs: tuple[torch.Tensor, torch.Tensor, dict[str, Any]]  # (x, t, kwargs)
    steps: int  # timed rounds


def sd_case(unet: torch.nn.Module, args: argparse.Namespace, pixels: int) -> Case:
    lat = pixels // VAE_FACTOR
    return Case(args.model, pixels, unet, unet_inputs(args.model, args.batch, lat, lat, "cpu", args.seed), args.steps)


def tiny_case(args: argparse.Namespace) -> Case:
    """The bundled trained pixel-space model (3 channels, no VAE), prompts 0.. as its context."""
    from ..tiny_model import load_tiny_unet

    unet, emb, _ = load_tiny_unet()
    gen = torch.Generator().manual_seed(args.seed)
    px = args.tiny_size
    x = torch.randn(args.batch, 3, px, px, generator=gen)  # [B, 3, px, px]
    t = torch.full((args.batch,), 500.0)
    ctx = emb[torch.arange(args.batch) % emb.shape[0]]  # [B, 4, 64]
    return Case("tiny", px, unet, (x, t, {"encoder_hidden_states": ctx}), args.tiny_steps)


def call_path(host: list[float], worker: list[float]) -> dict[str, float]:
    """Host ms, worker ms, overhead ms and % from the same calls (seconds, one entry per call).

    Each call's worker compute lies inside its host wall time, so worker_ms <= host_ms and the
    overhead is never negative; the overhead is the median of the per-call differences.
    """
    host_ms, worker_ms = 1000 * median(host), 1000 * median(worker)
    over = 1000 * median([h - w for h, w in zip(host, worker)])
    return {"host_ms": host_ms, "worker_ms": worker_ms, "overhead_ms": over,
            "overhead_pct": 100 * over / worker_ms if worker_ms > 0 else math.nan}


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


def measure_size(case: Case, engine: Engine, args: argparse.Namespace, modes: list[Mode]) -> list[Row]:
    """Interleaved rounds of the plain model and every mode on `engine`; one row per config."""
    unet, (x, t, kwargs), pixels = case.unet, case.inputs, case.pixels
    patches = {m: PatchConfig(mode=m[0], fraction=m[1] or 0.0, warmup_steps=args.warmup) for m in modes}
    times: dict[Mode | None, list[float]] = {m: [] for m in [None, *modes]}
    cpu: dict[Mode | None, list[float]] = {m: [] for m in [None, *modes]}
    extra: dict[Mode, dict] = {}
    engine.new_run(PatchConfig())
    for rnd in range(args.warmup + case.steps):
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
            info = extra.setdefault(m, {"compute": [], "host": []})
            info.update(bytes_per_step=max(call.bytes_sent.values()), synchronous=call.synchronous)
            info["compute"].append(max(call.compute_seconds.values()))  # the slowest band's forward pass
            info["host"].append(wall)  # the same call on the host, end to end
        log.info("%s %dpx round %d: %s", case.model, pixels, rnd,
                 ", ".join(f"{mode_label(*m) if m else 'one process'} {v[-1]:.3f}s" for m, v in times.items()))
    skip = args.warmup
    base = median(times[None][skip:])
    n = engine.pool_config.world_size
    per = args.threads // n
    rows = [base_row("speed", "one-process", None, 1, pixels, pixels, model=case.model, batch=args.batch,
                     layout=f"1 process x {args.threads} threads", seconds_per_step=base, speedup=1.0,
                     cpu_seconds_per_step=median(cpu[None][skip:]),
                     steps=case.steps, _label="one process")]
    for m in modes:
        secs = median(times[m][skip:])
        info = extra[m]
        if info["synchronous"] and m[0] != "sync":
            log.warning("%s: the timed calls were still warm-up calls; raise --steps", mode_label(*m))
        rows.append(base_row(
            "speed", m[0], m[1], n, pixels, pixels, model=case.model, batch=args.batch,
            layout=f"{n} workers x {per} thread{'s' * (per > 1)}", seconds_per_step=secs, speedup=base / secs,
            steps=case.steps, bytes_per_step=info["bytes_per_step"],
            compute_seconds_max=median(info["compute"][skip:]),
            cpu_seconds_per_step=median(cpu[m][skip:]),
            **call_path(info["host"][skip:], info["compute"][skip:]),
            _label=mode_label(*m), _bytes_per_step=fmt_bytes(info["bytes_per_step"])))
    return rows


def measure_overhead(case: Case, engine: Engine, args: argparse.Namespace) -> Row:
    """The engine on one worker (all threads, nothing exchanged) vs plain calls, interleaved."""
    unet, (x, t, kwargs), pixels = case.unet, case.inputs, case.pixels
    plain: list[tuple[float, float]] = []
    wrapped: list[tuple[float, float]] = []
    compute: list[float] = []  # the worker's model forward in each engine call
    engine.new_run(PatchConfig(warmup_steps=args.warmup))
    for _ in range(args.warmup + case.steps):
        with torch.inference_mode():
            plain.append(_timed(lambda: unet(x, t, **kwargs)))
        wrapped.append(_timed(lambda: engine(unet, x, t, slot="bench:overhead", **kwargs), engine.pool.pids))
        compute.append(max(engine.stats.calls[-1].compute_seconds.values()))
    skip = args.warmup
    base = median([w for w, _ in plain[skip:]])
    eng = median([w for w, _ in wrapped[skip:]])
    return base_row("speed", "engine-1-device", None, 1, pixels, pixels, model=case.model, batch=args.batch,
                    layout=f"1 worker x {args.threads} threads", seconds_per_step=eng, speedup=base / eng,
                    steps=case.steps, plain_seconds_per_step=base, overhead_seconds=eng - base,
                    engine_vs_plain_pct=100 * (eng / base - 1),
                    cpu_seconds_per_step=median([c for _, c in wrapped[skip:]]),
                    plain_cpu_seconds_per_step=median([c for _, c in plain[skip:]]),
                    **call_path([w for w, _ in wrapped[skip:]], compute[skip:]),
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
    overhead = min(sizes) if args.overhead_size is None else args.overhead_size
    tiny = tiny_case(args) if args.tiny_size else None
    rows: list[Row] = []
    tiny_rows: list[Row] = []
    engine = Engine(PoolConfig(devices=("cpu",) * args.workers, threads_per_worker=args.threads // args.workers))
    one = Engine(PoolConfig(devices=("cpu",), threads_per_worker=args.threads))
    try:
        for pixels in sizes:
            rows += measure_size(sd_case(unet, args, pixels), engine, args, modes)
        if tiny is not None:
            tiny_rows += measure_size(tiny, engine, args, modes)
        engine.shutdown()  # its workers' threads would compete with the 1-device engine's
        if overhead:
            rows.append(measure_overhead(sd_case(unet, args, overhead), one, args))
        if tiny is not None:
            tiny_rows.append(measure_overhead(tiny, one, args))
    finally:
        engine.shutdown()
        one.shutdown()
    emit(rows + tiny_rows,
         [("model", "model"), ("pixels", "height"), ("mode", "label"), ("layout", "layout"),
          ("s/step", "seconds_per_step"), ("speedup", "speedup"), ("host ms", "host_ms"),
          ("worker ms", "worker_ms"), ("overhead %", "overhead_pct"), ("vs direct %", "engine_vs_plain_pct"),
          ("CPU s/step", "cpu_seconds_per_step"), ("bytes/step", "bytes_per_step")],
         as_json=args.json, save=args.save,
         title="bench speed: seconds per step, one process vs CPU workers (same total threads)",
         notes=[f"one step = one model evaluation, batch {args.batch}; median of {args.steps} interleaved rounds "
                f"({args.tiny_steps} for the tiny model) after {args.warmup} untimed round(s) (= the engine's "
                "synchronous warm-up calls)",
                "speedup = one process s/step / this row's s/step, measured in the same rounds",
                "host ms: the engine call's wall time on the host; worker ms: the slowest worker's model forward, "
                "timed inside it, in the same calls; overhead % = (host - worker) / worker: pickling, transport, "
                "per-call set-up (median of the per-call differences)",
                "CPU s/step: CPU seconds of every process involved (host + workers), steadier than wall time "
                "on a shared machine; less CPU than one process = less work (smaller attention windows)",
                "engine, 1 device: the whole engine path (pickling, worker, band layers inactive) vs plain "
                "model calls in this process; vs direct % = its s/step over theirs",
                f"{args.model} with random weights (seed {args.seed}): speed only, the output is noise; tiny = the "
                "bundled trained model (pixel space, no VAE)"])
    return 0
