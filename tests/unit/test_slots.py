"""SlotTracker: slots and steps from the sigmas alone match what the sampler knows it evaluates."""
import pytest
import torch

from pcpp_core.slots import SlotTracker
from pcpp_samplers import SAMPLERS, heun, karras, position


def calls_of(sampler, sigmas, **kw) -> list[tuple[str, int, float]]:
    """(kind, k, sigma) of every model evaluation the sampler makes."""
    seen = []

    def model(x, sigma, kind, k):
        seen.append((kind, k, float(sigma)))
        return x * 0.5

    sampler(model, torch.ones(1, 1, 2, 2), sigmas, **kw)
    return seen


def check_pairing(calls, sigmas):
    """Every call after the start gets the slot of its own kind only; steps are warm-up positions."""
    tracker = SlotTracker(sigmas)
    slot_of_kind, kind_of_slot = {}, {}
    for kind, k, sigma in calls:
        slot, step = tracker.evaluation((0, 1), sigma)
        assert step == position(kind, k), (kind, k, sigma)
        if position(kind, k) == 0:
            assert slot[1] == "start"
            continue
        assert slot[1] != "start"
        assert slot_of_kind.setdefault(kind, slot) == slot, (kind, k, slot)
        assert kind_of_slot.setdefault(slot, kind) == kind, (kind, k, slot)
    return slot_of_kind


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("sigmas", [karras(5), karras(10)[4:]], ids=["full", "denoise<1"])
def test_each_evaluation_kind_keeps_its_own_slot(name, sigmas):
    calls = calls_of(SAMPLERS[name], sigmas)
    slots = check_pairing(calls, sigmas)
    expected = {"euler": {"A": ((0, 1), "on", 0)},
                "euler_pag": {"A": ((0, 1), "on", 0), "PAG": ((0, 1), "on", 1)},
                "heun": {"B": ((0, 1), "on", 0), "A": ((0, 1), "on", 1)},
                "dpmpp_2s_ancestral": {"B": ((0, 1), "on", 0), "A": ((0, 1), "on", 1)},  # eta=1: B at sigma_{k+1}
                "dpmpp_2s_ancestral_eta0.5": {"A": ((0, 1), "on", 0), "B": ((0, 1), "off", 0)},
                "dpmpp_sde": {"A": ((0, 1), "on", 0), "B": ((0, 1), "off", 0)}}[name]
    assert slots == expected
    assert sum(kind == "B" for kind, _, _ in calls) == (0 if name.startswith("euler") else len(sigmas) - 2)


def test_churned_heun_puts_the_first_evaluation_off_the_schedule():
    sigmas = karras(5)
    calls = calls_of(heun, sigmas, churn=0.2)
    tracker = SlotTracker(sigmas)
    got = [tracker.evaluation("c", sigma) for _, _, sigma in calls]
    assert [s[1:] for s, _ in got[:5]] == [("off", 0), ("on", 0), ("off", 0), ("on", 0), ("off", 0)]
    assert [step for _, step in got[:5]] == [0, 1, 1, 2, 2]


def test_compositions_count_separately_and_sigmas_compare_loosely():
    tracker = SlotTracker([10.0, 5.0, 1.0, 0.0])
    assert tracker.evaluation((0,), 10.0) == (((0,), "start", 0), 0)
    assert tracker.evaluation((1,), 10.0) == (((1,), "start", 0), 0)
    assert tracker.evaluation((0,), 10.0) == (((0,), "start", 1), 0)
    assert tracker.evaluation((0,), 5.0 * (1 + 1e-6)) == (((0,), "on", 0), 1)  # float32 round-off
    assert tracker.evaluation((0,), 3.0) == (((0,), "off", 0), 2)
    assert tracker.evaluation((0,), 2.0) == (((0,), "off", 1), 2)  # a second stage before sigma 1
    assert tracker.evaluation((0,), 1.0) == (((0,), "on", 0), 2)
    assert tracker.evaluation((0,), 1.5) == (((0,), "off", 0), 2)  # counted again from the last on-schedule call
