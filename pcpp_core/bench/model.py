"""`bench model`: a MODEL of multi-GPU speed-up, not a measurement (no GPU is needed or used).

Inputs are exact where they can be: the bytes each device sends come from the engine's own
accounting (`geometry.bytes_sent` over a meta-tensor forward pass), and the work of each band
from FLOP counts (torch's FlopCounterMode on meta tensors, attention recounted per window).
What cannot be measured here is an assumption and a parameter: the single-GPU step time at one
size, and link bandwidths. Assumptions, printed with the table:

- a step costs a fixed time that does not shrink with the band (kernel launches, small ops:
  `--fixed-ms`) plus FLOPs at one rate, the same for a band as for the whole image;
- after warm-up, sends overlap with compute completely (step = max(compute, communication)),
  as the engine's asynchronous exchange allows; warm-up steps do not overlap (compute + comm,
  plus a latency per exchanging layer);
- each device's link carries its own sends at the given bandwidth (full duplex, no contention);
- a fixed host round trip per step (inputs out, bands back) is added to every multi-GPU step.
"""
from __future__ import annotations

import argparse
import logging
from functools import lru_cache

import torch

from ..geometry import Bands, LayerSpec, bytes_sent
from ..codecs import NONE, get_codec
from .comm import Variant, layer_specs, mode_windows, parse_codecs
from .common import VAE_FACTOR, Row, base_row, build_unet, emit, parse_floats, parse_ints, unet_inputs

log = logging.getLogger("pcpp.bench.model")

# DistriFusion paper, SDXL at 3840x3840 on A100s (NVLink), speed-up over one GPU
PAPER_DISTRIFUSION_3840 = {2: 1.8, 4: 3.4, 8: 6.1}
PAPER_RANGES = "paper (SDXL, 4-8 GPUs): PCPP 2.36-8.02x, DistriFusion 2.32-6.71x; DistriFusion at 3840^2: 1.8/3.4/6.1x on 2/4/8 A100s"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="sdxl", help="UNet geometry (sdxl, sd15, or a -mini variant)")
    p.add_argument("--sizes", default="1024,2048,3840", help="square image sizes in pixels")
    p.add_argument("--gpus", default="2,4,8", help="GPU counts (one band each)")
    p.add_argument("--fractions", default="0.3", help="pcpp fractions")
    p.add_argument("--modes", default="pcpp,distrifusion,naive,sync")
    p.add_argument("--links", default="pcie4=25,nvlink=150",
                   help="name=GB/s effective per direction per device (PCIe 4 x16 ~25, NVLink 3 ~150+)")
    p.add_argument("--gpu-step-ms", type=float, default=150.0,
                   help="ASSUMED one-GPU step time at --ref-size (SDXL 1024^2, CFG batch 2, fp16 on an "
                        "A100-class GPU: ~7.5 s for 50 steps)")
    p.add_argument("--fixed-ms", type=float, default=15.0,
                   help="ASSUMED part of every step that does not shrink with the band (launches, small ops)")
    p.add_argument("--ref-size", type=int, default=1024, help="pixels at which --gpu-step-ms holds")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of the modelled run")
    p.add_argument("--warmup", type=int, default=4, help="synchronous warm-up steps of the modelled run")
    p.add_argument("--latency-us", type=float, default=20.0, help="per exchanging layer, synchronous steps")
    p.add_argument("--host-ms", type=float, default=2.0, help="host round trip per multi-GPU step")
    p.add_argument("--batch", type=int, default=2, help="2 = CFG cond+uncond batched")
    p.add_argument("--element-size", type=int, default=2, help="bytes per activation (2 = fp16)")
    p.add_argument("--compress", default="none", help="exchange codecs (pcpp at --fractions, distrifusion)")
    p.add_argument("--far-refresh", default="", help="pcpp far_refresh values modelled per codec")
    p.add_argument("--far-pool", default="1", help="far_pool values per far_refresh (above 1: residual codecs)")
    p.add_argument("--codec-device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where each codec's encode+decode cost is MEASURED (default: a GPU if there is one; "
                        "'none': not counted)")


