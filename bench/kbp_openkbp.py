"""Predict → plan (knowledge-based planning) on OpenKBP validation patients, against the reference dose.

For each patient: the dose-prediction model (:mod:`twinrt.dosepredict`, default model unless
``--model``) predicts the dose and its MC-dropout standard deviation; the prediction becomes
voxel-wise dose-mimicking objectives (:mod:`twinrt.planning.kbp`); the plan (9 equispaced 6 MV
beams, leaf-sequenced) is made and its dose compared with the reference plan's by the OpenKBP DVH
metrics (D99/D95/D1 of the PTVs, D0.1cc and mean of the organs; :mod:`twinrt.dosepredict.metrics`)
and by the clinical goals of ``head_and_neck_openkbp``.

Needs ../shared/data. Usage::

    .venv/bin/python bench/kbp_openkbp.py --patients 5
    .venv/bin/python bench/kbp_openkbp.py --patient pt_201 --dose-grid-mm ct

Ends with ``RESULT {json}``: ``n_patients``, ``dvh_error_plan_vs_reference_gy`` (mean absolute
difference of every DVH metric, Gy), ``dvh_error_prediction_vs_reference_gy``,
``dvh_error_plan_vs_prediction_gy``, ``goals_met_plan``, ``goals_met_reference``,
``seconds_per_prediction``, ``seconds_per_plan``, the model id and sha256.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional

import numpy as np

from openkbp_common import add_patient_arguments, dose_grid_mm, openkbp_goal_set, selected_patients, write_result
from twinrt.data import load_openkbp
from twinrt.dosepredict.metrics import dvh_metrics
from twinrt.dosepredict.predict import DosePredictor
from twinrt.planning.evaluation import evaluate_plan
from twinrt.planning.kbp import plan_from_prediction
from twinrt.planning.workflow import PlanSetup


def _metrics(case: Any, dose: Any) -> dict[str, float]:
    """OpenKBP DVH metrics of ``dose`` on the case's CT grid, keyed ``"metric roi"``."""
    grid = case.ct.grid
    arr = dose.array if dose.grid == grid else dose.resampled(grid).array
    masks = {s.name: s.mask for s in case.structures}
    voxel_mm = tuple(float(v) for v in grid.spacing_mm)
    return {f"{m} {roi}": v for (m, roi), v in dvh_metrics(arr, masks, voxel_mm).items()}


def _mae(a: dict[str, float], b: dict[str, float]) -> float:
    keys = sorted(set(a) & set(b))
    return float(np.mean([abs(a[k] - b[k]) for k in keys])) if keys else float("nan")


def run_patient(path: Any, predictor: DosePredictor, setup: PlanSetup, goal_set: Any,
                mc_samples: Optional[int]) -> dict[str, Any]:
    """Predict, plan and compare one patient (see the module docstring)."""
    case = load_openkbp(path)
    t0 = time.perf_counter()
    pred = predictor.predict_case(case, mc_samples=mc_samples)
    t_pred = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = plan_from_prediction(case, pred.dose, pred.std, setup=setup)
    t_plan = time.perf_counter() - t0
    ref_m, pred_m, plan_m = (_metrics(case, d) for d in (case.doses["reference"], pred.dose, res.dose))
    ev_ref = evaluate_plan(case, case.doses["reference"], goal_set)
    ev_plan = evaluate_plan(case, res.dose, goal_set, plan=res.plan)
    evaluable = [(a, b) for a, b in zip(ev_ref.results, ev_plan.results) if a.passed is not None and b.passed is not None]
    return {"patient": case.patient_id, "seconds_prediction": t_pred, "seconds_plan": t_plan,
            "dvh_error_plan_vs_reference_gy": _mae(plan_m, ref_m),
            "dvh_error_prediction_vs_reference_gy": _mae(pred_m, ref_m),
            "dvh_error_plan_vs_prediction_gy": _mae(plan_m, pred_m),
            "goals_evaluable": len(evaluable), "goals_met_plan": sum(bool(b.passed) for _, b in evaluable),
            "goals_met_reference": sum(bool(a.passed) for a, _ in evaluable),
            "must_met_plan": all(b.passed for a, b in evaluable if b.goal.priority == "must" and a.passed),
            "metrics": {k: {"reference": ref_m[k], "predicted": pred_m.get(k), "plan": plan_m.get(k)}
                        for k in sorted(ref_m)},
            "warnings": pred.warnings, "total_mu": res.sequencing.get("total_mu")}


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_patient_arguments(p, 5)
    p.add_argument("--model", help="dose-prediction model id or path (default: the default model)")
    p.add_argument("--mc-samples", type=int, default=None, help="MC-dropout samples (default: the model's)")
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--levels", type=int, default=20)
    p.add_argument("--json", help="also write the full result to this file")
    args = p.parse_args(argv)
    paths = selected_patients(args)
    if paths is None:
        return 2
    grid_mm = dose_grid_mm(args)
    setup = PlanSetup.equispaced(9, dose_grid_mm=grid_mm, max_iter=args.max_iter, levels=args.levels)
    predictor = DosePredictor(args.model)
    goal_set = openkbp_goal_set()
    results = []
    for path in paths:
        r = run_patient(path, predictor, setup, goal_set, args.mc_samples)
        results.append(r)
        print(f"\n== {r['patient']}: prediction {r['seconds_prediction']:.1f} s, plan {r['seconds_plan']:.1f} s; "
              f"DVH error plan-reference {r['dvh_error_plan_vs_reference_gy']:.2f} Gy, prediction-reference "
              f"{r['dvh_error_prediction_vs_reference_gy']:.2f} Gy, plan-prediction "
              f"{r['dvh_error_plan_vs_prediction_gy']:.2f} Gy; goals met plan {r['goals_met_plan']}/"
              f"{r['goals_evaluable']}, reference {r['goals_met_reference']}/{r['goals_evaluable']}")
        print(f"{'metric':<24}{'reference':>10}{'predicted':>10}{'plan':>10}")
        for k, v in r["metrics"].items():
            print(f"{k:<24}{v['reference']:>10.2f}{v['predicted']:>10.2f}{v['plan']:>10.2f}")
    n_eval = sum(r["goals_evaluable"] for r in results)
    summary = {
        "model_id": predictor.model_id, "sha256": predictor.sha256, "n_patients": len(results),
        "patients": [r["patient"] for r in results],
        "dvh_error_plan_vs_reference_gy": float(np.mean([r["dvh_error_plan_vs_reference_gy"] for r in results])),
        "dvh_error_prediction_vs_reference_gy": float(np.mean([r["dvh_error_prediction_vs_reference_gy"]
                                                               for r in results])),
        "dvh_error_plan_vs_prediction_gy": float(np.mean([r["dvh_error_plan_vs_prediction_gy"] for r in results])),
        "goals_met_plan": sum(r["goals_met_plan"] for r in results) / n_eval if n_eval else 0.0,
        "goals_met_reference": sum(r["goals_met_reference"] for r in results) / n_eval if n_eval else 0.0,
        "share_patients_must_goals_kept": float(np.mean([r["must_met_plan"] for r in results])),
        "seconds_per_prediction": float(np.mean([r["seconds_prediction"] for r in results])),
        "seconds_per_plan": float(np.mean([r["seconds_plan"] for r in results])),
        "dose_grid_mm": grid_mm or "ct",
    }
    return write_result(summary, results, args.json)


if __name__ == "__main__":
    sys.exit(main())
