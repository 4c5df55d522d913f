"""``twinrt toxicity …``: ToxicityMonitor from the command line (wired into :mod:`twinrt.cli`).

``twinrt toxicity simulate-cohort``  a simulated cohort (twin courses, hidden truth) as the CSV layout
``twinrt toxicity train``            train the GRU risk model on a cohort (CSV) and write it with its manifest
``twinrt toxicity evaluate``         leave-one-patient-out on a cohort (CSV): GRU vs LKB (``RESULT {json}``)
``twinrt toxicity predict``          risk per fraction of every trajectory of a CSV cohort with a trained model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import twinrt
from twinrt.io_utils import json_default

#: Where the shipped model lives (trained on a development cohort, see its manifest).
MODELS_DIR = Path(__file__).parent / "models"


def fraction_list(text: str) -> tuple[int, ...]:
    """``"1,10,20"`` → ``(1, 10, 20)`` (argparse type; fraction numbers ≥ 1)."""
    try:
        values = tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of fraction numbers (e.g. 1,10,20)")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': fraction numbers start at 1")
    return values


def add_toxicity_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``toxicity`` command group."""
    tx = sub.add_parser("toxicity", help="toxicity early warning: simulate a cohort, train, evaluate, predict")
    ts = tx.add_subparsers(dest="toxicity_command", required=True)
    s = ts.add_parser("simulate-cohort", help="simulate a cohort (courses through the twin) into "
                                              "trajectories.csv + outcomes.csv")
    s.add_argument("--seed", type=int, required=True, help="cohort seed (>= 1000 are kept for reported results)")
    s.add_argument("--patients", type=int, default=20)
    s.add_argument("--fractions", type=int, default=30)
    s.add_argument("--cases", type=int, default=12, help="planning cases to draw the patients from")
    s.add_argument("--pet-fractions", type=fraction_list, default=(), metavar="F,F,...",
                   help="fractions that also have an FDG PET, e.g. 1,10,20 (default: none)")
    s.add_argument("--out", type=Path, required=True, help="folder for trajectories.csv and outcomes.csv")
    for name, text in (("train", "train the GRU risk model on a CSV cohort"),
                       ("evaluate", "leave-one-patient-out of the GRU model and the LKB baseline on a CSV cohort"),
                       ("predict", "risk after every fraction for each trajectory of a CSV cohort")):
        p = ts.add_parser(name, help=text)
        p.add_argument("cohort_dir", type=Path, help="folder with trajectories.csv and outcomes.csv "
                                                     "(layout: twinrt/toxicity/csvio.py, README)")
        if name == "train":
            p.add_argument("--out", type=Path, required=True, help="folder for <model_id>.pt and .json")
            p.add_argument("--model-id", default="toxicity-gruae-v2")
            p.add_argument("--epochs", type=int, default=150)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--description", default=None, help="what the training cohort is (stored in the manifest)")
        if name == "evaluate":
            p.add_argument("--threshold", type=float, default=0.5)
            p.add_argument("--epochs", type=int, default=150)
        if name == "predict":
            p.add_argument("--model", type=Path, default=None, help="model .pt (default: the shipped model)")


def _read(cohort_dir: Path) -> Any:
    from twinrt.toxicity.csvio import read_cohort_csv

    return read_cohort_csv(cohort_dir / "trajectories.csv", cohort_dir / "outcomes.csv")


def shipped_model_path() -> Path:
    """The shipped model's weights file."""
    return MODELS_DIR / "toxicity-gruae-v2.pt"


def run_toxicity_command(args: argparse.Namespace, progress: Callable[[float, str], None]) -> int:
    """Run ``twinrt toxicity <command>``; returns the exit status."""
    from twinrt.toxicity.model import ToxicityModel, leave_one_patient_out

    cmd = args.toxicity_command
    if cmd == "simulate-cohort":
        from twinrt.io_utils import atomic_dir
        from twinrt.toxicity.cohort import cohort_cases, simulate_cohort
        from twinrt.toxicity.csvio import write_cohort_csv

        cases = cohort_cases(args.cases)
        cohort, hidden = simulate_cohort(cases, args.patients, args.seed, args.fractions, progress=progress,
                                         pet_fractions=args.pet_fractions)
        with atomic_dir(args.out) as tmp:
            write_cohort_csv(cohort, tmp / "trajectories.csv", tmp / "outcomes.csv")
            (tmp / "hidden_truth.json").write_text(json.dumps(
                [{"patient_id": h.patient_id, "sensitivity": h.sensitivity, "thresholds": h.thresholds}
                 for h in hidden], indent=1))
        n_toxic = sum(t.toxic for t in cohort.trajectories)
        print(f"\n{len(cohort.trajectories)} organ trajectories of {args.patients} patients ({n_toxic} toxic) "
              f"written to {args.out}")
        return 0
    cohort = _read(args.cohort_dir)
    if cmd == "train":
        if args.description:
            cohort.description = args.description
        model = ToxicityModel.fit(cohort, seed=args.seed, epochs=args.epochs, model_id=args.model_id,
                                  progress=progress)
        path = model.save(args.out)
        print(f"\nwrote {path} (sha256 {model.sha256})")
        return 0
    if cmd == "evaluate":
        res = leave_one_patient_out(cohort, threshold=args.threshold, epochs=args.epochs, progress=progress)
        g, b = res["gru"], res["lkb"]
        print(f"\n{res['n_trajectories']} trajectories of {res['n_patients']} patients, {res['n_toxic']} toxic")
        print(f"AUC GRU {g['auc']:.3f}, LKB {b['auc']:.3f}; at {args.threshold:g}: GRU sensitivity "
              f"{g['sensitivity']:.2f} specificity {g['specificity']:.2f}, LKB {b['sensitivity']:.2f} / "
              f"{b['specificity']:.2f}; lead time median GRU {g['lead_time_fractions_median']} fractions")
        summary = {k: v for k, v in res.items() if k != "predictions"}
        print("RESULT " + json.dumps(summary, default=json_default))
        return 0
    model = ToxicityModel.load(args.model or shipped_model_path())
    for t in cohort.trajectories:
        r = model.risk(t)
        print(f"{t.patient_id} {t.organ} ({t.endpoint}): risk after each fraction "
              + " ".join(f"{v:.2f}" for v in r))
    print(f"model {model.model_id} sha256 {model.sha256}; {twinrt.RESEARCH_USE_ONLY}")
    return 0


__all__ = ["fraction_list", "add_toxicity_parser", "run_toxicity_command", "shipped_model_path", "MODELS_DIR"]
