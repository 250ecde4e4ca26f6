"""Transformer (DiT) blocks on a band: joint text + image attention over the band's window.

A block (Flux double- or single-stream, SD3's MMDiT joint block) runs its own forward on all
text tokens and the band's image tokens; only its attention call changes. The block's
`transformer_options["optimized_attention_override"]` receives q/k/v after the block's own
projections, QK-norm and RoPE (ComfyUI's `optimized_attention` honours that key on 0.8.0 and
0.33, and so does pcpp_core.tiny_dit), so modulation, MLPs and per-block patches stay the
model's own code. Per attention call (text first, as both families order the sequence):

- image queries attend to all text K/V (every band holds the same text stream) and to the
  image K/V of their window: own rows fresh, neighbour rows through `window_kv` exactly as the
  UNet self-attention (fresh in sync/warm-up, stale after it, whole image for distrifusion);
- text queries attend to the text (computed locally) and to every band's image tokens, each
  band's part as a partial result (output, log-sum-exp) merged in band order. Every band sends
  its partial to all bands (itself by loopback) through one swap, so every band merges the same
  pieces: fresh in sync and warm-up (exact), all from the previous call after it (DistriFusion's
  staleness, for the own band too). The text stream stays bitwise the same on every band.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..exchange import CallState, Exchange
from .attention import window_kv
from .base import BandLayer

KINDS = ("double", "single", "joint")  # Flux DoubleStreamBlock, SingleStreamBlock, MMDiT JointBlock


@dataclass(frozen=True)
class Grid:
    """The band's image tokens at the patch level: tokens [s0, s1) of the n_full, row-major."""

    level: int
    rows: int  # band rows of patches
    cols: int
    s0: int
    s1: int
    n_full: int

    @classmethod
    def of(cls, call: CallState) -> "Grid":
        bands, level = call.bands, call.bands.levels
        rows, cols = bands.level_size(level)
        r0, r1 = bands.rows(call.band, level)
        return cls(level, r1 - r0, cols, r0 * cols, r1 * cols, rows * cols)

    @property
    def n_band(self) -> int:
        return self.s1 - self.s0

    def cut(self, t: torch.Tensor, text: int, dim: int, what: str) -> torch.Tensor:
        """[.., text + n_full (or n_band), ..] along `dim` -> the text and this band's image tokens."""
        n = t.shape[dim]
        if n == text + self.n_band:
            return t
        if n != text + self.n_full:
            raise UnsupportedModelError(f"{what} has {n} tokens; expected {text} text + {self.n_full} image "
                                        f"tokens (or {self.n_band} of the band): extra tokens (reference latents, "
                                        "Kontext) are not supported")
        img = t.narrow(dim, text + self.s0, self.n_band)
        return torch.cat([t.narrow(dim, 0, text), img], dim=dim) if text else img


class _Memo:
    """Text length of the current call, shared by the blocks of one model: Flux's single-stream
    blocks see [txt; img] and learn where the text ends from the double-stream blocks."""

    def __init__(self) -> None:
        self.call: CallState | None = None
        self.text = 0


class DitBlock(BandLayer):
    """One transformer block on the band: the full-image tokens it first receives are cut to the
    band (so everything before the blocks, patchify and positions, saw the whole image and every
    token keeps its true position), then the block's attention runs as JointAttention."""

    def __init__(self, inner: nn.Module, name: str, exchange: Exchange, *, kind: str, text_used: bool,
                 memo: _Memo):
        super().__init__(inner, name, exchange)
        if kind not in KINDS:
            raise UnsupportedModelError(f"{name}: unknown transformer block kind {kind!r}")
        self.kind, self.text_used = kind, text_used
        object.__setattr__(self, "memo", memo)  # shared, not a submodule
        object.__setattr__(self, "_sig", inspect.signature(inner.forward) if kind != "joint" else None)

    def forward(self, *args: Any, **kwargs: Any):
        if not self.split_active():
            return self.inner(*args, **kwargs)
        grid = Grid.of(self.call)
        if self.kind == "joint":  # MMDiT: (context, x, c=..., transformer_options=...)
            context, x = args[0], args[1]
            text = 0 if context is None else context.shape[1]
            args = (context, grid.cut(x, 0, 1, self.layer_name), *args[2:])
            opts = kwargs.get("transformer_options")
        else:
            bound = self._sig.bind(*args, **kwargs)
            a = bound.arguments
            if self.kind == "double":
                text = a["txt"].shape[1]
                self.memo.call, self.memo.text = self.call, text
                a["img"] = grid.cut(a["img"], 0, 1, self.layer_name)
            else:
                if self.memo.call is not self.call:
                    raise UnsupportedModelError(f"{self.layer_name}: a single-stream block ran before any "
                                                "double-stream block; the text length is unknown")
                text = self.memo.text
                a["x"] = grid.cut(a["x"], text, 1, self.layer_name)
            if a.get("pe") is not None:
                a["pe"] = grid.cut(a["pe"], text, 2, f"{self.layer_name} positions (pe)")
            args, kwargs = bound.args, bound.kwargs
            opts = kwargs.get("transformer_options")
        attention = JointAttention(self, grid, text, (opts or {}).get("optimized_attention_override"))
        kwargs = {**kwargs, "transformer_options": {**(opts or {}), "optimized_attention_override": attention}}
        out = self.inner(*args, **kwargs)
        if not attention.calls:
            raise UnsupportedModelError(f"{self.layer_name}: the block's attention did not go through "
                                        "transformer_options['optimized_attention_override']; bands cannot split it")
        return out


