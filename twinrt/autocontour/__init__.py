"""Automatic contouring (issue 6; research use only).

* :mod:`~twinrt.autocontour.classical` — contours without any weights: body (External), lungs,
  bones and air cavities from HU thresholds, morphology and connected components.

The MONAI organ-at-risk network and the Segment Anything prompts of issue 6 are not built yet.
"""

from twinrt.autocontour.classical import (GROUPS, STRUCTURES, check_ct, classical_contours, merge_actions,
                                          merge_structures)

__all__ = ["GROUPS", "STRUCTURES", "check_ct", "classical_contours", "merge_actions", "merge_structures"]
