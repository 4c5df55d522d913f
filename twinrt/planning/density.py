"""CT numbers (HU) to relative electron density for photon dose calculation.

The default table is pyRadPlan's ``default_hlut()`` (pyRadPlan 0.5.0, ``pyRadPlan/ct/_hlut.py``,
BSD-3-Clause, the same table as matRad's ``matRad_default.hlut``):

=========  ======  ======  =====  =====  ===  =====  =====  =====
HU         -1024   -999    -90    -45    0    100    350    3000
rED        0.001   0.001   0.95   0.99   1    1.095  1.199  2.505
=========  ======  ======  =====  =====  ===  =====  =====  =====

Values are linearly interpolated between the points; HU outside the table are clipped to its end
values (``np.interp``), exactly like pyRadPlan's ``CT.compute_wet``. Using the same table is what
makes a comparison with pyRadPlan's dose a comparison of the dose engines and not of the CT
calibration. A clinic would replace it with its own scanner's calibration.
"""

from __future__ import annotations

import numpy as np

from twinrt.errors import InvalidInputError
from twinrt.geometry import Grid, resample_array

#: HU points of pyRadPlan's (and matRad's) default HU → relative electron density table.
DEFAULT_HLUT_HU = np.array([-1024.0, -999.0, -90.0, -45.0, 0.0, 100.0, 350.0, 3000.0])
#: Relative electron densities (water = 1) at :data:`DEFAULT_HLUT_HU`.
DEFAULT_HLUT_RED = np.array([0.001, 0.001, 0.95, 0.99, 1.0, 1.095, 1.199, 2.505])


def hu_to_density(hu: np.ndarray, table: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Relative electron density (water = 1) of CT numbers.

    :param hu: CT numbers (HU), any shape.
    :param table: ``(hu_points, density_points)``; default pyRadPlan's table (module docstring).
        Points need not be sorted; HU outside the table take the end values.
    :return: float32 array of ``hu``'s shape.
    """
    hu_pts, rho_pts = (DEFAULT_HLUT_HU, DEFAULT_HLUT_RED) if table is None else table
    hu_pts = np.asarray(hu_pts, dtype=float).reshape(-1)
    rho_pts = np.asarray(rho_pts, dtype=float).reshape(-1)
    if hu_pts.shape != rho_pts.shape or hu_pts.size < 2:
        raise InvalidInputError("The HU→density table needs at least two (HU, density) pairs of equal length")
    if not (np.all(np.isfinite(hu_pts)) and np.all(np.isfinite(rho_pts))) or np.any(rho_pts < 0):
        raise InvalidInputError("The HU→density table must hold finite values and densities >= 0")
    order = np.argsort(hu_pts, kind="stable")
    if np.any(np.diff(hu_pts[order]) == 0):
        raise InvalidInputError("The HU→density table has a repeated HU value")
    hu = np.asarray(hu)
    if not np.all(np.isfinite(hu)):
        raise InvalidInputError("The CT has NaN or infinite values; fix the image before computing dose")
    # np.interp clips to the end values, which is pyRadPlan's behaviour for out-of-table HU.
    return np.interp(hu.astype(np.float32), hu_pts[order], rho_pts[order]).astype(np.float32)


def density_on_grid(hu: np.ndarray, ct_grid: Grid, target: Grid, body_mask: np.ndarray | None = None,
                    table: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Relative electron density on ``target`` (the dose grid), as pyRadPlan traces it.

    The density is computed on the CT grid, set to 0 outside ``body_mask`` (pyRadPlan's
    ``ignore_outside_densities``: couch and air outside the patient do not attenuate), and then
    resampled trilinearly to ``target`` (pyRadPlan's ``trace_on_dose_grid``). Tracing on the dose
    grid is what pyRadPlan does by default and is several times cheaper than tracing the CT.

    :param hu: (k, j, i) CT numbers (HU) on ``ct_grid``.
    :param body_mask: optional bool (k, j, i) mask on ``ct_grid``; density is 0 outside it.
    :param table: HU→density table, see :func:`hu_to_density`.
    :return: float32 (k, j, i) density on ``target``; 0 outside the CT.
    """
    ct_grid.check_array(hu, "CT")
    rho = hu_to_density(hu, table)
    if body_mask is not None:
        ct_grid.check_array(body_mask, "body mask")
        rho = np.where(np.asarray(body_mask, dtype=bool), rho, np.float32(0.0))
    if ct_grid.is_same(target):
        return rho.astype(np.float32, copy=False)
    return resample_array(rho, ct_grid, target, order=1, fill_value=0.0).astype(np.float32, copy=False)
