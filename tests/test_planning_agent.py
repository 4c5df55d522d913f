"""The virtual planner on the tiny water phantom of test_planning_workflow (a few seconds per run)."""

import json

import numpy as np
import pytest

from test_planning_workflow import phantom_case
from twinrt.errors import InvalidInputError
from twinrt.model import Case, Structure, StructureType
from twinrt.planning.agent import Edit, apply_edits, apply_goal_edits, virtual_planner
from twinrt.planning.goals import Goal
from twinrt.planning.workflow import PlanSetup, default_objectives
from twinrt.progress import CancelledError, CancelToken

SETUP = PlanSetup.equispaced(5, dose_grid_mm=4.0, max_iter=80, levels=8)
# The organ's mean dose is ~24 Gy with the default objectives; 3.5 Gy needs a new objective and
# then one escalation (measured: 3.77 Gy after the first edit).
GOALS = [Goal("PTV", "D95%", ">=", 57.0, "must"), Goal("Organ", "Dmean", "<=", 3.5, "should")]


@pytest.fixture(scope="module")
def agent_run():
    return virtual_planner(phantom_case(), GOALS, setup=SETUP, max_rounds=5)


def _without_seconds(trace):
    return [{k: v for k, v in step.items() if k != "seconds"} for step in trace]


def test_agent_improves_the_organ_goal_and_keeps_the_must_goal(agent_run):
    res = agent_run
    rounds = [s for s in res.trace if s["step"] == "round"]
    first = rounds[0]["goals"][1]
    assert first["passed"] is False
    best = rounds[res.best_round - 1]["goals"]
    assert best[1]["value"] < first["value"] - 10.0
    assert best[0]["passed"] and res.optimized_results[0].passed
    assert res.rounds >= 3  # the first edit alone was not enough: escalation happened
    assert any("weight ×2" in e["reason"] for s in rounds for e in s["edits"])
    assert res.must_passed and res.conflicts == []
    assert res.planning.plan.approval == "UNAPPROVED" and res.planning.dose.name == "planned"


def test_trace_is_complete_and_json_serialisable(agent_run):
    res = agent_run
    text = json.dumps(res.to_dict())
    back = json.loads(text)
    steps = [s["step"] for s in back["trace"]]
    assert steps[0] == "prepare" and "sequenced" in steps[-2:] and steps.count("round") == res.rounds
    for s in back["trace"][1:-1]:
        assert {"round", "edits", "goals", "score", "must_passed", "seconds"} <= s.keys()
        assert len(s["goals"]) == len(GOALS)
        assert all(e["reason"] for e in s["edits"])
    assert back["stop_reason"] == res.stop_reason != ""


def test_same_inputs_give_the_same_trace_and_weights(agent_run):
    again = virtual_planner(phantom_case(), GOALS, setup=SETUP, max_rounds=5)
    assert _without_seconds(again.trace) == _without_seconds(agent_run.trace)
    assert np.array_equal(again.planning.weights, agent_run.planning.weights)
    assert again.objectives == agent_run.objectives


def test_impossible_must_goals_are_reported_as_a_conflict():
    case = phantom_case()
    grid = case.ct.grid
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    pts = grid.index_to_lps(np.stack([i, j, k], -1).astype(float))
    # An organ reaching 10 mm into the 30 mm target cube: those voxels cannot be both >= 60 and <= 18 Gy.
    organ = (np.abs(pts[..., 0] - 12.0) <= 7) & (np.abs(pts[..., 1]) <= 7) & (np.abs(pts[..., 2]) <= 10)
    structures = [s if s.name != "Organ" else Structure("Organ", organ, grid, (0, 255, 0), StructureType.ORGAN)
                  for s in case.structures]
    case = Case(case.patient_id, case.ct, structures, {}, [], dict(case.metadata))
    goals = [Goal("PTV", "D98%", ">=", 60.0, "must"), Goal("Organ", "Dmax", "<=", 18.0, "must")]
    res = virtual_planner(case, goals, setup=SETUP, max_rounds=3)
    assert not res.must_passed and res.conflicts
    text = " ".join(c["text"] for c in res.conflicts)
    assert "PTV D98% >= 60 Gy (must)" in text and "Organ Dmax <= 18 Gy (must)" in text
    assert "overlap" in text
    assert res.trace[-1]["conflicts"]


