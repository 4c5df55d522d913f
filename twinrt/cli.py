"""The ``twinrt`` command line.

``twinrt demo``            run the All-in-One pipeline on the bundled sample patient
``twinrt run DIR``         run it on a DICOM patient folder
``twinrt plan DIR``        plan a DICOM patient (IMRT, step-and-shoot) and write DICOM-RT
``twinrt export``          write an OpenKBP patient or the TG-119 phantom as a DICOM patient
``twinrt dvh DIR``         print DVH metrics of a DICOM patient folder
``twinrt validate DIR``    check every DICOM file in a folder with dciodvfy
``twinrt make-sample``     (developers) rebuild the bundled sample from ../shared/data
``twinrt dose-predict``    dose prediction: ``train``, ``evaluate-openkbp``, ``predict``, ``register``, ``models``
``twinrt twin``            digital twin: ``simulate``, ``run``, ``evaluate``, ``similar`` (:mod:`twinrt.twin.cli`)
``twinrt toxicity``        toxicity early warning: ``simulate-cohort``, ``train``, ``evaluate``, ``predict``

Errors of bad input print one line starting with ``error:`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import twinrt
from twinrt.errors import MissingInputError, TwinRTError


def _print_progress(fraction: float, text: str) -> None:
    if not sys.stdout.isatty():
        # Logs and CI: one plain line per step instead of a redrawn bar.
        print(f"{fraction * 100:5.1f}% {text}", flush=True)
        return
    bar = "#" * int(round(fraction * 30))
    print(f"\r[{bar:<30}] {fraction * 100:5.1f}% {text:<40}", end="" if fraction < 1 else "\n", flush=True)


def _cmd_run(dicom_dir: Path, out: Path, no_scene: bool, no_plan: bool = False, protocol: str | None = None) -> int:
    from twinrt.pipeline import run_pipeline

    t0 = time.perf_counter()
    res = run_pipeline(dicom_dir, out, write_scene=not no_scene, plan=not no_plan, progress=_print_progress,
                       protocol=protocol)
    print()
    print(f"{'stage':<38} {'seconds':>8}  status")
    for name, secs, status in res.timings:
        print(f"{name:<38} {secs:8.2f}  {status}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    for label, path in res.outputs.items():
        print(f"{label:>8}: {path}")
    print(twinrt.RESEARCH_USE_ONLY)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from twinrt.data import load_openkbp, load_tg119
    from twinrt.dicom.folder import export_case

    case = load_tg119(args.tg119 if args.tg119 != "default" else None) if args.tg119 else load_openkbp(args.openkbp)
    files = export_case(case, args.out)
    for kind, paths in files.items():
        print(f"{kind}: {len(paths)} file(s)")
    print(f"wrote {args.out}")
    return 0


def _cmd_dvh(args: argparse.Namespace) -> int:
    from twinrt import dvh
    from twinrt.dicom.folder import import_case

    case = import_case(args.dicom_dir)
    if not case.doses:
        raise MissingInputError(f"{args.dicom_dir} has no RTDOSE; add one to compute DVH metrics", args.dicom_dir)
    name = args.dose or next(iter(case.doses))
    rows = dvh.dvh_metrics(case, name)
    if args.json:
        print(json.dumps(rows, indent=1, default=float))
        return 0
    keys = ["structure", "volume_cc", "mean_gy", "max_gy", "min_gy", "d0.1cc_gy", "d95_gy", "d98_gy", "d2_gy"]
    keys = [k for k in keys if any(k in r for r in rows)]
    print(" ".join(f"{k:>12}" for k in keys))
    for r in rows:
        print(" ".join(f"{r[k]:12.2f}" if isinstance(r.get(k), (float, np.floating)) else f"{str(r.get(k, '')):>12}"
                       for k in keys))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from twinrt.dicom.folder import export_case, import_case
    from twinrt.model import Case, Prescription
    from twinrt.planning.objectives import objectives_from_json
    from twinrt.planning.workflow import PlanSetup, plan_case

    case = import_case(args.dicom_dir)
    prescriptions = None
    if args.target:
        if args.dose_gy is None or args.fractions is None:
            raise MissingInputError("--target needs --dose-gy and --fractions (the prescription)")
        prescriptions = [Prescription(args.target, args.dose_gy, args.fractions)]
    objectives = None
    if args.objectives:
        path = Path(args.objectives)
        if not path.is_file():
            raise MissingInputError(f"Objectives file {path} does not exist", path)
        objectives = [o.to_dict() for o in objectives_from_json(path.read_text(encoding="utf-8"))]
    grid_mm = None if str(args.dose_grid_mm).lower() == "ct" else float(args.dose_grid_mm)
    setup = PlanSetup.equispaced(args.beams, args.start_deg, dose_grid_mm=grid_mm, max_iter=args.max_iter,
                                 bixel_width_mm=args.bixel_mm, levels=args.levels)
    res = plan_case(case, objectives, setup, prescriptions, progress=_print_progress)
    out_case = Case(case.patient_id, case.ct, case.structures, {**case.doses, "planned": res.dose}, [res.plan],
                    dict(case.metadata))
    export_case(out_case, args.out)
    print(f"plan {res.plan.label}: {len(res.plan.beams)} beams, {res.sequencing['n_segments']} segments, "
          f"{res.sequencing['total_mu']:.0f} MU per fraction, approval {res.plan.approval}")
    print(" ".join(f"{k} {v:.1f} s" for k, v in res.timings_s.items()))
    print(f"wrote {args.out} (CT, RTSTRUCT, RTDOSE 'planned', RTPLAN)")
    print(twinrt.RESEARCH_USE_ONLY)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from twinrt.dicom.validate import validate_folder

    results = validate_folder(args.folder)
    bad = 0
    for path, errors, warnings in results:
        print(f"{path.name}: {len(errors)} error(s), {len(warnings)} warning(s)")
        for e in errors:
            print("   ", e)
        bad += bool(errors)
    print(f"{len(results)} file(s) checked, {bad} with errors")
    return 1 if bad else 0


def _cmd_make_sample(args: argparse.Namespace) -> int:
    from twinrt.sample_builder import build_sample

    path = build_sample(args.out)
    print(f"wrote sample patient to {path}")
    return 0


def _cmd_dose_predict(args: argparse.Namespace) -> int:
    """``twinrt dose-predict ...`` (issue 5): train, evaluate, predict, register and list models."""
    action = args.dp_command
    if action == "train":
        from twinrt.dosepredict.config import load_config
        from twinrt.dosepredict.train import train

        config = load_config(args.config)
        if args.epochs is not None:
            config.train.epochs = args.epochs
            config.validate()
        command = f"twinrt dose-predict train --config {args.config} --out {args.out}"
        command += f" --data {args.data}" if args.data else ""
        command += f" --epochs {args.epochs}" if args.epochs is not None else ""
        command += f" --max-patients {args.max_patients}" if args.max_patients is not None else ""
        entry = train(config, args.data, args.out, max_patients=args.max_patients, command=command)
        print("RESULT " + json.dumps({"model_id": entry["id"], "sha256": entry["sha256"],
                                      "dose_score": entry["validation"]["dose_score"],
                                      "dvh_score": entry["validation"]["dvh_score"],
                                      "n_patients": entry["validation"]["n_patients"],
                                      "seconds": entry["training"]["seconds_total"]}))
        return 0
    if action == "evaluate-openkbp":
        from twinrt.dosepredict.evaluate import evaluate_openkbp

        res = evaluate_openkbp(args.folder, args.model, args.limit, args.mc_samples)
        summary = {k: res[k] for k in ("dose_score", "dvh_score", "n_patients", "seconds_per_patient", "model_id",
                                       "sha256", "mc_samples")}
        if args.json:
            from twinrt.io_utils import write_text_atomic

            write_text_atomic(args.json, json.dumps(res, indent=1) + "\n")
            print(f"wrote {args.json}")
        print("RESULT " + json.dumps(summary))
        return 0
    if action == "predict":
        from twinrt.dicom.folder import export_case, import_case
        from twinrt.dosepredict.predict import DosePredictor
        from twinrt.model import Case

        case = import_case(args.dicom_dir)
        roi_map = None
        if args.roi_map:
            from twinrt.errors import InvalidInputError

            bad = [item for item in args.roi_map if "=" not in item]
            if bad:
                raise InvalidInputError(f"--roi-map items must be MODEL_ROI=STRUCTURE, got {bad}")
            roi_map = dict(item.split("=", 1) for item in args.roi_map)
        res = DosePredictor(args.model).predict_case(case, roi_map, args.mc_samples, progress=_print_progress)
        doses = {**case.doses, "predicted": res.dose}
        if res.std is not None:
            doses["predicted_std"] = res.std
        export_case(Case(case.patient_id, case.ct, case.structures, doses, case.plans, dict(case.metadata)), args.out)
        for w in res.warnings:
            print(f"warning: {w}")
        print(f"model {res.model_id} (sha256 {res.sha256}); structures: "
              + ", ".join(f"{k}={v}" for k, v in res.roi_map.items()))
        print(f"predicted dose max {res.dose.max_gy:.1f} Gy in {res.seconds:.1f} s; wrote {args.out}")
        print(twinrt.RESEARCH_USE_ONLY)
        return 0
    if action == "register":
        from twinrt.dosepredict.weights import register_model

        path = register_model(args.entry, args.dest, args.default)
        print(f"registered {args.entry} in {path}")
        return 0
    if action == "models":
        from twinrt.dosepredict.weights import list_models, model_dirs

        models = list_models()
        print("searched: " + ", ".join(str(d) for d in model_dirs()))
        for m in models:
            v = m.get("validation", {})
            print(f"{m['id']:<24} {m.get('version', ''):<8} {m.get('sizeMB', 0):6.1f} MB  dose score "
                  f"{v.get('dose_score')}  DVH score {v.get('dvh_score')}  {m['folder']}")
        if not models:
            print("no dose-prediction model installed")
        return 0
    return 2


def _cmd_contour(args: argparse.Namespace) -> int:
    """``twinrt contour classical DICOM_DIR --out OUT`` (issue 6): contours without a model, as RTSTRUCT."""
    from twinrt.autocontour import classical_contours, merge_structures
    from twinrt.dicom.folder import export_case, import_case
    from twinrt.model import Case

    case = import_case(args.dicom_dir)
    new = classical_contours(case.ct, args.groups)
    structures, actions = merge_structures(case.structures, new, args.replace)
    export_case(Case(case.patient_id, case.ct, structures, case.doses, case.plans, dict(case.metadata)), args.out)
    for name, action in actions.items():
        s = next(x for x in new if x.name == name)
        verb = {"add": "added", "replace": "replaced", "keep": "kept the existing"}[action]
        print(f"{verb} {name}: {float(s.mask.sum()) * case.ct.grid.voxel_volume_cc:.1f} cc")
    print(f"wrote {args.out} (no model: HU thresholds, morphology, connected components)")
    print(twinrt.RESEARCH_USE_ONLY)
    return 0


def _cmd_contour_sam(args: argparse.Namespace) -> int:
    """``twinrt contour sam-register|sam-models|sam`` (issue 6): Segment Anything checkpoints and prompts."""
    from twinrt.autocontour import sam as samlib

    if args.contour_command == "sam-register":
        entry = samlib.register_checkpoint(args.checkpoint, args.model_type, args.id, args.models_dir)
        print(f"registered {entry['id']} ({entry['model_type']}, sha256 {entry['sha256']}) in "
              f"{samlib.sam_models_dir(args.models_dir)}")
        return 0
    if args.contour_command == "sam-models":
        entries = samlib.list_checkpoints(args.models_dir)
        for e in entries:
            print(f"{e['id']:<24} {e['model_type']:<6} {e.get('sizeMB', 0):8.1f} MB  sha256 {e['sha256']}")
        if not entries:
            print(f"no SAM checkpoint registered in {samlib.sam_models_dir(args.models_dir)}")
        return 0
    from twinrt.autocontour import merge_actions, merge_structures
    from twinrt.dicom.folder import export_case, import_case
    from twinrt.errors import InvalidInputError
    from twinrt.model import Case, Structure, StructureType

    if not args.point and not args.box:
        raise InvalidInputError("Give at least one --point I J (or --negative I J) or a --box I0 J0 I1 J1")
    case = import_case(args.dicom_dir)
    # Refused before the model runs: merging would keep the patient's structure of that name.
    if merge_actions([s.name for s in case.structures], [args.name], args.replace)[args.name] == "keep":
        raise InvalidInputError(f"The patient already has a structure '{args.name}'; choose another --name or "
                                "pass --replace")
    path = Path(args.model)
    loaded = (samlib.load_sam(path, args.model_type) if path.suffix in (".pth", ".pt")
              else samlib.load_registered(args.model, args.models_dir))
    points = [tuple(p) for p in (args.point or [])] + [tuple(p) for p in (args.negative or [])]
    labels = [1] * len(args.point or []) + [0] * len(args.negative or [])
    mask, rep = samlib.segment_structure(np.asarray(case.ct.array), samlib.SliceSegmenter(loaded), args.slice,
                                         points or None, labels or None, args.box, not args.no_propagate,
                                         args.max_slices, progress=_print_progress)
    new = Structure(args.name, mask, case.ct.grid, (255, 255, 0), StructureType.guess(args.name))
    structures, _ = merge_structures(case.structures, [new], args.replace)
    out_case = Case(case.patient_id, case.ct, structures, case.doses, case.plans, dict(case.metadata))
    from twinrt.audit import AuditLog

    # The AI action goes to the case's audit log (exported as AUDIT.jsonl) with the model's identity.
    AuditLog.of_case(out_case).ai_action(
        f"Segment Anything contoured '{args.name}' (research use only)",
        {"model": "segment-anything", "model_id": loaded.model_id or loaded.path.name,
         "model_type": loaded.model_type, "sha256": loaded.sha256, **rep})
    export_case(out_case, args.out)
    print(f"{args.name}: {float(mask.sum()) * case.ct.grid.voxel_volume_cc:.1f} cc on slices "
          f"{', '.join(str(int(k)) for k in np.nonzero(mask.any(axis=(1, 2)))[0][[0, -1]]) if mask.any() else '-'}; "
          f"{rep.get('stopped', {})}")
    print(f"model {loaded.model_id or loaded.path.name} ({loaded.model_type}, sha256 {loaded.sha256}); wrote {args.out}")
    print(twinrt.RESEARCH_USE_ONLY)
    return 0


def _cmd_contour_oar(args: argparse.Namespace) -> int:
    """``twinrt contour train|evaluate-openkbp|oar|models`` (issue 6): the organ-at-risk network."""
    from twinrt.autocontour import oar

    action = args.contour_command
    if action == "train":
        from twinrt.autocontour.oar_config import OarConfig
        from twinrt.autocontour.oar_train import train

        config = OarConfig.load(args.config)
        if args.epochs is not None:
            config.train.epochs = args.epochs
            config.validate()
        command = f"twinrt contour train --config {args.config} --out {args.out}"
        command += f" --data {args.data}" if args.data else ""
        command += f" --epochs {args.epochs}" if args.epochs is not None else ""
        command += f" --max-patients {args.max_patients}" if args.max_patients is not None else ""
        entry = train(config, args.data, args.out, max_patients=args.max_patients, command=command)
        v = entry["validation"]
        print("RESULT " + json.dumps({"model_id": entry["id"], "sha256": entry["sha256"], "mean_dice": v["mean_dice"],
                                      "dice": v["dice"], "hd95_mm": v["hd95_mm"], "n_patients": v["n_patients"],
                                      "seconds_per_patient": v["seconds_per_patient"],
                                      "seconds": entry["training"]["seconds_total"]}))
        return 0
    if action == "evaluate-openkbp":
        res = oar.evaluate_openkbp(args.folder, args.model, args.limit, args.mc_samples)
        if args.json:
            from twinrt.io_utils import write_text_atomic

            write_text_atomic(args.json, json.dumps(res, indent=1) + "\n")
            print(f"wrote {args.json}")
        print("RESULT " + json.dumps({k: res[k] for k in ("mean_dice", "dice", "hd95_mm", "n_patients",
                                                          "seconds_per_patient", "model_id", "sha256", "mc_samples")}))
        return 0
    if action == "models":
        models = oar.list_models()
        print(f"searched: {oar.user_models_dir()}, {oar.package_models_dir()}")
        for m in models:
            v = m.get("validation", {})
            print(f"{m['id']:<26} {m.get('version', ''):<8} {m.get('sizeMB', 0):6.1f} MB  mean Dice {v.get('mean_dice')} "
                  f"({v.get('n_patients')} patients)  {m['path']}")
        if not models:
            print("no organ-segmentation model installed")
        return 0
    from twinrt.dicom.folder import export_case, import_case

    case = import_case(args.dicom_dir)
    out, res, actions = oar.contour_case(case, args.model, args.organs, args.replace, args.mc_samples,
                                         progress=_print_progress)
    export_case(out, args.out)
    for s in res.structures:
        unc = res.organ_uncertainty.get(s.name)
        print(f"{s.name:>14}: {s.volume_cc:7.1f} cc"
              + (f"  boundary uncertainty (MC-dropout std) {unc:.3f}" if unc is not None else ""))
    for name, action in actions.items():
        print(f"{name}: {dict(add='added', replace='replaced', keep='kept the existing structure')[action]}")
    if res.missing:
        print(f"not found on this CT: {', '.join(res.missing)}")
    for note in res.notes:
        print(note)
    print(f"model {res.model_id} {res.version} (sha256 {res.sha256}), {res.mc_samples} MC-dropout samples, "
          f"{res.seconds:.1f} s; wrote {args.out}")
    print(twinrt.RESEARCH_USE_ONLY)
    return 0


def _add_dose_predict_parser(sub: argparse._SubParsersAction) -> None:
    """The ``dose-predict`` subcommand group."""
    dp = sub.add_parser("dose-predict", help="AI dose prediction (3D U-Net trained on OpenKBP): train, evaluate, "
                        "predict")
    dps = dp.add_subparsers(dest="dp_command", required=True)
    t = dps.add_parser("train", help="train a model on OpenKBP (writes <id>.pt and its manifest entry <id>.json)")
    t.add_argument("--config", required=True, help="recipe JSON, or a shipped one by name (openkbp_unet_cpu)")
    t.add_argument("--out", type=Path, required=True, help="output folder")
    t.add_argument("--data", type=Path, default=None, help="OpenKBP folder with train/ and validation/ "
                   "(default ../shared/data/openkbp)")
    t.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    t.add_argument("--max-patients", type=int, default=None, help="use only the first N train and N validation "
                   "patients (smoke runs)")
    e = dps.add_parser("evaluate-openkbp", help="predict and score every pt_*.npz of a folder with the OpenKBP "
                       "metrics; ends with a RESULT {json} line")
    e.add_argument("folder", type=Path)
    e.add_argument("--model", default=None, help="model id or .pt/.json path (default: the default model)")
    e.add_argument("--limit", type=int, default=None, help="only the first N patients")
    e.add_argument("--mc-samples", type=int, default=None, help="MC-dropout passes (default: the model's)")
    e.add_argument("--json", type=Path, default=None, help="also write the full results (per patient) here")
    p = dps.add_parser("predict", help="predict the dose of a DICOM patient folder and write it as RTDOSE")
    p.add_argument("dicom_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--mc-samples", type=int, default=None)
    p.add_argument("--roi-map", nargs="*", metavar="MODEL_ROI=STRUCTURE",
                   help="override structure matching, e.g. PTV70=PTV_High RightParotid=Parotid_R")
    r = dps.add_parser("register", help="install a trained model (<id>.json + weights) into a models folder")
    r.add_argument("entry", type=Path, help="the <id>.json written by train")
    r.add_argument("--dest", type=Path, default=None, help="models folder (default $TWINRT_MODELS_DIR or "
                   "~/.twinrt/models; twinrt/dosepredict/models ships it)")
    r.add_argument("--default", action="store_true", help="make it the folder's default model")
    dps.add_parser("models", help="list the installed dose-prediction models")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``twinrt`` command."""
    p = argparse.ArgumentParser(prog="twinrt", description="TwinRT: AI radiotherapy toolkit. "
                                + twinrt.RESEARCH_USE_ONLY)
    p.add_argument("--version", action="version", version=f"twinrt {twinrt.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the All-in-One pipeline on the bundled sample patient")
    d.add_argument("--out", type=Path, default=Path("twinrt-output"), help="output folder (default twinrt-output)")
    d.add_argument("--no-scene", action="store_true", help="skip the Slicer scene (.mrb)")
    d.add_argument("--no-plan", action="store_true", help="skip planning (only evaluate the doses in the input)")
    d.add_argument("--protocol", choices=["head-and-neck", "none"], default="head-and-neck",
                   help="head-and-neck (default): every AI stage (contour, predict, virtual planner, goals, twin "
                        "and toxicity baseline); none: plan from the prescription only")
    r = sub.add_parser("run", help="run the All-in-One pipeline on a DICOM patient folder")
    r.add_argument("dicom_dir", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--no-scene", action="store_true", help="skip the Slicer scene (.mrb)")
    r.add_argument("--no-plan", action="store_true", help="skip planning (only evaluate the doses in the input)")
    r.add_argument("--protocol", choices=["head-and-neck", "none"], default="none",
                   help="head-and-neck: also run the AI stages (contour, predict, virtual planner, goals, twin and "
                        "toxicity baseline); none (default): plan from the prescription only")
    e = sub.add_parser("export", help="write an OpenKBP patient or the TG-119 phantom as DICOM")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--openkbp", type=Path, help="an OpenKBP pt_N.npz file")
    g.add_argument("--tg119", nargs="?", const="default", help="tg119.npz (default: ../shared/data/tg119)")
    e.add_argument("--out", type=Path, required=True)
    v = sub.add_parser("dvh", help="print DVH metrics of a DICOM patient folder")
    v.add_argument("dicom_dir", type=Path)
    v.add_argument("--dose", help="dose name (default: the first RTDOSE)")
    v.add_argument("--json", action="store_true")
    pl = sub.add_parser("plan", help="plan a DICOM patient (photon IMRT, step-and-shoot) and write DICOM-RT")
    pl.add_argument("dicom_dir", type=Path)
    pl.add_argument("--out", type=Path, required=True)
    pl.add_argument("--beams", type=int, default=9, help="number of equispaced coplanar beams (default 9)")
    pl.add_argument("--start-deg", type=float, default=0.0, help="gantry angle of the first beam (degrees)")
    pl.add_argument("--bixel-mm", type=float, default=5.0)
    pl.add_argument("--dose-grid-mm", default="5", help="dose-grid spacing in mm, or 'ct' for the CT grid")
    pl.add_argument("--max-iter", type=int, default=200)
    pl.add_argument("--levels", type=int, default=10, help="intensity levels for leaf sequencing")
    pl.add_argument("--objectives", help="JSON list of objectives (default: TwinRT's starting set)")
    pl.add_argument("--target", help="target structure (default: the prescriptions in the input RTPLAN)")
    pl.add_argument("--dose-gy", type=float, help="prescribed dose to --target (Gy)")
    pl.add_argument("--fractions", type=int, help="number of fractions")
    c = sub.add_parser("validate", help="check DICOM files with dciodvfy (dicom3tools)")
    c.add_argument("folder", type=Path)
    m = sub.add_parser("make-sample", help="(developers) rebuild the bundled sample from ../shared/data")
    m.add_argument("--out", type=Path, default=None)
    _add_dose_predict_parser(sub)
    ct = sub.add_parser("contour", help="automatic contouring: organ-at-risk network, Segment Anything prompts, "
                        "contours without a model")
    cts = ct.add_subparsers(dest="contour_command", required=True)
    cl = cts.add_parser("classical", help="body, lungs, bones and air cavities from the CT's HU (no model); "
                        "writes the patient folder again with them in the RTSTRUCT")
    cl.add_argument("dicom_dir", type=Path)
    cl.add_argument("--out", type=Path, required=True)
    cl.add_argument("--groups", nargs="+", default=None, metavar="GROUP",
                    help="any of body, lungs, bones, air (default: all)")
    cl.add_argument("--replace", action="store_true",
                    help="replace structures of the same name (default: keep the existing ones)")
    sr = cts.add_parser("sam-register", help="import a Segment Anything / MedSAM checkpoint you downloaded "
                        "(checked, copied, sha256 recorded)")
    sr.add_argument("checkpoint", type=Path)
    sr.add_argument("--model-type", required=True, choices=["vit_b", "vit_l", "vit_h"], help="MedSAM is vit_b")
    sr.add_argument("--id", default=None, help="model id (default: the file name)")
    sr.add_argument("--models-dir", type=Path, default=None, help="models folder (default $TWINRT_MODELS_DIR "
                    "or ~/.twinrt/models); checkpoints go to its sam/ sub-folder")
    sm = cts.add_parser("sam-models", help="list the registered Segment Anything checkpoints")
    sm.add_argument("--models-dir", type=Path, default=None)
    sa = cts.add_parser("sam", help="prompt Segment Anything on one slice of a DICOM patient, propagate through "
                        "the neighbouring slices, write the structure into the RTSTRUCT")
    sa.add_argument("dicom_dir", type=Path)
    sa.add_argument("--out", type=Path, required=True)
    sa.add_argument("--model", required=True, help="registered id, or a .pth file (then give --model-type)")
    sa.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    sa.add_argument("--models-dir", type=Path, default=None)
    sa.add_argument("--slice", type=int, required=True, help="slice index k (0 = first slice of the CT)")
    sa.add_argument("--point", type=float, nargs=2, action="append", metavar=("I", "J"),
                    help="a voxel (column i, row j) inside the structure; repeatable")
    sa.add_argument("--negative", type=float, nargs=2, action="append", metavar=("I", "J"),
                    help="a voxel outside the structure; repeatable")
    sa.add_argument("--box", type=float, nargs=4, metavar=("I0", "J0", "I1", "J1"), help="a box around it (voxels)")
    sa.add_argument("--name", required=True, help="structure name")
    sa.add_argument("--no-propagate", action="store_true", help="segment the prompted slice only")
    sa.add_argument("--max-slices", type=int, default=None, help="propagate at most this many slices each way")
    sa.add_argument("--replace", action="store_true", help="replace a structure of the same name")
    ot = cts.add_parser("train", help="train the organ-at-risk network on OpenKBP (writes <id>.pt and <id>.json)")
    ot.add_argument("--config", type=Path, required=True,
                    help="recipe JSON, e.g. twinrt/autocontour/configs/openkbp_oar_unet25d_cpu.json")
    ot.add_argument("--out", type=Path, required=True)
    ot.add_argument("--data", type=Path, default=None, help="OpenKBP folder (default ../shared/data/openkbp)")
    ot.add_argument("--epochs", type=int, default=None)
    ot.add_argument("--max-patients", type=int, default=None, help="first N training and validation patients")
    oe = cts.add_parser("evaluate-openkbp", help="segment every pt_*.npz of a folder and print per-organ Dice, "
                        "HD95 (mm) and time per patient, ending with RESULT {json}")
    oe.add_argument("folder", type=Path)
    oe.add_argument("--model", default=None, help="model id or <id>.json path (default the shipped model)")
    oe.add_argument("--limit", type=int, default=None)
    oe.add_argument("--mc-samples", type=int, default=0, help="MC-dropout passes per patient (timed; default 0)")
    oe.add_argument("--json", type=Path, default=None, help="also write every figure, per patient, to this file")
    oo = cts.add_parser("oar", help="contour the head-and-neck organs at risk of a DICOM patient with the network; "
                        "keeps the patient's own structures, adds the missing ones")
    oo.add_argument("dicom_dir", type=Path)
    oo.add_argument("--out", type=Path, required=True)
    oo.add_argument("--model", default=None)
    oo.add_argument("--organs", nargs="+", default=None, metavar="ORGAN", help="default: every organ of the model")
    oo.add_argument("--mc-samples", type=int, default=None, help="MC-dropout passes (default the model's)")
    oo.add_argument("--replace", action="store_true", help="replace the patient's structure of the same organ")
    cts.add_parser("models", help="list the installed organ-segmentation models")
    from twinrt.twin.cli import add_twin_parser

    add_twin_parser(sub)
    from twinrt.toxicity.cli import add_toxicity_parser

    add_toxicity_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``twinrt`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from twinrt.sample import sample_dicom_dir

            return _cmd_run(sample_dicom_dir(), args.out, args.no_scene, args.no_plan,
                            None if args.protocol == "none" else args.protocol)
        if args.command == "run":
            return _cmd_run(args.dicom_dir, args.out, args.no_scene, args.no_plan,
                            None if args.protocol == "none" else args.protocol)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "dvh":
            return _cmd_dvh(args)
        if args.command == "plan":
            return _cmd_plan(args)
        if args.command == "validate":
            return _cmd_validate(args)
        if args.command == "make-sample":
            return _cmd_make_sample(args)
        if args.command == "dose-predict":
            return _cmd_dose_predict(args)
        if args.command == "contour":
            if args.contour_command == "classical":
                return _cmd_contour(args)
            if args.contour_command.startswith("sam"):
                return _cmd_contour_sam(args)
            return _cmd_contour_oar(args)
        if args.command == "twin":
            from twinrt.twin.cli import run_twin_command

            return run_twin_command(args, _print_progress)
        if args.command == "toxicity":
            from twinrt.toxicity.cli import run_toxicity_command

            return run_toxicity_command(args, _print_progress)
    except TwinRTError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        # The typed error behind it (a failed pipeline stage's cause), for tests and bug reports.
        root = exc.__cause__ if isinstance(exc.__cause__, TwinRTError) else exc
        logging.getLogger(__name__).debug("refused with %s", type(root).__name__)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
