"""The virtual planner on OpenKBP validation patients against the H&N goal set, next to the reference dose.

For each patient: the ``head_and_neck_openkbp`` goal set, 9 equispaced 6 MV beams,
:func:`twinrt.planning.agent.virtual_planner` from the default objectives, then the goals evaluated
the same way (:func:`twinrt.planning.evaluation.evaluate_plan`) on the reference dose and on the
auto plan's sequenced dose. Issue 4's target: the auto plan meets every must-goal the reference
meets on >= 90 % of patients, in under 3 minutes per plan on 2 cores.

Needs ../shared/data. Usage::

    .venv/bin/python bench/agent_openkbp.py                  # all 33 validation patients
    .venv/bin/python bench/agent_openkbp.py --patients 2     # the first two
    .venv/bin/python bench/agent_openkbp.py --dose-grid-mm 5 --levels 10   # faster, coarser

Defaults: dose on the CT grid (so the plan is evaluated like the reference dose, without the
trilinear blur of a coarser grid) and 20 intensity levels for leaf sequencing.

Some OpenKBP patients lack an organ the clinical goal set requires (e.g. no Brainstem contour):
the benchmarks make every structure but PTV70 optional (``openkbp_common.openkbp_goal_set``), so
that those goals are reported as not evaluable instead of refusing the patient. With
``--jsonl FILE`` each patient's result is appended as it finishes, and ``--start N`` skips the
first N patients (to resume an interrupted run).

Ends with one line ``RESULT {json}`` holding ``share_patients_must_goals_kept``,
``goals_met_auto``, ``goals_met_reference`` and ``seconds_per_plan`` (and per-patient details).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional

import numpy as np

from openkbp_common import add_patient_arguments, dose_grid_mm, openkbp_goal_set, selected_patients, write_result
from twinrt.data import load_openkbp
from twinrt.planning.agent import virtual_planner
from twinrt.planning.evaluation import evaluate_plan
from twinrt.planning.workflow import PlanSetup


def run_patient(path: Any, goal_set: Any, setup: PlanSetup, max_rounds: int,
                time_budget_s: Optional[float]) -> dict[str, Any]:
    """Plan one patient with the virtual planner and evaluate the auto plan and the reference dose.

    :param path: the patient's ``pt_N.npz``.
    :param goal_set: the goal set.
    :param setup: beams and parameters.
    :param max_rounds: virtual-planner rounds.
    :param time_budget_s: virtual-planner time budget (s).
    """
    case = load_openkbp(path)
    t0 = time.perf_counter()
    res = virtual_planner(case, goal_set, setup=setup, max_rounds=max_rounds, time_budget_s=time_budget_s)
    seconds = time.perf_counter() - t0
    ref = evaluate_plan(case, case.doses["reference"], goal_set)
    auto = evaluate_plan(case, res.planning.dose, goal_set, plan=res.planning.plan)
    rows = []
    for r_ref, r_auto in zip(ref.results, auto.results):
        rows.append({"goal": r_ref.goal.describe(), "priority": r_ref.goal.priority,
                     "reference": r_ref.value, "reference_passed": r_ref.passed,
                     "auto": r_auto.value, "auto_passed": r_auto.passed})
    # "Kept": every must-goal that the reference dose meets is met by the auto plan too.
    kept = all(row["auto_passed"] for row in rows if row["priority"] == "must" and row["reference_passed"])
    evaluable = [row for row in rows if row["reference_passed"] is not None and row["auto_passed"] is not None]
    return {"patient": case.patient_id, "seconds": seconds, "rounds": res.rounds, "best_round": res.best_round,
            "stop_reason": res.stop_reason, "must_goals_kept": kept,
            "goals_evaluable": len(evaluable),
            "goals_met_auto": sum(bool(row["auto_passed"]) for row in evaluable),
            "goals_met_reference": sum(bool(row["reference_passed"]) for row in evaluable),
            "score_auto": auto.score, "score_reference": ref.score,
            "conflicts": [c["text"] for c in res.conflicts], "goals": rows,
            "trace": res.trace}


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_patient_arguments(p, 33)
    p.add_argument("--max-iter", type=int, default=200, help="first-round iterations")
    p.add_argument("--max-rounds", type=int, default=6)
    p.add_argument("--levels", type=int, default=20,
                   help="intensity levels per beam for leaf sequencing (default 20: 10 lost 0.5 Gy of PTV D95 on pt_202)")
    p.add_argument("--time-budget-s", type=float, default=170.0,
                   help="virtual-planner budget per plan (s); the issue's target is 3 minutes")
    p.add_argument("--json", help="also write the full result to this file")
    p.add_argument("--jsonl", help="append each patient's result to this file as it finishes")
    p.add_argument("--start", type=int, default=0, help="skip the first N patients (resume)")
    args = p.parse_args(argv)
    paths = selected_patients(args)
    if paths is None:
        return 2
    paths = paths[args.start:]
    goal_set = openkbp_goal_set()
    grid_mm = dose_grid_mm(args)
    setup = PlanSetup.equispaced(9, dose_grid_mm=grid_mm, max_iter=args.max_iter, levels=args.levels)
    results = []
    for path in paths:
        r = run_patient(path, goal_set, setup, args.max_rounds, args.time_budget_s)
        results.append(r)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps({k: v for k, v in r.items() if k != "trace"}, default=str) + "\n")
        print(f"\n== {r['patient']}: {r['seconds']:.1f} s, {r['rounds']} round(s), delivered round {r['best_round']} "
              f"({r['stop_reason']}); goals met auto {r['goals_met_auto']}/{r['goals_evaluable']}, reference "
              f"{r['goals_met_reference']}/{r['goals_evaluable']}; must-goals kept: {r['must_goals_kept']}")
        print(f"{'goal':<44}{'reference':>11}{'auto':>11}")
        for g in r["goals"]:
            def cell(v: Any, ok: Any) -> str:
                return "n/a" if v is None else f"{v:.2f}{'' if ok else ' x'}"
            print(f"{g['goal']:<44}{cell(g['reference'], g['reference_passed']):>11}{cell(g['auto'], g['auto_passed']):>11}")
        for c in r["conflicts"]:
            print("  conflict:", c)
    n_eval = sum(r["goals_evaluable"] for r in results)
    secs = [r["seconds"] for r in results]
    summary = {
        "patients": [r["patient"] for r in results],
        "share_patients_must_goals_kept": float(np.mean([r["must_goals_kept"] for r in results])) if results else 0.0,
        "goals_met_auto": sum(r["goals_met_auto"] for r in results) / n_eval if n_eval else 0.0,
        "goals_met_reference": sum(r["goals_met_reference"] for r in results) / n_eval if n_eval else 0.0,
        "seconds_per_plan": float(np.mean(secs)) if secs else 0.0,
        "seconds_max": float(np.max(secs)) if secs else 0.0,
        "dose_grid_mm": grid_mm or "ct",
        "per_patient": [{k: v for k, v in r.items() if k not in ("goals", "trace")} for r in results],
    }
    print(f"\nTotals over {len(results)} patient(s): must-goals kept on {summary['share_patients_must_goals_kept']:.0%}, "
          f"goals met auto {summary['goals_met_auto']:.1%} vs reference {summary['goals_met_reference']:.1%}, "
          f"{summary['seconds_per_plan']:.1f} s per plan")
    return write_result(summary, results, args.json)


if __name__ == "__main__":
    sys.exit(main())
