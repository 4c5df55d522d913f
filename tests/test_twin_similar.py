"""Similar past cases (twinrt.twin.similar): features, library, search, goals, evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from twinrt.data import openkbp_patients, shared_data_dir
from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.geometry import Grid
from twinrt.model import Case, Dose, Image, Structure, StructureType
from twinrt.planning.evaluation import load_goal_set
from twinrt.twin.similar import (DISTANCE_CAP_MM, FEATURE_NAMES, FORMAT_VERSION, ORGANS, SHIPPED_LIBRARY_PATH,
                                 CaseLibrary, SimilarCase, build_library, case_features, describe_neighbours,
                                 evaluate_library, load_shipped_library, suggested_goals)

needs_shared = pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data is absent (fresh clone)")

# Anisotropic voxels (mm along i, j, k) so that the distance transform must use the spacing.
SPACING = (2.0, 2.5, 3.0)
SHAPE = (30, 40, 50)  # (k, j, i)


def _positions(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, y, x) positions (mm) of the voxel centres, relative to the grid centre, as (k, j, i) arrays."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    c = [(n - 1) / 2.0 for n in grid.shape]
    sx, sy, sz = grid.spacing_mm
    return (k - c[0]) * sz, (j - c[1]) * sy, (i - c[2]) * sx


def synthetic_case(radius_mm: float = 15.0, gap_mm: float = 10.0, pid: str = "syn", organs: tuple[str, ...] = ORGANS,
                   ) -> tuple[Case, dict]:
    """A sphere PTV70 at the centre and box organs: SpinalCord a 10 x 5 x 6 mm box whose near face is
    ``gap_mm`` beyond the sphere along +x; Brainstem a box inside the sphere; others far on -x."""
    grid = Grid(SHAPE, SPACING, (0.0, 0.0, 0.0))
    z, y, x = _positions(grid)
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    ptv = r <= radius_mm
    x0 = radius_mm + gap_mm
    cord = (x >= x0 - 1e-6) & (x <= x0 + 10 + 1e-6) & (np.abs(y) <= 2.5 + 1e-6) & (np.abs(z) <= 3.0 + 1e-6)
    stem = (np.abs(x) <= 4 + 1e-6) & (np.abs(y) <= 2.5 + 1e-6) & (np.abs(z) <= 3 + 1e-6)
    far = (x <= -radius_mm - 20) & (x >= -radius_mm - 26) & (np.abs(y) <= 5) & (np.abs(z) <= 6)
    masks = {"PTV70": ptv, "SpinalCord": cord, "Brainstem": stem}
    for o in organs:
        masks.setdefault(o, far)
    structures = [Structure(n, m, grid, type=StructureType.guess(n)) for n, m in masks.items()
                  if n == "PTV70" or n in organs]
    dose = np.clip(70.0 * np.exp(-np.clip(r - radius_mm, 0, None) / 15.0), 0, None).astype(np.float32)
    case = Case(pid, Image(np.zeros(SHAPE, np.int16), grid), structures,
                {"reference": Dose(dose, grid, "reference")}, [], {})
    return case, {"r": r, "cord": cord, "stem": stem, "radius": radius_mm}


# ---------------------------------------------------------------------- features
def test_features_match_analytic_geometry():
    case, g = synthetic_case(radius_mm=15.0, gap_mm=10.0)
    f = case_features(case)
    assert tuple(f) == FEATURE_NAMES
    voxel_cc = np.prod(SPACING) / 1000.0
    # Volumes are exact voxel counts; the voxelised sphere is close to 4/3 pi r^3.
    assert f["PTV70_volume_cc"] == pytest.approx(g["r"][g["r"] <= 15.0].size * voxel_cc)
    assert f["PTV70_volume_cc"] == pytest.approx(4 / 3 * np.pi * 1.5 ** 3, rel=0.1)
    assert f["PTV_total_volume_cc"] == pytest.approx(f["PTV70_volume_cc"])
    assert f["PTV63_volume_cc"] == 0.0 and f["PTV56_volume_cc"] == 0.0
    assert f["SpinalCord_volume_cc"] == pytest.approx(g["cord"].sum() * voxel_cc)
    # Distance from the box to the sphere: analytically |p| - R for every box voxel centre.
    d = g["r"][g["cord"]] - g["radius"]
    tol = max(SPACING)  # within a voxel
    assert f["SpinalCord_min_dist_mm"] == pytest.approx(d.min(), abs=tol)
    assert f["SpinalCord_min_dist_mm"] == pytest.approx(10.0, abs=tol)
    assert f["SpinalCord_median_dist_mm"] == pytest.approx(np.median(d), abs=tol)
    assert f["SpinalCord_median_dist_PTV70_mm"] == pytest.approx(np.median(d), abs=tol)
    assert f["SpinalCord_overlap_pct"] == 0.0
    # Within 10 mm: bracketed by the analytic fractions a voxel nearer and a voxel further.
    lo, hi = (100.0 * np.mean(d <= t) for t in (10.0 - tol, 10.0 + tol))
    assert lo - 1e-9 <= f["SpinalCord_within_10mm_PTV70_pct"] <= hi + 1e-9
    assert f["SpinalCord_within_5mm_PTV70_pct"] <= f["SpinalCord_within_10mm_PTV70_pct"]
    # An organ inside the target: full overlap, zero distance.
    assert f["Brainstem_overlap_pct"] == pytest.approx(100.0)
    assert f["Brainstem_min_dist_mm"] == 0.0 and f["Brainstem_median_dist_mm"] == 0.0
    assert f["Brainstem_within_5mm_PTV70_pct"] == pytest.approx(100.0)
    assert f["Brainstem_present"] == 1.0


def test_missing_organ_gets_documented_values():
    case, _ = synthetic_case(organs=("SpinalCord", "Brainstem"))
    f = case_features(case)
    assert f["Larynx_present"] == 0.0 and f["Larynx_volume_cc"] == 0.0 and f["Larynx_overlap_pct"] == 0.0
    assert f["Larynx_min_dist_mm"] == DISTANCE_CAP_MM and f["Larynx_median_dist_PTV70_mm"] == DISTANCE_CAP_MM


# ---------------------------------------------------------------------- synthetic library
@pytest.fixture(scope="module")
def small_library() -> CaseLibrary:
    cases = [synthetic_case(radius_mm=r, gap_mm=gap, pid=f"syn_{n}")[0]
             for n, (r, gap) in enumerate([(12, 4), (15, 10), (18, 16), (14, 22), (16, 6), (13, 13)])]
    return build_library(cases)


def test_round_trip_and_self_is_nearest(small_library, tmp_path):
    path = small_library.save(tmp_path / "lib.json")
    lib = CaseLibrary.load(path)
    assert lib.case_ids == small_library.case_ids
    assert lib.feature_names == FEATURE_NAMES
    np.testing.assert_allclose(lib.features, small_library.features, atol=1e-3)
    np.testing.assert_allclose(lib.std, small_library.std, atol=1e-5)
    for a, b in zip(lib.metrics, small_library.metrics):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-3 for k in a)
    data = json.loads(path.read_text())
    assert data["format_version"] == FORMAT_VERSION and "Babier" in data["citation"]
    for cid in lib.case_ids:
        nb = lib.similar(lib.case_features_of(cid), k=2)
        assert nb[0].case_id == cid and nb[0].distance == pytest.approx(0.0, abs=1e-9)
        assert nb[1].distance > 0
    # The nearest cases are those with the nearest geometry: syn_1 (r 15, gap 10) is nearer syn_5 (16, 6)
    # than syn_2 (18, 16).
    ranked = [n.case_id for n in lib.similar(lib.case_features_of("syn_1"), k=6)]
    assert ranked.index("syn_5") < ranked.index("syn_2")


def test_constant_features_are_ignored(small_library):
    # Every synthetic case lacks PTV63: its volume is constant, so it has std 0 and is never compared.
    j = FEATURE_NAMES.index("PTV63_volume_cc")
    assert small_library.std[j] == 0.0
    query = small_library.case_features_of("syn_0")
    query["PTV63_volume_cc"] = 500.0
    nb = small_library.similar(query, k=3)
    assert nb[0].case_id == "syn_0" and nb[0].distance == pytest.approx(0.0, abs=1e-9)
    assert "PTV63_volume_cc" not in nb[0].contributions
    assert all(np.isfinite(n.distance) for n in nb)


def test_query_with_missing_organ(small_library):
    case, _ = synthetic_case(radius_mm=15, gap_mm=10, pid="q", organs=("SpinalCord", "Brainstem"))
    nb = small_library.similar(case, k=3)
    assert len(nb) == 3 and all(np.isfinite(n.distance) for n in nb)
    assert not any(name.startswith("Larynx_") for name in nb[0].contributions)
    assert any(name.startswith("SpinalCord_") for name in nb[0].contributions)
    assert sum(nb[0].contributions.values()) == pytest.approx(nb[0].distance ** 2)
    # A partial feature dict works too (missing keys are not compared).
    nb2 = small_library.similar({"PTV70_volume_cc": 10.0, "SpinalCord_present": 1, "SpinalCord_min_dist_mm": 4}, 2)
    assert len(nb2) == 2
    text = describe_neighbours(nb)
    assert nb[0].case_id in text and "distance" in text


def test_focus_and_prediction(small_library):
    q = small_library.case_features_of("syn_3")
    nb = small_library.similar(q, k=2, exclude=["syn_3"], focus="spinalcord")
    assert all(n.case_id != "syn_3" for n in nb)
    assert all(name.startswith(("PTV", "SpinalCord_")) for name in nb[0].contributions)
    pred = small_library.predict_metrics(q, k=1)
    assert pred["SpinalCord D0.1cc"] == pytest.approx(small_library.metrics[3]["SpinalCord D0.1cc"])
    with pytest.raises(InvalidInputError, match="Unknown organ"):
        small_library.similar(q, focus="Liver")


# ---------------------------------------------------------------------- goals
def test_suggested_goals_never_looser_than_clinical():
    gs = load_goal_set("head_and_neck_openkbp")
    # Some goals share a metric (parotid Dmean <= 26 and <= 20 Gy): values relative to the extreme limit.
    loose, tight = {}, {}
    for g in gs.goals:
        key, sign = f"{g.structure} {g.metric}", (1 if g.comparator == "<=" else -1)
        loose[key] = max(loose.get(key, -1e9 * sign) * sign, (g.value + 10 * sign) * sign) * sign
        tight[key] = min(tight.get(key, 1e9 * sign) * sign, (g.value - 5 * sign) * sign) * sign
    nbs = [SimilarCase("a", 1, 0.1, metrics=loose), SimilarCase("b", 2, 0.2, metrics=tight),
           SimilarCase("c", 3, 0.3, metrics=tight)]
    rows = suggested_goals(nbs, gs)
    assert len(rows) == len(gs.goals)
    for row, g in zip(rows, gs.goals):
        assert row["n_neighbours"] == 3 and row["clinical_met_by"] == 2
        assert row["suggested"] == pytest.approx(tight[f"{g.structure} {g.metric}"])
        assert (row["suggested"] < g.value) if g.comparator == "<=" else (row["suggested"] > g.value)
    rows = suggested_goals(nbs[:1], gs)  # only looser neighbours: the clinical limit is kept
    assert all(r["suggested"] == r["clinical_value"] for r in rows)
    rows = suggested_goals([SimilarCase("d", 1, 0.0, metrics={})], gs)
    assert all(r["suggested"] == r["clinical_value"] and r["median"] is None for r in rows)


def test_suggested_goals_from_shipped_library():
    lib = load_shipped_library()
    nbs = lib.similar(lib.case_features_of(lib.case_ids[0]), k=5)
    for r in suggested_goals(nbs):
        if r["comparator"] == "<=":
            assert r["suggested"] <= r["clinical_value"] + 1e-9
        else:
            assert r["suggested"] >= r["clinical_value"] - 1e-9


# ---------------------------------------------------------------------- bad input
def test_bad_input_raises_typed_errors(small_library, tmp_path):
    with pytest.raises(InvalidInputError, match="at least one case"):
        CaseLibrary([], np.zeros((0, len(FEATURE_NAMES))), [])
    q = small_library.case_features_of("syn_0")
    for k in (0, -1, 1.5, True):
        with pytest.raises(InvalidInputError, match="k"):
            small_library.similar(q, k=k)
    with pytest.raises(InvalidInputError, match="Unknown features"):
        small_library.similar({"Liver_volume_cc": 3.0})
    with pytest.raises(InvalidInputError, match="finite"):
        small_library.similar({**q, "PTV70_volume_cc": float("nan")})
    with pytest.raises(InvalidInputError, match="neighbour"):
        suggested_goals([])
    with pytest.raises(MissingInputError):
        CaseLibrary.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "twinrt-case-library", "format_versi')
    with pytest.raises(InvalidInputError, match="not a readable JSON"):
        CaseLibrary.load(bad)
    data = small_library.to_json()
    bad.write_text(json.dumps({**data, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(InvalidInputError, match="format version"):
        CaseLibrary.load(bad)
    bad.write_text(json.dumps({**data, "format": "something-else"}))
    with pytest.raises(InvalidInputError, match="not a TwinRT case library"):
        CaseLibrary.load(bad)
    broken = json.loads(json.dumps(data))
    broken["cases"][0]["features"] = broken["cases"][0]["features"][:-1]
    bad.write_text(json.dumps(broken))
    with pytest.raises(InvalidInputError, match="damaged"):
        CaseLibrary.load(bad)
    del broken["scaling"]
    bad.write_text(json.dumps(broken))
    with pytest.raises(InvalidInputError):
        CaseLibrary.load(bad)
    member, _ = synthetic_case(pid="syn_0")
    with pytest.raises(InvalidInputError, match="in the library"):
        evaluate_library(small_library, [member])
    with pytest.raises(InvalidInputError):
        evaluate_library(small_library, [])


# ---------------------------------------------------------------------- shipped library
def test_shipped_library():
    assert SHIPPED_LIBRARY_PATH.stat().st_size < 1_000_000
    lib = load_shipped_library()
    assert len(lib) == 169 and lib.feature_names == FEATURE_NAMES
    assert all(cid.startswith("pt_") for cid in lib.case_ids)
    assert "Babier" in lib.metadata["citation"]
    assert all("PTV70 D95%" in m for m in lib.metrics)
    # Real data have gaps: pt_160 has no spinal cord contour, so no cord metrics and present = 0.
    assert sum("SpinalCord D0.1cc" in m for m in lib.metrics) == 168
    assert lib.case_features_of("pt_160")["SpinalCord_present"] == 0.0
    assert np.all(lib.std[[FEATURE_NAMES.index(f"{o}_min_dist_mm") for o in ORGANS]] > 0)
    # Self is the nearest, at distance 0, for members with and without optional organs.
    for cid in lib.case_ids[:10]:
        nb = lib.similar(lib.case_features_of(cid), k=1)[0]
        assert nb.case_id == cid and nb.distance == pytest.approx(0.0, abs=1e-9)


@needs_shared
def test_shipped_library_matches_the_code():
    """The shipped numbers are what the current code computes from the data (rebuild it when not)."""
    lib = load_shipped_library()
    path = openkbp_patients("train")[0]
    built = build_library([path])
    i = lib.case_ids.index(path.stem)
    np.testing.assert_allclose(lib.features[i], built.features[0], atol=2e-3)
    assert lib.metrics[i].keys() == built.metrics[0].keys()
    assert all(abs(lib.metrics[i][k] - v) < 2e-3 for k, v in built.metrics[0].items())


@needs_shared
def test_neighbours_beat_population_mean_on_validation():
    lib = load_shipped_library()
    res = evaluate_library(lib, openkbp_patients("validation")[:6], k=5)
    assert res["n_validation"] == 6 and res["n_pairs"] > 50
    assert res["knn_mae_gy"] < res["population_mae_gy"]
    assert res["knn_organ_mae_gy"] < res["population_mae_gy"]