def test_cancel_raises_cancelled_error():
    token = CancelToken()

    def progress(fraction, text):
        if text.startswith("Round 2"):
            token.cancel()

    with pytest.raises(CancelledError):
        virtual_planner(phantom_case(), GOALS, setup=SETUP, max_rounds=5, progress=progress, cancel=token)


def test_apply_edits_sets_scales_and_removes_objectives():
    objs = default_objectives(phantom_case())
    new = apply_edits(objs, [
        Edit("set_objective", "organ", objective="mean_dose", value=10.0, weight=50.0, reason="spare it"),
        Edit("set_objective", "Organ", objective="max_dvh", value=20.0, weight=10.0, volume_percent=30.0),
        Edit("scale_weight", "PTV", objective="squared_underdose", factor=2.0),
        Edit("remove_objective", "Body")])
    assert objs == default_objectives(phantom_case())  # input untouched
    mean = [o for o in new if o["kind"] == "mean_dose"]
    assert mean == [{"structure": "Organ", "kind": "mean_dose", "dose_gy": 10.0, "weight": 50.0}]
    assert {"structure": "Organ", "kind": "max_dvh", "dose_gy": 20.0, "volume_percent": 30.0, "weight": 10.0} in new
    under = [o for o in new if o["kind"] == "squared_underdose"]
    assert under[0]["weight"] == 6000.0
    assert not any(o["structure"] == "Body" for o in new)
    with pytest.raises(InvalidInputError, match="Spleen"):
        apply_edits(objs, [Edit("scale_weight", "Spleen", factor=2.0)])
    with pytest.raises(InvalidInputError, match="Unknown edit kind"):
        Edit("teleport", "PTV")
    goals = apply_goal_edits(GOALS, [Edit("add_goal", "Organ", metric="Dmax", comparator="<=", value=30.0,
                                          priority="nice"), Edit("remove_goal", "PTV")])
    assert [g.describe() for g in goals] == ["Organ Dmean <= 3.5 Gy (should)", "Organ Dmax <= 30 Gy (nice)"]


def test_no_goals_is_refused():
    with pytest.raises(InvalidInputError, match="No goals"):
        virtual_planner(phantom_case(), [], setup=SETUP)


def test_conflicts_name_only_binding_goals():
    from twinrt.planning.agent import _Lookup, _goal_set, find_conflicts
    from twinrt.planning.goals import GoalResult

    case = phantom_case()
    # Goals on the target itself always pull against its coverage (same voxels).
    goals = [Goal("PTV", "D95%", ">=", 60.0, "must"), Goal("PTV", "Dmean", "<=", 100.0, "should"),
             Goal("PTV", "Dmax", "<=", 66.0, "should")]
    lookup = _Lookup(case, _goal_set(goals))

    def results(mean, dmax):
        return [GoalResult(goals[0], 58.0, False, -2.0), GoalResult(goals[1], mean, mean <= 100.0, 100.0 - mean),
                GoalResult(goals[2], dmax, dmax <= 66.0, 66.0 - dmax)]

    # Mean 60 Gy (40 Gy to spare) is not what holds the coverage back; Dmax 65.5 Gy is at its limit.
    rs = results(60.0, 65.5)
    conflicts = find_conflicts(lookup, rs, rs, 3)
    assert conflicts[0]["opposing"] == ["PTV Dmax <= 66 Gy (should)"]
    assert "Dmean" not in conflicts[0]["text"]
    # Both with room to spare: no goal is blamed, and the text says what else may help.
    rs = results(60.0, 50.0)
    conflicts = find_conflicts(lookup, rs, rs, 3)
    assert conflicts[0]["opposing"] == [] and "beam angles" in conflicts[0]["text"]
    # Met by the optimised fluence, lost in sequencing: the text says what was tried, or suggests it.
    optimized = [GoalResult(goals[0], 60.5, True, 0.5)] + rs[1:]
    lost = find_conflicts(lookup, rs, optimized, 3)[0]["text"]
    assert "not after leaf sequencing" in lost and "more intensity levels" in lost
    tried = find_conflicts(lookup, rs, optimized, 3, {"levels": 40, "normalised": True})[0]["text"]
    assert "up to 40 intensity levels and plan normalisation did not restore it" in tried


