"""Plan OpenKBP validation patients with TwinRT and compare with the reference (clinical-style) dose.

For each patient: PTV70/63/56 in 35 fractions, 9 equispaced coplanar 6 MV beams, TwinRT's default
objectives (:func:`twinrt.planning.workflow.default_objectives`), fluence optimisation and leaf
sequencing. It prints time per step and, for every structure, the DVH metrics of the reference dose
next to those of TwinRT's sequenced plan; both doses are evaluated the same way (twinrt.dvh on the
CT grid, the planned dose resampled trilinearly onto it).

Needs ../shared/data. Usage::

    .venv/bin/python bench/openkbp_plan.py                 # first validation patient
    .venv/bin/python bench/openkbp_plan.py --patients 3    # first three
    .venv/bin/python bench/openkbp_plan.py --patient pt_236 --dose-grid-mm 4

Ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from twinrt import dvh
from openkbp_common import add_patient_arguments, dose_grid_mm, selected_patients
from twinrt.data import load_openkbp
from twinrt.planning.workflow import PlanSetup, plan_case

# Metrics shown per structure type (keys of twinrt.dvh.dvh_metrics rows).
TARGET_KEYS = ("d98_gy", "d95_gy", "d50_gy", "d2_gy", "mean_gy")
ORGAN_KEYS = ("mean_gy", "d0_1cc_gy", "max_gy")


def plan_patient(path, setup: PlanSetup) -> dict:
    """Plan one patient and return its figures."""
    case = load_openkbp(path)
    t0 = time.perf_counter()
    res = plan_case(case, setup=setup)
    seconds = time.perf_counter() - t0
    case.doses["twinrt"] = res.dose
    ref_rows = {r["structure"]: r for r in dvh.dvh_metrics(case, "reference")}
    plan_rows = {r["structure"]: r for r in dvh.dvh_metrics(case, "twinrt")}
    rows = []
    for s in case.structures:
        keys = TARGET_KEYS if s.type.value == "TARGET" else ORGAN_KEYS
        for k in keys:
            if k in ref_rows.get(s.name, {}) and k in plan_rows.get(s.name, {}):
                rows.append({"structure": s.name, "metric": k, "reference": float(ref_rows[s.name][k]),
                             "twinrt": float(plan_rows[s.name][k])})
    return {"patient": case.patient_id, "seconds": seconds, "timings_s": res.timings_s,
            "dij_nnz": int(res.dij_stats.get("nnz", 0)), "dij_bytes": int(res.dij_stats.get("bytes", 0)),
            "iterations": int(res.optimization["iterations"]), "segments": int(res.sequencing["n_segments"]),
            "total_mu_per_fraction": float(res.sequencing["total_mu"]),
            "relative_dose_error_sequencing": float(res.sequencing.get("relative_dose_error", float("nan"))),
            "metrics": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_patient_arguments(p, 1)
    p.add_argument("--max-iter", type=int, default=200)
    args = p.parse_args(argv)
    paths = selected_patients(args)
    if paths is None:
        return 2
    grid_mm = dose_grid_mm(args)
    setup = PlanSetup.equispaced(9, dose_grid_mm=grid_mm, max_iter=args.max_iter)
    results = []
    for path in paths:
        r = plan_patient(path, setup)
        results.append(r)
        print(f"\n== {r['patient']}: {r['seconds']:.1f} s total "
              + ", ".join(f"{k} {v:.1f} s" for k, v in r["timings_s"].items())
              + f"; dij {r['dij_nnz'] / 1e6:.1f} M non-zeros, {r['dij_bytes'] / 2**30:.2f} GiB; "
              f"{r['iterations']} iterations; {r['segments']} segments, {r['total_mu_per_fraction']:.0f} MU/fraction")
        print(f"{'structure':<14}{'metric':<12}{'reference':>10}{'TwinRT':>10}{'diff':>8}")
        for m in r["metrics"]:
            print(f"{m['structure']:<14}{m['metric']:<12}{m['reference']:10.2f}{m['twinrt']:10.2f}"
                  f"{m['twinrt'] - m['reference']:8.2f}")
    secs = [r["seconds"] for r in results]
    summary = {"patients": [r["patient"] for r in results], "seconds_per_plan": secs,
               "seconds_median": float(np.median(secs)), "dose_grid_mm": grid_mm or "ct",
               "per_patient": results}
    print("RESULT " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
