"""`bench comm`: bytes each device sends per step, per mode, from the engine's own accounting.

The large shapes are counted analytically (`geometry.bytes_sent` over the layers a meta-tensor
forward pass reports), which is exactly what the exchange counts at run time; a real gloo run
of the bundled tiny model at a small size proves that claim every time the benchmark runs,
and the benchmark fails loudly if the two disagree.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from ..codecs import NONE, codec_names, get_codec
from ..config import RESIDUAL_FAR_POOL, PatchConfig, PoolConfig
from ..geometry import Bands, LayerSpec, bytes_sent
from ..plans import find_plan, profile_layers
from .common import (VAE_FACTOR, Row, base_row, build_unet, emit, fmt_bytes, mode_label, parse_floats,
                     parse_ints, unet_inputs)

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger("pcpp.bench.comm")

DEFAULT_CASES = "sdxl:1024,sdxl:2048,sd15:512,sd15:1024,flux-dev:1024,flux-dev:2048"
# transformer geometries counted from their dimensions (plans_dit.flux_spec_values), no weights:
# Flux.1-dev is 3072 wide, 24 heads, 19 double + 38 single blocks, 2x2 patches, 256 T5 tokens
# (ComfyUI's minimum length); guidance-distilled, so one evaluation of batch 1 per step
DIT_GEOMETRY = {"flux-dev": dict(hidden=3072, heads=24, double=19, single=38, text=256)}
DIT_BATCH = {"flux-dev": 1}


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
    p.add_argument("--compress", default=",".join(codec_names()),
                   help="exchange codecs (pcpp_core.codecs) counted for pcpp at --codec-fractions and distrifusion")
    p.add_argument("--codec-fractions", default="0.3", help="pcpp fractions that get a row per codec")
    p.add_argument("--far-refresh", default="2",
                   help="pcpp far_refresh values that get a row per codec (0 or empty: none)")
    p.add_argument("--far-pool", default=f"1,{RESIDUAL_FAR_POOL}",
                   help="far_pool values per far_refresh (above 1: residual codecs only)")


def parse_codecs(text: str) -> list[str]:
    """Codec names from a comma list, validated by the registry; `none` first."""
    names = [get_codec(n).name for n in text.split(",") if n.strip()]
    return [NONE] + [n for n in dict.fromkeys(names) if n != NONE]


@lru_cache(maxsize=None)
def layer_specs(model: str, latent_h: int, latent_w: int) -> tuple[tuple[LayerSpec, ...], int]:
    """(exchanging layers of one forward pass, downsampling levels) on meta tensors (a DiT
    geometry: from its dimensions, level 1 = the 2x2 patch grid)."""
    if model in DIT_GEOMETRY:
        from ..plans_dit import flux_spec_values

        return tuple(flux_spec_values(**DIT_GEOMETRY[model])), 1
    unet = build_unet(model, "meta")
    plan = find_plan(unet)
    x, t, kwargs = unet_inputs(model, 1, latent_h, latent_w, "meta")
    return tuple(profile_layers(unet, plan, x, t, **kwargs)), plan.levels(unet)


@dataclass(frozen=True)
class Variant:
    """One configuration counted after warm-up, as PatchConfig defines it."""

    mode: str
    fraction: float | None  # the fraction field (pcpp only)
    window: float | None  # attention window of the stale calls (None = whole image)
    exchange: bool = True
    codec: str = NONE
    far: int = 0  # pcpp far_refresh
    pool: int = 1  # pcpp far_pool

    @property
    def label(self) -> str:
        return mode_label(self.mode, self.fraction, self.codec, self.far, self.pool)

    def patch(self, warmup: int) -> PatchConfig:
        return PatchConfig(mode=self.mode, fraction=self.fraction or 0.0, warmup_steps=warmup,
                           compress=self.codec, far_refresh=self.far, far_pool=self.pool)

    def sent(self, specs, bands: Bands, band: int, step: int | None, **kw) -> int:
        """Bytes of a stale call with index `step` (None: the worst step of a far-refresh cycle)."""
        sizer = None if self.codec == NONE else get_codec(self.codec)
        steps = [step] if step is not None else list(range(max(1, self.far)))
        return max(bytes_sent(specs, bands, band, fraction=self.window, exchange=self.exchange, codec=sizer,
                              far_refresh=self.far, step=s, far_pool=self.pool, **kw) for s in steps)


def far_variants(codec: str, fractions: list[float], far_refresh: list[int], far_pool: list[int]) -> list[Variant]:
    """pcpp with each far_refresh (and far_pool: pooling sends residuals, so residual codecs only)."""
    pools = [p for p in dict.fromkeys(far_pool or [1]) if p == 1 or get_codec(codec).residual]
    return [Variant("pcpp", f, f, codec=codec, far=k, pool=p) for f in fractions for k in far_refresh if k
            for p in pools]


def mode_windows(fractions: list[float], codecs: list[str] = (NONE,), codec_fractions: list[float] = (0.3,),
                 far_refresh: list[int] = (), far_pool: list[int] = (1,)) -> list[Variant]:
    """Every mode uncompressed, then each codec for pcpp at `codec_fractions` (window only and
    with each far refresh and pool) and distrifusion."""
    out = [Variant("naive", None, 0.0, exchange=False)]
    for codec in codecs:
        fs = fractions if codec == NONE else list(codec_fractions)
        out += [Variant("pcpp", f, PatchConfig(mode="pcpp", fraction=f).window_fraction, codec=codec) for f in fs]
        out += far_variants(codec, list(codec_fractions), list(far_refresh), list(far_pool))
        out.append(Variant("distrifusion", None, None, codec=codec))
    return out


def comm_rows(cases: list[tuple[str, int]], band_counts: list[int], fractions: list[float], batch_arg: int,
              element_size: int, codecs: list[str] = (NONE,), codec_fractions: list[float] = (0.3,),
              far_refresh: list[int] = (), far_pool: list[int] = (1,)) -> list[Row]:
    rows: list[Row] = []
    for model, pixels in cases:
        lat = pixels // VAE_FACTOR
        specs, levels = layer_specs(model, lat, lat)
        batch = DIT_BATCH.get(model, batch_arg)
        for n in band_counts:
            bands = Bands.split(lat, lat, n, levels)
            counted = {}
            for v in mode_windows(fractions, codecs, codec_fractions, far_refresh, far_pool):
                per_band = [v.sent(specs, bands, b, None, batch=batch, element_size=element_size) for b in range(n)]
                counted[v] = (max(per_band), sum(per_band))
            distri = counted[Variant("distrifusion", None, None)][0]
            for v, (peak, total) in counted.items():
                rows.append(base_row(
                    "comm", v.mode, v.fraction, n, pixels, pixels, model=model, batch=batch, compress=v.codec,
                    far_refresh=v.far, far_pool=v.pool, element_size=element_size, bytes_per_step=peak, bytes_all_devices=total,
                    ratio_vs_distrifusion=peak / distri if distri else None,
                    _bytes_per_step=fmt_bytes(peak), _label=v.label,
                    _saving=f"{100 * (1 - peak / distri):.1f}%" if distri else "-",
                ))
    return rows


def cross_check(size: int, band_counts: list[int], fractions: list[float], warmup: int = 1,
                codecs: list[str] = (NONE,), codec_fractions: list[float] = (0.3,),
                far_refresh: list[int] = (), far_pool: list[int] = (1,)) -> list[Row]:
    """Run the bundled tiny model (fp32, CFG batch of 2) on real gloo workers in every mode and
    codec and compare each rank's bytes sent, warm-up and two stale calls, with `bytes_sent`."""
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
            rows += engine_bytes_rows(engine, unet, x, t, ctx, fractions, warmup, codecs, codec_fractions,
                                      far_refresh, far_pool)
        finally:
            engine.shutdown()
    return rows


