"""What N bands compute with a transformer (DiT plan) after warm-up, simulated in one process
without the band layers (reference.StaleReference's counterpart; docs/ARCHITECTURE.md, "The
same step on a transformer").

For each band b, one whole-image pass of the unmodified model in which every block's attention
(through `optimized_attention_override`, text first in the sequence) is:
  * image queries: over all text K/V of this pass and the image K/V of band b's window, where
    band b's own rows are this pass's and every other row is what that row's band had at the
    previous call of the slot (rows outside b's own computed in this pass never reach b's rows);
  * text queries: merged (softmax over the union) from the text-over-text part of this pass and
    every band's partial result over its own image tokens at the previous call of the slot.
Band b's rows of the output are its part of the result; its own K/V rows and its own partial are
recorded for the next call. A synchronous call is the plain model, recorded the same way.
Only `plans._targets` (which blocks), `plans_dit` (via find_plan) and `geometry.Bands` are shared
with the engine.
"""
from __future__ import annotations

import contextlib
from typing import Any, Hashable

import torch
import torch.nn.functional as F
from torch import nn

from .config import Mode, PatchConfig
from .errors import ConfigError
from .geometry import Bands
from .plans import _targets, find_plan


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp, float64: q [B, H, n, d], k/v [B, H, m, d]."""
    s = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, H, n, m]
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v.double(), lse


def _union(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    lse = torch.stack([p[1] for p in parts])  # [P, B, H, n]
    w = torch.softmax(lse, 0)  # each part's share of the union's softmax mass
    return sum(w[i][..., None] * p[0] for i, p in enumerate(parts))


class _Block(nn.Module):
    def __init__(self, inner: nn.Module, name: str, sim: "_Pass"):
        super().__init__()
        self.inner, self.name, self.sim = inner, name, sim

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        opts = kwargs.get("transformer_options") or {}
        seen = [0]

        def attend(func, q, k, v, *a, **kw):
            seen[0] += 1
            return self.sim.attend((self.name, seen[0] - 1), q, k, v, a[0] if a else kw["heads"], kw)

        return self.inner(*args, **{**kwargs, "transformer_options": {**opts, "optimized_attention_override": attend}})


class _Pass:
    """One whole-image pass: `band` None = the plain model (a synchronous call)."""

    def __init__(self, bands: Bands, band: int | None, fraction: float | None, stale: dict, record: dict):
        self.bands, self.band, self.fraction, self.stale, self.record = bands, band, fraction, stale, record

    def _tokens(self, band: int) -> slice:
        cols = self.bands.level_size(self.bands.levels)[1]
        r0, r1 = self.bands.rows(band, self.bands.levels)
        return slice(r0 * cols, r1 * cols)

    def attend(self, key, q, k, v, heads: int, kw: dict) -> torch.Tensor:
        if not kw.get("skip_reshape", False):  # [B, L, H*d] (MMDiT's v: [B, L, H, d]) -> [B, H, L, d]
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        rows, cols = self.bands.level_size(self.bands.levels)
        text = q.shape[2] - rows * cols
        (qt, qi), (kt, ki), (vt, vi) = ((t[:, :, :text], t[:, :, text:]) for t in (q, k, v))
        count = self.bands.count
        if self.band is None:  # plain: exact attention; every band's partial and all K/V recorded
            self.record[key] = {"kv": (ki.clone(), vi.clone()),
                                "part": {j: _partial(qt, ki[:, :, self._tokens(j)], vi[:, :, self._tokens(j)])
                                         for j in range(count)}}
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            own = self._tokens(self.band)
            old = self.stale[key]
            k_img, v_img = (t.clone() for t in old["kv"])
            k_img[:, :, own], v_img[:, :, own] = ki[:, :, own], vi[:, :, own]
            rec = self.record.setdefault(key, {"kv": tuple(torch.empty_like(t) for t in old["kv"]), "part": {}})
            rec["kv"][0][:, :, own], rec["kv"][1][:, :, own] = ki[:, :, own], vi[:, :, own]
            rec["part"][self.band] = _partial(qt, ki[:, :, own], vi[:, :, own])
            w0, w1 = self.bands.window(self.band, self.bands.levels, self.fraction)
            window = slice(w0 * cols, w1 * cols)
            img = F.scaled_dot_product_attention(qi, torch.cat([kt, k_img[:, :, window]], 2),
                                                 torch.cat([vt, v_img[:, :, window]], 2))
            txt = _union([_partial(qt, kt, vt)] + [old["part"][j] for j in range(count)]) if text else None
            out = img if txt is None else torch.cat([txt.to(img.dtype), img], 2)
        return out if kw.get("skip_output_reshape", False) else out.transpose(1, 2).flatten(2)


class DitStaleReference:
    """Call it like the model with the call's `slot` and whether it is `synchronous` (a slot's
    first call always is). pcpp (window of its fraction) and distrifusion (whole image);
    sync runs every call plainly; naive and far context are not simulated."""

    def __init__(self, model: nn.Module, bands: int, config: PatchConfig):
        if config.mode is Mode.NAIVE or config.far_refresh or config.fresh_activations:
            raise ConfigError("the DiT stale reference simulates pcpp, distrifusion and sync (no naive, far "
                              "context or fresh_activations: use masked_self_attention for the latter)")
        plan = find_plan(model)
        if plan.targets is None:
            raise ConfigError(f"{plan.family} is not a transformer plan; use reference.StaleReference")
        self.model, self.count, self.config, self.levels = model, bands, config, plan.levels(model)
        self.blocks = [n for n, cls in _targets(model, plan).items() if getattr(cls, "func", None) is not None]
        self._stale: dict[Hashable, dict] = {}

    @contextlib.contextmanager
    def _wrapped(self, sim: _Pass):
        originals = {n: self.model.get_submodule(n) for n in self.blocks}
        try:
            for n, m in originals.items():
                _set(self.model, n, _Block(m, n, sim))
            yield
        finally:
            for n, m in originals.items():
                _set(self.model, n, m)

    @torch.no_grad()
    def __call__(self, *args: Any, slot: Hashable, synchronous: bool, **kwargs: Any) -> torch.Tensor:
        x = args[0]  # [B, C, H, W]
        bands = Bands.split(x.shape[2], x.shape[3], self.count, self.levels)
        record: dict = {}
        if synchronous or self.config.mode is Mode.SYNC or slot not in self._stale:
            with self._wrapped(_Pass(bands, None, None, {}, record)):
                out = self.model(*args, **kwargs)
        else:
            out = None
            for band in range(bands.count):
                with self._wrapped(_Pass(bands, band, self.config.window_fraction, self._stale[slot], record)):
                    y = self.model(*args, **kwargs)  # [B, C, H, W]
                out = torch.empty_like(y) if out is None else out
                r0, r1 = bands.rows(band)
                out[:, :, r0:r1] = y[:, :, r0:r1]
        self._stale[slot] = record
        return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
