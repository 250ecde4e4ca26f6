"""A minimal Euler sampler for epsilon-prediction models (k-diffusion parameterisation).

Used by the demo, the quality benchmark and the end-to-end tests, so that one process and
the engine are driven by exactly the same loop; ComfyUI users get ComfyUI's own samplers.
"""
from __future__ import annotations

from typing import Callable

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_in [B,C,H,W], t [B]) -> eps


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
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * eps(x_i / sqrt(sigma_i^2 + 1), t_i); returns x_0."""
    sigmas, ts = euler_schedule(alphas_cumprod, steps)
    x = noise * sigmas[0]
    for i in range(steps):
        s = sigmas[i]
        eps = eps_fn(x / (s * s + 1).sqrt(), ts[i].expand(x.shape[0]))
        x = x + (sigmas[i + 1] - s) * eps
        if callback is not None:
            callback(i, x)
    return x


def cfg_eps(model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
            cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> EpsFn:
    """Classifier-free guidance on one batch [cond; uncond], as ComfyUI batches it."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]))
        e_c, e_u = out.chunk(2)
        return e_u + scale * (e_c - e_u)

    return eps