def engine_bytes_rows(engine: "Engine", unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                      ctx: torch.Tensor, fractions: list[float], warmup: int = 1, codecs: list[str] = (NONE,),
                      codec_fractions: list[float] = (0.3,), far_refresh: list[int] = (),
                      far_pool: list[int] = (1,)) -> list[Row]:
    """Every mode (and codec) on `engine` with the CFG batch `x` [2, C, H, W]: each rank's bytes
    sent in a warm-up and two stale calls ("steady-1", "steady") against `bytes_sent`
    (activations of x's element size). Also the doctor's check, on whatever devices the engine runs."""
    plan = find_plan(unet)
    specs = profile_layers(unet, plan, x, t, encoder_hidden_states=ctx)
    n, size, element_size = engine.pool_config.world_size, x.shape[2], x.element_size()
    bands = Bands.split(size, x.shape[3], n, plan.levels(unet))
    kw = dict(batch=x.shape[0], element_size=element_size)
    rows: list[Row] = []
    for v in mode_windows(fractions, codecs, codec_fractions, far_refresh, far_pool) + [Variant("sync", None, None)]:
        engine.new_run(v.patch(warmup))
        for _ in range(warmup + 2):
            engine(unet, x, t, encoder_hidden_states=ctx, slot="cfg", batch_chunks=2)
        calls = engine.stats.calls
        for index, call in enumerate(calls):
            if 0 < index < warmup or (call.synchronous and index and v.mode != "sync"):
                continue  # one warm-up call and the stale ones (sync: every call)
            if call.synchronous and v.mode != "naive":
                expected = {b: bytes_sent(specs, bands, b, fraction=None, **kw) for b in range(n)}
            else:
                expected = {b: v.sent(specs, bands, b, index, **kw) for b in range(n)}
            ok = expected == call.bytes_sent
            label = "warm-up" if call.synchronous else ("steady" if index == len(calls) - 1 else "steady-1")
            rows.append(base_row(
                "comm-check", v.mode, v.fraction, n, size, x.shape[3], model="pcpp-tiny-unet", compress=v.codec,
                far_refresh=v.far, far_pool=v.pool, call=label if v.mode != "sync" else f"sync #{index}",
                bytes_analytic=max(expected.values()), bytes_measured=max(call.bytes_sent.values()),
                match=ok, per_rank_analytic=[expected[b] for b in range(n)],
                per_rank_measured=[call.bytes_sent[b] for b in range(n)],
                _label=v.label, _match="yes" if ok else "NO"))
    return rows


