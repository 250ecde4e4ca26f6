"""The DiT plan without worker processes: structure, refusals, the log-sum-exp merge, and N bands
run as threads over an in-memory transport, to look inside (the text stream of every band)."""
import copy
import queue
import threading

import pytest
import torch
from torch import nn

from pcpp_core import ConfigError, PatchConfig, UnsupportedModelError, find_plan
from pcpp_core.geometry import Bands, LayerSpec, bytes_sent
from pcpp_core.layers.joint import attend_lse, merge_lse
from pcpp_core.plans import apply_plan, remove_plan
from pcpp_core.plans_dit import check_call, flux_specs
from pcpp_core.runner import BandRunner, CallRequest
from pcpp_testdit import dit_inputs, mini_flux


def test_flux_layout_is_found_by_structure():
    m = mini_flux()
    plan = find_plan(m)
    assert (plan.family, plan.levels(m), plan.full_output) == ("flux", 1, True)


def test_apply_and_remove_leave_the_model_unchanged_outside_a_call():
    m = mini_flux()
    args, kwargs = dit_inputs()
    with torch.no_grad():
        before = m(*args, **kwargs)
        names = apply_plan(m, find_plan(m), __import__("pcpp_core").exchange.Exchange())
        assert names == ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1", "final_layer"]
        torch.testing.assert_close(m(*args, **kwargs), before, atol=0, rtol=0)  # no call: the blocks as they were
        remove_plan(m)
    assert type(m.double_blocks[0]).__name__ == "DoubleBlock"


def test_unknown_block_kinds_and_flipped_text_are_refused():
    m = mini_flux()
    m.single_blocks[1] = nn.Linear(4, 4)
    with pytest.raises(UnsupportedModelError, match="single_blocks.1 is a Linear"):
        find_plan(m)
    m = mini_flux()
    m.double_blocks[0].flipped_img_txt = True
    with pytest.raises(UnsupportedModelError, match="flipped_img_txt"):
        find_plan(m)


@pytest.mark.parametrize("key, words", [("control", "ControlNet"), ("ref_latents", "reference latents"),
                                        ("attention_mask", "attention mask")])
def test_inputs_the_plan_cannot_split_are_refused(key, words):
    with pytest.raises(UnsupportedModelError, match=words):
        check_call({key: torch.zeros(1)})
    with pytest.raises(UnsupportedModelError, match="post_input"):
        check_call({"transformer_options": {"patches": {"post_input": [print]}}})
    check_call({"control": None, "transformer_options": {"patches": {"attn1_patch": []}}})  # nothing refused


def test_log_sum_exp_merge_equals_attention_over_the_union():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    k, v = torch.randn(2, 3, 20, 8, generator=g), torch.randn(2, 3, 20, 8, generator=g)
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    parts = [attend_lse(q, k[:, :, a:b], v[:, :, a:b]) for a, b in ((0, 5), (5, 6), (6, 20))]
    torch.testing.assert_close(merge_lse(parts), whole, atol=1e-6, rtol=0)


def test_joint_layer_bytes_count_text_partials_per_other_band():
    bands = Bands.split(20, 12, 3, 1)  # 10 x 6 patches: rows 0-3, 3-6, 6-10
    spec = LayerSpec("joint", 1, 32, text=5, heads=2)
    kv_only = LayerSpec("joint", 1, 32)
    text = 2 * 2 * 5 * (32 * 4 + 2 * 4)  # 2 other bands x batch 2 x 5 tokens x (D floats + H lse)
    assert bytes_sent([spec], bands, 0, batch=2, element_size=4, fraction=0.0) == text
    assert bytes_sent([spec], bands, 1, batch=2, element_size=4, fraction=None) == \
        text + bytes_sent([kv_only], bands, 1, batch=2, element_size=4, fraction=None)
    # band 1 (3 rows) sends all its rows to both others: 2 x 3 rows x 6 cols x 2D floats x batch 2
    assert bytes_sent([kv_only], bands, 1, batch=2, element_size=4, fraction=None) == 2 * 3 * 6 * 64 * 4 * 2


# ---- N bands as threads over an in-memory transport --------------------------------------------

class _Work:
    def __init__(self, fn=None):
        self.fn = fn

    def wait(self, timeout=None):
        if self.fn:
            self.fn()
            self.fn = None
        return True


