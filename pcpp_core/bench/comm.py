"""`bench comm`: bytes each device sends per step, per mode, from the engine's own accounting.

The large shapes are counted analytically (`geometry.bytes_sent` over the layers a meta-tensor
forward pass reports), which is exactly what the exchange counts at run time; a real gloo run
of the bundled tiny model at a small size proves that claim every time the benchmark runs,
and the benchmark fails loudly if the two disagree.
"""
from __future__ import annotations

import argparse
import logging
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from ..config import PatchConfig, PoolConfig
from ..geometry import Bands, LayerSpec, bytes_sent
from ..plans import find_plan, profile_layers
from .common import (VAE_FACTOR, Row, base_row, build_unet, emit, fmt_bytes, mode_label, parse_floats,
                     parse_ints, unet_inputs)

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger("pcpp.bench.comm")

DEFAULT_CASES = "sdxl:1024,sdxl:2048,sd15:512,sd15:1024"


class CrossCheckError(RuntimeError):
    """The analytic byte count and the bytes a real run sent differ: the accounting is wrong."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", default=DEFAULT_CASES, help="model:pixels list (square images)")
    p.add_argument("--bands", default="2,4,8", help="band (device) counts")
    p.add_argument("--fractions", default="0.1,0.3,0.5,1.0", help="pcpp neighbour fractions")
    p.add_argument("--batch", type=int, default=2, help="batch per evaluation (2 = CFG cond+uncond batched)")
    p.add_argument("--element-size", type=int, default=2, help="bytes per activation (2 = fp16)")
    p.add_argument("--check-size", type=int, default=64, help="image rows of the real gloo cross-check")
    p.add_argument("--check-bands", default="2", help="worker counts of the cross-check")
    p.add_argument("--no-check", action="store_true", help="skip the real gloo cross-check")


@lru_cache(maxsize=None)
def layer_specs(model: str, latent_h: int, latent_w: int) -> tuple[tuple[LayerSpec, ...], int]:
    """(exchanging layers of one forward pass, downsampling levels) on meta tensors."""
    unet = build_unet(model, "meta")
    plan = find_plan(unet)
    x, t, kwargs = unet_inputs(model, 1, latent_h, latent_w, "meta")
    return tuple(profile_layers(unet, plan, x, t, **kwargs)), plan.levels(unet)


def mode_windows(fractions: list[float]) -> list[tuple[str, float | None, float | None, bool]]:
    """(mode, fraction field, attention window, exchanges) after warm-up, as PatchConfig defines them."""
    out: list[tuple[str, float | None, float | None, bool]] = [("naive", None, 0.0, False)]
    out += [("pcpp", f, PatchConfig(mode="pcpp", fraction=f).window_fraction, True) for f in fractions]
    out.append(("distrifusion", None, None, True))
    return out


def comm_rows(cases: list[tuple[str, int]], band_counts: list[int], fractions: list[float], batch: int,
              element_size: int) -> list[Row]:
    rows: list[Row] = []
    for model, pixels in cases:
        lat = pixels // VAE_FACTOR
        specs, levels = layer_specs(model, lat, lat)
        for n in band_counts:
            bands = Bands.split(lat, lat, n, levels)
            counted = {}
            for mode, fraction, window, exchange in mode_windows(fractions):
                per_band = [bytes_sent(specs, bands, b, batch=batch, element_size=element_size,
                                       fraction=window, exchange=exchange) for b in range(n)]
                counted[(mode, fraction)] = (max(per_band), sum(per_band))
            distri = counted[("distrifusion", None)][0]
            for (mode, fraction), (peak, total) in counted.items():
                rows.append(base_row(
                    "comm", mode, fraction, n, pixels, pixels, model=model, batch=batch,
                    element_size=element_size, bytes_per_step=peak, bytes_all_devices=total,
                    ratio_vs_distrifusion=peak / distri if distri else None,
                    _bytes_per_step=fmt_bytes(peak), _label=mode_label(mode, fraction),
                    _saving=f"{100 * (1 - peak / distri):.0f}%" if distri else "-",
                ))
    return rows


def cross_check(size: int, band_counts: list[int], fractions: list[float], warmup: int = 1) -> list[Row]:
    """Run the bundled tiny model (fp32, CFG batch of 2) on real gloo workers in every mode and
    compare each rank's bytes sent, warm-up and steady calls, with `bytes_sent`."""
    from ..engine import Engine
    from ..tiny_model import load_tiny_unet

    unet, emb, _ = load_tiny_unet()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, size, size, generator=gen)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.stack([emb[0], emb[12]])
    rows: list[Row] = []
    for n in band_counts:
        engine = Engine(PoolConfig(devices=("cpu",) * n, threads_per_worker=1))
        try:
            rows += engine_bytes_rows(engine, unet, x, t, ctx, fractions, warmup)
        finally:
            engine.shutdown()
    return rows


