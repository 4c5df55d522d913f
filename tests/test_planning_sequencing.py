"""Leaf sequencing (twinrt.planning.sequencing, twinrt.planning.plan.sequence_plan) on hand-made fluence maps."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

from twinrt.errors import InvalidInputError
from twinrt.geometry import Grid
from twinrt.model import Prescription
from twinrt.planning.beams import Beam, BeamRays
from twinrt.planning.dij import DoseInfluence
from twinrt.planning.plan import sequence_plan, split_weights
from twinrt.planning.sequencing import (Segment, fluence_map, leaf_boundaries, quantise, segments_to_weights,
                                        sequence_beam, sequencing_loss, sweep_apertures)

WIDTH = 5.0


def lattice_rays(n_x: int = 9, n_z: int = 7, gantry: float = 0.0, keep=None) -> BeamRays:
    """Rays on a centred bixel lattice (matRad-like: bixel centres at multiples of the width)."""
    xs = (np.arange(n_x) - n_x // 2) * WIDTH
    zs = (np.arange(n_z) - n_z // 2) * WIDTH
    x, z = np.meshgrid(xs, zs, indexing="ij")  # sorted by x then z, as BeamRays documents
    pos = np.stack([x.ravel(), np.zeros(x.size), z.ravel()], axis=1)
    if keep is not None:
        pos = pos[keep(pos[:, 0], pos[:, 2])]
    return BeamRays(Beam(gantry, bixel_width_mm=WIDTH), pos)


def test_fluence_map_places_rays_on_the_lattice():
    rays = lattice_rays(keep=lambda x, z: x**2 + z**2 <= 15.0**2)
    w = np.arange(rays.n_rays, dtype=float) + 1
    fm = fluence_map(rays, w)
    assert fm.values.shape == (7, 7)  # rows along z_bev, columns along x_bev
    np.testing.assert_array_equal(fm.ray_values, w)
    np.testing.assert_allclose(fm.x_mm, np.arange(-15, 16, 5))
    assert fm.values[0, 0] == 0  # a lattice point outside the circle holds no fluence
    # A ray at (x, z) sits at row z, column x.
    i = int(np.argmax(w))
    x, z = rays.ray_bev_mm[i, 0], rays.ray_bev_mm[i, 2]
    assert fm.values[list(fm.z_mm).index(z), list(fm.x_mm).index(x)] == w[i]


def test_uniform_field_is_one_segment_equal_to_the_field():
    rays = lattice_rays()
    segs = sequence_beam(fluence_map(rays, np.full(rays.n_rays, 2.0)), levels=10, mu_per_unit_weight=50.0)
    assert len(segs) == 1
    seg = segs[0]
    assert seg.mu == pytest.approx(100.0)
    assert seg.left_mm == (-22.5,) * 7 and seg.right_mm == (22.5,) * 7
    np.testing.assert_allclose(seg.leaf_boundaries_mm, np.arange(-17.5, 17.6, 5.0))
    assert seg.area_mm2 == pytest.approx(45.0 * 35.0)
    np.testing.assert_allclose(segments_to_weights(segs, rays, 50.0), 2.0, rtol=1e-12)


def test_uniform_irregular_field_is_one_conformal_segment():
    rays = lattice_rays(keep=lambda x, z: np.abs(x) + np.abs(z) <= 15.0)  # a diamond
    segs = sequence_beam(fluence_map(rays, np.ones(rays.n_rays)), levels=5)
    assert len(segs) == 1
    # Row z = 0 spans x -15..15 (edges -17.5..17.5); rows z = +-15 only the centre bixel.
    assert segs[0].left_mm == (-2.5, -7.5, -12.5, -17.5, -12.5, -7.5, -2.5)
    assert segs[0].right_mm == (2.5, 7.5, 12.5, 17.5, 12.5, 7.5, 2.5)
    np.testing.assert_allclose(segments_to_weights(segs, rays), 1.0, rtol=1e-12)


@pytest.mark.parametrize("levels", [1, 3, 5, 9])
@pytest.mark.parametrize("direction", [1, -1])
def test_ramp_gives_one_segment_per_level(levels, direction):
    # A ramp 1..L along x (the same in every leaf pair): the sweep needs L unit segments, the
    # trailing leaf (rising ramp) or leading leaf (falling ramp) stepping one bixel per segment.
    rays = lattice_rays(n_x=levels, n_z=3)
    col = np.rint(rays.ray_bev_mm[:, 0] / WIDTH) + levels // 2
    w = (col + 1) if direction > 0 else (levels - col)
    segs = sequence_beam(fluence_map(rays, w), levels=levels)
    assert len(segs) == levels
    assert all(s.mu == pytest.approx(1.0) for s in segs)
    np.testing.assert_allclose(segments_to_weights(segs, rays), w, rtol=1e-12)
    loss = sequencing_loss(w, segments_to_weights(segs, rays), segs)
    assert loss["relative_fluence_error"] < 1e-12 and loss["n_segments"] == levels
    assert loss["total_mu"] == pytest.approx(levels)
    assert loss["modulation_factor"] == pytest.approx(2 * levels / (levels + 1))
    moving = [s.left_mm[0] for s in segs] if direction > 0 else [s.right_mm[0] for s in segs]
    assert np.allclose(np.diff(moving), WIDTH)


def test_sweep_is_unidirectional_mu_optimal_and_exact():
    rng = np.random.default_rng(7)
    for _ in range(20):
        intensity = rng.integers(0, 6, size=(6, 11))
        apertures = sweep_apertures(intensity)
        rebuilt = np.zeros_like(intensity)
        for first, last, count in apertures:
            for row in range(intensity.shape[0]):
                if first[row] >= 0:
                    rebuilt[row, first[row]:last[row] + 1] += count
        np.testing.assert_array_equal(rebuilt, intensity)
        # Total levels = the largest row sum of positive steps: the unidirectional optimum.
        rises = np.clip(np.diff(intensity, axis=1, prepend=0), 0, None).sum(axis=1)
        assert sum(c for _, _, c in apertures) == rises.max()
        # Leaves only ever move towards +x while a row is being swept.
        for row in range(intensity.shape[0]):
            firsts = [f[row] for f, _, _ in apertures if f[row] >= 0]
            lasts = [la[row] for _, la, _ in apertures if la[row] >= 0]
            assert firsts == sorted(firsts) and lasts == sorted(lasts)


def test_delivered_equals_quantised_ideal_without_min_mu():
    rays = lattice_rays(keep=lambda x, z: x**2 + 2 * z**2 <= 20.0**2)
    w = np.random.default_rng(3).random(rays.n_rays) * 4
    levels, mu_per_weight = 7, 12.5
    segs = sequence_beam(fluence_map(rays, w), levels=levels, mu_per_unit_weight=mu_per_weight)
    q, unit = quantise(w * mu_per_weight, levels)
    np.testing.assert_allclose(segments_to_weights(segs, rays, mu_per_weight), q * unit / mu_per_weight,
                               rtol=1e-10, atol=1e-12)
    assert sum(s.mu for s in segs) == pytest.approx(unit * sweep_total(q, fluence_map(rays, w)))
    # Quantisation error is at most half a level.
    delivered = segments_to_weights(segs, rays, mu_per_weight)
    assert np.max(np.abs(delivered - w)) <= 0.5 * unit / mu_per_weight + 1e-12


def sweep_total(q_rays: np.ndarray, fm) -> int:
    """Levels the sweep needs for the quantised ray values ``q_rays`` placed on ``fm``'s lattice."""
    grid = np.zeros(fm.values.shape, dtype=np.int64)
    grid[fm.ray_rows, fm.ray_cols] = q_rays
    return int(np.clip(np.diff(grid, axis=1, prepend=0), 0, None).sum(axis=1).max())


