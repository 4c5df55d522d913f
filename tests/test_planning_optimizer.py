"""Fluence optimiser and dose objectives on small synthetic dij matrices with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import sparse

from twinrt.errors import InvalidInputError, StructureError
from twinrt.geometry import Grid
from twinrt.model import Structure, StructureType
from twinrt.planning import optimizer as opt
from twinrt.planning.beams import Beam, BeamRays
from twinrt.planning.dij import DoseInfluence
from twinrt.planning.objectives import (GEUD, MaxDVH, MeanDose, MinDVH, SquaredDeviation, SquaredOverdose,
                                        SquaredUnderdose, objective_from_dict, objectives_from_json,
                                        objectives_to_json)
from twinrt.planning.optimizer import OptimizationResult, optimize_fluence
from twinrt.progress import CancelledError, CancelToken

ALL_KINDS = [SquaredDeviation("S", 30.0, 2.0), SquaredUnderdose("S", 35.0, 3.0), SquaredOverdose("S", 25.0, 4.0),
             MaxDVH("S", 28.0, 5.0, volume_percent=40.0), MinDVH("S", 32.0, 6.0, volume_percent=90.0),
             MeanDose("S", 20.0, 7.0), GEUD("S", 22.0, 8.0, a=6.0)]


# ---------------------------------------------------------------------- helpers
def _line_problem(n_vox: int = 40, n_bix: int = 16, sigma: float = 2.0):
    """1-D phantom: voxels on a line, bixels as Gaussian pencils along it; target in the middle,
    an organ on its right, the body everywhere. Returns (dij, structures)."""
    grid = Grid((1, 1, n_vox), (3.0, 3.0, 3.0))
    x = np.arange(n_vox, dtype=float)
    centres = np.linspace(4, n_vox - 5, n_bix)
    a = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / sigma) ** 2)
    a[a < 1e-3] = 0.0
    rays = np.stack([np.arange(n_bix) * 5.0, np.zeros(n_bix), np.zeros(n_bix)], axis=1)
    dij = DoseInfluence(sparse.csc_matrix(a.astype(np.float32)), grid, [BeamRays(Beam(0.0), rays)])
    target = np.zeros(grid.shape, bool)
    target[0, 0, 12:24] = True
    organ = np.zeros(grid.shape, bool)
    organ[0, 0, 24:34] = True
    structures = [Structure("PTV", target, grid, type=StructureType.TARGET), Structure("Organ", organ, grid),
                  Structure("BODY", np.ones(grid.shape, bool), grid, type=StructureType.EXTERNAL)]
    return dij, structures


def _lattice_problem(seed: int = 3):
    """Two beams of 6 x 6 bixels on a lattice and a random non-negative dij (100 voxels)."""
    rng = np.random.default_rng(seed)
    grid = Grid((4, 5, 5), (3.0, 3.0, 3.0))
    xs, zs = np.meshgrid(np.arange(6) * 5.0, np.arange(6) * 5.0, indexing="ij")
    rays = np.stack([xs.ravel(), np.zeros(36), zs.ravel()], axis=1)
    beams = [BeamRays(Beam(0.0), rays), BeamRays(Beam(90.0), rays)]
    a = sparse.random(100, 72, density=0.3, random_state=rng, format="csc", dtype=np.float32)
    dij = DoseInfluence(a, grid, beams)
    target = np.zeros(grid.shape, bool)
    target[1:3, 1:4, 1:4] = True
    organ = np.zeros(grid.shape, bool)
    organ[3, :, :] = True
    structures = [Structure("PTV", target, grid, type=StructureType.TARGET), Structure("Organ", organ, grid),
                  Structure("BODY", np.ones(grid.shape, bool), grid, type=StructureType.EXTERNAL)]
    return dij, structures


def _dx(dose: np.ndarray, mask: np.ndarray, percent: float) -> float:
    return float(np.percentile(dose[mask], 100 - percent))


# ---------------------------------------------------------------------- objectives
def test_pyradplan_normalisation_by_voxel_count_and_priority():
    d = np.array([48.0, 52.0, 50.0, 50.0])
    assert SquaredDeviation("T", 50, 1000).value(d) == pytest.approx(1000 * 8 / 4)
    assert SquaredOverdose("T", 50, 300).value(d) == pytest.approx(300 * 4 / 4)
    assert SquaredUnderdose("T", 50, 100).value(d) == pytest.approx(100 * 4 / 4)
    # The same relative error on a structure 100x larger costs the same.
    assert SquaredDeviation("T", 50, 1000).value(np.repeat(d, 100)) == pytest.approx(2000)
    assert MeanDose("T", 0, 2).value(d) == pytest.approx(2 * 50.0 ** 2)  # pyRadPlan MeanDose for D = 0
    assert GEUD("T", 0, 1, a=1).value(d) == pytest.approx(50.0 ** 2)  # gEUD with a = 1 is the mean


@pytest.mark.parametrize("objective", ALL_KINDS, ids=lambda o: o.kind)
def test_objective_gradient_matches_finite_differences(objective):
    rng = np.random.default_rng(1)
    d = rng.uniform(5.0, 50.0, 200)
    grad = objective.gradient(d)
    assert grad.shape == d.shape
    h = 1e-5
    # DVH quantiles are held fixed in the gradient; skip the two voxels that define the quantile
    # and any voxel within h of a window edge, where the objective has a kink.
    q = np.quantile(d, 1 - getattr(objective, "volume_percent", 50.0) / 100.0)
    near_q = np.argsort(np.abs(d - q))[:2]
    check = [i for i in range(0, 200, 7) if i not in near_q and abs(d[i] - objective.dose_gy) > 1e-3]
    for i in check:
        up, down = d.copy(), d.copy()
        up[i] += h
        down[i] -= h
        fd = (objective.value(up) - objective.value(down)) / (2 * h)
        assert grad[i] == pytest.approx(fd, rel=1e-4, abs=1e-9), i
    assert np.any(grad != 0)


def test_dvh_objectives_act_only_in_their_window():
    d = np.arange(100, dtype=float)  # 0..99 Gy
    g = MaxDVH("S", 50.0, 1.0, volume_percent=20.0).gradient(d)  # pulls 50..q(80%) down to 50
    assert np.all(g[d < 50] == 0) and np.all(g[d > 79.2] == 0) and np.all(g[(d > 50) & (d <= 79)] > 0)
    g = MinDVH("S", 50.0, 1.0, volume_percent=90.0).gradient(d)  # pushes q(10%)..50 up
    assert np.all(g[d > 50] == 0) and np.all(g[d < 9.9] == 0) and np.all(g[(d >= 10) & (d < 50)] < 0)


def test_objective_specs_from_dicts_and_json():
    specs = [{"structure": "OuterTarget", "kind": "Squared Deviation", "dose_gy": 50, "priority": 1000},
             {"structure": "Core", "kind": "squared_overdosing", "dose_gy": 25, "penalty": 300},
             {"structure": "Rectum", "kind": "max_dvh", "dose_gy": 40, "volume_percent": 30, "weight": 5},
             {"structure": "Cord", "kind": "geud", "dose_gy": 30, "a": 12}]
    objs = objectives_from_json(json.dumps(specs))
    assert [type(o) for o in objs] == [SquaredDeviation, SquaredOverdose, MaxDVH, GEUD]
    assert objs[0].weight == 1000 and objs[1].weight == 300 and objs[2].volume_percent == 30 and objs[3].a == 12
    assert objs[3].weight == 1.0
    again = objectives_from_json(objectives_to_json(objs))
    assert [o.to_dict() for o in again] == [o.to_dict() for o in objs]


@pytest.mark.parametrize("spec, words", [
    ({"structure": "X", "kind": "banana", "dose_gy": 1}, "Unknown objective kind"),
    ({"kind": "squared_overdose", "dose_gy": 1}, "structure"),
    ({"structure": "X", "kind": "squared_overdose"}, "dose_gy"),
    ({"structure": "X", "kind": "squared_overdose", "dose_gy": -1}, ">= 0 Gy"),
    ({"structure": "X", "kind": "max_dvh", "dose_gy": 1, "volume_percent": 120}, "0..100"),
    ({"structure": "X", "kind": "squared_overdose", "dose_gy": 1, "volume_percent": 5}, "unknown key"),
    ({"structure": "X", "kind": "geud", "dose_gy": 1, "a": 0.5}, ">= 1"),
    ({"structure": "X", "kind": "mean_dose", "weight": 1, "priority": 2}, "both"),
])
def test_bad_objective_specs_are_refused(spec, words):
    with pytest.raises(InvalidInputError, match=words):
        objective_from_dict(spec)


# ---------------------------------------------------------------------- optimiser internals
def _assert_gradient_matches_finite_differences(prob, w, g, h=1e-4):
    """The kernel's weight gradient ``g`` at ``w`` against central differences of its value."""
    for j in range(w.size):
        e = np.zeros_like(w)
        e[j] = h
        fd = (prob.evaluate(w + e)[0] - prob.evaluate(w - e)[0]) / (2 * h)
        assert g[j] == pytest.approx(fd, rel=2e-4, abs=1e-6), j


