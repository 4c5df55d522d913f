"""Dose-volume histograms (DVH) and dose metrics computed exactly on voxel data.

A :class:`DVH` keeps the sorted dose of every voxel of a structure, so the metrics below are exact
on the voxelised structure; the binned curves (``bin_width_gy``, 0.01 Gy by default) are only for
plotting and export.

Definitions (``n`` voxels of volume ``v`` cc; the structure volume is ``n * v``):

* **V_d** (:func:`volume_at_dose`): the volume receiving *at least* ``d`` Gy,
  ``v * #{voxels with dose >= d}``, in cc or in % of the structure volume.
* **D_V** (:func:`dose_at_volume_cc`): the minimum dose received by the hottest ``V`` cc, i.e. the
  highest dose ``d`` such that ``V_d >= V``. On voxels this is the dose of the ``N``-th hottest
  voxel with ``N = ceil(V / v)`` (clamped to 1..n): the volume is rounded *up* to whole voxels,
  without interpolation between voxels. This is ICRU 83's "dose received by at least volume V"
  and matches a cumulative DVH read at ``V`` with a step (not interpolated) curve; dicompyler-core
  reads its 1 cGy-binned DVH at the nearest bin, which agrees to within one bin for structures of
  more than a few voxels.
* **D_x%** (:func:`dose_at_volume_percent`): D_V with ``V = x/100`` of the structure volume;
  ``D100% = min``, ``D0% = max``. D2% is the ICRU 83 near-maximum, D98% the near-minimum.
* **mean, max, min**: over voxels (voxels have equal volume, so the mean is the voxel average).
* **HI** (ICRU 83): ``(D2% - D98%) / D50%``; 0 for a perfectly uniform dose.
* **CI**: with TV the target volume, PIV the prescription isodose volume (dose >= prescription,
  inside the body when a body mask is given, else over the whole grid) and TV_PIV the part of the
  target inside it: Paddick ``CI = TV_PIV^2 / (TV * PIV)`` (1 is ideal, lower is worse);
  RTOG ``CI = PIV / TV`` (1 is ideal).

Doses are compared with a tolerance of :data:`DOSE_TOLERANCE_GY` so that float32 dose grids, in which
2.0 Gy may be stored as 1.9999999, count as receiving 2 Gy.

Grids: :func:`cumulative_dvh` takes a dose and a mask on the *same* grid. :func:`structure_dvh`
handles a dose and a structure on different grids by resampling the dose (trilinear) onto the
structure's grid: the structure keeps the voxels it was delineated on (its volume does not change
with the dose grid), and the dose, being smooth, loses little by interpolation, whereas
resampling a mask onto a coarse dose grid changes small organs' volumes by tens of percent.
``structure_dvh(..., sampling="dose")`` instead samples the dose grid points inside the contours,
as dicompyler-core does, for like-for-like comparisons (tests/test_dvh_dicompyler.py): on a 3 mm
dose grid a 7 cc organ in a steep gradient then differs from the default by ~20 % in volume and
up to ~40 % in max dose, purely from where the dose is sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from twinrt.errors import GeometryError, InvalidInputError, StructureError
from twinrt.geometry import Grid, resample_array
from twinrt.model import Case, Dose, Structure, StructureType, validate_dose_array
from twinrt.progress import CancelToken, ProgressCallback, report

#: Dose comparisons (V_d, bin edges) accept voxels this much below the threshold (Gy): float32
#: rounding at 100 Gy is below 1e-5 Gy, and no clinical threshold is this fine.
DOSE_TOLERANCE_GY = 1e-5

#: Refuse histograms with more bins than this (a bin width of 1e-6 Gy is a units mistake).
_MAX_BINS = 10_000_000

#: Default organ-at-risk dose levels (Gy) reported as V_d by :func:`dvh_metrics`.
DEFAULT_ORGAN_DOSE_LEVELS_GY = (20.0, 30.0, 40.0, 50.0)


@dataclass(frozen=True)
class DVH:
    """The dose-volume histogram of one structure, with the voxel doses for exact metrics.

    :param structure: structure name, or ``None`` for an anonymous mask.
    :param voxel_doses_gy: dose of every voxel inside the structure, sorted ascending (Gy).
    :param voxel_volume_cc: volume of one voxel (cc).
    :param bin_edges_gy: histogram bin edges (Gy), ``0, w, 2w, ...``; the last edge is above the
        maximum dose so the cumulative curve ends at 0.
    :param cumulative_cc: volume (cc) receiving at least ``bin_edges_gy[i]``, one value per edge.
    """

    structure: Optional[str]
    # Keeping every voxel dose (8 bytes per voxel; 1 MB for a 100 cc organ at 1 mm^3) is what makes
    # the metrics exact and independent of the bin width.
    voxel_doses_gy: np.ndarray
    voxel_volume_cc: float
    bin_edges_gy: np.ndarray
    cumulative_cc: np.ndarray

    # ------------------------------------------------------------------ curves
    @property
    def bin_width_gy(self) -> float:
        """Width of the histogram bins (Gy)."""
        return float(self.bin_edges_gy[1] - self.bin_edges_gy[0])

    @property
    def bin_centers_gy(self) -> np.ndarray:
        """Centre of each differential bin (Gy); one fewer than the edges."""
        return 0.5 * (self.bin_edges_gy[1:] + self.bin_edges_gy[:-1])

    @property
    def cumulative_percent(self) -> np.ndarray:
        """Cumulative DVH in % of the structure volume, one value per bin edge."""
        return 100.0 * self.cumulative_cc / self.total_volume_cc

    @property
    def differential_cc(self) -> np.ndarray:
        """Volume (cc) with dose in ``[edge[i], edge[i+1])``; sums to the total volume."""
        # Differences of the cumulative curve rather than a second histogram: both then use the
        # same edge tolerance, and the bins add up to the total volume exactly.
        return self.cumulative_cc[:-1] - self.cumulative_cc[1:]

    # ------------------------------------------------------------------ scalars
    @property
    def n_voxels(self) -> int:
        """Number of voxels in the structure."""
        return int(self.voxel_doses_gy.size)

    @property
    def total_volume_cc(self) -> float:
        """Structure volume (cc): voxel count times voxel volume."""
        return self.n_voxels * self.voxel_volume_cc

    @property
    def mean_gy(self) -> float:
        """Mean dose (Gy) over the structure's voxels."""
        # Every voxel has the same volume, so the volume-weighted mean is the plain voxel mean.
        return float(self.voxel_doses_gy.mean())

    @property
    def max_gy(self) -> float:
        """Maximum voxel dose (Gy)."""
        return float(self.voxel_doses_gy[-1])

    @property
    def min_gy(self) -> float:
        """Minimum voxel dose (Gy)."""
        return float(self.voxel_doses_gy[0])

    # ------------------------------------------------------------------ metrics
    def dose_at_volume_cc(self, volume_cc: float | Sequence[float]) -> float | np.ndarray:
        """D_V: minimum dose (Gy) received by the hottest ``volume_cc`` (see module docstring).

        :param volume_cc: volume in cc (scalar or array); 0 gives the max, the total gives the min.
        :return: dose in Gy, a float for a scalar input.
        """
        vol = np.asarray(volume_cc, dtype=float)
        if np.any(vol < 0) or not np.all(np.isfinite(vol)):
            raise InvalidInputError(f"Volume must be finite and >= 0 cc, got {volume_cc!r}")
        n = self.n_voxels
        ratio = vol / self.voxel_volume_cc
        # Round the volume up to whole voxels; the small relative slack keeps 50% of 100 voxels
        # at 50 voxels although 0.5 * 100 * v / v may come out as 50.000000000000007.
        count = np.ceil(ratio - 1e-9 * np.maximum(ratio, 1.0)).astype(np.int64)
        # Zero volume still means "the hottest voxel" (D0 = max); more than the structure means all.
        count = np.clip(count, 1, n)
        doses = self.voxel_doses_gy[n - count]  # ascending array: the count-th hottest voxel
        return float(doses) if doses.ndim == 0 else doses

    def dose_at_volume_percent(self, percent: float | Sequence[float]) -> float | np.ndarray:
        """D_x%: minimum dose (Gy) received by the hottest ``percent`` % of the structure.

        :param percent: volume in % of the structure (0..100; scalar or array).
        :return: dose in Gy; e.g. ``dose_at_volume_percent(95)`` is D95%.
        """
        pct = np.asarray(percent, dtype=float)
        if np.any(pct < 0) or np.any(pct > 100) or not np.all(np.isfinite(pct)):
            raise InvalidInputError(f"Volume percentage must be within 0..100 %, got {percent!r}")
        return self.dose_at_volume_cc(pct / 100.0 * self.total_volume_cc)

    def volume_at_dose_cc(self, dose_gy: float | Sequence[float]) -> float | np.ndarray:
        """V_d: volume (cc) receiving at least ``dose_gy`` Gy.

        :param dose_gy: dose threshold in Gy (scalar or array).
        """
        d = np.asarray(dose_gy, dtype=float)
        # Voxels below d (less the tolerance) are those left of the insertion point in the sorted array.
        below = np.searchsorted(self.voxel_doses_gy, d - DOSE_TOLERANCE_GY, side="left")
        vol = (self.n_voxels - below) * self.voxel_volume_cc
        return float(vol) if np.ndim(vol) == 0 else vol

    def volume_at_dose_percent(self, dose_gy: float | Sequence[float]) -> float | np.ndarray:
        """V_d in % of the structure volume receiving at least ``dose_gy`` Gy.

        :param dose_gy: dose threshold in Gy (scalar or array).
        """
        return np.multiply(self.volume_at_dose_cc(dose_gy), 100.0 / self.total_volume_cc)

    def homogeneity_index(self) -> float:
        """ICRU 83 homogeneity index ``(D2% - D98%) / D50%`` (dimensionless; 0 is uniform).

        :return: the index, or ``nan`` when D50% is 0 Gy.
        """
        # D2 and D98 rather than max and min: ICRU 83 uses near-max/min because single voxels are noisy.
        d2, d50, d98 = self.dose_at_volume_percent([2.0, 50.0, 98.0])
        return float((d2 - d98) / d50) if d50 > 0 else float("nan")


