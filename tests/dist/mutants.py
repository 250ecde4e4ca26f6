"""Deliberately broken stale maths, patched into a worker through the preload hook
(PCPP_WORKER_PRELOAD=mutants): the stale-reference comparison must catch each of them.

A call runs mutated when its slot is a mutant's name (so one pool serves every mutant);
any other slot runs the real engine.

- "frozen":         buffers frozen after warm-up: every stale call reuses the last synchronous data
- "gn_uncorrected": GroupNorm with the stale total statistics, without the own fresh-minus-stale correction
- "kv_own_stale":   self-attention with its own band's K/V from the previous call instead of fresh

And one failure: "config_error_rank1" makes rank 1 alone raise a ConfigError before its first
exchange, so rank 0 stays blocked waiting for it.
"""
from __future__ import annotations

import torch

from pcpp_core.errors import ConfigError
from pcpp_core.exchange import Exchange
from pcpp_core.layers import attention as attention_mod
from pcpp_core.layers import groupnorm as groupnorm_mod
from pcpp_core.runner import BandRunner

MUTANTS = ("frozen", "gn_uncorrected", "kv_own_stale")
_active: list[str | None] = [None]


def _runs(name: str) -> bool:
    return _active[0] == name


_run = BandRunner.run


def run(self, req, transport):
    _active[0] = req.slot if req.slot in MUTANTS else None
    if req.slot == "config_error_rank1" and self.rank == 1:
        raise ConfigError("rank 1 refuses this call (test mutant)")
    return _run(self, req, transport)


_swap = Exchange.swap


def swap(self, layer, sends, recvs, dtype, device, **codec):  # codec: channel_dim, rows (see Exchange.swap)
    if not _runs("frozen"):
        return _swap(self, layer, sends, recvs, dtype, device, **codec)
    call = self.call
    key = (call.slot, layer, self._occurrence[layer])
    frozen = self.__dict__.setdefault("_mutant_frozen", {})
    got = _swap(self, layer, sends, recvs, dtype, device, **codec)
    if call.synchronous or key not in frozen:
        frozen[key] = got
    return frozen[key]


_gn_forward = groupnorm_mod.BandGroupNorm.forward


def gn_forward(self, x):
    if not _runs("gn_uncorrected") or not self.split_active():
        return _gn_forward(self, x)
    call = self.call
    own = groupnorm_mod.band_stats(x, self.inner.num_groups)
    store = self.__dict__.setdefault("_mutant_own", {})
    stale_own, store[call.slot] = store.get(call.slot), own
    if call.synchronous or stale_own is None:
        return _gn_forward(self, x)
    combine = groupnorm_mod.combine_stats
    groupnorm_mod.combine_stats = lambda stats, w: combine(
        [stale_own if b == call.band else s for b, s in enumerate(stats)], w)
    try:
        return _gn_forward(self, x)
    finally:
        groupnorm_mod.combine_stats = combine


_attn_forward = attention_mod.WindowAttention.forward


def attn_forward(self, x, *args, **kwargs):
    """WindowAttention.forward with one change: parts[band] is the previous call's own K/V."""
    if not _runs("kv_own_stale") or not self.split_active():
        return _attn_forward(self, x, *args, **kwargs)
    call, m = self.call, self.inner
    bands, band = call.bands, call.band
    level = bands.level_of_tokens(band, x.shape[1])
    r0, r1 = bands.rows(band, level)
    cols = bands.level_size(level)[1]
    q, k, v = m.to_q(x), m.to_k(x), m.to_v(x)
    kv = torch.cat([k, v], dim=-1).view(x.shape[0], r1 - r0, cols, -1)
    store = self.__dict__.setdefault("_mutant_kv", {})
    stale_own, store[call.slot] = store.get(call.slot), kv
    parts = {band: kv if call.synchronous or stale_own is None else stale_own}  # the mutation
    sends, recvs = {}, {}
    for other in range(bands.count):
        lo, hi = bands.needed(other, band, level, call.window)
        if hi > lo:
            sends[other] = kv[:, lo - r0: hi - r0]
        lo, hi = bands.needed(band, other, level, call.window)
        if hi > lo:
            recvs[other] = ((kv.shape[0], hi - lo, cols, kv.shape[3]), (lo, hi))
    got = self.swap(sends, recvs, kv)
    for other, (_, (lo, hi)) in recvs.items():
        piece = got[other]
        parts[other] = piece.tensor[:, lo - piece.rows[0]: hi - piece.rows[0]]
    k_win, v_win = torch.cat([parts[b] for b in sorted(parts)], dim=1).flatten(1, 2).chunk(2, dim=-1)
    out = m.to_out[0](attention_mod._attend(q, k_win, v_win, m))
    return m.to_out[1](out) if len(m.to_out) > 1 else out


BandRunner.run = run
Exchange.swap = swap
groupnorm_mod.BandGroupNorm.forward = gn_forward
attention_mod.WindowAttention.forward = attn_forward
