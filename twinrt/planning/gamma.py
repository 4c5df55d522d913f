"""Gamma index of two doses on grids: a thin wrapper over ``pymedphys.gamma`` (maintained, Apache-2.0).

Low, Harms, Mutic and Purdy, "A technique for the quantitative evaluation of dose distributions",
Med. Phys. 25(5), 1998. Global gamma by default: the dose criterion is a percentage of the
reference maximum, and reference voxels below ``lower_percent_dose_cutoff`` % of it are not
evaluated. pymedphys is imported lazily so the core imports without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from twinrt.errors import GeometryError, InvalidInputError
from twinrt.geometry import Grid


@dataclass(frozen=True)
class GammaResult:
    """Outcome of a gamma comparison.

    :param pass_rate: fraction (0..1) of evaluated reference voxels with gamma ≤ 1.
    :param n_evaluated: reference voxels evaluated (above the low-dose cut-off).
    :param gamma: (k, j, i) gamma on the reference grid; NaN where not evaluated.
    """

    pass_rate: float
    n_evaluated: int
    gamma: np.ndarray


def _axes(grid: Grid) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[slice, slice, slice]]:
    """Per-axis coordinates (mm) in (k, j, i) order, increasing, and the flips that make them so."""
    if not grid.is_axis_aligned or not np.allclose(np.abs(grid.direction), np.eye(3), atol=1e-6):
        raise GeometryError("Gamma needs grids whose i, j, k axes run along x, y, z; resample the doses first")
    axes, flips = [], []
    for name in ("k", "j", "i"):
        pos = grid.axis_positions(name)
        if pos.size > 1 and pos[1] < pos[0]:
            axes.append(pos[::-1].copy())
            flips.append(slice(None, None, -1))
        else:
            axes.append(pos)
            flips.append(slice(None))
    return (axes[0], axes[1], axes[2]), (flips[0], flips[1], flips[2])


def gamma_pass_rate(reference_gy: np.ndarray, reference_grid: Grid, evaluated_gy: np.ndarray, evaluated_grid: Grid,
                    dose_percent: float = 3.0, distance_mm: float = 3.0, lower_percent_dose_cutoff: float = 10.0,
                    interp_fraction: int = 10, local_gamma: bool = False, max_gamma: float = 1.1,
                    random_subset: int | None = None) -> GammaResult:
    """Gamma pass rate of ``evaluated_gy`` against ``reference_gy`` (``pymedphys.gamma``).

    :param reference_gy: (k, j, i) reference dose (Gy) on ``reference_grid``.
    :param evaluated_gy: (k, j, i) evaluated dose (Gy) on ``evaluated_grid`` (may differ).
    :param dose_percent: dose criterion (% of the reference maximum, or local with ``local_gamma``).
    :param distance_mm: distance-to-agreement criterion (mm).
    :param lower_percent_dose_cutoff: reference voxels below this % of the maximum are skipped.
    :param interp_fraction: pymedphys' search step is ``distance_mm / interp_fraction``.
    :param max_gamma: stop searching beyond this gamma (a voxel above 1 fails either way).
    :param random_subset: evaluate only this many random reference voxels (faster; None = all).
    :return: :class:`GammaResult`.
    """
    try:
        import pymedphys
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InvalidInputError("Gamma needs pymedphys: pip install 'pymedphys>=0.41'") from exc
    reference_grid.check_array(reference_gy, "reference dose")
    evaluated_grid.check_array(evaluated_gy, "evaluated dose")
    if dose_percent <= 0 or distance_mm <= 0:
        raise InvalidInputError("Gamma criteria must be positive (% and mm)")
    ref = np.asarray(reference_gy, dtype=np.float64)
    ev = np.asarray(evaluated_gy, dtype=np.float64)
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(ev))):
        raise InvalidInputError("Doses for gamma must be finite")
    axes_ref, flip_ref = _axes(reference_grid)
    axes_ev, flip_ev = _axes(evaluated_grid)
    gamma = pymedphys.gamma(axes_ref, ref[flip_ref], axes_ev, ev[flip_ev], dose_percent, distance_mm,
                            lower_percent_dose_cutoff=lower_percent_dose_cutoff, interp_fraction=interp_fraction,
                            max_gamma=max_gamma, local_gamma=local_gamma, random_subset=random_subset)
    gamma = np.asarray(gamma)[flip_ref]
    valid = np.isfinite(gamma)
    n = int(valid.sum())
    rate = float(np.count_nonzero(gamma[valid] <= 1.0) / n) if n else float("nan")
    return GammaResult(rate, n, gamma)
