"""Single-process references for the engine tests: the same model with self-attention masked
to each band's window, computed over the whole image in one process."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from pcpp_core.geometry import Bands
from pcpp_core.layers import WindowAttention
from pcpp_core.plans import _targets, find_plan


def _mask(bands: Bands, level: int, fraction: float | None) -> torch.Tensor:
    """[N, N] bool: query token (row r) may attend key token (row s) iff s is in r's band window."""
    rows, cols = bands.level_size(level)
    allowed = torch.zeros(rows, rows, dtype=torch.bool)
    for b in range(bands.count):
        r0, r1 = bands.rows(b, level)
        w0, w1 = bands.window(b, level, fraction)
        allowed[r0:r1, w0:w1] = True
    return allowed.repeat_interleave(cols, 0).repeat_interleave(cols, 1)


class _Masked(nn.Module):
    def __init__(self, inner: nn.Module, bands: Bands, fraction: float | None):
        super().__init__()
        self.inner, self.bands, self.fraction = inner, bands, fraction

    def forward(self, x, *args, **kwargs):
        m = self.inner
        tokens = x.shape[1]
        level = next(l for l in range(self.bands.levels + 1)
                     if self.bands.level_size(l)[0] * self.bands.level_size(l)[1] == tokens)
        q, k, v = m.to_q(x), m.to_k(x), m.to_v(x)
        b, n, d = q.shape
        q, k, v = (t.reshape(b, n, m.heads, d // m.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(self.bands, level, self.fraction),
                                             scale=getattr(m, "scale", None))
        out = m.to_out[0](out.transpose(1, 2).reshape(b, n, d))
        return m.to_out[1](out)


@contextlib.contextmanager
def masked_self_attention(model: nn.Module, bands: Bands, fraction: float | None):
    """Temporarily mask every self-attention of `model` to the PCPP windows of `bands`."""
    plan = find_plan(model)
    names = [n for n, cls in _targets(model, plan).items() if cls is WindowAttention]
    originals = {n: model.get_submodule(n) for n in names}

    def put(name: str, module: nn.Module) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)

    for n, m in originals.items():
        put(n, _Masked(m, bands, fraction))
    try:
        yield model
    finally:
        for n, m in originals.items():
            put(n, m)
