"""Shared pieces of the benchmarks: model shapes, inputs, table/JSON output, small statistics.

The SD1.5 and SDXL UNets are built from diffusers configs written out here (no weights are
ever downloaded): on the meta device they cost nothing and give exact geometry for the byte
counts; on the CPU with a fixed seed they give a full-width network whose speed is realistic
even though its output is noise. The "-mini" variants keep the block structure (attention at
the same levels, same number of layers) with narrow channels, for smoke tests.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import sys
from typing import Any, Iterable, Sequence, TextIO

import torch
from torch import nn

log = logging.getLogger("pcpp.bench")

Row = dict[str, Any]

_SD15: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
# SDXL base 1.0's unet/config.json, the fields that shape the network
_SDXL: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32,
)
_MINI = dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=32, attention_head_dim=8,
             norm_num_groups=8)
_SDXL_MINI = dict(block_out_channels=(32, 64, 128), transformer_layers_per_block=(1, 1, 2),
                  attention_head_dim=(2, 4, 8), cross_attention_dim=32, addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8)

MODELS: dict[str, dict[str, Any]] = {
    "sd15": _SD15,
    "sdxl": _SDXL,
    "sd15-mini": {**_SD15, **_MINI},
    "sdxl-mini": {**_SDXL, **_SDXL_MINI},
}
VAE_FACTOR = 8  # latent rows = pixel rows / 8 for both families


def model_config(name: str) -> dict[str, Any]:
    try:
        return dict(MODELS[name])
    except KeyError:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


def build_unet(name: str, device: str | torch.device = "meta", seed: int = 0) -> nn.Module:
    """The named UNet; on "meta" free and weightless, elsewhere diffusers' random init at `seed`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = UNet2DConditionModel(**model_config(name))
    return model.eval().requires_grad_(False)


def unet_inputs(name: str, batch: int, height: int, width: int, device: str | torch.device = "meta",
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(x [B, 4, h, w], t [B], kwargs) for a latent of h x w rows; 77 text tokens like CLIP."""
    cfg = model_config(name)
    gen = None if str(device) == "meta" else torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        if gen is None:
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=gen).to(device)

    x = rand(batch, cfg["in_channels"], height, width)
    t = torch.full((batch,), 500.0, device=device)
    kwargs: dict[str, Any] = {"encoder_hidden_states": rand(batch, 77, cfg["cross_attention_dim"])}
    if cfg.get("addition_embed_type") == "text_time":
        text = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": rand(batch, text), "time_ids": rand(batch, 6)}
    return x, t, kwargs


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(rows: Iterable[Row], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table; `columns` = (header, key), a key's value formatted by fmt() unless the
    row carries a preformatted `_<key>` string."""
    cells = [[h for h, _ in columns]]
    for row in rows:
        cells.append([row.get(f"_{k}") if f"_{k}" in row else fmt(row.get(k)) for _, k in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def public(row: Row) -> Row:
    """The row without display-only `_key` strings."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def emit(rows: list[Row], columns: Sequence[tuple[str, str]], *, as_json: bool, title: str,
         notes: Sequence[str] = (), out: TextIO | None = None, save: str | None = None) -> None:
    """Print a titled table with notes, or one JSON object per line; `save` also appends the
    JSON lines to a file (the input of `bench plot`)."""
    out = out or sys.stdout
    lines = [json.dumps(public(r), sort_keys=True) for r in rows]
    if as_json:
        print("\n".join(lines), file=out)
    else:
        print(f"\n== {title} ==", file=out)
        print(table(rows, columns), file=out)
        for note in notes:
            print(f"  * {note}", file=out)
    if save:
        with open(save, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    out.flush()


def base_row(bench: str, mode: str, fraction: float | None, bands: int, height: int, width: int,
             **extra: Any) -> Row:
    """The fields every benchmark row has (`height`/`width` are image pixels)."""
    return {"bench": bench, "mode": mode, "fraction": fraction, "bands": bands, "height": height,
            "width": width, **extra}


def mode_label(mode: str, fraction: float | None, compress: str | None = "none", far: int | None = 0,
               pool: int | None = 1) -> str:
    label = f"pcpp f={fraction:g}" if mode == "pcpp" and fraction is not None else mode
    label += f" far/{far}" if far else ""
    label += f" pool{pool}" if far and pool and pool > 1 else ""
    return label if compress in ("none", None) else f"{label} [{compress}]"