def test_kernel_value_and_gradient_match_objectives_and_finite_differences():
    dij, structures = _line_problem()
    objectives = [SquaredDeviation("PTV", 50, 100), SquaredUnderdose("PTV", 49, 50), MinDVH("PTV", 49, 30, 95),
                  SquaredOverdose("Organ", 10, 20), MaxDVH("Organ", 15, 10, 30), MeanDose("Organ", 5, 3),
                  GEUD("Organ", 8, 2, a=4), SquaredOverdose("BODY", 30, 5)]
    voxels = opt._structure_voxels(dij, structures, objectives, True)
    prob = opt._Problem(dij, objectives, voxels, 52.0, None)
    prob.set_active(np.ones(prob.n_rows, bool))
    w = np.random.default_rng(0).uniform(5, 40, dij.n_bixels)
    f, g = prob.evaluate(w)
    full = prob.full_dose(w)
    assert f == pytest.approx(sum(prob.objective_values(full)) + prob.penalty_value(full), rel=1e-9)
    _assert_gradient_matches_finite_differences(prob, w, g)


def test_csr_of_selected_rows_equals_scipy():
    a = sparse.random(300, 40, density=0.2, random_state=5, format="csc", dtype=np.float32)
    rowmap = np.full(300, -1, np.int64)
    rows = np.arange(3, 300, 4)
    rowmap[rows] = np.arange(rows.size)
    ptr, cols, vals = opt._csc_rows_to_csr(a.indptr.astype(np.int64), a.indices, a.data, rowmap, rows.size,
                                           np.zeros(0, np.uint16), 3)
    ref = a.tocsr()[rows]
    ref.sort_indices()
    assert np.array_equal(ptr, ref.indptr) and np.array_equal(cols, ref.indices) and np.array_equal(vals, ref.data)
    w = np.linspace(0, 1, 40)
    assert np.allclose(opt._csc_matvec(a.indptr.astype(np.int64), a.indices, a.data, w, 300, 7), a @ w)