def _mailboxes(n):
    boxes = {(s, d): queue.Queue() for s in range(n) for d in range(n)}

    def transport(rank):
        def post(sends, recvs, tag):
            for d, t in sends.items():
                boxes[(rank, d)].put((tag, t.clone()))
            works = [_Work()]
            for s, buf in recvs.items():
                def take(s=s, buf=buf):
                    got_tag, t = boxes[(s, rank)].get(timeout=30)
                    assert got_tag == tag
                    buf.copy_(t)
                works.append(_Work(take))
            return works
        return lambda group: post
    return transport


def _run_bands(model, n, config, calls, watch):
    """Run `calls` [(args, kwargs)] on n threads; returns per band the outputs and the text
    stream (`watch` block's txt output) of every call."""
    transport = _mailboxes(n)
    runners = [BandRunner(copy.deepcopy(model), rank) for rank in range(n)]
    seen = {r: [] for r in range(n)}
    for r, runner in enumerate(runners):
        runner.model.get_submodule(watch).inner.register_forward_hook(
            lambda mod, inp, out, r=r: seen[r].append(out[1].clone()))
    outs = {r: [] for r in range(n)}

    def work(rank):
        for i, (args, kwargs) in enumerate(calls):
            req = CallRequest(args, kwargs, "s", config, tuple(range(n)), step=i)
            outs[rank].append(runners[rank].run(req, transport(rank))[0])

    threads = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(len(outs[r]) == len(calls) for r in range(n)), "a band thread failed"
    return outs, seen


@pytest.mark.parametrize("mode", ["sync", "pcpp", "distrifusion"])
def test_every_band_holds_the_same_text_stream(mode):
    """Text queries merge the same pieces on every band (own partial by loopback): bitwise equal
    text after warm-up too; in sync (and the warm-up call) it is the single-process text."""
    torch.set_num_threads(1)
    model = mini_flux()
    calls = [dit_inputs(seed=s) for s in range(3)]
    outs, seen = _run_bands(model, 3, PatchConfig(mode=mode, warmup_steps=1), calls, "double_blocks.1")
    for i in range(3):
        assert torch.equal(seen[0][i], seen[1][i]) and torch.equal(seen[0][i], seen[2][i])
    ref = []
    model.double_blocks[1].register_forward_hook(lambda mod, inp, out: ref.append(out[1]))
    with torch.no_grad():
        whole = [model(*a, **k) for a, k in calls]
    torch.testing.assert_close(seen[0][0], ref[0], atol=1e-5, rtol=0)  # warm-up: exact
    if mode == "sync":
        torch.testing.assert_close(seen[0][2], ref[2], atol=1e-5, rtol=0)
        got = torch.cat([outs[r][2] for r in range(3)], dim=2)
        torch.testing.assert_close(got, whole[2], atol=1e-5, rtol=0)
    else:  # stale image partials of the previous call (another input): the text differs from fresh
        assert (seen[0][2] - ref[2]).abs().max() > 1e-4


def test_stale_reference_refuses_dit_plans():
    from pcpp_core.reference import StaleReference

    with pytest.raises(ConfigError, match="flux"):
        StaleReference(mini_flux(), 2, PatchConfig(mode="pcpp"))


def test_flux_specs_follow_the_blocks():
    from pcpp_core import profile_layers

    model = mini_flux()
    args, kwargs = dit_inputs()  # 5 text tokens
    specs = flux_specs(model, 5)
    assert profile_layers(model, find_plan(model), *args, **kwargs) == specs
    assert [s.text for s in specs] == [5, 5, 5, 0]  # the last single block's text is dropped by the model
    assert {(s.kind, s.level, s.channels, s.heads) for s in specs} == {("joint", 1, 32, 2)}


@pytest.mark.parametrize("mode, fraction", [("pcpp", 0.3), ("pcpp", 0.0), ("distrifusion", 0.3)])
def test_stale_calls_equal_the_dit_stale_reference(mode, fraction):
    """After warm-up each band's rows equal reference_dit's per-band simulation (other inputs every call)."""
    from pcpp_core.reference_dit import DitStaleReference

    torch.set_num_threads(1)
    model = mini_flux()
    config = PatchConfig(mode=mode, fraction=fraction, warmup_steps=1)
    calls = [dit_inputs(seed=s) for s in range(3)]
    outs, _ = _run_bands(model, 3, config, calls, "double_blocks.0")
    ref = DitStaleReference(model, 3, config)
    for i, (args, kwargs) in enumerate(calls):
        want = ref(*args, slot="s", synchronous=i < 1, **kwargs)
        got = torch.cat([outs[r][i] for r in range(3)], dim=2)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert (got - model(*calls[2][0], **calls[2][1])).abs().max() > 1e-3  # stale really differs from fresh