def engine_bytes_rows(engine: "Engine", unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                      ctx: torch.Tensor, fractions: list[float], warmup: int = 1) -> list[Row]:
    """Every mode on `engine` with the CFG batch `x` [2, C, H, W]: each rank's bytes sent in a
    warm-up and a steady call against `bytes_sent` (activations of x's element size). Also the
    doctor's check, on whatever devices the engine runs."""
    plan = find_plan(unet)
    specs = profile_layers(unet, plan, x, t, encoder_hidden_states=ctx)
    n, size, element_size = engine.pool_config.world_size, x.shape[2], x.element_size()
    bands = Bands.split(size, x.shape[3], n, plan.levels(unet))
    rows: list[Row] = []
    for mode, fraction, window, exchange in mode_windows(fractions) + [("sync", None, None, True)]:
        engine.new_run(PatchConfig(mode=mode, fraction=fraction or 0.0, warmup_steps=warmup))
        for _ in range(warmup + 1):
            engine(unet, x, t, encoder_hidden_states=ctx, slot="cfg", batch_chunks=2)
        calls = engine.stats.calls
        for call in ([calls[0]] if calls[0].synchronous and len(calls) > 1 else []) + [calls[-1]]:
            win = None if call.synchronous and mode != "naive" else window
            expected = {b: bytes_sent(specs, bands, b, batch=x.shape[0], element_size=element_size, fraction=win,
                                      exchange=exchange) for b in range(n)}
            ok = expected == call.bytes_sent
            rows.append(base_row(
                "comm-check", mode, fraction, n, size, x.shape[3], model="pcpp-tiny-unet",
                call="warm-up" if call.synchronous else "steady", bytes_analytic=max(expected.values()),
                bytes_measured=max(call.bytes_sent.values()), match=ok,
                per_rank_analytic=[expected[b] for b in range(n)],
                per_rank_measured=[call.bytes_sent[b] for b in range(n)],
                _label=mode_label(mode, fraction), _match="yes" if ok else "NO"))
    return rows


def run(args: argparse.Namespace) -> int:
    cases = []
    for item in args.cases.split(","):
        model, _, px = item.partition(":")
        cases.append((model.strip(), int(px)))
    bands, fractions = parse_ints(args.bands), parse_floats(args.fractions)
    rows = comm_rows(cases, bands, fractions, args.batch, args.element_size)
    emit(rows, [("model", "model"), ("pixels", "height"), ("bands", "bands"), ("mode", "label"),
                ("bytes/step (max device)", "bytes_per_step"), ("vs distrifusion", "ratio_vs_distrifusion"),
                ("saving", "saving")],
         as_json=args.json, save=args.save, title="bench comm: bytes sent per device per step (analytic, exact)",
         notes=[f"one step = one model evaluation after warm-up, batch {args.batch} "
                f"({'CFG cond+uncond batched' if args.batch == 2 else 'no CFG batching'}), "
                f"{args.element_size}-byte activations; max over devices; GroupNorm stats travel as fp32",
                "warm-up steps (synchronous) send the whole-image amount, like distrifusion",
                "counted by geometry.bytes_sent from the layers of a meta-tensor forward pass"])
    if args.no_check:
        return 0
    checks = cross_check(args.check_size, parse_ints(args.check_bands), fractions)
    emit(checks, [("bands", "bands"), ("mode", "label"), ("call", "call"), ("analytic", "bytes_analytic"),
                  ("measured", "bytes_measured"), ("match", "match")],
         as_json=args.json, save=args.save,
         title=f"bench comm cross-check: analytic vs bytes sent by real gloo workers "
               f"(tiny model, {args.check_size}x{args.check_size}, fp32, CFG batch 2)",
         notes=["max over ranks shown; every rank's count is compared"])
    bad = [c for c in checks if not c["match"]]
    if bad:
        raise CrossCheckError(
            "analytic byte count differs from the bytes actually sent: "
            + "; ".join(f"{c['mode']} f={c['fraction']} {c['bands']} bands {c['call']}: analytic "
                        f"{c['per_rank_analytic']} measured {c['per_rank_measured']}" for c in bad))
    return 0
