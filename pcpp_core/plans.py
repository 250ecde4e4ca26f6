"""Declarative per-family plans: which modules of a model become band layers, and how to undo it.

A plan recognises its family by structure (never by importing the family's code), names the
first conv, the self-attention modules and the keyword inputs that carry spatial residuals.
`apply_plan` swaps modules for band layers; `remove_plan` puts the originals back.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import UnsupportedModelError
from .exchange import Exchange
from .geometry import LayerSpec
from .layers import BandGroupNorm, ExactFirstConv, HaloConv, WindowAttention
from .layers.conv import check_conv

log = logging.getLogger("pcpp.plans")

_ATTN_ATTRS = ("to_q", "to_k", "to_v", "to_out", "heads")
# torch modules that mix rows and that no band layer handles: refuse rather than compute wrongly
_UNHANDLED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d)


@dataclass(frozen=True)
class ModelPlan:
    family: str
    matches: Callable[[nn.Module], bool]
    first_conv: str  # qualified name of the conv that sees the full input
    is_self_attention: Callable[[str, nn.Module, nn.Module | None], bool]  # (name, module, parent)
    spatial_kwargs: tuple[str, ...]  # inputs holding [B, C, H_l, W_l] residuals to cut per band
    output: Callable[[Any], torch.Tensor]  # the model's return value -> output tensor
    check_module: Callable[[str, nn.Module], None] = lambda name, module: None  # family-specific refusals
    # transformer plans (plans_dit.py): their own targets and level, refusals of call inputs, and an
    # output of the whole image of which the runner keeps the band's rows
    targets: Callable[[nn.Module], dict[str, Any]] | None = None
    levels_of: Callable[[nn.Module], int] | None = None
    check_call: Callable[[dict], None] = lambda kwargs: None
    full_output: bool = False

    @property
    def transformer(self) -> bool:
        """A DiT plan (plans_dit.py): blocks over patch tokens rather than UNet layers."""
        return self.targets is not None

    def levels(self, model: nn.Module) -> int:
        """Number of 2x downsamplings: stride-2 convs and 2x2 pools (a DiT: log2 of its patch size)."""
        if self.levels_of is not None:
            return self.levels_of(model)
        n = 0
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.stride[0] == 2:
                n += 1
            elif isinstance(m, nn.AvgPool2d) and m.stride in (2, (2, 2)):
                n += 1
        return n


def _comfy_matches(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("input_blocks", "middle_block", "output_blocks", "out")) and \
        isinstance(_get(model, "input_blocks.0.0"), nn.Conv2d)


def _comfy_self_attention(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    return name.endswith(".attn1") and not getattr(parent, "disable_self_attn", False)


def _diffusers_matches(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("conv_in", "down_blocks", "up_blocks", "conv_out", "config")) \
        and isinstance(model.conv_in, nn.Conv2d)


def _diffusers_self_attention(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    if getattr(module, "is_cross_attention", False):
        return False
    for attr in ("group_norm", "spatial_norm", "norm_q", "norm_k", "norm_cross"):
        if getattr(module, attr, None) not in (None, False):
            raise UnsupportedModelError(f"{name}: attention with {attr} is not supported")
    if getattr(module, "residual_connection", False) or getattr(module, "rescale_output_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"{name}: attention with a residual/rescaled output is not supported")
    return True


def _diffusers_check(name: str, module: nn.Module) -> None:
    # Downsample2D(padding=0) pads a zero row below its input itself: on a band that row would
    # sit where the next band's first row belongs
    if type(module).__name__ == "Downsample2D" and getattr(module, "use_conv", False) \
            and getattr(module, "padding", 1) == 0:
        raise UnsupportedModelError(f"{name}: Downsample2D with padding=0 (downsample_padding=0) pads its own "
                                    "bottom row, which bands cannot split; use a model with downsample_padding=1")


def _diffusers_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


PLANS: tuple[ModelPlan, ...] = (
    ModelPlan(
        family="comfyui-unet",  # SD1.x / SD2.x / SDXL UNetModel as ComfyUI builds it
        matches=_comfy_matches,
        first_conv="input_blocks.0.0",
        is_self_attention=_comfy_self_attention,
        spatial_kwargs=("control",),
        output=lambda out: out,
    ),
    ModelPlan(
        family="diffusers-unet2d-condition",
        matches=_diffusers_matches,
        first_conv="conv_in",
        is_self_attention=_diffusers_self_attention,
        spatial_kwargs=("down_block_additional_residuals", "mid_block_additional_residual",
                        "down_intrablock_additional_residuals"),
        output=_diffusers_output,
        check_module=_diffusers_check,
    ),
)


def find_plan(model: nn.Module) -> ModelPlan:
    """The plan of `model`'s family, or UnsupportedModelError naming what was found."""
    from .plans_dit import DIT_PLANS  # imports this module

    for plan in PLANS + DIT_PLANS:
        if plan.matches(model):
            _check_supported(model, plan)
            return plan
    children = ", ".join(list(dict(model.named_children()))[:8]) or "none"
    raise UnsupportedModelError(
        f"model {type(model).__module__}.{type(model).__qualname__} (children: {children}) is not a "
        "supported family; supported: ComfyUI's SD1.x/SD2.x/SDXL UNetModel, diffusers' UNet2DConditionModel, "
        "ComfyUI's Flux and SD3 MMDiT"
    )


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _check_supported(model: nn.Module, plan: ModelPlan) -> None:
    if plan.targets is not None:
        plan.targets(model)  # a transformer plan refuses unknown block kinds while naming its targets
    for name, m in model.named_modules():
        plan.check_module(name, m)
        if isinstance(m, _UNHANDLED):
            raise UnsupportedModelError(f"{plan.family}: {name} is a {type(m).__name__}, which bands cannot split")
        if "Video" in type(m).__name__ or "Temporal" in type(m).__name__:
            raise UnsupportedModelError(f"{plan.family}: {name} ({type(m).__name__}) is a video block")
        if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1:
            check_conv(m, name)


