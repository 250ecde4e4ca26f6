"""Self-attention over a band's window: own rows fresh, neighbour rows stale (or fresh when
synchronous). Each band sends a neighbour only the rows that neighbour's window needs."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..geometry import far_due
from .base import BandLayer


class WindowAttention(BandLayer):
    """Wraps an attention module with `to_q/to_k/to_v/to_out` and `heads` (ComfyUI's
    CrossAttention, diffusers' Attention) used as self-attention."""

    _FORWARDED = frozenset({"to_q", "to_k", "to_v", "to_out", "heads", "dim_head", "scale", "attn_precision"})

    def __getattr__(self, name: str):
        """The wrapped module's projections: a model that replaces this attention (ComfyUI's
        `patches_replace`, e.g. PerturbedAttentionGuidance) calls `attn1.to_q` etc. itself."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in WindowAttention._FORWARDED:
                return getattr(super().__getattr__("inner"), name)
            raise

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # x: [B, N, C]
        if self.band_local():  # naive: attention over the band's own tokens
            return self.inner(x, *args, **kwargs)
        context = args[0] if args else kwargs.get("context", kwargs.get("encoder_hidden_states"))
        context = x if context is None else context
        value = kwargs.get("value")
        value = context if value is None else value
        if context.shape[:2] != x.shape[:2] or value.shape[:2] != x.shape[:2]:
            # a per-token patch (a hypernetwork) may transform the band's own tokens into K/V inputs;
            # anything with other tokens is cross-attention
            raise UnsupportedModelError(f"{self.layer_name}: self-attention called with a context")
        m = self.inner
        bands, band = self.call.bands, self.call.band
        level = bands.level_of_tokens(band, x.shape[1])
        r0, r1 = bands.rows(band, level)
        cols = bands.level_size(level)[1]
        q, k, v = m.to_q(x), m.to_k(context), m.to_v(value)  # [B, N, D] each
        kv = torch.cat([k, v], dim=-1).view(x.shape[0], r1 - r0, cols, -1)  # [B, h, W, 2D]
        kv_win = window_kv(self, kv, level)  # [B, M, 2D]
        k_win, v_win = kv_win.chunk(2, dim=-1)
        out = _attend(q, k_win, v_win, m)
        out = m.to_out[0](out)
        return m.to_out[1](out) if len(m.to_out) > 1 else out


def window_kv(layer: BandLayer, kv: torch.Tensor, level: int) -> torch.Tensor:
    """K/V of the band's attention window, top to bottom: kv [B, h, W, 2D] holds the band's own rows
    (fresh) at `level`; neighbour rows come through the exchange (fresh or stale, only the rows
    the receiver's window needs, plus pcpp's held far rows) -> [B, M, 2D]. Shared by the UNet
    self-attention and the DiT joint attention (layers/joint.py)."""
    call = layer.call
    bands, band = call.bands, call.band
    r0, cols = bands.rows(band, level)[0], bands.level_size(level)[1]
    window = call.window if call.exchange else 0.0
    parts: dict[int, torch.Tensor] = {band: kv}
    if call.exchange:
        # pcpp far context: after warm-up, rows outside the window come from what the
        # receiver holds, this layer's refreshed once every far_refresh calls (far_due);
        # attention then sees the whole image
        far = call.far_refresh if window is not None else 0
        due = far_due(layer.exchange.attention_ordinal(), call.index, far)
        sends, recvs, send_rows, recv_rows, send_far, recv_far = {}, {}, {}, {}, {}, {}
        for other in range(bands.count):
            if other == band:
                continue
            rows = bands.sent_rows(other, band, level, window, due)
            if rows:
                sends[other], send_rows[other] = _take(kv, rows, r0), rows
                send_far[other] = bands.far_rows(other, band, level, window) if due else ()
            rows = bands.sent_rows(band, other, level, window, due)
            if rows:
                recvs[other] = ((kv.shape[0], len(rows), cols, kv.shape[3]), (rows[0], rows[-1] + 1))
                recv_rows[other] = rows
                recv_far[other] = bands.far_rows(band, other, level, window) if due else ()
        spans = {b: bands.rows(b, level) for b in range(bands.count)}
        got = layer.swap(sends, recvs, kv, channel_dim=-1, send_rows=send_rows, recv_rows=recv_rows,
                         spans=spans, hold=call.far_refresh > 0, send_far=send_far,
                         recv_far=recv_far)  # K/V: compressible
        for other in (got if far else recvs):  # far: every band's held rows, sent or not
            if other == band:
                continue
            lo, hi = bands.needed(band, other, level, None if far else window)
            piece = got[other]  # may hold more rows than needed (stale from a whole-image call)
            p0 = piece.rows[0]
            parts[other] = piece.tensor[:, lo - p0: hi - p0]
    return torch.cat([parts[b] for b in sorted(parts)], dim=1).flatten(1, 2)  # [B, M, 2D]


def _take(kv: torch.Tensor, rows: tuple[int, ...], r0: int) -> torch.Tensor:
    """Rows `rows` (image rows, sorted) of a band's K/V [B, h, W, 2D] that starts at row r0."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return kv[:, rows[0] - r0: rows[-1] + 1 - r0]
    return kv.index_select(1, torch.tensor(rows, device=kv.device) - r0)


PrecisionPolicy = Callable[[nn.Module, torch.dtype], "torch.dtype | None"]


def module_precision(m: nn.Module, dtype: torch.dtype) -> torch.dtype | None:
    """The default policy: the module's own `attn_precision` (ComfyUI sets float32 for SD2.x)."""
    return getattr(m, "attn_precision", None)


_policy: list[PrecisionPolicy] = [module_precision]


def set_attention_precision(policy: PrecisionPolicy | None) -> None:
    """Which dtype self-attention computes in: `policy(module, input dtype)` -> dtype, or None
    for the input's. A host installs its own rule (the nodes: ComfyUI's get_attn_precision with
    --force-upcast-attention / --dont-upcast-attention); None restores the default."""
    _policy[0] = policy or module_precision


def attention_dtype(m: nn.Module, dtype: torch.dtype) -> torch.dtype:
    return _policy[0](m, dtype) or dtype


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m) -> torch.Tensor:
    """Multi-head scaled dot-product attention: q [B, N, D], k/v [B, M, D] -> [B, N, D]."""
    heads = m.heads
    b, n, d = q.shape
    dtype = q.dtype
    compute = attention_dtype(m, dtype)
    if compute != dtype:  # upcast (e.g. SD2.x in fp16)
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
    q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    scale = getattr(m, "scale", None)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # [B, heads, N, d/heads]
    return out.transpose(1, 2).reshape(b, n, d).to(dtype)


def value_passthrough(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options=None, mask=None) -> torch.Tensor:
    """Self-attention whose output is its value (each token attends to itself only): what
    PerturbedAttentionGuidance puts in place of a self-attention. Per token, so exact on a band."""
    return v


class TokenwiseKV:
    """Per-token MLPs added to attention's K and V inputs, keyed by their width: what a
    hypernetwork does (ComfyUI's HypernetworkLoader patch, rebuilt here so a worker can unpickle it).
    Per token, so exact on a band."""

    def __init__(self, hypernet: dict, strength: float):
        self.hypernet, self.strength = hypernet, strength  # {width: ModuleList([k_mlp, v_mlp])}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options=None):
        hn = self.hypernet.get(k.shape[-1])
        if hn is not None:
            hn.to(k.device)  # pickled on the host's device; a no-op once there
            k = k + hn[0](k) * self.strength
            v = v + hn[1](v) * self.strength
        return q, k, v
