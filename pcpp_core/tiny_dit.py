"""The built-in tiny DiT: a small trained model with ComfyUI's Flux layout, see assets/pcpp-tiny-dit.

Why a second model: the transformer plan family is found by *structure* on ComfyUI's
`comfy.ldm.flux.model.Flux`; fidelity numbers need trained weights with real spatial structure,
and pcpp_core never imports ComfyUI. So this module re-implements the Flux module tree (the same
attribute names, parameter names and calling convention `forward(x, timestep, context, y=None,
guidance=None, transformer_options={})`) in plain torch. Its state dict has ComfyUI's Flux key
names. Attention honours `transformer_options["optimized_attention_override"]` the way ComfyUI's
`optimized_attention` does: `override(func, q, k, v, heads, mask=..., skip_reshape=True,
transformer_options=...)` with q/k/v as [B, H, L, D] (text tokens first, then image tokens).

"Latent" space: pixel-unshuffle by 4 (`to_latent`), [B, 3, 64, 64] -> [B, 48, 16, 16]; the model
then patchifies 2x2 like Flux, so a 64x64 image is 8x8 = 64 image tokens of 8x8 pixels (a CPU
budget: 256 tokens of 4x4 pixels trained 4x slower on the shared 2-core machine).
Training is rectified flow like Flux: x_s = (1 - s) x0 + s noise, the model predicts noise - x0,
timestep = s in [0, 1] (the embedding multiplies by 1000).
The network predicts x0 and `forward` returns the velocity (x - x0) / sigma: a token of 8x8 RGB
pixels has 192 values, more than the 128-wide stream can carry, and a velocity (mostly noise)
squeezed through it kept a third of the noise in every sample; clean images are low-dimensional
(the "x-prediction" argument of Li & He, "Back to Basics", 2025). So the state dict loads into
ComfyUI's Flux unchanged, whose output is then this model's x0.
Second difference: when `y` is None the pooled vector is the mean of the context tokens
(Flux uses zeros), so callers pass the condition tokens only, as for the tiny UNet.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ASSET = Path(__file__).resolve().parent / "assets" / "pcpp-tiny-dit"
LATENT_FACTOR = 4  # pixels per latent pixel along each side
SIGMA_MIN = 0.05  # x0 -> velocity divides by sigma; never by less than this


@dataclass
class TinyDiTParams:
    """The fields of ComfyUI's FluxParams that this model uses (same names, same meaning)."""
    in_channels: int = 48
    out_channels: int = 48
    vec_in_dim: int | None = 64
    context_in_dim: int = 64
    hidden_size: int = 128
    mlp_ratio: float = 4.0
    num_heads: int = 2
    depth: int = 2
    depth_single_blocks: int = 3
    axes_dim: list = field(default_factory=lambda: [16, 24, 24])
    theta: int = 10000
    patch_size: int = 2
    qkv_bias: bool = True
    guidance_embed: bool = False
    txt_ids_dims: list = field(default_factory=list)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    """[N] -> [N, dim] sinusoidal embedding of time_factor * t (cos half first, as Flux)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t)[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """pos [B, L] -> rotation matrices [B, L, dim/2, 2, 2] (float32)."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = (1.0 / theta ** scale).float()
    ang = pos.float()[..., None] * omega  # [B, L, dim/2]
    cos, sin = torch.cos(ang), torch.sin(ang)
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate pairs of channels of x [B, H, L, D] by pe [B, 1, L, D/2, 2, 2]."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)  # [B, H, L, D/2, 1, 2]
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def sdpa(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None,
         skip_reshape: bool = False, skip_output_reshape: bool = False, **kwargs: Any) -> Tensor:
    """ComfyUI's attention-function signature: q/k/v [B, H, L, D] when skip_reshape -> [B, L, H*D]."""
    if not skip_reshape:
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor | None, mask: Tensor | None = None,
              transformer_options: dict | None = None) -> Tensor:
    """RoPE, then attention through the override if the options carry one (as ComfyUI's wrap_attn)."""
    if pe is not None:
        q, k = apply_rope(q, pe), apply_rope(k, pe)
    opts = transformer_options or {}
    override = opts.get("optimized_attention_override")
    if override is not None:
        return override(sdpa, q, k, v, q.shape[1], mask=mask, skip_reshape=True, transformer_options=opts)
    return sdpa(q, k, v, q.shape[1], mask=mask, skip_reshape=True)


class EmbedND(nn.Module):
    def __init__(self, dim: int, theta: int, axes_dim: list):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids: Tensor) -> Tensor:  # [B, L, n_axes] -> [B, 1, L, dim/2, 2, 2]
        return torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])],
                         dim=-3).unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = nn.RMSNorm(dim)
        self.key_norm = nn.RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds qkv/norm/proj; the blocks run the joint attention themselves (as in Flux)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec[:, None, :] if vec.ndim == 2 else vec)).chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), (ModulationOut(*out[3:]) if self.is_double else None)


def _no_modulation_dims(*dims: Any) -> None:
    if any(d is not None for d in dims):
        raise ValueError("the tiny DiT has no per-token modulation (modulation_dims: Flux's reference-image path)")


