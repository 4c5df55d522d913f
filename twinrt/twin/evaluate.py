"""How well the twin recovers a simulated course: accumulated dose, registration, response parameters, time.

:func:`evaluate_simulated_course` simulates a course from a planning case (:mod:`twinrt.twin.simulator`),
feeds every fraction to a :class:`~twinrt.twin.twin.DigitalTwin` and compares with the simulator's
truth:

* ``accumulated_dose_error_pct``: mean absolute difference between the twin's accumulated dose and the
  true accumulated dose on the planning anatomy, over the voxels where the true dose is ≥ 10 % of its
  maximum, in % of that maximum (also the 95th percentile, and the same for two baselines: the plan
  taken as delivered, and rigid registration only);
* the goal metrics (Gy) of the twin's accumulated dose against those of the true accumulated dose;
* registration: the mean (over fractions) Dice of each propagated structure;
* ``seconds_course``: the twin's update time summed over the fractions (simulation excluded);
* ``param_ci_coverage``: :func:`twinrt.twin.response.coverage_study` — the share of true response
  parameters inside their 90 % credible intervals over simulated patients drawn from the prior —
  and whether this course's own parameters are inside the twin's final intervals.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from twinrt.model import Case
from twinrt.progress import CancelToken, ProgressCallback, report


def _error_pct(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    top = float(truth.max())
    m = truth >= 0.1 * top
    err = np.abs(estimate - truth)[m] / top * 100.0
    return float(err.mean()), float(np.percentile(err, 95))


def evaluate_simulated_course(case: Case, planned_dose: str = "reference", n_fractions: int = 30, seed: int = 0,
                              coverage_patients: int = 50, coverage_observed_fractions: int = 15,
                              rigid_baseline: bool = True, progress: Optional[ProgressCallback] = None,
                              cancel: Optional[CancelToken] = None) -> dict[str, Any]:
    """Simulate a course, run the twin through it, and measure what it recovered (see the module docstring).

    :param case: the planning case (changed in place: a GTV proxy is added when it has none).
    :return: JSON-ready figures (``seconds_course``, ``param_ci_coverage``, ``accumulated_dose_error_pct`` …).
    """
    from twinrt.planning.evaluation import evaluate_plan
    from twinrt.model import Dose
    from twinrt.twin import response
    from twinrt.twin.registration import RegistrationSettings, register
    from twinrt.twin.simulator import CourseSettings, CourseSimulator
    from twinrt.twin.twin import DigitalTwin, TwinSettings

    sim = CourseSimulator(case, planned_dose, CourseSettings(n_fractions=n_fractions, seed=seed))
    twin = DigitalTwin(sim.timeline(), TwinSettings())
    grid = twin.grid
    truth = np.zeros(grid.shape, np.float32)
    rigid = np.zeros(grid.shape, np.float32)
    seconds_sim = seconds_twin = 0.0
    dice_rows: list[dict[str, float]] = []
    rigid_settings = RegistrationSettings(deformable=False)
    for f in range(1, n_fractions + 1):
        report(progress, (f - 1) / n_fractions * 0.9, f"Fraction {f}/{n_fractions}", cancel)
        t0 = time.perf_counter()
        sf = sim.fraction(f)
        seconds_sim += time.perf_counter() - t0
        truth += sf.true_warped_dose_gy
        t0 = time.perf_counter()
        up = twin.add_fraction(sf.fraction)
        seconds_twin += time.perf_counter() - t0
        dice_rows.append(up.record.dice)
        if rigid_baseline:  # the same fraction with rigid registration only
            reg = register(case.ct, sf.fraction.image, rigid_settings, twin.body)
            rigid += reg.pull_back(sf.fraction.dose.array, sf.fraction.dose.grid)
        del sf
    planned = twin.planned_gy
    acc = twin.physical_gy
    err_mean, err_p95 = _error_pct(acc, truth)
    plan_mean, plan_p95 = _error_pct(planned, truth)
    result: dict[str, Any] = {
        "case": case.patient_id, "n_fractions": n_fractions, "seed": seed, "voxels": int(np.prod(grid.shape)),
        "seconds_course": round(seconds_twin, 2), "seconds_per_fraction": round(seconds_twin / n_fractions, 3),
        "seconds_simulation": round(seconds_sim, 2),
        "accumulated_dose_error_pct": round(err_mean, 3), "accumulated_dose_error_p95_pct": round(err_p95, 3),
        "planned_as_delivered_error_pct": round(plan_mean, 3), "planned_as_delivered_error_p95_pct": round(plan_p95, 3),
    }
    if rigid_baseline:
        rm, rp = _error_pct(rigid, truth)
        result["rigid_only_error_pct"] = round(rm, 3)
        result["rigid_only_error_p95_pct"] = round(rp, 3)
    # Goal metrics: twin vs truth (and the plan vs truth).
    ev_truth = evaluate_plan(case, Dose(truth, grid, "true accumulated"), twin.goal_set)
    ev_twin = evaluate_plan(case, Dose(acc, grid, "twin accumulated"), twin.goal_set)
    ev_plan = twin.planned_evaluation
    rows = []
    for rt, rw, rp in zip(ev_truth.results, ev_twin.results, ev_plan.results):
        if rt.value is None or rt.goal.unit != "Gy":
            continue
        rows.append({"goal": f"{rt.goal.structure} {rt.goal.metric}", "true_gy": round(rt.value, 3),
                     "twin_gy": round(rw.value, 3), "planned_gy": round(rp.value, 3)})
    result["goal_metrics"] = rows
    result["goal_metric_mae_gy"] = round(float(np.mean([abs(r["twin_gy"] - r["true_gy"]) for r in rows])), 3)
    result["planned_metric_mae_gy"] = round(float(np.mean([abs(r["planned_gy"] - r["true_gy"]) for r in rows])), 3)
    names = sorted({k for d in dice_rows for k in d})
    result["dice_mean"] = {n: round(float(np.mean([d[n] for d in dice_rows if n in d])), 4) for n in names}
    result["dice_last"] = dice_rows[-1] if dice_rows else {}
    # Tumour response: this course's parameters inside the twin's final intervals, and the coverage study.
    report(progress, 0.92, "Response-parameter coverage study", cancel)
    post = twin.posterior
    true = sim.params.as_array()
    if post is not None:
        iv = post.interval(0.9)
        inside = [bool(lo <= t <= hi) for t, (lo, hi) in zip(true, iv.values())]
        result["course_params_true"] = dict(zip(response.PARAMETER_NAMES, [float(v) for v in true]))
        result["course_params_interval90"] = {k: [round(a, 5), round(b, 5)] for k, (a, b) in iv.items()}
        result["course_params_inside"] = inside
    result["tumour_volume_cc"] = {"planning": round(sim.v0_cc, 2),
                                  "last_observed": round(float(sim.observed_volumes_cc[-1]), 2)}
    t0 = time.perf_counter()
    cov = response.coverage_study(n_patients=coverage_patients, observed_fractions=coverage_observed_fractions,
                                  level=0.9, seed=seed, schedule=sim.schedule)
    result["param_ci_coverage"] = round(float(cov.coverage), 4)
    result["param_ci_coverage_per_parameter"] = {k: round(float(v), 4) for k, v in dict(cov.per_parameter).items()}
    result["coverage_patients"] = coverage_patients
    result["coverage_seconds"] = round(time.perf_counter() - t0, 2)
    report(progress, 1.0, "Done")
    return result
