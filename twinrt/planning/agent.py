"""The virtual planner: optimise, check the clinical goals, adjust the objectives, repeat.

:func:`virtual_planner` computes the dose-influence matrix once (:func:`~twinrt.planning.workflow.prepare_problem`)
and then runs rounds of fluence optimisation, each warm-started from the previous round's
weights. After every round it evaluates the goals on the optimised dose and a rule-based policy
(:func:`propose_edits`) turns the goal results into objective edits (:class:`Edit`). At the end the
best round is leaf-sequenced and the goals are evaluated again on the deliverable dose. Every step
is recorded in a JSON-serialisable trace, and must-goals that still fail are explained by naming
the goals that pull the other way (:attr:`AgentResult.conflicts`).

Rules (in this order of priority: must > should > nice; the numbers are module constants):

* A failing goal gets its own objective, mirroring it: an upper limit on an organ (``Dmean <= X``,
  ``Dmax``/``D0.1cc``/``D2%`` ``<= X``, ``V20Gy <= 30%``) becomes a mean-dose, squared-overdose or
  max-DVH objective at ``X`` minus a margin (:data:`LEVEL_MARGIN`); a lower limit on a target
  (``D95% >= X``, ``Dmin``, ``V95%Rx >= 98%``) becomes a squared-underdose or min-DVH objective at
  ``X`` plus the margin. Its first weight depends on the goal's priority (:data:`FIRST_WEIGHT`).
* A goal that still fails has its objective's weight multiplied by :data:`ESCALATION` (×4 must,
  ×2 should, ×1.5 nice) and its dose level moved by half the remaining excess (towards 0 for upper
  limits, up to ``1.1 X`` for lower limits). A failing target coverage goal also scales the
  target's existing squared-underdose objectives by the same factor. While a must-goal fails,
  should- and nice-goals that still fail keep their objective as it is, including one another goal
  made (a new one is still added at its first weight), and the planner does not stop for "no
  improvement" until they have had a round after every must-goal passed: escalating them too made
  them pull against the failing must-goal round after round (measured on OpenKBP patients: the
  spinal cord's D0.1cc and the PTV coverage took turns failing while the parotid and mandible
  objectives grew ×2 a round).
* A failing must-goal on an organ's near-maximum (``D0.1cc``, ``D1cc``, ``Dmax <= X``) also caps the
  hot spots of a target that overlaps the organ at ``X`` minus the margin (a squared-overdose
  objective on the target): the shared voxels belong to the target in the optimisation, out of the
  organ objective's reach. Only targets whose dose lower limits are at least
  :data:`HOT_TARGET_FRACTION` of that level, and only when the level is at or above what those
  limits aim at (``1 + LEVEL_MARGIN`` times them).
* A goal that passes by a large margin (:data:`RELAX_MARGIN` of its limit) while a goal of at least
  its priority fails has the weight of its agent-made objective halved (never below a quarter of
  its first weight), to give room to the failing goal. Objectives the user gave are never relaxed.
* The planner stops when every goal passes; when every must-goal passes and no should- or
  nice-goal improved in the last round; when no rule applies; after ``max_rounds``; or when the
  next round would exceed ``time_budget_s``. The round delivered is the best one: most organ
  must-goals met (an organ's dose limits before a target's coverage, as clinical plans trade them:
  the OpenKBP reference plans that miss a PTV's D95% keep the cord, brainstem and mandible limits),
  then most must-goals, then the highest score.
* After leaf sequencing, a must-goal that the optimised fluence met but the sequenced plan does not
  (quantisation to intensity levels costs a few tenths of a Gy of D95% or of an organ's D0.1cc)
  makes the planner sequence the same fluence again with more intensity levels
  (:data:`RESEQUENCE_FACTORS`), while the time budget plus :data:`RESEQUENCE_GRACE_S` allows; the
  finer plan is kept only when it meets more must-goals (more segments are not traded for score
  alone).
* Then must-goals that the sequencing still costs are restored by plan normalisation: every MU ×
  one factor within 1 ± :data:`NORMALISE_MAX` (up for a dose lower limit such as a target's
  coverage, down for a dose upper limit such as an organ's near-maximum), never so far that a
  must-goal that passes fails, kept only when more must-goals are met (or as many, with a higher
  score).

The policy is deterministic: the same case, goals, set-up and objectives give the same trace
(except its ``seconds``) and the same weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from twinrt.errors import InvalidInputError
from twinrt.model import Case, Dose, Prescription, Structure, StructureType
from twinrt.planning.goals import PRIORITIES, Goal, GoalResult
from twinrt.planning.objectives import Objective, objective_from_dict
from twinrt.planning.workflow import (PlanningProblem, PlanningResult, PlanSetup, default_objectives,
                                      optimize_problem, prepare_problem, sequence_result)
from twinrt.progress import CancelToken, ProgressCallback, report

#: Edit kinds understood by :func:`apply_edits` (objectives) and :func:`apply_goal_edits` (goals).
OBJECTIVE_EDIT_KINDS = ("set_objective", "scale_weight", "remove_objective")
GOAL_EDIT_KINDS = ("add_goal", "remove_goal")
#: Edit kinds understood by :func:`apply_setup_edits` (the plan set-up: smoothing, sequencing).
SETUP_EDIT_KINDS = ("set_setup",)
#: Set-up parameters a ``set_setup`` edit may change, with their allowed range (inclusive).
SETUP_PARAMETERS = {"smoothness_weight": (0.0, 1.0e6), "levels": (2, 100), "min_segment_mu": (0.0, 1000.0)}
#: Weight multiplier for a goal that still fails, by priority (must pulls hardest).
ESCALATION = {"must": 4.0, "should": 2.0, "nice": 1.5}
#: First weight of an objective made for a failing goal: (target goals, other goals), by priority.
#: Targets start near the default underdose weight (3000) because coverage objectives compete with
#: the default deviation objective (1000); organ objectives start an order of magnitude lower, near
#: the default organ weights (30), and escalate.
FIRST_WEIGHT = {"must": (3000.0, 300.0), "should": (1000.0, 100.0), "nice": (300.0, 30.0)}
#: Relative margin between a goal's limit and the dose level of its objective (aim a bit inside).
LEVEL_MARGIN = 0.03
#: A near-maximum goal: a dose limit on at most this percentage of an organ (D0.1cc, D1cc, D2%).
NEAR_MAX_PERCENT = 5.0
#: Targets whose dose lower limit is at least this fraction of an overlapping organ's near-maximum
#: level get their hot spots capped when that organ's must-goal fails.
HOT_TARGET_FRACTION = 0.9
#: A goal passing by at least this fraction of its limit may be relaxed.
RELAX_MARGIN = 0.2
#: Relaxation factor and the floor (fraction of the first weight) below which it stops.
RELAX_FACTOR = 0.5
RELAX_FLOOR = 0.25
#: A margin change smaller than this fraction of the limit (at least 0.01 unit) is "no improvement".
IMPROVEMENT_TOL = 0.002
#: Organs within this distance (mm) of a target count as pulling against its coverage.
NEIGHBOUR_MM = 10.0
#: Plan normalisation after sequencing: at most this fraction more (or fewer) MU to restore
#: must-goals lost in leaf sequencing, aiming this fraction (headroom) beyond the limit.
NORMALISE_MAX = 0.03
NORMALISE_HEADROOM = 0.001
#: Re-sequencing after leaf sequencing lost a must-goal the optimised fluence met: the same fluence
#: is sequenced again with the set-up's intensity levels times each factor in turn (finer
#: quantisation, so a smaller loss, at the price of more segments), up to :data:`RESEQUENCE_MAX_LEVELS`.
RESEQUENCE_FACTORS = (1.5, 2.0, 3.0)
RESEQUENCE_MAX_LEVELS = 60
#: Seconds past ``time_budget_s`` that re-sequencing may still use (the budget bounds the optimisation
#: rounds; one sequencing takes a few seconds, and the rounds may use the budget up to its end, which
#: left plans that finer sequencing would have saved as they were).
RESEQUENCE_GRACE_S = 15.0
_DVH_KINDS = ("max_dvh", "min_dvh")


@dataclass(frozen=True)
class Edit:
    """One structured change to the objectives (or the goals), with the reason for it.

    Kinds:

    * ``set_objective``: set the objective ``objective`` (a kind, e.g. ``"mean_dose"``) on
      ``structure`` to dose ``value`` (Gy) and ``weight``; DVH kinds also take ``volume_percent``.
      An existing objective with the same structure, kind (and volume) is replaced, else one is added.
    * ``scale_weight``: multiply by ``factor`` the weight of the objectives on ``structure`` (only
      those of kind ``objective`` when given).
    * ``remove_objective``: remove the objectives on ``structure`` (of kind ``objective`` when given).
    * ``add_goal``: add the goal ``structure metric comparator value`` with ``priority``.
    * ``remove_goal``: remove the goals on ``structure`` (with ``metric`` when given).
    * ``set_setup``: set the plan set-up's ``parameter`` (one of :data:`SETUP_PARAMETERS`:
      fluence smoothness, intensity levels, least segment MU) to ``value``; ``structure`` is ``"plan"``.

    :param kind: one of the kinds above.
    :param structure: structure name (matched case-insensitively).
    :param objective: objective kind (see :mod:`twinrt.planning.objectives`), for objective edits.
    :param metric: goal metric (``"Dmean"``, ``"D95%"``), for goal edits.
    :param value: objective dose (Gy) or goal limit.
    :param weight: objective weight (``set_objective``).
    :param volume_percent: DVH objective volume (%).
    :param factor: weight multiplier (``scale_weight``).
    :param comparator: ``"<="`` or ``">="`` (``add_goal``).
    :param priority: ``must``, ``should`` or ``nice`` (``add_goal``).
    :param reason: plain words: why the edit is made.
    :param parameter: the set-up parameter (``set_setup``).
    """

    kind: str
    structure: str
    objective: str = ""
    metric: str = ""
    value: Optional[float] = None
    weight: Optional[float] = None
    volume_percent: Optional[float] = None
    factor: Optional[float] = None
    comparator: str = ""
    priority: str = ""
    reason: str = ""
    parameter: str = ""

    def __post_init__(self) -> None:
        kinds = OBJECTIVE_EDIT_KINDS + GOAL_EDIT_KINDS + SETUP_EDIT_KINDS
        if self.kind not in kinds:
            raise InvalidInputError(f"Unknown edit kind '{self.kind}'; use one of {', '.join(kinds)}")
        if not str(self.structure).strip():
            raise InvalidInputError(f"A {self.kind} edit needs a structure name ('plan' for set-up edits)")
        if self.kind == "set_setup":
            if self.parameter not in SETUP_PARAMETERS:
                raise InvalidInputError(f"A set_setup edit changes one of {', '.join(SETUP_PARAMETERS)}, "
                                        f"got {self.parameter!r}")
            lo, hi = SETUP_PARAMETERS[self.parameter]
            if self.value is None or not (math.isfinite(self.value) and lo <= self.value <= hi):
                raise InvalidInputError(f"{self.parameter} must be a number in [{lo:g}, {hi:g}], got {self.value!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (fields left at their defaults are dropped)."""
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


