"""Plan evaluation: exact goal values on a synthetic case, score, explanations, deliverability."""

from __future__ import annotations

import json

import numpy as np
import pytest

from twinrt.errors import StructureError
from twinrt.geometry import Grid
from twinrt.model import Case, Dose, Image, Plan, Prescription, Structure, StructureType
from twinrt.planning.beams import Beam
from twinrt.planning.evaluation import (DeliveryAssumptions, GoalSet, beam_mcs, deliverability, evaluate_plan,
                                        load_goal_set, plan_score)
from twinrt.planning.goals import Goal
from twinrt.planning.plan import PlanBeam
from twinrt.planning.sequencing import Segment

GRID = Grid((10, 10, 10), (10.0, 10.0, 10.0))  # 1 cc voxels


def _case(cord_dose=47.2, with_esophagus=False) -> tuple[Case, Dose]:
    """PTV70 (100 voxels at 70 Gy), a 10-voxel cord with one hot voxel, a parotid at 20/30 Gy."""
    dose = np.zeros(GRID.shape, np.float32)
    ptv = np.zeros(GRID.shape, bool)
    ptv[0:4, 0:5, 0:5] = True  # 100 voxels
    dose[ptv] = 70.0
    cord = np.zeros(GRID.shape, bool)
    cord[5, 5, 0:10] = True
    dose[5, 5, 0:10] = 30.0
    dose[5, 5, 0] = cord_dose
    parotid = np.zeros(GRID.shape, bool)
    parotid[8, 0:2, 0:5] = True  # 10 voxels: 5 at 20 Gy, 5 at 30 Gy -> mean 25
    dose[8, 0, 0:5] = 20.0
    dose[8, 1, 0:5] = 30.0
    structures = [Structure("PTV70", ptv, GRID, type=StructureType.TARGET), Structure("Cord", cord, GRID),
                  Structure("Parotid_R", parotid, GRID)]
    if with_esophagus:
        eso = np.zeros(GRID.shape, bool)
        eso[9, 9, :] = True
        structures.append(Structure("Esophagus", eso, GRID))
    case = Case("synthetic", Image(np.zeros(GRID.shape, np.int16), GRID), structures)
    return case, Dose(dose, GRID, name="test")


def _goal_set() -> GoalSet:
    goals = [Goal("PTV70", "D95%", ">=", 70.0, "must", "RTOG 0225"),
             Goal("SpinalCord", "D0.1cc", "<=", 45.0, "must", "QUANTEC"),
             Goal("SpinalCord", "Dmean", "<=", 40.0, "should", "institutional"),
             Goal("RightParotid", "Dmean", "<=", 26.0, "should", "RTOG 0225"),
             Goal("RightParotid", "V25Gy", "<=", 40.0, "nice", "institutional"),
             Goal("Esophagus", "Dmean", "<=", 34.0, "nice", "QUANTEC")]
    return GoalSet("synthetic", goals, aliases={"SpinalCord": ["Cord"], "RightParotid": ["Parotid_R"]},
                   optional_structures=["Esophagus", "RightParotid"])


def test_exact_values_pass_fail_margins_and_explanation():
    case, dose = _case()
    ev = evaluate_plan(case, dose, _goal_set())
    by = {(r.goal.structure, r.goal.metric): r for r in ev.results}
    assert by[("PTV70", "D95%")].value == pytest.approx(70.0) and by[("PTV70", "D95%")].passed
    cord = by[("SpinalCord", "D0.1cc")]
    assert cord.value == pytest.approx(47.2, abs=1e-5) and cord.passed is False
    assert cord.margin == pytest.approx(-2.2, abs=1e-5)
    assert cord.extra["case_structure"] == "Cord"
    assert by[("SpinalCord", "Dmean")].value == pytest.approx((9 * 30 + 47.2) / 10, abs=1e-5)
    assert by[("RightParotid", "Dmean")].value == pytest.approx(25.0) and by[("RightParotid", "Dmean")].margin == 1.0
    assert by[("RightParotid", "V25Gy")].value == pytest.approx(50.0)
    assert by[("Esophagus", "Dmean")].passed is None
    assert ev.not_evaluable == ["Esophagus Dmean <= 34 Gy (nice)"]
    assert not ev.must_passed
    assert ev.explanations[0] == ("The spinal cord's hottest 0.1 cc receives 47.2 Gy, 2.2 Gy above its must "
                                  "limit of 45 Gy (QUANTEC).")
    assert ev.explanations[1].startswith("50.0 % of the right parotid receives 25 Gy or more, 10.0 % above")
    assert len(ev.explanations) == 2
    json.dumps(ev.to_dict())  # JSON-ready
    assert "FAIL" in ev.table() and "not evaluable" in ev.table()


def test_score_must_failures_dominate():
    case, _ = _case()
    bad = evaluate_plan(case, _case(cord_dose=45.5)[1], _goal_set())
    good = evaluate_plan(case, _case(cord_dose=44.0)[1], _goal_set())
    assert good.must_passed and not bad.must_passed
    assert 0 <= good.score <= 100 and bad.score < 0
    # A barely failing must goal still loses to a passing plan with worse other margins.
    assert good.score - bad.score > 99
    assert np.isnan(plan_score([]))


