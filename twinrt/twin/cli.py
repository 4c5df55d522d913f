"""``twinrt twin …``: the digital twin from the command line (wired into :mod:`twinrt.cli`).

``twinrt twin simulate``   make a simulated course (DICOM: plan + one folder per fraction) from a patient
``twinrt twin run``        run the twin through a course folder; writes the timeline, summary and doses
``twinrt twin evaluate``   simulate a course and measure what the twin recovers (ends with ``RESULT {json}``)
``twinrt twin similar``    the most similar past cases (OpenKBP library) and suggested planning goals
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import twinrt
from twinrt.io_utils import json_default


def add_twin_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``twin`` command group to the main parser's subcommands."""
    tw = sub.add_parser("twin", help="digital twin over the fractions: simulate a course, run the twin, evaluate, "
                                     "similar past cases")
    ts = tw.add_subparsers(dest="twin_command", required=True)
    s = ts.add_parser("simulate", help="make a simulated treatment course (DICOM) from a patient with a planned dose")
    s.add_argument("dicom_dir", nargs="?", type=Path, help="patient folder (CT, RTSTRUCT, RTDOSE); default: the "
                                                             "bundled sample patient")
    s.add_argument("--out", type=Path, required=True, help="course folder to write (plan/ + fraction_NNN/)")
    s.add_argument("--fractions", type=int, default=30, help="fractions in the course (default 30)")
    s.add_argument("--upto", type=int, default=None, help="write only the first N fractions (a course under way)")
    s.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    r = ts.add_parser("run", help="run the twin through a course folder (plan/ + one folder per fraction)")
    r.add_argument("course_dir", type=Path)
    r.add_argument("--out", type=Path, required=True, help="output folder: timeline/, summary.json, "
                                                           "accumulated RTDOSE files")
    r.add_argument("--fractions", type=int, default=None, help="fractions in the course (default: the plan's)")
    r.add_argument("--tumour", default="GTV", help="tumour structure to follow (default GTV)")
    r.add_argument("--allow-other-frame", action="store_true",
                   help="accept fraction images in another frame of reference than the plan")
    e = ts.add_parser("evaluate", help="simulate a course and measure the twin against the truth "
                                       "(ends with RESULT {json})")
    e.add_argument("--openkbp", type=Path, help="an OpenKBP pt_*.npz instead of the bundled sample patient")
    e.add_argument("--fractions", type=int, default=30)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--coverage-patients", type=int, default=50)
    m = ts.add_parser("similar", help="the k most similar OpenKBP training cases and suggested planning goals")
    m.add_argument("dicom_dir", nargs="?", type=Path, help="patient folder; default: the bundled sample patient")
    m.add_argument("--k", type=int, default=5)
    m.add_argument("--focus", default=None, help="rank neighbours on this organ's geometry (and the targets)")
    m.add_argument("--goal-set", default="head_and_neck_openkbp")


def _load_patient(dicom_dir: Path | None) -> Any:
    from twinrt.dicom.folder import import_case
    from twinrt.sample import load_sample_case

    return load_sample_case() if dicom_dir is None else import_case(dicom_dir)


def _planned_dose_name(case: Any) -> str:
    from twinrt.errors import InvalidInputError

    if len(case.doses) != 1:
        raise InvalidInputError(f"Patient {case.patient_id} has {len(case.doses)} doses "
                                f"({', '.join(case.doses) or 'none'}); keep only the planned RTDOSE in the folder")
    return next(iter(case.doses))


def _simulate(args: argparse.Namespace, progress: Callable[[float, str], None]) -> int:
    from twinrt.errors import InvalidInputError
    from twinrt.twin.course_dicom import export_course
    from twinrt.twin.simulator import CourseSettings, CourseSimulator

    case = _load_patient(args.dicom_dir)
    sim = CourseSimulator(case, _planned_dose_name(case), CourseSettings(n_fractions=args.fractions, seed=args.seed))
    upto = args.fractions if args.upto is None else args.upto
    if not 1 <= upto <= args.fractions:
        raise InvalidInputError(f"--upto must be 1 … {args.fractions}, got {upto}")
    fractions = []
    for f in range(1, upto + 1):
        progress((f - 1) / upto, f"simulating fraction {f}/{upto}")
        fractions.append(sim.fraction(f).fraction)
    progress(0.99, "writing DICOM")
    export_course(sim.timeline(), args.out, fractions)
    progress(1.0, "done")
    truth = {"patient_id": case.patient_id, "n_fractions": args.fractions, "seed": args.seed,
             "response_parameters": dict(zip(("alpha_per_gy", "lambda_per_day", "t_clear_days"),
                                             [float(v) for v in sim.params.as_array()])),
             "observed_tumour_cc": [round(float(v), 3) for v in sim.observed_volumes_cc[:upto]],
             "tumour": sim.tumour.name, "tumour_note": case.metadata.get("tumour_proxy", ""), "simulated": True}
    (Path(args.out) / "simulation_truth.json").write_text(json.dumps(truth, indent=1))
    print(f"\nwrote {upto} fraction(s) of a {args.fractions}-fraction course to {args.out}")
    return 0