def _same_objective(o: dict[str, Any], structure: str, kind: str, volume: Optional[float]) -> bool:
    if o["structure"].lower() != structure.lower() or (kind and o["kind"] != kind):
        return False
    if kind in _DVH_KINDS and volume is not None:
        return abs(float(o.get("volume_percent", -1.0)) - float(volume)) < 1e-9
    return True


def apply_edits(objectives: Sequence[Objective | dict[str, Any]], edits: Iterable[Edit]) -> list[dict[str, Any]]:
    """Apply the objective edits (goal edits are skipped: see :func:`apply_goal_edits`) in order.

    :param objectives: objectives or their dicts (not modified).
    :param edits: the edits.
    :return: the new objective dicts, each valid for :func:`~twinrt.planning.objectives.objective_from_dict`.
    :raises InvalidInputError: an edit that matches no objective, or gives an invalid objective.
    """
    objs = [dict(o) if isinstance(o, dict) else o.to_dict() for o in objectives]
    for e in edits:
        if e.kind == "set_objective":
            if not e.objective or e.value is None:
                raise InvalidInputError(f"set_objective on '{e.structure}' needs an objective kind and a dose")
            new: dict[str, Any] = {"structure": e.structure, "kind": e.objective, "dose_gy": float(e.value)}
            if e.objective in _DVH_KINDS:
                if e.volume_percent is None:
                    raise InvalidInputError(f"A {e.objective} objective on '{e.structure}' needs a volume_percent")
                new["volume_percent"] = float(e.volume_percent)
            idx = [i for i, o in enumerate(objs) if _same_objective(o, e.structure, e.objective, e.volume_percent)]
            if idx:
                new["structure"] = objs[idx[0]]["structure"]
                new["weight"] = float(e.weight) if e.weight is not None else float(objs[idx[0]].get("weight", 1.0))
                objs[idx[0]] = new
            else:
                new["weight"] = float(e.weight) if e.weight is not None else 1.0
                objs.append(new)
            objective_from_dict(new)  # refuses invalid doses/weights with a message naming the structure
        elif e.kind == "scale_weight":
            if e.factor is None or not (math.isfinite(e.factor) and e.factor >= 0):
                raise InvalidInputError(f"scale_weight on '{e.structure}' needs a factor >= 0, got {e.factor!r}")
            hit = [o for o in objs if _same_objective(o, e.structure, e.objective, e.volume_percent)]
            if not hit:
                raise InvalidInputError(f"No {e.objective or ''} objective on '{e.structure}' to scale; "
                                        "add one with set_objective first".replace("  ", " "))
            for o in hit:
                o["weight"] = float(o.get("weight", 1.0)) * float(e.factor)
        elif e.kind == "remove_objective":
            kept = [o for o in objs if not _same_objective(o, e.structure, e.objective, e.volume_percent)]
            if len(kept) == len(objs):
                raise InvalidInputError(f"No {e.objective or ''} objective on '{e.structure}' to remove"
                                        .replace("  ", " "))
            objs = kept
    return objs


