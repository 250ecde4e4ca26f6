"""How a model's weights reach the workers: the base weights once, weight patches as a description.

Host side: `WeightSource` is what a host adapter (the ComfyUI nodes) tells the engine about the
weights it samples with. `base_key` names the unpatched weights (a new key sends the model
again); `base_tensors` gives the unpatched value of every weight the host has patched in place;
`patches_key` names the current patch set, and `patches()` describes it as opaque bytes that the
function `applier` ("module:function", importable in the workers) turns into new weight values.
A patch change therefore sends the patch description, never the model. `module_attrs()` names
module attributes the staged copy gets instead of the host's: host-side machinery the patches
already describe (ComfyUI's lowvram weight functions), which a worker must not apply a second time.

Worker side: `PatchedWeights` keeps the worker's base copy exact. Applying a patch set first
restores the backups of the weights the previous set changed (copies of the base values, like
ComfyUI's ModelPatcher.backup), so base -> patched -> base is bit-identical.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Mapping

import torch
from torch import nn

from .errors import ConfigError, StagingError
from .staging import check_space

log = logging.getLogger("pcpp.weights")

Applier = Callable[[Mapping[str, torch.Tensor], bytes], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class WeightSource:
    """The host's weights as base + patches; see the module docstring."""

    base_key: Hashable  # names the unpatched weights of this model object
    base_tensors: Callable[[], Mapping[str, torch.Tensor]] = dict  # name -> unpatched value, patched names only
    patches_key: Hashable = None  # None: no weight patches
    patches: Callable[[], bytes] | None = None  # the patch description the applier reads
    applier: str = ""  # "module:function" in the workers: fn(weights, data) -> {name: new value}
    module_attrs: Callable[[], Mapping[str, object]] = dict  # "module.name.attr" -> value in the staged copy


def tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _named_tensors(model).values())


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@contextlib.contextmanager
def swapped(model: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """`model` with these tensors in place of its own for the duration (the same objects come back)."""
    saved = []
    try:
        for name, value in values.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            table = owner._parameters if leaf in owner._parameters else owner._buffers
            if leaf not in table:
                raise ConfigError(f"base weight {name!r} is not a parameter or buffer of the model")
            old = table[leaf]
            saved.append((table, leaf, old))
            table[leaf] = nn.Parameter(value, requires_grad=False) if isinstance(old, nn.Parameter) else value
        yield
    finally:
        for table, leaf, old in reversed(saved):
            table[leaf] = old


_ABSENT = object()


@contextlib.contextmanager
def swapped_attrs(model: nn.Module, values: Mapping[str, object]) -> Iterator[None]:
    """`model` with these module attributes ("module.name.attr") set for the duration, then put back
    as they were (an attribute the module did not hold itself is removed again)."""
    saved = []
    try:
        for name, value in values.items():
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            saved.append((owner, attr, owner.__dict__.get(attr, _ABSENT)))
            setattr(owner, attr, value)
        yield
    finally:
        for owner, attr, old in reversed(saved):
            if old is _ABSENT:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)


def stage_model(model: nn.Module, base: Mapping[str, torch.Tensor], directory: str, name: str,
                attrs: Mapping[str, object] | None = None) -> tuple[str, int]:
    """`torch.save` the model with `base` values and `attrs` (see swapped_attrs) swapped in; returns
    (path, file bytes).

    Free space is checked first (the weights plus 5% and 16 MB for pickled structure), and a
    failed write is a StagingError naming the directory, never torch's bare "unexpected pos".
    """
    needed = int(tensor_bytes(model) * 1.05) + (16 << 20)
    check_space(directory, needed)
    path = os.path.join(directory, name)
    try:
        with swapped(model, base), swapped_attrs(model, attrs or {}):
            torch.save(model, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise StagingError(f"writing the model ({needed} bytes) to the staging directory {directory} failed: {e}. "
                           "Set PCPP_STAGING_DIR to a directory on a disk with room") from e
    return path, os.path.getsize(path)


def resolve_applier(spec: str) -> Applier:
    module, _, func = spec.partition(":")
    if not module or not func:
        raise ConfigError(f"applier={spec!r} must be 'module:function'")
    return getattr(importlib.import_module(module), func)


class PatchedWeights:
    """A worker's weights by the host's names (taken before the plan swaps modules), with backups."""

    def __init__(self, model: nn.Module):
        self.tensors = _named_tensors(model)
        self.backup: dict[str, torch.Tensor] = {}  # name -> base value (CPU), for every patched name
        self.key: Hashable = None

    def restore(self) -> None:
        """Put the base values back: exact copies, whatever the patches did."""
        with torch.no_grad():
            for name, value in self.backup.items():
                self.tensors[name].copy_(value)
        self.backup.clear()
        self.key = None

    def apply(self, key: Hashable, applier: str, data: bytes) -> int:
        """Restore the base, then apply this patch set; returns how many weights it changed."""
        self.restore()
        new = resolve_applier(applier)(self.tensors, data)
        with torch.no_grad():
            for name, value in new.items():
                target = self.tensors.get(name)
                if target is None or tuple(value.shape) != tuple(target.shape):
                    self.restore()
                    raise ConfigError(f"a weight patch names {name!r} with shape {tuple(value.shape)}, which this "
                                      "model does not have")
                self.backup[name] = target.detach().to("cpu", copy=True)
                target.copy_(value)
        self.key = key
        return len(new)
