"""Contour agreement metrics: Dice and the 95th-percentile Hausdorff distance (mm).

Definitions (those of MONAI's ``DiceMetric`` and ``compute_hausdorff_distance(percentile=95)``,
which the tests check against):

* **Dice** ``2 |A ∩ B| / (|A| + |B|)``; 0 when one mask is empty; undefined (NaN) when both are.
* **Surface** of a mask: its voxels that a 6-connected erosion removes (``mask ^ eroded``).
* **HD95** (mm): the larger of the two directed 95th percentiles of the distances from each
  surface voxel of one mask to the nearest surface voxel of the other, with the voxel spacing
  (anisotropic voxels count in mm); ``inf`` when exactly one mask is empty, NaN when both are.

Arrays are (k, j, i); ``spacing_mm`` is (i, j, k) like :attr:`twinrt.geometry.Grid.spacing_mm`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from twinrt.errors import InvalidInputError


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise InvalidInputError(f"Masks of different shapes {a.shape} and {b.shape} cannot be compared; "
                                "resample one onto the other's grid first")
    return a, b


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two masks (module docstring); NaN when both are empty."""
    a, b = _pair(a, b)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return float("nan")
    return 2.0 * float(np.logical_and(a, b).sum()) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """The mask's surface voxels: those a 6-connected erosion removes (bool, same shape)."""
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    return m ^ ndimage.binary_erosion(m)


def hd95(a: np.ndarray, b: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (module docstring).

    :param a: mask (k, j, i); ``b`` the other, same shape.
    :param spacing_mm: voxel size along (i, j, k) in mm.
    """
    from scipy import ndimage

    a, b = _pair(a, b)
    if len(spacing_mm) != a.ndim or min(float(s) for s in spacing_mm) <= 0:
        raise InvalidInputError(f"spacing_mm must hold {a.ndim} positive voxel sizes (mm), got {spacing_mm!r}")
    if not a.any() and not b.any():
        return float("nan")
    if not a.any() or not b.any():
        return float("inf")
    sampling = tuple(float(s) for s in spacing_mm)[::-1]  # (i, j, k) -> array order (k, j, i)
    sa, sb = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=sampling)[sa]
    to_a = ndimage.distance_transform_edt(~sa, sampling=sampling)[sb]
    return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))