# ---------------------------------------------------------------------- computation
def _check_inputs(dose_gy: np.ndarray, mask: np.ndarray, voxel_volume_cc: float,
                  bin_width_gy: Optional[float] = None) -> None:
    # Shapes are all the arrays know of their grids; callers with Grid objects use structure_dvh.
    if np.shape(dose_gy) != np.shape(mask):
        raise GeometryError(
            f"Dose grid {np.shape(dose_gy)} and structure mask {np.shape(mask)} differ (k, j, i); "
            "resample the dose onto the structure grid first (Dose.resampled, or use structure_dvh)")
    if not (voxel_volume_cc > 0 and math.isfinite(voxel_volume_cc)):
        raise InvalidInputError(f"Voxel volume must be a positive number of cc, got {voxel_volume_cc!r}")
    if bin_width_gy is not None and not (bin_width_gy > 0 and math.isfinite(bin_width_gy)):
        raise InvalidInputError(f"DVH bin width must be a positive number of Gy, got {bin_width_gy!r}")


def _masked_doses(dose_gy: np.ndarray, mask: np.ndarray, name: Optional[str]) -> np.ndarray:
    """Sorted (ascending, float64) doses of the voxels inside ``mask``; validates both."""
    mask = np.asarray(mask)
    # Accept 0/1 label maps as well as booleans (integer masks would index, not select).
    if mask.dtype != bool:
        mask = mask != 0
    values = np.asarray(dose_gy)[mask]
    if values.size == 0:
        label = f"Structure '{name}'" if name else "The structure mask"
        raise StructureError(f"{label} is empty (no voxel inside it on this grid); "
                             "check its contours or remove it from the DVH", name)
    # Only the dose inside the structure enters the DVH, so that is what must be valid.
    validate_dose_array(values, name or "dose")
    # float64 so that sums (mean) over a million float32 voxels do not lose precision.
    return np.sort(values.astype(np.float64))


