"""The best OpenKBP scores a reduced-resolution dose-prediction recipe can reach: the "oracle" floor.

A recipe with ``downsample = f`` learns the reference dose average-pooled by ``f`` and its
prediction is upsampled back trilinearly (:meth:`twinrt.dosepredict.predict.DosePredictor.predict_arrays`).
Even a perfect network reproduces only the pooled dose, so scoring *the reference itself*, pooled and
upsampled the same way, against the full-resolution reference gives the lowest dose and DVH
scores that recipe can reach. Issue 5's targets are dose score <= 2.6 Gy and DVH score <= 1.7 Gy.

Needs ../shared/data. Usage::

    .venv/bin/python bench/dosepredict_resolution_floor.py               # factor 2 (the CPU recipe)
    .venv/bin/python bench/dosepredict_resolution_floor.py --factor 1    # no pooling (floor 0)

Ends with one line ``RESULT {json}`` holding ``dose_score``, ``dvh_score``, ``n_patients`` and ``factor``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import numpy as np

from twinrt.data import openkbp_patients, shared_data_dir
from twinrt.dosepredict.inputs import downsample, load_openkbp_arrays, upsample
from twinrt.dosepredict.metrics import openkbp_scores, score_patient


def pooled_and_upsampled(dose_gy: np.ndarray, factor: int) -> np.ndarray:
    """``dose_gy`` average-pooled by ``factor`` and upsampled back as the predictor does (Gy)."""
    import torch

    low = torch.from_numpy(downsample(dose_gy, factor))[None, None]
    return np.clip(upsample(low, factor)[0, 0].numpy(), 0.0, None)


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--factor", type=int, default=2, help="downsample factor of the recipe (default 2)")
    p.add_argument("--split", default="validation")
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args(argv)
    if shared_data_dir() is None:
        print("../shared/data not found: set TWINRT_SHARED_DATA", file=sys.stderr)
        return 2
    paths = openkbp_patients(args.split)[:args.limit]
    scores = []
    for path in paths:
        a = load_openkbp_arrays(path)
        pred = pooled_and_upsampled(a.dose_gy, args.factor)
        pred[~a.possible_dose_mask] = 0.0
        s = score_patient(path.stem, pred, a.dose_gy, a.masks, a.possible_dose_mask, a.voxel_mm)
        scores.append(s)
        print(f"{path.stem}: dose score {s.dose_score:.3f} Gy, mean DVH error "
              f"{np.mean(list(s.dvh_errors.values())):.3f} Gy")
    dose, dvh = openkbp_scores(scores)
    print(f"\nOracle floor of a x{args.factor} recipe over {len(scores)} {args.split} patients: dose score "
          f"{dose:.3f} Gy, DVH score {dvh:.3f} Gy (issue 5 targets: <= 2.6 / <= 1.7 Gy)")
    print("RESULT " + json.dumps({"dose_score": dose, "dvh_score": dvh, "n_patients": len(scores),
                                  "factor": args.factor, "split": args.split}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
