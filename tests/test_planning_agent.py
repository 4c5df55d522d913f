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
    from twinrt.planning.agent import NORMALISE_MAX, _goal_set, _normalise_for_must_goals, evaluate_goals
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
        out = _normalise_for_must_goals(case, gs, planning, results, score)
        if expect:
            new_plan, new_results, _, new_ok, step = out
            assert new_ok and new_results[0].passed and step["accepted"]
            assert step["factor"] == pytest.approx(1.01, abs=0.002)
            assert new_plan.sequencing["total_mu"] > planning.sequencing["total_mu"]
        else:
            assert out is None  # more than NORMALISE_MAX would be needed: left to the conflict report


def _normalisation_inputs(agent_run, ptv_d95_factor, organ_max_factor):
    """Goals PTV D95% >= its delivered value × ``ptv_d95_factor`` and Organ Dmax <= its delivered
    value × ``organ_max_factor`` (both must), with the goal set, results and score on the agent's plan."""
    from twinrt.planning.agent import _goal_set, evaluate_goals

    case = phantom_case()
    planning = agent_run.planning
    d95 = agent_run.results[0].value
    organ_max = evaluate_goals(case, planning.dose, [Goal("Organ", "Dmax", "<=", 1000.0, "must")])[0][0].value
    goals = [Goal("PTV", "D95%", ">=", round(d95 * ptv_d95_factor, 4), "must"),
             Goal("Organ", "Dmax", "<=", round(organ_max * organ_max_factor, 4), "must")]
    gs = _goal_set(goals)
    results, score, _ = evaluate_goals(case, planning.dose, gs)
    return case, planning, goals, gs, results, score


def test_normalisation_never_breaks_a_passing_must_goal(agent_run):
    from twinrt.planning.agent import _normalise_for_must_goals

    # The organ's must-goal passes with 0.5 % to spare; the target needs 1 % more: normalisation is
    # capped below 1.005, so the organ still passes and the target is still short.
    case, planning, goals, gs, results, score = _normalisation_inputs(agent_run, 1.01, 1.005)
    assert results[0].passed is False and results[1].passed
    out = _normalise_for_must_goals(case, gs, planning, results, score)
    assert out is not None
    new_plan, new_results, _, _, step = out
    assert 1.0 < step["factor"] < 1.005 and "capped" in step["reason"]
    assert new_results[1].passed


def test_normalisation_lowers_an_organ_near_maximum_when_the_target_has_room(agent_run):
    # Sequencing can add a few tenths of a Gy to an organ's near-maximum (the cord's D0.1cc on
    # OpenKBP patients): fewer MU take it back when the target's coverage has the room.
    from twinrt.planning.agent import NORMALISE_MAX, _normalise_for_must_goals

    for room, fixed in ((0.03, True), (0.002, False)):
        case, planning, goals, gs, results, score = _normalisation_inputs(agent_run, 1 - room, 0.99)
        assert results[0].passed and results[1].passed is False
        new_plan, new_results, _, new_ok, step = _normalise_for_must_goals(case, gs, planning, results, score)
        assert 1.0 - NORMALISE_MAX <= step["factor"] < 1.0 and new_results[0].passed  # coverage never given up
        if fixed:
            assert new_ok and step["accepted"] and step["factor"] == pytest.approx(0.99, abs=0.002)
            assert new_plan.sequencing["total_mu"] < planning.sequencing["total_mu"]
            assert "1 over their limit" in step["reason"]
        else:
            # The target allows 0.2 % at most: on the scaled plan the organ still fails and the
            # target still passes, and "capped" says why.
            scaled = {g["goal"]: g["passed"] for g in step["goals"]}
            assert scaled[goals[1].describe()] is False and scaled[goals[0].describe()] is True
            assert "capped" in step["reason"] and 0.997 < step["factor"] < 1.0


def test_normalisation_never_scales_a_failing_goal_the_wrong_way(agent_run):
    # A target passing by less than the headroom and an organ over its limit: the only factor that
    # keeps the target (a hair above 1) would push the organ further over; nothing is tried.
    from twinrt.planning.agent import _normalise_for_must_goals

    case, planning, goals, gs, results, score = _normalisation_inputs(agent_run, 0.9995, 0.99)
    assert results[0].passed and results[1].passed is False
    assert _normalise_for_must_goals(case, gs, planning, results, score) is None


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
    # 59.8 Gy: met by the optimised fluence (59.94 Gy) but at no level tried (12: 59.38, 16: 59.55 Gy,
    # nor 24).
    goals = [Goal("PTV", "D95%", ">=", 59.8, "must")]
    _, results, (plan, final, _, ok), trace = _resequence(sequenced_at_8_levels, goals)
    assert plan is sequenced_at_8_levels[4] and final == results and not ok
    assert [s["levels"] for s in trace] == [12, 16, 24] and not any(s["accepted"] for s in trace)
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


def _edits_for(case, goals, values, objectives=(), owned=None):
    """propose_edits for goal results with the given values (pass/fail computed from the limits)."""
    from twinrt.planning.agent import _goal_set, _Lookup, propose_edits
    from twinrt.planning.goals import GoalResult

    results = []
    for g, v in zip(goals, values):
        margin = (g.value - v) if g.comparator == "<=" else (v - g.value)
        results.append(GoalResult(g, v, margin >= 0, margin))
    owned = {} if owned is None else owned
    return propose_edits(_Lookup(case, _goal_set(goals)), results, [dict(o) for o in objectives], owned,
                         {"ptv", "organ", "body"})