def _bin_edges(max_dose_gy: float, bin_width_gy: float, hist_max_gy: Optional[float]) -> np.ndarray:
    # One more edge than needed to pass the maximum (plus tolerance), so the curve ends at 0.
    n_bins = int(math.floor((max_dose_gy + DOSE_TOLERANCE_GY) / bin_width_gy)) + 1
    if hist_max_gy is not None:
        # Only extends: truncating would silently drop the hottest voxels from the curve.
        n_bins = max(n_bins, int(math.ceil(float(hist_max_gy) / bin_width_gy - 1e-9)))
    if n_bins > _MAX_BINS:
        raise InvalidInputError(f"A DVH of {max_dose_gy:.4g} Gy at {bin_width_gy} Gy per bin needs "
                                f"{n_bins} bins; use a larger bin width (or check the dose units)")
    return np.arange(n_bins + 1, dtype=np.float64) * bin_width_gy


def _dvh_from_sorted(doses: np.ndarray, voxel_volume_cc: float, bin_width_gy: float,
                     max_dose_gy: Optional[float], name: Optional[str]) -> DVH:
    edges = _bin_edges(float(doses[-1]), bin_width_gy, max_dose_gy)
    # Cumulative volume at every edge in one binary search over the sorted voxel doses.
    below = np.searchsorted(doses, edges - DOSE_TOLERANCE_GY, side="left")
    cumulative = (doses.size - below) * float(voxel_volume_cc)
    # The DVH is frozen; make its arrays read-only too so that a caller cannot corrupt the metrics.
    doses.setflags(write=False)
    cumulative.setflags(write=False)
    return DVH(name, doses, float(voxel_volume_cc), edges, cumulative)