def test_neighbour_pairs_on_the_bixel_lattice():
    dij, _ = _lattice_problem()
    pairs = opt._neighbour_pairs(dij)
    # Per beam a 6 x 6 lattice has 2 * 6 * 5 = 60 neighbour pairs; no pair crosses beams.
    assert pairs.shape == (120, 2)
    assert np.all((pairs < 36).all(axis=1) | (pairs >= 36).all(axis=1))
    rays = np.concatenate([b.ray_bev_mm for b in dij.beams])
    assert np.allclose(np.linalg.norm(rays[pairs[:, 0]] - rays[pairs[:, 1]], axis=1), 5.0)


# ---------------------------------------------------------------------- optimiser
def test_two_bixels_known_optimum():
    # Bixel 0 hits only the target, bixel 1 the target and the organ (1 Gy per unit weight each).
    grid = Grid((1, 1, 2), (3.0, 3.0, 3.0))
    a = sparse.csc_matrix(np.array([[1.0, 1.0], [0.0, 1.0]], np.float32))
    rays = np.array([[0.0, 0, 0], [5.0, 0, 0]])
    dij = DoseInfluence(a, grid, [BeamRays(Beam(0.0), rays)])
    structures = [Structure("PTV", np.array([[[True, False]]]), grid, type=StructureType.TARGET),
                  Structure("Organ", np.array([[[False, True]]]), grid)]
    res = optimize_fluence(dij, structures, [SquaredDeviation("PTV", 50, 1), SquaredOverdose("Organ", 0, 1)],
                           max_iter=100)
    assert isinstance(res, OptimizationResult)
    assert res.weights == pytest.approx([50.0, 0.0], abs=1e-4)
    assert res.dose_gy.shape == grid.shape and res.dose_gy[0, 0, 0] == pytest.approx(50.0, abs=1e-3)
    assert res.total_objective == pytest.approx(0.0, abs=1e-6)