class JointAttention:
    """The override for one block call: `(func, q, k, v, heads, **kw)` as ComfyUI's wrap_attn calls it."""

    def __init__(self, layer: DitBlock, grid: Grid, text: int, previous: Any):
        self.layer, self.grid, self.text, self.previous = layer, grid, text, previous
        self.calls = 0

    def __call__(self, func, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any):
        self.calls += 1
        heads = args[0] if args else kwargs.pop("heads")
        if kwargs.get("mask") is not None:
            raise UnsupportedModelError(f"{self.layer.layer_name}: attention masks are not supported on bands")
        skip_out = kwargs.get("skip_output_reshape", False)
        if not kwargs.get("skip_reshape", False):  # [B, L, H*d] (MMDiT's v: [B, L, H, d]) -> [B, H, L, d]
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        text = q.shape[2] - self.grid.n_band
        if text not in (self.text, 0):  # 0: an image-only attention (SD3.5's x_block attn2)
            raise UnsupportedModelError(f"{self.layer.layer_name}: attention over {q.shape[2]} tokens; expected "
                                        f"{self.text} text + {self.grid.n_band} image tokens of the band")
        (qt, qi), (kt, ki), (vt, vi) = ((t[:, :, :text], t[:, :, text:]) for t in (q, k, v))  # [B, H, *, d]
        k_win, v_win = self._window(ki, vi)  # [B, H, M, d]
        kw = {**kwargs, "skip_reshape": True}
        kernel = (lambda *a, **k_: self.previous(func, *a, **k_)) if self.previous is not None else func
        img = kernel(qi, torch.cat([kt, k_win], 2), torch.cat([vt, v_win], 2), heads, **kw)
        if not text:
            return img
        txt = self._text(qt, kt, vt, ki, vi).to(img.dtype)  # [B, H, T, d]
        if skip_out:
            return torch.cat([txt, img], dim=2)
        return torch.cat([txt.transpose(1, 2).flatten(2), img], dim=1)  # [B, T + n, H*d]

    def _window(self, ki: torch.Tensor, vi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image K/V of the band's window: [B, H, n, d] own -> [B, H, M, d] each."""
        g = self.grid
        b, h, n, d = ki.shape
        kv = torch.cat([ki, vi], dim=1).transpose(1, 2).reshape(b, g.rows, g.cols, 2 * h * d)  # [B, r, W, 2Hd]
        kv_win = window_kv(self.layer, kv, g.level)  # [B, M, 2Hd]
        k_win, v_win = kv_win.unflatten(-1, (2 * h, d)).transpose(1, 2).chunk(2, dim=1)
        return k_win, v_win

    def _text(self, qt, kt, vt, ki, vi) -> torch.Tensor:
        """Text queries over the text and every band's image tokens, merged: [B, H, T, d] float32."""
        layer, call = self.layer, self.layer.call
        parts = [attend_lse(qt, kt, vt)]
        out, lse = attend_lse(qt, ki, vi)  # over the own band's image tokens (fresh)
        if not (call.exchange and layer.text_used):  # naive, or a block whose text output is unused
            return merge_lse([*parts, (out, lse)])
        count, band = call.bands.count, call.band
        out = out.to(qt.dtype)  # travels in the model's dtype; the merge weights in float32
        recv = {b: (tuple(out.shape), (0, 0)) for b in range(count) if b != band}
        got_out = layer.exchange.swap(f"{layer.layer_name}.text", {b: out for b in range(count)}, recv,
                                      out.dtype, out.device)
        recv = {b: (tuple(lse.shape), (0, 0)) for b in range(count) if b != band}
        got_lse = layer.exchange.swap(f"{layer.layer_name}.lse", {b: lse for b in range(count)}, recv,
                                      lse.dtype, lse.device)
        parts += [(got_out[b].tensor.float(), got_lse[b].tensor) for b in range(count)]
        return merge_lse(parts)


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp, float32: q [B, H, n, d], k/v [B, H, m, d] ->
    (out [B, H, n, d], lse [B, H, n]). Heads in chunks, so the scores stay near 2**26 floats."""
    scale = q.shape[-1] ** -0.5
    step = max(1, (1 << 26) // max(1, q.shape[0] * q.shape[2] * k.shape[2]))
    outs, lses = [], []
    for h in range(0, q.shape[1], step):
        s = torch.matmul(q[:, h:h + step].float(), k[:, h:h + step].float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(s, dim=-1)  # [B, h, n]
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), v[:, h:h + step].float()))
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 1)


def merge_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over the union of key sets from per-set (out, lse), in the given order: [B, H, n, d]."""
    lse = torch.stack([p[1] for p in parts])  # [P, B, H, n]
    w = torch.exp(lse - lse.max(0).values)  # [P, B, H, n]
    out = sum(w[i][..., None] * p[0] for i, p in enumerate(parts))
    return out / w.sum(0)[..., None]


class FullImageOutput(BandLayer):
    """The model's last (per-token) layer on the band's tokens, placed in a zero sequence of the
    whole image, so the model's own unpatchify sees the shape it expects; the runner then keeps
    the band's rows of the output (ModelPlan.full_output)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # x: [B, n, D]
        y = self.inner(x, *args, **kwargs)
        if not self.split_active():
            return y
        g = Grid.of(self.call)
        if y.shape[1] != g.n_band:
            raise UnsupportedModelError(f"{self.layer_name}: {y.shape[1]} output tokens; expected the band's "
                                        f"{g.n_band}")
        full = y.new_zeros(y.shape[0], g.n_full, *y.shape[2:])  # [B, N, C']
        full[:, g.s0:g.s1] = y
        return full
