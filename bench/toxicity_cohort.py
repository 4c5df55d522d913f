"""ToxicityMonitor (issue 8): leave-one-patient-out on simulated cohorts, GRU model against LKB NTCP.

Each cohort is made by :mod:`twinrt.toxicity.cohort` (simulated courses through the digital twin;
hidden radiosensitivity; toxicity from the true cumulative BED, its texture and that sensitivity;
an imperfect image signal), with the generating parameters fixed before any model was fitted and
seeds never used in development (:data:`twinrt.toxicity.cohort.EVALUATION_SEEDS`). Planning cases:
OpenKBP training patients when ``../shared/data`` is present (else the bundled sample patient).

**These figures show that the method works as built, not clinical performance.**

Usage::

    .venv/bin/python bench/toxicity_cohort.py --patients 16           # 3 cohorts x 16 patients, ~25 min (reported)
    .venv/bin/python bench/toxicity_cohort.py --seeds 1001 --patients 12 --json out.json
    .venv/bin/python bench/toxicity_cohort.py --patients 16 --pet-fractions 1,11,21   # with interim PET

With ``--pet-fractions`` every simulated patient also has an FDG PET on those fractions (``pet_``
features); each cohort is then evaluated twice by leave-one-patient-out, with every feature
(``auc_gru``) and with the ``pet_`` features removed (``auc_gru_without_pet``: the same patients seen
without PET), so the PET's contribution is a paired comparison.

Ends with ``RESULT {json}``: ``auc_gru``, ``auc_lkb`` (pooled over the cohorts' held-out
trajectories: the mean of the per-cohort AUCs), ``lead_time_fractions_median`` (GRU, pooled over all
toxic trajectories whose risk crossed the threshold at or before onset), sensitivity/specificity at
the stated threshold, per-cohort figures, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

import numpy as np

from twinrt.toxicity.cohort import EVALUATION_SEEDS, cohort_cases, simulate_cohort
from twinrt.toxicity.cli import fraction_list
from twinrt.toxicity.model import leave_one_patient_out


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(EVALUATION_SEEDS))
    p.add_argument("--patients", type=int, default=20, help="patients per cohort (default 20)")
    p.add_argument("--fractions", type=int, default=30, help="fractions per course (default 30)")
    p.add_argument("--cases", type=int, default=12, help="planning cases the patients are drawn from (default 12)")
    p.add_argument("--threshold", type=float, default=0.5, help="risk threshold (default 0.5, stated)")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--pet-fractions", type=fraction_list, default=(), metavar="F,F,...",
                   help="fractions with an FDG PET for every patient, e.g. 1,11,21 (default: none)")
    p.add_argument("--json", help="also write the full result to this file")
    p.add_argument("--csv-dir", help="also write each cohort as trajectories/outcomes CSV into this folder")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cases = cohort_cases(args.cases)
    print(f"planning cases: {', '.join(c.patient_id for c in cases)}")
    per_seed, leads, sens, spec = [], [], [], []
    for seed in args.seeds:
        ts = time.perf_counter()
        cohort, hidden = simulate_cohort(cases, args.patients, seed, args.fractions,
                                         progress=lambda f, t: print(f"  {f * 100:5.1f} %  {t}", file=sys.stderr),
                                         pet_fractions=args.pet_fractions)
        sim_s = time.perf_counter() - ts
        if args.csv_dir:
            from pathlib import Path

            from twinrt.toxicity.csvio import write_cohort_csv

            d = Path(args.csv_dir)
            d.mkdir(parents=True, exist_ok=True)
            write_cohort_csv(cohort, d / f"trajectories_{seed}.csv", d / f"outcomes_{seed}.csv")
        res = leave_one_patient_out(cohort, threshold=args.threshold, seed=0, epochs=args.epochs)
        g, b = res["gru"], res["lkb"]
        no_pet = None
        if args.pet_fractions:
            no_pet = leave_one_patient_out(cohort.without_features(("pet_",)), threshold=args.threshold, seed=0,
                                           epochs=args.epochs)
        leads += g["lead_time_fractions"]
        sens.append(g["sensitivity"])
        spec.append(g["specificity"])
        row = {"seed": seed, "n_patients": res["n_patients"], "n_trajectories": res["n_trajectories"],
               "n_toxic": res["n_toxic"], "auc_gru": round(res["auc_gru"], 4), "auc_lkb": round(res["auc_lkb"], 4),
               "auc_gru_fraction_10": round(g["auc_fraction_10"], 4), "auc_gru_fraction_15": round(g["auc_fraction_15"], 4),
               "sensitivity_gru": round(g["sensitivity"], 4), "specificity_gru": round(g["specificity"], 4),
               "sensitivity_lkb": round(b["sensitivity"], 4), "specificity_lkb": round(b["specificity"], 4),
               "lead_time_gru_median": g["lead_time_fractions_median"],
               "lead_time_lkb_median": b["lead_time_fractions_median"],
               "share_positive_lead_gru": g["share_positive_lead"], "share_positive_lead_lkb": b["share_positive_lead"],
               "seconds_simulation": round(sim_s, 1), "seconds_lopo": res["seconds"],
               "mean_hidden_sensitivity": round(float(np.mean([h.sensitivity for h in hidden])), 3)}
        if no_pet is not None:
            row["auc_gru_without_pet"] = round(no_pet["auc_gru"], 4)
            row["lead_time_gru_median_without_pet"] = no_pet["gru"]["lead_time_fractions_median"]
        per_seed.append(row)
        print(f"seed {seed}: {row['n_trajectories']} organ trajectories ({row['n_toxic']} toxic) of "
              f"{row['n_patients']} patients | AUC GRU {row['auc_gru']:.3f} (after fraction 10: "
              f"{row['auc_gru_fraction_10']:.3f}, 15: {row['auc_gru_fraction_15']:.3f}) vs LKB {row['auc_lkb']:.3f} | "
              f"GRU sens/spec at {args.threshold:g}: {row['sensitivity_gru']:.2f}/{row['specificity_gru']:.2f} "
              f"(LKB {row['sensitivity_lkb']:.2f}/{row['specificity_lkb']:.2f}) | lead time median "
              f"GRU {row['lead_time_gru_median']} LKB {row['lead_time_lkb_median']} fractions | "
              f"simulation {sim_s:.0f} s, LOPO {res['seconds']:.0f} s"
              + (f" | without PET: AUC GRU {row['auc_gru_without_pet']:.3f}" if no_pet is not None else ""))
    result = {"auc_gru": round(float(np.mean([r["auc_gru"] for r in per_seed])), 4),
              "auc_lkb": round(float(np.mean([r["auc_lkb"] for r in per_seed])), 4),
              "lead_time_fractions_median": float(np.median(leads)) if leads else None,
              "sensitivity_gru": round(float(np.mean(sens)), 4), "specificity_gru": round(float(np.mean(spec)), 4),
              "threshold": args.threshold, "pet_fractions": list(args.pet_fractions), "seeds": args.seeds, "patients_per_cohort": args.patients,
              "fractions": args.fractions, "per_cohort": per_seed, "seconds": round(time.perf_counter() - t0, 1),
              "note": "simulated cohorts: the method works as built, not clinical performance"}
    if args.pet_fractions:
        result["auc_gru_without_pet"] = round(float(np.mean([r["auc_gru_without_pet"] for r in per_seed])), 4)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
