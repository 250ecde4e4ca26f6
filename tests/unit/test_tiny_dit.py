"""The bundled tiny DiT: ComfyUI's Flux layout, its attention override, and trained (not noise) samples."""
from __future__ import annotations

import pytest
import torch

from pcpp_core.sampling import cfg_eps, flow_sample
from pcpp_core.tiny_dit import LATENT_FACTOR, TinyDiT, load_tiny_dit, to_image, to_latent

GRACE_HOPPER, PRESENT = 5, 9  # the two training images that ship with matplotlib

# every parameter name of ComfyUI's comfy.ldm.flux.model.Flux (vec_in_dim set, no guidance_embed)
FLUX_TOP = ("img_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
            "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1")
FLUX_DOUBLE = tuple(f"{s}_{n}" for s in ("img", "txt") for n in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2"))
FLUX_SINGLE = ("linear1", "linear2", "modulation.lin")


def flux_keys(depth: int, single: int) -> set[str]:
    keys = {f"{m}.{p}" for m in FLUX_TOP for p in ("weight", "bias")}
    for i in range(depth):
        keys |= {f"double_blocks.{i}.{m}.{p}" for m in FLUX_DOUBLE for p in ("weight", "bias")}
        keys |= {f"double_blocks.{i}.{s}_attn.norm.{n}_norm.weight" for s in ("img", "txt") for n in ("query", "key")}
    for i in range(single):
        keys |= {f"single_blocks.{i}.{m}.{p}" for m in FLUX_SINGLE for p in ("weight", "bias")}
        keys |= {f"single_blocks.{i}.norm.{n}_norm.weight" for n in ("query", "key")}
    return keys


@pytest.fixture(scope="module")
def dit():
    torch.set_num_threads(1)
    return load_tiny_dit()


def test_loads_with_comfy_flux_parameter_names(dit):
    model, emb = dit
    p = model.params
    assert set(model.state_dict()) == flux_keys(p.depth, p.depth_single_blocks)
    assert emb.shape == (13, 4, p.context_in_dim)
    assert model.patch_size == 2 and model.in_channels == 3 * LATENT_FACTOR ** 2 * 4
    assert sum(p.axes_dim) == model.hidden_size // model.num_heads
    assert 1e6 < sum(t.numel() for t in model.parameters()) < 6e6
    assert not any(t.requires_grad for t in model.parameters())


def test_latent_round_trip():
    img = torch.rand(1, 3, 64, 96)
    lat = to_latent(img)
    assert lat.shape == (1, 3 * LATENT_FACTOR ** 2, 64 // LATENT_FACTOR, 96 // LATENT_FACTOR)
    assert torch.equal(to_image(lat), img)


def test_attention_goes_through_the_override(dit):
    """As ComfyUI's optimized_attention: override(func, q, k, v, heads, skip_reshape=True, ...) per block."""
    model, emb = dit
    x = torch.randn(2, 48, 6, 10, generator=torch.Generator().manual_seed(0))  # non-square: 3 x 5 patches
    t, c = torch.tensor([0.2, 0.9]), emb[[0, 12]]
    seen = []

    def passthrough(func, q, k, v, heads, **kw):
        seen.append((tuple(q.shape), heads, kw.get("skip_reshape"), "transformer_options" in kw))
        return func(q, k, v, heads, **kw)

    with torch.no_grad():
        plain = model(x, t, c)
        via = model(x, t, c, transformer_options={"optimized_attention_override": passthrough})
        zeroed = model(x, t, c, transformer_options={
            "optimized_attention_override": lambda func, q, k, v, heads, **kw: func(q, k, v * 0, heads, **kw)})
    head_dim = model.hidden_size // model.num_heads
    assert seen == [((2, model.num_heads, 4 + 15, head_dim), model.num_heads, True, True)] * \
        (len(model.double_blocks) + len(model.single_blocks))
    assert torch.equal(plain, via) and plain.shape == x.shape
    assert (plain - zeroed).abs().max() > 1e-2  # the override's result is what the blocks use


def test_module_tree_matches_flux_block_signatures():
    """The DiT plan binds block arguments by name, as it does on ComfyUI's Flux."""
    import inspect

    m = TinyDiT(depth=1, depth_single_blocks=1)
    double = inspect.signature(m.double_blocks[0].forward).parameters
    single = inspect.signature(m.single_blocks[0].forward).parameters
    assert list(double) == ["img", "txt", "vec", "pe", "attn_mask", "modulation_dims_img", "modulation_dims_txt",
                            "transformer_options"]  # ComfyUI 0.33's DoubleStreamBlock.forward
    assert list(single) == ["x", "vec", "pe", "attn_mask", "modulation_dims", "transformer_options"]
    for name in ("img_mod", "img_norm1", "img_attn", "img_norm2", "img_mlp",
                 "txt_mod", "txt_norm1", "txt_attn", "txt_norm2", "txt_mlp"):
        assert hasattr(m.double_blocks[0], name), name
    for name in ("linear1", "linear2", "norm", "pre_norm", "modulation", "hidden_size", "num_heads"):
        assert hasattr(m.single_blocks[0], name), name
    for name in ("img_in", "time_in", "vector_in", "guidance_in", "txt_in", "pe_embedder", "final_layer"):
        assert hasattr(m, name), name


def _training_image(name: str) -> torch.Tensor:
    """A matplotlib sample image as the training script prepares it (centre square, 64x64, [-1, 1])."""
    mpl = pytest.importorskip("matplotlib", reason="matplotlib (requirements-dev.txt) ships the reference images")
    import numpy as np
    from PIL import Image

    im = Image.open(f"{mpl.get_data_path()}/sample_data/{name}")
    if im.mode in ("RGBA", "LA", "P"):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((64, 64), Image.LANCZOS)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1


def test_few_step_samples_are_deterministic_and_look_like_their_image(dit):
    """8 Euler steps, CFG 3: each sample is closer to its own training image than to the other one."""
    model, emb = dit
    ids = [GRACE_HOPPER, PRESENT]
    cond = emb[ids]
    v = cfg_eps(lambda x, t, c, **_: model(x, t, c), cond, emb[12:13].expand_as(cond), 3.0)

    def draw() -> torch.Tensor:
        noise = torch.randn(2, 48, 16, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return to_image(flow_sample(v, noise, 8)).clamp(-1, 1)

    a, b = draw(), draw()
    assert torch.equal(a, b)
    real = torch.stack([_training_image("grace_hopper.jpg"), _training_image("Minduka_Present_Blue_Pack.png")])
    mse = ((a[:, None] - real[None]) ** 2).mean(dim=(2, 3, 4))  # [sample, image]
    assert mse[0, 0] < 0.7 * mse[0, 1], mse
    assert mse[1, 1] < 0.7 * mse[1, 0], mse
    assert a.std() > 0.2  # an image with contrast, not a flat average


def test_refuses_what_it_does_not_model(dit):
    model, emb = dit
    with pytest.raises(ValueError, match="ref_latents"):
        model(torch.zeros(1, 48, 4, 4), torch.tensor([0.5]), emb[:1], ref_latents=[torch.zeros(1, 48, 4, 4)])


def test_flux_shaped_ids(dit):
    """Image ids are (0, row, col) of each patch, as Flux's process_img builds them."""
    model, _ = dit
    _, ids = model.process_img(torch.zeros(1, 48, 6, 4))
    assert ids.shape == (1, 6, 3)
    assert ids[0].tolist() == [[0, r, c] for r in range(3) for c in range(2)]