def cumulative_dvh(dose_gy: np.ndarray, mask: np.ndarray, voxel_volume_cc: float,
                   bin_width_gy: float = 0.01, max_dose_gy: Optional[float] = None,
                   progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                   name: Optional[str] = None) -> DVH:
    """Cumulative DVH of the voxels of ``mask`` in ``dose_gy`` (both on the same grid).

    :param dose_gy: (k, j, i) dose in Gy.
    :param mask: (k, j, i) boolean structure mask on the same grid as ``dose_gy``.
    :param voxel_volume_cc: volume of one voxel in cc (``Grid.voxel_volume_cc``).
    :param bin_width_gy: histogram bin width in Gy (the metrics do not depend on it).
    :param max_dose_gy: extend the bins to at least this dose (Gy), to align several DVHs; the
        histogram always reaches past the structure's maximum.
    :param progress: optional ``progress(fraction, text)`` callback.
    :param cancel: optional token; raises :class:`twinrt.progress.CancelledError` when cancelled.
    :param name: structure name, used in the result and in error messages.
    :return: the :class:`DVH`; ``cumulative_cc[i]`` is the volume receiving >= ``bin_edges_gy[i]``.
    :raises GeometryError: when dose and mask shapes differ.
    :raises StructureError: when the mask is empty.
    :raises DoseError: when the dose inside the mask is NaN, infinite or negative.
    """
    # One array pass is well under a second, so progress is coarse: before, after masking, done.
    report(progress, 0.0, f"DVH {name or ''}".strip(), cancel)
    _check_inputs(dose_gy, mask, voxel_volume_cc, bin_width_gy)
    doses = _masked_doses(dose_gy, mask, name)
    report(progress, 0.5, f"DVH {name or ''}".strip(), cancel)
    dvh = _dvh_from_sorted(doses, voxel_volume_cc, bin_width_gy, max_dose_gy, name)
    report(progress, 1.0, "DVH done", cancel)
    return dvh