def test_min_segment_mu_coarsens_levels_and_holds():
    rays = lattice_rays()
    w = np.random.default_rng(5).random(rays.n_rays)
    w /= w.max()
    fine = sequence_beam(fluence_map(rays, w), levels=20, mu_per_unit_weight=20.0)
    assert min(s.mu for s in fine) == pytest.approx(1.0)  # one level = 20 MU / 20
    coarse = sequence_beam(fluence_map(rays, w), levels=20, mu_per_unit_weight=20.0, min_segment_mu=4.0)
    assert min(s.mu for s in coarse) >= 4.0 - 1e-12
    assert len(coarse) < len(fine)
    # Every segment is a whole number of 4 MU levels, so the delivered fluence is in 4 MU steps.
    delivered_mu = segments_to_weights(coarse, rays, 20.0) * 20.0
    np.testing.assert_allclose(delivered_mu / 4.0, np.rint(delivered_mu / 4.0), atol=1e-9)


def test_beam_below_half_min_mu_is_not_delivered():
    rays = lattice_rays(n_x=3, n_z=3)
    assert sequence_beam(fluence_map(rays, np.full(9, 0.4)), min_segment_mu=1.0) == []
    assert sequence_beam(fluence_map(rays, np.zeros(9))) == []
    one = sequence_beam(fluence_map(rays, np.full(9, 0.6)), min_segment_mu=1.0)
    assert len(one) == 1 and one[0].mu == pytest.approx(1.0)


