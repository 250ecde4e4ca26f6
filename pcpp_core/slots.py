"""Call slots from the sigma of each model evaluation, not from where a sampler's callback fires.

Stale buffers must meet data of their own kind: a Heun step evaluates the model at sigma_k (A)
and again at sigma_{k+1} (B); A_{k+1} must read A_k's activations, B_{k+1} B_k's. ComfyUI's
samplers fire the step callback between A and B, so counting calls since the callback mixes
them. The sigma a sampler passes does not depend on the callback:

- `start`: every call at the run's first sigma. Nothing is known about the sampler's pattern
  yet, so step 0's calls never serve as stale data for a later step (their slots are never
  used again; a later step's first call of each slot runs synchronously).
- `on`: a call at another schedule sigma. Index = how many earlier calls of this composition
  were made at this same sigma (Heun: B_k at sigma_{k+1} is 0, A_{k+1} at the same sigma 1; a
  PAG-style extra call gets the next index).
- `off`: a call between schedule sigmas (midpoint samplers: dpm_2, dpmpp_2s_ancestral,
  dpmpp_sde; a churned sigma_hat). Index = off-schedule calls of this composition since its
  last call on the schedule (multi-stage samplers).

The call's step is the number of schedule sigmas strictly above its sigma (A_k -> k, Heun's or
a midpoint's B_k -> k + 1): warm-up is counted in steps, whatever the sampler.
"""
from __future__ import annotations

from typing import Hashable, Sequence

RTOL = 1e-4  # sigmas travel as float32 (and through float16 on some paths): compare loosely


class SlotTracker:
    """Slots and steps of one sampling run over the schedule `sigmas` (high to low)."""

    def __init__(self, sigmas: Sequence[float], rtol: float = RTOL):
        self.sigmas = [float(s) for s in sigmas]
        self.rtol = rtol
        self._at: dict[tuple[Hashable, int], int] = {}  # (composition, schedule index) -> calls so far
        self._off: dict[Hashable, int] = {}  # composition -> off-schedule calls since its last on-schedule one

    def _close(self, a: float, b: float) -> bool:
        return abs(a - b) <= self.rtol * max(abs(a), abs(b)) + 1e-12

    def schedule_index(self, sigma: float) -> int | None:
        """Index of the schedule sigma equal to `sigma` (the first when repeated), or None."""
        return next((i for i, s in enumerate(self.sigmas) if self._close(s, sigma)), None)

    def step(self, sigma: float) -> int:
        """Schedule sigmas strictly above `sigma`."""
        return sum(1 for s in self.sigmas if s > sigma and not self._close(s, sigma))

    def evaluation(self, composition: Hashable, sigma: float) -> tuple[tuple, int]:
        """(slot, step) of the next model call of `composition` (e.g. cond/uncond) at `sigma`."""
        sigma = float(sigma)
        i = self.schedule_index(sigma)
        if i is None:
            index = self._off.get(composition, 0)
            self._off[composition] = index + 1
            role = "off"
        else:
            index = self._at.get((composition, i), 0)
            self._at[(composition, i)] = index + 1
            self._off[composition] = 0
            role = "start" if i == 0 else "on"
        return (composition, role, index), self.step(sigma)
