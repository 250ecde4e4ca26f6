"""Exchange codecs: round-trip error bounds, exact sizes, identical residual baselines."""
import pytest
import torch

from pcpp_core import Bands, ConfigError, PatchConfig, bytes_sent
from pcpp_core.codecs import CODECS, Baselines, Fold, codec_names, get_codec
from pcpp_core.geometry import LayerSpec, far_due, send_tokens

SHAPES = [((2, 3, 5, 16), -1), ((2, 8, 1, 13), 1), ((1, 7, 3, 5), 1), ((2, 1, 9, 6), -1)]


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("shape, channel_dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_payload_size_is_the_size_formula(name, shape, channel_dim, dtype):
    codec = get_codec(name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    data = codec.encode(x, channel_dim)
    assert data.dtype == torch.uint8 and data.dim() == 1
    assert data.numel() == codec.nbytes(shape, channel_dim, x.element_size())
    y = codec.decode(data.clone(), shape, channel_dim, dtype)
    assert y.shape == x.shape and y.dtype == dtype


def test_raw_codec_is_exact_and_int8_within_half_a_step():
    x = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(1))
    x = x * torch.tensor([1, 10, 0.1, 3.0]).view(1, 4, 1, 1)  # channels of very different size
    assert torch.equal(get_codec("none").decode(get_codec("none").encode(x, 1), x.shape, 1, x.dtype), x)
    int8 = get_codec("int8")
    y = int8.decode(int8.encode(x, 1), x.shape, 1, x.dtype)
    step = x.abs().amax(dim=(2, 3), keepdim=True) / 127  # per (batch item, channel)
    assert ((y - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert (y - x).abs().max() > 0  # it does quantise


def test_one_bit_is_sign_times_mean_magnitude_per_channel():
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(2))
    c = get_codec("residual-1bit")
    y = c.decode(c.encode(x, -1), x.shape, -1, x.dtype)
    mag = x.abs().mean(dim=(1, 2), keepdim=True)  # groups: (batch item, last-dim channel)
    mag = mag.to(torch.bfloat16).float()  # scales travel as bfloat16
    torch.testing.assert_close(y, torch.where(x >= 0, mag, -mag))


def test_two_bit_error_is_the_lloyd_max_error_of_a_gaussian():
    x = torch.randn(2, 64, 32, 32, generator=torch.Generator().manual_seed(3))
    c = get_codec("residual-2bit")
    y = c.decode(c.encode(x, 1), x.shape, 1, x.dtype)
    rel = ((y - x).pow(2).mean() / x.pow(2).mean()).item()
    assert 0.10 < rel < 0.13  # theory: 0.1175 for the 4-level Lloyd-Max quantiser


@pytest.mark.parametrize("name", ["residual-2bit", "residual-1bit"])
def test_error_feedback_keeps_both_baselines_identical_and_converges(name):
    codec = get_codec(name)
    tx, rx = Baselines(), Baselines()
    gen = torch.Generator().manual_seed(4)
    target = torch.randn(2, 6, 8, 16, generator=gen)  # [B, rows, W, 2D]
    tx.remember("k", target, (10, 16))  # a synchronous call's exact data covers rows 10..16
    rx.remember("k", target, (10, 16))
    first, errors = target.clone(), []
    for step in range(12):
        target = target + 0.05 * torch.randn(target.shape, generator=gen)
        window = target[:, 3:]  # stale calls send the narrower window: rows 13..16
        data = tx.encode(codec, "k", window, range(13, 16), (10, 16), -1)
        got = rx.decode(codec, "k", data, tuple(window.shape), range(13, 16), (10, 16), -1, window.dtype)
        held_tx, held_rx = tx.snapshot()["k"], rx.snapshot()["k"]
        assert torch.equal(held_tx[0], held_rx[0]) and held_tx[1] == held_rx[1] == (10, 16)
        assert torch.equal(got, held_rx[0][:, 3:])
        errors.append((got - window).pow(2).mean().item())
    assert torch.equal(held_rx[0][:, :3], first[:, :3])  # rows outside the window keep their values
    frozen = window.clone()
    for _ in range(8):  # the signal stops changing: the leftover error keeps shrinking
        data = tx.encode(codec, "k", frozen, range(13, 16), (10, 16), -1)
        got = rx.decode(codec, "k", data, tuple(frozen.shape), range(13, 16), (10, 16), -1, frozen.dtype)
    assert (got - frozen).pow(2).mean().item() < 0.5 * errors[-1]


def test_analytic_bytes_use_the_codec_size_per_send():
    specs = [LayerSpec("conv", 0, 8, kernel=3, stride=1, padding=1), LayerSpec("groupnorm", 0, 4),
             LayerSpec("attention", 1, 16)]
    bands = Bands.split(64, 48, 3, 2)
    common = dict(batch=2, element_size=2, fraction=0.3)
    raw = bytes_sent(specs, bands, 1, **common)
    assert bytes_sent(specs, bands, 1, codec=get_codec("none"), **common) == raw
    small = bytes_sent(specs, bands, 1, codec=get_codec("residual-1bit"), **common)
    stats = 2 * 2 * 2 * 4 * 4  # two peers, batch 2, (mean, var), 4 groups, fp32: never compressed
    assert stats < small < (raw - stats) / 8 + stats
    # middle band: one halo row to each neighbour, scales per (batch, channel) per send
    halo = 2 * (2 * 8 * 48 // 8 + 2 * 8 * 2)  # bf16 scales
    assert bytes_sent(specs[:1], bands, 1, codec=get_codec("residual-1bit"), **common) == halo


def test_patch_config_validates_compress():
    assert PatchConfig().compress == "none"
    assert PatchConfig(compress="Residual-2bit").compress == "residual-2bit"
    with pytest.raises(ConfigError, match=r"compress='zip'.*none, int8, residual-2bit, residual-1bit"):
        PatchConfig(compress="zip")
    assert codec_names()[0] == "none"


@pytest.mark.parametrize("refresh", [1, 3, 4])
def test_far_refresh_staggers_the_layers_and_sends_whole_bands(refresh):
    layers = 13
    for ordinal in range(layers):  # every layer refreshes its far rows once per cycle of `refresh` calls
        assert sum(far_due(ordinal, step, refresh) for step in range(5, 5 + refresh)) == 1
    for step in range(refresh):  # and every call refreshes about 1/refresh of the layers
        assert sum(far_due(o, step, refresh) for o in range(layers)) in (layers // refresh, -(-layers // refresh))
    bands = Bands.split(64, 48, 4, 2)
    for level in (0, 2):
        for src, dst in ((1, 0), (1, 2), (3, 0)):
            near = set(range(*bands.needed(dst, src, level, 0.3)))
            assert set(bands.sent_rows(dst, src, level, 0.3, far=True)) == set(range(*bands.rows(src, level)))
            assert set(bands.far_rows(dst, src, level, 0.3)) == set(range(*bands.rows(src, level))) - near
    assert bands.sent_rows(0, 1, 0, 0.3) == tuple(range(*bands.needed(0, 1, 0, 0.3)))  # no far context
    assert not far_due(0, 0, 0)


@pytest.mark.parametrize("cols, pool", [(16, 4), (13, 4), (6, 1), (5, 8)])
def test_fold_pools_far_rows_and_unfold_repeats_the_means(cols, pool):
    rows, far = (4, 5, 6, 7, 8), (4, 7, 8)
    fold = Fold(tuple(i for i, r in enumerate(rows) if r in far), pool)
    x = torch.randn(2, len(rows), cols, 6, generator=torch.Generator().manual_seed(5))  # [B, r, W, C]
    y = fold.fold(x)
    assert tuple(y.shape) == fold.shape(tuple(x.shape)) == (2, send_tokens(rows, far, cols, pool), 6)
    back = fold.unfold(y, tuple(x.shape))
    assert torch.equal(back[:, [1, 2]], x[:, [1, 2]])  # full rows travel as they are
    groups = [range(g, min(g + pool, cols)) for g in range(0, cols, pool)]
    for g in groups:  # a far row's columns all get the mean of their group
        mean = x[:, [0, 3, 4]][:, :, list(g)].mean(dim=2)
        for c in g:
            torch.testing.assert_close(back[:, [0, 3, 4], c], mean)
    torch.testing.assert_close(fold.fold(back), y)  # pooling the repeated means gives them back


def test_pooled_far_rows_keep_both_baselines_identical_and_track_the_coarse_change():
    codec = get_codec("residual-2bit")
    tx, rx = Baselines(), Baselines()
    gen = torch.Generator().manual_seed(6)
    target = torch.randn(2, 6, 16, 8, generator=gen)  # rows 10..16, [B, rows, W, 2D]
    tx.remember("k", target, (10, 16))
    rx.remember("k", target, (10, 16))
    fold = Fold((0, 1, 2, 3), 4)  # rows 10..13 far, pooled by 4 columns; 14, 15 near
    drift = torch.randn(2, 6, 1, 8, generator=gen)  # a change that is smooth along the columns
    for step in range(1, 9):
        now = target + 0.1 * step * drift
        data = tx.encode(codec, "k", now, range(10, 16), (10, 16), -1, fold)
        assert data.numel() == codec.nbytes(fold.shape(tuple(now.shape)), -1, 4)
        got = rx.decode(codec, "k", data, tuple(now.shape), range(10, 16), (10, 16), -1, now.dtype, True, fold)
        assert torch.equal(tx.held("k"), rx.held("k")) and torch.equal(got, rx.held("k"))
    before = (target - now).pow(2).mean().item()
    assert (got - now).pow(2).mean().item() < 0.02 * before  # far rows followed a smooth change