def check_weight_functions(model: nn.Module) -> None:
    """Refuse a model whose modules would carry weight functions into the workers.

    ComfyUI keeps functions that change a weight on every forward in `weight_function` /
    `bias_function`. The workers apply weight patches themselves (weights.PatchedWeights), so the
    host adapter strips the ones its patches describe (lowvram patches) from the staged copy
    (WeightSource.module_attrs); any other kind is unknown here, and running it, or not, could
    be wrong: refused, with the module and the function named.
    """
    for name, m in model.named_modules():
        for attr in ("weight_function", "bias_function"):
            funcs = getattr(m, attr, None)
            if funcs:
                kinds = ", ".join(sorted({getattr(f, "__qualname__", None) or type(f).__qualname__ for f in funcs}))
                raise UnsupportedModelError(f"{name}: its weights are changed on the fly by {kinds} ({attr}); the "
                                            "workers cannot run that: remove the node that adds it")


def _targets(model: nn.Module, plan: ModelPlan) -> dict[str, type]:
    """Qualified name -> band layer class (or factory), for every module the plan replaces."""
    if plan.targets is not None:
        return plan.targets(model)
    modules = dict(model.named_modules())
    out: dict[str, type] = {}
    for name, m in modules.items():
        parent = modules.get(name.rpartition(".")[0]) if name else None
        if name == plan.first_conv:
            out[name] = ExactFirstConv
        elif isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1:
            out[name] = HaloConv
        elif isinstance(m, nn.GroupNorm):
            out[name] = BandGroupNorm
        elif all(hasattr(m, a) for a in _ATTN_ATTRS) and plan.is_self_attention(name, m, parent):
            out[name] = WindowAttention
    if plan.first_conv not in out:
        raise UnsupportedModelError(f"{plan.family}: first conv {plan.first_conv!r} not found")
    return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def apply_plan(model: nn.Module, plan: ModelPlan, exchange: Exchange) -> list[str]:
    """Swap every cross-band module of `model` for its band layer; returns the names swapped."""
    targets = _targets(model, plan)
    for name, cls in targets.items():
        _set(model, name, cls(model.get_submodule(name), name, exchange))
    log.debug("applied %s plan: %d band layers", plan.family, len(targets))
    return list(targets)


def remove_plan(model: nn.Module) -> None:
    """Undo apply_plan: put every original module back."""
    from .layers import BandLayer

    swapped = [(n, m) for n, m in model.named_modules() if isinstance(m, BandLayer)]
    for name, layer in swapped:
        _set(model, name, layer.inner)


def profile_layers(model: nn.Module, plan: ModelPlan, x: torch.Tensor, *args: Any, **kwargs: Any) -> list[LayerSpec]:
    """Exchanging layers of one forward pass `model(x, *args, **kwargs)` in call order, with the
    level each runs at.

    Runs the plain model once with hooks; works on meta tensors, so full-size geometry costs
    nothing. The first conv is left out: it never sends.
    """
    if plan.targets is not None:  # a transformer: from its structure and the text length
        from .plans_dit import call_specs

        return call_specs(model, plan.family, (x, *args), kwargs)
    height, width = x.shape[-2:]
    specs: list[LayerSpec] = []
    modules = dict(model.named_modules())
    hooks = []

    def level_of(t: torch.Tensor, cls: type) -> int:
        for level in range(17):
            rows, cols = height >> level, _cols(width, level)
            if (cls is WindowAttention and rows * cols == t.shape[1]) or \
                    (cls is not WindowAttention and rows == t.shape[2]):
                return level
        raise UnsupportedModelError(f"a {cls.__name__} input of shape {tuple(t.shape)} matches no level")

    def hook(cls: type):
        def fn(mod: nn.Module, inputs: tuple) -> None:
            level = level_of(inputs[0], cls)
            if cls is WindowAttention:
                specs.append(LayerSpec("attention", level, mod.to_k.out_features))
            elif cls is BandGroupNorm:
                specs.append(LayerSpec("groupnorm", level, mod.num_groups))
            else:
                specs.append(LayerSpec("conv", level, mod.in_channels, mod.kernel_size[0],
                                       mod.stride[0], mod.padding[0]))
        return fn

    for name, cls in _targets(model, plan).items():
        if cls is not ExactFirstConv:
            hooks.append(modules[name].register_forward_pre_hook(hook(cls)))
    try:
        with torch.no_grad():
            model(x, *args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return specs


def _cols(width: int, level: int) -> int:
    for _ in range(level):
        width = (width + 1) // 2
    return width