def test_normalisation_restores_target_coverage_lost_in_sequencing(agent_run):
    from twinrt.planning.agent import NORMALISE_MAX, _Lookup, _goal_set, _normalise_for_coverage, evaluate_goals
    from twinrt.planning.workflow import normalise_result

    case = phantom_case()
    planning = agent_run.planning
    # normalise_result: MU and dose scale exactly, the ideal fluence does not.
    scaled = normalise_result(planning, 1.02)
    assert scaled.plan.beams[0].segments[0].mu == pytest.approx(1.02 * planning.plan.beams[0].segments[0].mu)
    assert np.allclose(scaled.dose.array, 1.02 * planning.dose.array, rtol=1e-6)
    assert scaled.sequencing["total_mu"] == pytest.approx(1.02 * planning.sequencing["total_mu"])
    assert scaled.sequencing["normalisation_factor"] == pytest.approx(1.02)
    assert np.array_equal(scaled.weights, planning.weights) and planning.sequencing.get("normalisation_factor") is None
    with pytest.raises(InvalidInputError, match="> 0"):
        normalise_result(planning, 0.0)

    d95 = agent_run.results[0].value
    for short, expect in ((0.01, True), (NORMALISE_MAX + 0.02, False)):
        goals = [Goal("PTV", "D95%", ">=", round(d95 * (1 + short), 3), "must"), GOALS[1]]
        gs = _goal_set(goals)
        results, score, ok = evaluate_goals(case, planning.dose, gs)
        assert results[0].passed is False and not ok
        out = _normalise_for_coverage(case, gs, _Lookup(case, gs), planning, results, score)
        if expect:
            new_plan, new_results, _, new_ok, step = out
            assert new_ok and new_results[0].passed and step["accepted"]
            assert step["factor"] == pytest.approx(1.01, abs=0.002)
            assert new_plan.sequencing["total_mu"] > planning.sequencing["total_mu"]
        else:
            assert out is None  # more than NORMALISE_MAX would be needed: left to the conflict report


def test_normalisation_never_breaks_a_passing_must_goal(agent_run):
    from twinrt.planning.agent import _Lookup, _goal_set, _normalise_for_coverage, evaluate_goals

    case = phantom_case()
    planning = agent_run.planning
    d95 = agent_run.results[0].value
    organ_max = evaluate_goals(case, planning.dose, [Goal("Organ", "Dmax", "<=", 1000.0, "must")])[0][0].value
    # The organ's must-goal passes with 0.5 % to spare; the target needs 1 % more: normalisation is
    # capped below 1.005, so the organ still passes and the target is still short.
    goals = [Goal("PTV", "D95%", ">=", round(d95 * 1.01, 3), "must"),
             Goal("Organ", "Dmax", "<=", round(organ_max * 1.005, 3), "must")]
    gs = _goal_set(goals)
    results, score, _ = evaluate_goals(case, planning.dose, gs)
    assert results[0].passed is False and results[1].passed
    out = _normalise_for_coverage(case, gs, _Lookup(case, gs), planning, results, score)
    assert out is not None
    new_plan, new_results, _, _, step = out
    assert 1.0 < step["factor"] < 1.005 and "capped" in step["reason"]
    assert new_results[1].passed


