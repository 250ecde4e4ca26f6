"""The built-in demo model (needs diffusers): a small trained pixel-space UNet, see assets/."""
from __future__ import annotations

import json
from pathlib import Path

import torch

ASSET = Path(__file__).resolve().parent / "assets" / "pcpp-tiny-unet"
NAMES = tuple(json.loads((ASSET / "embeddings.json").read_text())["ids"][str(i)] for i in range(12))
NULL_ID = 12


def load_tiny_unet(dtype: torch.dtype = torch.float32):
    """(unet, embeddings [13, 4, 64], alphas_cumprod [1000]) of the bundled model."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as e:  # the engine itself never needs diffusers; the demo does
        raise ImportError("the demo model needs diffusers: pip install -r requirements-dev.txt") from e
    from safetensors.torch import load_file

    config = json.loads((ASSET / "unet_config.json").read_text())
    unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict({k: v.to(dtype) for k, v in load_file(str(ASSET / "unet.fp16.safetensors")).items()})
    unet = torch.nn.Module.to(unet, dtype).eval().requires_grad_(False)  # diffusers' .to() warns here
    emb = load_file(str(ASSET / "embeddings.safetensors"))["embeddings"].to(dtype)
    sched = json.loads((ASSET / "scheduler_config.json").read_text())
    return unet, emb, cosine_alphas_cumprod(sched["num_train_timesteps"])


def cosine_alphas_cumprod(steps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """The squaredcos_cap_v2 schedule the model was trained with."""
    import math

    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f((i + 1) / steps) / f(i / steps), max_beta) for i in range(steps)],
                         dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)
