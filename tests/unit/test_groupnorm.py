"""GroupNorm statistics from bands: the negative-variance fallback."""
import torch

from pcpp_core.layers.groupnorm import guard_variance


def test_negative_variance_falls_back_to_the_local_variance_only():
    stats = torch.tensor([[[0.5, -1e-3], [0.2, 0.3]]])  # [B=1, G=2, (mean, var)]
    own = torch.tensor([[[9.0, 0.7], [8.0, 0.9]]])
    out = guard_variance(stats, own)
    assert torch.equal(out, torch.tensor([[[0.5, 0.7], [0.2, 0.3]]]))  # the combined mean is kept
