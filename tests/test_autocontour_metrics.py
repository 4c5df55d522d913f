"""Dice and HD95 (twinrt.autocontour.metrics): analytic cases and agreement with MONAI's implementation."""

import math

import numpy as np
import pytest

from twinrt.autocontour.metrics import dice, hd95, surface
from twinrt.errors import InvalidInputError


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_dice_analytic_and_edge_cases():
    a = box((10, 10, 10), (0, 0, 0), (4, 10, 10))  # 400 voxels
    b = box((10, 10, 10), (2, 0, 0), (6, 10, 10))  # 400, overlap 200
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0 and dice(a, np.zeros_like(a)) == 0.0
    assert math.isnan(dice(np.zeros_like(a), np.zeros_like(a)))
    with pytest.raises(InvalidInputError, match="different shapes"):
        dice(a, a[:5])


def test_hd95_of_a_shifted_slab_is_the_shift_in_mm():
    # Two slabs shifted by 3 voxels along k: their end faces are 3 voxels apart, their side faces
    # coincide. With 4 mm along k that is 12 mm; with 4 mm along i instead, 3 mm.
    a = box((20, 12, 12), (4, 0, 0), (10, 12, 12))
    b = box((20, 12, 12), (7, 0, 0), (13, 12, 12))
    d_k = hd95(a, b, spacing_mm=(1.0, 1.0, 4.0))  # (i, j, k): k voxels are 4 mm
    d_i = hd95(a, b, spacing_mm=(4.0, 1.0, 1.0))  # the same masks with 4 mm along i instead
    assert d_k == pytest.approx(12.0)
    assert d_i == pytest.approx(3.0)  # an (i, j, k) / (k, j, i) mix-up would swap the two
    assert hd95(a, a, (1.0, 1.0, 1.0)) == 0.0
    assert hd95(a, np.zeros_like(a)) == math.inf and math.isnan(hd95(np.zeros_like(a), np.zeros_like(a)))
    with pytest.raises(InvalidInputError, match="positive"):
        hd95(a, b, spacing_mm=(1.0, 0.0, 1.0))


def test_surface_is_the_shell():
    a = box((7, 7, 7), (1, 1, 1), (6, 6, 6))  # 5^3 cube: 125 voxels, 3^3 = 27 inside
    assert surface(a).sum() == 125 - 27


def test_agrees_with_monai():
    monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI is not installed (pip install 'twinrt[ai]')")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    k, j, i = np.meshgrid(np.arange(24), np.arange(28), np.arange(32), indexing="ij")
    spacing = (0.9, 1.3, 2.5)  # (i, j, k) mm
    for _ in range(3):
        c1, c2 = rng.uniform(8, 16, 3), rng.uniform(8, 16, 3)
        r1, r2 = rng.uniform(4, 7), rng.uniform(4, 7)
        a = ((k - c1[0]) ** 2 + (j - c1[1]) ** 2 + (i - c1[2]) ** 2) <= r1 ** 2
        b = ((k - c2[0]) ** 2 + (j - c2[1]) ** 2 + (i - c2[2]) ** 2) <= r2 ** 2
        ta = torch.from_numpy(a[None, None].astype(np.float32))
        tb = torch.from_numpy(b[None, None].astype(np.float32))
        ref_hd = float(monai_metrics.compute_hausdorff_distance(ta, tb, percentile=95,
                                                                spacing=list(spacing[::-1]))[0, 0])
        ref_dice = float(monai_metrics.compute_dice(ta, tb)[0, 0])
        assert hd95(a, b, spacing) == pytest.approx(ref_hd, rel=1e-5, abs=1e-5)
        assert dice(a, b) == pytest.approx(ref_dice, rel=1e-6)
