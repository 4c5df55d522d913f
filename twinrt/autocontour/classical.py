"""Contours without weights: body, lungs, bones and air cavities from HU thresholds, morphology and
connected components (what every treatment-planning system offers; research use only).

Everything works on a CT in Hounsfield units on its own grid (array order (k, j, i), spacing in
mm, LPS patient axes: +x is the patient's left). The steps, with their module constants:

* **Body (External)** — voxels above :data:`BODY_THRESHOLD_HU`; an in-plane opening of
  :data:`BODY_OPENING_MM` cuts thin bridges to the couch, immobilisation mask or noise; the largest
  3D connected component is the patient; holes are filled slice by slice (lungs, airways, bowel gas
  inside the outline belong to the body) and then in 3D.
* **Lungs** (``Lung_L``, ``Lung_R``) — air (below :data:`LUNG_THRESHOLD_HU`) inside the body in
  3D components of at least :data:`LUNG_MIN_CC`. Airway-sized pieces near the midline (per axial
  slice: area below :data:`AIRWAY_MAX_AREA_MM2` and centroid within :data:`AIRWAY_MIDLINE_MM` of
  the body's midline) are trachea/main bronchi and left out, and so are components smaller than
  :data:`LUNG_MIN_FRACTION_OF_LARGEST` of the largest (stomach or bowel gas). Two components are
  left and right by their centroid's LPS x; one component (lungs joined at the carina) is split
  at the body's midline x (LPS, whichever way the image axes run).
* **Bones** — voxels above :data:`BONE_THRESHOLD_HU` inside the body, closed by one voxel
  (trabecular gaps), components below :data:`BONE_MIN_CC` dropped (calcifications, contrast).
  Holes are *not* filled: the skull would swallow the brain.
* **Air cavities** (``AirCavity``) — air inside the body that is not lung: sinuses, oral cavity,
  trachea, bowel gas; components below :data:`AIR_MIN_CC` dropped.

Values below :data:`AIR_FLOOR_HU` (out-of-scan padding such as -3024) count as air. Bad input: a
CT whose values are not HU (no air near -1000 HU, or outside [-4000, 5000] HU),
fewer than :data:`MIN_SLICES` slices or :data:`MIN_INPLANE` voxels in plane, or more than
:data:`MAX_VOXELS` voxels, raises :class:`~twinrt.errors.InvalidInputError` saying what to do.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from twinrt.errors import InvalidInputError
from twinrt.geometry import Grid
from twinrt.model import Image, Structure, StructureType

#: HU above which a voxel is patient (body outline).
BODY_THRESHOLD_HU = -500.0
#: In-plane opening radius (mm) before the body's largest component is taken.
BODY_OPENING_MM = 3.0
#: HU below which a voxel inside the body is air (lungs and cavities).
LUNG_THRESHOLD_HU = -400.0
#: Least volume (cc) of an air component to be lung.
LUNG_MIN_CC = 150.0
#: Axial pieces of the lung mask smaller than this (mm²) near the midline are airway.
AIRWAY_MAX_AREA_MM2 = 600.0
#: Distance (mm) from the body's midline within which a small air piece counts as airway.
AIRWAY_MIDLINE_MM = 25.0
#: HU above which a voxel inside the body is bone.
BONE_THRESHOLD_HU = 250.0
#: Least volume (cc) of a bone component.
BONE_MIN_CC = 0.5
#: Least volume (cc) of an air cavity.
AIR_MIN_CC = 0.3
#: Sanity limits on the CT.
MIN_SLICES = 3
MIN_INPLANE = 8
MAX_VOXELS = 1024 * 1024 * 1200
HU_RANGE = (-4000.0, 5000.0)
#: Values below this are air or out-of-scan padding (-2048, -3024 are common); treated as air.
AIR_FLOOR_HU = -1024.0
#: An air component this small next to the largest one is not a lung (stomach or bowel gas).
LUNG_MIN_FRACTION_OF_LARGEST = 0.2

#: Structure name → (colour RGB 0..255, type). Names follow AAPM TG-263.
STRUCTURES = {
    "External": ((177, 122, 101), StructureType.EXTERNAL),
    "Lung_L": ((197, 165, 145), StructureType.ORGAN),
    "Lung_R": ((197, 165, 145), StructureType.ORGAN),
    "Bones": ((241, 214, 145), StructureType.OTHER),
    "AirCavity": ((128, 174, 128), StructureType.OTHER),
}
#: What :func:`classical_contours` can make, by group.
GROUPS = {"body": ("External",), "lungs": ("Lung_L", "Lung_R"), "bones": ("Bones",), "air": ("AirCavity",)}


def check_ct(ct: Image) -> None:
    """Refuse what is not a CT in HU, or is too small or too large to contour.

    :raises InvalidInputError: saying what is wrong and what to do.
    """
    a = np.asarray(ct.array)
    shape = tuple(a.shape)
    if a.ndim != 3:
        raise InvalidInputError(f"The CT must be a 3D volume, got shape {shape}")
    if shape[0] < MIN_SLICES or min(shape[1:]) < MIN_INPLANE:
        raise InvalidInputError(f"The CT is too small to contour: {shape[0]} slice(s) of {shape[2]} x {shape[1]} "
                                f"voxels (need at least {MIN_SLICES} slices of {MIN_INPLANE} x {MIN_INPLANE}); "
                                "load the whole planning CT")
    if a.size > MAX_VOXELS:
        raise InvalidInputError(f"The CT has {a.size / 1e6:.0f} M voxels (shape {shape}), more than the "
                                f"{MAX_VOXELS / 1e6:.0f} M TwinRT contours; crop or resample it first")
    if not np.issubdtype(a.dtype, np.number):
        raise InvalidInputError(f"The CT holds {a.dtype} values, not numbers")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise InvalidInputError("The CT has NaN or infinite voxels; it is not a CT in HU")
    lo, hi = float(a.min()), float(a.max())
    if lo < HU_RANGE[0] or hi > HU_RANGE[1] or lo > -800.0:
        raise InvalidInputError(f"The volume's values run from {lo:g} to {hi:g}, which is not a CT in Hounsfield "
                                f"units (air near -1000 HU, nothing below {HU_RANGE[0]:g} or above {HU_RANGE[1]:g}); "
                                "select the planning CT (or check its rescale slope/intercept)")


def _disk(radius_mm: float, spacing_ij: Sequence[float]) -> np.ndarray:
    """2D structuring element (j, i) of the given radius (mm); at least the 3 x 3 cross."""
    ri = max(1, int(round(radius_mm / float(spacing_ij[1]))))
    rj = max(1, int(round(radius_mm / float(spacing_ij[0]))))
    jj, ii = np.mgrid[-rj:rj + 1, -ri:ri + 1]
    return ((jj * spacing_ij[0]) ** 2 + (ii * spacing_ij[1]) ** 2) <= radius_mm ** 2 + 1e-9


def _largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _drop_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    out = np.empty_like(mask, dtype=bool)
    for k in range(mask.shape[0]):
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out


def body_mask(ct_hu: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
              threshold_hu: float = BODY_THRESHOLD_HU, opening_mm: float = BODY_OPENING_MM) -> np.ndarray:
    """The patient outline (bool, (k, j, i)): see the module docstring.

    :param ct_hu: CT in HU, (k, j, i).
    :param spacing_mm: voxel size (i, j, k) in mm (the opening is in mm).
    :param threshold_hu: HU above which a voxel is patient.
    :param opening_mm: in-plane opening radius (mm); 0 for none.
    """
    from scipy import ndimage

    m = np.asarray(ct_hu) > threshold_hu
    if not m.any():
        return m
    if opening_mm > 0:
        se = _disk(opening_mm, (spacing_mm[1], spacing_mm[0]))[None]
        opened = ndimage.binary_opening(m, structure=se)
        # Opening removes thin bridges; the outline itself keeps its full extent (re-grown inside m).
        core = _largest(opened) if opened.any() else _largest(m)
        m = ndimage.binary_dilation(core, structure=se) & m
    m = _largest(m)
    return ndimage.binary_fill_holes(_fill_slices(m))


def _x_mm(grid: Grid, kk: np.ndarray, jj: np.ndarray, ii: np.ndarray) -> np.ndarray:
    """LPS x (mm; + is the patient's left) of voxel indices."""
    return grid.index_to_lps(np.stack([ii, jj, kk], -1).astype(float))[..., 0]


def _midline_x_mm(body: np.ndarray, grid: Grid) -> float:
    """The body's left-right centre: mean LPS x (mm) of its voxels (every 2nd voxel in plane)."""
    kk, jj, ii = np.nonzero(body[:, ::2, ::2])
    return float(_x_mm(grid, kk, jj * 2, ii * 2).mean())


def lung_masks(ct_hu: np.ndarray, body: np.ndarray, grid: Grid,
               threshold_hu: float = LUNG_THRESHOLD_HU) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) lung masks (bool, (k, j, i)); empty when the CT holds no lungs (e.g. head and neck).

    Left is the patient's left (+x in LPS), whichever way the image axes run.
    """
    from scipy import ndimage

    vox_cc = grid.voxel_volume_cc
    air = (np.asarray(ct_hu) < threshold_hu) & body
    lungs = _drop_small(air, LUNG_MIN_CC / vox_cc)
    empty = np.zeros_like(lungs)
    if not lungs.any():
        return empty, empty.copy()
    mid_x = _midline_x_mm(body, grid)
    # Airway: small pieces near the midline on each axial slice.
    si, sj = float(grid.spacing_mm[0]), float(grid.spacing_mm[1])
    for k in range(lungs.shape[0]):
        if not lungs[k].any():
            continue
        lab, n = ndimage.label(lungs[k])
        for c in range(1, n + 1):
            piece = lab == c
            jj, ii = np.nonzero(piece)
            area = float(len(ii)) * si * sj
            x = float(_x_mm(grid, np.array([k]), np.array([jj.mean()]), np.array([ii.mean()]))[0])
            if area < AIRWAY_MAX_AREA_MM2 and abs(x - mid_x) < AIRWAY_MIDLINE_MM:
                lungs[k][piece] = False
    lungs = _drop_small(lungs, LUNG_MIN_CC / vox_cc)
    labels, n = ndimage.label(lungs)
    if n == 0:
        return empty, empty.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= LUNG_MIN_FRACTION_OF_LARGEST * sizes.max()
    keep[0] = False
    order = [int(c) for c in np.argsort(sizes)[::-1] if keep[c]][:2]
    if len(order) == 2:
        a, b = (labels == c for c in order)
        return (a, b) if _x_mm(grid, *np.nonzero(a)).mean() > _x_mm(grid, *np.nonzero(b)).mean() else (b, a)
    # One component (lungs joined at the carina): split at the body's midline.
    one = labels == order[0]
    kk, jj, ii = np.nonzero(one)
    on_left = _x_mm(grid, kk, jj, ii) > mid_x
    left = np.zeros_like(one)
    left[kk[on_left], jj[on_left], ii[on_left]] = True
    return left, one & ~left


def bone_mask(ct_hu: np.ndarray, body: np.ndarray, grid: Grid, threshold_hu: float = BONE_THRESHOLD_HU) -> np.ndarray:
    """Bones (bool, (k, j, i)): see the module docstring."""
    from scipy import ndimage

    m = (np.asarray(ct_hu) > threshold_hu) & body
    if not m.any():
        return m
    # Padded, so that the closing's erosion keeps bone on the first and last slices and the edges.
    closed = ndimage.binary_closing(np.pad(m, 1), structure=ndimage.generate_binary_structure(3, 1))[1:-1, 1:-1, 1:-1]
    return _drop_small((closed | m) & body, BONE_MIN_CC / grid.voxel_volume_cc)


def air_cavity_mask(ct_hu: np.ndarray, body: np.ndarray, lungs: np.ndarray, grid: Grid,
                    threshold_hu: float = LUNG_THRESHOLD_HU) -> np.ndarray:
    """Air inside the body that is not lung (bool, (k, j, i))."""
    m = (np.asarray(ct_hu) < threshold_hu) & body & ~lungs
    return _drop_small(m, AIR_MIN_CC / grid.voxel_volume_cc)


def merge_actions(existing_names: Iterable[str], new_names: Iterable[str], replace: bool = False) -> dict[str, str]:
    """What to do with each new structure next to the user's: ``add``, ``replace`` or ``keep``.

    Names match case-insensitively. The user's structure is never touched unless ``replace``:
    a new structure whose name exists is then ``keep`` (the user's stays as it is).

    :return: new name -> action, in the order of ``new_names``.
    """
    have = {str(n).lower() for n in existing_names}
    return {n: ("replace" if replace else "keep") if n.lower() in have else "add" for n in new_names}


def merge_structures(existing: Sequence[Structure], new: Sequence[Structure],
                     replace: bool = False) -> tuple[list[Structure], dict[str, str]]:
    """The user's structures with ``new`` merged in (:func:`merge_actions`); inputs are not modified.

    :return: (structures, actions): replaced structures keep their position in the list.
    """
    actions = merge_actions([s.name for s in existing], [s.name for s in new], replace)
    by_name = {s.name.lower(): s for s in new if actions[s.name] == "replace"}
    out = [by_name.get(s.name.lower(), s) for s in existing]
    out += [s for s in new if actions[s.name] == "add"]
    return out, actions


def classical_contours(ct: Image, groups: Optional[Iterable[str]] = None,
                       body: Optional[np.ndarray] = None) -> list[Structure]:
    """Contour ``ct`` without any model: the structures of the chosen ``groups``.

    :param ct: CT in HU.
    :param groups: any of :data:`GROUPS` (``body``, ``lungs``, ``bones``, ``air``); default all.
        Empty results (no lungs on a head-and-neck CT) are left out.
    :param body: an existing body mask on the CT grid to use instead of finding one (then
        ``External`` is not returned unless ``body`` is among ``groups``).
    :return: structures named and coloured as :data:`STRUCTURES`, on the CT grid.
    :raises InvalidInputError: an unknown group, or a CT that :func:`check_ct` refuses.
    """
    wanted = list(GROUPS) if groups is None else [str(g).lower() for g in groups]
    unknown = [g for g in wanted if g not in GROUPS]
    if unknown:
        raise InvalidInputError(f"Unknown contour group(s) {', '.join(unknown)}; use {', '.join(GROUPS)}")
    check_ct(ct)
    hu = np.maximum(np.asarray(ct.array, dtype=np.float32), AIR_FLOOR_HU)
    grid = ct.grid
    if body is None:
        body = body_mask(hu, grid.spacing_mm)
    elif np.shape(body) != hu.shape:
        raise InvalidInputError(f"The body mask {np.shape(body)} is not on the CT grid {hu.shape}")
    body = np.asarray(body, bool)
    masks: dict[str, np.ndarray] = {}
    if "body" in wanted:
        masks["External"] = body
    lungs = np.zeros_like(body)
    if "lungs" in wanted or "air" in wanted:
        left, right = lung_masks(hu, body, grid)
        lungs = left | right
        if "lungs" in wanted:
            masks["Lung_L"], masks["Lung_R"] = left, right
    if "bones" in wanted:
        masks["Bones"] = bone_mask(hu, body, grid)
    if "air" in wanted:
        masks["AirCavity"] = air_cavity_mask(hu, body, lungs, grid)
    out = []
    for name, mask in masks.items():
        if mask.any():
            color, kind = STRUCTURES[name]
            out.append(Structure(name, mask, grid, color, kind))
    return out