def run(args: argparse.Namespace) -> int:
    cases = []
    for item in args.cases.split(","):
        model, _, px = item.partition(":")
        cases.append((model.strip(), int(px)))
    bands, fractions = parse_ints(args.bands), parse_floats(args.fractions)
    codecs, codec_fractions = parse_codecs(args.compress), parse_floats(args.codec_fractions)
    far, pool = parse_ints(args.far_refresh), parse_ints(args.far_pool)
    rows = comm_rows(cases, bands, fractions, args.batch, args.element_size, codecs, codec_fractions, far, pool)
    emit(rows, [("model", "model"), ("pixels", "height"), ("bands", "bands"), ("mode", "label"),
                ("bytes/step (max device)", "bytes_per_step"), ("vs distrifusion", "ratio_vs_distrifusion"),
                ("saving", "saving")],
         as_json=args.json, save=args.save, title="bench comm: bytes sent per device per step (analytic, exact)",
         notes=[f"one step = one model evaluation after warm-up, batch {args.batch} "
                f"({'CFG cond+uncond batched' if args.batch == 2 else 'no CFG batching'}; flux-dev: batch 1, "
                "guidance-distilled), "
                f"{args.element_size}-byte activations; max over devices; GroupNorm stats travel as fp32",
                "warm-up steps (synchronous) send the whole-image amount, like distrifusion",
                "counted by geometry.bytes_sent from the layers of a meta-tensor forward pass",
                "[codec]: K/V rows and conv halos of the stale calls travel through that codec "
                "(payload + float32 scales per batch item and channel); warm-up stays exact",
                "far/N: pcpp also attends to the rest of the image from the receiver's copy, each attention "
                "layer's refreshed every N steps, 1/N of the layers per step (bytes: the worst step of the cycle); "
                "poolP: far rows travel as means of P columns (the change of them, residual codecs)",
                "flux-dev: joint attention per block: image K/V rows of the window, plus the text queries' "
                "partial attention (256 tokens, output + fp32 log-sum-exp) to every other band"])
    if args.no_check:
        return 0
    checks = cross_check(args.check_size, parse_ints(args.check_bands), fractions, codecs=codecs,
                         codec_fractions=codec_fractions, far_refresh=far, far_pool=pool)
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
            + "; ".join(f"{c['_label']} {c['bands']} bands {c['call']}: analytic "
                        f"{c['per_rank_analytic']} measured {c['per_rank_measured']}" for c in bad))
    return 0
