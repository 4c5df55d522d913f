"""DigitalTwin (issue 7): a full simulated 30-fraction course through the twin, against the simulator's truth.

Simulates a course from a planning case (default: the bundled sample patient, OpenKBP pt_236; or an
OpenKBP patient with ``--openkbp``) with :mod:`twinrt.twin.simulator` (set-up errors, weight loss,
soft-tissue deformation, tumour shrinkage following the response model with known parameters), feeds
every fraction to the twin (:class:`twinrt.twin.twin.DigitalTwin`: registration, dose mapping, BED,
goals, response calibration) and compares with the truth (:func:`twinrt.twin.evaluate.evaluate_simulated_course`).

Usage::

    .venv/bin/python bench/digitaltwin_course.py                 # sample patient, 30 fractions, ~6 min
    .venv/bin/python bench/digitaltwin_course.py --openkbp ../shared/data/openkbp/validation/pt_201.npz
    .venv/bin/python bench/digitaltwin_course.py --fractions 10 --json out.json

Ends with ``RESULT {json}`` holding ``seconds_course`` (the twin's update time for the whole course,
simulation excluded; target < 120 s on 2 cores), ``param_ci_coverage`` (share of true response
parameters inside their 90 % credible intervals, 50 simulated patients), ``accumulated_dose_error_pct``
(mean |twin − truth| where the true dose ≥ 10 % of its maximum, % of that maximum) and the baselines
and details described in :mod:`twinrt.twin.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from twinrt.twin.evaluate import evaluate_simulated_course


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--openkbp", help="an OpenKBP pt_*.npz file instead of the bundled sample patient")
    p.add_argument("--fractions", type=int, default=30, help="fractions in the course (default 30)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    p.add_argument("--coverage-patients", type=int, default=50, help="patients of the coverage study (default 50)")
    p.add_argument("--json", help="also write the full result to this file")
    args = p.parse_args(argv)
    if args.openkbp:
        from twinrt.data import load_openkbp

        case = load_openkbp(args.openkbp)
    else:
        from twinrt.sample import load_sample_case

        case = load_sample_case()
    result = evaluate_simulated_course(case, "reference", args.fractions, args.seed, args.coverage_patients,
                                       progress=lambda f, t: print(f"  {f * 100:5.1f} %  {t}", file=sys.stderr))
    print(f"case {result['case']}, {result['n_fractions']} fractions, {result['voxels']} voxels")
    print(f"twin update: {result['seconds_course']:.1f} s for the course ({result['seconds_per_fraction']:.2f} s per "
          f"fraction; simulation {result['seconds_simulation']:.1f} s, not counted)")
    print(f"accumulated dose error: mean {result['accumulated_dose_error_pct']:.2f} % of max, p95 "
          f"{result['accumulated_dose_error_p95_pct']:.2f} %  (rigid only {result.get('rigid_only_error_pct', float('nan')):.2f} %, "
          f"plan as delivered {result['planned_as_delivered_error_pct']:.2f} %)")
    print(f"goal metrics (Gy): twin vs truth MAE {result['goal_metric_mae_gy']:.2f}, plan vs truth "
          f"{result['planned_metric_mae_gy']:.2f}")
    for r in result["goal_metrics"]:
        print(f"  {r['goal']:<26} truth {r['true_gy']:7.2f}  twin {r['twin_gy']:7.2f}  plan {r['planned_gy']:7.2f}")
    print("mean Dice of propagated structures:", result["dice_mean"])
    print("this course's parameters inside the twin's 90 % intervals:", result.get("course_params_inside"))
    print(f"coverage study: {result['param_ci_coverage']:.3f} over {result['coverage_patients']} patients "
          f"({result['param_ci_coverage_per_parameter']})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    keys = ("seconds_course", "param_ci_coverage", "accumulated_dose_error_pct", "accumulated_dose_error_p95_pct",
            "rigid_only_error_pct", "planned_as_delivered_error_pct", "goal_metric_mae_gy", "planned_metric_mae_gy",
            "seconds_per_fraction", "seconds_simulation", "n_fractions", "case", "course_params_inside")
    print("RESULT " + json.dumps({k: result[k] for k in keys if k in result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
