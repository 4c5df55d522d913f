"""DigitalTwin core (issue 7): timeline, registration, simulator, twin update, refusals, course DICOM, CLI.

The course tests use the bundled sample patient cropped to its body (about 0.3 M voxels) so that a
simulated fraction and its twin update take about a second each; the full-size 30-fraction course is
measured by ``bench/digitaltwin_course.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.geometry import Grid
from twinrt.model import Dose, Image
from twinrt.twin.registration import (Registration, RegistrationError, RegistrationSettings, jacobian_determinant,
                                      register, structure_dice)
from twinrt.twin.simulator import CourseSettings, CourseSimulator, ensure_tumour, treatment_dates
from twinrt.twin.timeline import CaseTimeline, Fraction
from twinrt.twin.twin import DigitalTwin, FractionRefusedError, TwinSettings

from twin_cases import cropped_sample


@pytest.fixture(scope="module")
def course():
    """A 4-fraction simulated course on the cropped sample, with the first two fractions taken by a twin."""
    case = cropped_sample()
    sim = CourseSimulator(case, "reference", CourseSettings(n_fractions=4, seed=3))
    twin = DigitalTwin(sim.timeline())
    days = [sim.fraction(f) for f in (1, 2, 3)]
    updates = [twin.add_fraction(days[0].fraction), twin.add_fraction(days[1].fraction)]
    return {"case": case, "sim": sim, "twin": twin, "days": days, "updates": updates}


# ----------------------------------------------------------------------------------- registration
def _shifted(image: Image, shift_mm: np.ndarray) -> Image:
    """The anatomy moved by ``shift_mm`` (LPS): value at y is the original at y − shift."""
    from twinrt.geometry import resample_array

    moved_grid = Grid(image.grid.shape, image.grid.spacing_mm, tuple(np.array(image.grid.origin_mm) + shift_mm),
                      image.grid.direction)
    arr = resample_array(image.array.astype(np.float32), moved_grid, image.grid, order=1, fill_value=-1000)
    return Image(np.rint(arr).astype(np.int16), image.grid)


def test_rigid_registration_recovers_a_known_shift(course):
    ct = course["case"].ct
    shift = np.array([3.0, -2.0, 4.5])
    moved = _shifted(ct, shift)
    reg = register(ct, moved, RegistrationSettings(deformable=False))
    # φ(x) = x + shift: the translation of the rigid matrix (rotation ~ identity).
    assert np.allclose(reg.rigid_matrix[:3, 3], shift, atol=1.0), reg.rigid_matrix
    assert reg.quality["rotation_deg"] < 0.5
    pts = reg.mapped_points()
    assert pts.shape == ct.grid.shape + (3,)
    # Pulling the moved image back brings it much closer to the planning CT (interior of the body).
    back = reg.pull_back(moved.array, moved.grid, fill_value=-1000)
    body = ct.array > -300
    body[:3], body[-3:], body[:, :3], body[:, -3:], body[..., :3], body[..., -3:] = (False,) * 6
    before = np.abs(moved.array[body].astype(float) - ct.array[body]).mean()
    after = np.abs(back[body] - ct.array[body]).mean()
    assert after < 0.6 * before, (before, after)


def test_jacobian_of_known_fields():
    grid = Grid((20, 22, 24), (2.0, 1.5, 3.0))
    kk, jj, ii = np.meshgrid(*(np.arange(n, dtype=float) for n in grid.shape), indexing="ij")
    pts = grid.index_to_lps(np.stack([ii, jj, kk], -1))
    u = np.moveaxis(0.1 * pts, -1, 0).astype(np.float32)  # x -> 1.1 x
    det = jacobian_determinant(u, grid)
    assert np.allclose(det, 1.1 ** 3, atol=1e-3)
    fold = np.zeros((3,) + grid.shape, np.float32)
    fold[0] = -1.5 * pts[..., 0]  # x -> -0.5 x: folded
    assert (jacobian_determinant(fold, grid) < 0).all()


def test_registration_refuses_folding_and_unrelated_images(course):
    ct = course["case"].ct
    day = course["days"][2].fraction.image
    # The fold check: with a threshold above what any smooth deformation reaches, the result is refused.
    with pytest.raises(RegistrationError, match="folds"):
        register(ct, day, RegistrationSettings(min_jacobian=1.5))
    noise = Image(np.random.default_rng(0).normal(0, 300, ct.array.shape).astype(np.float32), ct.grid)
    with pytest.raises(RegistrationError):
        register(ct, noise)


def test_structure_dice():
    a = np.zeros((4, 4, 4), bool)
    a[:2] = True
    b = np.zeros_like(a)
    b[1:3] = True
    assert structure_dice(a, b) == pytest.approx(0.5)
    assert structure_dice(np.zeros_like(a), np.zeros_like(a)) is None


# ----------------------------------------------------------------------------------- simulator
def test_treatment_dates_skip_weekends():
    dates = treatment_dates("2026-01-02", 4)  # a Friday
    assert dates == ["2026-01-02", "2026-01-05", "2026-01-06", "2026-01-07"]


def test_tumour_proxy_and_simulated_truth(course):
    sim, case = course["sim"], course["case"]
    gtv = case.structure("GTV")
    ptv = case.structure("PTV70")
    assert 0 < gtv.volume_cc < ptv.volume_cc and not (gtv.mask & ~ptv.mask).any()
    assert "eroded" in case.metadata["tumour_proxy"]
    assert ensure_tumour(case) is gtv  # not added twice
    day = course["days"][2]
    assert day.truth["inverse_residual_mm"] < 0.1
    # The day's GTV mask has the simulated (observed) volume within a few voxels' worth.
    assert day.truth["mask_tumour_cc"] == pytest.approx(day.truth["observed_tumour_cc"], rel=0.05)
    assert day.fraction.date == sim.dates[2]
    assert day.fraction.dose.summation == "FRACTION"
    assert np.allclose(day.fraction.dose.array * 4, case.doses["reference"].array, atol=1e-4)
    # Same seed, same day.
    again = sim.fraction(3)
    assert np.array_equal(again.fraction.image.array, day.fraction.image.array)


# ----------------------------------------------------------------------------------- twin
def test_twin_accumulates_close_to_truth(course):
    twin, days = course["twin"], course["days"]
    truth = days[0].true_warped_dose_gy + days[1].true_warped_dose_gy
    top = truth.max()
    m = truth >= 0.1 * top
    err = np.abs(twin.physical_gy - truth)[m].mean() / top * 100
    plan_err = np.abs(twin.planned_to_date().array - truth)[m].mean() / top * 100
    assert err < 2.0, err
    assert err < plan_err  # the twin knows more than "delivered as planned"
    # BED and EQD2 follow their definitions voxel by voxel with the per-voxel α/β.
    d = [r.warped_dose_gy for r in twin.timeline.records]
    ab = twin.alpha_beta
    assert np.allclose(twin.accumulated_bed().array, sum(x * (1 + x / ab) for x in d), rtol=1e-4, atol=1e-4)
    eqd2 = twin.accumulated_eqd2().array
    assert np.allclose(eqd2, twin.bed_gy / (1 + 2 / ab), rtol=1e-4, atol=1e-4)
    gtv = course["case"].structure("GTV").mask
    assert np.allclose(ab[gtv], 10.0)
    cord = course["case"].structure("SpinalCord").mask & ~np.logical_or.reduce(
        [s.mask for s in course["case"].targets])
    assert np.allclose(ab[cord], 2.0)


def test_twin_records_registration_quality_and_goals(course):
    up = course["updates"][1]
    rec = up.record
    assert rec.number == 2 and rec.registration["jacobian_min"] > 0
    assert rec.dice["Mandible"] > 0.8 and rec.dice["GTV"] > 0.8
    assert rec.tumour_volume_cc == pytest.approx(course["days"][1].truth["mask_tumour_cc"])
    goals = {g["goal"]: g for g in up.goals}
    cord = next(g for g in up.goals if g["structure"] == "SpinalCord" and g["metric"] == "D0.1cc")
    # Planned to date is the plan scaled by 2/4 for a dose metric.
    assert cord["planned_to_date"] == pytest.approx(cord["planned"] * 2 / 4, rel=1e-3)
    assert cord["delivered"] == pytest.approx(cord["planned_to_date"], rel=0.3)
    assert len(goals) == len(up.goals)
    # Response calibrated once the planning volume and two fractions are known.
    assert up.response is not None and set(up.response["interval"]) == {"alpha_per_gy", "lambda_per_day",
                                                                        "t_clear_days"}


def test_projected_goal_failure_warns():
    """A fraction whose dose is doubled: the projection breaks the plan's cord limit and warns."""
    case = cropped_sample()
    sim = CourseSimulator(case, "reference", CourseSettings(n_fractions=4, seed=5, deformation_mm=0.0))
    twin = DigitalTwin(sim.timeline(), TwinSettings(calibrate=False))
    day = sim.fraction(1).fraction
    day.dose = Dose(day.dose.array * 2.0, day.dose.grid, "delivered", summation="FRACTION")
    up = twin.add_fraction(day)
    assert any("SpinalCord" in w and "Projected" in w for w in up.warnings), up.warnings


