"""Transformer (DiT) plans: Flux (ComfyUI's comfy.ldm.flux.model.Flux and models built like it,
pcpp_core.tiny_dit) and SD3's MMDiT, recognised by structure.

Bands are whole rows of patch tokens: the plan's level is log2(patch size), so `geometry.Bands`
puts band borders on patch rows. Every transformer block becomes a `layers.joint.DitBlock`
and the last layer a `FullImageOutput`; everything before the blocks (patchify, positions,
embeddings) runs on the whole image, which is what gives every token its true position (Flux's
RoPE ids, MMDiT's cropped position embedding) without knowing how the model computes it.
"""
from __future__ import annotations

import functools
import math
from typing import Any

from torch import nn

from .errors import UnsupportedModelError
from .geometry import LayerSpec
from .layers.joint import DitBlock, FullImageOutput, _Memo
from .plans import ModelPlan

FLUX_DOUBLE = ("img_attn", "txt_attn", "img_mlp", "txt_mlp")  # attributes of a double-stream block
FLUX_SINGLE = ("linear1", "linear2", "pre_norm")
MMDIT_JOINT = ("context_block", "x_block")


def _has(m: Any, attrs: tuple[str, ...]) -> bool:
    return all(hasattr(m, a) for a in attrs)


def _flux_matches(model: nn.Module) -> bool:
    return _has(model, ("double_blocks", "single_blocks", "img_in", "txt_in", "pe_embedder", "final_layer")) \
        and isinstance(model.double_blocks, nn.ModuleList)


def _mmdit_matches(model: nn.Module) -> bool:
    return _has(model, ("joint_blocks", "x_embedder", "final_layer", "cropped_pos_embed")) \
        and isinstance(model.joint_blocks, nn.ModuleList)


def _patch_levels(patch: int, family: str) -> int:
    if patch < 1 or patch & (patch - 1):
        raise UnsupportedModelError(f"{family}: patch size {patch} is not a power of two")
    return int(math.log2(patch))


def _check_blocks(blocks: nn.ModuleList, attrs: tuple[str, ...], where: str) -> None:
    for i, b in enumerate(blocks):
        if not _has(b, attrs):
            raise UnsupportedModelError(f"{where}.{i} is a {type(b).__name__}, not a block kind the DiT plan "
                                        f"knows (expected the attributes {', '.join(attrs)})")


def _flux_check(model: nn.Module) -> None:
    _check_blocks(model.double_blocks, FLUX_DOUBLE, "double_blocks")
    _check_blocks(model.single_blocks, FLUX_SINGLE, "single_blocks")
    if not len(model.double_blocks):
        raise UnsupportedModelError("a Flux-layout model without double-stream blocks is not supported")
    if any(getattr(b, "flipped_img_txt", False) for b in model.double_blocks):
        raise UnsupportedModelError("double-stream blocks with image tokens before text (flipped_img_txt, "
                                    "HunyuanVideo-style) are not supported")


def _mmdit_check(model: nn.Module) -> None:
    _check_blocks(model.joint_blocks, MMDIT_JOINT, "joint_blocks")


def _flux_targets(model: nn.Module) -> dict[str, Any]:
    _flux_check(model)
    memo = _Memo()
    out: dict[str, Any] = {}
    for i in range(len(model.double_blocks)):
        out[f"double_blocks.{i}"] = functools.partial(DitBlock, kind="double", text_used=True, memo=memo)
    last = len(model.single_blocks) - 1
    for i in range(last + 1):  # the last block's text outputs are dropped by the model: not exchanged
        out[f"single_blocks.{i}"] = functools.partial(DitBlock, kind="single", text_used=i < last, memo=memo)
    out["final_layer"] = FullImageOutput
    return out


def _mmdit_targets(model: nn.Module) -> dict[str, Any]:
    _mmdit_check(model)
    memo = _Memo()
    out: dict[str, Any] = {}
    for i, b in enumerate(model.joint_blocks):  # a pre_only context block returns no text
        used = not getattr(b.context_block, "pre_only", False)
        out[f"joint_blocks.{i}"] = functools.partial(DitBlock, kind="joint", text_used=used, memo=memo)
    out["final_layer"] = FullImageOutput
    return out