@lru_cache(maxsize=None)
def codec_cost(name: str, device: str, element_size: int) -> tuple[float, float]:
    """MEASURED (seconds per send, seconds per element) of encode + decode on `device`: a
    least-squares line through timings at two K/V-like sizes (SDXL widths)."""
    import time

    codec = get_codec(name)
    dtype = torch.float16 if element_size == 2 and device != "cpu" else torch.float32
    points = []
    for rows in (2, 16):
        x = torch.randn(2, rows, 128, 1280, device=device).to(dtype)  # [B, rows, W, 2D]
        codec.decode(codec.encode(x, -1), tuple(x.shape), -1, dtype)  # warm
        reps = 5
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            codec.decode(codec.encode(x, -1), tuple(x.shape), -1, dtype)
        if device != "cpu":
            torch.cuda.synchronize()
        points.append((x.numel(), (time.perf_counter() - t0) / reps))
    (n0, t0_), (n1, t1) = points
    per_element = max(0.0, (t1 - t0_) / (n1 - n0))
    return max(0.0, t0_ - per_element * n0), per_element


@lru_cache(maxsize=None)
def total_flops(model: str, latent: int, batch: int) -> float:
    """FLOPs of one whole-image forward pass, counted by torch on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_unet(model, "meta")
    x, t, kwargs = unet_inputs(model, batch, latent, latent, "meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, t, **kwargs)
    return float(counter.get_total_flops())


def attention_flops(specs: tuple[LayerSpec, ...], bands: Bands, band: int | None, window: float | None,
                    batch: int) -> float:
    """Self-attention core (QK^T and AV: 4*B*Tq*Tk*C) of one band, or of the image when band is None."""
    total = 0.0
    for s in specs:
        if s.kind != "attention":
            continue
        rows, cols = bands.level_size(s.level)
        if band is None:
            q_rows, k_rows = rows, rows
        else:
            r0, r1 = bands.rows(band, s.level)
            w0, w1 = bands.window(band, s.level, window)
            q_rows, k_rows = r1 - r0, w1 - w0
        total += 4.0 * batch * (q_rows * cols) * (k_rows * cols) * s.channels
    return total


def band_flops(model: str, pixels: int, n: int, window: float | None, batch: int) -> list[float]:
    """Per-band FLOPs: everything but self-attention scales with the band's rows; self-attention
    is recounted with the band's queries against its window's keys."""
    lat = pixels // VAE_FACTOR
    specs, levels = layer_specs(model, lat, lat)
    bands = Bands.split(lat, lat, n, levels)
    whole = Bands.split(lat, lat, 1, levels)
    rest = total_flops(model, lat, batch) - attention_flops(specs, whole, None, None, batch)
    return [rest * (bands.bounds[b + 1] - bands.bounds[b]) / lat + attention_flops(specs, bands, b, window, batch)
            for b in range(n)]


def predict(args: argparse.Namespace, pixels: int, n: int, v: Variant, bandwidth: float) -> dict[str, float]:
    """Modelled seconds of a run on one GPU and on n GPUs, and its parts."""
    lat = pixels // VAE_FACTOR
    fixed = args.fixed_ms / 1000
    rate = total_flops(args.model, args.ref_size // VAE_FACTOR, args.batch) / (args.gpu_step_ms / 1000 - fixed)
    one_step = fixed + total_flops(args.model, lat, args.batch) / rate
    specs, levels = layer_specs(args.model, lat, lat)
    bands = Bands.split(lat, lat, n, levels)
    kw = dict(batch=args.batch, element_size=args.element_size)
    mode, window, exchange = v.mode, (None if v.far else v.window), v.exchange
    compute = fixed + max(band_flops(args.model, pixels, n, window, args.batch)) / rate
    comm = max(v.sent(specs, bands, b, None, **kw) for b in range(n)) / bandwidth
    codec_s = 0.0
    if v.codec != NONE and args.codec_device != "none":  # encode the sends + decode the receives (as many)
        per_send, per_element = codec_cost(v.codec, args.codec_device, args.element_size)
        raw = Variant(v.mode, v.fraction, v.window, v.exchange, NONE, v.far, v.pool)  # elements the codec sees
        elements = max(raw.sent(specs, bands, b, None, **kw) for b in range(n)) / args.element_size
        sends = sum(1 for s in specs if s.kind != "groupnorm") * min(2, n - 1)
        codec_s = 2 * (sends * per_send + elements * per_element)
    compute += codec_s
    host = args.host_ms / 1000
    if mode == "sync" or not exchange:
        warm, steady = 0, (compute + comm + len(specs) * args.latency_us * 1e-6 * exchange) + host
    else:
        warm = min(args.warmup, args.steps)
        steady = max(compute, comm) + host
    sync_compute = fixed + max(band_flops(args.model, pixels, n, None, args.batch)) / rate
    sync_comm = max(bytes_sent(specs, bands, b, fraction=None, **kw) for b in range(n)) / bandwidth
    sync_step = sync_compute + sync_comm + len(specs) * args.latency_us * 1e-6 + host
    total = warm * sync_step + (args.steps - warm) * steady
    return {"one_gpu_s": one_step * args.steps, "run_s": total, "step_ms": steady * 1000,
            "compute_ms": compute * 1000, "comm_ms": comm * 1000, "one_gpu_step_ms": one_step * 1000,
            "codec_ms": codec_s * 1000}


def run(args: argparse.Namespace) -> int:
    if args.fixed_ms >= args.gpu_step_ms:
        raise SystemExit(f"--fixed-ms {args.fixed_ms} must be below --gpu-step-ms {args.gpu_step_ms}")
    links = {k: float(v) * 1e9 for k, v in (item.split("=") for item in args.links.split(","))}
    wanted = {m.strip() for m in args.modes.split(",")}
    variants = mode_windows(parse_floats(args.fractions), parse_codecs(args.compress), parse_floats(args.fractions),
                            parse_ints(args.far_refresh), parse_ints(args.far_pool))
    modes = [v for v in variants if v.mode in wanted]
    if "sync" in wanted:
        modes.append(Variant("sync", None, None))
    rows: list[Row] = []
    for pixels in parse_ints(args.sizes):
        for n in parse_ints(args.gpus):
            for link, bw in links.items():
                for v in modes:
                    p = predict(args, pixels, n, v, bw)
                    paper = PAPER_DISTRIFUSION_3840.get(n) if (v.mode, pixels, link, v.codec) == \
                        ("distrifusion", 3840, "nvlink", NONE) and args.model == "sdxl" else None
                    rows.append(base_row(
                        "model", v.mode, v.fraction, n, pixels, pixels, model=args.model, link=link,
                        compress=v.codec, far_refresh=v.far, far_pool=v.pool, predicted_codec_ms=p["codec_ms"],
                        codec_device=args.codec_device if v.codec != NONE else None,
                        bandwidth_gbps=bw / 1e9, predicted_speedup=p["one_gpu_s"] / p["run_s"],
                        predicted_step_ms=p["step_ms"], predicted_compute_ms=p["compute_ms"],
                        predicted_comm_ms=p["comm_ms"], one_gpu_step_ms=p["one_gpu_step_ms"],
                        comm_hidden=p["comm_ms"] <= p["compute_ms"], paper_speedup=paper,
                        assumed_gpu_step_ms_at_ref=args.gpu_step_ms, ref_size=args.ref_size, modelled=True,
                        _label=v.label, _hidden="yes" if p["comm_ms"] <= p["compute_ms"] else "NO"))
    emit(rows, [("pixels", "height"), ("GPUs", "bands"), ("link", "link"), ("mode", "label"),
                ("1-GPU step ms", "one_gpu_step_ms"), ("band compute ms", "predicted_compute_ms"),
                ("comm ms", "predicted_comm_ms"), ("codec ms", "predicted_codec_ms"), ("hidden", "hidden"), ("speed-up (model)", "predicted_speedup"),
                ("paper", "paper_speedup")],
         as_json=args.json, save=args.save,
         title=f"bench model: PREDICTED speed-up of {args.model} over one GPU -- a model, not a measurement",
         notes=[f"ASSUMED one-GPU step at {args.ref_size}^2: {args.gpu_step_ms:g} ms (batch {args.batch}, "
                f"{args.element_size}-byte activations), of which {args.fixed_ms:g} ms fixed per step whatever the "
                "band; the rest scales by FLOPs counted on meta tensors",
                "links: " + ", ".join(f"{k} {v / 1e9:g} GB/s per direction" for k, v in links.items()),
                f"run = {args.steps} steps, of which {args.warmup} synchronous warm-up (pcpp, distrifusion); "
                "speed-up = one-GPU run time / modelled run time",
                "after warm-up communication overlaps compute (step = max); sync/warm-up: compute + comm + "
                f"{args.latency_us:g} us per exchanging layer; +{args.host_ms:g} ms host round trip per step",
                ("codec cost not counted (--codec-device none)" if args.codec_device == "none" else
                 "codec ms: encode + decode MEASURED on " + args.codec_device + " (added to the band's compute; "
                 "a CPU measurement is far slower than a GPU's)"),
                PAPER_RANGES])
    return 0
