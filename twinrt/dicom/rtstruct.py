"""DICOM RT Structure Set (RTSTRUCT) export and import.

Structures are written as CLOSED_PLANAR contours on the CT slices (one or more polygons per slice,
holes as nested contours, interpreted with the even-odd rule; see :mod:`twinrt.contours`), each
contour referencing the SOP instance of its CT slice.

Choices (documented because the standard leaves them open):

* **Empty structures** are written as an ROI without contours (the ROI Contour item has no
  ContourSequence, which is Type 3), so the ROI name survives a round trip. On import, an ROI
  without contours becomes an *empty* structure and a warning is logged.
* An ROI whose contours are all POINT or OPEN_PLANAR (a marker, an isocentre) encloses no volume
  and is skipped on import with a logged warning.
* ``RTROIInterpretedType``: target -> PTV (GTV/CTV/ITV when the name starts so), organ -> ORGAN,
  external -> EXTERNAL, other -> empty (Type 2: unknown). On import PTV/CTV/GTV/ITV/TREATED_VOLUME
  -> target, EXTERNAL -> external, ORGAN/OAR/AVOIDANCE -> organ, anything else or empty -> other.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from twinrt.contours import contours_to_structure_mask, structure_to_contours
from twinrt.dicom.common import (CtReference, DicomContext, RT_STRUCTURE_SET_STORAGE, base_dataset, new_uid,
                                 read_dicom_object, save_dataset)
from twinrt.errors import DicomImportError, GeometryError, StructureError, reading
from twinrt.model import Image, Structure, StructureType, default_color

logger = logging.getLogger(__name__)

#: SOP class that RTReferencedStudySequence conventionally names: the retired Detached Study
#: Management class, which clinical systems (and rt-utils, plastimatch) write; dciodvfy accepts it.
_STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"

_TARGET_TYPES = {"PTV", "CTV", "GTV", "ITV", "TREATED_VOLUME", "IRRAD_VOLUME"}
_ORGAN_TYPES = {"ORGAN", "OAR", "AVOIDANCE"}


def _interpreted_type(structure: Structure) -> str:
    """DICOM RTROIInterpretedType for a structure (see module docstring)."""
    if structure.type == StructureType.TARGET:
        prefix = structure.name.upper()[:3]
        return prefix if prefix in ("GTV", "CTV", "ITV") else "PTV"
    if structure.type == StructureType.ORGAN:
        return "ORGAN"
    if structure.type == StructureType.EXTERNAL:
        return "EXTERNAL"
    return ""


def _structure_type(interpreted: str) -> StructureType:
    """TwinRT structure type for a DICOM RTROIInterpretedType (see module docstring)."""
    value = (interpreted or "").strip().upper()
    if value in _TARGET_TYPES:
        return StructureType.TARGET
    if value == "EXTERNAL":
        return StructureType.EXTERNAL
    if value in _ORGAN_TYPES:
        return StructureType.ORGAN
    return StructureType.OTHER


def _ds_string(points_mm: np.ndarray) -> str:
    """Backslash-separated DS values (mm) for ContourData.

    DS values are at most 16 characters; 4 decimals (0.1 micrometre) keep every coordinate of a
    patient-sized image well within that and far below voxel size.
    """
    return "\\".join(f"{v:.4f}".rstrip("0").rstrip(".") or "0" for v in points_mm.reshape(-1))


def _image_ref(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def write_rtstruct(structures: Sequence[Structure], ct_ref: CtReference, ctx: DicomContext, path: str | Path,
                   series_instance_uid: str | None = None, label: str = "TwinRT") -> str:
    """Write structures as a DICOM RT Structure Set referencing a CT series.

    :param structures: structures whose masks are all on the CT grid (the grid whose slice k is
        ``ct_ref.sop_instance_uids[k]``); each name must be unique.
    :param ct_ref: the CT series the contours are drawn on.
    :param ctx: patient, study and frame of reference (shared with the CT).
    :param path: output file; written atomically.
    :param series_instance_uid: SeriesInstanceUID of the RTSTRUCT series; a new one when ``None``.
    :param label: StructureSetLabel (at most 16 characters).
    :return: the SOPInstanceUID of the written RTSTRUCT.
    :raises GeometryError: structures on different grids, or a grid whose slice count differs from
        the CT reference.
    :raises StructureError: duplicate structure names.
    """
    structures = list(structures)
    n_slices = len(ct_ref.sop_instance_uids)
    names = [s.name for s in structures]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StructureError(f"Duplicate structure names {dup}; rename them so each is unique", dup[0])
    grid = structures[0].grid if structures else None
    for s in structures:
        if not s.grid.is_same(grid):
            raise GeometryError(f"Structure '{s.name}' is on a different grid than '{structures[0].name}'; "
                                "resample every structure to the CT grid before export")
        if s.grid.shape[0] != n_slices:
            raise GeometryError(f"Structure '{s.name}' has {s.grid.shape[0]} slices but the CT series has "
                                f"{n_slices}; resample the structure to the CT grid before export")
    # Trace every structure before building the file so that a failure writes nothing.
    traced = [structure_to_contours(s) for s in structures]

    series_instance_uid = series_instance_uid or new_uid()
    # Include the Frame of Reference module: current dicom3tools' dciodvfy requires it in the RT
    # Structure Set IOD (FrameOfReferenceUID Type 1), in addition to ReferencedFrameOfReferenceSequence.
    ds = base_dataset(RT_STRUCTURE_SET_STORAGE, "RTSTRUCT", ctx, series_instance_uid, series_number=2,
                      series_description=f"{label} structures")
    now = _dt.datetime.now()

    # Structure Set module.
    ds.StructureSetLabel = label[:16]
    ds.StructureSetName = label[:64]
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    series = Dataset()
    series.SeriesInstanceUID = ct_ref.series_instance_uid
    series.ContourImageSequence = DicomSequence(
        [_image_ref(ct_ref.sop_class_uid, uid) for uid in ct_ref.sop_instance_uids])
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_COMPONENT_SOP_CLASS
    study.ReferencedSOPInstanceUID = ctx.study_instance_uid
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = ctx.frame_of_reference_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])

    roi_items, contour_items, observation_items = [], [], []
    for number, (s, contours) in enumerate(zip(structures, traced), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = ctx.frame_of_reference_uid
        roi.ROIName = s.name[:64]
        roi.ROIGenerationAlgorithm = ""  # Type 2: TwinRT does not know how the mask was made
        roi_items.append(roi)

        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = [int(c) for c in s.color]
        items = []
        for contour_number, (k, poly) in enumerate(contours, start=1):
            item = Dataset()
            item.ContourImageSequence = DicomSequence(
                [_image_ref(ct_ref.sop_class_uid, ct_ref.sop_instance_uids[k])])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(poly)
            item.ContourNumber = contour_number
            item.ContourData = _ds_string(poly)
            items.append(item)
        if items:
            roi_contour.ContourSequence = DicomSequence(items)
        else:
            logger.warning("Structure '%s' is empty; writing its ROI without contours", s.name)
        contour_items.append(roi_contour)

        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = _interpreted_type(s)
        obs.ROIInterpreter = ""
        observation_items.append(obs)

    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    save_dataset(ds, path)
    return str(ds.SOPInstanceUID)


def _contour_points(item: Dataset) -> np.ndarray:
    """ContourData of one contour item as an (N, 3) float array (mm).

    Parsing the raw bytes with numpy is far faster than pydicom's per-value DS objects, which
    matters for body contours with thousands of points.
    """
    elem = item.get_item("ContourData")
    if elem is None:
        return np.zeros((0, 3))
    raw = elem.value
    if isinstance(raw, (bytes, bytearray)):
        text = raw.decode("ascii", errors="replace").strip(" \0")
        values = np.array(text.split("\\"), dtype=np.float64) if text else np.zeros(0)
    else:
        values = np.asarray(item.ContourData, dtype=np.float64).reshape(-1)
    if values.size % 3:
        raise ValueError(f"ContourData has {values.size} values, not a multiple of 3")
    return values.reshape(-1, 3)


def _referenced_series(ds: Dataset) -> tuple[set[str], set[str]]:
    """Series UIDs and frame-of-reference UIDs the structure set says it was drawn on."""
    series, frames = set(), set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        if frame.get("FrameOfReferenceUID"):
            frames.add(str(frame.FrameOfReferenceUID))
        for study in frame.get("RTReferencedStudySequence", []):
            for ser in study.get("RTReferencedSeriesSequence", []):
                if ser.get("SeriesInstanceUID"):
                    series.add(str(ser.SeriesInstanceUID))
    for roi in ds.get("StructureSetROISequence", []):
        if roi.get("ReferencedFrameOfReferenceUID"):
            frames.add(str(roi.ReferencedFrameOfReferenceUID))
    return series, frames


@reading("DICOM RTSTRUCT file")
def read_rtstruct(path: str | Path, ct: Image, ct_ref: CtReference | None = None,
                  frame_of_reference_uid: str | None = None) -> list[Structure]:
    """Read a DICOM RT Structure Set as masks on the CT grid.

    :param path: the RTSTRUCT file.
    :param ct: the CT the structures were drawn on; masks are made on ``ct.grid`` (axis-aligned).
    :param ct_ref: the CT series; when given, the file must reference its SeriesInstanceUID (or,
        when it names no series, at least one of its slices).
    :param frame_of_reference_uid: the CT's FrameOfReferenceUID; when given, the file must use it.
    :return: one structure per ROI with closed planar contours, in file order, with colour and type
        from the file. ROIs without contours give empty structures (warning logged); ROIs with only
        points or open contours are skipped (warning logged). Duplicate names get a ``_2``, ``_3``
        suffix.
    :raises DicomImportError: not readable, not an RTSTRUCT, or drawn on another CT series or frame
        of reference; the error names the file.
    :raises StructureError: a structure whose contours lie outside the CT; names the structure.
    """
    path = Path(path)
    ds = read_dicom_object(path, "RTSTRUCT", "an RTSTRUCT file")

    series, frames = _referenced_series(ds)
    if ct_ref is not None:
        if series and ct_ref.series_instance_uid not in series:
            raise DicomImportError(
                f"{path} was drawn on CT series {', '.join(sorted(series))}, not on the loaded CT series "
                f"{ct_ref.series_instance_uid}; load the matching CT series", path)
        if not series:
            # RTReferencedStudySequence is Type 3 in recent editions: fall back to the slice references.
            slices = {str(img.ReferencedSOPInstanceUID) for roi in ds.get("ROIContourSequence", [])
                      for c in roi.get("ContourSequence", []) for img in c.get("ContourImageSequence", [])}
            if slices and not slices & set(ct_ref.sop_instance_uids):
                raise DicomImportError(f"{path} references none of the loaded CT's slices; load the matching "
                                       "CT series", path)
    if frame_of_reference_uid is not None and frames and frame_of_reference_uid not in frames:
        raise DicomImportError(
            f"{path} uses frame of reference {', '.join(sorted(frames))}, not the CT's "
            f"{frame_of_reference_uid}; load the matching CT series", path)

    names = {int(r.ROINumber): str(r.get("ROIName", "") or f"ROI_{int(r.ROINumber)}")
             for r in ds.get("StructureSetROISequence", [])}
    types = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "")
             for o in ds.get("RTROIObservationsSequence", []) if "ReferencedROINumber" in o}

    structures: list[Structure] = []
    used: set[str] = set()
    for index, roi in enumerate(ds.get("ROIContourSequence", [])):
        number = int(roi.ReferencedROINumber)
        name = names.get(number, f"ROI_{number}")
        base, suffix = name, 2
        while name.lower() in used:
            name = f"{base}_{suffix}"
            suffix += 1
        if name != base:
            logger.warning("%s: duplicate ROI name '%s' renamed to '%s'", path, base, name)
        color = roi.get("ROIDisplayColor")
        color = tuple(int(c) for c in color) if color is not None and len(color) == 3 else default_color(index)
        stype = _structure_type(types.get(number, ""))

        contour_items = list(roi.get("ContourSequence", []))
        closed = [c for c in contour_items if str(c.get("ContourGeometricType", "CLOSED_PLANAR")) == "CLOSED_PLANAR"]
        if contour_items and not closed:
            logger.warning("%s: ROI '%s' has only point or open contours (no volume); skipped", path, name)
            continue
        if not contour_items:
            logger.warning("%s: ROI '%s' has no contours; imported as an empty structure", path, name)
        try:
            polygons = [_contour_points(c) for c in closed]
        except ValueError as exc:
            raise DicomImportError(f"{path}: ROI '{name}' has malformed ContourData ({exc}); re-export the "
                                   "structure set", path) from exc
        mask = contours_to_structure_mask(polygons, ct.grid, name=name)
        if closed and not mask.any():
            logger.warning("%s: ROI '%s' encloses no voxel centre of the CT", path, name)
        structures.append(Structure(name, mask, ct.grid, color, stype))
        used.add(name.lower())
    return structures
