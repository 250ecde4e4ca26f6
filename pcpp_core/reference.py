"""Single-process references of what N bands compute, written without the engine's band layers.

Two references, both whole-image forward passes of the unmodified model:

- `masked_self_attention`: every self-attention masked to its band's window (docs/PCPP.md
  check 2): what the bands compute when every exchange is fresh. For a transformer (DiT plan)
  every block's joint attention: text queries see all tokens, image queries the text and their
  band's window (reference_dit.py has the DiT's stale counterpart).
- `StaleReference`: what the bands compute after warm-up, when each band uses the data the
  other bands sent during the previous call of the same slot (docs/PCPP.md section 3). For each
  band b it runs the whole model once; at every cross-band layer (k x k conv except the first,
  GroupNorm, self-attention) the rows of the layer's input outside band b are replaced by the
  rows the other bands' passes had there at the previous call of the slot. Then
    * a conv sees fresh own rows and stale neighbour rows at its borders (stale halo);
    * GroupNorm over that tensor uses the mean/variance of own fresh rows + others' stale rows,
      which is exactly DistriFusion's corrected statistics (stale total + own fresh - own stale);
    * self-attention of band b's queries sees the window's keys/values computed from that tensor:
      own rows fresh, neighbour rows stale.
  Band b's own rows of every layer input are recorded for the next call, and band b's rows of
  the output are its part of the result. `naive` mode (no exchange) is not simulated.

Only `plans._targets` (which modules cross bands) and `geometry.Bands` are shared with the engine.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Hashable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import Mode, PatchConfig
from .errors import ConfigError
from .geometry import Bands
from .layers import ExactFirstConv, WindowAttention
from .layers.joint import DitBlock
from .plans import _targets, find_plan

Key = tuple[str, int]  # (module name, occurrence within one forward pass)


def _attention(m: nn.Module, x: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention with `m`'s projections, in float32: queries from x [B, N, C], keys and
    values from kv [B, M, C]; `allowed` [N, M] bool masks query token -> key token."""
    q, k, v = m.to_q(x).float(), m.to_k(kv).float(), m.to_v(kv).float()  # [B, N, D]
    b, n, d = q.shape
    heads = m.heads
    q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=getattr(m, "scale", None))
    out = m.to_out[0](out.transpose(1, 2).reshape(b, n, d).to(x.dtype))
    return m.to_out[1](out) if len(m.to_out) > 1 else out


def _level_of(bands: Bands, tokens: int) -> int:
    for level in range(bands.levels + 1):
        rows, cols = bands.level_size(level)
        if rows * cols == tokens:
            return level
    raise ConfigError(f"a self-attention saw {tokens} tokens, which matches no level of a "
                      f"{bands.height}x{bands.width} latent")


def _window_mask(bands: Bands, level: int, fraction: float | None) -> torch.Tensor:
    """[N, N] bool: query token (row r) may attend key token (row s) iff s is in r's band window."""
    rows, cols = bands.level_size(level)
    allowed = torch.zeros(rows, rows, dtype=torch.bool)
    for b in range(bands.count):
        r0, r1 = bands.rows(b, level)
        w0, w1 = bands.window(b, level, fraction)
        allowed[r0:r1, w0:w1] = True
    return allowed.repeat_interleave(cols, 0).repeat_interleave(cols, 1)


