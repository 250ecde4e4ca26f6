"""After warm-up, the bands compute exactly what the single-process StaleReference simulates:
stale halos, corrected stale GroupNorm, own K/V fresh and neighbour K/V stale, per call slot.
Mutants of the stale maths (tests/dist/mutants.py) must fail the same comparison."""
import math

import pytest
import torch

from pcpp_core import PatchConfig
from pcpp_core.reference import StaleReference
from pcpp_core.slots import SlotTracker
from conftest import inputs, plain
from pcpp_samplers import SAMPLERS, karras, position

pytestmark = pytest.mark.dist
ATOL = 1e-5  # fp32 round-off
CALLS = 5  # one synchronous warm-up call, then four stale ones
MODES = {"pcpp-0.3": ("pcpp", 0.3), "pcpp-1": ("pcpp", 1.0), "distrifusion": ("distrifusion", 0.3)}


def compare_calls(engine, model, kind, n, cfg, slot="s", batch=1, calls=CALLS):
    """(max |engine - reference| over all calls, max |reference - plain| over the stale calls)."""
    engine.new_run(cfg)
    ref = StaleReference(model, n, cfg)
    diff, stale_effect = 0.0, 0.0
    for i in range(calls):
        args, kwargs = inputs(kind, batch=batch, seed=10 + i)  # a new input every call
        out = engine(model, *args, slot=slot, **kwargs)
        sync = engine.stats.calls[-1].synchronous
        assert sync == (i < cfg.warmup_steps)
        expected = ref(*args, slot=slot, synchronous=sync, **kwargs)
        diff = max(diff, (out - expected).abs().max().item())
        if not sync:
            stale_effect = max(stale_effect, (expected - plain(model, kind, args, kwargs)).abs().max().item())
    return diff, stale_effect


# 3 bands on 32 rows, 2 levels: 8/12/12 (uneven; f=1 then differs from distrifusion)
CASES = [(2, "pcpp-0.3"), (3, "pcpp-0.3"), (3, "pcpp-1"), (3, "distrifusion")]


@pytest.mark.parametrize("n, mode", CASES)
@pytest.mark.parametrize("kind", ["comfy", "diffusers"])
def test_stale_calls_equal_the_stale_reference(engines, models, kind, n, mode, record_property):
    name, fraction = MODES[mode]
    cfg = PatchConfig(mode=name, fraction=fraction, warmup_steps=1)
    diff, stale_effect = compare_calls(engines[n], models[kind], kind, n, cfg)
    record_property("max_abs_diff", diff)
    print(f"{kind} {n} bands {mode}: max |engine - reference| = {diff:.3g}, stale effect {stale_effect:.3g}")
    assert diff < ATOL
    assert stale_effect > 1e-2  # stale data really changes the output: the comparison can fail


def sample_both(engine, model, sampler, sigmas, cfg, n=2):
    """Run `sampler` on the engine (slots and steps from a SlotTracker, as the nodes do) and feed
    every evaluation also to the reference keyed by the sampler's own ground truth (which
    evaluation of which step). Returns (max diff, stale calls, max stale effect)."""
    tracker = SlotTracker(sigmas)
    ref = StaleReference(model, n, cfg)
    engine.new_run(cfg)
    ctx = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(3))
    diff, stale, effect = 0.0, 0, 0.0

    def denoise(x, sigma, kind, k):
        nonlocal diff, stale, effect
        x_in = x / math.sqrt(sigma * sigma + 1)
        t = torch.full((x.shape[0],), 30.0 * sigma)
        slot, step = tracker.evaluation((0,), sigma)
        eps = engine(model, x_in, t, context=ctx, slot=slot, step=step)
        sync = engine.stats.calls[-1].synchronous
        pos = position(kind, k)  # calls at the run's first sigma never serve as stale data
        truth = ("start", kind) if pos == 0 else kind
        expected = ref(x_in, t, context=ctx, slot=truth, synchronous=pos < cfg.warmup_steps)
        diff = max(diff, (eps - expected).abs().max().item())
        if not sync:
            stale += 1
            effect = max(effect, (expected - model(x_in, t, context=ctx)).abs().max().item())
        return x - sigma * eps

    noise = torch.randn(1, 4, 32, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sampler(denoise, noise * sigmas[0], sigmas)
    return diff, stale, effect


@pytest.mark.parametrize("sampler, warmup", [("heun", 1), ("heun", 2), ("dpmpp_2s_ancestral", 1),
                                             ("dpmpp_2s_ancestral_eta0.5", 2), ("dpmpp_sde", 1), ("dpmpp_sde", 2),
                                             ("euler_pag", 1), ("euler_pag", 2)])
def test_multi_evaluation_samplers_keep_each_evaluation_in_its_slot(engines, models, sampler, warmup,
                                                                    record_property):
    cfg = PatchConfig(mode="pcpp", fraction=0.3, warmup_steps=warmup)
    diff, stale, effect = sample_both(engines[2], models["comfy"], SAMPLERS[sampler], karras(4), cfg)
    record_property("max_abs_diff", diff)
    print(f"{sampler} warmup {warmup}: max |engine - reference| = {diff:.3g} over {stale} stale calls")
    assert stale >= 4
    assert diff < ATOL
    assert effect > 1e-2


@pytest.mark.parametrize("mutant", ["frozen", "gn_uncorrected", "kv_own_stale"])
def test_the_reference_comparison_catches_broken_stale_maths(mutant_engine, models, mutant, record_property):
    cfg = PatchConfig(mode="pcpp", fraction=0.3, warmup_steps=1)
    diff, _ = compare_calls(mutant_engine, models["comfy"], "comfy", 2, cfg, slot=mutant)
    record_property("max_abs_diff", diff)
    print(f"mutant {mutant}: max |engine - reference| = {diff:.3g}")
    assert diff > 1e-3, f"mutant {mutant} was not caught (max diff {diff:.2e})"
