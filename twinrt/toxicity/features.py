"""Per-organ, per-fraction features from the digital twin (ToxicityMonitor, issue 8; research use only).

Following COMPASS (arXiv 2602.18496), each organ at each fraction is described by four groups of
features, computed from what the twin knows after that fraction:

* ``bed_`` **cumulative BED dose-volume features** on the planning grid (:func:`dose_volume_features`):
  BED-DVH points D2%, D50%, D98% (Gy), V20, V30, V40, V50 (% of the organ receiving at least that BED
  in Gy), the mean BED (Gy), the gEUD of the BED (Gy, with the endpoint's LKB volume parameter ``n``)
  and the organ volume on the planning grid (cc);
* ``dosio_`` **dosiomics**: texture of the cumulative BED map inside the organ: first-order features
  and GLCM features on the fixed bin scheme :data:`BED_BIN_WIDTH_GY` from :data:`BED_BIN_MIN_GY`
  (the mean is left out: it is ``bed_mean``);
* ``ct_`` **radiomics of the day's image** inside the day's contour of the organ (first-order + GLCM on
  :data:`CT_BIN_WIDTH_HU` from :data:`CT_BIN_MIN_HU`, plus the contoured organ volume in cc); NaN on a
  day without an image or without a contour of the organ;
* ``pet_`` **radiomics of the day's PET** when the fraction has one (:attr:`twinrt.twin.timeline.Fraction.pet`,
  SUVbw): first-order + GLCM of the SUV inside the day's contour resampled to the PET grid, on
  :data:`PET_BIN_WIDTH_SUV` from :data:`PET_BIN_MIN_SUV` (no volume: the contour is the CT's); NaN on a
  day without a PET or without a contour of the organ;
* ``d_`` **changes from baseline** of every feature above (:func:`with_baseline_changes`).

Feature definitions follow the Image Biomarker Standardisation Initiative (IBSI) reference manual:
Zwanenburg A, Vallières M, et al. *The Image Biomarker Standardization Initiative*, Radiology
2020;295:328-338, and arXiv:1612.07003 (sections "intensity-based statistical features",
"intensity histogram features", "grey level co-occurrence based features"):

* **discretisation**, fixed bin size (IBSI "FBS"): ``level = floor((x − x_min) / w) + 1`` with the
  scheme's ``x_min`` and bin width ``w``; values below ``x_min`` are put in level 1. Fixed bins keep
  levels comparable across patients and fractions (a BED level is always the same 2 Gy band);
* **first order** (:func:`first_order`): mean, standard deviation (IBSI's biased variance, 1/N),
  skewness, excess kurtosis (IBSI "kurtosis", minus 3), 10th and 90th percentiles (linear
  interpolation), energy ``Σ x²`` (on the raw values), and — on the discretised values — histogram
  entropy ``−Σ p log2 p`` (bits) and uniformity ``Σ p²``. Skewness and kurtosis are 0 for a
  constant region (IBSI leaves them undefined);
* **GLCM** (:func:`glcm_features`): 3D, the 13 unique neighbour directions at Chebyshev distance
  ``distance`` (voxels, on the native grid: no isotropic resampling), pairs counted only when both voxels
  are inside the mask, symmetric matrix, features computed per direction and then averaged over the
  directions that have pairs (IBSI "3D, averaged"): contrast, homogeneity (IBSI "inverse difference"
  ``Σ p/(1+|i−j|)``), correlation, energy (IBSI "angular second moment" ``Σ p²``), joint entropy
  (bits) and dissimilarity (IBSI "difference average" ``Σ |i−j| p``). A region without any pair (one
  voxel) gets the values of a constant region: contrast 0, dissimilarity 0, homogeneity 1, energy 1,
  entropy 0, correlation 1 (correlation of a constant region is 0/0; 1 as in pyradiomics).

Units: dose and BED in Gy, CT in HU, PET in SUVbw (g/ml), volumes in cc; energy in Gy², HU² or SUV².
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from twinrt.errors import InvalidInputError, StructureError
from twinrt.geometry import Grid
from twinrt.toxicity.trajectory import ENDPOINTS, OrganTrajectory

#: Dosiomics bin scheme: fixed bin width 2 Gy of BED, first bin starting at 0 Gy.
BED_BIN_WIDTH_GY = 2.0
BED_BIN_MIN_GY = 0.0
#: CT radiomics bin scheme: fixed bin width 25 HU, first bin starting at −1000 HU (air).
CT_BIN_WIDTH_HU = 25.0
CT_BIN_MIN_HU = -1000.0
#: PET radiomics bin scheme: fixed bin width 0.25 SUV from 0 (fixed bin sizes for SUV as IBSI recommends
#: for calibrated PET; 0.25 is within the 0.125–0.5 SUV range used in the PET radiomics literature).
PET_BIN_WIDTH_SUV = 0.25
PET_BIN_MIN_SUV = 0.0
#: BED-DVH points: D_x% for these volume percentages, V_d for these BED levels (Gy).
DVH_DOSE_POINTS_PERCENT = (2, 50, 98)
DVH_VOLUME_POINTS_GY = (20, 30, 40, 50)
#: Tolerance (Gy) of the V_d thresholds (as :data:`twinrt.dvh.DOSE_TOLERANCE_GY`).
_DOSE_TOLERANCE_GY = 1e-5

FIRST_ORDER_NAMES = ("mean", "std", "skewness", "kurtosis", "p10", "p90", "entropy", "uniformity", "energy")
GLCM_NAMES = ("contrast", "homogeneity", "correlation", "energy", "entropy", "dissimilarity")
DOSE_VOLUME_NAMES = (("mean", "geud") + tuple(f"d{p}" for p in DVH_DOSE_POINTS_PERCENT)
                     + tuple(f"v{d}" for d in DVH_VOLUME_POINTS_GY) + ("volume_cc",))

#: The 13 unique 3D neighbour directions (dk, dj, di): first non-zero component positive.
DIRECTIONS_3D = tuple((a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)
                      if (a, b, c) > (0, 0, 0))
assert len(DIRECTIONS_3D) == 13

#: Values of a region without any voxel pair (see the module docstring).
_GLCM_CONSTANT = {"contrast": 0.0, "homogeneity": 1.0, "correlation": 1.0, "energy": 1.0, "entropy": 0.0,
                  "dissimilarity": 0.0}

#: Organ name cores (separators, case and laterality removed) → endpoint.
_ENDPOINT_CORES: dict[str, set[str]] = {
    "xerostomia": {"parotid", "parotis", "parotids", "parotide", "parotida", "parotidgland"},
    "esophagitis": {"esophagus", "oesophagus", "esophag", "oesophag", "esoph", "oesoph", "eso"},
    "pneumonitis": ({a + b for a in ("lung", "lungs") for b in ("", "both", "total", "combined")}  # Lung_Both
                    | {b + a for a in ("lung", "lungs") for b in ("both", "total", "combined")}  # Total_Lungs
                    | {"lunge", "poumon", "poumons"}),
    "cardiac": {"heart", "cor", "coeur", "herz", "cardiac"},
}
assert set(_ENDPOINT_CORES) == set(ENDPOINTS)


# ------------------------------------------------------------------------------------------ helpers
def _discretise(values: np.ndarray, bin_width: float, bin_min: float) -> np.ndarray:
    """IBSI fixed-bin-size levels (1-based int64); values below ``bin_min`` go to level 1."""
    levels = np.floor((values - bin_min) / bin_width).astype(np.int64) + 1
    np.maximum(levels, 1, out=levels)
    return levels


def _check_bin(bin_width: float) -> float:
    w = float(bin_width)
    if not math.isfinite(w) or w <= 0:
        raise InvalidInputError(f"The bin width must be a positive number, got {bin_width!r}")
    return w


def _bbox(mask: np.ndarray) -> Optional[tuple[slice, ...]]:
    """Slices of the bounding box of ``mask`` (``None`` when empty)."""
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        if hit.size == 0:
            return None
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def _percentiles(sorted_x: np.ndarray, q: Sequence[float]) -> list[float]:
    """Percentiles (linear interpolation, as ``numpy.percentile``'s default) of sorted values."""
    n = sorted_x.size
    out = []
    for pct in q:
        h = (n - 1) * pct / 100.0
        lo = int(math.floor(h))
        hi = min(lo + 1, n - 1)
        out.append(float(sorted_x[lo] + (h - lo) * (sorted_x[hi] - sorted_x[lo])))
    return out


def _nan_dict(names: Sequence[str], prefix: str = "") -> dict[str, float]:
    return {prefix + n: math.nan for n in names}


# ------------------------------------------------------------------------------------------ first order
def first_order(values: np.ndarray, bin_width: float, bin_min: Optional[float] = None) -> dict[str, float]:
    """IBSI first-order features of the values inside a region (see the module docstring).

    :param values: the voxel values (any shape; Gy, HU, ...), all finite.
    :param bin_width: fixed bin width for the histogram entropy and uniformity (same unit).
    :param bin_min: lower edge of the first bin (default: the smallest value).
    :return: ``mean``, ``std``, ``skewness``, ``kurtosis`` (excess), ``p10``, ``p90`` (value unit),
        ``entropy`` (bits), ``uniformity`` (0–1), ``energy`` (unit²); all NaN for no value.
    :raises InvalidInputError: non-finite values or a bin width ≤ 0.
    """
    w = _check_bin(bin_width)
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return _nan_dict(FIRST_ORDER_NAMES)
    if not np.isfinite(x).all():
        raise InvalidInputError("first-order features need finite values (NaN or infinite value in the region)")
    mean = float(x.mean())
    dev = x - mean
    m2 = float(np.mean(dev * dev))
    if m2 <= 1e-24 * max(mean * mean, 1.0):
        skew = kurt = 0.0
        m2 = 0.0
    else:
        dev2 = dev * dev
        skew = float(np.mean(dev2 * dev)) / m2 ** 1.5
        kurt = float(np.mean(dev2 * dev2)) / (m2 * m2) - 3.0
    p10, p90 = _percentiles(np.sort(x), (10.0, 90.0))
    lo = float(x.min()) if bin_min is None else float(bin_min)
    levels = _discretise(x, w, lo)
    counts = np.bincount(levels - levels.min())
    p = counts[counts > 0] / x.size
    return {"mean": mean, "std": math.sqrt(m2), "skewness": skew, "kurtosis": kurt, "p10": float(p10),
            "p90": float(p90), "entropy": float(-(p * np.log2(p)).sum()) + 0.0, "uniformity": float((p * p).sum()),
            "energy": float((x * x).sum())}


# ------------------------------------------------------------------------------------------ GLCM
def _pair_slices(shape: tuple[int, ...], offset: Sequence[int]
                 ) -> Optional[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """Slices of the first and second voxel of every pair at ``offset`` (``None``: no pair fits)."""
    a, b = [], []
    for n, o in zip(shape, offset):
        if abs(o) >= n:
            return None
        if o >= 0:
            a.append(slice(0, n - o))
            b.append(slice(o, n))
        else:
            a.append(slice(-o, n))
            b.append(slice(0, n + o))
    return tuple(a), tuple(b)


def glcm_features(volume: np.ndarray, mask: np.ndarray, bin_width: float, bin_min: float,
                  distance: int = 1) -> dict[str, float]:
    """IBSI 3D GLCM features, symmetric, averaged over the 13 directions (see the module docstring).

    :param volume: (k, j, i) values (Gy, HU, ...); only voxels inside ``mask`` are used.
    :param mask: boolean region, same shape.
    :param bin_width: fixed bin width (value unit); ``bin_min``: lower edge of the first bin.
    :param distance: neighbour distance in voxels (Chebyshev), ≥ 1.
    :return: ``contrast``, ``homogeneity``, ``correlation``, ``energy``, ``entropy`` (bits),
        ``dissimilarity``; all NaN for an empty mask; constant-region values for a region without pairs.
    :raises InvalidInputError: shapes differ, not 3D, non-finite values inside the mask, bad bin or distance.
    """
    w = _check_bin(bin_width)
    vol = np.asarray(volume)
    m = np.asarray(mask, dtype=bool)
    if vol.ndim != 3 or vol.shape != m.shape:
        raise InvalidInputError(f"GLCM needs a 3D volume and a mask of the same shape, got {vol.shape} and {m.shape}")
    dist = int(distance)
    if dist < 1 or dist != distance:
        raise InvalidInputError(f"The GLCM distance must be a positive whole number of voxels, got {distance!r}")
    box = _bbox(m)
    if box is None:
        return _nan_dict(GLCM_NAMES)
    m = m[box]
    inside = np.asarray(vol[box], dtype=np.float64)[m]
    if not np.isfinite(inside).all():
        raise InvalidInputError("GLCM features need finite values inside the mask")
    levels = _discretise(inside, w, float(bin_min))
    g = levels - levels.min()  # 0-based; the features below do not depend on a shift of the levels
    n_levels = int(g.max()) + 1
    k = n_levels + 1  # level n_levels marks "outside the mask"
    if k * k > 1 << 24:
        raise InvalidInputError(f"GLCM: {n_levels} grey levels inside the mask; use a wider bin "
                                f"(bin width {w:g})")
    lab = np.full(m.shape, n_levels, dtype=np.int32 if k * k < 1 << 31 else np.int64)
    lab[m] = g
    mats = []
    for direction in DIRECTIONS_3D:
        sl = _pair_slices(m.shape, [dist * c for c in direction])
        if sl is None:
            continue
        codes = lab[sl[0]] * k
        codes += lab[sl[1]]
        c = np.bincount(codes.ravel(), minlength=k * k).reshape(k, k)[:n_levels, :n_levels]
        if c.any():
            mats.append(c)
    if not mats:
        return dict(_GLCM_CONSTANT)
    cnt = np.asarray(mats, dtype=np.float64)
    cnt = cnt + cnt.transpose(0, 2, 1)  # symmetric
    p = cnt / cnt.sum(axis=(1, 2), keepdims=True)  # (directions, Ng, Ng)
    idx = np.arange(n_levels, dtype=np.float64)
    diff = np.abs(idx[:, None] - idx[None, :])
    contrast = (p * diff ** 2).sum(axis=(1, 2))
    dissimilarity = (p * diff).sum(axis=(1, 2))
    homogeneity = (p / (1.0 + diff)).sum(axis=(1, 2))
    energy = (p * p).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(axis=(1, 2))
    marg = p.sum(axis=2)  # marginal (rows = columns, symmetric)
    mu = (marg * idx).sum(axis=1)
    var = (marg * (idx * idx)).sum(axis=1) - mu * mu
    cross = np.einsum("dij,i,j->d", p, idx, idx)
    safe = var > 1e-12
    correlation = np.where(safe, (cross - mu * mu) / np.where(safe, var, 1.0), 1.0)
    vals = {"contrast": contrast, "homogeneity": homogeneity, "correlation": correlation, "energy": energy,
            "entropy": entropy, "dissimilarity": dissimilarity}
    return {name: float(v.mean()) + 0.0 for name, v in vals.items()}


# ------------------------------------------------------------------------------------------ dose-volume
def dose_volume_features(bed_gy_in_organ: np.ndarray, voxel_volume_cc: float, n_eud: float) -> dict[str, float]:
    """Cumulative BED dose-volume features of one organ (prefix ``bed_``).

    :param bed_gy_in_organ: the organ's voxel BED values (Gy), finite and ≥ 0.
    :param voxel_volume_cc: the volume of one voxel (cc).
    :param n_eud: LKB volume parameter ``n`` of the gEUD (> 0; 1 gives the mean).
    :return: ``bed_mean``, ``bed_geud`` (Gy), ``bed_d2``, ``bed_d50``, ``bed_d98`` (Gy: the minimum BED
        of the hottest 2 / 50 / 98 % of the organ, whole voxels as in :mod:`twinrt.dvh`), ``bed_v20`` …
        ``bed_v50`` (% of the organ with BED ≥ 20 … 50 Gy), ``bed_volume_cc``; NaN (volume 0) for no voxel.
    """
    from twinrt.radiobiology import geud

    d = np.asarray(bed_gy_in_organ, dtype=np.float64).ravel()
    if d.size == 0:
        out = _nan_dict(DOSE_VOLUME_NAMES, "bed_")
        out["bed_volume_cc"] = 0.0
        return out
    if not np.isfinite(d).all() or (d < 0).any():
        raise InvalidInputError("BED values must be finite and ≥ 0 Gy")
    s = np.sort(d)
    n = s.size
    out = {"bed_mean": float(d.mean()), "bed_geud": geud(d, np.ones(n), n_eud)}
    for pct in DVH_DOSE_POINTS_PERCENT:
        ratio = pct / 100.0 * n
        count = min(max(int(math.ceil(ratio - 1e-9 * max(ratio, 1.0))), 1), n)
        out[f"bed_d{pct}"] = float(s[n - count])
    below = np.searchsorted(s, np.asarray(DVH_VOLUME_POINTS_GY, dtype=np.float64) - _DOSE_TOLERANCE_GY, side="left")
    for gy, b in zip(DVH_VOLUME_POINTS_GY, below):
        out[f"bed_v{gy}"] = 100.0 * (n - int(b)) / n
    out["bed_volume_cc"] = n * float(voxel_volume_cc)
    return out


# ------------------------------------------------------------------------------------------ one organ, one day
def image_features(image: Optional[np.ndarray], mask: Optional[np.ndarray], voxel_volume_cc: float,
                   prefix: str = "ct_", bin_width: float = CT_BIN_WIDTH_HU, bin_min: float = CT_BIN_MIN_HU,
                   volume: bool = True) -> dict[str, float]:
    """Radiomics of an image inside a mask: first order, GLCM and (``volume``) the region volume (cc), prefixed.

    :param image: (k, j, i) image (HU for CT, SUV for PET); ``mask``: boolean region on the same grid
        (NaN for all features when empty or ``None``).
    """
    if mask is None or image is None:
        return _nan_dict(image_feature_names(prefix, volume))
    img = np.asarray(image)
    m = np.asarray(mask, dtype=bool)
    if img.shape != m.shape:
        raise InvalidInputError(f"The image {img.shape} and the organ mask {m.shape} are not on one grid")
    box = _bbox(m)
    if box is None:
        return _nan_dict(image_feature_names(prefix, volume))
    img, m = img[box], m[box]
    out = {f"{prefix}{k}": v for k, v in first_order(img[m], bin_width, bin_min).items()}
    out.update({f"{prefix}glcm_{k}": v for k, v in glcm_features(img, m, bin_width, bin_min).items()})
    if volume:
        out[f"{prefix}volume_cc"] = float(m.sum()) * float(voxel_volume_cc)
    return out


def image_feature_names(prefix: str = "ct_", volume: bool = True) -> list[str]:
    """Names of :func:`image_features` with ``prefix`` (and ``volume``)."""
    return ([prefix + n for n in FIRST_ORDER_NAMES] + [f"{prefix}glcm_{n}" for n in GLCM_NAMES]
            + ([f"{prefix}volume_cc"] if volume else []))


def feature_names() -> list[str]:
    """The names of :func:`organ_fraction_features`, in order (without the ``d_`` changes)."""
    return (["bed_" + n for n in DOSE_VOLUME_NAMES]
            + ["dosio_" + n for n in FIRST_ORDER_NAMES if n != "mean"]
            + [f"dosio_glcm_{n}" for n in GLCM_NAMES]
            + image_feature_names("ct_")
            + image_feature_names("pet_", volume=False))


def organ_fraction_features(bed_gy: np.ndarray, planning_mask: np.ndarray, grid: Grid, day_image: Any = None,
                            day_mask: Any = None, n_eud: float = 1.0, day_grid: Optional[Grid] = None,
                            day_pet: Any = None) -> dict[str, float]:
    """All features of one organ at one fraction (names: :func:`feature_names`).

    :param bed_gy: cumulative BED (Gy) on the planning grid (or any crop of it holding the organ).
    :param planning_mask: the organ on the same array (boolean).
    :param grid: the planning grid (its voxel volume gives the cc).
    :param day_image: the day's image: a :class:`twinrt.model.Image` (HU) or an array (on ``day_grid``,
        default ``grid``); ``None`` when the day has none.
    :param day_mask: the organ contoured on the day's image: a :class:`twinrt.model.Structure` or a
        boolean array on the image; ``None`` when not contoured (``ct_`` features are then NaN).
    :param n_eud: the endpoint's LKB volume parameter ``n`` for ``bed_geud``.
    :param day_grid: the grid of an array ``day_image`` (for the volume in cc).
    :param day_pet: the day's PET (:class:`twinrt.model.Image`, SUVbw, on its own grid in the day's frame of
        reference) or ``None`` (``pet_`` features NaN); ``day_mask`` is resampled to its grid (it must
        then be a :class:`twinrt.model.Structure`, or an array already on the PET grid).
    :raises StructureError: the organ mask is empty.
    """
    bed = np.asarray(bed_gy)
    m = np.asarray(planning_mask, dtype=bool)
    if bed.shape != m.shape:
        raise InvalidInputError(f"The BED {bed.shape} and the organ mask {m.shape} are not on one grid")
    box = _bbox(m)
    if box is None:
        raise StructureError("The organ mask is empty on the planning grid: no feature can be computed")
    bed, m = bed[box], m[box]
    inside = bed[m]
    out = dose_volume_features(inside, grid.voxel_volume_cc, n_eud)
    fo = first_order(inside, BED_BIN_WIDTH_GY, BED_BIN_MIN_GY)
    out.update({f"dosio_{k}": v for k, v in fo.items() if k != "mean"})
    out.update({f"dosio_glcm_{k}": v for k, v in glcm_features(bed, m, BED_BIN_WIDTH_GY, BED_BIN_MIN_GY).items()})
    img_arr, mask_arr, vcc = None, None, (day_grid or grid).voxel_volume_cc
    if day_image is not None and day_mask is not None:
        if hasattr(day_image, "array") and hasattr(day_image, "grid"):
            img_arr, vcc = day_image.array, day_image.grid.voxel_volume_cc
        else:
            img_arr = day_image
        mask_arr = day_mask.mask if hasattr(day_mask, "mask") else day_mask
    out.update(image_features(img_arr, mask_arr, vcc, "ct_"))
    pet_arr = pet_mask = None
    if day_pet is not None and day_mask is not None:
        pet_arr = day_pet.array
        pet_mask = day_mask.on_grid(day_pet.grid) if hasattr(day_mask, "on_grid") else day_mask
    out.update(image_features(pet_arr, pet_mask, vcc, "pet_", PET_BIN_WIDTH_SUV, PET_BIN_MIN_SUV, volume=False))
    return out


# ------------------------------------------------------------------------------------------ changes
def with_baseline_changes(features: np.ndarray, names: Sequence[str],
                          baseline: Optional[Mapping[str, float]] = None) -> tuple[np.ndarray, list[str]]:
    """Append the change from baseline of every feature: ``d_<name> = value − baseline``.

    The baseline of a feature is ``baseline[name]`` when given and finite (e.g. the ``ct_`` features of
    the planning image), otherwise its first finite value over the fractions (the first fraction's,
    or the first day that had it; NaN throughout when it never had one).

    :param features: (T, F) features per fraction.
    :param names: the F names.
    :return: (T, 2F) features and the 2F names (``names`` then ``d_<name>``).
    """
    x = np.asarray(features, dtype=np.float64)
    names = list(names)
    if x.ndim != 2 or x.shape[1] != len(names):
        raise InvalidInputError(f"features must be (fractions, {len(names)}), got {x.shape}")
    base = np.full(x.shape[1], np.nan)
    finite = np.isfinite(x)
    has = finite.any(axis=0)
    first = np.argmax(finite, axis=0)
    base[has] = x[first[has], np.flatnonzero(has)]
    for c, n in enumerate(names):
        if baseline is not None and n in baseline and math.isfinite(float(baseline[n])):
            base[c] = float(baseline[n])
    return np.hstack([x, x - base[None, :]]), names + [f"d_{n}" for n in names]


# ------------------------------------------------------------------------------------------ organs
def _organ_key(name: str) -> Optional[tuple[str, str]]:
    """(endpoint, side) an organ name denotes (side ``""``, ``"L"``, ``"R"`` or ``"LR"``), or ``None``."""
    from twinrt.dosepredict.inputs import _EXCLUDE, _FILLER, _LEFT, _RIGHT, _tokens

    tokens = _tokens(str(name))
    if not tokens or any(t in _EXCLUDE for t in tokens) or any(t.replace(".", "").isdigit() for t in tokens):
        return None
    side = "".join(sorted({"L" for t in tokens if t in _LEFT} | {"R" for t in tokens if t in _RIGHT}))
    core = "".join(t for t in tokens if t not in _LEFT and t not in _RIGHT and t not in _FILLER)
    for endpoint, cores in _ENDPOINT_CORES.items():
        if core in cores:
            return endpoint, side
    return None


def endpoint_for(name: str) -> Optional[str]:
    """The toxicity endpoint of an organ name (parotids → xerostomia, esophagus → esophagitis, lungs →
    pneumonitis, heart → cardiac; TG-263 and OpenKBP spellings, any case), or ``None``."""
    key = _organ_key(name)
    return None if key is None else key[0]


def _lkb_for(organ: str, endpoint: str) -> tuple[Optional[str], float]:
    """(LKB parameter-set name or ``None``, its ``n``; 1 = mean dose without a set)."""
    from twinrt import radiobiology

    try:
        name: Optional[str] = radiobiology.lkb_parameter_set_for(organ)
    except InvalidInputError:  # e.g. "Lungs", "Heart", "Parotids": the endpoint's default set
        name = getattr(radiobiology, "LKB_SET_FOR_ENDPOINT", {}).get(endpoint)
    return name, (radiobiology.LKB_PARAMETERS[name].n if name else 1.0)


def _day_structure(fraction: Any, organ: str) -> Any:
    """The day's contour of ``organ``: same name (any case), else the one structure naming the same organ."""
    s = fraction.structure(organ)
    if s is not None:
        return s
    key = _organ_key(organ)
    if key is None:
        return None
    same = [t for t in fraction.structures if _organ_key(t.name) == key]
    return same[0] if len(same) == 1 else None


def trajectories_from_twin(twin: Any, organs: Optional[Sequence[str]] = None,
                           endpoints: Optional[Mapping[str, str]] = None,
                           outcomes: Optional[Mapping[str, tuple[int, Optional[int]]]] = None,
                           changes: bool = True, ct_baseline: str = "first") -> list[OrganTrajectory]:
    """One :class:`OrganTrajectory` per organ from a :class:`~twinrt.twin.twin.DigitalTwin`'s accepted fractions.

    At fraction f the features are those of :func:`organ_fraction_features` on the cumulative BED of
    fractions 1…f (``Σ d (1 + d/(α/β))`` of the mapped fraction doses with the twin's per-voxel α/β,
    summed incrementally), the day's image and the day's contour of the organ (same name, or the one
    day structure naming the same organ), then their changes from baseline (:func:`with_baseline_changes`).

    :param twin: the digital twin (its timeline's records and fractions).
    :param organs: planning structure names (default: every non-empty planning structure with an
        endpoint, see :func:`endpoint_for`).
    :param endpoints: organ → endpoint, overriding :func:`endpoint_for`.
    :param outcomes: organ → (CTCAE grade, onset fraction or ``None``); default grade 0, no onset
        (unknown outcome).
    :param changes: append the ``d_`` changes from baseline.
    :param ct_baseline: ``"first"``: the ``ct_`` baseline is the first fraction image's (same imaging
        as the later days, e.g. CBCT); ``"planning"``: the planning CT inside the planning contour.
        The ``pet_`` baseline is always the first fraction's PET (the first day that had one).
    :return: trajectories in planning-structure order (or ``organs`` order); ``planned`` holds ``mean_gy``
        and ``geud_gy`` of the planned dose as EQD2 (Gy; per voxel with the course's fraction size and the
        twin's α/β, as LKB parameters assume 2 Gy fractions; gEUD with the LKB set's ``n``),
        and ``lkb_set``:
        the organ's default set (:func:`twinrt.radiobiology.lkb_parameter_set_for`), else the endpoint's
        (``LKB_SET_FOR_ENDPOINT``), else ``None`` (gEUD then with n = 1, the mean).
    :raises StructureError: an organ is missing or empty; :class:`InvalidInputError`: unknown endpoint.
    """
    if ct_baseline not in ("first", "planning"):
        raise InvalidInputError(f"ct_baseline must be 'first' or 'planning', got {ct_baseline!r}")
    from twinrt.radiobiology import bed_uniform, eqd2, geud

    tl = twin.timeline
    case = tl.planning
    grid = twin.grid
    endpoints = dict(endpoints or {})
    outcomes = dict(outcomes or {})
    if organs is None:
        chosen = [s for s in case.structures
                  if not s.is_empty and s.type.value not in ("TARGET", "EXTERNAL")
                  and (s.name in endpoints or endpoint_for(s.name) is not None)]
    else:
        chosen = []
        for name in organs:
            s = next((t for t in case.structures if t.name == name), None) or \
                next((t for t in case.structures if t.name.lower() == str(name).lower()), None)
            if s is None:
                raise StructureError(f"The planning case has no structure '{name}' (has: "
                                     f"{', '.join(t.name for t in case.structures)})", str(name))
            chosen.append(s)
    if len(tl.fractions) != len(tl.records):
        raise InvalidInputError(f"The timeline has {len(tl.fractions)} fractions but {len(tl.records)} records")

    organs_info = []
    for s in chosen:
        endpoint = endpoints.get(s.name) or endpoint_for(s.name)
        if endpoint not in ENDPOINTS:
            raise InvalidInputError(f"No toxicity endpoint for organ '{s.name}'"
                                    + (f" (got '{endpoint}')" if endpoint else "")
                                    + f": pass endpoints={{'{s.name}': ...}} with one of {', '.join(ENDPOINTS)}")
        mask = s.on_grid(grid)
        box = _bbox(mask)
        if box is None:
            raise StructureError(f"Organ '{s.name}' is empty on the planning grid", s.name)
        lkb_set, n = _lkb_for(s.name, endpoint)
        # LKB parameters are fitted to 2-Gy-equivalent doses: the plan's EQD2 per voxel (its fraction
        # size, the organ's α/β) is what the baseline uses.
        ab = twin.alpha_beta[mask].astype(np.float64)
        planned = eqd2(bed_uniform(twin.planned_gy[mask].astype(np.float64), int(tl.n_fractions), ab), ab)
        summary = {"mean_gy": float(planned.mean()), "geud_gy": geud(planned, np.ones(planned.size), n),
                   "lkb_set": lkb_set}
        organs_info.append({"structure": s, "endpoint": endpoint, "box": box, "mask": mask[box], "n": n,
                            "planned": summary, "rows": []})

    for frac, (_, bed) in zip(tl.fractions, twin.bed_by_fraction()):
        for info in organs_info:
            day = _day_structure(frac, info["structure"].name)
            feats = organ_fraction_features(bed[info["box"]], info["mask"], grid,
                                            None if day is None else frac.image, day, info["n"],
                                            day_pet=frac.pet)
            info["rows"].append(feats)

    names = feature_names()
    out = []
    for info in organs_info:
        s = info["structure"]
        x = np.array([[r[k] for k in names] for r in info["rows"]], dtype=np.float64).reshape(-1, len(names))
        feat_names = list(names)
        if changes:
            base = None
            if ct_baseline == "planning":
                base = image_features(case.ct.array, s.on_grid(case.ct.grid), case.ct.grid.voxel_volume_cc, "ct_")
            x, feat_names = with_baseline_changes(x, names, base)
        grade, onset = outcomes.get(s.name, (0, None))
        out.append(OrganTrajectory(
            tl.patient_id, s.name, info["endpoint"], np.array([r.number for r in tl.records], dtype=int), x,
            feat_names, int(grade), onset, int(tl.n_fractions), dict(info["planned"]),
            {"source": "twinrt digital twin (twinrt.toxicity.features)", "geud_n": info["n"],
             "ct_baseline": ct_baseline, "organ_voxels": int(info["mask"].sum())}))
    return out


__all__ = ["BED_BIN_WIDTH_GY", "BED_BIN_MIN_GY", "CT_BIN_WIDTH_HU", "CT_BIN_MIN_HU", "PET_BIN_WIDTH_SUV",
           "PET_BIN_MIN_SUV", "DIRECTIONS_3D",
           "first_order", "glcm_features", "dose_volume_features", "image_features", "image_feature_names",
           "feature_names", "organ_fraction_features", "with_baseline_changes", "endpoint_for",
           "trajectories_from_twin"]
