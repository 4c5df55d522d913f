"""What AIPlanner writes about an agent plan and its review, as plain Python (no ``slicer`` import).

The Logic turns these rows and dicts into a goals table, node attributes and the study's plan
history; the Widget colours the goals table by :func:`goalStatus`. Keeping them here lets the
tests check them without a scene, as :mod:`AIPlannerLib.planRecord` does for the plan tables.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

#: Node and study attributes of the planning agent (prefixed with the module name, STYLE.md
#: section 2; never rename them: saved scenes hold these names).
#: On the goals table: the goal set's name (or file path) the goals came from.
GOAL_SET_ATTRIBUTE = "AIPlanner.GoalSet"
#: On the goals table: the goals actually planned for (goal dicts), after any feedback edits.
GOALS_ATTRIBUTE = "AIPlanner.Goals"
#: On the beams table: the agent's rounds, edits, stop reason and conflicts (``AgentResult.to_dict``).
AGENT_TRACE_ATTRIBUTE = "AIPlanner.AgentTrace"
#: On the beams table: agent settings that reproduce the run (goal set, rounds, iterations).
AGENT_SETTINGS_ATTRIBUTE = "AIPlanner.AgentSettings"
#: On the study item: the plan versions (JSON list of :func:`historyEntry` dicts), oldest first.
PLAN_HISTORY_ATTRIBUTE = "AIPlanner.PlanHistory"
#: ``AIPlanner.EngineId`` of agent plans (plans from fixed objectives keep planRecord.ENGINE_ID).
AGENT_ENGINE_ID = "twinrt.planning.agent.virtual_planner"
#: ``TwinRT.Role`` of the goals table and of the plan-history table.
ROLE_GOALS = "PlanGoals"
ROLE_HISTORY = "PlanHistory"

#: Values of the goals table's ``status`` column (the Widget colours rows by them).
STATUS_PASS, STATUS_FAIL, STATUS_NOT_EVALUABLE = "pass", "fail", "not evaluable"
#: Column units of the goals table; ``limit``, ``value`` and ``margin`` are in each row's ``unit``.
GOAL_COLUMNS = ("structure", "metric", "comparator", "limit", "unit", "priority", "value", "margin", "passed",
                "explanation")


def goalStatus(passed: Optional[bool]) -> str:
    """``pass``, ``fail`` or ``not evaluable`` (a goal whose structure the case lacks)."""
    if passed is None:
        return STATUS_NOT_EVALUABLE
    return STATUS_PASS if passed else STATUS_FAIL


def goalRows(results: Sequence[Any]) -> list[dict[str, Any]]:
    """One goals-table row per goal result, in goal-set order.

    :param results: :class:`twinrt.planning.goals.GoalResult` objects.
    :return: dicts keyed by :data:`GOAL_COLUMNS`; ``value``/``margin`` are None when not evaluable
        (NaN in the table), ``passed`` is the :func:`goalStatus` text.
    """
    rows = []
    for r in results:
        g = r.goal
        rows.append({"structure": g.structure, "metric": g.metric, "comparator": g.comparator, "limit": float(g.value),
                     "unit": g.unit, "priority": g.priority,
                     "value": None if r.value is None else float(r.value),
                     "margin": None if r.margin is None else float(r.margin),
                     "passed": goalStatus(r.passed), "explanation": r.explanation or g.describe()})
    return rows


def goalsToJson(goals: Sequence[Any]) -> str:
    """The goals as JSON (goal-file dicts), for :data:`GOALS_ATTRIBUTE`."""
    return json.dumps([g.to_dict() for g in goals])


def goalsFromJson(text: str) -> list:
    """The goals of :func:`goalsToJson` text (``unit`` is derived from the metric, so it is dropped)."""
    from twinrt.planning.goals import Goal

    return [Goal(**{k: v for k, v in d.items() if k != "unit"}) for d in json.loads(text or "[]")]


def historyEntry(version: int, planNodeId: str, planName: str, label: str, state: str, score: float,
                 mustPassed: bool, created: str, parentVersion: Optional[int] = None, feedback: str = "",
                 seconds: float = 0.0) -> dict[str, Any]:
    """One plan version of the study's history (:data:`PLAN_HISTORY_ATTRIBUTE`).

    :param version: 1, 2, ... within the study.
    :param planNodeId: ID of the plan's beams table; :param planName: its name; :param label: RT plan label.
    :param state: review state (draft/proposed/approved/rejected); :param score: plan score.
    :param mustPassed: every must-goal met; :param created: ISO 8601 UTC time.
    :param parentVersion: the version the feedback was given on (None for a first plan).
    :param feedback: the feedback text that produced this version.
    :param seconds: planning time.
    """
    return {"version": int(version), "planNodeID": planNodeId, "name": planName, "label": label, "state": state,
            "score": round(float(score), 3), "must_passed": bool(mustPassed), "created": created,
            "parent": parentVersion, "feedback": feedback, "seconds": round(float(seconds), 2), "reviewer": "",
            "review_comment": ""}


def historyRows(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the plan-history table (text and numbers only; ``parent`` 0 for a first plan)."""
    return [{"version": float(h["version"]), "plan": h["name"], "state": h["state"], "score": float(h["score"]),
             "must_passed": "yes" if h["must_passed"] else "no", "created": h["created"],
             "parent": float(h["parent"] or 0), "feedback": h.get("feedback", ""), "reviewer": h.get("reviewer", ""),
             "review_comment": h.get("review_comment", "")} for h in history]


def historyText(entry: dict[str, Any]) -> str:
    """One line for the Widget's plan-history list."""
    text = (f"v{entry['version']} {entry['state']}: score {entry['score']:.1f}, must-goals "
            f"{'met' if entry['must_passed'] else 'NOT all met'} ({entry['created']})")
    if entry.get("reviewer"):
        text += f", by {entry['reviewer']}"
    if entry.get("feedback"):
        text += f' after "{entry["feedback"]}"'
    return text