def check_call(kwargs: dict) -> None:
    """Refuse inputs the DiT plans do not split (before any work): a clear reason, not a wrong image."""
    for key, what in (("control", "ControlNet for DiTs"), ("ref_latents", "reference latents (Kontext, edit models)"),
                      ("attention_mask", "an attention mask")):
        if kwargs.get(key) is not None:
            raise UnsupportedModelError(f"{what} ({key}) is not supported on bands yet; run it on one device")
    opts = kwargs.get("transformer_options") or {}
    if (opts.get("patches") or {}).get("post_input"):
        raise UnsupportedModelError("post_input patches (they may add image tokens) are not supported on bands")


def flux_specs(model: nn.Module, text: int) -> list[LayerSpec]:
    """Exchanging layers of one Flux forward pass with `text` text tokens, in call order (structure only)."""
    _flux_check(model)
    level = _patch_levels(int(model.patch_size), "flux")
    d, heads = int(model.hidden_size), int(model.num_heads)
    last = len(model.single_blocks) - 1
    specs = [LayerSpec("joint", level, d, text=text, heads=heads) for _ in model.double_blocks]
    specs += [LayerSpec("joint", level, d, text=text if i < last else 0, heads=heads)
              for i in range(last + 1)]
    return specs


def mmdit_specs(model: nn.Module, text: int) -> list[LayerSpec]:
    """Exchanging layers of one MMDiT forward pass (text = context tokens + registers), in call order."""
    _mmdit_check(model)
    level = _patch_levels(int(model.x_embedder.patch_size[0]), "mmdit")
    specs = []
    for b in model.joint_blocks:
        x = b.x_block
        d, heads = int(x.attn.qkv.out_features) // 3, int(x.attn.num_heads)
        used = not getattr(b.context_block, "pre_only", False)
        specs.append(LayerSpec("joint", level, d, text=text if used else 0, heads=heads))
        if getattr(x, "x_block_self_attn", False):
            specs.append(LayerSpec("attention", level, int(x.attn2.qkv.out_features) // 3))
    return specs


def call_specs(model: nn.Module, family: str, args: tuple, kwargs: dict) -> list[LayerSpec]:
    """The layer specs of one call `model(x, t, context, ...)` (plans.profile_layers for DiTs):
    the text length is the context's (MMDiT: plus its registers)."""
    context = kwargs.get("context", args[2] if len(args) > 2 else None)
    text = 0 if context is None else int(context.shape[1])
    if family == "flux":
        return flux_specs(model, text)
    return mmdit_specs(model, text + int(getattr(model, "register_length", 0) or 0))


def flux_spec_values(hidden: int, heads: int, double: int, single: int, text: int, level: int = 1) -> list[LayerSpec]:
    """Flux specs from its dimensions alone (bench comm: Flux-dev is 3072 wide, 24 heads, 19 + 38 blocks)."""
    specs = [LayerSpec("joint", level, hidden, text=text, heads=heads) for _ in range(double)]
    specs += [LayerSpec("joint", level, hidden, text=text if i < single - 1 else 0, heads=heads)
              for i in range(single)]
    return specs


DIT_PLANS: tuple[ModelPlan, ...] = (
    ModelPlan(
        family="flux",  # ComfyUI's Flux (Flux.1/2, Chroma-like layouts) and pcpp_core.tiny_dit
        matches=_flux_matches,
        first_conv="",
        is_self_attention=lambda name, module, parent: False,
        spatial_kwargs=(),
        output=lambda out: out,
        targets=_flux_targets,
        levels_of=lambda m: _patch_levels(int(m.patch_size), "flux"),
        check_call=check_call,
        full_output=True,
    ),
    ModelPlan(
        family="mmdit",  # SD3 / SD3.5 as ComfyUI builds it (comfy.ldm.modules.diffusionmodules.mmdit)
        matches=_mmdit_matches,
        first_conv="",
        is_self_attention=lambda name, module, parent: False,
        spatial_kwargs=(),
        output=lambda out: out,
        targets=_mmdit_targets,
        levels_of=lambda m: _patch_levels(int(m.x_embedder.patch_size[0]), "mmdit"),
        check_call=check_call,
        full_output=True,
    ),
)
