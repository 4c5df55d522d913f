"""Similar past cases (issue 7): do the shipped library's neighbours predict what a plan achieves?

Loads the shipped case library (the 169 OpenKBP training patients,
``twinrt/twin/data/openkbp_case_library.json``; builds nothing) and, for each OpenKBP validation
patient (none is in the library), predicts every organ DVH metric in Gy (D0.1cc, Dmean and the
goal set's other organ dose metrics) three ways (:func:`twinrt.twin.similar.evaluate_library`):
the mean of the k nearest cases on all features (``knn``), the same with neighbours found on the
organ's own geometry and the targets (``knn_organ``), and the library's population mean (the
baseline). Errors are against the patient's reference-dose value.

Needs ../shared/data (skips with a message, exit status 0, when it is absent). Usage::

    .venv/bin/python bench/twin_similar_cases.py            # 33 validation patients, k = 5, ~15 s
    .venv/bin/python bench/twin_similar_cases.py --k 10 --patients 10 --json out.json

Ends with ``RESULT {json}``: ``knn_mae_gy``, ``knn_organ_mae_gy``, ``population_mae_gy`` (mean
absolute error over every patient × metric pair, Gy), ``k``, ``n_validation``, ``n_library``,
``n_pairs``, ``n_metrics``, ``knn_wins_metrics``, ``knn_organ_wins_metrics``, ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

from twinrt.data import openkbp_patients, shared_data_dir
from twinrt.twin.similar import SHIPPED_LIBRARY_PATH, evaluate_library, load_shipped_library


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=5, help="neighbours per prediction (default 5)")
    p.add_argument("--patients", type=int, default=None, help="only the first N validation patients")
    p.add_argument("--json", help="also write the full result (per metric, per patient) to this file")
    args = p.parse_args(argv)
    if shared_data_dir() is None:
        print("Skipped: ../shared/data not found (set TWINRT_SHARED_DATA); the evaluation needs the OpenKBP "
              "validation patients.", file=sys.stderr)
        print("RESULT " + json.dumps({"skipped": "../shared/data absent"}))
        return 0
    paths = openkbp_patients("validation")[:args.patients]
    library = load_shipped_library()
    print(f"Library: {SHIPPED_LIBRARY_PATH.name}, {len(library)} cases; validation patients: {len(paths)}; "
          f"k = {args.k}")
    t0 = time.perf_counter()
    res = evaluate_library(library, paths, k=args.k)
    seconds = time.perf_counter() - t0
    print(f"\n{'metric':<24}{'n':>4}{'k-NN':>9}{'k-NN organ':>12}{'population':>12}   (MAE, Gy)")
    for m, v in res["per_metric"].items():
        print(f"{m:<24}{v['n']:>4}{v['knn_mae_gy']:>9.2f}{v['knn_organ_mae_gy']:>12.2f}"
              f"{v['population_mae_gy']:>12.2f}")
    print(f"{'all (patient x metric)':<24}{res['n_pairs']:>4}{res['knn_mae_gy']:>9.2f}{res['knn_organ_mae_gy']:>12.2f}"
          f"{res['population_mae_gy']:>12.2f}")
    print(f"\nk-NN beats the population mean on {res['knn_wins_metrics']}/{res['n_metrics']} metrics "
          f"(organ-focused: {res['knn_organ_wins_metrics']}/{res['n_metrics']}); {seconds:.1f} s")
    summary = {k: res[k] for k in ("knn_mae_gy", "knn_organ_mae_gy", "population_mae_gy", "k", "n_validation",
                                   "n_library", "n_pairs", "n_metrics", "knn_wins_metrics", "knn_organ_wins_metrics")}
    summary["seconds"] = round(seconds, 1)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**summary, "per_metric": res["per_metric"], "per_patient": res["per_patient"]}, fh, indent=1)
    print("RESULT " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