def apply_goal_edits(goals: Sequence[Goal], edits: Iterable[Edit]) -> list[Goal]:
    """Apply the goal edits (``add_goal``, ``remove_goal``; objective edits are skipped) in order.

    :raises InvalidInputError: an invalid goal, or a removal that matches no goal.
    """
    out = list(goals)
    for e in edits:
        if e.kind == "add_goal":
            if e.value is None or not e.metric:
                raise InvalidInputError(f"add_goal on '{e.structure}' needs a metric and a value")
            out.append(Goal(e.structure, e.metric, e.comparator or "<=", float(e.value), e.priority or "should",
                            note=e.reason))
        elif e.kind == "remove_goal":
            kept = [g for g in out if not (g.structure.lower() == e.structure.lower()
                                           and (not e.metric or g.metric.lower() == e.metric.lower()))]
            if len(kept) == len(out):
                raise InvalidInputError(f"No goal on '{e.structure}' {e.metric} to remove".replace("  ", " "))
            out = kept
    return out


@dataclass
class AgentResult:
    """What :func:`virtual_planner` produced.

    :param planning: the delivered plan (best round, sequenced) as a :class:`PlanningResult`.
    :param objectives: the objective dicts of the delivered round.
    :param goals: the goals planned for.
    :param results: goal results on the sequenced dose; ``optimized_results``: on the ideal fluence.
    :param score: :func:`twinrt.planning.evaluation.plan_score` of the sequenced dose;
        ``must_passed``: every evaluable must-goal met there.
    :param trace: one dict per round, then one for the sequenced plan (JSON-serialisable).
    :param conflicts: one dict per must-goal still failing: ``goal``, ``opposing`` (goal
        descriptions), ``text`` (plain words).
    :param best_round: the round delivered; ``rounds``: rounds run; ``stop_reason``: why it stopped.
    :param seconds: wall time of the whole run.
    """

    planning: PlanningResult
    objectives: list[dict[str, Any]]
    goals: list[Goal]
    results: list[GoalResult]
    optimized_results: list[GoalResult]
    score: float
    must_passed: bool
    trace: list[dict[str, Any]]
    conflicts: list[dict[str, Any]]
    best_round: int
    rounds: int
    stop_reason: str
    seconds: float

    @property
    def explanations(self) -> list[str]:
        """The goal results in plain words, then the conflicts."""
        return [r.explanation for r in self.results] + [c["text"] for c in self.conflicts]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (trace, conflicts, objectives, final goal results)."""
        return {"best_round": self.best_round, "rounds": self.rounds, "stop_reason": self.stop_reason,
                "seconds": self.seconds, "score": self.score, "must_passed": self.must_passed,
                "objectives": self.objectives, "goals": [g.to_dict() for g in self.goals],
                "results": [_result_dict(r) for r in self.results], "conflicts": self.conflicts,
                "trace": self.trace}


def apply_setup_edits(setup: PlanSetup, edits: Iterable[Edit]) -> PlanSetup:
    """Apply the ``set_setup`` edits (other kinds are skipped) in order; ``setup`` is not modified.

    :return: a new :class:`~twinrt.planning.workflow.PlanSetup` (``levels`` rounded to an integer).
    """
    out = setup
    for e in edits:
        if e.kind == "set_setup":
            value: Any = int(round(float(e.value))) if e.parameter == "levels" else float(e.value)
            out = replace(out, **{e.parameter: value})
    return out


# ---------------------------------------------------------------------------------------- evaluation
def _goal_set(goals: Any) -> Any:
    """A :class:`twinrt.planning.evaluation.GoalSet` for ``goals`` (a goal set, or a plain list of goals).

    A plain list becomes a set in which every structure is optional, so that goals on structures
    the case lacks are reported as not evaluable instead of refusing the case.
    """
    from twinrt.planning.evaluation import GoalSet

    if isinstance(goals, GoalSet):
        return goals
    items = list(goals.goals) if hasattr(goals, "goals") else list(goals)
    for g in items:
        if not isinstance(g, Goal):
            raise InvalidInputError(f"Goals must be Goal instances (or a goal set), got {g!r}")
    if not items:
        raise InvalidInputError("No goals given: the virtual planner needs clinical goals to plan for")
    return GoalSet("goals", items, optional_structures=list(dict.fromkeys(g.structure for g in items)))


class _Lookup:
    """Goal structure name → the case's structure (aliases of the goal set honoured; ``None``: absent)."""

    def __init__(self, case: Case, goal_set: Any) -> None:
        self._map = {k.lower(): v for k, v in goal_set.resolve(case).items()}

    def __call__(self, name: str) -> Optional[Structure]:
        s = self._map.get(name.lower())
        return None if s is None or s.is_empty else s


def evaluate_goals(case: Case, dose: Dose, goals: Any) -> tuple[list[GoalResult], float, bool]:
    """Goal results, score and must-passed of ``dose`` (:func:`twinrt.planning.evaluation.evaluate_plan`).

    :param goals: a goal set or a list of goals (see :func:`_goal_set`).
    """
    from twinrt.planning.evaluation import evaluate_plan

    ev = evaluate_plan(case, dose, _goal_set(goals))
    return ev.results, float(ev.score), bool(ev.must_passed)


def _musts_met(results: Sequence[GoalResult]) -> int:
    return sum(bool(r.passed) for r in results if r.goal.priority == "must")


def _organ_musts_met(results: Sequence[GoalResult], lookup: Callable[[str], Optional[Structure]]) -> int:
    """Must-goals met that limit the dose of a structure that is not a target (an organ's limits)."""
    def organ(name: str) -> bool:
        s = lookup(name)
        return s is None or s.type != StructureType.TARGET

    return sum(1 for r in results if r.goal.priority == "must" and r.passed and r.goal.comparator == "<="
               and organ(r.goal.structure))


def _best_round(rounds: Sequence[dict[str, Any]]) -> int:
    """Index of the round to deliver: most organ must-goals met, then most must-goals, then the
    highest score, then the earliest."""
    return max(range(len(rounds)),
               key=lambda i: (rounds[i]["n_organ_must"], rounds[i]["n_must"], rounds[i]["score"], -i))


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(float(x), 4)


