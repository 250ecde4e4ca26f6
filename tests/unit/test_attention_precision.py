"""Self-attention's compute dtype comes from an injectable policy (the nodes install ComfyUI's)."""
import torch
from torch import nn

from pcpp_core.layers.attention import _attend, attention_dtype, set_attention_precision


def _module(precision=None):
    m = nn.Module()
    m.heads = 2
    if precision is not None:
        m.attn_precision = precision
    return m


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(1, 64, 8, generator=g) * 4).to(torch.bfloat16) for _ in range(3)]


def test_default_policy_follows_the_modules_attn_precision():
    q, k, v = _qkv()
    assert attention_dtype(_module(), torch.bfloat16) == torch.bfloat16
    assert attention_dtype(_module(torch.float32), torch.bfloat16) == torch.float32
    upcast = _attend(q, k, v, _module(torch.float32))
    assert upcast.dtype == torch.bfloat16
    assert torch.equal(upcast, _attend(q.float(), k.float(), v.float(), _module()).to(torch.bfloat16))
    assert not torch.equal(upcast, _attend(q, k, v, _module()))  # the upcast changes the numbers


def test_an_injected_policy_overrides_the_module():
    q, k, v = _qkv()
    seen = []
    try:
        set_attention_precision(lambda m, dtype: seen.append(dtype) or None)  # e.g. --dont-upcast-attention
        assert torch.equal(_attend(q, k, v, _module(torch.float32)), _attend(q, k, v, _module()))
        set_attention_precision(lambda m, dtype: torch.float32 if dtype == torch.bfloat16 else None)  # force upcast
        assert torch.equal(_attend(q, k, v, _module()), _attend(q.float(), k.float(), v.float(), _module()).to(torch.bfloat16))
    finally:
        set_attention_precision(None)
    assert seen and seen[0] == torch.bfloat16
    assert attention_dtype(_module(torch.float32), torch.bfloat16) == torch.float32  # default restored
