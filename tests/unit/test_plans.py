import pytest
import torch
from torch import nn

from pcpp_core import UnsupportedModelError, find_plan, profile_layers
from pcpp_core.exchange import Exchange
from pcpp_core.layers import BandGroupNorm, BandLayer, ExactFirstConv, HaloConv, WindowAttention
from pcpp_core.layers.groupnorm import band_stats, combine_stats
from pcpp_core.plans import apply_plan, check_weight_functions, remove_plan
from pcpp_core.weights import swapped_attrs
from pcpp_testmodels import tiny_comfy_unet, tiny_diffusers_unet

MODELS = {"comfy": tiny_comfy_unet, "diffusers": tiny_diffusers_unet}


def _inputs(kind):
    torch.manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 32, 24), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 32)
    return (x, t), ({"context": ctx} if kind == "comfy" else {"encoder_hidden_states": ctx})


def _run(model, kind, args, kwargs):
    out = model(*args, **kwargs)
    return out if kind == "comfy" else out.sample


@pytest.mark.parametrize("kind", MODELS)
def test_detects_family_and_levels(kind):
    m = MODELS[kind]()
    plan = find_plan(m)
    assert plan.family == {"comfy": "comfyui-unet", "diffusers": "diffusers-unet2d-condition"}[kind]
    assert plan.levels(m) == 2


@pytest.mark.parametrize("kind", MODELS)
def test_apply_and_remove_are_symmetric(kind):
    m = MODELS[kind]()
    args, kwargs = _inputs(kind)
    before = _run(m, kind, args, kwargs)
    originals = {n: type(mod) for n, mod in m.named_modules()}
    names = apply_plan(m, find_plan(m), Exchange())
    kinds = {type(m.get_submodule(n)) for n in names}
    assert kinds == {ExactFirstConv, HaloConv, BandGroupNorm, WindowAttention}
    attn = [n for n in names if isinstance(m.get_submodule(n), WindowAttention)]
    assert attn and all(n.endswith("attn1") for n in attn)  # cross-attention (attn2) stays local
    # outside a call every band layer runs its original module
    assert torch.equal(_run(m, kind, args, kwargs), before)
    remove_plan(m)
    assert not any(isinstance(mod, BandLayer) for mod in m.modules())
    assert {n: type(mod) for n, mod in m.named_modules()} == originals


def test_refuses_unknown_family_naming_what_it_found():
    with pytest.raises(UnsupportedModelError, match=r"torch.nn.modules.container.Sequential.*children: 0, 1"):
        find_plan(nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()))


def test_refuses_modules_bands_cannot_split():
    m = tiny_comfy_unet()
    m.middle_block.append(nn.Conv3d(4, 4, 3))
    with pytest.raises(UnsupportedModelError, match=r"middle_block.3 is a Conv3d"):
        find_plan(m)
    m = tiny_comfy_unet()
    m.out[2] = nn.Conv2d(32, 4, 3, padding=2, dilation=2)
    with pytest.raises(UnsupportedModelError, match=r"out.2: conv with stride"):
        find_plan(m)


def _double(w):
    return w * 2


def test_weight_functions_are_refused_unless_the_staged_copy_drops_them():
    """A weight function the host does not strip (WeightSource.module_attrs) never reaches a worker."""
    m = tiny_comfy_unet()
    check_weight_functions(m)
    conv = m.input_blocks[0][0]
    conv.weight_function = [_double]
    with pytest.raises(UnsupportedModelError, match=r"input_blocks.0.0: its weights are changed on the fly by _double"):
        check_weight_functions(m)
    with swapped_attrs(m, {"input_blocks.0.0.weight_function": [], "out.2.weight_function": []}):
        check_weight_functions(m)  # the staged copy's view
        assert conv.weight_function == [] and m.out[2].weight_function == []
    assert conv.weight_function == [_double] and "weight_function" not in m.out[2].__dict__  # put back as it was


def test_refuses_a_diffusers_downsample_that_pads_its_own_bottom_row():
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 8),
                             layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                             norm_num_groups=4, downsample_padding=0)
    with pytest.raises(UnsupportedModelError, match=r"down_blocks.0.downsamplers.0: Downsample2D with padding=0"):
        find_plan(m)
    find_plan(tiny_diffusers_unet())  # the default downsample_padding=1 is fine


@pytest.mark.parametrize("kind", MODELS)
def test_profile_finds_every_level(kind):
    m = MODELS[kind]()
    args, kwargs = _inputs(kind)
    specs = profile_layers(m, find_plan(m), *args, **kwargs)
    by_kind = {k: {s.level for s in specs if s.kind == k} for k in ("conv", "groupnorm", "attention")}
    assert by_kind["conv"] == {0, 1, 2} and by_kind["groupnorm"] == {0, 1, 2}
    assert by_kind["attention"] == {1, 2}
    assert any(s.stride == 2 for s in specs)


def test_profile_on_meta_tensors():
    with torch.device("meta"):
        m = tiny_diffusers_unet()
        x, ctx = torch.empty(1, 4, 256, 256), torch.empty(1, 5, 32)
    specs = profile_layers(m, find_plan(m), x, torch.tensor([1.0], device="meta"), encoder_hidden_states=ctx)
    assert {s.level for s in specs if s.kind == "attention"} == {1, 2}


def test_groupnorm_statistics_combine_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 24, 6) * 3 + 1
    parts = [x[:, :, :8], x[:, :, 8:24]]  # uneven bands
    combined = combine_stats([band_stats(p, 4) for p in parts], [8, 16])
    torch.testing.assert_close(combined, band_stats(x, 4), atol=1e-5, rtol=1e-5)
