"""Mask <-> planar contour conversion (twinrt.contours): exact round trips, holes, islands, errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from twinrt.contours import contours_to_mask, contours_to_structure_mask, mask_to_contours, structure_to_contours
from twinrt.errors import GeometryError, StructureError
from twinrt.geometry import Grid
from twinrt.model import Structure


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def ring_and_islands() -> np.ndarray:
    m = np.zeros((20, 24), dtype=bool)
    m[2:12, 2:12] = True      # ring: outer square ...
    m[5:9, 5:9] = False       # ... with a hole
    m[14:18, 15:21] = True    # island 1
    m[3:6, 18:22] = True      # island 2
    return m


def test_ring_and_two_islands_round_trip_exactly():
    m = ring_and_islands()
    polygons = mask_to_contours(m)
    assert len(polygons) == 4  # ring outer + hole + two islands
    assert all(p.ndim == 2 and p.shape[1] == 2 for p in polygons)
    assert np.array_equal(contours_to_mask(polygons, m.shape), m)


def test_hole_polygon_lies_inside_outer_polygon():
    polygons = mask_to_contours(ring_and_islands())
    spans = sorted((np.ptp(p[:, 0]) for p in polygons), reverse=True)
    # outer ring boundary spans 10 voxels (edges at 1.5..11.5), the hole 4 (4.5..8.5)
    assert spans[0] == pytest.approx(10.0)
    assert 4.0 in [pytest.approx(s) for s in spans]


def test_border_voxels_and_single_voxels_close():
    m = np.zeros((6, 7), dtype=bool)
    m[0, :] = True          # whole first row on the image border
    m[5, 6] = True          # a corner voxel
    m[3, 3] = True          # an isolated voxel
    polygons = mask_to_contours(m)
    assert len(polygons) == 3
    assert np.array_equal(contours_to_mask(polygons, m.shape), m)


def test_random_masks_with_diagonal_touches_round_trip_exactly():
    rng = np.random.default_rng(1)
    for _ in range(50):
        m = rng.random((17, 23)) < 0.45
        assert np.array_equal(contours_to_mask(mask_to_contours(m), m.shape), m)


def test_empty_mask_gives_no_contours():
    assert mask_to_contours(np.zeros((5, 5), bool)) == []
    assert not contours_to_mask([], (5, 5)).any()


def test_even_odd_fill_of_analytic_polygons():
    outer = np.array([[1.5, 1.5], [7.5, 1.5], [7.5, 7.5], [1.5, 7.5]])
    hole = np.array([[3.5, 3.5], [5.5, 3.5], [5.5, 5.5], [3.5, 5.5]])
    expected = np.zeros((10, 10), bool)
    expected[2:8, 2:8] = True
    assert np.array_equal(contours_to_mask([outer], (10, 10)), expected)
    expected[4:6, 4:6] = False
    assert np.array_equal(contours_to_mask([outer, hole[::-1]], (10, 10)), expected)
    # A polygon reaching outside the slice is clipped, not wrapped around.
    big = np.array([[-5.0, -5.0], [4.5, -5.0], [4.5, 2.5], [-5.0, 2.5]])
    clipped = np.zeros((10, 10), bool)
    clipped[0:3, 0:5] = True
    assert np.array_equal(contours_to_mask([big], (10, 10)), clipped)


def test_128_slice_with_dozens_of_contours_is_fast():
    m = np.zeros((128, 128), bool)
    for a in range(6):
        for b in range(6):
            m[4 + 20 * a:16 + 20 * a, 4 + 20 * b:16 + 20 * b] = True
            m[8 + 20 * a:12 + 20 * a, 8 + 20 * b:12 + 20 * b] = False  # each block is a ring
    t0 = time.perf_counter()
    polygons = mask_to_contours(m)
    back = contours_to_mask(polygons, m.shape)
    elapsed = time.perf_counter() - t0
    assert len(polygons) == 72
    assert np.array_equal(back, m)
    assert elapsed < 0.5, f"128x128 slice with 72 contours took {elapsed:.3f} s"


def sphere_structure(direction: np.ndarray) -> Structure:
    shape = (40, 48, 52)
    spacing = (1.2, 0.9, 2.5)
    grid = Grid(shape, spacing, (-30.0, 12.0, 100.0), direction)
    k, j, i = np.indices(shape)
    centre_ijk = np.array([26.0, 22.0, 19.0])
    lps = grid.index_to_lps(np.stack([i, j, k], axis=-1).astype(float))
    centre = grid.index_to_lps(centre_ijk)
    mask = np.linalg.norm(lps - centre, axis=-1) <= 20.0
    return Structure("Sphere", mask, grid)


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, 1.0, -1.0]),
                                       np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])],
                         ids=["identity", "flipped", "swapped-ij"])
def test_sphere_round_trip_through_lps_contours(direction):
    s = sphere_structure(direction)
    contours = structure_to_contours(s)
    assert contours and all(poly.shape[1] == 3 for _, poly in contours)
    # Every contour lies in the plane of its slice (constant LPS z for these axial grids).
    for k, poly in contours:
        z = s.grid.index_to_lps(np.array([0.0, 0.0, k]))[2]
        assert np.allclose(poly[:, 2], z)
    back = contours_to_structure_mask([poly for _, poly in contours], s.grid, name=s.name)
    d = dice(s.mask, back)
    print(f"sphere Dice ({direction.tolist()}): {d:.6f}")
    assert d >= 0.99
    assert np.array_equal(back, s.mask)


def test_contour_between_slices_snaps_to_nearest_slice_within_half_a_slice():
    grid = Grid((5, 10, 10), (1.0, 1.0, 3.0))
    square = np.array([[2.0, 2.0], [6.0, 2.0], [6.0, 6.0], [2.0, 6.0]])
    # z = 7.4 mm is 1.2 mm (0.4 slice) above slice 2 at z = 6 mm.
    mask = contours_to_structure_mask([np.column_stack([square, np.full(4, 7.4)])], grid)
    assert mask[2].sum() == 16 and mask.sum() == 16


def test_oblique_grid_is_rejected():
    c, s = np.cos(0.3), np.sin(0.3)
    grid = Grid((4, 8, 8), (1.0, 1.0, 1.0), direction=np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]))
    structure = Structure("Tilted", np.ones(grid.shape, bool), grid)
    with pytest.raises(GeometryError, match="oblique"):
        structure_to_contours(structure)
    with pytest.raises(GeometryError):
        contours_to_structure_mask([], grid)


def test_contour_outside_the_slices_names_the_structure():
    grid = Grid((5, 10, 10), (1.0, 1.0, 2.0))
    square = np.array([[2.0, 2.0, 50.0], [6.0, 2.0, 50.0], [6.0, 6.0, 50.0]])
    with pytest.raises(StructureError, match="Parotid_L") as info:
        contours_to_structure_mask([square], grid, name="Parotid_L")
    assert info.value.structure == "Parotid_L"
    assert "load the CT" in str(info.value)


def test_contour_entirely_outside_in_plane_names_the_structure():
    grid = Grid((5, 10, 10), (1.0, 1.0, 2.0))
    far = np.array([[200.0, 2.0, 4.0], [206.0, 2.0, 4.0], [206.0, 6.0, 4.0]])
    with pytest.raises(StructureError, match="Cord"):
        contours_to_structure_mask([far], grid, name="Cord")


def test_non_planar_contour_is_rejected():
    grid = Grid((5, 10, 10), (1.0, 1.0, 2.0))
    skew = np.array([[2.0, 2.0, 0.0], [6.0, 2.0, 4.0], [6.0, 6.0, 8.0]])
    with pytest.raises(StructureError, match="not in one image slice"):
        contours_to_structure_mask([skew], grid, name="Skew")


def test_contour_points_are_at_the_voxel_edges_in_lps_mm():
    # Independent of the inverse mapping: a block of voxels i 5..19, j 3..7 on slice 2 of a grid
    # with flipped j and k axes must be outlined at the voxel edges, in mm.
    grid = Grid((4, 12, 25), (2.0, 2.5, 3.0), (-40.0, -30.0, 10.0), np.diag([1.0, -1.0, -1.0]))
    mask = np.zeros(grid.shape, bool)
    mask[2, 3:8, 5:20] = True
    contours = structure_to_contours(Structure("Block", mask, grid))
    assert len(contours) == 1 and contours[0][0] == 2
    pts = contours[0][1]
    assert pts[:, 0].min() == pytest.approx(-40.0 + 4.5 * 2.0)
    assert pts[:, 0].max() == pytest.approx(-40.0 + 19.5 * 2.0)
    assert pts[:, 1].min() == pytest.approx(-30.0 - 7.5 * 2.5)
    assert pts[:, 1].max() == pytest.approx(-30.0 - 2.5 * 2.5)
    assert np.allclose(pts[:, 2], 10.0 - 2 * 3.0)