def test_refusals_leave_the_twin_unchanged(course):
    twin, days = course["twin"], course["days"]
    before = (twin.delivered, twin.physical_gy.copy(), twin.bed_gy.copy(), len(twin.timeline.fractions))
    good = days[2].fraction

    def variant(**kw):
        f = Fraction(kw.get("number", good.number), kw.get("date", good.date), kw.get("image", good.image),
                     good.structures, good.dose, kw.get("patient_id", good.patient_id),
                     kw.get("frame", good.frame_of_reference_uid))
        return f

    with pytest.raises(FractionRefusedError, match="patient"):
        twin.add_fraction(variant(patient_id="SOMEONE_ELSE"))
    if twin.timeline.frame_of_reference_uid:
        with pytest.raises(FractionRefusedError, match="frame of reference"):
            twin.add_fraction(variant(frame="1.2.3.4"))
    with pytest.raises(FractionRefusedError, match="expects fraction 3"):
        twin.add_fraction(variant(number=4))
    with pytest.raises(FractionRefusedError, match="before fraction 2"):
        twin.add_fraction(variant(date="2025-12-01"))
    noise = Image(np.random.default_rng(1).normal(0, 300, good.image.array.shape).astype(np.float32), good.image.grid)
    with pytest.raises(FractionRefusedError, match="refused"):
        twin.add_fraction(variant(image=noise))
    assert twin.delivered == before[0] and len(twin.timeline.fractions) == before[3]
    assert np.array_equal(twin.physical_gy, before[1]) and np.array_equal(twin.bed_gy, before[2])


