"""Base weights once, weight patches applied in the workers, restored exactly; model_bytes_sent."""
from __future__ import annotations


import pytest
import torch

from pcpp_core import PatchConfig, WeightSource
from pcpp_testpatches import payload
from conftest import inputs

pytestmark = pytest.mark.dist

NAMES = ("input_blocks.1.0.in_layers.2.weight", "out.2.weight")  # a halo conv and the last conv


def _deltas(model, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {n: torch.randn(model.get_parameter(n).shape, generator=g) * scale for n in NAMES}


def _source(key, deltas=None) -> WeightSource:
    if deltas is None:
        return WeightSource(base_key="base")
    data = payload(deltas)
    return WeightSource(base_key="base", patches_key=key, patches=lambda: data,
                        applier="pcpp_testpatches:add_deltas")


def _run(engine, model, source=None, key=None):
    engine.new_run(PatchConfig(mode="sync"))
    a, k = inputs("comfy")
    out = engine(model, *a, weights=source, model_key=key, **k)
    return out, engine.stats.summary()


def test_patches_in_workers_equal_patching_on_the_host_and_restore_exactly(engines, models):
    model, engine = models["comfy"], engines[2]
    base_out, first = _run(engine, model, _source(None))
    deltas = _deltas(model, 0.05)
    patched_out, stats = _run(engine, model, _source("p1", deltas))
    assert stats["model_bytes_sent"] == len(payload(deltas))  # the patch, not the model
    assert not torch.equal(patched_out, base_out)
    again, stats = _run(engine, model, _source("p1", deltas))
    assert stats["model_bytes_sent"] == 0 and torch.equal(again, patched_out)  # nothing changed: nothing sent

    # the same patch applied on the host and the whole patched model sent: bit-identical output
    saved = {n: model.get_parameter(n).detach().clone() for n in NAMES}
    try:
        with torch.no_grad():
            for n, d in deltas.items():
                model.get_parameter(n).add_(d)
        host_out, stats = _run(engine, model, None, key="host-patched")
        assert stats["model_bytes_sent"] > 0 and torch.equal(host_out, patched_out)
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                model.get_parameter(n).copy_(w)

    _run(engine, model, _source(None))  # base again (sent again: the host-patched run replaced it)
    _run(engine, model, _source("p1", deltas))
    restored, stats = _run(engine, model, _source(None))  # patches dropped: the workers restore their backups
    assert stats["model_bytes_sent"] == 0 and torch.equal(restored, base_out)


def test_base_weights_sent_once_and_patched_host_weights_replaced_by_the_base(engines, models):
    """The host's tensors are patched in place; base_tensors names the unpatched values to send."""
    model, engine = models["comfy"], engines[2]
    engine.shutdown()  # a fresh pool: the base goes out in this test
    base_out, stats = _run(engine, model, _source(None))
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert weights <= stats["model_bytes_sent"] <= weights * 1.1 + (1 << 20)  # the whole model, once
    assert stats["weights_on"] == ["cpu", "cpu"]
    engine.shutdown()
    name = NAMES[0]
    param = model.get_parameter(name)
    base = param.detach().clone()
    try:
        with torch.no_grad():
            param.mul_(3.0)  # patched on the host, like ComfyUI's ModelPatcher does in place
        source = WeightSource(base_key="base", base_tensors=lambda: {name: base})
        out, stats = _run(engine, model, source)
        assert torch.equal(out, base_out)  # the workers got the unpatched weight
        assert stats["model_bytes_sent"] > 0
        assert torch.equal(param, base * 3.0)  # and the host's own tensor is untouched
    finally:
        with torch.no_grad():
            param.copy_(base)