def differential_dvh(dose_gy: np.ndarray, mask: np.ndarray, voxel_volume_cc: float,
                     bin_width_gy: float = 0.01, max_dose_gy: Optional[float] = None,
                     progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                     name: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """Differential DVH: the volume in each dose bin. Parameters as :func:`cumulative_dvh`.

    :return: ``(bin_edges_gy, volume_cc)`` with ``volume_cc[i]`` the volume (cc) whose dose lies
        in ``[bin_edges_gy[i], bin_edges_gy[i+1])``; ``volume_cc`` sums to the structure volume.
    """
    dvh = cumulative_dvh(dose_gy, mask, voxel_volume_cc, bin_width_gy, max_dose_gy, progress, cancel, name)
    return dvh.bin_edges_gy, dvh.differential_cc


# ---------------------------------------------------------------------- metric functions
def dose_at_volume_percent(dvh: DVH, percent: float | Sequence[float]) -> float | np.ndarray:
    """D_x% in Gy: the minimum dose received by the hottest ``percent`` % (see :class:`DVH`)."""
    return dvh.dose_at_volume_percent(percent)


def dose_at_volume_cc(dvh: DVH, volume_cc: float | Sequence[float]) -> float | np.ndarray:
    """D_V in Gy: the minimum dose received by the hottest ``volume_cc`` cc (see :class:`DVH`)."""
    return dvh.dose_at_volume_cc(volume_cc)


def volume_at_dose(dvh: DVH, dose_gy: float | Sequence[float], percent: bool = False) -> float | np.ndarray:
    """V_d: the volume receiving at least ``dose_gy`` Gy.

    :param percent: ``True`` for % of the structure volume, ``False`` (default) for cc.
    """
    return dvh.volume_at_dose_percent(dose_gy) if percent else dvh.volume_at_dose_cc(dose_gy)


def homogeneity_index(dvh: DVH) -> float:
    """ICRU 83 homogeneity index ``(D2% - D98%) / D50%`` of a target DVH."""
    return dvh.homogeneity_index()


@dataclass(frozen=True)
class Conformity:
    """Conformity of a prescription isodose to a target (volumes in cc).

    :param target_volume_cc: TV, the target volume.
    :param piv_cc: PIV, the volume receiving at least the prescription (within the body if given).
    :param tv_piv_cc: TV_PIV, the target volume receiving at least the prescription.
    """

    target_volume_cc: float
    piv_cc: float
    tv_piv_cc: float

    @property
    def paddick(self) -> float:
        """Paddick CI = TV_PIV² / (TV · PIV); 1 is ideal, 0 when the isodose misses the target."""
        denom = self.target_volume_cc * self.piv_cc
        return self.tv_piv_cc ** 2 / denom if denom > 0 else 0.0

    @property
    def rtog(self) -> float:
        """RTOG CI = PIV / TV; 1 is ideal, > 1 spills outside, < 1 under-covers."""
        return self.piv_cc / self.target_volume_cc


def conformity_indices(dose_gy: np.ndarray, target_mask: np.ndarray, prescription_gy: float,
                       voxel_volume_cc: float, body_mask: Optional[np.ndarray] = None,
                       name: Optional[str] = None) -> Conformity:
    """Paddick and RTOG conformity of the prescription isodose to a target (arrays on one grid).

    :param dose_gy: (k, j, i) dose in Gy over the whole patient (the PIV needs all of it).
    :param target_mask: boolean target mask, same grid.
    :param prescription_gy: prescription dose in Gy; the PIV is where dose >= it.
    :param voxel_volume_cc: volume of one voxel in cc.
    :param body_mask: optional body (external) mask, same grid; the PIV is counted inside it only.
    :param name: target name for error messages.
    :return: :class:`Conformity` with ``.paddick`` and ``.rtog``.
    """
    _check_inputs(dose_gy, target_mask, voxel_volume_cc)
    if not (prescription_gy > 0):
        raise InvalidInputError(f"Prescription must be > 0 Gy, got {prescription_gy!r}")
    target_mask = np.asarray(target_mask).astype(bool, copy=False)
    target_doses = _masked_doses(dose_gy, target_mask, name)
    # The PIV counts every voxel of the grid, so the whole dose must be valid, not just the target.
    validate_dose_array(np.asarray(dose_gy), "dose")
    # Same tolerance as V_d, so TV_PIV equals the target's V(prescription) from its DVH.
    threshold = float(prescription_gy) - DOSE_TOLERANCE_GY
    piv = np.asarray(dose_gy) >= threshold
    if body_mask is not None:
        if np.shape(body_mask) != np.shape(dose_gy):
            raise GeometryError(f"Body mask {np.shape(body_mask)} and dose {np.shape(dose_gy)} grids differ; "
                                "resample the body onto the dose grid first")
        # Dose outside the body (couch, air) is not irradiated tissue and must not inflate the PIV.
        piv &= np.asarray(body_mask).astype(bool, copy=False)
    # The target's sorted doses give TV_PIV by one binary search instead of a second full-grid pass.
    tv_piv = int(target_doses.size - np.searchsorted(target_doses, threshold, side="left"))
    return Conformity(target_doses.size * voxel_volume_cc, int(np.count_nonzero(piv)) * voxel_volume_cc,
                      tv_piv * voxel_volume_cc)


# ---------------------------------------------------------------------- patient model
def _mask_bbox(mask: np.ndarray) -> Optional[tuple[int, int, int, int, int, int]]:
    """Half-open (k0, k1, j0, j1, i0, i1) bounding box of a mask, or ``None`` when empty."""
    bounds = []
    for axis in range(3):
        # Project onto one axis at a time: three any() reductions, no index array of all voxels.
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        bounds += [int(idx[0]), int(idx[-1]) + 1]
    return tuple(bounds)  # type: ignore[return-value]


def dose_plane_grid(dose_grid: Grid, structure_grid: Grid) -> Grid:
    """The grid of dose-grid points in the structure's slice planes (for ``sampling="dose"``).

    In-plane (i, j) nodes are the dose grid's, slices (k) the structure's. This is where
    dicompyler-core and most planning systems evaluate a DVH: at the dose grid points that fall
    inside each contour, in each contour's plane, with the dose interpolated between dose planes.

    :param dose_grid: the dose grid; its direction must equal the structure grid's.
    :param structure_grid: the structure (CT) grid.
    :raises GeometryError: when the grids are not parallel.
    """
    if not np.allclose(dose_grid.direction, structure_grid.direction, atol=1e-6):
        raise GeometryError("Sampling the DVH on the dose grid needs a dose grid parallel to the structure "
                            "grid; use sampling='structure' for rotated dose grids")
    # Dose origin expressed along the structure's i and j axes; k stays on the structure's slices.
    offset = np.asarray(dose_grid.origin_mm) - np.asarray(structure_grid.origin_mm)
    along = structure_grid.direction.T @ offset
    along[2] = 0.0
    origin = np.asarray(structure_grid.origin_mm) + structure_grid.direction @ along
    # The dose grid's full in-plane extent: contours outside it are cut off there, as in dicompyler.
    shape = (structure_grid.shape[0], dose_grid.shape[1], dose_grid.shape[2])
    spacing = (dose_grid.spacing_mm[0], dose_grid.spacing_mm[1], structure_grid.spacing_mm[2])
    return Grid(shape, spacing, tuple(origin), structure_grid.direction)


def structure_dvh(dose: Dose, structure: Structure, bin_width_gy: float = 0.01,
                  max_dose_gy: Optional[float] = None, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None, sampling: str = "structure") -> DVH:
    """DVH of a structure in a dose that may live on another grid.

    ``sampling="structure"`` (default): when the grids differ the dose is resampled (trilinear,
    zero outside the dose grid) onto the structure's grid, cropped to the structure's bounding box
    so that a fine CT grid costs only the structure's voxels. See the module docstring for why the
    dose moves and not the mask.

    ``sampling="dose"``: the structure's contours (traced from its mask, as an RTSTRUCT stores
    them) are rasterised at the dose grid's in-plane points in each structure slice
    (:func:`dose_plane_grid`), and the dose is interpolated linearly between dose planes. This is
    how dicompyler-core computes a DVH without its optional interpolation; use it to compare with
    such tools like for like. On a coarse dose grid it samples small structures with few points.

    :param dose: the dose (Gy) on its grid.
    :param structure: the structure (mask on its own grid, usually the CT's).
    :param bin_width_gy: histogram bin width in Gy.
    :param max_dose_gy: extend the bins to at least this dose (Gy).
    :param progress: optional ``progress(fraction, text)`` callback.
    :param cancel: optional cancel token.
    :param sampling: ``"structure"`` or ``"dose"`` (see above).
    :return: the structure's :class:`DVH`.
    """
    if sampling not in ("structure", "dose"):
        raise InvalidInputError(f"sampling must be 'structure' or 'dose', got {sampling!r}")
    report(progress, 0.0, f"DVH {structure.name}", cancel)
    bbox = _mask_bbox(structure.mask)
    if bbox is None:
        raise StructureError(f"Structure '{structure.name}' is empty; check its contours or remove it "
                             "from the DVH", structure.name)
    k0, k1, j0, j1, i0, i1 = bbox
    if dose.grid.is_same(structure.grid):
        dose_arr, mask, grid = dose.array, structure.mask, structure.grid
    elif sampling == "structure":
        grid = structure.grid.subgrid(k0, k1, j0, j1, i0, i1)
        # Trilinear interpolation of a non-negative dose can undershoot only by rounding; clip it.
        dose_arr = np.clip(resample_array(dose.array, dose.grid, grid, order=1), 0.0, None)
        mask = structure.mask[k0:k1, j0:j1, i0:i1]
    else:
        # Imported here: contour tracing needs contourpy, which only this option uses.
        from twinrt.contours import contours_to_structure_mask, structure_to_contours

        full = dose_plane_grid(dose.grid, structure.grid)
        grid = full.subgrid(k0, k1, 0, full.shape[1], 0, full.shape[2])
        # Go through contours (not the mask) so that the points tested are those an RTSTRUCT reader
        # tests: voxel-centre-in-polygon on the dose points, even-odd for holes.
        polygons = [poly for _, poly in structure_to_contours(structure)]
        report(progress, 0.3, f"DVH {structure.name}", cancel)
        mask = contours_to_structure_mask(polygons, grid, structure.name)
        dose_arr = np.clip(resample_array(dose.array, dose.grid, grid, order=1), 0.0, None)
    report(progress, 0.5, f"DVH {structure.name}", cancel)
    dvh = cumulative_dvh(dose_arr, mask, grid.voxel_volume_cc, bin_width_gy, max_dose_gy,
                         None, cancel, structure.name)
    report(progress, 1.0, f"DVH {structure.name} done", cancel)
    return dvh


class _DoseOnGrids:
    """Resample one dose onto each structure grid at most once (structures usually share the CT's)."""

    def __init__(self, dose: Dose):
        self.dose = dose
        self._cache: list[tuple[Grid, np.ndarray]] = []

    def on(self, grid: Grid) -> np.ndarray:
        if self.dose.grid.is_same(grid):
            return self.dose.array
        for g, arr in self._cache:
            if g.is_same(grid):
                return arr
        arr = np.clip(resample_array(self.dose.array, self.dose.grid, grid, order=1), 0.0, None)
        self._cache.append((grid, arr))
        return arr


def _key_number(value: float) -> str:
    """A dose or volume as it appears in a metric key: 20 -> '20', 0.1 -> '0_1'."""
    text = f"{value:g}"
    return text.replace(".", "_").replace("-", "m")


def dvh_metrics(case: Case, dose_name: str = "reference", structures: Optional[Iterable[str]] = None,
                organ_dose_levels_gy: Sequence[float] = DEFAULT_ORGAN_DOSE_LEVELS_GY,
                bin_width_gy: float = 0.01, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None) -> list[dict]:
    """Standard DVH metrics of every structure of a case, one row (dict) per structure.

    Every row has ``structure``, ``type``, ``volume_cc``, ``mean_gy``, ``max_gy`` and ``min_gy``.
    Targets add ``d98_gy``, ``d95_gy``, ``d50_gy``, ``d2_gy`` and ``hi`` (ICRU 83); when
    ``case.prescriptions`` names the target, also ``prescription_gy``, ``v95rx_percent`` (volume
    receiving 95% of the prescription), ``paddick_ci`` and ``rtog_ci`` (PIV inside the body
    structure when the case has one, else the whole grid). Organs and other structures add
    ``d0_1cc_gy``, ``d2cc_gy`` and ``v{d}gy_percent`` / ``v{d}gy_cc`` for each organ dose level.
    Empty structures are skipped (they have no DVH). Doses on another grid are resampled onto
    each structure's grid (see :func:`structure_dvh`).

    :param case: the patient.
    :param dose_name: key of the dose in ``case.doses``.
    :param structures: names to report (default: all, in the case's order).
    :param organ_dose_levels_gy: dose levels (Gy) for the organs' V_d columns.
    :param bin_width_gy: histogram bin width (Gy); does not change the metrics.
    :param progress: optional ``progress(fraction, text)`` callback.
    :param cancel: optional cancel token.
    :return: list of rows; values are floats (Gy, cc, %) except ``structure`` and ``type``.
    """
    if dose_name not in case.doses:
        raise InvalidInputError(f"Case {case.patient_id} has no dose '{dose_name}'; available: "
                                f"{', '.join(case.doses) or 'none'}")
    dose = _DoseOnGrids(case.doses[dose_name])
    selected = case.structures if structures is None else [case.structure(n) for n in structures]
    prescriptions = {p.target.lower(): float(p.dose_gy) for p in case.prescriptions}
    # The first external structure bounds the PIV of every target's conformity index.
    body = next((s for s in case.structures if s.type == StructureType.EXTERNAL and not s.is_empty), None)
    rows: list[dict] = []
    for index, structure in enumerate(selected):
        report(progress, index / max(len(selected), 1), f"DVH metrics: {structure.name}", cancel)
        if structure.is_empty:
            continue
        grid = structure.grid
        # The full structure grid (not the bounding box) because the CI needs the PIV everywhere.
        dose_arr = dose.on(grid)
        dvh = cumulative_dvh(dose_arr, structure.mask, grid.voxel_volume_cc, bin_width_gy,
                             None, None, cancel, structure.name)
        row: dict = {"structure": structure.name, "type": structure.type.value,
                     "volume_cc": dvh.total_volume_cc, "mean_gy": dvh.mean_gy, "max_gy": dvh.max_gy,
                     "min_gy": dvh.min_gy}
        if structure.type == StructureType.TARGET:
            d98, d95, d50, d2 = dvh.dose_at_volume_percent([98.0, 95.0, 50.0, 2.0])
            row.update(d98_gy=float(d98), d95_gy=float(d95), d50_gy=float(d50), d2_gy=float(d2),
                       hi=dvh.homogeneity_index())
            # Case-insensitive like Case.structure(): "ptv70" in a prescription names "PTV70".
            rx = prescriptions.get(structure.name.lower())
            if rx is not None:
                body_mask = body.on_grid(grid) if body is not None else None
                conf = conformity_indices(dose_arr, structure.mask, rx, grid.voxel_volume_cc, body_mask,
                                          structure.name)
                row.update(prescription_gy=rx, v95rx_percent=float(dvh.volume_at_dose_percent(0.95 * rx)),
                           paddick_ci=conf.paddick, rtog_ci=conf.rtog)
        else:
            d01, d2cc = dvh.dose_at_volume_cc([0.1, 2.0])
            row.update(d0_1cc_gy=float(d01), d2cc_gy=float(d2cc))
            levels = np.asarray(list(organ_dose_levels_gy), dtype=float)
            for level, pct, cc in zip(levels, dvh.volume_at_dose_percent(levels), dvh.volume_at_dose_cc(levels)):
                key = _key_number(float(level))
                row[f"v{key}gy_percent"] = float(pct)
                row[f"v{key}gy_cc"] = float(cc)
        rows.append(row)
    report(progress, 1.0, "DVH metrics done", cancel)
    return rows
