"""Diffusion models whose forward calls no DIFFUSION_MODEL wrappers (SD3's MMDiT in ComfyUI 0.8 to
0.33): for one sampling run they get the routing that UNetModel and Flux have in their own forward.

ComfyUI's wrapped models follow one pattern: `forward` runs `WrapperExecutor.new_class_executor(
self._forward, self, get_all_wrappers(DIFFUSION_MODEL, transformer_options))`. A model class
without `_forward` is called straight by `BaseModel._apply_model`, so PCPP's wrapper never sees
its calls. `routed(model)` sets an instance-level `forward` that does the same routing around the
class's own forward, and removes it when the run ends; `class_forward(model)` lifts it while the
engine stages the model for the workers (`torch.save` pickles instance attributes; the workers
call the class's forward on their bands, no wrappers there).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import comfy.patcher_extension

_EXTENSION = comfy.patcher_extension


def needs_routing(model: Any) -> bool:
    """True for a torch module whose class has ComfyUI's `forward` but no wrapped `_forward`."""
    return model is not None and callable(getattr(type(model), "forward", None)) and \
        not hasattr(type(model), "_forward")


@contextlib.contextmanager
def routed(model: Any) -> Iterator[None]:
    """`model(...)` goes through the DIFFUSION_MODEL wrappers in its `transformer_options` for this block."""
    forward = type(model).forward.__get__(model)

    def wrapped_forward(x, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        wrappers = _EXTENSION.get_all_wrappers(_EXTENSION.WrappersMP.DIFFUSION_MODEL, options)
        return _EXTENSION.WrapperExecutor.new_class_executor(forward, model, wrappers).execute(x, *args, **kwargs)

    model.forward = wrapped_forward
    try:
        yield
    finally:
        model.__dict__.pop("forward", None)


@contextlib.contextmanager
def class_forward(model: Any) -> Iterator[None]:
    """The model as ComfyUI built it (no instance `forward`) for the duration of the block."""
    own = model.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if own is not None:
            model.forward = own


def input_names(model: Any) -> list[str]:
    """The names of the class forward's positional parameters after `x`, in order (the wrapper
    executor passes them positionally: UNetModel timesteps, context, y, control, transformer_options;
    Flux timestep, context, y, guidance, ref_latents, control, transformer_options)."""
    params = inspect.signature(type(model).forward).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][2:]  # after self, x
