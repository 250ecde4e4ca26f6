import pytest

from pcpp_core import Bands, ConfigError, LayerSpec, bytes_sent, split_rows
from pcpp_core.geometry import conv_halo, window_rows


def test_even_and_uneven_bands():
    assert split_rows(128, 4, 3) == (0, 32, 64, 96, 128)
    assert split_rows(128, 3, 3) == (0, 40, 80, 128)  # docs/PCPP.md: 40/40/48
    assert split_rows(64, 8, 3) == tuple(range(0, 65, 8))


def test_too_small_names_smallest_valid_size():
    with pytest.raises(ConfigError, match=r"smallest valid latent height is 32 rows \(256 pixels"):
        split_rows(24, 4, 3)


def test_height_not_multiple_of_downsampling():
    with pytest.raises(ConfigError, match="not a multiple of 8"):
        split_rows(100, 2, 3)


def test_window_rounds_to_whole_rows_per_level():
    b = Bands.split(128, 128, 4, 3)  # bands of 32 rows; 16/8/4 at levels 1..3
    assert b.window(1, 0, 0.0) == (32, 64)
    assert b.window(1, 0, 0.3) == (32 - 10, 64 + 10)  # ceil(9.6) = 10
    assert b.window(1, 3, 0.3) == (4 - 2, 8 + 2)  # ceil(1.2) = 2
    assert b.window(0, 0, 0.3) == (0, 42)  # clipped at the image edge
    assert b.window(1, 0, 1.0) == (0, 96)
    assert b.window(1, 0, 100.0) == (0, 128)
    assert b.window(2, 1, None) == (0, 64)


def test_window_rows_is_robust_to_float_noise():
    assert window_rows(0.3, 10) == 3  # 0.3*10 = 3.0000000000000004 in binary
    assert window_rows(0.1, 30) == 3
    assert window_rows(0.35, 20) == 7


def test_needed_rows_cover_window_minus_own_band():
    b = Bands.split(128, 64, 3, 3)  # 40/40/48
    for f in (0.0, 0.3, 1.0, 2.5, None):
        for dst in range(3):
            w0, w1 = b.window(dst, 1, f)
            got = sum(hi - lo for lo, hi in (b.needed(dst, src, 1, f) for src in range(3)))
            own = b.rows(dst, 1)
            assert got == (w1 - w0) - (own[1] - own[0])


def test_conv_halo():
    assert conv_halo(3, 1, 1) == (1, 1)
    assert conv_halo(3, 2, 1) == (1, 0)  # stride 2 on even rows needs only the row above
    assert conv_halo(1, 1, 0) == (0, 0)


def test_bytes_sent_by_hand():
    b = Bands.split(64, 16, 2, 3)  # two bands of 32 rows
    specs = [LayerSpec("conv", 0, 8, 3, 1, 1), LayerSpec("groupnorm", 0, 4), LayerSpec("attention", 1, 10)]
    # conv: 1 row * 8 ch * 16 cols * 4 B; gn: 2 stats * 4 groups * 4 B; attn: 2*(K,V) * rows * 10 * 8 cols * 4 B
    conv, gn = 1 * 8 * 16 * 4, 2 * 4 * 4
    attn = lambda rows: 2 * rows * 10 * 8 * 4  # noqa: E731
    assert bytes_sent(specs, b, 0, batch=1, element_size=4, fraction=0.25) == conv + gn + attn(4)
    assert bytes_sent(specs, b, 0, batch=1, element_size=4, fraction=None) == conv + gn + attn(16)
    assert bytes_sent(specs, b, 0, batch=2, element_size=4, fraction=None) == 2 * (conv + gn + attn(16))
    assert bytes_sent(specs, b, 0, batch=1, element_size=4, fraction=0.3, exchange=False) == 0


def test_level_of_tokens():
    b = Bands.split(64, 40, 2, 3)
    assert b.level_of_tokens(0, 32 * 40) == 0
    assert b.level_of_tokens(1, 4 * 5) == 3
    with pytest.raises(ConfigError, match="matches no level"):
        b.level_of_tokens(0, 7)