def _context_of(x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("context", kwargs.get("encoder_hidden_states"))


class _Masked(nn.Module):
    def __init__(self, inner: nn.Module, bands: Bands, fraction: float | None):
        super().__init__()
        self.inner, self.bands, self.fraction = inner, bands, fraction

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # x: [B, N, C]
        level = _level_of(self.bands, x.shape[1])
        mask = _window_mask(self.bands, level, self.fraction).to(x.device)
        return _attention(self.inner, x, x, allowed=mask)


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@contextlib.contextmanager
def _swapped(model: nn.Module, make: dict[str, Callable[[nn.Module], nn.Module]]) -> Iterator[nn.Module]:
    originals = {n: model.get_submodule(n) for n in make}
    try:
        for n, m in originals.items():
            _swap(model, n, make[n](m))
        yield model
    finally:
        for n, m in originals.items():
            _swap(model, n, m)


def _self_attention_names(model: nn.Module) -> list[str]:
    return [n for n, cls in _targets(model, find_plan(model)).items() if cls is WindowAttention]


class _MaskedJoint(nn.Module):
    """A transformer block whose attention (through `optimized_attention_override`) is masked to
    the PCPP windows: a text query sees every token, an image query the text and its band's
    window of image tokens (text first in the sequence, as in Flux and MMDiT)."""

    def __init__(self, inner: nn.Module, bands: Bands, fraction: float | None):
        super().__init__()
        self.inner, self.bands, self.fraction = inner, bands, fraction

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        opts = {**(kwargs.get("transformer_options") or {}), "optimized_attention_override": self._attend}
        return self.inner(*args, **{**kwargs, "transformer_options": opts})

    def _attend(self, func, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any):
        heads = args[0] if args else kwargs["heads"]
        if not kwargs.get("skip_reshape", False):  # [B, L, H*d] (MMDiT's v: [B, L, H, d]) -> [B, H, L, d]
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        level = self.bands.levels  # the patch level
        rows, cols = self.bands.level_size(level)
        text = q.shape[2] - rows * cols
        allowed = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool)
        allowed[text:, text:] = _window_mask(self.bands, level, self.fraction)
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed.to(q.device))
        out = out.to(q.dtype)  # [B, H, L, d]
        return out if kwargs.get("skip_output_reshape", False) else out.transpose(1, 2).flatten(2)


@contextlib.contextmanager
def masked_self_attention(model: nn.Module, bands: Bands, fraction: float | None):
    """Temporarily mask every self-attention of `model` to the PCPP windows of `bands`; for a
    transformer (DiT plan), every block's joint attention (see _MaskedJoint)."""
    plan = find_plan(model)
    if plan.targets is not None:
        blocks = [n for n, cls in _targets(model, plan).items() if getattr(cls, "func", cls) is DitBlock]
        with _swapped(model, {n: (lambda m: _MaskedJoint(m, bands, fraction)) for n in blocks}):
            yield model
        return
    names = _self_attention_names(model)
    with _swapped(model, {n: (lambda m: _Masked(m, bands, fraction)) for n in names}):
        yield model


class _StaleInput(nn.Module):
    """Stands in for one cross-band module during band b's pass: its input's rows outside band b
    become the stale rows of the previous call; the original module (or, for self-attention, the
    reference's own windowed attention) then runs on that tensor."""

    def __init__(self, inner: nn.Module, name: str, sim: "_BandPass", attention: bool):
        super().__init__()
        self.inner, self.name, self.sim, self.attention = inner, name, sim, attention

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.attention:
            ctx = _context_of(x, args, kwargs)
            if ctx is not None and ctx is not x:
                raise ConfigError(f"{self.name}: self-attention called with a context")
            level = _level_of(self.sim.bands, x.shape[1])
            rows, cols = self.sim.bands.level_size(level)
            grid = self.sim.substitute(self.name, x.reshape(x.shape[0], rows, cols, -1), 1, level)
            x = grid.flatten(1, 2)  # [B, N, C]: own rows fresh, others stale
            w0, w1 = self.sim.bands.window(self.sim.band, level, self.sim.fraction)
            kv = x[:, w0 * cols: w1 * cols]  # keys/values of band b's window only
            return _attention(self.inner, x, kv)
        level = self._level(x)
        return self.inner(self.sim.substitute(self.name, x, 2, level), *args, **kwargs)

    def _level(self, x: torch.Tensor) -> int:  # x: [B, C, H_l, W_l]
        for level in range(self.sim.bands.levels + 1):
            if self.sim.bands.level_size(level)[0] == x.shape[2]:
                return level
        raise ConfigError(f"{self.name}: input of shape {tuple(x.shape)} matches no level")


class _BandPass:
    """State of one band's whole-image pass: what it reads (stale) and what it records."""

    def __init__(self, bands: Bands, band: int, fraction: float | None,
                 stale: dict[Key, torch.Tensor], record: dict[Key, torch.Tensor]):
        self.bands, self.band, self.fraction = bands, band, fraction
        self.stale, self.record = stale, record
        self.seen: dict[str, int] = {}

    def substitute(self, name: str, x: torch.Tensor, dim: int, level: int) -> torch.Tensor:
        """x with the rows (along `dim`) outside this band replaced by the stale rows."""
        n = self.seen.get(name, 0)
        self.seen[name] = n + 1
        key = (name, n)
        r0, r1 = self.bands.rows(self.band, level)
        own = x.narrow(dim, r0, r1 - r0)
        if key not in self.record:
            self.record[key] = torch.empty_like(x)
        self.record[key].narrow(dim, r0, r1 - r0).copy_(own)
        if key not in self.stale:
            raise ConfigError(f"{name} (occurrence {n}) ran in this call but not in the previous call "
                              "of the slot; the reference has no stale data for it")
        out = self.stale[key].to(x.dtype).clone()
        out.narrow(dim, r0, r1 - r0).copy_(own)
        return out


