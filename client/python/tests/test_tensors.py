"""Tensor helpers without a server: dtype conversions equal the C++ core's (round to nearest even,
NaN stays NaN), layouts are zero-copy views, page grids follow the CLI's rules."""
from __future__ import annotations

import numpy as np
import pytest

import fibquant
from fibquant.tensors import PageGrid, as_numpy, canonical_view, convert, grid_for

try:
    import torch
except ImportError:
    torch = None


def test_bf16_round_to_nearest_even_and_nan():
    # 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0), and 1 + 3*2^-8 (halfway again) to 1 + 2^-6.
    x = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5, 65504.0, np.inf, -np.inf, 0.0, -0.0], np.float32)
    b = fibquant.f32_to_bf16(x)
    assert b.tolist() == [0x3F80, 0x3F82, 0xC020, 0x4780, 0x7F80, 0xFF80, 0x0000, 0x8000]
    nan = np.array([0x7F800001, 0xFFC12345], np.uint32).view(np.float32)
    nb = fibquant.f32_to_bf16(nan)
    assert nb.tolist() == [0x7F80 | 0x40, 0xFFC1 | 0x40]  # core/half.cc: (x >> 16) | 0x40
    assert np.isnan(fibquant.bf16_to_f32(nb)).all()
    assert fibquant.bf16_to_f32(b[:4]).tolist() == [1.0, 1.015625, -2.5, 65536.0]


@pytest.mark.skipif(torch is None, reason="python3-torch not installed")
def test_conversions_match_torch_on_finite_values():
    x = np.random.default_rng(5).standard_normal(100000).astype(np.float32) * 100
    t = torch.from_numpy(x)
    assert np.array_equal(fibquant.f32_to_bf16(x), t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(convert(x, "f32", "f16"), t.to(torch.float16).numpy())
    assert np.array_equal(convert(convert(x, "f32", "f16"), "f16", "bf16"),
                          t.to(torch.float16).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    b = torch.from_numpy(x).to(torch.bfloat16)
    arr, kind = as_numpy(b)
    assert kind == "bf16" and arr.dtype == np.uint16
    assert np.array_equal(fibquant.bf16_to_f32(arr), b.float().numpy())


def test_canonical_views_are_zero_copy():
    a = np.zeros((7, 3, 5), np.float32)  # [tokens, heads, head_dim]
    v = canonical_view(a)
    assert v.shape == (1, 1, 3, 7, 5) and np.shares_memory(v, a)
    v[0, 0, 2, 6, 4] = 1
    assert a[6, 2, 4] == 1
    assert canonical_view(np.zeros((2, 3, 7, 5)), "bhtd").shape == (2, 1, 3, 7, 5)
    assert canonical_view(np.zeros((3, 7, 5)), "htd").shape == (1, 1, 3, 7, 5)
    with pytest.raises(fibquant.InvalidArgumentError):
        canonical_view(np.zeros((3, 7, 5)), "hd")
    with pytest.raises(fibquant.InvalidArgumentError):
        canonical_view(np.zeros((3, 0, 5)))


def test_page_grid_rules():
    shape = {"batch": 1, "layers": 2, "kv_heads": 4, "tokens": 40, "head_dim": 8}
    g = grid_for((1, 2, 4, 40, 8), shape, 16)
    assert g.page_count == 2 * 4 * 3 and g.plan()[:3] == [(0, 0, 0, 0, 16), (0, 0, 0, 16, 16), (0, 0, 0, 32, 8)]
    assert grid_for((1, 1, 1, 32, 8), shape, 16).page_count == 2  # a multiple of the page size
    with pytest.raises(fibquant.InvalidArgumentError, match="neither"):
        grid_for((1, 1, 1, 20, 8), shape, 16)
    with pytest.raises(fibquant.InvalidArgumentError, match="batch"):
        grid_for((2, 1, 1, 16, 8), shape, 16)
    assert PageGrid(1, 1, 1, 40, 8, 16).index(0, 0, 0, 32) == 2
