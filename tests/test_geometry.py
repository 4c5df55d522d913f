"""Grid: LPS/RAS matrices, index <-> patient transforms, resampling."""

import numpy as np
import pytest

from twinrt.errors import GeometryError, InvalidInputError
from twinrt.geometry import LPS_TO_RAS, Grid, resample_array


def rotated_grid():
    # Feet-first-like orientation: i along -x, j along +z, k along +y (orthonormal, axis aligned).
    direction = np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=float)
    return Grid((5, 6, 7), (1.5, 2.0, 3.0), (10.0, -20.0, 30.0), direction)


def test_index_to_lps_follows_documented_formula():
    g = rotated_grid()
    ijk = np.array([2.0, 3.0, 4.0])
    expected = np.array(g.origin_mm) + g.direction @ (np.array(g.spacing_mm) * ijk)
    assert np.allclose(g.index_to_lps(ijk), expected)
    assert np.allclose(g.lps_to_index(expected), ijk)


def test_ras_matrix_negates_x_and_y_and_round_trips():
    g = rotated_grid()
    ras = g.ijk_to_ras()
    assert np.allclose(ras, LPS_TO_RAS @ g.ijk_to_lps())
    p_lps = g.index_to_lps([1, 2, 3])
    p_ras = ras @ np.array([1, 2, 3, 1.0])
    assert np.allclose(p_ras[:3], [-p_lps[0], -p_lps[1], p_lps[2]])
    back = Grid.from_ijk_to_ras(ras, g.shape)
    assert back == g


def test_voxel_volume_and_extent():
    g = Grid((10, 20, 30), (2.0, 2.5, 4.0))
    assert g.voxel_volume_cc == pytest.approx(0.02)
    lo, hi = g.extent_lps()
    assert np.allclose(lo, [0, 0, 0]) and np.allclose(hi, [58, 47.5, 36])


@pytest.mark.parametrize("bad", [dict(shape=(0, 2, 2), spacing_mm=(1, 1, 1)),
                                 dict(shape=(2, 2, 2), spacing_mm=(1, 0, 1)),
                                 dict(shape=(2, 2, 2), spacing_mm=(1, float("nan"), 1))])
def test_invalid_grids_raise_typed_errors(bad):
    with pytest.raises(InvalidInputError):
        Grid(**bad)


def test_sheared_direction_refused():
    with pytest.raises(GeometryError, match="orthonormal"):
        Grid((2, 2, 2), (1, 1, 1), direction=np.array([[1, 0.3, 0], [0, 1, 0], [0, 0, 1]]))


def test_resample_identity_shift_and_nearest():
    src = Grid((6, 7, 8), (2.0, 2.0, 2.0), (0, 0, 0))
    a = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    assert np.array_equal(resample_array(a, src, src), a)
    # Shift by exactly one voxel along i: values move by one column.
    shifted = Grid((6, 7, 8), (2.0, 2.0, 2.0), (2.0, 0, 0))
    r = resample_array(a, src, shifted, order=1)
    assert np.allclose(r[:, :, :-1], a[:, :, 1:])
    assert np.all(r[:, :, -1] == 0)  # outside the source: fill value
    # Half-voxel shift, linear: the mean of neighbours (a is linear in i).
    half = Grid((6, 7, 7), (2.0, 2.0, 2.0), (1.0, 0, 0))
    assert np.allclose(resample_array(a, src, half), (a[:, :, :-1] + a[:, :, 1:]) / 2)


def test_resample_to_rotated_grid_samples_the_same_points():
    src = Grid((8, 9, 10), (1.0, 1.0, 1.0))
    # A linear field f = x + 10 y + 100 z is reproduced exactly by trilinear interpolation.
    k, j, i = np.meshgrid(np.arange(8), np.arange(9), np.arange(10), indexing="ij")
    f = (i + 10 * j + 100 * k).astype(np.float32)
    tgt = Grid((3, 3, 3), (1.0, 1.0, 1.0), (5.0, 2.0, 3.0), np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]], float))
    r = resample_array(f, src, tgt)
    kk, jj, ii = np.meshgrid(np.arange(3), np.arange(3), np.arange(3), indexing="ij")
    pts = tgt.index_to_lps(np.stack([ii, jj, kk], -1).astype(float))
    assert np.allclose(r, pts[..., 0] + 10 * pts[..., 1] + 100 * pts[..., 2], atol=1e-3)


def test_resample_rejects_wrong_shape():
    g = Grid((2, 3, 4), (1, 1, 1))
    with pytest.raises(GeometryError, match="resample"):
        resample_array(np.zeros((4, 3, 2)), g, g)


def test_subgrid_positions_match_parent():
    g = rotated_grid()
    sub = g.subgrid(1, 4, 2, 5, 3, 6)
    assert sub.shape == (3, 3, 3)
    assert np.allclose(sub.index_to_lps([0, 0, 0]), g.index_to_lps([3, 2, 1]))


def test_sampling_at_voxel_centres_returns_the_array():
    import numpy as np

    from twinrt.geometry import Grid, sample_at_lps, voxel_centres_lps

    grid = Grid((4, 5, 6), (1.5, 2.0, 3.0), (10.0, -4.0, 2.0))
    arr = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    pts = voxel_centres_lps(grid)
    assert pts.shape == (4, 5, 6, 3) and np.allclose(pts[1, 2, 3], grid.index_to_lps(np.array([3.0, 2.0, 1.0])))
    # float32 positions: the last centre of an axis can fall a rounding error outside the grid, where
    # mode="constant" gives fill_value; the interior is exact.
    assert np.allclose(sample_at_lps(arr, grid, pts)[:-1, :-1, :-1], arr[:-1, :-1, :-1], atol=1e-5)
    assert sample_at_lps(arr, grid, pts + 1000.0, fill_value=-7.0).min() == -7.0
