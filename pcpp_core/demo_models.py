"""The two built-in trained models behind one small interface, for the demo and `bench quality`.

`unet`: pcpp-tiny-unet (diffusers UNet, pixel space, epsilon prediction, Euler on its VP schedule).
`dit`: pcpp-tiny-dit (ComfyUI's Flux layout, pixel-unshuffle latent, rectified flow, Euler).
Both are conditioned on the same 12 image ids (a learned [13, 4, 64] table, row 12 = null), so
one loop draws with either: noise in the model's space, `sample(fn)` with fn(x, t, c, **call)
batched as [cond; uncond], `decode` to [-1, 1] RGB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import ConfigError
from .sampling import cfg_eps, euler_sample, flow_sample

MODELS = ("unet", "dit")
ModelFn = Callable[..., torch.Tensor]  # (x, t, context, **call) -> model output


@dataclass
class DemoModel:
    name: str  # the asset's name, as rows and figures say it
    module: nn.Module
    emb: torch.Tensor  # [13, 4, 64] condition table, row 12 = null
    channels: int  # of the model's input
    factor: int  # image pixels per model pixel along each side
    multiple: int  # image sizes must be multiples of this (1: any)
    kwarg: str  # the keyword the condition tokens travel in
    _sample: Callable[[Callable, torch.Tensor, int], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]  # model space -> [B, 3, H, W]

    def noise(self, n: int, size: int, seed: int) -> torch.Tensor:
        """[n, C, size/f, size/f] standard normal noise from one seeded generator."""
        if size % self.multiple:
            raise ConfigError(f"size {size}: {self.name} draws sizes that are multiples of {self.multiple} "
                              f"(its latent is 1/{self.factor} of the image, cut into 2x2 patches)")
        s = size // self.factor
        return torch.randn(n, self.channels, s, s, generator=torch.Generator().manual_seed(seed))

    def plain(self) -> ModelFn:
        """fn(x, t, c) of the model on one process."""
        return lambda x, t, c, **_: _output(self.module(x, t, **{self.kwarg: c}))

    def on(self, engine: Any) -> ModelFn:
        """fn(x, t, c, slot=, step=) through a pcpp_core Engine, [cond; uncond] as two batch chunks."""
        return lambda x, t, c, **call: engine(self.module, x, t, **{self.kwarg: c}, batch_chunks=2, **call)

    def sample(self, fn: ModelFn, cond: torch.Tensor, noise: torch.Tensor, steps: int, cfg: float) -> torch.Tensor:
        """Final sample in model space; CFG batched as [cond; uncond] (uncond = the null row)."""
        uncond = self.emb[12:13].expand_as(cond)
        with torch.inference_mode():
            return self._sample(cfg_eps(fn, cond, uncond, cfg), noise, steps)


def _output(out: Any) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out


def load_demo_model(kind: str) -> DemoModel:
    """`unet` or `dit`, loaded from pcpp_core/assets in fp32."""
    if kind == "unet":
        from .tiny_model import load_tiny_unet

        unet, emb, alphas = load_tiny_unet()
        return DemoModel("pcpp-tiny-unet", unet, emb, unet.config.in_channels, 1, 1, "encoder_hidden_states",
                         lambda fn, noise, steps: euler_sample(fn, noise, alphas, steps), lambda x: x)
    if kind == "dit":
        from .tiny_dit import LATENT_FACTOR, load_tiny_dit, to_image

        dit, emb = load_tiny_dit()
        return DemoModel("pcpp-tiny-dit", dit, emb, dit.params.in_channels, LATENT_FACTOR, 2 * LATENT_FACTOR, "context",
                         lambda fn, noise, steps: flow_sample(fn, noise, steps), to_image)
    raise ConfigError(f"unknown built-in model {kind!r}; valid: {', '.join(MODELS)}")
