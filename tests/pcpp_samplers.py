"""k-diffusion samplers with the call patterns of ComfyUI's (comfy/k_diffusion/sampling.py), for
the slot tests. Each evaluation tells the model which evaluation it is: `model(x, sigma, kind, k)`
-> denoised, with kind "A" (at the step's sigma), "B" (the second evaluation: Heun at
sigma_{k+1}, a midpoint sampler between sigma_k and sigma_{k+1}) or "PAG" (an extra call of the
same composition at the step's sigma), and k the sampler's step. That is the ground truth the
SlotTracker must recover from the sigmas alone."""
from __future__ import annotations

import math
from typing import Callable

import torch

Model = Callable[[torch.Tensor, float, str, int], torch.Tensor]


def _ancestral(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) as k-diffusion's get_ancestral_step."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


def euler(model: Model, x: torch.Tensor, sigmas: list[float], pag: bool = False, **_) -> torch.Tensor:
    for k in range(len(sigmas) - 1):
        s = sigmas[k]
        d = model(x, s, "A", k)
        if pag:  # perturbed-attention guidance: a second call of the same composition at sigma_k
            d = d + 0.5 * (d - model(x * 0.97, s, "PAG", k))
        x = x + (x - d) / s * (sigmas[k + 1] - s)
    return x


def heun(model: Model, x: torch.Tensor, sigmas: list[float], churn: float = 0.0, **_) -> torch.Tensor:
    for k in range(len(sigmas) - 1):
        s = sigmas[k] * (1 + churn)  # sigma_hat: off the schedule when churned
        if churn:
            x = x + 0.1 * math.sqrt(s**2 - sigmas[k] ** 2) * torch.ones_like(x)
        d = (x - model(x, s, "A", k)) / s
        dt = sigmas[k + 1] - s
        if sigmas[k + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - model(x2, sigmas[k + 1], "B", k)) / sigmas[k + 1]
            x = x + (d + d2) / 2 * dt
    return x


def _noise(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + k))


def dpmpp_2s_ancestral(model: Model, x: torch.Tensor, sigmas: list[float], eta: float = 1.0, **_) -> torch.Tensor:
    """With eta = 1 the midpoint sqrt(sigma_k * sigma_down) is exactly sigma_{k+1}: Heun's pattern."""
    for k in range(len(sigmas) - 1):
        s = sigmas[k]
        denoised = model(x, s, "A", k)
        down, up = _ancestral(s, sigmas[k + 1], eta)
        if down == 0:
            x = x + (x - denoised) / s * (down - s)
        else:
            t, t_next = -math.log(s), -math.log(down)
            h = t_next - t
            mid = t + 0.5 * h
            x2 = (math.exp(-mid) / s) * x - math.expm1(-0.5 * h) * denoised
            denoised2 = model(x2, math.exp(-mid), "B", k)
            x = (down / s) * x - math.expm1(-h) * denoised2
        if sigmas[k + 1] > 0:
            x = x + _noise(x, k) * up
    return x


def dpmpp_sde(model: Model, x: torch.Tensor, sigmas: list[float], **_) -> torch.Tensor:
    for k in range(len(sigmas) - 1):
        s = sigmas[k]
        denoised = model(x, s, "A", k)
        if sigmas[k + 1] == 0:
            x = x + (x - denoised) / s * (sigmas[k + 1] - s)
            continue
        t, t_next = -math.log(s), -math.log(sigmas[k + 1])
        h = t_next - t
        mid = t + 0.5 * h
        down, up = _ancestral(s, math.exp(-mid))
        s_ = -math.log(down)
        x2 = (down / s) * x - math.expm1(t - s_) * denoised + _noise(x, k) * up
        denoised2 = model(x2, math.exp(-mid), "B", k)
        down, up = _ancestral(s, sigmas[k + 1])
        t_next_ = -math.log(down)
        x = (down / s) * x - math.expm1(t - t_next_) * (0.5 * denoised + 0.5 * denoised2)
        x = x + _noise(x, 100 + k) * up
    return x


SAMPLERS = {"euler": euler, "heun": heun, "dpmpp_2s_ancestral": dpmpp_2s_ancestral, "dpmpp_sde": dpmpp_sde,
            "euler_pag": lambda model, x, sigmas, **kw: euler(model, x, sigmas, pag=True),
            "dpmpp_2s_ancestral_eta0.5": lambda model, x, sigmas, **kw: dpmpp_2s_ancestral(model, x, sigmas, eta=0.5)}


def position(kind: str, k: int) -> int:
    """The warm-up position of an evaluation: A and PAG of step k at k, the second evaluation at k+1."""
    return k + (kind == "B")


def karras(n: int, sigma_min: float = 0.1, sigma_max: float = 14.6, rho: float = 7.0) -> list[float]:
    ramp = [i / (n - 1) for i in range(n)]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in ramp] + [0.0]
