"""A small Flux-layout transformer built in code with fixed-seed random weights, for the DiT plan tests.

`MiniFlux` has the module layout and calling convention of ComfyUI's comfy.ldm.flux.model.Flux
(double_blocks(img=, txt=, vec=, pe=, transformer_options=), single_blocks(x, vec=, pe=, ...),
pe_embedder on [txt_ids; img_ids], 2x2 patchify, final_layer) and sends its attention through
`transformer_options["optimized_attention_override"]` as ComfyUI's optimized_attention does,
so the DiT plan runs without ComfyUI. Workers unpickle it: it lives in an importable module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sdpa(q: Tensor, k: Tensor, v: Tensor, heads: int, mask=None, skip_reshape: bool = False,
         skip_output_reshape: bool = False, **kwargs) -> Tensor:
    if not skip_reshape:
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, L, d]
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


def rope(pos: Tensor, dim: int, theta: int = 10000) -> Tensor:  # [B, L] -> [B, L, dim/2, 2, 2]
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    a = pos.double()[..., None] * omega
    return torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], -1).unflatten(-1, (2, 2)).float()


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:  # x [B, H, L, d], pe [B, 1, L, d/2, 2, 2]
    x_ = x.float().unflatten(-1, (-1, 1, 2))
    return (pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).flatten(-2).type_as(x)


def attention(q, k, v, pe, transformer_options=None) -> Tensor:
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    override = (transformer_options or {}).get("optimized_attention_override")
    if override is not None:
        return override(sdpa, q, k, v, q.shape[1], skip_reshape=True, transformer_options=transformer_options)
    return sdpa(q, k, v, q.shape[1], skip_reshape=True)


class Mod(nn.Module):
    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n, self.lin = n, nn.Linear(dim, n * dim)

    def forward(self, vec: Tensor) -> list[Tensor]:  # each [B, 1, D]
        return self.lin(F.silu(vec))[:, None].chunk(self.n, -1)


class Attn(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)


def _qkv(attn: Attn, x: Tensor, heads: int):  # [B, L, D] -> 3 x [B, H, L, d]
    return attn.qkv(x).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)


class DoubleBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.img_mod, self.txt_mod = Mod(dim, 6), Mod(dim, 6)
        self.img_attn, self.txt_attn = Attn(dim), Attn(dim)
        self.img_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.txt_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, attn_mask=None, transformer_options={}):
        i1, i2, i3, i4, i5, i6 = self.img_mod(vec)
        t1, t2, t3, t4, t5, t6 = self.txt_mod(vec)
        iq, ik, iv = _qkv(self.img_attn, self.norm(img) * (1 + i1) + i2, self.num_heads)
        tq, tk, tv = _qkv(self.txt_attn, self.norm(txt) * (1 + t1) + t2, self.num_heads)
        a = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe, transformer_options)
        ta, ia = a[:, :txt.shape[1]], a[:, txt.shape[1]:]
        img = img + i3 * self.img_attn.proj(ia)
        img = img + i6 * self.img_mlp(self.norm(img) * (1 + i4) + i5)
        txt = txt + t3 * self.txt_attn.proj(ta)
        txt = txt + t6 * self.txt_mlp(self.norm(txt) * (1 + t4) + t5)
        return img, txt


class SingleBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.dim = heads, dim
        self.modulation = Mod(dim, 3)
        self.linear1, self.linear2 = nn.Linear(dim, 5 * dim), nn.Linear(3 * dim, dim)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, attn_mask=None, transformer_options={}) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(self.pre_norm(x) * (1 + scale) + shift).split([3 * self.dim, 2 * self.dim], -1)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v, pe, transformer_options)
        return x + gate * self.linear2(torch.cat((a, F.gelu(mlp)), -1))


class LastLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final, self.linear = nn.LayerNorm(dim, elementwise_affine=False), nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, -1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class MiniFlux(nn.Module):
    def __init__(self, channels: int = 4, dim: int = 32, heads: int = 2, depth: int = 2, single: int = 2,
                 context: int = 16):
        super().__init__()
        self.patch_size, self.hidden_size, self.num_heads, self.channels = 2, dim, heads, channels
        self.axes_dim = [dim // heads // 4, 3 * dim // heads // 8, 3 * dim // heads // 8]
        self.pe_embedder = nn.Identity()  # positions come from rope() on the ids; structure as Flux's
        self.img_in, self.txt_in = nn.Linear(4 * channels, dim), nn.Linear(context, dim)
        self.time_in = nn.Sequential(nn.Linear(16, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.double_blocks = nn.ModuleList(DoubleBlock(dim, heads) for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleBlock(dim, heads) for _ in range(single))
        self.final_layer = LastLayer(dim, 4 * channels)

    def _pe(self, ids: Tensor) -> Tensor:  # [B, L, 3] -> [B, 1, L, d/2, 2, 2]
        return self.pe_embedder(torch.cat([rope(ids[..., i], d) for i, d in enumerate(self.axes_dim)], -3))[:, None]

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, y=None, guidance=None, ref_latents=None,
                control=None, transformer_options={}, **kwargs) -> Tensor:
        b, c, h, w = x.shape
        gh, gw = h // 2, w // 2
        img = x.reshape(b, c, gh, 2, gw, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, 4 * c)
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(1, -1, 3).expand(b, -1, -1)
        txt_ids = torch.zeros(b, context.shape[1], 3)
        pe = self._pe(torch.cat([txt_ids, img_ids.float()], 1))
        freqs = torch.exp(-torch.arange(8) / 8 * 9.2)[None] * timestep[:, None]
        vec = self.time_in(torch.cat([freqs.cos(), freqs.sin()], -1))
        img, txt = self.img_in(img), self.txt_in(context)
        opts = dict(transformer_options)
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, transformer_options=opts)
        seq = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            seq = block(seq, vec=vec, pe=pe, transformer_options=opts)
        out = self.final_layer(seq[:, txt.shape[1]:], vec)  # [B, N, 4C]
        return out.reshape(b, gh, gw, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def mini_flux(seed: int = 0, **kw) -> MiniFlux:
    torch.manual_seed(seed)
    return MiniFlux(**kw).eval().requires_grad_(False)


def dit_inputs(batch: int = 2, height: int = 20, width: int = 12, text: int = 5, context: int = 16, seed: int = 1):
    """(args, kwargs) of one call: a non-square latent (20 x 12 -> 10 x 6 patches), timesteps, text."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=g)
    t = torch.linspace(0.2, 0.9, batch)
    ctx = torch.randn(batch, text, context, generator=g)
    return (x, t), {"context": ctx}