@pytest.fixture(scope="module")
def sequenced_at_8_levels():
    """The phantom optimised once and sequenced at 8 intensity levels (with its problem and fluence)."""
    from twinrt.planning.workflow import optimize_problem, prepare_problem, sequence_result

    case = phantom_case()
    problem = prepare_problem(case, SETUP)
    objs = [dict(o) for o in default_objectives(case, problem.prescriptions)]
    opt = optimize_problem(problem, objs)
    return case, problem, objs, opt, sequence_result(problem, opt, objs)


def _resequence(sequenced, goals, seconds_left=lambda: None):
    from twinrt.model import Dose
    from twinrt.planning.agent import _goal_set, _resequence_finer, evaluate_goals

    case, problem, objs, opt, planning = sequenced
    gs = _goal_set(goals)
    optimized = evaluate_goals(case, Dose(opt.dose_gy, problem.dose_grid), gs)[0]
    results, score, _ = evaluate_goals(case, planning.dose, gs)
    trace = []
    out = _resequence_finer(case, gs, problem, opt, objs, "T", planning, results, optimized, score, seconds_left, trace)
    return optimized, results, out, trace


def test_resequencing_with_more_levels_restores_a_must_goal_lost_in_sequencing(sequenced_at_8_levels):
    # Measured on this phantom: PTV D95% 59.94 Gy optimised, 58.81 Gy sequenced at 8 levels,
    # 59.38 Gy at 12 levels (×1.5). A must-goal at 59.3 Gy is met, lost, then restored.
    goals = [Goal("PTV", "D95%", ">=", 59.3, "must"), Goal("Organ", "Dmean", "<=", 100.0, "should")]
    optimized, results, (plan, final, score, ok), trace = _resequence(sequenced_at_8_levels, goals)
    assert optimized[0].passed and results[0].passed is False
    assert ok and final[0].passed
    assert plan.setup.levels == 12 and plan.plan.beams and plan.dose.array.max() > 0
    assert plan.sequencing["n_segments"] > sequenced_at_8_levels[4].sequencing["n_segments"]
    assert [s["levels"] for s in trace] == [12] and trace[0]["accepted"]
    assert "PTV D95% >= 59.3 Gy (must)" in trace[0]["reason"] and trace[0]["segments"] == plan.sequencing["n_segments"]
    json.dumps(trace)


def test_resequencing_keeps_the_plan_when_no_finer_sequence_helps(sequenced_at_8_levels):
    # 59.8 Gy: met by the optimised fluence (59.94 Gy) but at no level tried (12: 59.38, 16: 59.55 Gy).
    goals = [Goal("PTV", "D95%", ">=", 59.8, "must")]
    _, results, (plan, final, _, ok), trace = _resequence(sequenced_at_8_levels, goals)
    assert plan is sequenced_at_8_levels[4] and final == results and not ok
    assert [s["levels"] for s in trace] == [12, 16] and not any(s["accepted"] for s in trace)
    assert all("not kept" in s["reason"] for s in trace)


def test_resequencing_respects_the_time_budget(sequenced_at_8_levels):
    goals = [Goal("PTV", "D95%", ">=", 59.3, "must")]
    _, results, (plan, final, _, ok), trace = _resequence(sequenced_at_8_levels, goals, seconds_left=lambda: 0.0)
    assert plan is sequenced_at_8_levels[4] and not ok
    assert len(trace) == 1 and not trace[0]["accepted"] and "not tried" in trace[0]["reason"]


def test_resequencing_does_nothing_when_sequencing_lost_no_must_goal(sequenced_at_8_levels):
    # The goal fails on the optimised fluence too: finer sequencing cannot be what it needs.
    goals = [Goal("PTV", "D95%", ">=", 65.0, "must")]
    optimized, _, (plan, _, _, ok), trace = _resequence(sequenced_at_8_levels, goals)
    assert optimized[0].passed is False and plan is sequenced_at_8_levels[4] and trace == [] and not ok
