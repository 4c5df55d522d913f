"""ToxicityMonitor features (issue 8): IBSI first order and GLCM by hand, BED-DVH points, baseline
changes, the clinic CSV layout (round trip and every refusal, with its line), and trajectories from a
small simulated digital-twin course (the bundled sample cropped to its body, 2 fractions)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from twinrt.errors import InvalidInputError, StructureError
from twinrt.geometry import Grid
from twinrt.model import Image, Structure
from twinrt.toxicity.csvio import CohortCsvError, read_cohort_csv, write_cohort_csv
from twinrt.toxicity.features import (BED_BIN_MIN_GY, BED_BIN_WIDTH_GY, CT_BIN_MIN_HU, CT_BIN_WIDTH_HU,
                                      DIRECTIONS_3D, dose_volume_features, endpoint_for, feature_names,
                                      first_order, glcm_features, organ_fraction_features, trajectories_from_twin,
                                      with_baseline_changes)
from twinrt.toxicity.trajectory import Cohort, OrganTrajectory

from twin_cases import cropped_sample


# ----------------------------------------------------------------------------------- first order
def test_bin_schemes_are_the_documented_ones():
    assert (BED_BIN_WIDTH_GY, BED_BIN_MIN_GY) == (2.0, 0.0)
    assert (CT_BIN_WIDTH_HU, CT_BIN_MIN_HU) == (25.0, -1000.0)
    assert len(DIRECTIONS_3D) == 13 and len(set(DIRECTIONS_3D)) == 13
    # No direction is the opposite of another.
    assert not any(tuple(-c for c in d) in DIRECTIONS_3D for d in DIRECTIONS_3D)


def test_first_order_analytic_two_point_distribution():
    # Three zeros and one 10: a Bernoulli(1/4) scaled by 10.
    f = first_order([0.0, 0.0, 0.0, 10.0], bin_width=1.0, bin_min=0.0)
    p = 0.25
    assert f["mean"] == pytest.approx(2.5)
    assert f["std"] == pytest.approx(10 * math.sqrt(p * (1 - p)))            # biased (1/N) variance
    assert f["skewness"] == pytest.approx((1 - 2 * p) / math.sqrt(p * (1 - p)))  # 2/sqrt(3)
    assert f["kurtosis"] == pytest.approx((1 - 6 * p * (1 - p)) / (p * (1 - p)))  # excess: -2/3
    assert f["entropy"] == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert f["uniformity"] == pytest.approx(0.75 ** 2 + 0.25 ** 2)
    assert f["energy"] == pytest.approx(100.0)
    assert (f["p10"], f["p90"]) == pytest.approx(tuple(np.percentile([0, 0, 0, 10], (10, 90))))


def test_first_order_matches_scipy_moments_and_uniform_histogram_entropy():
    from scipy import stats

    x = np.random.default_rng(4).gamma(2.0, 3.0, 5000)
    f = first_order(x, bin_width=0.5)
    assert f["mean"] == pytest.approx(x.mean())
    assert f["std"] == pytest.approx(x.std())
    assert f["skewness"] == pytest.approx(stats.skew(x))
    assert f["kurtosis"] == pytest.approx(stats.kurtosis(x, fisher=True, bias=True))
    assert (f["p10"], f["p90"]) == pytest.approx(tuple(np.percentile(x, (10, 90))))
    # A uniform histogram over B bins has entropy log2(B) bits and uniformity 1/B.
    vals = np.repeat(np.arange(16) + 0.5, 3)
    assert first_order(vals, 1.0, 0.0)["entropy"] == pytest.approx(4.0)
    assert first_order(vals, 1.0, 0.0)["uniformity"] == pytest.approx(1 / 16)
    assert first_order(vals, 2.0, 0.0)["entropy"] == pytest.approx(3.0)   # 8 bins of 2
    assert first_order(vals, 4.0, 0.0)["entropy"] == pytest.approx(2.0)   # 4 bins of 4
    # Values below bin_min are put in the first bin: one bin, entropy 0.
    assert first_order([-5.0, -1.0, 0.5], 2.0, 0.0)["entropy"] == 0.0


def test_first_order_constant_and_empty_regions():
    f = first_order(np.full(50, 7.0), 2.0, 0.0)
    assert (f["std"], f["skewness"], f["kurtosis"], f["entropy"], f["uniformity"]) == (0.0, 0.0, 0.0, 0.0, 1.0)
    assert first_order([3.0], 2.0)["mean"] == 3.0
    assert all(math.isnan(v) for v in first_order([], 2.0).values())
    with pytest.raises(InvalidInputError):
        first_order([1.0, np.nan], 2.0)
    with pytest.raises(InvalidInputError):
        first_order([1.0], 0.0)


# ----------------------------------------------------------------------------------- GLCM
def _checkerboard(n: int = 4) -> np.ndarray:
    k, j, i = np.indices((n, n, n))
    return ((k + j + i) % 2) * 2.0  # 0 Gy and 2 Gy: levels 1 and 2 with 2 Gy bins from 0


def test_glcm_checkerboard_by_hand():
    # Face (3) and corner (4) neighbours always differ by one level: P12 = P21 = 1/2, so contrast 1,
    # dissimilarity 1, homogeneity 1/2, energy 1/2, entropy 1 bit, correlation -1. Edge neighbours (6)
    # have the same parity; on an even cube half the pairs are (1,1) and half (2,2): contrast 0,
    # homogeneity 1, energy 1/2, entropy 1, correlation +1. Averaged over the 13 directions:
    vol = _checkerboard(4)
    g = glcm_features(vol, np.ones(vol.shape, bool), 2.0, 0.0)
    assert g["contrast"] == pytest.approx(7 / 13)
    assert g["dissimilarity"] == pytest.approx(7 / 13)
    assert g["homogeneity"] == pytest.approx((7 * 0.5 + 6 * 1.0) / 13)
    assert g["energy"] == pytest.approx(0.5)
    assert g["entropy"] == pytest.approx(1.0)
    assert g["correlation"] == pytest.approx((-7 + 6) / 13)
    # Distance 2: every offset is even, every pair has the same parity.
    g2 = glcm_features(vol, np.ones(vol.shape, bool), 2.0, 0.0, distance=2)
    assert (g2["contrast"], g2["correlation"], g2["energy"]) == pytest.approx((0.0, 1.0, 0.5))
    # Shifting all values by whole bins changes no GLCM feature.
    assert glcm_features(vol + 10.0, np.ones(vol.shape, bool), 2.0, 0.0) == pytest.approx(g)


def test_glcm_only_pairs_inside_the_mask_and_one_direction():
    vol = np.zeros((5, 5, 5))
    mask = np.zeros(vol.shape, bool)
    vol[2, 2, 1], vol[2, 2, 2] = 0.0, 2.0
    mask[2, 2, 1:3] = True
    vol[~mask] = 500.0  # outside the mask: ignored
    # One pair along (0, 0, 1): symmetric P12 = P21 = 1/2.
    g = glcm_features(vol, mask, 2.0, 0.0)
    assert g == pytest.approx({"contrast": 1.0, "homogeneity": 0.5, "correlation": -1.0, "energy": 0.5,
                               "entropy": 1.0, "dissimilarity": 1.0})


def test_glcm_constant_volume_single_voxel_and_empty_mask():
    constant = {"contrast": 0.0, "homogeneity": 1.0, "correlation": 1.0, "energy": 1.0, "entropy": 0.0,
                "dissimilarity": 0.0}
    vol = np.full((6, 7, 8), 41.3)
    assert glcm_features(vol, np.ones(vol.shape, bool), 2.0, 0.0) == pytest.approx(constant)
    one = np.zeros(vol.shape, bool)
    one[3, 3, 3] = True
    assert glcm_features(vol, one, 2.0, 0.0) == constant
    assert all(math.isnan(v) for v in glcm_features(vol, np.zeros(vol.shape, bool), 2.0, 0.0).values())
    with pytest.raises(InvalidInputError):
        glcm_features(vol, one[:3], 2.0, 0.0)


# ----------------------------------------------------------------------------------- dose-volume
def test_dose_volume_features_on_a_linear_gradient():
    # 100 voxels of BED 0.5, 1.5, ..., 99.5 Gy along i.
    bed = (np.arange(100) + 0.5).reshape(1, 1, 100)
    f = dose_volume_features(bed.ravel(), 0.1, n_eud=1.0)
    assert f["bed_mean"] == pytest.approx(50.0)
    assert f["bed_geud"] == pytest.approx(50.0)                       # n = 1: the mean
    assert (f["bed_d2"], f["bed_d50"], f["bed_d98"]) == pytest.approx((98.5, 50.5, 2.5))  # 2nd/50th/98th hottest
    assert (f["bed_v20"], f["bed_v30"], f["bed_v40"], f["bed_v50"]) == pytest.approx((80, 70, 60, 50))
    assert f["bed_volume_cc"] == pytest.approx(10.0)
    # n = 0.05 (a = 20): (mean D^20)^(1/20), ~ 100 (1/21)^(1/20) for a uniform 0-100 Gy spread.
    serial = dose_volume_features(bed.ravel(), 0.1, n_eud=0.05)["bed_geud"]
    assert serial == pytest.approx(np.mean(bed.ravel() ** 20) ** (1 / 20))
    assert serial == pytest.approx(100 * (1 / 21) ** (1 / 20), rel=0.01)
    # Same points as the DVH module's cumulative DVH.
    from twinrt.dvh import cumulative_dvh

    dvh = cumulative_dvh(bed, np.ones(bed.shape, bool), 0.1)
    assert f["bed_d50"] == pytest.approx(dvh.dose_at_volume_percent(50))
    assert f["bed_v30"] == pytest.approx(dvh.volume_at_dose_percent(30.0))
    empty = dose_volume_features(np.zeros(0), 0.1, 1.0)
    assert math.isnan(empty["bed_mean"]) and empty["bed_volume_cc"] == 0.0


def test_organ_fraction_features_layout_and_missing_day_image():
    grid = Grid((10, 12, 14), (2.0, 2.0, 3.0))
    k, j, i = np.indices(grid.shape)
    organ = (abs(k - 5) < 3) & (abs(j - 6) < 4) & (abs(i - 7) < 5)
    bed = (i * 3.0).astype(np.float32)
    f = organ_fraction_features(bed, organ, grid, n_eud=0.7)
    assert list(f) == feature_names()
    assert "dosio_mean" not in f  # it is bed_mean
    assert all(math.isnan(v) for n, v in f.items() if n.startswith(("ct_", "pet_")))
    assert all(math.isfinite(v) for n, v in f.items() if not n.startswith(("ct_", "pet_")))
    assert f["bed_mean"] == pytest.approx(bed[organ].mean())
    ct = Image((40 + 5 * (k % 2)).astype(np.int16), grid)
    day = Structure("Parotid_L", organ, grid)
    g = organ_fraction_features(bed, organ, grid, ct, day, n_eud=0.7)
    assert all(math.isfinite(v) for n, v in g.items() if not n.startswith("pet_"))  # no PET that day
    assert g["ct_volume_cc"] == pytest.approx(organ.sum() * grid.voxel_volume_cc)
    assert g["ct_mean"] == pytest.approx(ct.array[organ].mean())
    # Arrays work as well as Image / Structure; an image without a contour gives NaN ct_ features.
    assert organ_fraction_features(bed, organ, grid, ct.array, organ, 0.7) == pytest.approx(g, nan_ok=True)
    assert math.isnan(organ_fraction_features(bed, organ, grid, ct, None)["ct_mean"])
    with pytest.raises(StructureError):
        organ_fraction_features(bed, np.zeros(grid.shape, bool), grid)


def test_organ_fraction_features_is_fast_enough():
    # A 20 000-voxel organ in a larger grid with noisy BED and CT: the cohort simulator's budget is ~20 ms.
    rng = np.random.default_rng(0)
    shape = (60, 80, 80)
    grid = Grid(shape, (2.5, 2.5, 3.0))
    k, j, i = np.indices(shape)
    organ = ((k - 30) ** 2 + (j - 40) ** 2 + (i - 40) ** 2) < 16.8 ** 2
    assert 19000 < organ.sum() < 21000
    bed = (rng.random(shape) * 40 + i * 0.5).astype(np.float32)
    ct = rng.normal(30, 20, shape).astype(np.int16)
    organ_fraction_features(bed, organ, grid, ct, organ)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        organ_fraction_features(bed, organ, grid, ct, organ)
        times.append(time.perf_counter() - t0)
    # Generous bound for a shared 2-core test machine (measured ~10 ms when idle).
    assert min(times) < 0.1, times


def test_baseline_changes():
    x = np.array([[1.0, np.nan, 5.0],
                  [3.0, 10.0, 6.0],
                  [6.0, 12.0, np.nan]])
    y, names = with_baseline_changes(x, ["bed_mean", "ct_mean", "ct_std"])
    assert names == ["bed_mean", "ct_mean", "ct_std", "d_bed_mean", "d_ct_mean", "d_ct_std"]
    assert y.shape == (3, 6)
    np.testing.assert_array_equal(y[:, :3], x)
    np.testing.assert_allclose(y[:, 3], [0.0, 2.0, 5.0])
    np.testing.assert_allclose(y[:, 4], [np.nan, 0.0, 2.0])  # first day without the image: next day is baseline
    np.testing.assert_allclose(y[:, 5], [0.0, 1.0, np.nan])
    # A planning-image baseline replaces the first fraction's value.
    y2, _ = with_baseline_changes(x, ["bed_mean", "ct_mean", "ct_std"], {"ct_mean": 9.0, "ct_std": float("nan")})
    np.testing.assert_allclose(y2[:, 4], [np.nan, 1.0, 3.0])
    np.testing.assert_allclose(y2[:, 5], [0.0, 1.0, np.nan])
    with pytest.raises(InvalidInputError):
        with_baseline_changes(x, ["a", "b"])


def test_endpoint_names():
    for name, endpoint in [("LeftParotid", "xerostomia"), ("RightParotid", "xerostomia"), ("Parotid_L", "xerostomia"),
                           ("parotid r", "xerostomia"), ("Esophagus", "esophagitis"), ("OESOPHAGUS", "esophagitis"),
                           ("Lungs", "pneumonitis"), ("Lung_L", "pneumonitis"), ("Lung_Both", "pneumonitis"),
                           ("Heart", "cardiac")]:
        assert endpoint_for(name) == endpoint, name
    for name in ("PTV70", "SpinalCord", "Parotid_L_PRV", "Lungs-GTV", "Larynx", "Body"):
        assert endpoint_for(name) is None, name


# ----------------------------------------------------------------------------------- CSV
def _cohort() -> Cohort:
    names = ["bed_mean", "ct_mean", "d_ct_mean"]
    a = OrganTrajectory("P001", "Parotid_L", "xerostomia", [1, 2, 3],
                        [[1.9, 31.5, 0.0], [3.8, np.nan, np.nan], [5.7, 29.25, -2.25]], names, grade=2,
                        onset_fraction=3, n_fractions=35,
                        planned={"mean_gy": 26.1234567891, "geud_gy": 26.1234567891,
                                 "lkb_set": "parotid_flow25_dijkema2010"})
    b = OrganTrajectory("P001", "Esophagus", "esophagitis", [1, 2], [[2.0, 40.0, 0.0], [4.1, 41.0, 1.0]], names,
                        n_fractions=35, planned={"mean_gy": 30.0, "ntcp": 0.125})
    c = OrganTrajectory("P 002, \"x\"", "Lung_L", "pneumonitis", [2, 5], [[0.1, -700.0, 0.0], [0.3, -690.5, 9.5]],
                        names, grade=1, onset_fraction=5, n_fractions=30)
    return Cohort([a, b, c])


def _same(c1: Cohort, c2: Cohort) -> None:
    assert len(c1.trajectories) == len(c2.trajectories)
    assert c1.feature_names == c2.feature_names
    for t1, t2 in zip(c1.trajectories, c2.trajectories):
        assert (t1.patient_id, t1.organ, t1.endpoint, t1.grade, t1.onset_fraction, t1.n_fractions) == \
            (t2.patient_id, t2.organ, t2.endpoint, t2.grade, t2.onset_fraction, t2.n_fractions)
        np.testing.assert_array_equal(t1.fractions, t2.fractions)
        np.testing.assert_array_equal(t1.features, t2.features)  # exact, NaN where NaN
        assert {k: v for k, v in t1.planned.items() if v is not None} == t2.planned


def test_csv_round_trip(tmp_path):
    cohort = _cohort()
    tp, op = write_cohort_csv(cohort, tmp_path / "trajectories.csv", tmp_path / "outcomes.csv")
    assert tp.read_text().splitlines()[0] == "patient_id,organ,endpoint,fraction,bed_mean,ct_mean,d_ct_mean"
    assert "P001,Parotid_L,xerostomia,2,3.8,," in tp.read_text()
    back = read_cohort_csv(tp, op)
    _same(cohort, back)
    assert np.isnan(back.trajectories[0].features[1, 1])
    # Rows of an organ in any order, blank lines, spaces and a byte-order mark are accepted.
    lines = tp.read_text().splitlines()
    shuffled = [lines[i] for i in (0, 2, 1, 3, 5, 4)] + ["", lines[7], lines[6]]
    tp.write_text("\ufeff" + "\n".join(s.replace(",", " , ") if "Lung" not in s else s for s in shuffled),
                  encoding="utf-8")
    _same(cohort, read_cohort_csv(tp, op))
    # A missing outcomes.csv is a MissingInputError.
    with pytest.raises(FileNotFoundError):
        read_cohort_csv(tp, tmp_path / "nope.csv")


def _edit(path: Path, line: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines()
    assert old in lines[line - 1], (lines[line - 1], old)
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    path.write_text("\n".join(lines) + "\n")


BAD_CASES = [
    # (file, line edited, old, new, line reported, words in the message)
    ("t", 1, "ct_mean,", "", 2, "7 cells but the header has 6 columns"),  # header loses a column name
    ("t", 1, "endpoint,", "site,", 1, "missing column(s) endpoint"),
    ("o", 1, "grade,", "toxicity,", 1, "missing column(s) grade"),
    ("t", 3, ",3.8,", ",3,8,", 3, "cells"),                                 # a decimal comma
    ("t", 4, "5.7", "high", 4, "'bed_mean' is not a number"),
    ("t", 3, "xerostomia,2,", "xerostomia,two,", 3, "'fraction' must be a whole number"),
    ("t", 3, "xerostomia,2,", "xerostomia,1,", 3, "fraction 1 appears twice (also on line 2)"),
    ("t", 5, "esophagitis", "mucositis", 5, "unknown endpoint 'mucositis': use one of xerostomia, esophagitis"),
    ("o", 2, ",2,3,", ",6,3,", 2, "'grade' must be a whole number 0–5"),
    ("o", 3, ",0,,", ",0,4,", 3, "onset_fraction '4' is given with grade 0"),
    ("o", 2, ",2,3,", ",2,,", 2, "grade 2 needs an onset_fraction"),
    ("o", 2, "P001,Parotid_L", "P009,Parotid_L", 2, "outcome for P009/Parotid_L but trajectories.csv has no row"),
    ("o", 3, "esophagitis", "xerostomia", 3, "endpoint 'xerostomia' for P001/Esophagus, but trajectories.csv"),
    ("o", 2, ",35,", ",2,", 2, "fraction 3 in trajectories.csv but n_fractions 2"),
    ("o", 3, ",0.125,", ",1.5,", 3, "planned_ntcp must be within 0–1"),
]


@pytest.mark.parametrize("where,line,old,new,reported,words", BAD_CASES)
def test_csv_refusals_name_file_and_line(tmp_path, where, line, old, new, reported, words):
    tp, op = write_cohort_csv(_cohort(), tmp_path / "trajectories.csv", tmp_path / "outcomes.csv")
    path = tp if where == "t" else op
    _edit(path, line, old, new)
    with pytest.raises(CohortCsvError) as err:
        read_cohort_csv(tp, op)
    e = err.value
    assert isinstance(e, InvalidInputError)
    assert e.path == path and e.line == reported, str(e)
    assert f"{path.name}, line {reported}: " in str(e)
    assert words in str(e), str(e)


def test_csv_missing_rows_and_semicolons(tmp_path):
    tp, op = write_cohort_csv(_cohort(), tmp_path / "trajectories.csv", tmp_path / "outcomes.csv")
    # A trajectory without an outcome row: the trajectory's first line is named.
    lines = op.read_text().splitlines()
    op.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(CohortCsvError, match=r"trajectories.csv, line 5: P001/Esophagus has no row in outcomes.csv"):
        read_cohort_csv(tp, op)
    tp.write_text(tp.read_text().replace(",", ";"))
    with pytest.raises(CohortCsvError, match="separated by ';'"):
        read_cohort_csv(tp, op)
    tp.write_text("")
    with pytest.raises(CohortCsvError, match="line 1: the file is empty"):
        read_cohort_csv(tp, op)


def test_csv_write_refuses_what_would_not_read_back(tmp_path):
    t = _cohort().trajectories[0]
    bad = OrganTrajectory("P1", "Heart", "nausea", t.fractions, t.features, t.feature_names)
    with pytest.raises(InvalidInputError, match="unknown endpoint 'nausea'"):
        write_cohort_csv(Cohort([bad]), tmp_path / "t.csv", tmp_path / "o.csv")
    clash = OrganTrajectory("P1", "Heart", "cardiac", [1], [[1.0]], ["fraction"])
    with pytest.raises(InvalidInputError, match="clash"):
        write_cohort_csv(Cohort([clash]), tmp_path / "t.csv", tmp_path / "o.csv")
    assert not (tmp_path / "t.csv").exists() and not (tmp_path / "o.csv").exists()


# ----------------------------------------------------------------------------------- from the twin
@pytest.fixture(scope="module")
def twin():
    from twinrt.twin.simulator import CourseSettings, CourseSimulator
    from twinrt.twin.twin import DigitalTwin, TwinSettings

    sim = CourseSimulator(cropped_sample(), "reference", CourseSettings(n_fractions=4, seed=3))
    tw = DigitalTwin(sim.timeline(), TwinSettings(calibrate=False))
    for f in (1, 2):
        tw.add_fraction(sim.fraction(f).fraction)
    return tw


def test_trajectories_from_twin(twin, tmp_path):
    from twinrt.radiobiology import LKB_PARAMETERS, geud

    trs = trajectories_from_twin(twin, outcomes={"LeftParotid": (2, 2)})
    by_organ = {t.organ: t for t in trs}
    assert sorted(by_organ) == ["Esophagus", "LeftParotid", "RightParotid"]
    assert by_organ["LeftParotid"].endpoint == "xerostomia" and by_organ["Esophagus"].endpoint == "esophagitis"
    names = feature_names()
    for t in trs:
        assert t.patient_id == twin.timeline.patient_id and t.n_fractions == 4
        np.testing.assert_array_equal(t.fractions, [1, 2])
        assert t.feature_names == names + [f"d_{n}" for n in names]
        not_pet = [c for c, n in enumerate(t.feature_names) if "pet_" not in n]
        assert np.isfinite(t.features[:, not_pet]).all(), t.organ  # the simulated days bring the image and contours
        assert np.isnan(t.features[:, [c for c in range(len(names) * 2) if c not in not_pet]]).all()  # no PET
        bed_mean = t.features[:, t.feature_names.index("bed_mean")]
        assert bed_mean[1] > bed_mean[0] > 0
        mask = twin.timeline.planning.structure(t.organ).mask
        assert bed_mean[-1] == pytest.approx(float(twin.bed_gy[mask].mean()), rel=1e-6)
        assert t.features[0, t.feature_names.index("d_bed_mean")] == 0.0
        assert t.features[1, t.feature_names.index("d_bed_mean")] == pytest.approx(bed_mean[1] - bed_mean[0])
        n = LKB_PARAMETERS[t.planned["lkb_set"]].n
        physical = twin.planned_gy[mask].astype(np.float64)
        ab = twin.alpha_beta[mask]
        planned = physical * (1 + physical / twin.n_fractions / ab) / (1 + 2 / ab)  # the plan's EQD2
        assert t.planned["mean_gy"] == pytest.approx(planned.mean())
        assert t.planned["geud_gy"] == pytest.approx(geud(planned, np.ones(planned.size), n))
    assert by_organ["LeftParotid"].planned["lkb_set"] == "parotid_flow25_dijkema2010"
    assert by_organ["Esophagus"].planned["lkb_set"] == "esophagus_stricture_burman1991"
    assert (by_organ["LeftParotid"].grade, by_organ["LeftParotid"].onset_fraction) == (2, 2)
    assert (by_organ["RightParotid"].grade, by_organ["RightParotid"].onset_fraction) == (0, None)

    # Without the day's contours the ct_ features are NaN, the BED features unchanged.
    saved = [list(f.structures) for f in twin.timeline.fractions]
    try:
        for f in twin.timeline.fractions:
            f.structures = []
        bare = trajectories_from_twin(twin, ["Esophagus"], changes=False)
    finally:
        for f, s in zip(twin.timeline.fractions, saved):
            f.structures = s
    t = bare[0]
    ct = [i for i, n in enumerate(t.feature_names) if n.startswith("ct_")]
    assert np.isnan(t.features[:, ct]).all()
    np.testing.assert_array_equal(t.features[:, :ct[0]], by_organ["Esophagus"].features[:, :ct[0]])

    # Planning-CT baseline for the ct_ changes; explicit organ/endpoint; unknown organ refused.
    plan = trajectories_from_twin(twin, ["LeftParotid"], {"LeftParotid": "xerostomia"}, ct_baseline="planning")[0]
    i = plan.feature_names.index("d_ct_mean")
    assert plan.features[0, i] != 0.0 and np.isfinite(plan.features[:, i]).all()
    with pytest.raises(StructureError):
        trajectories_from_twin(twin, ["Liver"])
    with pytest.raises(InvalidInputError, match="No toxicity endpoint"):
        trajectories_from_twin(twin, ["Larynx"])

    # The twin's cohort goes through the CSV layout unchanged.
    cohort = Cohort(trs)
    write_cohort_csv(cohort, tmp_path / "t.csv", tmp_path / "o.csv")
    _same(cohort, read_cohort_csv(tmp_path / "t.csv", tmp_path / "o.csv"))


def test_trajectories_from_a_minimal_thorax_twin():
    """Lungs and heart (endpoint sets from the endpoint), day contours under other spellings, a day
    without image structures; a stand-in twin with the attributes the function reads."""
    from types import SimpleNamespace

    from twinrt.twin.twin import DigitalTwin

    grid = Grid((8, 10, 12), (3.0, 3.0, 3.0))
    k, j, i = np.indices(grid.shape)
    heart = (abs(k - 4) < 2) & (abs(j - 5) < 3) & (i < 4)
    lungs = (abs(k - 4) < 3) & (abs(j - 5) < 4) & (i >= 6)
    planning = SimpleNamespace(structures=[Structure("Heart", heart, grid), Structure("Lungs", lungs, grid),
                                           Structure("PTV60", i == 5, grid, type="TARGET")],
                               ct=Image(np.zeros(grid.shape, np.int16), grid))
    dose = (i * 0.25).astype(np.float32)  # Gy per fraction, 0-2.75 Gy along i
    ct = Image((20 + i).astype(np.int16), grid)
    day1 = [Structure("HEART", heart, grid), Structure("Lung_Both", lungs, grid)]  # other spellings than planning
    days = [SimpleNamespace(structures=day1, image=ct, pet=None,
                            structure=lambda n: next((s for s in day1 if s.name.lower() == n.lower()), None)),
            SimpleNamespace(structures=[], image=ct, pet=None, structure=lambda n: None)]
    records = [SimpleNamespace(number=f, warped_dose_gy=dose) for f in (1, 2)]
    timeline = SimpleNamespace(planning=planning, fractions=days, records=records, patient_id="T1", n_fractions=30)
    ab = np.full(grid.shape, 3.0, np.float32)
    twin = SimpleNamespace(timeline=timeline, grid=grid, alpha_beta=ab, planned_gy=dose * 30)
    twin.bed_by_fraction = lambda: DigitalTwin.bed_by_fraction(twin)  # the twin's running BED, on the stand-in
    trs = trajectories_from_twin(twin)
    assert [(t.organ, t.endpoint, t.planned["lkb_set"]) for t in trs] == [
        ("Heart", "cardiac", "heart_pericarditis_burman1991"),
        ("Lungs", "pneumonitis", "lung_pneumonitis_seppenwoolde2003")]
    for t, m in zip(trs, (heart, lungs)):
        bed = t.features[:, t.feature_names.index("bed_mean")]
        d = dose[m].astype(np.float64)
        assert bed == pytest.approx([np.mean(d * (1 + d / 3)), 2 * np.mean(d * (1 + d / 3))], rel=1e-6)
        vol = t.features[:, t.feature_names.index("ct_volume_cc")]
        assert vol[0] == pytest.approx(m.sum() * grid.voxel_volume_cc) and np.isnan(vol[1])  # day 2: no contour
    assert trs[1].planned["geud_gy"] == pytest.approx(trs[1].planned["mean_gy"])  # pneumonitis: n = 1