def test_line_problem_converges_with_non_negative_weights_and_reports():
    dij, structures = _line_problem()
    calls = []
    res = optimize_fluence(dij, structures, [SquaredDeviation("PTV", 50, 1000), SquaredOverdose("Organ", 5, 300),
                                             SquaredOverdose("BODY", 30, 100)], max_iter=300,
                           progress=lambda f, t: calls.append((f, t)))
    assert res.weights.dtype == np.float64 and np.all(res.weights >= 0)
    assert np.any(res.weights == 0)  # the organ-side bixels are switched off at the bound
    target = structures[0].mask
    assert _dx(res.dose_gy, target, 50) == pytest.approx(50, abs=1.5)
    assert len(res.objective_history) == res.iterations > 0
    assert res.objective_history[-1] <= res.objective_history[0]
    assert len(res.objective_values) == 3 and res.total_objective == pytest.approx(sum(res.objective_values))
    assert any("Iteration 1/" in t for _, t in calls) and calls[-1][0] == 1.0
    # Warm start from the result: already at the optimum.
    again = optimize_fluence(dij, structures, [SquaredDeviation("PTV", 50, 1000), SquaredOverdose("Organ", 5, 300),
                                               SquaredOverdose("BODY", 30, 100)], max_iter=300,
                             initial_weights=res.weights)
    assert again.total_objective <= res.total_objective * (1 + 1e-6)


def test_max_dvh_objective_pushes_dx_below_the_limit():
    dij, structures = _line_problem()
    organ = structures[1].mask
    base = [SquaredDeviation("PTV", 50, 100)]
    free = optimize_fluence(dij, structures, base, max_iter=200)
    d30_free = _dx(free.dose_gy, organ, 30)
    limit = 0.5 * d30_free
    res = optimize_fluence(dij, structures, base + [MaxDVH("Organ", limit, 1e4, volume_percent=30)], max_iter=300)
    assert d30_free > limit + 20
    # A soft objective on a 10-voxel organ next to the target: D30 ends within 1 Gy of the limit.
    assert _dx(res.dose_gy, organ, 30) <= limit + 1.0


def test_smoothness_reduces_weight_variation():
    dij, structures = _lattice_problem()
    objectives = [SquaredDeviation("PTV", 50, 1000), SquaredOverdose("Organ", 10, 300)]
    pairs = opt._neighbour_pairs(dij)

    def roughness(w: np.ndarray) -> float:
        return float(np.sum((w[pairs[:, 0]] - w[pairs[:, 1]]) ** 2))

    rough = optimize_fluence(dij, structures, objectives, max_iter=200)
    smooth = optimize_fluence(dij, structures, objectives, max_iter=200, smoothness_weight=1000.0)
    assert smooth.smoothness_value > 0 and rough.smoothness_value == 0
    assert roughness(smooth.weights) < 0.5 * roughness(rough.weights)


def test_max_dose_penalty_limits_the_hot_spot():
    dij, structures = _line_problem()
    # Only underdose on the target and an organ at 0 Gy beside it: the edge bixels run hot.
    objectives = [SquaredUnderdose("PTV", 50, 1000), SquaredOverdose("Organ", 0, 300)]
    free = optimize_fluence(dij, structures, objectives, max_iter=200)
    res = optimize_fluence(dij, structures, objectives, max_iter=300, max_dose_gy=52.0)
    assert free.dose_gy.max() > 60.0
    assert res.dose_gy.max() <= 52.0 * 1.005 + 1e-6 and res.max_dose_excess_gy <= 0.26