def _result_dict(r: GoalResult) -> dict[str, Any]:
    return {"goal": r.goal.describe(), "value": _round(r.value), "passed": r.passed, "margin": _round(r.margin)}


# ---------------------------------------------------------------------------------------- policy
@dataclass
class _Owned:
    """An objective the agent made for a goal: its identity and first weight."""

    structure: str
    kind: str
    volume_percent: Optional[float]
    first_weight: float


def _structure_volume_cc(s: Structure) -> float:
    return float(s.mask.sum()) * s.grid.voxel_volume_cc


def _dose_metric_percent(metric: Any, structure: Structure) -> float:
    """The volume (% of ``structure``, clipped to 0–100) that a ``D<x>%`` or ``D<x>cc`` metric names."""
    pct = metric.parameter if metric.kind == "dose_at_percent" else \
        100.0 * metric.parameter / max(_structure_volume_cc(structure), 1e-9)
    return min(max(pct, 0.0), 100.0)


def goal_objective(goal: Goal, structure: Structure) -> Optional[dict[str, Any]]:
    """The objective that pulls ``goal`` towards passing (without weight), or ``None`` when no rule fits.

    Upper limits aim at ``limit × (1 - LEVEL_MARGIN)``, lower limits at ``limit × (1 + LEVEL_MARGIN)``.
    """
    m = goal.parsed_metric
    upper = goal.comparator == "<="
    shift = (1.0 - LEVEL_MARGIN) if upper else (1.0 + LEVEL_MARGIN)
    vol = _structure_volume_cc(structure)
    name = structure.name
    if m.is_dose:
        level = goal.value * shift
        if m.kind == "mean":
            return {"structure": name, "kind": "mean_dose", "dose_gy": level} if upper else \
                {"structure": name, "kind": "min_dvh", "dose_gy": level, "volume_percent": 50.0}
        if m.kind in ("max", "min"):
            if (m.kind == "max") != upper:
                return None  # "Dmax >= X" or "Dmin <= X": nothing sensible to push
            return {"structure": name, "kind": "squared_overdose" if upper else "squared_underdose", "dose_gy": level}
        pct = _dose_metric_percent(m, structure)
        # A D_x with a tiny (upper) or nearly whole (lower) volume is a max/min: voxel-wise is steadier.
        if upper and pct <= 2.0:
            return {"structure": name, "kind": "squared_overdose", "dose_gy": level}
        if not upper and pct >= 98.0:
            return {"structure": name, "kind": "squared_underdose", "dose_gy": level}
        return {"structure": name, "kind": "max_dvh" if upper else "min_dvh", "dose_gy": level,
                "volume_percent": round(pct, 4)}
    # V_xGy (<=|>=) y: a DVH objective at dose x (shifted) and volume y.
    pct = goal.value if m.kind == "volume_percent_at" else 100.0 * goal.value / max(vol, 1e-9)
    pct = min(max(pct, 0.0), 100.0)
    if upper and pct >= 100.0 or not upper and pct <= 0.0:
        return None
    return {"structure": name, "kind": "max_dvh" if upper else "min_dvh", "dose_gy": m.parameter * shift,
            "volume_percent": round(pct, 4)}


def _find_objective(objs: Sequence[dict[str, Any]], owned: _Owned) -> Optional[dict[str, Any]]:
    for o in objs:
        if _same_objective(o, owned.structure, owned.kind, owned.volume_percent):
            return o
    return None


def _limit_scale(goal: Goal) -> float:
    return max(abs(goal.value), 1.0)


def _cap_overlapping_targets(lookup: Callable[[str], Optional[Structure]], results: Sequence[GoalResult], goal: Goal,
                             organ: Structure, objectives: Sequence[dict[str, Any]],
                             touched: set[tuple[str, str, Optional[float]]], factor: float) -> list[Edit]:
    """Squared-overdose objectives on the targets that overlap ``organ``, at its failing near-maximum limit.

    The optimiser gives voxels shared by a target and an organ to the target, so the organ's own
    objective cannot reach the target's hot spots inside it (OpenKBP pt_225: PTV70 overlaps the
    mandible by 21 cc, whose D1cc <= 75 Gy failed round after round). Only a near-maximum goal
    (Dmax, D0.1cc, D1cc, ... of at most :data:`NEAR_MAX_PERCENT` of the organ) caps the targets
    whose dose lower limits are within :data:`HOT_TARGET_FRACTION` of its level (a lower-dose target
    that overlaps the organ is not where it runs hot: capping it pulled PTV56 down against PTV70 on
    pt_225), and only when the level stays at or above the level those limits aim at
    (``1 + LEVEL_MARGIN`` times the limit), so the cap never asks for less than the coverage. An
    existing squared-overdose objective on the target (the prescription's 107 % cap, or one made for
    a D2% goal) keeps the lower of the two levels and has its weight × ``factor`` (at least the
    must-goal's first organ weight), every round the organ's goal still fails.
    """
    m = goal.parsed_metric
    if m.kind != "max" and (m.kind not in ("dose_at_percent", "dose_at_cc")
                            or _dose_metric_percent(m, organ) > NEAR_MAX_PERCENT):
        return []
    level = goal.value * (1.0 - LEVEL_MARGIN)
    edits = []
    seen: set[str] = set()
    for r in results:
        t = lookup(r.goal.structure)
        if t is None or t.type != StructureType.TARGET or t.name.lower() in seen:
            continue
        seen.add(t.name.lower())
        floor = max([h.goal.value for h in results if h.goal.comparator == ">=" and h.goal.parsed_metric.is_dose
                     and lookup(h.goal.structure) is t], default=0.0)
        key = (t.name.lower(), "squared_overdose", None)
        if floor < HOT_TARGET_FRACTION * level or level < floor * (1.0 + LEVEL_MARGIN) or key in touched \
                or _overlap_cc(organ, t) <= 0.0:
            continue
        touched.add(key)
        current = [o for o in objectives if _same_objective(o, t.name, "squared_overdose", None)]
        weight = max([FIRST_WEIGHT["must"][1]] + [float(o["weight"]) * factor for o in current])
        new_level = min([level] + [float(o["dose_gy"]) for o in current])
        reason = (f"{goal.describe()} fails and {t.name} overlaps {organ.name}: {t.name}'s hot spots capped at "
                  f"{new_level:.2f} Gy (weight {weight:g}), since the shared voxels belong to {t.name} in the "
                  "optimisation")
        edits.append(Edit("set_objective", t.name, objective="squared_overdose", value=round(new_level, 4),
                          weight=weight, reason=reason))
    return edits


