"""CT series import and export: a folder of CT Image Storage slices <-> :class:`twinrt.model.Image`.

The reader builds the one TwinRT geometry (:class:`twinrt.geometry.Grid`) from the slices: the i and
j axes are the row and column directions of ImageOrientationPatient, the k axis is their cross
product (the slice normal) and slices are sorted by position along it, so the returned grid is
always right-handed with k increasing along the normal. Anything that a regular grid cannot
represent (gantry tilt, gaps, mixed series, differing slice geometry) is refused with a
:class:`twinrt.errors.DicomImportError` that names the file and says what to do, rather than being
silently resampled.

The writer produces one file per k slice that ``dciodvfy`` accepts without errors.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from twinrt.dicom.common import (CT_IMAGE_STORAGE, CtReference, DicomContext, base_dataset, new_uid,
                                 read_header, save_dataset)
from twinrt.errors import DicomImportError, GeometryError, InvalidInputError, MissingInputError, reading
from twinrt.geometry import Grid
from twinrt.model import Image

log = logging.getLogger(__name__)

#: Positions and spacings (mm) closer than this are equal. 0.01 mm is what Slicer's DICOM scalar
#: volume plugin uses for slice spacing; real scanners round positions to ~1e-3 mm.
POSITION_TOL_MM = 0.01
#: Tolerance on direction cosines (unit vectors) when comparing orientations between slices.
ORIENTATION_TOL = 1e-4


# --------------------------------------------------------------------------------------- helpers
def format_ds(value: float) -> str:
    """``value`` as a DICOM DS string (at most 16 characters), keeping as many digits as fit."""
    value = float(value)
    if value == 0.0:
        return "0"
    # Try the most significant digits first, then fewer until the text fits the 16-byte DS limit.
    for digits in range(15, 0, -1):
        text = f"{value:.{digits}g}"
        if "e" in text:
            mantissa, exp = text.split("e")
            text = f"{mantissa}e{int(exp)}"
        if len(text) <= 16:
            return text
    raise InvalidInputError(f"Cannot write {value!r} as a DICOM decimal string")


def format_ds_list(values: Sequence[float]) -> list[str]:
    """Each value of ``values`` as a DS string (see :func:`format_ds`)."""
    return [format_ds(v) for v in values]


def list_dicom_files(folder: Path) -> list[tuple[Path, Dataset]]:
    """(path, header) of every DICOM file directly inside ``folder`` (not recursive), sorted by name."""
    out = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        ds = read_header(path)
        if ds is None:
            log.info("Ignoring non-DICOM file %s", path)
            continue
        out.append((path, ds))
    return out


def context_from_dataset(ds: Dataset) -> DicomContext:
    """The patient/study/frame-of-reference identity stored in one dataset."""
    def text(keyword: str, default: str = "") -> str:
        value = ds.get(keyword, None)
        return default if value is None or str(value) == "" else str(value)

    pid = text("PatientID", "UNKNOWN")
    return DicomContext(
        patient_id=pid,
        patient_name=text("PatientName", pid),
        study_instance_uid=text("StudyInstanceUID") or new_uid(pid, "study"),
        frame_of_reference_uid=text("FrameOfReferenceUID") or new_uid(pid, "for"),
        study_id=text("StudyID", "1"),
        study_description=text("StudyDescription", ""),
        study_date=text("StudyDate", ""),
        study_time=text("StudyTime", ""),
        patient_birth_date=text("PatientBirthDate", ""),
        patient_sex=text("PatientSex", ""),
    )


def orientation_axes(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row direction, column direction and slice normal (LPS) from ImageOrientationPatient."""
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        raise DicomImportError(f"{path} has no valid ImageOrientationPatient; it cannot be placed in the "
                               "patient; re-export the series from the scanner or PACS", path)
    row = np.array([float(v) for v in iop[:3]])
    col = np.array([float(v) for v in iop[3:]])
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        raise DicomImportError(f"{path} has a zero vector in ImageOrientationPatient {list(iop)}", path)
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    if abs(float(row @ col)) > 1e-3:
        raise DicomImportError(f"{path}: ImageOrientationPatient rows and columns are not perpendicular "
                               f"({list(iop)}); TwinRT cannot represent sheared images", path)
    # Remove the tiny non-orthogonality left by rounding so that Grid accepts the direction.
    col = col - (row @ col) * row
    col /= np.linalg.norm(col)
    return row, col, np.cross(row, col)


