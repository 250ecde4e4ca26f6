"""Minimal Euler samplers: epsilon prediction (k-diffusion parameterisation) and rectified flow.

Used by the demo, the quality benchmark and the end-to-end tests, so that one process and
the engine are driven by exactly the same loop; ComfyUI users get ComfyUI's own samplers.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .slots import SlotTracker

EpsFn = Callable[..., torch.Tensor]  # (x_in [B,C,H,W], t [B], slot=..., step=...) -> eps


def euler_schedule(alphas_cumprod: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [steps+1] ending in 0, timesteps [steps]) with "leading" spacing, high noise first."""
    n = len(alphas_cumprod)
    ts = torch.arange(0, steps) * (n // steps)
    ts = ts.flip(0)
    ac = alphas_cumprod[ts]
    sigmas = ((1 - ac) / ac).sqrt()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float(), ts.float()


def euler_sample(eps_fn: EpsFn, noise: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int,
                 callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * eps(x_i / sqrt(sigma_i^2 + 1), t_i); returns x_0.

    `eps_fn` also gets the call's `slot` and `step` from a SlotTracker, as the engine takes them.
    """
    sigmas, ts = euler_schedule(alphas_cumprod, steps)
    tracker = SlotTracker(sigmas.tolist())
    x = noise * sigmas[0]
    for i in range(steps):
        s = sigmas[i]
        slot, step = tracker.evaluation("eps", float(s))
        eps = eps_fn(x / (s * s + 1).sqrt(), ts[i].expand(x.shape[0]), slot=slot, step=step)
        x = x + (sigmas[i + 1] - s) * eps
        if callback is not None:
            callback(i, x)
    return x


def flow_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Rectified-flow sigmas [steps+1] from 1 to 0, time-shifted as ComfyUI's ModelSamplingFlux/SD3."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


def flow_sample(v_fn: EpsFn, noise: torch.Tensor, steps: int, shift: float = 1.0,
                callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Euler for velocity models (Flux, the tiny DiT): x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, sigma_i).

    x_sigma = (1 - sigma) x_0 + sigma * noise and v = noise - x_0; the model gets sigma as its timestep.
    `v_fn` gets `slot` and `step` as in `euler_sample`.
    """
    sigmas = flow_schedule(steps, shift)
    tracker = SlotTracker(sigmas.tolist())
    x = noise
    for i in range(steps):
        s = sigmas[i]
        slot, step = tracker.evaluation("eps", float(s))
        x = x + (sigmas[i + 1] - s) * v_fn(x, s.expand(x.shape[0]), slot=slot, step=step)
        if callback is not None:
            callback(i, x)
    return x


def cfg_eps(model_fn: Callable[..., torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> EpsFn:
    """Classifier-free guidance on one batch [cond; uncond], as ComfyUI batches it.

    `model_fn(x, t, context, slot=..., step=...)`: the engine uses slot and step, a plain model ignores them.
    """

    def eps(x: torch.Tensor, t: torch.Tensor, **call: Any) -> torch.Tensor:
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]), **call)
        e_c, e_u = out.chunk(2)
        return e_u + scale * (e_c - e_u)

    return eps