def test_missing_required_structure_is_an_error_optional_is_not_evaluable():
    case, dose = _case()
    gs = _goal_set()
    gs.goals.append(Goal("Brainstem", "D0.1cc", "<=", 54.0, "must", "QUANTEC"))
    with pytest.raises(StructureError, match=r"Brainstem \(tried Brainstem\)"):
        evaluate_plan(case, dose, gs)
    assert _goal_set().check_structures(case) == ["Esophagus"]
    case2, dose2 = _case(with_esophagus=True)
    assert _goal_set().check_structures(case2) == []
    assert evaluate_plan(case2, dose2, _goal_set()).results[-1].passed is True


def _beam(gantry, segments):
    bounds = (0.0, 10.0, 20.0, 30.0)
    return PlanBeam(Beam(gantry), [Segment(bounds, l, r, mu) for l, r, mu in segments])


def test_mcs_open_field_is_one_and_modulation_lowers_it():
    open_field = _beam(0, [((-50, -50, -50), (50, 50, 50), 100)])
    assert beam_mcs(open_field) == pytest.approx(1.0)
    # Two segments: the open field and a half-area one, equal MU -> AAV 1 and 0.5; LSV 1 -> MCS 0.75.
    two = _beam(0, [((-50, -50, -50), (50, 50, 50), 50), ((-50, -50, -50), (0, 0, 0), 50)])
    assert beam_mcs(two) == pytest.approx(0.75)
    # Irregular leaf edges lower the leaf-sequence variability: left bank -50, -10, -50 (span 40).
    ragged = _beam(0, [((-50, -10, -50), (50, 50, 50), 100)])
    lsv_left = ((40 - 40) + (40 - 40)) / (2 * 40)
    aav = 1.0
    assert beam_mcs(ragged) == pytest.approx(aav * lsv_left * 1.0)
    assert beam_mcs(_beam(0, [((-50, -50, -50), (50, 50, 50), 0)])) is None


def test_deliverability_figures_and_time_assumptions():
    plan = Plan(beams=[_beam(0, [((-50, -50, -50), (50, 50, 50), 60), ((-50, -50, -50), (0, 0, 0), 60)]),
                       _beam(90, [((-50, -50, -50), (50, 50, 50), 120)]).to_dict()],
                prescriptions=[Prescription("PTV70", 70.0, 35)])
    d = deliverability(plan, DeliveryAssumptions(segment_overhead_s=2.0, beam_overhead_s=10.0,
                                                 gantry_speed_deg_per_s=6.0))
    assert d["total_mu"] == pytest.approx(240.0) and d["n_segments"] == 3 and d["n_beams"] == 2
    # 240 MU at 600 MU/min = 24 s; 3 segments * 2 s; 2 beams * 10 s; 90 deg at 6 deg/s = 15 s.
    assert d["delivery_time_s"] == pytest.approx(24 + 6 + 20 + 15)
    assert d["mcs"] == pytest.approx((0.75 * 120 + 1.0 * 120) / 240)
    # Gantry may not pass through 180: 170 -> 190 travels 340 degrees.
    far = deliverability([_beam(170, [((-5,) * 3, (5,) * 3, 1)]), _beam(190, [((-5,) * 3, (5,) * 3, 1)])])
    assert far["delivery_time_s"] == pytest.approx(2 * 0.1 + 2 * 2 + 2 * 10 + 340 / 6)
    case, dose = _case()
    ev = evaluate_plan(case, dose, _goal_set(), plan=plan)
    assert ev.deliverability["total_mu"] == pytest.approx(240.0)


def test_prescription_mismatch_warns():
    case, dose = _case()
    case.plans.append(Plan(prescriptions=[Prescription("PTV70", 66.0, 33)]))
    gs = _goal_set()
    gs.prescriptions = [{"target": "PTV70", "dose_gy": 70.0, "fractions": 35}]
    ev = evaluate_plan(case, dose, gs)
    assert any("66 Gy in 33 fractions" in w for w in ev.warnings)


def test_sample_case_reference_dose_against_head_and_neck_set():
    from twinrt.sample import load_sample_case

    case = load_sample_case()
    ev = evaluate_plan(case, case.doses["reference"], "head_and_neck_openkbp")
    print("\n" + ev.table())
    print("\n".join(ev.explanations))
    gs = load_goal_set("head_and_neck_openkbp")
    assert len(ev.results) == len(gs.goals) and ev.not_evaluable == []  # all 10 OpenKBP structures present
    assert all(r.value is not None and np.isfinite(r.value) for r in ev.results)
    cord = [r for r in ev.results if r.goal.structure == "SpinalCord" and r.goal.metric == "D0.1cc"][0]
    assert 0 < cord.value < 70
    assert len(ev.explanations) == len(ev.failed)
