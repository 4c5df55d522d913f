"""What the OpenKBP benchmarks share: patient selection, the dose grid and the goal set they evaluate with."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from twinrt.data import openkbp_patients, shared_data_dir
from twinrt.planning.evaluation import load_goal_set


def add_patient_arguments(p: argparse.ArgumentParser, default_patients: int) -> None:
    """``--patients N`` (from the first), ``--patient ID``, ``--first IDS`` and ``--dose-grid-mm`` (mm or 'ct')."""
    p.add_argument("--patients", type=int, default=default_patients,
                   help="number of validation patients (from the first)")
    p.add_argument("--patient", help="one patient id, e.g. pt_236")
    p.add_argument("--first", default="",
                   help="comma-separated patient ids to run before the others (same selection, reordered: "
                        "early news on the hard cases)")
    p.add_argument("--dose-grid-mm", default="ct",
                   help="dose-grid spacing in mm, or 'ct' (default: the CT grid, like the reference dose)")


def selected_patients(args: argparse.Namespace) -> Optional[list[Path]]:
    """The validation patients the arguments select, or None (after saying why) without ../shared/data."""
    if shared_data_dir() is None:
        print("../shared/data not found: set TWINRT_SHARED_DATA", file=sys.stderr)
        return None
    paths = openkbp_patients("validation")
    chosen = [q for q in paths if q.stem == args.patient] if args.patient else paths[:args.patients]
    first = [x.strip() for x in args.first.split(",") if x.strip()]
    return sorted(chosen, key=lambda q: (first.index(q.stem) if q.stem in first else len(first)))


def dose_grid_mm(args: argparse.Namespace) -> Optional[float]:
    """The dose-grid spacing (mm), or None for the CT grid."""
    return None if str(args.dose_grid_mm).lower() == "ct" else float(args.dose_grid_mm)


def openkbp_goal_set() -> Any:
    """``head_and_neck_openkbp`` with every structure but PTV70 optional.

    Some OpenKBP patients lack an organ the clinical goal set requires (e.g. no Brainstem contour):
    their goals are then reported as not evaluable instead of refusing the patient. The shipped
    goal set itself stays strict.
    """
    strict = load_goal_set("head_and_neck_openkbp")
    names = list(dict.fromkeys(g.structure for g in strict.goals))
    return replace(strict, optional_structures=[n for n in names if n != "PTV70"])


def write_result(summary: dict[str, Any], per_patient: list[dict[str, Any]], json_path: Optional[str]) -> int:
    """Write the full result (summary and per-patient details) to ``json_path`` when given, then print
    the benchmark's last line ``RESULT {summary}``; returns the exit status 0."""
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({**summary, "per_patient": per_patient}, fh, indent=1, default=str)
    print("RESULT " + json.dumps(summary))
    return 0