def propose_edits(lookup: Callable[[str], Optional[Structure]], results: Sequence[GoalResult],
                  objectives: Sequence[dict[str, Any]], owned: dict[int, _Owned], optimizable: set[str]) -> list[Edit]:
    """The rule-based policy: objective edits for one round's goal results (rules: module docstring).

    :param lookup: goal structure name → the case's structure (``None`` when absent).
    :param results: goal results of the round, in goal order.
    :param objectives: the objectives of the round.
    :param owned: goal index → the objective the agent made for it (updated in place for new ones).
    :param optimizable: lower-case names of structures that keep voxels in the optimisation.
    """
    edits: list[Edit] = []
    failing_prios = {PRIORITIES.index(r.goal.priority) for r in results if r.passed is False}
    must_failing = PRIORITIES.index("must") in failing_prios
    # Must-goals first so that, when two edits touch one objective, the must-goal's comes first.
    order = sorted(range(len(results)), key=lambda i: (PRIORITIES.index(results[i].goal.priority), i))
    touched: set[tuple[str, str, Optional[float]]] = set()
    for i in order:
        r = results[i]
        g = r.goal
        s = lookup(g.structure)
        if r.passed is None or s is None or s.name.lower() not in optimizable:
            continue
        is_target = s.type == StructureType.TARGET
        factor = ESCALATION[g.priority]
        if r.passed is False:
            excess = abs(float(r.margin))
            unit = g.unit
            what = f"{g.describe()} fails: {g.metric} is {r.value:.2f} {unit}, {excess:.2f} {unit} " \
                   f"{'above' if g.comparator == '<=' else 'below'} the limit"
            known = owned.get(i)
            current = _find_objective(objectives, known) if known else None
            if current is not None and must_failing and g.priority != "must":
                continue  # escalated only once every must-goal passes (must > should > nice)
            if current is None:
                spec = goal_objective(g, s)
                if spec is None:
                    continue
                key = (spec["structure"].lower(), spec["kind"], spec.get("volume_percent"))
                if key in touched:
                    continue
                if must_failing and g.priority != "must" and any(
                        (o.structure.lower(), o.kind, o.volume_percent) == key for j, o in owned.items() if j != i):
                    continue  # another goal's objective (a parotid's nice 20 Gy on its should 26 Gy): it waits too
                touched.add(key)
                existing = [o for o in objectives if _same_objective(o, s.name, spec["kind"], spec.get("volume_percent"))]
                first = FIRST_WEIGHT[g.priority][0 if is_target else 1]
                weight = max([first] + [float(o["weight"]) * factor for o in existing])
                owned[i] = _Owned(s.name, spec["kind"], spec.get("volume_percent"), first)
                edits.append(Edit("set_objective", s.name, objective=spec["kind"], value=round(spec["dose_gy"], 4),
                                  weight=weight, volume_percent=spec.get("volume_percent"),
                                  reason=f"{what}; {spec['kind'].replace('_', ' ')} objective at "
                                         f"{spec['dose_gy']:.2f} Gy (weight {weight:g}) to pull it back"))
            else:
                key = (known.structure.lower(), known.kind, known.volume_percent)
                if key in touched:
                    continue
                touched.add(key)
                level = float(current["dose_gy"])
                # Move the level by half the remaining excess (in dose units; for volume metrics by
                # the margin fraction), so that the next round aims further inside the limit.
                step = 0.5 * excess if g.parsed_metric.is_dose else LEVEL_MARGIN * level
                if g.comparator == "<=":
                    new_level = max(0.0, level - step)
                else:
                    cap = 1.1 * (g.value if g.parsed_metric.is_dose else g.parsed_metric.parameter)
                    new_level = min(max(level, cap), level + step) if level < cap else level
                weight = float(current["weight"]) * factor
                edits.append(Edit("set_objective", known.structure, objective=known.kind, value=round(new_level, 4),
                                  weight=weight, volume_percent=known.volume_percent,
                                  reason=f"{what} (still); weight ×{factor:g} to {weight:g}, level "
                                         f"{level:.2f} → {new_level:.2f} Gy"))
            if g.priority == "must" and not is_target and g.comparator == "<=" and g.parsed_metric.is_dose:
                edits.extend(_cap_overlapping_targets(lookup, results, g, s, objectives, touched, factor))
            if is_target and g.comparator == ">=":
                for o in objectives:
                    if o["structure"].lower() == s.name.lower() and o["kind"] == "squared_underdose" \
                            and (o["structure"].lower(), "squared_underdose", None) not in touched:
                        touched.add((o["structure"].lower(), "squared_underdose", None))
                        edits.append(Edit("scale_weight", o["structure"], objective="squared_underdose",
                                          factor=factor, reason=f"{g.describe()} fails: target underdose "
                                                                f"weight ×{factor:g}"))
                        break
        elif r.passed and i in owned and r.margin is not None and r.margin >= RELAX_MARGIN * _limit_scale(g):
            # Relax only for a failing goal at least as important as this one (must > should > nice).
            if not any(p <= PRIORITIES.index(g.priority) for p in failing_prios):
                continue
            known = owned[i]
            current = _find_objective(objectives, known)
            key = (known.structure.lower(), known.kind, known.volume_percent)
            if current is None or key in touched:
                continue
            weight = float(current["weight"]) * RELAX_FACTOR
            if weight < RELAX_FLOOR * known.first_weight:
                continue
            touched.add(key)
            edits.append(Edit("scale_weight", known.structure, objective=known.kind, volume_percent=known.volume_percent,
                              factor=RELAX_FACTOR,
                              reason=f"{g.describe()} passes by {r.margin:.2f} {g.unit}; weight ×{RELAX_FACTOR:g} "
                                     "to give room to failing goals"))
    return edits


# ---------------------------------------------------------------------------------------- conflicts
def _overlap_cc(a: Structure, b: Structure) -> float:
    """Volume (cc) that ``a`` and ``b`` share, on ``a``'s grid."""
    return float((a.mask & b.on_grid(a.grid)).sum()) * a.grid.voxel_volume_cc


def _gap_mm(a: Structure, b: Structure) -> tuple[float, float]:
    """(overlap in cc, gap in mm between the masks; 0 when they touch or overlap) on ``a``'s grid."""
    from scipy import ndimage

    overlap = _overlap_cc(a, b)
    if overlap > 0:
        return overlap, 0.0
    ma = a.mask
    mb = b.on_grid(a.grid)
    if not mb.any():
        return 0.0, math.inf
    sp = tuple(float(v) for v in a.grid.spacing_mm[::-1])  # (i, j, k) → (k, j, i)
    pad = [int(math.ceil(NEIGHBOUR_MM / s)) + 1 for s in sp]
    idx = np.argwhere(ma)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, ma.shape)
    sl = tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))
    if not mb[sl].any():
        return 0.0, math.inf
    dist = ndimage.distance_transform_edt(~ma[sl], sampling=sp)
    return 0.0, float(dist[mb[sl]].min())


