"""Automatic contouring (issue 6; research use only).

* :mod:`~twinrt.autocontour.classical` — contours without any weights: body (External), lungs,
  bones and air cavities from HU thresholds, morphology and connected components.
* :mod:`~twinrt.autocontour.sam` — Segment Anything (SAM/MedSAM, user-supplied checkpoints)
  point/box prompts on a slice, propagated through the neighbouring slices; torch and
  segment-anything are imported only when used (:mod:`~twinrt.autocontour.tv_compat` stands in
  for torchvision where it cannot load).

* :mod:`~twinrt.autocontour.metrics` — Dice and HD95 (mm), as MONAI defines them.
* :mod:`~twinrt.autocontour.oar` — head-and-neck organs at risk by a MONAI 2.5D U-Net with
  MC-dropout uncertainty (recipe :mod:`~twinrt.autocontour.oar_config`, training
  :mod:`~twinrt.autocontour.oar_train`, model in ``twinrt/autocontour/models``); torch and MONAI
  are imported only when used.
"""

from twinrt.autocontour.classical import (GROUPS, STRUCTURES, check_ct, classical_contours, merge_actions,
                                          merge_structures)

__all__ = ["GROUPS", "STRUCTURES", "check_ct", "classical_contours", "merge_actions", "merge_structures"]