def _mlp(hidden: int, ratio: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, int(hidden * ratio)), nn.GELU(approximate="tanh"),
                         nn.Linear(int(hidden * ratio), hidden))


def _qkv(attn: SelfAttention, x: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, L, C] -> q, k, v [B, H, L, D] with q/k RMS-normalised."""
    q, k, v = attn.qkv(x).view(x.shape[0], x.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.norm(q, k, v)
    return q, k, v


class DoubleStreamBlock(nn.Module):
    """Separate weights for text and image tokens, one joint attention over [txt; img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        self.num_heads, self.hidden_size, self.modulation = num_heads, hidden_size, True
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(hidden_size, double=True))
            setattr(self, f"{s}_norm1", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_attn", SelfAttention(hidden_size, num_heads, qkv_bias))
            setattr(self, f"{s}_norm2", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_mlp", _mlp(hidden_size, mlp_ratio))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, attn_mask: Tensor | None = None,
                modulation_dims_img: Any = None, modulation_dims_txt: Any = None,
                transformer_options: dict | None = None) -> tuple[Tensor, Tensor]:
        """Flux's signature, so callers that bind arguments by name see the same parameters."""
        _no_modulation_dims(modulation_dims_img, modulation_dims_txt)
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = _qkv(self.img_attn, self.img_norm1(img) * (1 + img_mod1.scale) + img_mod1.shift,
                                   self.num_heads)
        txt_q, txt_k, txt_v = _qkv(self.txt_attn, self.txt_norm1(txt) * (1 + txt_mod1.scale) + txt_mod1.shift,
                                   self.num_heads)
        attn = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2),
                         pe=pe, mask=attn_mask, transformer_options=transformer_options)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(self.img_norm2(img) * (1 + img_mod2.scale) + img_mod2.shift)
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(self.txt_norm2(txt) * (1 + txt_mod2.scale) + txt_mod2.shift)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Shared weights for [txt; img]: one linear makes qkv and the MLP input, one linear merges both."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_dim = self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.scale = (hidden_size // num_heads) ** -0.5
        self.mlp_hidden_dim = self.mlp_hidden_dim_first = int(hidden_size * mlp_ratio)
        self.yak_mlp = False
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, attn_mask: Tensor | None = None,
                modulation_dims: Any = None, transformer_options: dict | None = None) -> Tensor:
        _no_modulation_dims(modulation_dims)
        mod, _ = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(self.pre_norm(x) * (1 + mod.scale) + mod.shift),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        return x + mod.gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec[:, None, :] if vec.ndim == 2 else vec).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class TinyDiT(nn.Module):
    """Flux's module tree and calling convention at a tiny size (see the module docstring)."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        p = self.params = TinyDiTParams(**kwargs)
        self.dtype = None
        self.patch_size = p.patch_size
        self.in_channels = p.in_channels * p.patch_size ** 2
        self.out_channels = p.out_channels * p.patch_size ** 2
        if p.hidden_size % p.num_heads or sum(p.axes_dim) != p.hidden_size // p.num_heads:
            raise ValueError(f"axes_dim {p.axes_dim} must sum to hidden_size/num_heads "
                             f"= {p.hidden_size}/{p.num_heads}")
        self.hidden_size, self.num_heads = p.hidden_size, p.num_heads
        self.pe_embedder = EmbedND(p.hidden_size // p.num_heads, p.theta, p.axes_dim)
        self.img_in = nn.Linear(self.in_channels, p.hidden_size)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size) if p.vec_in_dim is not None else None
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.txt_norm = None
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias)
                                           for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio)
                                           for _ in range(p.depth_single_blocks))
        self.final_layer = LastLayer(p.hidden_size, 1, self.out_channels)

    def zero_init_(self) -> TinyDiT:
        """adaLN-zero start for training: every residual branch and the output begin at 0."""
        mods = [b.img_mod.lin for b in self.double_blocks] + [b.txt_mod.lin for b in self.double_blocks]
        mods += [b.modulation.lin for b in self.single_blocks]
        mods += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for m in mods:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        return self

    def forward_orig(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                     y: Tensor | None, guidance: Tensor | None = None, control: Any = None,
                     transformer_options: dict | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """Token-level forward, as Flux.forward_orig: img [B, N, C*4], txt [B, T, ctx] -> [B, N, C*4]."""
        opts = dict(transformer_options or {})
        blocks_replace = opts.get("patches_replace", {}).get("dit", {})
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.params.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        if self.vector_in is not None:
            vec = vec + self.vector_in(y[:, :self.params.vec_in_dim])
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        opts.update(total_blocks=len(self.double_blocks), block_type="double")
        for i, block in enumerate(self.double_blocks):
            opts["block_index"] = i
            if ("double_block", i) in blocks_replace:
                def wrap(a: dict, block: nn.Module = block) -> dict:
                    im, tx = block(img=a["img"], txt=a["txt"], vec=a["vec"], pe=a["pe"],
                                   attn_mask=a.get("attn_mask"), transformer_options=a.get("transformer_options"))
                    return {"img": im, "txt": tx}
                out = blocks_replace[("double_block", i)](
                    {"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": attn_mask,
                     "transformer_options": opts}, {"original_block": wrap})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=opts)

        img = torch.cat((txt, img), 1)
        opts.update(total_blocks=len(self.single_blocks), block_type="single", img_slice=[txt.shape[1], img.shape[1]])
        for i, block in enumerate(self.single_blocks):
            opts["block_index"] = i
            if ("single_block", i) in blocks_replace:
                def wrap1(a: dict, block: nn.Module = block) -> dict:
                    return {"img": block(a["img"], vec=a["vec"], pe=a["pe"], attn_mask=a.get("attn_mask"),
                                         transformer_options=a.get("transformer_options"))}
                img = blocks_replace[("single_block", i)](
                    {"img": img, "vec": vec, "pe": pe, "attn_mask": attn_mask, "transformer_options": opts},
                    {"original_block": wrap1})["img"]
            else:
                img = block(img, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=opts)
        return self.final_layer(img[:, txt.shape[1]:], vec)

    def process_img(self, x: Tensor, index: int = 0, h_offset: int = 0, w_offset: int = 0,
                    transformer_options: dict | None = None) -> tuple[Tensor, Tensor]:
        """[B, C, H, W] -> tokens [B, (H/2)(W/2), C*4] and their ids [B, N, 3] = (index, row, col)."""
        b, c, h, w = x.shape
        p = self.patch_size
        x = F.pad(x, (0, (-w) % p, 0, (-h) % p), mode="circular")  # as comfy's pad_to_patch_size
        hp, wp = x.shape[2] // p, x.shape[3] // p
        img = x.reshape(b, c, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5).reshape(b, hp * wp, c * p * p)
        ids = torch.zeros(hp, wp, 3, device=x.device, dtype=torch.float32)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(hp, device=x.device, dtype=torch.float32)[:, None] + (h_offset + p // 2) // p
        ids[..., 2] = torch.arange(wp, device=x.device, dtype=torch.float32)[None, :] + (w_offset + p // 2) // p
        return img, ids.reshape(1, hp * wp, 3).expand(b, -1, -1)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None = None,
                guidance: Tensor | None = None, ref_latents: Any = None, control: Any = None,
                transformer_options: dict | None = None, **kwargs: Any) -> Tensor:
        """x [B, C, H, W] (latent), timestep [B] = sigma in [0, 1], context [B, T, 64] -> velocity [B, C, H, W].

        The blocks predict the clean latent x0 (Flux's network, its output read as x0); the velocity
        is (x - x0) / sigma, per pixel, so a band's rows of it need only the band's rows of x0.
        """
        if ref_latents is not None or control is not None:
            raise ValueError("the tiny DiT takes no ref_latents/control (a Flux feature it does not model)")
        b, _, h, w = x.shape
        p = self.patch_size
        img, img_ids = self.process_img(x, transformer_options=transformer_options)
        txt_ids = torch.zeros(b, context.shape[1], 3, device=x.device, dtype=torch.float32)
        if y is None and self.vector_in is not None:
            y = context.mean(1)  # see the module docstring: the pooled condition
        out = self.forward_orig(img, img_ids, context, txt_ids, timestep, y, guidance,
                                transformer_options=transformer_options, attn_mask=kwargs.get("attention_mask"))
        hp, wp = (h + p - 1) // p, (w + p - 1) // p
        x0 = out.reshape(b, hp, wp, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, hp * p, wp * p)
        return velocity(x, x0[:, :, :h, :w], timestep)


def velocity(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """Rectified-flow velocity noise - x0 = (x - x0) / sigma, sigma clamped at SIGMA_MIN: [B, C, H, W]."""
    return (x - x0) / sigma.clamp(min=SIGMA_MIN).to(x.dtype).view(-1, 1, 1, 1)


def to_latent(img: Tensor) -> Tensor:
    """The model's trivial latent space: [B, 3, H, W] in [-1, 1] -> [B, 48, H/4, W/4] (pixel-unshuffle)."""
    return F.pixel_unshuffle(img, LATENT_FACTOR)


def to_image(lat: Tensor) -> Tensor:
    """[B, 48, h, w] -> [B, 3, 4h, 4w]."""
    return F.pixel_shuffle(lat, LATENT_FACTOR)


def load_tiny_dit(dtype: torch.dtype = torch.float32, asset: Path = ASSET) -> tuple[TinyDiT, Tensor]:
    """(model, condition table [13, 4, 64]) of the bundled tiny DiT; row 12 is the null condition."""
    from safetensors.torch import load_file

    model = TinyDiT(**json.loads((asset / "config.json").read_text()))
    model.load_state_dict({k: v.to(dtype) for k, v in load_file(str(asset / "dit.fp16.safetensors")).items()})
    model = model.to(dtype).eval().requires_grad_(False)
    emb = load_file(str(asset / "embeddings.safetensors"))["embeddings"].to(dtype)
    return model, emb


def config_dict(model: TinyDiT) -> dict:
    """The model's constructor arguments (also valid keyword arguments of ComfyUI's Flux)."""
    return asdict(model.params)
