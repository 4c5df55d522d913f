"""The All-in-One pipeline (issue 9) on OpenKBP validation patients converted to DICOM on the fly.

For each patient: the OpenKBP case (CT, its structures, the reference dose, the prescription) is
written as a DICOM folder, then ``twinrt run --protocol head-and-neck`` runs on it
(:func:`twinrt.pipeline.run_pipeline`: contour, predict, virtual planner, goals, twin, DICOM-RT,
scene, report). The pipeline's plan and the reference dose are then evaluated with the same goal set
(every structure but PTV70 optional, ``openkbp_common.openkbp_goal_set``, so that an organ a patient
lacks is "not evaluable" rather than a refusal). Issue 9's target: under 5 minutes per patient on 2
cores, and every must-goal that the reference dose meets also met.

Needs ../shared/data. Usage::

    .venv/bin/python bench/allinone.py --patients 3          # the first three validation patients
    .venv/bin/python bench/allinone.py --patient pt_201 --json out.json
    .venv/bin/python bench/allinone.py --patients 33 --json bench/results/allinone_33.json   # all, ~1.5 h

Each finished patient is also appended to ``<json>.partial.jsonl``; a patient whose pipeline fails is
listed under ``failed`` and counts as not kept.

Ends with ``RESULT {json}`` holding ``seconds_total_median``, ``seconds_per_stage`` (median per
stage), ``share_patients_must_goals_kept`` and per-patient details.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from openkbp_common import add_patient_arguments, openkbp_goal_set, selected_patients, write_result
from twinrt.data import load_openkbp
from twinrt.dicom.folder import export_case
from twinrt.pipeline import PipelineError, run_pipeline
from twinrt.planning.evaluation import evaluate_plan


def run_patient(path: Path, goal_set: Any, work: Path, write_scene: bool) -> dict[str, Any]:
    """Convert one patient to DICOM, run the pipeline with the head-and-neck protocol, evaluate."""
    case = load_openkbp(path)
    dicom = work / f"{path.stem}_dicom"
    export_case(case, dicom)
    t0 = time.perf_counter()
    res = run_pipeline(dicom, work / f"{path.stem}_out", write_scene=write_scene, protocol="head-and-neck")
    total = time.perf_counter() - t0
    final = res.case
    ref = evaluate_plan(final, final.doses["reference"], goal_set)
    auto = evaluate_plan(final, final.doses["planned"], goal_set)
    kept = [r.goal.describe() for r, a in zip(ref.results, auto.results) if r.goal.priority == "must" and r.passed]
    lost = [r.goal.describe() for r, a in zip(ref.results, auto.results)
            if r.goal.priority == "must" and r.passed and a.passed is not True]
    return {"patient": path.stem, "seconds_total": round(total, 1),
            "stages": {name: round(secs, 2) for name, secs, status in res.timings if status == "done"},
            "must_goals_reference_met": len(kept), "must_goals_lost": lost, "kept_all": not lost,
            "goals_met_auto": sum(bool(r.passed) for r in auto.results),
            "goals_met_reference": sum(bool(r.passed) for r in ref.results)}


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_patient_arguments(p, default_patients=3)
    p.add_argument("--no-scene", action="store_true", help="skip the Slicer scene")
    p.add_argument("--json", help="also write the full result to this file")
    args = p.parse_args(argv)
    paths = selected_patients(args)
    if paths is None:
        print("RESULT " + '{"skipped": "../shared/data not found"}')
        return 0
    goal_set = openkbp_goal_set()
    rows, failed = [], []
    partial = Path(args.json + ".partial.jsonl") if args.json else None
    for path in paths:
        with tempfile.TemporaryDirectory() as tmp:  # one patient's outputs at a time on disk
            try:
                row = run_patient(path, goal_set, Path(tmp), not args.no_scene)
            except PipelineError as exc:  # a failed patient is reported, and counts as not kept
                failed.append({"patient": path.stem, "error": str(exc), "kept_all": False})
                print(f"{path.stem}: FAILED {exc}", flush=True)
                continue
        rows.append(row)
        if partial is not None:
            with partial.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        print(f"{row['patient']}: {row['seconds_total']:.0f} s, must goals of the reference kept: "
              f"{'all' if row['kept_all'] else 'lost ' + '; '.join(row['must_goals_lost'])}; goals met "
              f"{row['goals_met_auto']} (reference {row['goals_met_reference']})", flush=True)
    if not rows:
        print("RESULT " + json.dumps({"failed": failed}))
        return 1
    stages = sorted({s for r in rows for s in r["stages"]}, key=lambda s: list(rows[0]["stages"]).index(s)
                    if s in rows[0]["stages"] else 99)
    per_stage = {s: round(float(np.median([r["stages"][s] for r in rows if s in r["stages"]])), 2) for s in stages}
    summary = {"seconds_total_median": round(float(np.median([r["seconds_total"] for r in rows])), 1),
               "seconds_per_stage": per_stage,
               "share_patients_must_goals_kept": round(sum(r["kept_all"] for r in rows) / (len(rows) + len(failed)), 4),
               "n_patients": len(rows) + len(failed), "patients": [r["patient"] for r in rows],
               "failed": failed}
    print(f"median {summary['seconds_total_median']} s per patient; must goals kept on "
          f"{summary['share_patients_must_goals_kept'] * 100:.0f} % of patients")
    return write_result(summary, rows, args.json)


if __name__ == "__main__":
    sys.exit(main())