def test_leaf_width_rebinning():
    # Fluence constant over pairs of bixel rows: 10 mm leaves deliver it exactly.
    rays = lattice_rays(n_x=5, n_z=4)
    z = rays.ray_bev_mm[:, 2]
    x = rays.ray_bev_mm[:, 0]
    w = np.where(z < 0, 1.0, 3.0) + (x > 0)
    segs = sequence_beam(fluence_map(rays, w), levels=4, leaf_width_mm=10.0)
    assert segs[0].n_pairs == 2
    np.testing.assert_allclose(segs[0].leaf_boundaries_mm, [-12.5, -2.5, 7.5])
    np.testing.assert_allclose(segments_to_weights(segs, rays), w, rtol=1e-12)
    # 2.5 mm leaves: two pairs per bixel row moving together, still exact.
    fine = sequence_beam(fluence_map(rays, w), levels=4, leaf_width_mm=2.5)
    assert fine[0].n_pairs == 8
    np.testing.assert_allclose(segments_to_weights(fine, rays), w, rtol=1e-12)
    # 10 mm leaves over rows that differ deliver the band average.
    w2 = np.where(np.isclose(z, -10.0) | np.isclose(z, 0.0), 2.0, 4.0)
    avg = sequence_beam(fluence_map(rays, w2), levels=3, leaf_width_mm=10.0)
    np.testing.assert_allclose(segments_to_weights(avg, rays), 3.0, rtol=1e-12)


def test_leaf_origin_of_a_real_mlc():
    rays = lattice_rays(n_x=3, n_z=3)  # rows span z -7.5..7.5
    bounds = leaf_boundaries(fluence_map(rays, np.ones(9)), 5.0, leaf_origin_mm=0.0)
    np.testing.assert_allclose(bounds, [-10, -5, 0, 5, 10])
    segs = sequence_beam(fluence_map(rays, np.ones(9)), levels=2, leaf_origin_mm=0.0)
    # The outer pairs only half cover bixel rows: they get half the fluence, rounded to one level.
    delivered = segments_to_weights(segs, rays)
    assert delivered.min() >= 0.5 and delivered.max() == pytest.approx(1.0)


def test_segments_refuse_bad_leaves_and_inputs():
    with pytest.raises(InvalidInputError, match="collide"):
        Segment((0.0, 5.0), (3.0,), (1.0,), 1.0)
    with pytest.raises(InvalidInputError, match="boundaries"):
        Segment((0.0, 5.0, 10.0), (0.0,), (1.0,), 1.0)
    with pytest.raises(InvalidInputError, match="MU"):
        Segment((0.0, 5.0), (0.0,), (1.0,), -1.0)
    rays = lattice_rays(n_x=3, n_z=3)
    with pytest.raises(InvalidInputError, match="weights"):
        fluence_map(rays, np.ones(4))
    with pytest.raises(InvalidInputError, match=">= 0"):
        fluence_map(rays, -np.ones(9))
    off = BeamRays(rays.beam, rays.ray_bev_mm + np.array([[0.0, 0.0, 0.0]] * 8 + [[1.3, 0.0, 0.0]]))
    with pytest.raises(InvalidInputError, match="lattice"):
        fluence_map(off, np.ones(9))
    with pytest.raises(InvalidInputError, match="levels"):
        sequence_beam(fluence_map(rays, np.ones(9)), levels=0)
    with pytest.raises(InvalidInputError, match="Leaf width"):
        sequence_beam(fluence_map(rays, np.ones(9)), leaf_width_mm=0)