def _position(ds: Dataset, path: Path) -> np.ndarray:
    ipp = ds.get("ImagePositionPatient")
    if ipp is None or len(ipp) != 3:
        raise DicomImportError(f"{path} has no valid ImagePositionPatient; it cannot be placed in the "
                               "patient; re-export the series", path)
    return np.array([float(v) for v in ipp])


@dataclass
class _Slice:
    path: Path
    ds: Dataset
    position: np.ndarray
    distance: float  # position along the slice normal (mm)


# --------------------------------------------------------------------------------------- reading
@reading("DICOM CT series")
def read_ct_series(folder: str | Path, series_instance_uid: str | None = None
                   ) -> tuple[Image, CtReference, DicomContext]:
    """Read a CT series from a folder of single-slice CT Image Storage files.

    Non-DICOM files and other modalities (RTSTRUCT, RTDOSE, ...) in the folder are ignored.

    :param folder: folder holding the slices (not searched recursively).
    :param series_instance_uid: which series to read when the folder holds several CT series.
    :return: the image in HU (int16 when the rescale is lossless, else float32) on a right-handed
        grid (mm, LPS), the series/slice UIDs in k order, and the patient/study context.
    :raises MissingInputError: the folder does not exist or holds no CT slice.
    :raises DicomImportError: the series cannot be represented as a regular grid (gantry tilt, a
        gap, duplicate or non-uniform slices, mixed series or slice geometry) or a file is unreadable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"CT folder {folder} does not exist; check the path", folder)
    cts = [(p, ds) for p, ds in list_dicom_files(folder)
           if str(ds.get("SOPClassUID", "")) == CT_IMAGE_STORAGE]
    if not cts:
        raise MissingInputError(f"No CT Image Storage file in folder {folder}; choose the folder that "
                                "holds the CT slices (one file per slice)", folder)
    cts = _select_series(cts, folder, series_instance_uid)
    slices = _sorted_slices(cts)
    grid = _grid_from_slices(slices)
    array = _read_rescaled(slices, grid)
    first = slices[0].ds
    ref = CtReference(str(first.SeriesInstanceUID), [str(s.ds.SOPInstanceUID) for s in slices],
                      CT_IMAGE_STORAGE)
    return Image(array, grid, "CT"), ref, context_from_dataset(first)


def _select_series(cts: list[tuple[Path, Dataset]], folder: Path,
                   series_instance_uid: str | None, what: str = "CT") -> list[tuple[Path, Dataset]]:
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for p, ds in cts:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((p, ds))
    if series_instance_uid is not None:
        if series_instance_uid not in series:
            raise DicomImportError(f"Folder {folder} has no {what} series {series_instance_uid}; it holds "
                                   f"{', '.join(sorted(series))}", folder)
        return series[series_instance_uid]
    if len(series) > 1:
        listing = "; ".join(f"{uid} ({len(files)} slices, e.g. {files[0][0].name}, "
                            f"'{files[0][1].get('SeriesDescription', '')}')" for uid, files in series.items())
        raise DicomImportError(f"Folder {folder} mixes {len(series)} {what} series: {listing}. Put one series per "
                               "folder, or pass series_instance_uid= to choose one", folder)
    return cts


def _sorted_slices(cts: list[tuple[Path, Dataset]]) -> list[_Slice]:
    """Slices sorted along the normal, after checking that they share one geometry."""
    p0, ds0 = cts[0]
    row0, col0, normal = orientation_axes(ds0, p0)
    ref_spacing = _pixel_spacing(ds0, p0)
    ref_size = (int(ds0.get("Rows", 0)), int(ds0.get("Columns", 0)))
    slices = []
    for path, ds in cts:
        tilt = float(ds.get("GantryDetectorTilt", 0) or 0)
        if abs(tilt) > 1e-3:
            raise DicomImportError(f"{path} was acquired with gantry/detector tilt {tilt}°; TwinRT needs "
                                   "untilted slices: resample the series to an untilted grid first "
                                   "(e.g. Slicer's 'Acquisition transform' in the DICOM module)", path)
        row, col, _ = orientation_axes(ds, path)
        if not (np.allclose(row, row0, atol=ORIENTATION_TOL) and np.allclose(col, col0, atol=ORIENTATION_TOL)):
            raise DicomImportError(f"{path} has ImageOrientationPatient {list(ds.ImageOrientationPatient)} but "
                                   f"{p0.name} has {list(ds0.ImageOrientationPatient)}; a series must have one "
                                   "orientation: remove the odd slices or put them in another folder", path)
        spacing = _pixel_spacing(ds, path)
        if not np.allclose(spacing, ref_spacing, atol=1e-4):
            raise DicomImportError(f"{path} has PixelSpacing {list(spacing)} mm but {p0.name} has "
                                   f"{list(ref_spacing)} mm; a series must have one pixel size", path)
        size = (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
        if size != ref_size:
            raise DicomImportError(f"{path} is {size[0]}x{size[1]} (rows x columns) but {p0.name} is "
                                   f"{ref_size[0]}x{ref_size[1]}; a series must have one slice size", path)
        pos = _position(ds, path)
        slices.append(_Slice(path, ds, pos, float(pos @ normal)))
    slices.sort(key=lambda s: s.distance)
    # Slice positions must move along the normal only; an in-plane drift means a tilted acquisition
    # whose GantryDetectorTilt was not recorded (or was reset by an anonymiser).
    for s in slices[1:]:
        delta = s.position - slices[0].position
        in_plane = delta - (delta @ normal) * normal
        if np.linalg.norm(in_plane) > POSITION_TOL_MM:
            raise DicomImportError(
                f"{s.path} is displaced {np.linalg.norm(in_plane):.3f} mm in-plane from {slices[0].path.name}: "
                "slice positions do not follow the slice normal (gantry tilt or a sheared series); "
                "resample the series to an untilted grid first", s.path)
    return slices


def _pixel_spacing(ds: Dataset, path: Path) -> np.ndarray:
    ps = ds.get("PixelSpacing")
    if ps is None or len(ps) != 2 or min(float(v) for v in ps) <= 0:
        raise DicomImportError(f"{path} has no valid PixelSpacing; the pixel size in mm is unknown", path)
    return np.array([float(v) for v in ps])


def _grid_from_slices(slices: list[_Slice]) -> Grid:
    first = slices[0]
    row, col, normal = orientation_axes(first.ds, first.path)
    row_spacing, col_spacing = _pixel_spacing(first.ds, first.path)
    steps = np.diff([s.distance for s in slices])
    for a, b, step in zip(slices[:-1], slices[1:], steps):
        if step < POSITION_TOL_MM:
            raise DicomImportError(f"{a.path} and {b.path} are at the same position ({step:.4f} mm apart along "
                                   "the slice normal): duplicate slices; remove one of them", b.path)
    if len(slices) == 1:
        dk = float(first.ds.get("SpacingBetweenSlices", 0) or first.ds.get("SliceThickness", 0) or 1.0)
    else:
        # The most common step is the nominal spacing; any other step is a gap or a non-uniform series.
        dk = float(np.median(steps))
        for a, b, step in zip(slices[:-1], slices[1:], steps):
            if abs(step - dk) > POSITION_TOL_MM:
                what = "a gap (missing slice?)" if step > dk else "non-uniform slice spacing"
                raise DicomImportError(
                    f"Slices {a.path.name} and {b.path.name} are {step:.3f} mm apart but the series spacing is "
                    f"{dk:.3f} mm: {what} in {a.path.parent}. Restore the missing slice(s) or re-export the series "
                    "with uniform spacing", b.path)
    # PixelSpacing is (spacing between rows, spacing between columns) = (dj, di).
    direction = np.column_stack([row, col, normal])
    try:
        return Grid((len(slices), int(first.ds.Rows), int(first.ds.Columns)), (col_spacing, row_spacing, dk),
                    tuple(first.position), direction)
    except GeometryError as exc:
        raise DicomImportError(f"{first.path}: {exc}", first.path) from exc


def _read_rescaled(slices: list[_Slice], grid: Grid) -> np.ndarray:
    """Rescaled values of every slice (HU for CT, the series' Units for PET; slope and intercept per
    slice); int16 when every rescaled value is an integer in int16 range."""
    out = np.empty(grid.shape, dtype=np.float64 if len(slices) * grid.shape[1] * grid.shape[2] < 2**22
                   else np.float32)
    integral = True
    for k, s in enumerate(slices):
        try:
            ds = pydicom.dcmread(s.path)
            pixels = ds.pixel_array
        except Exception as exc:  # missing pixel data, unsupported compression, truncated file
            raise DicomImportError(f"Pixel data of {s.path} cannot be read ({exc}); if it is compressed, "
                                   "install pylibjpeg/pylibjpeg-libjpeg or decompress it (gdcmconv --raw)",
                                   s.path) from exc
        if pixels.shape != grid.shape[1:]:
            raise DicomImportError(f"{s.path} pixel data is {pixels.shape}, expected {grid.shape[1:]}", s.path)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        hu = pixels.astype(np.float64) * slope + intercept
        # Integer slope and intercept keep HU integral; anything else goes to float32.
        if integral and not (np.all(hu == np.round(hu)) and hu.min() >= -32768 and hu.max() <= 32767):
            integral = False
        out[k] = hu
    return out.astype(np.int16) if integral else out.astype(np.float32)


# --------------------------------------------------------------------------------------- writing
def _content_hash(image: Image) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(image.array).tobytes())
    h.update(repr((image.grid.shape, image.grid.spacing_mm, image.grid.origin_mm)).encode())
    h.update(np.asarray(image.grid.direction).tobytes())
    return h.hexdigest()


def _rescale(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """int16 pixels, slope and intercept representing ``array`` (HU).

    Integral HU in int16 range are stored exactly (slope 1, intercept 0). Anything else is mapped
    linearly onto the int16 range, which loses at most half a step (slope / 2 HU).
    """
    if not np.all(np.isfinite(array)):
        raise InvalidInputError("CT image has NaN or infinite values; fix the image before exporting it")
    if array.size == 0:
        raise InvalidInputError("CT image is empty")
    lo, hi = float(array.min()), float(array.max())
    if np.issubdtype(array.dtype, np.integer) or np.all(array == np.round(array)):
        if lo >= -32768 and hi <= 32767:
            return array.astype(np.int16), 1.0, 0.0
    intercept = float(format_ds((hi + lo) / 2.0))
    slope = float(format_ds(max((hi - lo) / 65000.0, 1e-6)))
    pixels = np.clip(np.round((array.astype(np.float64) - intercept) / slope), -32768, 32767)
    return pixels.astype(np.int16), slope, intercept


def guess_patient_position(direction: np.ndarray) -> str:
    """PatientPosition implied by an axial orientation, or ``""`` (unknown) for any other.

    A scanner writes rows along +x and columns along +y for head-first supine (HFS); each other
    standard position flips one or both (DICOM PS3.3 C.7.6.2.1.1).

    :param direction: 3x3 grid direction (columns: LPS unit vectors of i, j, k).
    """
    row, col = np.asarray(direction)[:, 0], np.asarray(direction)[:, 1]
    if not (abs(abs(row[0]) - 1) < 1e-6 and abs(abs(col[1]) - 1) < 1e-6):
        return ""
    return {(1, 1): "HFS", (-1, 1): "FFS", (-1, -1): "HFP", (1, -1): "FFP"}[(int(np.sign(row[0])),
                                                                              int(np.sign(col[1])))]


def save_series(datasets: Sequence[Dataset], folder: Path, prefix: str) -> list[Path]:
    """Write one file per slice (``<prefix>_0001.dcm``, ...) into ``folder``, all or none: the files
    already written (and a folder created here) are removed when a later one fails."""
    created_folder = not folder.exists()
    written: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for k, ds in enumerate(datasets):
            written.append(save_dataset(ds, folder / f"{prefix}_{k + 1:04d}.dcm"))
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        if created_folder and folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    return written


def write_ct_series(image: Image, ctx: DicomContext, folder: str | Path, series_instance_uid: str | None = None,
                    series_number: int = 1, sop_instance_uids: Sequence[str] | None = None,
                    series_description: str = "TwinRT CT", patient_position: str | None = None
                    ) -> CtReference:
    """Write ``image`` as one CT Image Storage file per k slice (``CT_0001.dcm``, ...).

    Every slice is built before the first file is written, and files already written are removed
    when a later one fails, so an error leaves no partial series behind.

    :param image: CT in HU on any orthonormal grid (mm, LPS).
    :param ctx: patient, study and frame of reference shared with the other objects of the case.
    :param folder: output folder, created if missing; existing ``CT_*.dcm`` files are overwritten.
    :param series_instance_uid: series UID; default derived from the study, frame of reference and
        image content, so writing the same image twice gives the same UIDs.
    :param series_number: DICOM SeriesNumber.
    :param sop_instance_uids: SOP instance UID of each slice (k order), e.g. the UIDs the series had
        when it was imported; default ``new_uid(series_instance_uid, k)``.
    :param series_description: DICOM SeriesDescription.
    :param patient_position: DICOM PatientPosition (``HFS``, ``FFS``, ...); default guessed from the
        grid direction (:func:`guess_patient_position`).
    :return: the series and slice UIDs, for the RTSTRUCT to reference.
    """
    folder = Path(folder)
    grid = image.grid
    nk, nj, ni = grid.shape
    if series_instance_uid is None:
        series_instance_uid = new_uid(ctx.study_instance_uid, ctx.frame_of_reference_uid, "CT",
                                      series_number, _content_hash(image))
    if sop_instance_uids is None:
        sop_instance_uids = [new_uid(series_instance_uid, k) for k in range(nk)]
    sop_instance_uids = [str(u) for u in sop_instance_uids]
    if len(sop_instance_uids) != nk or len(set(sop_instance_uids)) != nk:
        raise InvalidInputError(f"sop_instance_uids needs {nk} distinct UIDs (one per slice), "
                                f"got {len(sop_instance_uids)}")
    if patient_position is None:
        patient_position = guess_patient_position(grid.direction)
    pixels, slope, intercept = _rescale(np.asarray(image.array))
    row, col = grid.direction[:, 0], grid.direction[:, 1]
    normal = np.cross(row, col)
    iop = format_ds_list([*row, *col])
    window_center, window_width = 40, 400  # soft tissue: a sensible default display for viewers
    datasets = []
    for k in range(nk):
        pos = grid.index_to_lps(np.array([0.0, 0.0, float(k)]))
        ds = base_dataset(CT_IMAGE_STORAGE, "CT", ctx, series_instance_uid, series_number, series_description,
                          sop_instance_uids[k])
        # General Series: Laterality is empty because a CT covers both sides of paired organs.
        ds.Laterality = ""
        ds.PatientPosition = patient_position
        # General Image
        ds.InstanceNumber = k + 1
        ds.ContentDate = ds.InstanceCreationDate
        ds.ContentTime = ds.InstanceCreationTime
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.PatientOrientation = ""
        # Image Plane: IPP is the centre of the first transmitted pixel; SliceLocation is the position
        # along the normal, which is what readers sort by when they do not compute it themselves.
        ds.PixelSpacing = format_ds_list([grid.spacing_mm[1], grid.spacing_mm[0]])
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = format_ds_list(pos)
        ds.SliceThickness = format_ds(grid.spacing_mm[2])
        ds.SliceLocation = format_ds(float(pos @ normal))
        # CT Image
        ds.KVP = ""
        ds.AcquisitionNumber = 1
        ds.RescaleIntercept = format_ds(intercept)
        ds.RescaleSlope = format_ds(slope)
        ds.RescaleType = "HU"
        ds.WindowCenter = window_center
        ds.WindowWidth = window_width
        # Image Pixel: signed 16-bit so HU below zero need no intercept.
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = nj
        ds.Columns = ni
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(pixels[k]).astype("<i2").tobytes()
        datasets.append(ds)
    save_series(datasets, folder, "CT")
    return CtReference(series_instance_uid, sop_instance_uids, CT_IMAGE_STORAGE)
