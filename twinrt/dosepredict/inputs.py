"""Network inputs for dose prediction: ROI matching, model grid, channels, resolution and flips.

Channels (:data:`twinrt.dosepredict.config.KNOWN_CHANNELS`, each (K, J, I) float32 on the model grid):

* ``ct``: ``(clip(HU, lo, hi) - lo) / (hi - lo)`` with ``(lo, hi) = ct_clip_hu`` (default -1000 and
  2000 HU), so air is 0 and dense bone 1;
* ``ptv``: the prescription (Gy) of each PTV divided by ``ptv_scale_gy`` (70 Gy) inside it, 0
  elsewhere; where PTVs overlap the highest prescription wins (PTV70 1.0, PTV63 0.9, PTV56 0.8);
* one 0/1 channel per organ at risk (Brainstem, SpinalCord, RightParotid, LeftParotid,
  Esophagus, Larynx, Mandible; all zero when the case lacks the organ);
* ``possible_dose_mask``: 0/1, the voxels that may receive dose (OpenKBP's mask, or the body).

Geometry: arrays are (k, j, i) on an identity-direction LPS grid, as :func:`twinrt.data.load_openkbp`
gives them (k towards the head, j anterior→posterior, i patient right→left). A case on another grid
is resampled onto a 128³ model grid (voxel size = the OpenKBP median, 3.906 × 3.906 × 2.5 mm)
centred on the centroid of the PTV union, and the prediction is resampled back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from twinrt.dosepredict.config import KNOWN_CHANNELS, MODEL_ROIS, OAR_ROIS, PTV_ROIS, InputConfig
from twinrt.errors import InvalidInputError, StructureError
from twinrt.geometry import Grid, resample_array
from twinrt.model import Case
# One patient outline for all of TwinRT (threshold, largest component, holes filled).
from twinrt.autocontour.classical import BODY_THRESHOLD_HU, body_mask  # noqa: E402,F401  (re-exported)

#: Median OpenKBP voxel size (mm) along (i, j, k) over the 169 training patients (3.906 mm in-plane,
#: 2.5 mm slices): the model grid of a resampled case.
MODEL_SPACING_MM = (3.906, 3.906, 2.5)
#: Organs that only a head-and-neck case has (used by the body-site check).
HEAD_NECK_ORGANS = ("Brainstem", "RightParotid", "LeftParotid", "Larynx", "Mandible")
#: Tolerance (Gy) when a PTV name or prescription is matched to PTV56/PTV63/PTV70.
PTV_DOSE_TOLERANCE_GY = 1.0

# ----------------------------------------------------------------------------- ROI matching

_LEFT = {"l", "lt", "left", "lft", "sin", "links", "gauche"}
_RIGHT = {"r", "rt", "right", "rgt", "dx", "rechts", "droit", "droite"}
#: Tokens that mark a derived structure (planning organ at risk, optimisation helper, margin).
_EXCLUDE = {"prv", "opt", "ring", "avoid", "avd", "expand", "exp", "planning", "eval", "dummy", "z", "zz", "crop",
            "minus", "sub", "not", "help", "helper", "ctv", "gtv", "itv", "margin", "mm", "cm", "ptv+", "dose",
            "isodose", "wall", "hot", "cold", "block", "boost"}
_FILLER = {"gy", "cgy", "gland", "glnd", "the", "organ", "oar", "bone"}
#: Core name (tokens joined, laterality removed) → model ROI (parotids: laterality added).
_SYNONYMS = {
    "Brainstem": {"brainstem", "brainstm", "bstem", "truncuscerebri", "tronccerebral"},
    "SpinalCord": {"spinalcord", "cord", "spinecord", "spinal", "myelon", "medullaspinalis", "cordspinal"},
    "Parotid": {"parotid", "parotis", "parotids", "parotide", "parotida"},
    "Esophagus": {"esophagus", "oesophagus", "esophag", "oesophag", "esoph", "oesoph", "eso", "oesophagus"},
    "Larynx": {"larynx", "glottis", "larynxglottic", "glotticlarynx", "larynxsg", "supraglotticlarynx",
               "larynxsupraglottic", "supraglottis"},
    "Mandible": {"mandible", "mandibula", "jaw", "mandibule", "mandiblebone", "bonemandible"},
}


def _tokens(name: str) -> list[str]:
    s = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)          # camelCase → camel Case
    s = re.sub(r"([A-Z])([A-Z][a-z])", r"\1 \2", s)        # LParotid → L Parotid
    s = re.sub(r"([A-Za-z])(\d)", r"\1 \2", s)              # PTV70 → PTV 70
    s = re.sub(r"(\d)([A-Za-z])", r"\1 \2", s)              # 70Gy → 70 Gy, 3mm → 3 mm
    out: list[str] = []
    for t in re.split(r"[^a-z0-9.]+", s.lower()):
        if re.fullmatch(r"\d+(\.\d+)?", t):
            out.append(t)
        else:
            out += [u for u in t.split(".") if u]
    return [t for t in out if t]


def _number(token: str) -> Optional[float]:
    return float(token) if re.fullmatch(r"\d+(\.\d+)?", token) else None


def _ptv_dose(name: str, prescriptions: Mapping[str, float]) -> Optional[float]:
    """Prescription (Gy) of a target named ``name``: from ``prescriptions``, else from 'PTV70'-like names."""
    for target, dose in prescriptions.items():
        if target.lower() == name.lower():
            return float(dose)
    tokens = _tokens(name)
    if not tokens or tokens[0] != "ptv" or any(t in _EXCLUDE for t in tokens):
        return None
    rest = [t for t in tokens[1:] if t not in ("gy", "cgy")]
    if len(rest) != 1 or _number(rest[0]) is None:
        return None
    dose = float(rest[0])
    return dose / 100.0 if dose >= 1000 or "cgy" in tokens else dose


def _classify(name: str) -> Optional[str]:
    """The model organ a structure name denotes, or ``None``."""
    tokens = _tokens(name)
    if not tokens or any(t in _EXCLUDE for t in tokens) or any(_number(t) is not None for t in tokens):
        return None
    side = {"L" for t in tokens if t in _LEFT} | {"R" for t in tokens if t in _RIGHT}
    core = "".join(t for t in tokens if t not in _LEFT and t not in _RIGHT and t not in _FILLER)
    for roi, names in _SYNONYMS.items():
        if core in names:
            if roi == "Parotid":
                if len(side) != 1:
                    return None  # "Parotids" or "Parotid" without a side is not one organ
                return "LeftParotid" if side == {"L"} else "RightParotid"
            return None if side else roi  # "Cord_L" is not the cord
    return None


def match_rois(structure_names: Sequence[str], prescriptions: Optional[Mapping[str, float]] = None
               ) -> tuple[dict[str, str], list[str]]:
    """Match case structure names to the model ROIs (:data:`MODEL_ROIS`).

    Matching ignores case, separators and word order and knows common synonyms and laterality
    forms: ``Parotid_L``, ``L Parotid``, ``Lt_Parotid``, ``ParotidLeft`` → LeftParotid; ``Cord``,
    ``Spinal Cord`` → SpinalCord; ``Brain_Stem``; ``Oesophagus``; ``PTV_70``, ``PTV70Gy``,
    ``PTV_7000`` (cGy) → PTV70. Derived structures (``…_PRV``, ``…_opt``, ``…_3mm``, rings) never
    match. A target whose prescription is given matches the model PTV of the same dose (± 1 Gy)
    whatever its name. When several names fit one ROI the one spelt like the model ROI wins, else
    the first.

    :param structure_names: the case's structure names.
    :param prescriptions: optional target name → prescription (Gy).
    :return: ``(mapping, unmatched)``: model ROI → case structure name, and the model ROIs (in
        :data:`MODEL_ROIS` order) no structure matched.
    """
    prescriptions = dict(prescriptions or {})
    candidates: dict[str, list[str]] = {roi: [] for roi in MODEL_ROIS}
    for name in structure_names:
        dose = _ptv_dose(name, prescriptions)
        if dose is not None:
            for roi, rx in PTV_ROIS.items():
                if abs(dose - rx) <= PTV_DOSE_TOLERANCE_GY:
                    candidates[roi].append(name)
            continue
        roi = _classify(name)
        if roi is not None:
            candidates[roi].append(name)
    mapping: dict[str, str] = {}
    for roi in MODEL_ROIS:
        names = candidates[roi]
        if names:
            exact = [n for n in names if re.sub(r"[^a-z0-9]", "", n.lower()) == roi.lower()]
            mapping[roi] = (exact or names)[0]
    unmatched = [roi for roi in MODEL_ROIS if roi not in mapping]
    return mapping, unmatched


# ----------------------------------------------------------------------------- channels


def ct_channel(ct_hu: np.ndarray, clip_hu: Sequence[float] = (-1000.0, 2000.0)) -> np.ndarray:
    """CT channel: ``(clip(HU, lo, hi) - lo) / (hi - lo)`` (float32, 0..1)."""
    lo, hi = float(clip_hu[0]), float(clip_hu[1])
    return ((np.clip(ct_hu.astype(np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


def ptv_channel(masks: Mapping[str, np.ndarray], shape: Sequence[int], scale_gy: float = 70.0) -> np.ndarray:
    """PTV channel: prescription (Gy) / ``scale_gy`` inside each PTV, highest wins in overlaps."""
    out = np.zeros(tuple(shape), dtype=np.float32)
    for roi, rx in PTV_ROIS.items():
        m = masks.get(roi)
        if m is not None:
            np.maximum(out, np.where(m, np.float32(rx / scale_gy), np.float32(0)), out=out)
    return out


def build_input(ct_hu: np.ndarray, masks: Mapping[str, np.ndarray], possible_dose_mask: np.ndarray,
                config: InputConfig) -> np.ndarray:
    """The network input at full (model-grid) resolution.

    :param ct_hu: (K, J, I) CT in HU on the model grid.
    :param masks: model ROI name → (K, J, I) bool mask; absent organs may be left out.
    :param possible_dose_mask: (K, J, I) bool, voxels that may receive dose.
    :param config: the recipe's input section (channel order and normalisation).
    :return: (C, K, J, I) float32 with ``C = len(config.channels)``.
    """
    shape = ct_hu.shape
    for name, m in list(masks.items()) + [("possible_dose_mask", possible_dose_mask)]:
        if m.shape != shape:
            raise InvalidInputError(f"Mask '{name}' has shape {m.shape} but the CT has {shape}; "
                                    "resample the masks onto the CT grid first")
    out = np.zeros((len(config.channels),) + tuple(shape), dtype=np.float32)
    for c, name in enumerate(config.channels):
        if name == "ct":
            out[c] = ct_channel(ct_hu, config.ct_clip_hu)
        elif name == "ptv":
            out[c] = ptv_channel(masks, shape, config.ptv_scale_gy)
        elif name == "possible_dose_mask":
            out[c] = possible_dose_mask
        elif name in masks:
            out[c] = masks[name]
    return out


def downsample(array: np.ndarray, factor: int) -> np.ndarray:
    """Average-pool the last three axes by ``factor`` (masks become occupied fractions)."""
    if factor == 1:
        return np.asarray(array, dtype=np.float32)
    *lead, k, j, i = array.shape
    if k % factor or j % factor or i % factor:
        raise InvalidInputError(f"Array shape {array.shape[-3:]} is not divisible by the downsample factor {factor}")
    r = np.asarray(array, dtype=np.float32).reshape(*lead, k // factor, factor, j // factor, factor, i // factor,
                                                    factor)
    return r.mean(axis=(-5, -3, -1), dtype=np.float32)


def upsample(tensor, factor: int):
    """The inverse of :func:`downsample` for predictions: an (N, C, k, j, i) torch tensor enlarged by
    ``factor`` along its last three axes, trilinear with ``align_corners=False``."""
    if factor == 1:
        return tensor
    import torch.nn.functional as F

    return F.interpolate(tensor, scale_factor=factor, mode="trilinear", align_corners=False)


def lr_flip(x: np.ndarray, channels: Sequence[str] | None = None) -> np.ndarray:
    """Mirror left-right (the i axis, the last one) and swap the RightParotid/LeftParotid channels.

    :param x: (C, K, J, I) or (N, C, K, J, I) input, or any array with ``channels=None`` (e.g. a dose).
    :param channels: channel names of axis ``-4``; ``None`` for a single-channel array (no swap).
    """
    out = x[..., ::-1]
    if channels is not None and "RightParotid" in channels and "LeftParotid" in channels:
        order = list(range(len(channels)))
        r, l_ = list(channels).index("RightParotid"), list(channels).index("LeftParotid")
        order[r], order[l_] = l_, r
        out = np.take(out, order, axis=-4)
    return np.ascontiguousarray(out)


def crop_window(mask: np.ndarray, crop_shape: Sequence[int], divisor: int = 1, widen: bool = True,
                shift: Sequence[int] = (0, 0, 0)) -> tuple[slice, slice, slice]:
    """Window of ``crop_shape`` centred on the bounding box of ``mask`` (> 0), inside the array.

    :param mask: (K, J, I) possible-dose mask (bool or fraction).
    :param crop_shape: window size (k, j, i) in voxels.
    :param divisor: window sizes stay multiples of this (the network's stride product).
    :param widen: grow the window to cover the whole bounding box (inference); training keeps
        ``crop_shape`` so that batches stack.
    :param shift: offset (voxels) of the window centre (training augmentation).
    """
    nz = np.nonzero(mask > 0)
    slices = []
    for ax, (n, size) in enumerate(zip(mask.shape, crop_shape)):
        size = min(int(size), n)
        if nz[ax].size:
            lo, hi = int(nz[ax].min()), int(nz[ax].max()) + 1
        else:
            lo, hi = 0, n
        if widen and hi - lo > size:
            size = min(n, -(-(hi - lo) // divisor) * divisor)
        start = (lo + hi) // 2 - size // 2 + int(shift[ax])
        start = max(0, min(start, n - size))
        slices.append(slice(start, start + size))
    return tuple(slices)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- cases


@dataclass
class PreparedInput:
    """A case made ready for the network, on the model grid.

    :param ct_hu: (K, J, I) CT (HU) on ``grid``.
    :param masks: model ROI → bool mask on ``grid`` (matched, non-empty ROIs only).
    :param possible_dose_mask: bool mask on ``grid``.
    :param grid: the model grid (the case's CT grid when no resampling was needed).
    :param resampled: True when the CT was resampled onto a new model grid.
    :param roi_map: model ROI → case structure used.
    :param missing: model ROIs without a structure.
    :param warnings: things the user should know (resampling, orientation, body site, missing organs).
    """

    ct_hu: np.ndarray
    masks: dict[str, np.ndarray]
    possible_dose_mask: np.ndarray
    grid: Grid
    resampled: bool
    roi_map: dict[str, str]
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


#: Voxel sizes (mm) of the OpenKBP training grids, widened a little: (in-plane, slice) ranges.
OPENKBP_SPACING_RANGE_MM = ((2.5, 5.5), (1.25, 3.5))


def is_model_grid(grid: Grid, shape: Sequence[int]) -> bool:
    """True when ``grid`` can be used as it is: the model shape, an identity direction and OpenKBP-like
    voxel sizes (:data:`OPENKBP_SPACING_RANGE_MM`)."""
    (lo_xy, hi_xy), (lo_z, hi_z) = OPENKBP_SPACING_RANGE_MM
    di, dj, dk = grid.spacing_mm
    return (tuple(grid.shape) == tuple(shape) and np.allclose(grid.direction, np.eye(3), atol=1e-4)
            and lo_xy <= di <= hi_xy and lo_xy <= dj <= hi_xy and lo_z <= dk <= hi_z)


def model_grid_around(center_lps: np.ndarray, shape: Sequence[int] = (128, 128, 128),
                      spacing_mm: Sequence[float] = MODEL_SPACING_MM) -> Grid:
    """Identity-direction grid of ``shape`` (k, j, i) and ``spacing_mm`` (i, j, k) centred on a point (mm)."""
    n = np.array(shape[::-1], dtype=float)
    origin = np.asarray(center_lps, dtype=float) - (n - 1) / 2.0 * np.asarray(spacing_mm, dtype=float)
    return Grid(tuple(shape), tuple(spacing_mm), tuple(origin))


def _orientation_warnings(case: Case) -> list[str]:
    from twinrt.dicom.ct import guess_patient_position

    out = []
    direction = case.ct.grid.direction
    k_axis = direction[:, 2]
    if not (abs(abs(k_axis[2]) - 1.0) < 1e-3):
        out.append("The CT is not axial (its slice axis is not head-feet); it was resampled, but the model "
                   "was trained on axial CTs only: check the prediction")
    position = str(case.metadata.get("patient_position") or guess_patient_position(direction) or "")
    if position and position.upper() != "HFS":
        out.append(f"Patient position {position}: the model was trained on head-first supine (HFS) CTs only; "
                   "the image was resampled into patient coordinates, but check the prediction")
    return out


def _body_site_warnings(case: Case, roi_map: Mapping[str, str], grid: Grid, ptv_union: np.ndarray) -> list[str]:
    out = []
    site = str(case.metadata.get("body_site", "")).lower()
    if site and not any(w in site for w in ("head", "neck", "h&n", "hn")):
        out.append(f"Body site '{site}': the model was trained on head-and-neck cases only")
    if not any(o in roi_map for o in HEAD_NECK_ORGANS):
        out.append("No head-and-neck organ (brainstem, parotids, larynx, mandible) was found: the model was "
                   "trained on head-and-neck cases only; check that this is one")
    if ptv_union.any():
        ks = np.nonzero(ptv_union.any(axis=(1, 2)))[0]
        extent = (ks.max() - ks.min() + 1) * grid.spacing_mm[2]
        if extent > 250.0:
            out.append(f"The targets span {extent:.0f} mm head-feet, more than any head-and-neck case the model "
                       "was trained on (< 250 mm)")
    return out


def check_roi_map(roi_map: Mapping[str, str], structure_names: Sequence[str],
                  source: str = "the case") -> tuple[dict[str, str], list[str]]:
    """Check a user's model-ROI → structure mapping.

    :param roi_map: model ROI → structure name; empty values mean "not mapped".
    :param structure_names: the structures there are.
    :param source: what holds them, for the messages (e.g. the segmentation's name).
    :return: ``(mapping without empty values, organs at risk left unmapped)``.
    :raises InvalidInputError: a key that is not a model ROI.
    :raises StructureError: a structure that does not exist, or no target mapped (the message
        names the required structures).
    """
    names = list(structure_names)
    exact = {n.lower(): n for n in names}  # names match case-insensitively, as Case.structure does
    mapping = {str(roi): str(name) for roi, name in dict(roi_map or {}).items() if name}
    bad = [roi for roi in mapping if roi not in MODEL_ROIS]
    if bad:
        raise InvalidInputError(f"{', '.join(bad)} are not model ROIs (the structures the dose model knows); map "
                                f"structures to {', '.join(MODEL_ROIS)}")
    unknown = [name for name in mapping.values() if name.lower() not in exact]
    mapping = {roi: exact.get(name.lower(), name) for roi, name in mapping.items()}
    if unknown:
        raise StructureError(f"{', '.join(repr(u) for u in unknown)} are not structures of {source} (structures: "
                             f"{', '.join(names) or 'none'}); choose structures of {source}", unknown[0])
    if not any(roi in mapping for roi in PTV_ROIS):
        raise StructureError(f"No target is mapped to {', '.join(PTV_ROIS)}: the dose prediction needs at least one "
                             f"of these required structures. Map the target structure(s) of {source} to the PTV of "
                             f"their prescription (structures: {', '.join(names) or 'none'})", list(PTV_ROIS)[-1])
    return mapping, [roi for roi in OAR_ROIS if roi not in mapping]


def prepare_case(case: Case, config: InputConfig, roi_map: Optional[Mapping[str, str]] = None) -> PreparedInput:
    """Match ROIs, check the case and put CT, masks and possible-dose mask on the model grid.

    :param case: the patient (CT in HU, structures, optional ``metadata["possible_dose_mask"]``
        on the CT grid; without one the body mask (HU > -500) is used).
    :param config: the recipe's input section.
    :param roi_map: model ROI → case structure name; default :func:`match_rois` on the case's
        structures and prescriptions.
    :raises StructureError: no PTV matched (the prediction needs at least one target), or a
        ``roi_map`` that names a structure the case lacks.
    """
    warnings: list[str] = []
    names = [s.name for s in case.structures]
    if roi_map is None:
        prescriptions = {p.target: p.dose_gy for p in case.prescriptions}
        mapping, _ = match_rois(names, prescriptions)
    else:
        mapping, _ = check_roi_map(roi_map, names)
    structures = {roi: case.structure(name) for roi, name in mapping.items()}
    for roi, s in list(structures.items()):
        if s.is_empty:
            warnings.append(f"Structure '{s.name}' ({roi}) is empty and was ignored")
            del structures[roi]
            del mapping[roi]
    ptvs = [r for r in PTV_ROIS if r in structures]
    if not ptvs:
        raise StructureError("No target matched PTV56, PTV63 or PTV70: the dose prediction needs at least one PTV. "
                             "Name the targets like 'PTV70' (the prescription in Gy), give the case a prescription, "
                             f"or pass roi_map={{'PTV70': '<your target>'}}; structures: {', '.join(names) or 'none'}",
                             "PTV70")
    missing = [r for r in MODEL_ROIS if r not in structures]
    missing_oars = [r for r in OAR_ROIS if r in missing]
    if missing_oars:
        warnings.append(f"No structure for {', '.join(missing_oars)}: predicted without "
                        f"{'it' if len(missing_oars) == 1 else 'them'} (the dose there is less reliable)")
    shape = tuple(config.model_shape)
    ct_grid = case.ct.grid
    pdm_case = case.metadata.get("possible_dose_mask")
    if pdm_case is not None and tuple(np.shape(pdm_case)) != ct_grid.shape:
        warnings.append("metadata['possible_dose_mask'] does not match the CT grid and was ignored")
        pdm_case = None
    if is_model_grid(ct_grid, shape):
        grid, resampled = ct_grid, False
        ct = np.asarray(case.ct.array)
        masks = {roi: s.on_grid(grid) for roi, s in structures.items()}
    else:
        warnings += _orientation_warnings(case)
        centroid = np.zeros(3)
        count = 0
        for roi in ptvs:
            s = structures[roi]
            idx = np.argwhere(s.mask)[:, ::-1].astype(float)  # (i, j, k)
            centroid += s.grid.index_to_lps(idx).sum(axis=0)
            count += len(idx)
        centroid /= max(count, 1)
        grid, resampled = model_grid_around(centroid, shape), True
        sp = grid.spacing_mm
        warnings.append(f"The CT grid {ct_grid.shape} (k, j, i) at {ct_grid.spacing_mm[0]:.2f} x "
                        f"{ct_grid.spacing_mm[1]:.2f} x {ct_grid.spacing_mm[2]:.2f} mm is not a model grid: resampled "
                        f"onto {shape[0]}³ voxels of {sp[0]:.2f} x {sp[1]:.2f} x {sp[2]:.2f} mm centred on the PTV "
                        f"centroid ({centroid[0]:.0f}, {centroid[1]:.0f}, {centroid[2]:.0f}) mm LPS; the prediction "
                        "is resampled back onto the CT grid")
        ct = resample_array(np.asarray(case.ct.array, dtype=np.float32), ct_grid, grid, order=1, fill_value=-1000.0)
        masks = {roi: s.on_grid(grid) for roi, s in structures.items()}
        lost = [roi for roi in ptvs if masks[roi].sum() < 0.95 * structures[roi].mask.sum()
                * structures[roi].grid.voxel_volume_cc / grid.voxel_volume_cc]
        if lost:
            warnings.append(f"Part of {', '.join(lost)} lies outside the {shape[0]}³ model grid "
                            f"({sp[0] * shape[2]:.0f} x {sp[1] * shape[1]:.0f} x {sp[2] * shape[0]:.0f} mm): "
                            "no dose is predicted there")
    if pdm_case is not None:
        pdm = np.asarray(pdm_case, dtype=bool)
        if resampled:
            pdm = resample_array(pdm.astype(np.float32), ct_grid, grid, order=1) >= 0.5
    else:
        pdm = body_mask(ct, grid.spacing_mm)
        warnings.append(f"No possible-dose mask given: the body (HU > {BODY_THRESHOLD_HU:.0f}, largest connected "
                        "region, holes filled) is used")
    ptv_union = np.zeros(shape, dtype=bool)
    for roi in ptvs:
        ptv_union |= masks[roi]
    warnings += _body_site_warnings(case, mapping, grid, ptv_union)
    if not ptv_union.any():
        raise StructureError(f"The targets {', '.join(mapping[r] for r in ptvs)} have no voxel on the model grid; "
                             "check that they lie inside the CT", mapping[ptvs[0]])
    masks = {roi: m for roi, m in masks.items() if m.any()}
    return PreparedInput(ct.astype(np.float32, copy=False), masks, pdm, grid, resampled, dict(mapping), missing,
                         warnings)


@dataclass
class OpenKBPArrays:
    """One OpenKBP patient's arrays in TwinRT (k, j, i) order (see :func:`twinrt.data.openkbp_to_kji`).

    :param ct_hu: CT in HU (float32).
    :param masks: ROI name → bool mask (non-empty ROIs only).
    :param possible_dose_mask: bool.
    :param dose_gy: reference dose (Gy, float32).
    :param voxel_mm: OpenKBP voxel size (row, column, slice) in mm.
    """

    ct_hu: np.ndarray
    masks: dict[str, np.ndarray]
    possible_dose_mask: np.ndarray
    dose_gy: np.ndarray
    voxel_mm: np.ndarray


def openkbp_arrays(data: Mapping[str, np.ndarray]) -> OpenKBPArrays:
    """Decode the arrays of one ``pt_N.npz`` (keys ct, dose_cgy, labels, rois, voxel_mm)."""
    from twinrt.data import openkbp_to_kji

    missing = [k for k in ("ct", "dose_cgy", "labels", "rois", "voxel_mm") if k not in data]
    if missing:
        raise InvalidInputError(f"OpenKBP arrays lack {missing}; expected a pt_N.npz of ../shared/data/openkbp")
    labels = openkbp_to_kji(np.asarray(data["labels"]))
    masks = {}
    for bit, name in enumerate(str(r) for r in data["rois"]):
        m = ((labels >> bit) & 1).astype(bool)
        if m.any():
            masks[name] = m
    return OpenKBPArrays(ct_hu=openkbp_to_kji(np.asarray(data["ct"])).astype(np.float32) - 1000.0, masks=masks,
                         possible_dose_mask=((labels >> 15) & 1).astype(bool),
                         dose_gy=openkbp_to_kji(np.asarray(data["dose_cgy"])).astype(np.float32) / 100.0,
                         voxel_mm=np.asarray(data["voxel_mm"], dtype=float))


def load_openkbp_arrays(path: str | Path) -> OpenKBPArrays:
    """Read and decode one ``pt_N.npz`` file (errors as :func:`twinrt.data.load_openkbp`)."""
    from twinrt.data import _load_npz

    return openkbp_arrays(_load_npz(path, ("ct", "dose_cgy", "labels", "rois", "voxel_mm")))


__all__ = ["MODEL_SPACING_MM", "KNOWN_CHANNELS", "match_rois", "ct_channel", "ptv_channel", "build_input",
           "downsample", "upsample", "lr_flip", "crop_window", "PreparedInput", "prepare_case", "body_mask", "is_model_grid",
           "model_grid_around", "OpenKBPArrays", "openkbp_arrays", "load_openkbp_arrays"]