def _run(args: argparse.Namespace, progress: Callable[[float, str], None]) -> int:
    from twinrt.dicom.common import DicomContext
    from twinrt.dicom.rtdose import write_rtdose
    from twinrt.io_utils import atomic_dir
    from twinrt.twin.course_dicom import import_course
    from twinrt.twin.twin import DigitalTwin, FractionRefusedError, TwinSettings

    timeline, fractions = import_course(args.course_dir, n_fractions=args.fractions, tumour=args.tumour)
    twin = DigitalTwin(timeline, TwinSettings(allow_other_frame=args.allow_other_frame))
    refused = []
    t0 = time.perf_counter()
    for i, f in enumerate(fractions):
        progress(i / max(len(fractions), 1), f"fraction {f.number}")
        try:
            up = twin.add_fraction(f)
        except FractionRefusedError as exc:
            refused.append({"fraction": f.number, "reason": str(exc)})
            print(f"\nrefused: {exc}")
            continue
        for w in up.warnings:
            print(f"\nwarning: {w}")
    progress(1.0, "done")
    rows, warnings = twin.goal_table()
    print(f"\n{twin.delivered} of {twin.n_fractions} fractions taken ({time.perf_counter() - t0:.1f} s); "
          f"{len(refused)} refused")
    print(f"{'goal':<34} {'planned':>8} {'to date':>8} {'deliv.':>8} {'project.':>8}")
    for r in rows:
        vals = [r[k] for k in ("planned", "planned_to_date", "delivered", "projected")]
        print(f"{r['goal']:<34} " + " ".join(f"{v:8.2f}" if v is not None else f"{'-':>8}" for v in vals))
    summary = twin.summary()
    summary.update({"refused": refused, "goals": rows, "warnings": warnings})
    if twin.posterior is not None:
        pred = twin.predict_tumour()
        summary["tumour_prediction"] = {"days": pred.days.tolist(), "median_cc": pred.median_cc.tolist(),
                                        "lower_cc": pred.lower_cc.tolist(), "upper_cc": pred.upper_cc.tolist(),
                                        "level": pred.level}
        if twin.delivered < twin.n_fractions:
            summary["regimens"] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
                                   for row in twin.compare_regimens().to_rows()]
        print("tumour response (90 % credible intervals):", summary["response"]["interval"])
    out = Path(args.out)
    ctx = DicomContext.from_case(timeline.planning)
    with atomic_dir(out) as tmp:
        timeline.save(tmp / "timeline")
        for dose, name in ((twin.accumulated_dose(), "RTDOSE_accumulated.dcm"),
                           (twin.accumulated_eqd2(), "RTDOSE_accumulated_EQD2.dcm")):
            write_rtdose(dose, ctx, tmp / name)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=json_default))
    print(f"wrote {out}/summary.json, {out}/timeline/, {out}/RTDOSE_accumulated*.dcm")
    print(twinrt.RESEARCH_USE_ONLY)
    return 0


def _evaluate(args: argparse.Namespace, progress: Callable[[float, str], None]) -> int:
    from twinrt.twin.evaluate import evaluate_simulated_course

    if args.openkbp:
        from twinrt.data import load_openkbp

        case = load_openkbp(args.openkbp)
    else:
        from twinrt.sample import load_sample_case

        case = load_sample_case()
    res = evaluate_simulated_course(case, "reference", args.fractions, args.seed, args.coverage_patients,
                                    progress=progress)
    print()
    for k in ("seconds_course", "accumulated_dose_error_pct", "rigid_only_error_pct", "planned_as_delivered_error_pct",
              "goal_metric_mae_gy", "param_ci_coverage"):
        print(f"{k:<32} {res.get(k)}")
    print("RESULT " + json.dumps(res, default=json_default))
    return 0


def _similar(args: argparse.Namespace) -> int:
    from twinrt.twin.similar import describe_neighbours, load_shipped_library, suggested_goals

    case = _load_patient(args.dicom_dir)
    lib = load_shipped_library()
    neighbours = lib.similar(case, k=args.k, focus=args.focus)
    print(describe_neighbours(neighbours))
    print()
    print(f"{'goal':<32} {'clinical':>9} {'neighbours (median, range)':>30} {'suggested':>10}")
    for g in suggested_goals(neighbours, args.goal_set):
        goal = f"{g['structure']} {g['metric']} {g['comparator']}"
        rng = f"{g['median']:.1f} ({g['min']:.1f}-{g['max']:.1f})" if g.get("median") is not None else "-"
        print(f"{goal:<32} {g['clinical_value']:>9.2f} {rng:>30} {g['suggested']:>10.2f}")
    print(twinrt.RESEARCH_USE_ONLY)
    return 0


def run_twin_command(args: argparse.Namespace, progress: Callable[[float, str], None]) -> int:
    """Run ``twinrt twin <command>``; returns the exit status."""
    if args.twin_command == "simulate":
        return _simulate(args, progress)
    if args.twin_command == "run":
        return _run(args, progress)
    if args.twin_command == "evaluate":
        return _evaluate(args, progress)
    return _similar(args)


__all__ = ["add_twin_parser", "run_twin_command"]