def find_conflicts(lookup: Callable[[str], Optional[Structure]], results: Sequence[GoalResult], optimized: Sequence[GoalResult],
                   rounds: int, sequencing_tried: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """Explain every must-goal that fails on the delivered dose.

    ``sequencing_tried`` (``levels``: the most intensity levels tried, ``normalised``: whether plan
    normalisation was tried) makes the text for a goal lost in leaf sequencing say what the
    planner already did about it, instead of suggesting it.

    Opposing goals: goals with the other comparator on the same structure, or on a structure that
    overlaps it or lies within :data:`NEIGHBOUR_MM` (a target's lower limit against an organ's
    upper limit pull the same voxels, or the dose fall-off between them, in opposite directions),
    and that are *binding*: failing too, or met by less than :data:`RELAX_MARGIN` of their limit. A
    goal met with room to spare is not what holds the failing one back and is never named.
    """
    out = []
    by_goal = {id(x.goal): x for x in results}
    for r, ro in zip(results, optimized):
        g = r.goal
        if g.priority != "must" or r.passed is not False:
            continue
        s = lookup(g.structure)
        opposing = []
        for h in (x.goal for x in results):
            t = lookup(h.structure)
            if h is g or h.comparator == g.comparator or s is None or t is None:
                continue
            rh = by_goal[id(h)]
            if rh.passed is None:
                continue
            if rh.passed and rh.margin is not None and rh.margin >= RELAX_MARGIN * _limit_scale(h):
                continue
            if t.name == s.name:
                opposing.append((0, 0.0, h, f"both are on {s.name}"))
                continue
            overlap, gap = _gap_mm(s, t)
            if overlap > 0:
                opposing.append((1, -overlap, h, f"{t.name} and {s.name} overlap by {overlap:.1f} cc, and those "
                                                 f"voxels cannot satisfy both"))
            elif gap <= NEIGHBOUR_MM:
                opposing.append((2, gap, h, f"{t.name} lies {gap:.0f} mm from {s.name}, too close for the dose to "
                                            f"fall from one limit to the other"))
        opposing.sort(key=lambda x: (x[0], x[1], PRIORITIES.index(x[2].priority)))
        if ro.passed:
            text = f"'{g.describe()}' is met by the optimised fluence but not after leaf sequencing ({r.explanation}); "
            tried = sequencing_tried or {}
            if tried.get("levels"):
                text += f"sequencing again at up to {tried['levels']} intensity levels" + \
                        (" and plan normalisation" if tried.get("normalised") else "") + \
                        " did not restore it: raise its priority or weight, or relax a goal that competes with it."
            else:
                text += "more intensity levels or smaller segments may keep it."
        elif opposing:
            # Each opposing goal with its own reason (two goals may oppose for different reasons).
            names = " and ".join(f"'{x[2].describe()}' ({x[3]})" for x in opposing[:2])
            text = f"'{g.describe()}' still fails after {rounds} round(s) of escalation: it conflicts with {names}. " \
                   "Relax one of them (or change the contours) to meet the other."
        else:
            text = f"'{g.describe()}' still fails after {rounds} round(s) of escalation and no goal near it is at " \
                   "its limit; more beams, other beam angles or more optimisation rounds may be needed."
        out.append({"goal": g.describe(), "opposing": [x[2].describe() for x in opposing], "text": text})
    return out


# ---------------------------------------------------------------------------------------- re-sequencing
def _resequence_finer(case: Case, goal_set: Any, problem: PlanningProblem, opt: Any, objectives: Sequence[dict[str, Any]],
                      label: str, planning: PlanningResult, results: list[GoalResult], optimized: Sequence[GoalResult],
                      score: float, seconds_left: Callable[[], Optional[float]], trace: list[dict[str, Any]],
                      cancel: Optional[CancelToken] = None) -> tuple[PlanningResult, list[GoalResult], float, bool]:
    """Sequence ``opt`` again with more intensity levels when sequencing lost a must-goal.

    Only must-goals met by the optimised fluence (``optimized``) and failed by the sequenced plan
    (``results``) count as lost. Each factor of :data:`RESEQUENCE_FACTORS` is tried in turn while
    ``seconds_left()`` (``None``: no budget) exceeds the last sequencing time; a finer plan is kept
    only when it meets more must-goals. Every try is a ``resequence`` step of ``trace``.

    :return: (plan, goal results, score, must_passed) of the plan kept.
    """
    from twinrt.planning.workflow import sequence_result

    must_ok = all(r.passed is not False for r in results if r.goal.priority == "must")
    def lost_in_sequencing(now: Sequence[GoalResult]) -> list[str]:
        return [r.goal.describe() for r, o in zip(now, optimized) if r.goal.priority == "must" and r.passed is False
                and o.passed]

    lost = lost_in_sequencing(results)
    base = int(problem.setup.levels)
    seq_s = float(planning.timings_s.get("sequencing_s", 0.0))
    tried: set[int] = {base}
    current = base
    for factor in RESEQUENCE_FACTORS:
        if not lost or must_ok:
            break
        levels = min(int(round(base * factor)), RESEQUENCE_MAX_LEVELS)
        if levels in tried or levels <= current:
            continue
        tried.add(levels)
        left = seconds_left()
        if left is not None and left < seq_s:
            trace.append({"step": "resequence", "levels": levels, "accepted": False,
                          "reason": f"not tried: {max(left, 0.0):.0f} s of the time budget left, sequencing takes "
                                    f"{seq_s:.0f} s"})
            break
        t0 = time.perf_counter()
        finer = replace(problem, setup=replace(problem.setup, levels=levels))
        cand = sequence_result(finer, opt, objectives, label, planning.timings_s, None, cancel)
        new, new_score, new_ok = evaluate_goals(case, cand.dose, goal_set)
        before, after = _musts_met(results), _musts_met(new)
        accepted = after > before
        trace.append({"step": "resequence", "levels": levels, "accepted": accepted,
                      "segments": int(cand.sequencing.get("n_segments", 0)),
                      "total_mu": _round(cand.sequencing.get("total_mu")),
                      "reason": f"the optimised fluence meets {', '.join(lost)}, the plan sequenced at {current} "
                                f"levels does not; at {levels} levels {after} must-goal(s) are met instead of {before}"
                                + ("" if accepted else "; not kept (no better)"),
                      "goals": [_result_dict(r) for r in new], "score": _round(new_score), "must_passed": new_ok,
                      "seconds": round(time.perf_counter() - t0, 3)})
        seq_s = float(cand.timings_s.get("sequencing_s", seq_s))
        if accepted:
            planning, results, score, must_ok, current = cand, new, new_score, new_ok, levels
            lost = lost_in_sequencing(results)
    return planning, results, score, must_ok


# ---------------------------------------------------------------------------------------- normalisation
def _normalise_for_must_goals(case: Case, goal_set: Any, planning: PlanningResult, results: Sequence[GoalResult],
                              score: float) -> Optional[tuple[PlanningResult, list[GoalResult], float, bool, dict]]:
    """Plan normalisation after sequencing: every MU × one factor within ±:data:`NORMALISE_MAX` when
    that meets more must-goals.

    Dose is linear in MU, so a must-goal on a dose metric (D95%, D0.1cc, Dmean, ...) passes on one
    side of ``limit / value``: a lower limit needs a factor at least that, an upper limit at most
    that. Leaf sequencing typically costs a few tenths of a Gy of a target's coverage (a factor
    above 1 restores it) or adds as much to an organ's near-maximum (a factor below 1 takes it
    back, when the targets have the room). Each failing must-goal of that kind proposes the factor
    that just meets it (:data:`NORMALISE_HEADROOM` beyond); a must-goal that passes before is never
    given up, so the factors are clipped to the range that keeps every passing one (partial
    normalisation, "capped"). The factor that meets the most failing must-goals is tried, nearest
    1 on ties; the goals are evaluated on the scaled plan (volume metrics such as V20Gy are checked
    there, halving the step when one that passed breaks), and it is kept only when it meets more
    must-goals, or as many with a higher score. Returns ``None`` when nothing is tried.
    """
    from twinrt.planning.workflow import normalise_result

    def threshold(r: GoalResult) -> Optional[float]:
        g = r.goal
        if g.priority != "must" or not g.parsed_metric.is_dose or r.value is None or not float(r.value) > 0:
            return None
        return g.value / float(r.value)

    lo, hi = 1.0 - NORMALISE_MAX, 1.0 + NORMALISE_MAX
    keep_lo, keep_hi = lo, hi  # the range that keeps every passing must-goal on a dose metric
    needs: list[tuple[str, float]] = []  # failing must-goals: (comparator, factor that just meets it)
    for r in results:
        t = threshold(r)
        if t is None or r.passed is None:
            continue
        if r.passed:
            if r.goal.comparator == ">=":
                keep_lo = max(keep_lo, t * (1.0 + NORMALISE_HEADROOM))
            else:
                keep_hi = min(keep_hi, t * (1.0 - NORMALISE_HEADROOM))
        else:
            need = t * (1.0 + NORMALISE_HEADROOM) if r.goal.comparator == ">=" else t * (1.0 - NORMALISE_HEADROOM)
            if lo <= need <= hi:
                needs.append((r.goal.comparator, need))
    if not needs or keep_lo > keep_hi:
        return None

    def met(f: float) -> int:
        return sum(f >= n if c == ">=" else f <= n for c, n in needs)

    # Each need, clipped to the range that keeps the passing ones; a clipped factor that went to the
    # other side of 1 would push its goal the wrong way and is dropped. Most needs met first, then
    # the factor nearest 1, then the lower one (an organ's limit before a target's coverage).
    candidates = sorted(((min(max(n, keep_lo), keep_hi), n) for _, n in needs
                         if (min(max(n, keep_lo), keep_hi) - 1.0) * (n - 1.0) > 0.0),
                        key=lambda c: (-met(c[0]), abs(c[0] - 1.0), c[0]))
    if not candidates:
        return None
    factor, need = candidates[0]
    capped = factor != need
    before = _musts_met(results)
    passing_ids = {id(r) for r in results if r.goal.priority == "must" and r.passed}
    for _ in range(4):
        if abs(factor - 1.0) < 1e-6:
            return None
        scaled = normalise_result(planning, factor)
        new, new_score, new_ok = evaluate_goals(case, scaled.dose, goal_set)
        broken = [r.goal.describe() for r, n in zip(results, new) if id(r) in passing_ids and n.passed is False]
        if not broken:
            break
        factor = 1.0 + 0.5 * (factor - 1.0)
    else:
        return None
    after = _musts_met(new)
    accepted = after > before or (after == before and new_score > score)
    short = sum(c == ">=" for c, _ in needs)
    what = "; ".join(x for x in (f"{short} must-goal(s) short" if short else "",
                                 f"{len(needs) - short} over their limit" if len(needs) > short else "") if x)
    step = {"step": "normalise", "factor": round(factor, 5), "accepted": accepted,
            "reason": f"{what} after leaf sequencing; every MU ×{factor:.4f}"
                      f"{' (capped by the must-goals that pass)' if capped else ''} meets {after} must-goal(s) "
                      f"instead of {before}" + ("" if accepted else "; not kept (no better)"),
            "goals": [_result_dict(r) for r in new], "score": _round(new_score), "must_passed": new_ok}
    if not accepted:
        return planning, list(results), score, False, step
    return scaled, new, new_score, new_ok, step


# ---------------------------------------------------------------------------------------- the planner
def _optimizable(problem: PlanningProblem) -> set[str]:
    """Lower-case names of structures with voxels left after the optimiser's overlap rule."""
    from twinrt.planning.optimizer import OVERLAP_PRIORITY

    masks = {s.name: np.asarray(s.on_grid(problem.dose_grid), bool) for s in problem.structures}
    out = set()
    for s in problem.structures:
        m = masks[s.name].copy()
        for o in problem.structures:
            if o is not s and OVERLAP_PRIORITY[o.type] < OVERLAP_PRIORITY[s.type]:
                m &= ~masks[o.name]
        if m.any():
            out.add(s.name.lower())
    return out


def virtual_planner(case: Case, goals: Any, setup: Optional[PlanSetup] = None,
                    objectives: Optional[Sequence[Objective | dict[str, Any]]] = None,
                    prescriptions: Optional[Sequence[Prescription]] = None, max_rounds: int = 6,
                    round_iter: Optional[int] = None, time_budget_s: Optional[float] = None,
                    label: str = "TwinRT AI", progress: Optional[ProgressCallback] = None,
                    cancel: Optional[CancelToken] = None,
                    reference_doses: Optional[dict[str, Dose]] = None) -> AgentResult:
    """Plan ``case`` for clinical ``goals``: optimise, evaluate, adjust the objectives, repeat.

    :param case: CT (HU) with structures and prescriptions.
    :param goals: a :class:`~twinrt.planning.evaluation.GoalSet` (its aliases name the case's
        structures) or a list of :class:`~twinrt.planning.goals.Goal`.
    :param setup: beams and parameters (``max_iter`` is the first round's iterations).
    :param objectives: starting objectives; default :func:`~twinrt.planning.workflow.default_objectives`.
    :param prescriptions: default the case's prescriptions.
    :param max_rounds: most optimisation rounds (>= 1).
    :param round_iter: iterations of each warm-started round after the first; default
        ``max(20, setup.max_iter // 2)`` (a warm start needs fewer).
    :param time_budget_s: stop before a round that would end after this many seconds from the start
        (re-sequencing may use :data:`RESEQUENCE_GRACE_S` more).
    :param label: RT plan label.
    :param progress: ``progress(fraction, text)``.
    :param cancel: cancel token (raises :class:`twinrt.progress.CancelledError`).
    :param reference_doses: doses that dose-mimicking objectives refer to by name (e.g. a prediction,
        ``"predicted"``, and its ``"predicted_std"``: :func:`twinrt.planning.kbp.mimicking_objectives`).
    :raises InvalidInputError: no goals, ``max_rounds < 1``, or what :func:`~twinrt.planning.workflow.plan_case` raises.
    """
    t_start = time.perf_counter()
    goal_set = _goal_set(goals)
    goal_list = list(goal_set.goals)
    lookup = _Lookup(case, goal_set)
    if int(max_rounds) < 1:
        raise InvalidInputError(f"max_rounds must be >= 1, got {max_rounds!r}")
    setup = setup or PlanSetup()
    later_iter = int(round_iter) if round_iter else max(20, setup.max_iter // 2)

    def sub(lo: float, hi: float) -> Optional[ProgressCallback]:
        return None if progress is None else (lambda f, text: progress(lo + (hi - lo) * f, text))

    report(progress, 0.0, "Preparing the dose-influence matrix", cancel)
    problem = prepare_problem(case, setup, prescriptions, sub(0.0, 0.3), cancel)
    if reference_doses:
        problem.set_reference_doses(dict(reference_doses))
    objs = [dict(o) if isinstance(o, dict) else o.to_dict()
            for o in (objectives or default_objectives(case, problem.prescriptions))]
    optimizable = _optimizable(problem)
    owned: dict[int, _Owned] = {}
    trace: list[dict[str, Any]] = [{"step": "prepare", "seconds": round(time.perf_counter() - t_start, 3),
                                    "dij_nnz": int(problem.dij_stats.get("nnz", 0)),
                                    "goals": [g.describe() for g in goal_list]}]
    rounds: list[dict[str, Any]] = []  # per round: objectives, opt, results, score
    weights = None
    edits: list[Edit] = []
    stop_reason = ""
    span = 0.65 / int(max_rounds)
    for rnd in range(1, int(max_rounds) + 1):
        t0 = time.perf_counter()
        lo = 0.3 + (rnd - 1) * span
        report(progress, lo, f"Round {rnd}: optimising", cancel)
        opt = optimize_problem(problem, objs, initial_weights=weights,
                               max_iter=setup.max_iter if rnd == 1 else later_iter,
                               progress=sub(lo, lo + 0.9 * span), cancel=cancel)
        weights = opt.weights
        dose = Dose(opt.dose_gy, problem.dose_grid, name="optimized")
        report(progress, lo + 0.9 * span, f"Round {rnd}: checking the goals", cancel)
        results, score, must_ok = evaluate_goals(case, dose, goal_set)
        n_must = _musts_met(results)
        improved = False
        if rounds:
            for prev, now in zip(rounds[-1]["results"], results):
                if now.goal.priority != "must" and prev.passed is False and now.margin is not None:
                    tol = max(IMPROVEMENT_TOL * _limit_scale(now.goal), 0.01)
                    improved |= bool(now.passed) or now.margin > prev.margin + tol
        rounds.append({"objectives": [dict(o) for o in objs], "opt": opt, "results": results, "score": score,
                       "must_ok": must_ok, "n_must": n_must, "n_organ_must": _organ_musts_met(results, lookup)})
        seconds = time.perf_counter() - t0
        trace.append({"step": "round", "round": rnd, "edits": [e.to_dict() for e in edits],
                      "iterations": int(opt.iterations), "objective": _round(opt.total_objective),
                      "goals": [_result_dict(r) for r in results], "score": _round(score), "must_passed": must_ok,
                      "seconds": round(seconds, 3)})
        if all(r.passed is not False for r in results):
            stop_reason = "every goal is met"
            break
        # The should- and nice-goals waited while a must-goal failed: they get a round of their own
        # before "no improvement" can stop the planner.
        if must_ok and rnd > 1 and not improved and rounds[-2]["must_ok"]:
            stop_reason = "every must-goal is met and no other goal improved in the last round"
            break
        if rnd == int(max_rounds):
            stop_reason = f"reached the limit of {max_rounds} round(s)"
            break
        elapsed = time.perf_counter() - t_start
        if time_budget_s is not None and elapsed + seconds > time_budget_s:
            stop_reason = f"the next round would exceed the time budget of {time_budget_s:g} s"
            break
        edits = propose_edits(lookup, results, objs, owned, optimizable)
        if not edits:
            stop_reason = "no rule applies to the goals that fail"
            break
        objs = apply_edits(objs, edits)

    best = _best_round(rounds)
    chosen = rounds[best]
    t0 = time.perf_counter()
    timings = dict(problem.timings_s)
    timings["optimization_s"] = sum(float(r["opt"].time_s) for r in rounds)
    planning = sequence_result(problem, chosen["opt"], chosen["objectives"], label, timings, sub(0.95, 1.0), cancel)
    final, score, must_ok = evaluate_goals(case, planning.dose, goal_set)
    trace.append({"step": "sequenced", "round": best + 1, "goals": [_result_dict(r) for r in final],
                  "score": _round(score), "must_passed": must_ok, "stop_reason": stop_reason,
                  "seconds": round(time.perf_counter() - t0, 3)})
    if not must_ok:
        def seconds_left() -> Optional[float]:
            return None if time_budget_s is None else \
                time_budget_s + RESEQUENCE_GRACE_S - (time.perf_counter() - t_start)

        planning, final, score, must_ok = _resequence_finer(case, goal_set, problem, chosen["opt"],
                                                            chosen["objectives"], label, planning, final,
                                                            chosen["results"], score, seconds_left, trace, cancel)
    if not must_ok:
        normalised = _normalise_for_must_goals(case, goal_set, planning, final, score)
        if normalised is not None:
            planning, final, score, must_ok, step = normalised
            trace.append(step)
    tried = {"levels": max([int(t["levels"]) for t in trace if t["step"] == "resequence" and "segments" in t],
                           default=0),
             "normalised": any(t["step"] == "normalise" for t in trace)}
    conflicts = find_conflicts(lookup, final, chosen["results"], len(rounds), tried)
    trace[-1]["conflicts"] = [c["text"] for c in conflicts]
    return AgentResult(planning, chosen["objectives"], goal_list, final, chosen["results"], score, must_ok, trace,
                       conflicts, best + 1, len(rounds), stop_reason, time.perf_counter() - t_start)