def test_prediction_and_regimens(course):
    twin = course["twin"]
    pred = twin.predict_tumour(0.9)
    assert pred.days[0] == 0 and (pred.lower_cc <= pred.median_cc + 1e-9).all()
    assert (pred.median_cc <= pred.upper_cc + 1e-9).all()
    comp = twin.compare_regimens()
    rows = {r["regimen"]: r for r in comp.to_rows()}
    assert set(rows) == {"keep", "boost", "de-escalate"}
    assert rows["boost"]["TCP"] >= rows["keep"]["TCP"] >= rows["de-escalate"]["TCP"]
    assert rows["boost"]["NTCP SpinalCord"] > rows["de-escalate"]["NTCP SpinalCord"]


# ----------------------------------------------------------------------------------- save / load
def test_timeline_round_trip_and_continue(course, tmp_path):
    twin = course["twin"]
    folder = twin.timeline.save(tmp_path / "tl")
    loaded = CaseTimeline.load(folder)
    assert loaded.delivered == twin.delivered and loaded.n_fractions == 4
    for a, b in zip(loaded.records, twin.timeline.records):
        assert np.array_equal(a.warped_dose_gy, b.warped_dose_gy) and a.dice == b.dice and a.date == b.date
    for a, b in zip(loaded.fractions, twin.timeline.fractions):
        assert np.array_equal(a.image.array, b.image.array)
        assert [s.name for s in a.structures] == [s.name for s in b.structures]
        assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.structures, b.structures))
    assert [s.name for s in loaded.planning.structures] == [s.name for s in twin.timeline.planning.structures]
    assert loaded.planning.prescriptions[0].fractions == 4
    again = DigitalTwin(loaded, TwinSettings(calibrate=False))
    assert np.allclose(again.physical_gy, twin.physical_gy) and np.allclose(again.bed_gy, twin.bed_gy)
    # Saving over a folder that is not a timeline is refused; damaged files give typed errors.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="not a TwinRT timeline"):
        twin.timeline.save(other)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(MissingInputError):
        CaseTimeline.load(tmp_path / "nothing")
    doc = json.loads((folder / "timeline.json").read_text())
    doc["format"] = "something-else"
    (folder / "timeline.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidInputError, match="format"):
        CaseTimeline.load(folder)
    (folder / "timeline.json").write_text("{broken")
    with pytest.raises(InvalidInputError, match="not readable"):
        CaseTimeline.load(folder)


# ----------------------------------------------------------------------------------- DICOM course
def test_course_dicom_round_trip_and_other_patient(course, tmp_path):
    from twinrt.twin.course_dicom import export_course, import_course

    sim, days = course["sim"], course["days"]
    other = days[1].fraction
    foreign = Fraction(2, other.date, other.image, other.structures, other.dose, "OTHER_PATIENT",
                       other.frame_of_reference_uid)
    export_course(sim.timeline(), tmp_path / "course", [days[0].fraction, foreign])
    assert (tmp_path / "course" / "plan").is_dir() and (tmp_path / "course" / "fraction_001").is_dir()
    timeline, fractions = import_course(tmp_path / "course")
    assert timeline.n_fractions == 4 and timeline.patient_id == course["case"].patient_id
    assert [f.number for f in fractions] == [1, 2] and fractions[0].date == days[0].fraction.date
    f1 = fractions[0]
    assert np.abs(f1.image.array.astype(float) - days[0].fraction.image.array).max() <= 1.0
    assert np.allclose(f1.dose.array, days[0].fraction.dose.array, atol=1e-3 * days[0].fraction.dose.max_gy)
    gtv_day = f1.structure("GTV")
    assert structure_dice(gtv_day.mask, days[0].fraction.structure("GTV").mask) > 0.9
    twin = DigitalTwin(timeline, TwinSettings(calibrate=False))
    twin.add_fraction(f1)
    with pytest.raises(FractionRefusedError, match="OTHER_PATIENT"):
        twin.add_fraction(fractions[1])
    assert twin.delivered == 1
    with pytest.raises(MissingInputError):
        import_course(tmp_path / "missing")


def test_cli_similar_runs_on_the_sample(capsys):
    from twinrt.cli import main

    assert main(["twin", "similar", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 most similar past cases" in out and "SpinalCord D0.1cc" in out


def test_registration_object_pull_back_identity():
    grid = Grid((6, 7, 8), (1.0, 1.0, 2.0), (10.0, -5.0, 3.0))
    arr = np.random.default_rng(2).random(grid.shape).astype(np.float32)
    reg = Registration(grid, np.eye(4))
    assert np.allclose(reg.pull_back(arr, grid), arr, atol=1e-6)


def test_cli_simulate_then_run(course, tmp_path, capsys):
    """``twinrt twin simulate`` writes a DICOM course; ``twinrt twin run`` takes it and writes its outputs."""
    from twinrt.cli import main
    from twinrt.dicom.folder import export_case
    from twinrt.dicom.rtdose import read_rtdose

    patient = tmp_path / "patient"
    export_case(course["case"], patient)
    assert main(["twin", "simulate", str(patient), "--out", str(tmp_path / "course"), "--fractions", "3",
                 "--upto", "2", "--seed", "1"]) == 0
    truth = json.loads((tmp_path / "course" / "simulation_truth.json").read_text())
    assert truth["n_fractions"] == 3 and len(truth["observed_tumour_cc"]) == 2
    assert main(["twin", "run", str(tmp_path / "course"), "--out", str(tmp_path / "twin")]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 fractions taken" in out
    summary = json.loads((tmp_path / "twin" / "summary.json").read_text())
    assert summary["delivered"] == 2 and summary["research_use_only"] is True
    assert {r["regimen"] for r in summary["regimens"]} == {"keep", "boost", "de-escalate"}
    acc = read_rtdose(tmp_path / "twin" / "RTDOSE_accumulated.dcm")
    # Two of three fractions: about two thirds of the planned dose.
    planned = course["case"].doses["reference"].max_gy
    assert 0.5 * planned < acc.max_gy < 0.85 * planned
    assert CaseTimeline.load(tmp_path / "twin" / "timeline").delivered == 2
    # A course folder without a plan is refused with a typed error (exit 2).
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["twin", "run", str(empty), "--out", str(tmp_path / "twin2")]) == 2
    assert not (tmp_path / "twin2").exists()


def test_dvh_comparison_planned_delivered_projected(course):
    twin = course["twin"]
    dvhs = twin.dvh_comparison(["PTV70", "SpinalCord"])
    assert set(dvhs) == {"PTV70", "SpinalCord"}
    ptv = dvhs["PTV70"]
    # After 2 of 4 fractions: the planned-to-date mean is half the plan's; delivered is close to it.
    from twinrt.dvh import structure_dvh

    plan_mean = structure_dvh(course["case"].doses["reference"], course["case"].structure("PTV70")).mean_gy
    assert ptv["planned_to_date"].mean_gy == pytest.approx(plan_mean / 2, rel=0.01)
    assert ptv["delivered"].mean_gy == pytest.approx(ptv["planned_to_date"].mean_gy, rel=0.1)
    assert ptv["projected"].mean_gy > 1.8 * ptv["delivered"].mean_gy
