"""Analytic checks of twinrt.dvh: phantoms whose DVH and metrics are known exactly."""

from __future__ import annotations

import time

import numpy as np
import pytest

from twinrt.data import load_openkbp, openkbp_patients, shared_data_dir
from twinrt.dvh import (DVH, conformity_indices, cumulative_dvh, differential_dvh, dose_at_volume_cc,
                        dose_at_volume_percent, dvh_metrics, homogeneity_index, structure_dvh,
                        volume_at_dose)
from twinrt.errors import DoseError, GeometryError, StructureError
from twinrt.geometry import Grid
from twinrt.model import Case, Dose, Image, Prescription, Structure, StructureType
from twinrt.progress import CancelledError, CancelToken

VOXEL_CC = 0.008  # 2 mm voxels


def _gradient_box(ni: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Dose = i * 0.1 Gy along i over a 4 x 5 x ni box: each dose level has 20 voxels."""
    dose = np.broadcast_to(np.arange(ni, dtype=np.float32) * 0.1, (4, 5, ni)).copy()
    return dose, np.ones_like(dose, dtype=bool)


def test_uniform_cube_gives_step_dvh():
    dose = np.zeros((20, 20, 20), np.float32)
    mask = np.zeros_like(dose, bool)
    mask[5:15, 5:15, 5:15] = True
    dose[mask] = 2.0
    dvh = cumulative_dvh(dose, mask, VOXEL_CC, bin_width_gy=0.01, name="cube")
    assert isinstance(dvh, DVH) and dvh.structure == "cube"
    assert dvh.total_volume_cc == pytest.approx(1000 * VOXEL_CC)
    below = dvh.bin_edges_gy <= 2.0 + 1e-9
    assert np.allclose(dvh.cumulative_percent[below], 100.0)
    assert np.all(dvh.cumulative_percent[~below] == 0.0) and (~below).sum() >= 1
    assert dvh.mean_gy == dvh.max_gy == dvh.min_gy == pytest.approx(2.0)
    assert homogeneity_index(dvh) == 0.0
    # A float32 dose of 2 Gy counts as 2 Gy even when stored one ulp low.
    dose[mask] = np.nextafter(np.float32(2.0), np.float32(0))
    assert volume_at_dose(cumulative_dvh(dose, mask, VOXEL_CC), 2.0, percent=True) == pytest.approx(100.0)


def test_linear_gradient_metrics_are_exact():
    dose, mask = _gradient_box(100)  # 2000 voxels, doses 0.0 .. 9.9 Gy
    dvh = cumulative_dvh(dose, mask, VOXEL_CC)
    n = mask.sum()
    assert dvh.mean_gy == pytest.approx(4.95, abs=1e-6)
    assert dvh.max_gy == pytest.approx(9.9, abs=1e-6) and dvh.min_gy == 0.0
    # D_x%: the hottest x% is x columns of 20 voxels: the coolest of them is at i = 100 - x.
    for x in (2, 5, 50, 95, 98):
        assert dose_at_volume_percent(dvh, x) == pytest.approx((100 - x) * 0.1, abs=1e-6)
    # A volume between two columns rounds up to the next column (minimum dose of the hottest x%).
    assert dose_at_volume_percent(dvh, 2.5) == pytest.approx(9.7, abs=1e-6)
    assert dose_at_volume_percent(dvh, 0) == pytest.approx(9.9, abs=1e-6)
    assert dose_at_volume_percent(dvh, 100) == 0.0
    assert np.allclose(dose_at_volume_percent(dvh, [2, 98]), [9.8, 0.2], atol=1e-6)
    # V_d: columns with i * 0.1 >= d.
    assert volume_at_dose(dvh, 3.0, percent=True) == pytest.approx(70.0)
    assert volume_at_dose(dvh, 3.0) == pytest.approx(70 * 20 * VOXEL_CC)
    assert volume_at_dose(dvh, 3.05, percent=True) == pytest.approx(69.0)
    assert volume_at_dose(dvh, 10.0) == 0.0
    assert volume_at_dose(dvh, 0.0, percent=True) == pytest.approx(100.0)
    # HI (ICRU 83) = (D2 - D98) / D50 = (9.8 - 0.2) / 5.0
    assert dvh.homogeneity_index() == pytest.approx(9.6 / 5.0)
    # The binned curve agrees with the exact V_d at every edge.
    edges = dvh.bin_edges_gy
    assert np.allclose(dvh.cumulative_cc, [volume_at_dose(dvh, e) for e in edges])
    assert dvh.cumulative_percent[0] == 100.0 and dvh.cumulative_cc[-1] == 0.0
    assert n == dvh.n_voxels


def test_d01cc_on_known_voxel_count():
    # 0.03 cc voxels: 0.1 cc = 3.33 voxels, rounded up to the 4 hottest voxels.
    dose = np.arange(1000, dtype=np.float32).reshape(10, 10, 10) * 0.01
    mask = np.ones_like(dose, bool)
    dvh = cumulative_dvh(dose, mask, 0.03)
    assert dose_at_volume_cc(dvh, 0.1) == pytest.approx(9.96, abs=1e-6)  # 4th hottest of 9.99..
    assert dose_at_volume_cc(dvh, 0.09) == pytest.approx(9.97, abs=1e-6)  # exactly 3 voxels
    assert dose_at_volume_cc(dvh, 2.0) == pytest.approx(9.33, abs=1e-6)  # ceil(66.7) = 67th hottest
    assert dose_at_volume_cc(dvh, 1e6) == 0.0  # more than the structure: the minimum


def test_differential_sums_to_total_volume():
    rng = np.random.default_rng(1)
    dose = rng.uniform(0, 70, (30, 30, 30)).astype(np.float32)
    mask = rng.random(dose.shape) < 0.3
    edges, diff = differential_dvh(dose, mask, VOXEL_CC, bin_width_gy=0.1)
    assert edges.size == diff.size + 1 and np.all(diff >= 0)
    assert diff.sum() == pytest.approx(mask.sum() * VOXEL_CC)
    dvh = cumulative_dvh(dose, mask, VOXEL_CC, bin_width_gy=0.1, max_dose_gy=100.0)
    assert dvh.bin_edges_gy[-1] >= 100.0 - 1e-9
    # Metrics do not depend on the bin width.
    fine = cumulative_dvh(dose, mask, VOXEL_CC, bin_width_gy=0.001)
    assert fine.dose_at_volume_percent(95) == dvh.dose_at_volume_percent(95)
    assert fine.mean_gy == pytest.approx(float(dose[mask].astype(np.float64).mean()))


def test_conformity_and_homogeneity_on_constructed_case():
    dose = np.zeros((20, 20, 20), np.float32)
    target = np.zeros_like(dose, bool)
    target[5:15, 5:15, 5:15] = True  # TV = 1000 voxels
    dose[5:15, 5:15, 5:10] = 60.0  # half the target at 60 Gy (under-dosed)
    dose[5:15, 5:15, 10:15] = 70.0  # half at 70 Gy
    dose[5:15, 5:15, 15:20] = 70.0  # 500 voxels of spill outside the target
    conf = conformity_indices(dose, target, 70.0, VOXEL_CC)
    assert conf.target_volume_cc == pytest.approx(1000 * VOXEL_CC)
    assert conf.piv_cc == pytest.approx(1000 * VOXEL_CC) and conf.tv_piv_cc == pytest.approx(500 * VOXEL_CC)
    assert conf.paddick == pytest.approx(500 ** 2 / (1000 * 1000))
    assert conf.rtog == pytest.approx(1.0)
    body = np.zeros_like(target)
    body[:, :, :17] = True  # the body cuts the spill to 200 voxels
    conf = conformity_indices(dose, target, 70.0, VOXEL_CC, body_mask=body)
    assert conf.rtog == pytest.approx(700 / 1000) and conf.paddick == pytest.approx(500 ** 2 / (1000 * 700))
    # HI: D2 = 70, D50 = 70 (the hottest 50% is exactly the 70 Gy half), D98 = 60.
    dvh = cumulative_dvh(dose, target, VOXEL_CC)
    assert dvh.homogeneity_index() == pytest.approx((70 - 60) / 70)


def test_grid_mismatch_raises():
    with pytest.raises(GeometryError, match="resample") as info:
        cumulative_dvh(np.zeros((4, 4, 4)), np.ones((4, 4, 5), bool), VOXEL_CC)
    assert isinstance(info.value, ValueError)


def test_cancelled_token_raises():
    token = CancelToken()
    token.cancel()
    dose, mask = _gradient_box()
    with pytest.raises(CancelledError):
        cumulative_dvh(dose, mask, VOXEL_CC, cancel=token)


def test_progress_is_reported():
    seen: list[float] = []
    dose, mask = _gradient_box()
    cumulative_dvh(dose, mask, VOXEL_CC, progress=lambda f, text: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0


@pytest.mark.parametrize("bad", [np.nan, -1.0, np.inf])
def test_invalid_dose_raises(bad):
    dose, mask = _gradient_box()
    dose[0, 0, 5] = bad
    with pytest.raises(DoseError):
        cumulative_dvh(dose, mask, VOXEL_CC)


def test_empty_mask_names_structure():
    dose, mask = _gradient_box()
    with pytest.raises(StructureError, match="Parotid_L") as info:
        cumulative_dvh(dose, np.zeros_like(mask), VOXEL_CC, name="Parotid_L")
    assert info.value.structure == "Parotid_L"


def _phantom_case() -> Case:
    """A 2 mm CT grid with a target cube, an organ and a body; dose on a coarser, shifted grid."""
    ct_grid = Grid((30, 40, 40), (2.0, 2.0, 2.0), (-40.0, -40.0, -30.0))
    kk, jj, ii = np.indices(ct_grid.shape)
    target = (abs(ii - 20) < 6) & (abs(jj - 20) < 6) & (abs(kk - 15) < 6)
    organ = (ii >= 28) & (ii < 34) & (abs(jj - 20) < 4) & (abs(kk - 15) < 4)
    body = np.ones(ct_grid.shape, bool)
    structures = [Structure("PTV60", target, ct_grid, type=StructureType.TARGET),
                  Structure("Cord", organ, ct_grid), Structure("BODY", body, ct_grid, type=StructureType.EXTERNAL)]
    # A linear dose along x (LPS) is reproduced exactly by trilinear interpolation on any grid.
    dose_grid = Grid((20, 30, 30), (3.0, 3.0, 3.0), (-45.5, -45.5, -32.0))
    x = dose_grid.axis_positions("i")
    dose_arr = np.broadcast_to(np.clip(60.0 - 0.5 * x, 0, None), dose_grid.shape).astype(np.float32)
    return Case("PHANTOM", Image(np.zeros(ct_grid.shape, np.int16), ct_grid), structures,
                {"reference": Dose(dose_arr, dose_grid, "reference")}, [],
                {"prescriptions": [Prescription("PTV60", 60.0, 30)]})


def test_structure_dvh_resamples_dose_onto_structure_grid():
    case = _phantom_case()
    ptv = case.structure("PTV60")
    dvh = structure_dvh(case.doses["reference"], ptv)
    x = ptv.grid.index_to_lps(np.argwhere(ptv.mask)[:, ::-1].astype(float))[:, 0]
    expected = 60.0 - 0.5 * x
    assert dvh.total_volume_cc == pytest.approx(ptv.volume_cc)  # the structure keeps its voxels
    assert dvh.mean_gy == pytest.approx(expected.mean(), abs=1e-4)
    assert dvh.max_gy == pytest.approx(expected.max(), abs=1e-4)
    assert dvh.min_gy == pytest.approx(expected.min(), abs=1e-4)


def test_dvh_metrics_rows():
    case = _phantom_case()
    rows = {r["structure"]: r for r in dvh_metrics(case)}
    ptv, cord = rows["PTV60"], rows["Cord"]
    for key in ("volume_cc", "mean_gy", "max_gy", "min_gy", "d98_gy", "d95_gy", "d50_gy", "d2_gy", "hi",
                "prescription_gy", "v95rx_percent", "paddick_ci", "rtog_ci"):
        assert key in ptv and np.isfinite(ptv[key])
    for key in ("mean_gy", "max_gy", "d0_1cc_gy", "d2cc_gy", "v20gy_percent", "v20gy_cc", "v50gy_percent"):
        assert key in cord
    assert ptv["d2_gy"] >= ptv["d50_gy"] >= ptv["d95_gy"] >= ptv["d98_gy"]
    assert cord["max_gy"] >= cord["d0_1cc_gy"] >= cord["d2cc_gy"]
    # The target spans x = -10 .. 10 mm: dose 65 .. 55 Gy, so the 60 Gy isodose covers half of it.
    assert ptv["d50_gy"] == pytest.approx(60.0, abs=0.5)
    assert 0 < ptv["paddick_ci"] < 1
    with pytest.raises(CancelledError):
        token = CancelToken()
        token.cancel()
        dvh_metrics(case, cancel=token)


@pytest.mark.skipif(shared_data_dir() is None, reason="shared data folder (OpenKBP) not available")
def test_openkbp_patient_is_fast():
    case = load_openkbp(openkbp_patients("validation")[0])
    dvh_metrics(case)  # warm up imports
    start = time.perf_counter()
    rows = dvh_metrics(case)
    elapsed = time.perf_counter() - start
    assert len(rows) == len([s for s in case.structures if not s.is_empty])
    assert elapsed < 1.0, f"dvh_metrics took {elapsed:.2f} s for {len(rows)} structures"


def test_dose_grid_sampling_uses_dose_points_inside_contours():
    # CT: 1 mm voxels; an 8 x 8 x 2 voxel box (contour edges at i, j = 3.5 and 11.5 mm).
    ct_grid = Grid((4, 20, 20), (1.0, 1.0, 1.0))
    mask = np.zeros(ct_grid.shape, bool)
    mask[1:3, 4:12, 4:12] = True
    box = Structure("Box", mask, ct_grid)
    # Dose: 2 mm in-plane points at 0.25 + 2m mm, dose = x (Gy); points 4.25 .. 10.25 fall inside.
    dose_grid = Grid((4, 10, 10), (2.0, 2.0, 1.0), (0.25, 0.25, 0.0))
    dose = Dose(np.broadcast_to(dose_grid.axis_positions("i"), dose_grid.shape).astype(np.float32), dose_grid)
    on_dose = structure_dvh(dose, box, sampling="dose")
    assert on_dose.n_voxels == 4 * 4 * 2 and on_dose.voxel_volume_cc == pytest.approx(0.004)
    assert on_dose.total_volume_cc == pytest.approx(box.volume_cc)
    assert on_dose.mean_gy == pytest.approx(7.25) and on_dose.max_gy == pytest.approx(10.25)
    on_ct = structure_dvh(dose, box)  # default: dose interpolated at the CT voxel centres 4 .. 11
    assert on_ct.n_voxels == 128 and on_ct.mean_gy == pytest.approx(7.5, abs=1e-5)
    rotated = Grid(dose_grid.shape, dose_grid.spacing_mm, dose_grid.origin_mm,
                   np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))
    with pytest.raises(GeometryError, match="parallel"):
        structure_dvh(Dose(dose.array, rotated), box, sampling="dose")


def test_conformity_needs_valid_dose_everywhere():
    dose = np.full((6, 6, 6), 60.0, np.float32)
    target = np.zeros(dose.shape, bool)
    target[2:4, 2:4, 2:4] = True
    dose[0, 0, 0] = np.nan  # outside the target, but inside the grid the PIV is counted over
    with pytest.raises(DoseError):
        conformity_indices(dose, target, 60.0, VOXEL_CC)