def test_active_set_gives_the_same_optimum_as_all_voxels(monkeypatch):
    dij, structures = _line_problem()
    objectives = [SquaredDeviation("PTV", 50, 1000), SquaredOverdose("BODY", 20, 100)]
    res = optimize_fluence(dij, structures, objectives, max_iter=300)
    assert res.n_voxels_active < res.n_voxels  # far-below-threshold body voxels were left out
    monkeypatch.setattr(opt, "ACTIVE_FRACTION", 0.0)
    full = optimize_fluence(dij, structures, objectives, max_iter=300)
    assert full.n_voxels_active == full.n_voxels
    assert res.total_objective == pytest.approx(full.total_objective, rel=1e-3)


def test_same_inputs_give_bit_identical_weights():
    dij, structures = _lattice_problem()
    objectives = [SquaredDeviation("PTV", 50, 1000), MaxDVH("Organ", 20, 50, 20), SquaredOverdose("BODY", 30, 100)]
    a = optimize_fluence(dij, structures, objectives, max_iter=50, smoothness_weight=10.0, seed=7)
    b = optimize_fluence(dij, structures, objectives, max_iter=50, smoothness_weight=10.0, seed=7)
    assert np.array_equal(a.weights, b.weights) and np.array_equal(a.dose_gy, b.dose_gy)
    assert np.array_equal(a.objective_history, b.objective_history)


def test_cancel_raises_cancelled_error():
    dij, structures = _line_problem()
    token = CancelToken()

    def progress(fraction: float, text: str) -> None:
        if text.startswith("Iteration 2/"):
            token.cancel()

    with pytest.raises(CancelledError):
        optimize_fluence(dij, structures, [SquaredDeviation("PTV", 50, 1)], max_iter=100, progress=progress,
                         cancel=token)


def test_overlap_gives_target_voxels_to_the_target_only():
    dij, structures = _line_problem()
    objectives = [SquaredDeviation("PTV", 50, 1), SquaredOverdose("BODY", 30, 1)]
    assert opt._structure_voxels(dij, structures[:1] + structures[2:], objectives, True)["BODY"].size == 28
    voxels = opt._structure_voxels(dij, structures, objectives, True)
    # BODY (external) loses the target's 12 and the organ's 10 voxels; the organ keeps its own.
    assert voxels["BODY"].size == 40 - 12 - 10 and np.intersect1d(voxels["BODY"], voxels["PTV"]).size == 0
    assert opt._structure_voxels(dij, structures, objectives, False)["BODY"].size == 40


# ---------------------------------------------------------------------- bad input
def test_objective_on_missing_structure_is_named():
    dij, structures = _line_problem()
    with pytest.raises(StructureError, match="'Rectum'") as info:
        optimize_fluence(dij, structures, [SquaredDeviation("PTV", 50, 1), SquaredOverdose("Rectum", 20, 1)])
    assert info.value.structure == "Rectum"


def test_objective_on_empty_structure_is_named():
    dij, structures = _line_problem()
    structures.append(Structure("Empty", np.zeros(dij.dose_grid.shape, bool), dij.dose_grid))
    with pytest.raises(StructureError, match="'Empty' has no voxel"):
        optimize_fluence(dij, structures, [SquaredDeviation("PTV", 50, 1), SquaredOverdose("Empty", 20, 1)])


def test_no_target_objective_asks_for_one():
    dij, structures = _line_problem()
    with pytest.raises(InvalidInputError, match="add a target objective"):
        optimize_fluence(dij, structures, [SquaredOverdose("Organ", 20, 1)])
    with pytest.raises(InvalidInputError, match="add at least one objective"):
        optimize_fluence(dij, structures, [])


@pytest.mark.parametrize("kwargs, words", [
    ({"max_iter": 0}, "max_iter"),
    ({"smoothness_weight": -1.0}, "smoothness_weight"),
    ({"max_dose_gy": 0.0}, "max_dose_gy"),
    ({"initial_weights": np.ones(3)}, "initial_weights"),
    ({"initial_weights": -np.ones(16)}, "initial_weights"),
])
def test_bad_parameters_are_refused(kwargs, words):
    dij, structures = _line_problem()
    with pytest.raises(InvalidInputError, match=words):
        optimize_fluence(dij, structures, [SquaredDeviation("PTV", 50, 1)], **kwargs)


