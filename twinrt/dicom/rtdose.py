"""RT Dose import and export: one multi-frame RTDOSE file <-> :class:`twinrt.model.Dose` (Gy).

Pixels are unsigned 16-bit integers times DoseGridScaling, the form most planning systems write.
The scaling maps the maximum dose to :data:`MAX_PIXEL` (65000), so the quantisation error is at
most half a step, max/130000 = 0.0008 % of the maximum: far below the 0.5 % that dose comparison
needs. 16 bits (not 32) also keeps every file checkable: dicom3tools' ``dciodvfy`` (at least
1.00~20220618) aborts with "Assertion 'bitsallocated <= bytesinword*8u' failed" on 32-bit pixel
data. The reader accepts 16- and 32-bit files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from twinrt.dicom.common import (RT_DOSE_STORAGE, RT_PLAN_STORAGE, DicomContext, base_dataset, new_uid,
                                 read_dicom_object, save_dataset)
from twinrt.dicom.ct import POSITION_TOL_MM, format_ds, format_ds_list, orientation_axes
from twinrt.errors import DicomImportError, GeometryError, InvalidInputError, reading
from twinrt.geometry import Grid
from twinrt.model import Dose, validate_dose_array

log = logging.getLogger(__name__)

#: Largest stored pixel value: 65000 leaves headroom below the uint16 limit (65535) for the
#: rounding of DoseGridScaling to a 16-character DS.
MAX_PIXEL = 65000

#: DoseSummationType values for which DICOM requires ReferencedRTPlanSequence (PS3.3 C.8.8.3).
PLAN_REQUIRED_SUMMATIONS = {"PLAN", "MULTI_PLAN", "FRACTION", "BEAM", "BRACHY", "FRACTION_SESSION",
                            "BEAM_SESSION", "BRACHY_SESSION", "CONTROL_POINT"}


def write_rtdose(dose: Dose, ctx: DicomContext, path: str | Path, referenced_plan_sop_uid: str | None = None,
                 series_instance_uid: str | None = None, series_number: int = 1,
                 sop_instance_uid: str | None = None) -> str:
    """Write ``dose`` as one multi-frame RTDOSE file.

    Frame k is the dose plane k of the grid; GridFrameOffsetVector gives each frame's position (mm)
    along the row x column normal relative to the first frame, so it descends when the grid's k
    axis points against the normal.

    DICOM requires a ReferencedRTPlanSequence for DoseSummationType ``PLAN`` (and MULTI_PLAN,
    FRACTION, BEAM, ...), and ``RECORD`` requires a treatment record reference instead; every
    defined term needs some reference. A made-up reference would dangle, so without
    ``referenced_plan_sop_uid`` the summation type is written as given and the file lacks that
    Type 1C sequence (dciodvfy reports one error; most viewers, Slicer included, read it fine).
    :func:`twinrt.dicom.folder.export_case` passes the first plan of the case when it writes one.

    :param dose: dose in Gy (finite, >= 0).
    :param ctx: patient, study and frame of reference of the case.
    :param path: output file; written atomically.
    :param referenced_plan_sop_uid: SOPInstanceUID of the RTPLAN that produced the dose.
    :param series_instance_uid: series UID; default a new UID derived from the SOP instance UID.
    :param series_number: DICOM SeriesNumber.
    :param sop_instance_uid: SOP instance UID; default a new random UID.
    :return: the SOPInstanceUID written.
    :raises DoseError: the dose has NaN, infinite or negative values.
    """
    validate_dose_array(dose.array, dose.name)
    grid = dose.grid
    nk, nj, ni = grid.shape
    sop_instance_uid = sop_instance_uid or new_uid()
    series_instance_uid = series_instance_uid or new_uid(sop_instance_uid, "series")
    summation = dose.summation.upper()
    if referenced_plan_sop_uid is None and summation in PLAN_REQUIRED_SUMMATIONS:
        log.warning("RTDOSE %s: DoseSummationType %s without a referenced RTPLAN is not DICOM conformant; "
                    "pass referenced_plan_sop_uid", path, summation)
    ds = base_dataset(RT_DOSE_STORAGE, "RTDOSE", ctx, series_instance_uid, series_number,
                      (dose.name or "dose")[:64], sop_instance_uid)
    # General Image (RT Series has no Laterality, so none is written)
    ds.InstanceNumber = 1
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    if dose.source:
        ds.ImageComments = dose.source[:10240]
    # Image Plane: the first frame's first pixel, rows along i and columns along j.
    row, col = grid.direction[:, 0], grid.direction[:, 1]
    normal = np.cross(row, col)
    sign = float(np.sign(grid.direction[:, 2] @ normal))  # +1 right-handed, -1 k against the normal
    ds.ImagePositionPatient = format_ds_list(grid.origin_mm)
    ds.ImageOrientationPatient = format_ds_list([*row, *col])
    ds.PixelSpacing = format_ds_list([grid.spacing_mm[1], grid.spacing_mm[0]])
    ds.SliceThickness = format_ds(grid.spacing_mm[2])
    # Multi-frame
    ds.NumberOfFrames = nk
    ds.FrameIncrementPointer = pydicom.tag.Tag("GridFrameOffsetVector")
    ds.GridFrameOffsetVector = format_ds_list(sign * grid.spacing_mm[2] * np.arange(nk))
    # Image Pixel / RT Dose
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = nj
    ds.Columns = ni
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = dose.dose_type.upper()
    ds.DoseSummationType = summation
    ds.DoseComment = (dose.name or "")[:64]
    max_gy = float(dose.array.max()) if dose.array.size else 0.0
    # Round the scaling to what the 16-character DS can hold *before* computing the pixels, so
    # that the reader's pixel * scaling reproduces the dose as closely as possible.
    scaling = float(format_ds(max_gy / MAX_PIXEL if max_gy > 0 else 1e-6))
    ds.DoseGridScaling = format_ds(scaling)
    pixels = np.clip(np.round(dose.array.astype(np.float64) / scaling), 0, 2**16 - 1).astype("<u2")
    ds.PixelData = pixels.tobytes()
    if referenced_plan_sop_uid:
        item = Dataset()
        item.ReferencedSOPClassUID = RT_PLAN_STORAGE
        item.ReferencedSOPInstanceUID = referenced_plan_sop_uid
        ds.ReferencedRTPlanSequence = [item]
    save_dataset(ds, path)
    return sop_instance_uid


@reading("DICOM RTDOSE file")
def read_rtdose(path: str | Path) -> Dose:
    """Read a grid-based RTDOSE file into a :class:`Dose` in Gy.

    Frames are reordered when GridFrameOffsetVector descends, so the returned grid's k axis always
    points along the row x column normal (a right-handed grid, like :func:`read_ct_series`).

    :param path: the RTDOSE file.
    :raises MissingInputError: the file does not exist.
    :raises DicomImportError: the file is not a readable grid-based RTDOSE, or its units or frame
        offsets cannot be used; the message names the file.
    :raises DoseError: the dose has NaN or negative values.
    """
    path = Path(path)
    ds = read_dicom_object(path, "RTDOSE", "the dose file")
    if "PixelData" not in ds:
        raise DicomImportError(f"{path} is an RTDOSE without a dose grid (point doses or DVH only); "
                               "TwinRT needs a 3D dose", path)
    units = str(ds.get("DoseUnits", "GY")).upper()
    if units != "GY":
        raise DicomImportError(f"{path} has DoseUnits {units}; TwinRT reads absolute dose in Gy only "
                               "(relative doses cannot be compared)", path)
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise DicomImportError(f"Pixel data of {path} cannot be read ({exc}); re-export the dose uncompressed",
                               path) from exc
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = np.asarray(pixels).reshape(nframes, int(ds.Rows), int(ds.Columns))
    scaling = float(ds.get("DoseGridScaling", 1.0) or 1.0)
    array = pixels.astype(np.float64) * scaling
    row, col, normal = orientation_axes(ds, path)
    ps = ds.get("PixelSpacing")
    if ps is None or len(ps) != 2:
        raise DicomImportError(f"{path} has no valid PixelSpacing", path)
    origin = np.array([float(v) for v in ds.ImagePositionPatient])
    offsets = np.array([float(v) for v in ds.get("GridFrameOffsetVector", [0.0] * nframes)])
    if len(offsets) != nframes:
        raise DicomImportError(f"{path}: GridFrameOffsetVector has {len(offsets)} values for {nframes} frames",
                               path)
    # Type a offsets start at 0 (relative); type b are absolute positions along the normal.
    # Both become relative to the first frame.
    offsets = offsets - offsets[0]
    if nframes > 1:
        steps = np.diff(offsets)
        dk = float(np.median(np.abs(steps)))
        if dk < POSITION_TOL_MM or np.any(np.abs(np.abs(steps) - dk) > POSITION_TOL_MM) or \
                not (np.all(steps > 0) or np.all(steps < 0)):
            raise DicomImportError(f"{path}: GridFrameOffsetVector is not uniformly spaced ({offsets[:5]}...); "
                                   "TwinRT needs a regular dose grid: re-export the dose on a uniform grid", path)
        if steps[0] < 0:
            # Reverse the frames so that k runs along the normal; the first voxel moves to the last frame.
            array = array[::-1]
            origin = origin + offsets[-1] * normal
    else:
        dk = float(ds.get("SliceThickness", 0) or 1.0)
    try:
        grid = Grid(array.shape, (float(ps[1]), float(ps[0]), dk), tuple(origin), np.column_stack([row, col, normal]))
    except GeometryError as exc:
        raise DicomImportError(f"{path}: {exc}", path) from exc
    name = str(ds.get("DoseComment", "") or ds.get("SeriesDescription", "") or path.stem)
    try:
        return Dose(np.ascontiguousarray(array, dtype=np.float32), grid, name=name,
                    dose_type=str(ds.get("DoseType", "PHYSICAL")),
                    summation=str(ds.get("DoseSummationType", "PLAN")),
                    source=str(ds.get("ImageComments", "")))
    except InvalidInputError as exc:
        # DoseError from validation: say which file it came from.
        raise type(exc)(f"{path}: {exc}") from exc