class StaleReference:
    """What N bands compute, simulated in one process with whole-image forward passes.

    Call it like the model (args[0] is the latent [B, C, H, W]) with the call's `slot` and whether
    the call is `synchronous` (warm-up, or the slot's first call: there is nothing stale yet, so
    such a call is always synchronous). A synchronous call is the plain model; its layer inputs
    become the stale data of the slot's next call. The window is the config's: `pcpp` its
    fraction, `distrifusion` the whole image; `sync` runs every call synchronously and
    `fresh_activations` every call masked but fresh. cfg_split groups and `naive` are not simulated.
    """

    def __init__(self, model: nn.Module, bands: int, config: PatchConfig):
        if config.mode is Mode.NAIVE:
            raise ConfigError("mode='naive' is not simulated by the stale reference; use pcpp, distrifusion or sync")
        self.model, self.count, self.config = model, bands, config
        plan = find_plan(model)
        if plan.targets is not None:
            raise ConfigError(f"the stale reference does not simulate the {plan.family} plan yet; use sync or "
                              "fresh_activations with masked_self_attention")
        self.levels = plan.levels(model)
        self.output = plan.output
        targets = _targets(model, plan)
        self.names = {n: cls is WindowAttention for n, cls in targets.items() if cls is not ExactFirstConv}
        self._stale: dict[Hashable, dict[Key, torch.Tensor]] = {}

    def reset(self) -> None:
        """A new sampling run: no slot has stale data."""
        self._stale.clear()

    def bands_for(self, x: torch.Tensor) -> Bands:
        return Bands.split(x.shape[2], x.shape[3], self.count, self.levels)

    @torch.no_grad()
    def __call__(self, *args: Any, slot: Hashable, synchronous: bool, **kwargs: Any) -> torch.Tensor:
        x = args[0]  # [B, C, H, W]
        bands = self.bands_for(x)
        if self.config.fresh_activations:
            with masked_self_attention(self.model, bands, self.config.window_fraction):
                return self.output(self.model(*args, **kwargs))
        if synchronous or self.config.mode is Mode.SYNC or slot not in self._stale:
            return self._plain(slot, args, kwargs)
        stale, record = self._stale[slot], {}
        out = None
        for band in range(bands.count):
            sim = _BandPass(bands, band, self.config.window_fraction, stale, record)
            make = {n: (lambda m, n=n, a=a: _StaleInput(m, n, sim, a)) for n, a in self.names.items()}
            with _swapped(self.model, make):
                y = self.output(self.model(*args, **kwargs))  # [B, C', H, W]
            out = torch.empty_like(y) if out is None else out
            r0, r1 = bands.rows(band)
            out[:, :, r0:r1] = y[:, :, r0:r1]
        self._stale[slot] = record
        return out

    def _plain(self, slot: Hashable, args: tuple, kwargs: dict) -> torch.Tensor:
        """The plain model; every cross-band layer's whole input is recorded for the next call."""
        record: dict[Key, torch.Tensor] = {}
        seen: dict[str, int] = {}
        hooks = []
        bands = self.bands_for(args[0])

        def hook(name: str):
            def fn(module: nn.Module, inputs: tuple) -> None:
                n = seen.get(name, 0)
                seen[name] = n + 1
                t = inputs[0]
                if t.dim() == 3:  # attention tokens [B, N, C] -> [B, rows, cols, C]
                    rows, cols = bands.level_size(_level_of(bands, t.shape[1]))
                    t = t.reshape(t.shape[0], rows, cols, -1)
                record[(name, n)] = t.detach().clone()
            return fn

        for name in self.names:
            hooks.append(self.model.get_submodule(name).register_forward_pre_hook(hook(name)))
        try:
            out = self.output(self.model(*args, **kwargs))
        finally:
            for h in hooks:
                h.remove()
        self._stale[slot] = record
        return out
