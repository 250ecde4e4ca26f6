"""Small models built in code with fixed-seed random weights, for the engine tests.

Workers unpickle these classes, so they live in an importable module (tests.models).
`MiniComfyUNet` mirrors the structure of ComfyUI's openaimodel.UNetModel (input_blocks,
middle_block, output_blocks, out; BasicTransformerBlock.attn1/attn2 with to_q/to_k/to_v/to_out
and disable_self_attn; control residuals), so the ComfyUI plan is exercised without ComfyUI.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def tiny_diffusers_unet(seed: int = 0, channels=(32, 32, 64)) -> nn.Module:
    """diffusers UNet2DConditionModel, 2 downsamplings, self/cross-attention at levels 1 and 2."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval().requires_grad_(False)


# ---- a structural stand-in for ComfyUI's UNetModel ----------------------------------------

class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None, heads: int):
        super().__init__()
        self.heads = heads
        ctx = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx, dim, bias=False)
        self.to_v = nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        b, n, d = q.shape
        q, k, v = (t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.disable_self_attn = False
        self.attn1 = CrossAttention(dim, None, heads)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x, context=None, transformer_options={}):
        own = context if getattr(self, "self_attention_gets_context", False) else None  # a model the engine refuses
        x = self.attn1(self.norm1(x), context=own, transformer_options=transformer_options) + x
        x = self.attn2(self.norm2(x), context=context, transformer_options=transformer_options) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, context_dim: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, context_dim, heads)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, context=None, transformer_options={}):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [B, h*w, C]
        for blk in self.transformer_blocks:
            y = blk(y, context=context, transformer_options=transformer_options)
        return self.proj_out(y.transpose(1, 2).reshape(b, c, h, w)) + x


class ResBlock(nn.Module):
    def __init__(self, ch: int, out: int, emb: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, out))
        self.out_layers = nn.Sequential(nn.GroupNorm(8, out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out else nn.Conv2d(ch, out, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, output_shape=None):
        size = output_shape[2:4] if output_shape is not None else (x.shape[2] * 2, x.shape[3] * 2)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None, transformer_options={}, output_shape=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape)
            else:
                x = layer(x)
        return x


class MiniComfyUNet(nn.Module):
    """Two downsamplings; attention at levels 1 and 2 and in the middle; control residuals."""

    def __init__(self, in_ch: int = 4, ch: int = 32, context_dim: int = 32):
        super().__init__()
        emb = ch * 2
        self.model_channels = ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        T = TimestepEmbedSequential
        self.input_blocks = nn.ModuleList([
            T(nn.Conv2d(in_ch, ch, 3, padding=1)),
            T(ResBlock(ch, ch, emb)),
            T(Downsample(ch)),
            T(ResBlock(ch, ch, emb), SpatialTransformer(ch, context_dim)),
            T(Downsample(ch)),
            T(ResBlock(ch, ch, emb), SpatialTransformer(ch, context_dim)),
        ])
        self.middle_block = T(ResBlock(ch, ch, emb), SpatialTransformer(ch, context_dim), ResBlock(ch, ch, emb))
        self.output_blocks = nn.ModuleList([
            T(ResBlock(2 * ch, ch, emb), SpatialTransformer(ch, context_dim)),
            T(ResBlock(2 * ch, ch, emb), SpatialTransformer(ch, context_dim), Upsample(ch)),
            T(ResBlock(2 * ch, ch, emb), SpatialTransformer(ch, context_dim)),
            T(ResBlock(2 * ch, ch, emb), Upsample(ch)),
            T(ResBlock(2 * ch, ch, emb)),
            T(ResBlock(2 * ch, ch, emb)),
        ])
        self.out = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, in_ch, 3, padding=1))

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}):
        half = self.model_channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = timesteps.float()[:, None] * freqs[None]
        emb = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, transformer_options)
            hs.append(h)
        h = self.middle_block(h, emb, context, transformer_options)
        if control is not None and control.get("middle"):
            h = h + control["middle"][0]
        for block in self.output_blocks:
            skip = hs.pop()
            if control is not None and control.get("output"):
                ctrl = control["output"].pop()
                if ctrl is not None:
                    skip = skip + ctrl
            h = block(torch.cat([h, skip], dim=1), emb, context, transformer_options,
                      output_shape=hs[-1].shape if hs else None)
        return self.out(h)


def tiny_comfy_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MiniComfyUNet().eval().requires_grad_(False)


def tiny_comfy_unet_with_context_in_self_attention() -> nn.Module:
    """attn1 gets the text context: loads fine, but a worker refuses it at its first call."""
    model = tiny_comfy_unet()
    for m in model.modules():
        if isinstance(m, BasicTransformerBlock):
            m.self_attention_gets_context = True
    return model
