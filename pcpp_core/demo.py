"""The main job: one picture from the built-in model, on one process and on CPU workers.

    python -m pcpp_core demo [--model unet|dit] [--devices cpu:2] [--mode pcpp] [--fraction 0.3]
                             [--size 64] [--steps 20] [--json] [--out out/demo.png]

Prints the single-process and parallel sampling time, bytes sent per step and the deviation
of the parallel result from the single-process one, and writes both images side by side.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import torch

from .config import Mode, PatchConfig, PoolConfig, parse_devices
from .engine import Engine
from .errors import PCPPError
from .demo_models import MODELS, load_demo_model
from .tiny_model import NAMES


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pcpp_core demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="unet", choices=MODELS,
                   help="built-in model: unet (pcpp-tiny-unet) or dit (pcpp-tiny-dit, ComfyUI's Flux layout)")
    p.add_argument("--devices", default="cpu:2", help="cpu:N, auto (all CUDA GPUs) or cuda:0,cuda:1")
    p.add_argument("--mode", default="pcpp", choices=[m.value for m in Mode])
    p.add_argument("--fraction", type=float, default=0.3, help="neighbour rows in band heights (pcpp)")
    p.add_argument("--warmup", type=int, default=4, help="synchronous warm-up steps")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (unet: pixel space; dit: a multiple of 8)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--image", default="astronaut", choices=NAMES, help="which training image to draw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("out", "demo.png"))
    p.add_argument("--json", action="store_true", help="print one machine-readable summary line")
    return p.parse_args(argv)


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 2.0) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).double().pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def save_side_by_side(path: str, images: list[torch.Tensor]) -> None:
    from PIL import Image

    row = torch.cat([((im[0].clamp(-1, 1) + 1) * 127.5).round().byte() for im in images], dim=2)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(row.permute(1, 2, 0).numpy()).save(path)


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        patch = PatchConfig(mode=a.mode, fraction=a.fraction, warmup_steps=a.warmup)
        pool = PoolConfig(devices=parse_devices(a.devices), threads_per_worker=None)
    except PCPPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = load_demo_model(a.model)
    image_id = NAMES.index(a.image)
    cond = model.emb[image_id:image_id + 1]
    try:
        noise = model.noise(1, a.size, a.seed)
    except PCPPError as e:
        print(f"error: --{e}", file=sys.stderr)
        return 2

    # one process, all cores
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    ref = model.decode(model.sample(model.plain(), cond, noise, a.steps, a.cfg))
    t_single = time.perf_counter() - t0

    engine = Engine(pool)
    try:
        t0 = time.perf_counter()
        engine.load(model.module)  # start the pool and send the weights once (not part of a step)
        t_start = time.perf_counter() - t0
        engine.new_run(patch)
        t0 = time.perf_counter()
        out = model.decode(model.sample(model.on(engine), cond, noise, a.steps, a.cfg))
        t_parallel = time.perf_counter() - t0
        summary = engine.stats.summary()
    except PCPPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        engine.shutdown()

    save_side_by_side(a.out, [ref, out, (out - ref) * 4])
    result = {
        "model": model.name, "mode": patch.mode.value, "fraction": patch.fraction, "devices": list(pool.devices),
        "bands": summary["bands"], "size": a.size, "steps": a.steps, "image": a.image,
        "single_s": round(t_single, 3), "parallel_s": round(t_parallel, 3),
        "speedup": round(t_single / t_parallel, 3), "pool_start_and_load_s": round(t_start, 3),
        "bytes_per_step": summary["bytes_per_call"], "bytes_per_step_warmup": summary["bytes_per_call_warmup"],
        "psnr_db": round(psnr(out, ref), 2), "max_abs": round((out - ref).abs().max().item(), 5),
        "threads": {"single": torch.get_num_threads(), "per_worker": pool.worker_threads()},
        "out": a.out,
    }
    if a.json:
        print(json.dumps(result))
        return 0
    print(f"PCPP demo: {model.name}, {a.image}, {a.size}x{a.size} px, {a.steps} Euler steps, CFG {a.cfg}, "
          f"{len(pool.devices)} x {pool.devices[0]} ({result['bands']} bands), mode {patch.mode.value}"
          + (f", fraction {patch.fraction:g}" if patch.mode is Mode.PCPP else ""))
    print(f"  one process ({result['threads']['single']} threads): {t_single:8.2f} s")
    print(f"  parallel ({len(pool.devices)} workers x {result['threads']['per_worker']} threads): {t_parallel:8.2f} s"
          f"   speed-up {result['speedup']:.2f}x   (pool start + model load {t_start:.1f} s, once)")
    print(f"  bytes sent per step (max over devices): {result['bytes_per_step']:,} after warm-up, "
          f"{result['bytes_per_step_warmup']:,} in warm-up")
    print(f"  deviation from one process: PSNR {result['psnr_db']} dB, max abs {result['max_abs']}")
    print(f"  wrote {a.out} (one process | parallel | 4x difference)")
    return 0
