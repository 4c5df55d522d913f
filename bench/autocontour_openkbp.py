"""Organ-at-risk network on the OpenKBP validation patients: accuracy and time per CT (issue 6).

Two measurements in one run, on the same model:

1. **Accuracy** — every ``pt_*.npz`` of the validation split segmented on its own grid (dropout
   off) and scored with Dice and HD95 (mm) per organ (:func:`twinrt.autocontour.oar.evaluate_openkbp`).
2. **Time per CT as a user meets it** — for ``--timed`` patients, the full deployed path on the
   patient's CT resampled to a 1 mm-in-plane grid (so the network's input is resampled to the model
   grid and the organs mapped back): :meth:`OarSegmenter.segment_ct` without MC dropout, and again
   with the recipe's MC-dropout samples (the uncertainty map). Issue 6's target: under 20 s per CT
   on 2 cores.

Anchors printed beside the figures (published organ-at-risk Dice, other data and sites, for scale):
AAPM 2017 thoracic auto-segmentation challenge winners (Yang et al., Med Phys 45(10), 2018):
spinal cord 0.88, esophagus 0.72, heart 0.93. Issue 6's targets on OpenKBP validation: mean Dice >= 0.80,
spinal cord >= 0.85, mandible >= 0.90.

Needs ../shared/data. Usage::

    .venv/bin/python bench/autocontour_openkbp.py [--model ID] [--limit N] [--timed 3] [--json out.json]

Ends with ``RESULT {json}``: ``mean_dice``, ``dice``, ``hd95_mm``, ``n_patients``,
``seconds_per_patient`` (network + post-processing on the OpenKBP grid, no MC), ``seconds_per_ct``
(median, deployed path, no MC), ``seconds_per_ct_with_uncertainty`` (the same with the recipe's MC
samples), ``mc_samples``, ``model_id``, ``sha256``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import numpy as np

from openkbp_common import write_result

ANCHORS = {"AAPM 2017 thoracic (Yang 2018)": {"SpinalCord": 0.88, "Esophagus": 0.72, "Heart": 0.93}}
TARGETS = {"mean_dice": 0.80, "SpinalCord": 0.85, "Bone_Mandible": 0.90, "seconds_per_ct": 20.0}


def fine_ct(path) -> "object":
    """The patient's CT resampled to 1.0 x 1.0 mm in plane, 2.5 mm slices (a typical planning CT grid)."""
    from twinrt.data import load_openkbp
    from twinrt.geometry import Grid

    case = load_openkbp(path)
    g = case.ct.grid
    lo, hi = g.extent_lps()
    spacing = (1.0, 1.0, g.spacing_mm[2])
    shape = tuple(int(np.floor((hi[a] - lo[a]) / spacing[a])) + 1 for a in (2, 1, 0))
    return case.ct.resampled(Grid(shape, spacing, tuple(lo)), order=1, fill_value=-1000.0)


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: see the module docstring."""
    import torch

    from twinrt.autocontour.oar import OarSegmenter, evaluate_openkbp
    from twinrt.data import openkbp_patients, shared_data_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--timed", type=int, default=3, help="patients timed on the deployed path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if shared_data_dir() is None:
        print("../shared/data is not available: nothing to measure")
        return 1
    torch.set_num_threads(args.threads)
    seg = OarSegmenter(args.model)
    folder = shared_data_dir() / "openkbp" / "validation"
    res = evaluate_openkbp(folder, limit=args.limit, segmenter=seg)
    timed, timed_mc = [], []
    for path in openkbp_patients("validation")[:args.timed]:
        ct = fine_ct(path)
        t0 = time.perf_counter()
        out = seg.segment_ct(ct, mc_samples=0)
        timed.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out_mc = seg.segment_ct(ct)
        timed_mc.append(time.perf_counter() - t0)
        print(f"{path.stem}: deployed path on a {ct.grid.shape[2]}x{ct.grid.shape[1]}x{ct.grid.shape[0]} CT "
              f"(1 mm in plane): {timed[-1]:.1f} s for {len(out.structures)} organs; with the uncertainty map "
              f"({out_mc.mc_samples} MC-dropout samples) {timed_mc[-1]:.1f} s")
    print(f"anchors: {ANCHORS}; targets: {TARGETS}")
    summary = {"mean_dice": res["mean_dice"], "dice": res["dice"], "hd95_mm": res["hd95_mm"],
               "n_patients": res["n_patients"], "seconds_per_patient": res["seconds_per_patient"],
               "seconds_per_ct": float(np.median(timed)) if timed else None,
               "seconds_per_ct_with_uncertainty": float(np.median(timed_mc)) if timed_mc else None,
               "mc_samples": seg.config.predict.mc_samples,
               "threads": args.threads, "model_id": seg.model_id, "sha256": seg.sha256}
    return write_result(summary, [{"patient": k, **v} for k, v in res["per_patient"].items()], args.json)


if __name__ == "__main__":
    sys.exit(main())