# ---------------------------------------------------------------------- dose mimicking
def _mimic(structure, weight, side="both", uncertainty=""):
    return objective_from_dict({"structure": structure, "kind": "dose_mimicking", "reference": "predicted",
                                "side": side, "weight": weight, **({"uncertainty": uncertainty} if uncertainty
                                                                   else {})})


@pytest.mark.parametrize("side", ["upper", "lower", "both"])
def test_dose_mimicking_gradient_and_window(side):
    rng = np.random.default_rng(2)
    d, ref, std = rng.uniform(5, 50, 200), rng.uniform(5, 50, 200), rng.uniform(0, 4, 200)
    o = _mimic("S", 3.0, side, "predicted_std")
    o.bind(ref, std)
    grad = o.gradient(d)
    dev = d - ref
    inside = {"upper": dev > 0, "lower": dev < 0, "both": np.ones(200, bool)}[side]
    assert np.all(grad[~inside] == 0) and np.all(grad[inside] != 0)
    h = 1e-5
    for i in range(0, 200, 9):
        up, down = d.copy(), d.copy()
        up[i] += h
        down[i] -= h
        assert grad[i] == pytest.approx((o.value(up) - o.value(down)) / (2 * h), rel=1e-4, abs=1e-9)
    # Uncertain voxels pull less: s = 1 / (1 + (σ/σ0)²).
    o2 = _mimic("S", 3.0, side)
    o2.bind(ref)
    assert np.all(np.abs(grad) <= np.abs(o2.gradient(d)) + 1e-12)
    assert o.to_dict()["uncertainty"] == "predicted_std"
    assert objective_from_dict(o.to_dict()).to_dict() == o.to_dict()


def test_dose_mimicking_in_the_kernel_matches_the_objective():
    dij, structures = _line_problem()
    w_true = np.random.default_rng(5).uniform(0, 3, dij.n_bixels)
    predicted = dij.matrix @ w_true
    std = np.linspace(0.0, 3.0, predicted.size)
    objectives = [SquaredUnderdose("PTV", 40, 50), _mimic("PTV", 100, "lower"),
                  _mimic("Organ", 30, "upper", "predicted_std"), _mimic("BODY", 5, "both")]
    voxels = opt._structure_voxels(dij, structures, objectives, True)
    prob = opt._Problem(dij, objectives, voxels, None, None, {"predicted": predicted, "predicted_std": std})
    prob.set_active(np.ones(prob.n_rows, bool))
    w = np.random.default_rng(0).uniform(0, 4, dij.n_bixels)
    f, g = prob.evaluate(w)
    assert f == pytest.approx(sum(prob.objective_values(prob.full_dose(w))), rel=1e-9)
    _assert_gradient_matches_finite_differences(prob, w, g)


def test_dose_mimicking_reproduces_an_achievable_reference_dose():
    dij, structures = _line_problem()
    w_true = np.random.default_rng(7).uniform(0.5, 3, dij.n_bixels)
    predicted = np.asarray(dij.matrix @ w_true, dtype=float)
    rx = float(predicted[12:24].mean())
    objectives = [SquaredUnderdose("PTV", 0.5 * rx, 1), _mimic("PTV", 1000), _mimic("Organ", 1000),
                  _mimic("BODY", 1000)]
    res = optimize_fluence(dij, structures, objectives, max_iter=300, reference_doses={"predicted": predicted})
    err = np.abs(res.dose_gy.reshape(-1) - predicted)
    assert err.max() < 0.02 * predicted.max()
    # Without the reference the objective cannot be evaluated: the message names what is missing.
    with pytest.raises(InvalidInputError, match="'predicted'"):
        optimize_fluence(dij, structures, objectives, max_iter=5)
    with pytest.raises(InvalidInputError, match="dose grid"):
        optimize_fluence(dij, structures, objectives, max_iter=5, reference_doses={"predicted": predicted[:-1]})