def test_sequencing_loss_figures():
    loss = sequencing_loss(np.array([1.0, 2.0, 2.0]), np.array([1.0, 2.0, 4.0]))
    assert loss["relative_fluence_error"] == pytest.approx(2.0 / 3.0)
    assert loss["max_fluence_error"] == pytest.approx(1.0)
    with pytest.raises(InvalidInputError):
        sequencing_loss(np.ones(3), np.ones(4))


def synthetic_dij(beams: list[BeamRays], seed: int = 0) -> DoseInfluence:
    grid = Grid((4, 5, 6), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0))
    n_vox = int(np.prod(grid.shape))
    n_bix = sum(b.n_rays for b in beams)
    matrix = scipy.sparse.random(n_vox, n_bix, density=0.3, random_state=seed, format="csc", dtype=np.float32)
    return DoseInfluence(matrix, grid, beams)


def test_sequence_plan_recomputes_dose_and_reports_loss():
    beams = [lattice_rays(gantry=g) for g in (0.0, 120.0, 240.0)]
    rng = np.random.default_rng(11)
    # Already quantised fluence (multiples of max/8) is delivered exactly: zero dose loss.
    per_beam = [rng.integers(0, 9, b.n_rays).astype(float) / 8 * 3 for b in beams]
    for w in per_beam:
        w[0] = 3.0
    weights = np.concatenate(per_beam)
    dij = synthetic_dij(beams)
    rx = [Prescription("PTV", 60.0, 30)]
    exact = sequence_plan(beams, weights, rx, mu_per_unit_weight=300.0, levels=8, dij=dij)
    assert exact.report["relative_fluence_error"] < 1e-12 and exact.report["relative_dose_error"] < 1e-6
    np.testing.assert_allclose(exact.delivered_dose_gy, dij.dose(exact.delivered_weights))
    # MU per fraction: weight 3 at 300 MU per weight over 30 fractions is 30 MU.
    assert [len(b.segments) for b in exact.plan.beams] == [r["n_segments"] for r in exact.report["beams"]]
    assert exact.plan.fractions == 30 and exact.plan.prescriptions == rx
    for b, w in zip(exact.plan.beams, per_beam):
        assert max(s.mu for s in b.segments) <= 30.0 + 1e-9
        assert b.meterset_mu == pytest.approx(exact.report["beams"][exact.plan.beams.index(b)]["total_mu"])
    # Unquantised fluence: a loss is reported and it shrinks with more levels.
    smooth = rng.random(weights.size)
    coarse = sequence_plan(beams, smooth, rx, mu_per_unit_weight=300.0, levels=3, dij=dij)
    fine = sequence_plan(beams, smooth, rx, mu_per_unit_weight=300.0, levels=30, dij=dij)
    assert 0 < fine.report["relative_fluence_error"] < coarse.report["relative_fluence_error"]
    assert 0 < fine.report["relative_dose_error"] < coarse.report["relative_dose_error"]
    assert fine.report["n_segments"] > coarse.report["n_segments"]
    assert coarse.report["max_dose_difference_gy"] > 0


def test_sequence_plan_leaves_out_empty_beams():
    beams = [lattice_rays(n_x=3, n_z=3, gantry=g) for g in (0.0, 180.0)]
    weights = np.concatenate([np.ones(9), np.zeros(9)])
    result = sequence_plan(beams, weights, [Prescription("PTV", 2.0, 1)], mu_per_unit_weight=100.0,
                           names=["A", "B"])
    assert [b.name for b in result.plan.beams] == ["A"]
    assert [r["delivered"] for r in result.report["beams"]] == [True, False]
    assert result.plan.beams[0].meterset_mu == pytest.approx(100.0)
    with pytest.raises(InvalidInputError, match="bixels"):
        split_weights(np.ones(5), beams)
