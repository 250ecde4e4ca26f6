"""`bench quality`: how far each mode's final sample is from the one-process sample.

A whole sampling run matters, not one step: stale activations feed back through every later
step. The bundled tiny model is trained (a memorisation model, pixel space), so its samples are
real images whose errors can be looked at; one process and the engine run exactly the same
Euler loop with classifier-free guidance batched as [cond; uncond], one call per step.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
from typing import Callable

import torch

from ..codecs import NONE, codec_names
from ..config import RESIDUAL_FAR_POOL, PoolConfig
from ..engine import Engine
from ..demo_models import DemoModel, load_demo_model
from .comm import Variant, far_variants, parse_codecs
from .common import Row, base_row, emit, parse_floats, parse_ints

log = logging.getLogger("pcpp.bench.quality")

PSNR_CAP_DB = 120.0  # identical samples would be infinite; JSON has no infinity


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="unet,dit", help="built-in models, comma-separated: unet (pcpp-tiny-unet, "
                   "pixel space), dit (pcpp-tiny-dit, ComfyUI's Flux layout; sizes multiple of 8)")
    p.add_argument("--sizes", default="64,128", help="square image sizes in pixels")
    p.add_argument("--bands", default="2,4", help="worker (band) counts")
    p.add_argument("--modes", default="sync,pcpp,distrifusion,naive")
    p.add_argument("--fractions", default="0.1,0.3,0.5,1.0", help="pcpp fractions")
    p.add_argument("--steps", type=int, default=20, help="Euler steps of the sampling run")
    p.add_argument("--warmup", type=int, default=4, help="synchronous warm-up steps (engine default)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--ids", default="0,5,8", help="image ids sampled together as one batch (see the model README)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--images", metavar="DIR", help="save side-by-side PNGs of the final samples here")
    p.add_argument("--compress", default=",".join(codec_names()),
                   help="exchange codecs run for pcpp at --codec-fractions and distrifusion (when in --modes)")
    p.add_argument("--codec-fractions", default="0.3", help="pcpp fractions that get a run per codec")
    p.add_argument("--far-refresh", default="2", help="pcpp far_refresh values run per codec (empty: none)")
    p.add_argument("--far-pool", default=f"1,{RESIDUAL_FAR_POOL}",
                   help="far_pool values per far_refresh (above 1: residual codecs)")


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2), clamped first as a decoder would."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).double().pow(2).mean().item()
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(4.0 / mse))


def sample(model: DemoModel, model_fn: Callable[..., torch.Tensor], cond: torch.Tensor, noise: torch.Tensor,
           args: argparse.Namespace) -> torch.Tensor:
    """The final image [n, 3, H, W] of one Euler run with CFG batched as [cond; uncond]."""
    return model.decode(model.sample(model_fn, cond, noise, args.steps, args.cfg))


def _modes(args: argparse.Namespace) -> list[Variant]:
    """Every mode uncompressed, then for each codec: pcpp at --codec-fractions (window only, and
    with each --far-refresh) and distrifusion. Uncompressed far-refresh runs come with the codecs."""
    modes = [m for m in (m.strip() for m in args.modes.split(",")) if m]
    out: list[Variant] = []
    for mode in modes:
        fs = parse_floats(args.fractions)
        out += [Variant(mode, f, f) for f in fs] if mode == "pcpp" else [Variant(mode, None, None)]
    codecs = parse_codecs(args.compress)
    fs, far = parse_floats(args.codec_fractions), [k for k in parse_ints(args.far_refresh) if k]
    pools = parse_ints(args.far_pool)
    for codec in codecs:
        if "pcpp" in modes:
            out += [Variant("pcpp", f, f, codec=codec) for f in fs if codec != NONE]
            out += far_variants(codec, fs, far, pools)
        if "distrifusion" in modes and codec != NONE:
            out.append(Variant("distrifusion", None, None, codec=codec))
    return out


def run(args: argparse.Namespace) -> int:
    models = [load_demo_model(m.strip()) for m in args.models.split(",") if m.strip()]
    ids = parse_ints(args.ids)
    modes = _modes(args)
    sizes, band_counts = parse_ints(args.sizes), parse_ints(args.bands)
    noises = {(m.name, s): m.noise(len(ids), s, args.seed) for m in models for s in sizes}
    refs = {(m.name, s): sample(m, m.plain(), m.emb[ids], noises[m.name, s], args) for m in models for s in sizes}
    rows: list[Row] = []
    for n in band_counts:
        engine = Engine(PoolConfig(devices=("cpu",) * n, threads_per_worker=1))
        try:
            for m, s in ((m, s) for m in models for s in sizes):
                outs, ref = {}, refs[m.name, s]
                for v in modes:
                    t0 = time.perf_counter()
                    engine.new_run(v.patch(args.warmup))
                    out = outs[v] = sample(m, m.on(engine), m.emb[ids], noises[m.name, s], args)
                    per_image = [psnr_db(out[i], ref[i]) for i in range(len(ids))]
                    rows.append(base_row(
                        "quality", v.mode, v.fraction, n, s, s, model=m.name, compress=v.codec,
                        far_refresh=v.far, far_pool=v.pool, steps=args.steps,
                        warmup=args.warmup, cfg=args.cfg, ids=ids, seed=args.seed,
                        psnr_db=sum(per_image) / len(per_image), psnr_db_min=min(per_image),
                        max_abs=(out - ref).abs().max().item(),
                        bytes_per_step=engine.stats.summary()["bytes_per_call"],
                        _label=v.label))
                    log.info("%s %d bands %dpx %s: %.1f dB in %.1f s", m.name, n, s, v.label,
                             rows[-1]["psnr_db"], time.perf_counter() - t0)
                if args.images:
                    tag = "" if m.name == "pcpp-tiny-unet" else "dit_"
                    save_grid(os.path.join(args.images, f"quality_{tag}{s}px_{n}bands.png"), ref, outs, ids)
        finally:
            engine.shutdown()
    emit(rows, [("model", "model"), ("pixels", "height"), ("bands", "bands"), ("mode", "label"), ("PSNR dB (mean)", "psnr_db"),
                ("PSNR dB (worst)", "psnr_db_min"), ("max abs", "max_abs"), ("bytes/step", "bytes_per_step")],
         as_json=args.json, save=args.save,
         title="bench quality: final sample vs the one-process sample (same seed, same sampler)",
         notes=[f"bundled tiny trained models ({args.models}), {args.steps} Euler steps, CFG {args.cfg:g} batched "
                f"[cond; uncond], {args.warmup} synchronous warm-up steps, images {ids} sampled as one batch, "
                f"seed {args.seed}",
                f"PSNR on [-1, 1] images (peak-to-peak 2), mean and worst over the images, capped at "
                f"{PSNR_CAP_DB:g} dB; max abs = largest pixel difference (range 2)",
                "sync must match one process up to float round-off; naive shows the seams",
                "[codec]: stale calls exchange through that codec; bytes/step = max over workers, fp32 model",
                "far/N: pcpp also attends to the rest of the image, each attention layer's copy refreshed every "
                "N steps; poolP: those far rows travel as the change of P-column means (residual codecs)"])
    return 0


def save_grid(path: str, ref: torch.Tensor, outs: dict[Variant, torch.Tensor],
              ids: list[int]) -> None:
    """One row per image: one process, then each mode, labelled; tiles at least 192 px."""
    from PIL import Image, ImageDraw

    columns = [("one process", ref)] + [(m.label, t) for m, t in outs.items()]
    size = ref.shape[-1]
    tile = size * max(1, math.ceil(192 / size))
    label_h = 16
    grid = Image.new("RGB", (tile * len(columns), label_h + tile * len(ids)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (name, images) in enumerate(columns):
        draw.text((c * tile + 4, 2), name, fill="black")
        for r in range(len(ids)):
            arr = ((images[r].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            grid.paste(Image.fromarray(arr).resize((tile, tile), Image.NEAREST), (c * tile, label_h + r * tile))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)
    log.info("saved %s", path)
