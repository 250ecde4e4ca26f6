"""A random tiny Flux file that ComfyUI's own loader detects (UNETLoader -> supported_models.Flux).

ComfyUI 0.33's detection takes the width from `img_in`, the text and pooled widths from `txt_in`
and `vector_in`, and heads = width / 128 (Flux's RoPE axes [16, 56, 56] fixed): a 128-wide model
with one head and one double + one single block is ~1 M parameters. Text and pooled widths are
768, CLIP-L's, so the random CLIP-L of the ComfyUI test setup can encode its prompts (a random
T5-XXL would be 4.7 B parameters). Written with a fixed seed, fp32.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

CONFIG = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=768, hidden_size=128, mlp_ratio=4.0,
              num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
              qkv_bias=True, guidance_embed=True, txt_ids_dims=[])


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """ComfyUI's own Flux class with unit-scale random weights (keys exactly as in a Flux file)."""
    from comfy.ldm.flux.model import Flux
    from comfy.ops import disable_weight_init

    torch.manual_seed(seed)
    model = Flux(**CONFIG, operations=disable_weight_init)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:  # RMSNorm scales
                p.fill_(1.0)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def unloadable_reason(sd: dict[str, torch.Tensor]) -> str | None:
    """Why this ComfyUI's loader cannot load the tiny file as this Flux (None: it can)."""
    import comfy.model_detection

    found = comfy.model_detection.detect_unet_config(sd, "")
    heads = (found or {}).get("num_heads")
    if heads is not None and heads * sum(CONFIG["axes_dim"]) != CONFIG["hidden_size"]:
        import comfyui_version

        return (f"ComfyUI {comfyui_version.__version__}'s loader fixes a Flux file's num_heads at {heads} "
                f"(width = heads x {sum(CONFIG['axes_dim'])}), so any Flux file it loads is >= "
                f"{heads * sum(CONFIG['axes_dim'])} wide (~0.5 B parameters at depth 1+1): too big for a CPU test. "
                "The graph tests run the same weights in supported_models.Flux, as the loader would build them")
    return None


def write(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    import safetensors.torch

    sd = state_dict(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path))
    return sd