def test_should_goals_wait_while_a_must_goal_fails():
    # Escalating every failing goal at once let the parotid and mandible objectives grow ×2 a round
    # against the failing cord and coverage goals (OpenKBP pt_215): they now wait for the musts.
    from twinrt.planning.agent import _Owned

    case = phantom_case()
    goals = [Goal("PTV", "D95%", ">=", 60.0, "must"), Goal("Organ", "Dmean", "<=", 10.0, "should")]
    organ_obj = {"structure": "Organ", "kind": "mean_dose", "dose_gy": 9.7, "weight": 100.0}
    owned = {1: _Owned("Organ", "mean_dose", None, 100.0)}
    waiting = _edits_for(case, goals, [58.0, 15.0], [organ_obj], dict(owned))
    assert [e.structure for e in waiting if e.structure == "Organ"] == []
    assert any(e.structure == "PTV" for e in waiting)  # the must-goal is pushed
    free = _edits_for(case, goals, [61.0, 15.0], [organ_obj], dict(owned))
    assert [(e.structure, e.weight) for e in free] == [("Organ", 200.0)]
    # Nor through another goal's objective: the nice Dmean <= 8 Gy shares the should-goal's
    # mean-dose objective and must not escalate it either.
    shared = goals + [Goal("Organ", "Dmean", "<=", 8.0, "nice")]
    assert not [e for e in _edits_for(case, shared, [58.0, 15.0, 15.0], [organ_obj], dict(owned))
                if e.structure == "Organ"]
    assert [e.weight for e in _edits_for(case, shared, [61.0, 15.0, 15.0], [organ_obj], dict(owned))
            if e.structure == "Organ"] == [200.0]
    # A failing should-goal with no objective yet still gets one at its first weight.
    new = _edits_for(case, goals, [58.0, 15.0])
    assert [(e.structure, e.objective, e.weight) for e in new if e.structure == "Organ"] == [("Organ", "mean_dose", 100.0)]


def test_a_failing_organ_near_maximum_caps_the_hot_spots_of_an_overlapping_target():
    # The optimiser gives shared voxels to the target, so only a cap on the target reaches them
    # (OpenKBP pt_225: PTV70 overlaps the mandible by 21 cc).
    overlapping = phantom_case(target_offset_mm=(25.0, 0.0, 0.0))
    assert (overlapping.structure("PTV").mask & overlapping.structure("Organ").mask).any()
    goals = [Goal("PTV", "D95%", ">=", 60.0, "must"), Goal("Organ", "D0.1cc", "<=", 66.0, "must")]
    edits = _edits_for(overlapping, goals, [60.5, 68.0])
    caps = [e for e in edits if e.structure == "PTV"]
    assert [(e.objective, e.value, e.weight) for e in caps] == [("squared_overdose", pytest.approx(64.02), 300.0)]
    assert "overlaps Organ" in caps[0].reason
    assert any(e.structure == "Organ" and e.objective == "squared_overdose" for e in edits)
    # Still failing next round: the cap keeps the lower level and its weight is raised ×4.
    again = _edits_for(overlapping, goals, [60.5, 67.0], [{"structure": "PTV", "kind": "squared_overdose",
                                                             "dose_gy": 63.0, "weight": 300.0}])
    assert [(e.value, e.weight) for e in again if e.structure == "PTV"] == [(63.0, 1200.0)]
    # No overlap, or a limit whose level would sit below the target's coverage level: no cap.
    assert not [e for e in _edits_for(phantom_case(), goals, [60.5, 68.0]) if e.structure == "PTV"]
    low = [goals[0], Goal("Organ", "D0.1cc", "<=", 62.0, "must")]
    assert not [e for e in _edits_for(overlapping, low, [60.5, 68.0]) if e.structure == "PTV"]
    # A target prescribed well below the organ's limit is not where the organ runs hot: no cap.
    high = [goals[0], Goal("Organ", "D0.1cc", "<=", 75.0, "must")]
    assert not [e for e in _edits_for(overlapping, high, [60.5, 78.0]) if e.structure == "PTV"]
    # Not for a mean-dose goal: the cap is for hot spots.
    mean = [goals[0], Goal("Organ", "Dmean", "<=", 66.0, "must")]
    assert not [e for e in _edits_for(overlapping, mean, [60.5, 68.0]) if e.structure == "PTV"]


def test_the_round_delivered_keeps_the_organ_limits_before_the_coverage():
    # Clinical plans trade a PTV's D95% before the cord's or mandible's limit (the OpenKBP reference
    # plans that miss PTV70 D95% keep them): with as many must-goals met, and even with more, a
    # round that keeps more organ limits is delivered.
    from twinrt.planning.agent import _best_round, _Lookup, _goal_set, _organ_musts_met
    from twinrt.planning.goals import GoalResult

    case = phantom_case()
    goals = [Goal("PTV", "D95%", ">=", 60.0, "must"), Goal("Organ", "D0.1cc", "<=", 40.0, "must"),
             Goal("PTV", "D2%", "<=", 66.0, "must")]
    lookup = _Lookup(case, _goal_set(goals))
    coverage_first = [GoalResult(goals[0], 60.2, True, 0.2), GoalResult(goals[1], 41.0, False, -1.0),
                      GoalResult(goals[2], 65.0, True, 1.0)]
    organ_first = [GoalResult(goals[0], 59.0, False, -1.0), GoalResult(goals[1], 39.0, True, 1.0),
                   GoalResult(goals[2], 67.0, False, -1.0)]
    assert _organ_musts_met(coverage_first, lookup) == 0 and _organ_musts_met(organ_first, lookup) == 1
    rounds = [{"n_organ_must": _organ_musts_met(r, lookup), "n_must": sum(bool(x.passed) for x in r), "score": sc}
              for r, sc in ((coverage_first, 5.0), (organ_first, -5.0))]
    assert _best_round(rounds) == 1
    rounds[1]["n_organ_must"] = 0  # as many organ limits kept: most must-goals, then the score
    assert _best_round(rounds) == 0
