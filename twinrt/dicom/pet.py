"""PET series import and export: a folder of PET Image Storage slices <-> an SUV :class:`twinrt.model.Image`.

The reader returns **SUV normalised by body weight** (SUVbw, g/ml), the unit the toxicity features of
the day's PET are computed in (:mod:`twinrt.toxicity.features`). The conversion follows the DICOM PET
Image module (PS3.3 C.8.9.4) and the QIBA FDG-PET/CT profile's vendor-neutral SUV pseudo-code:

* ``Units`` ``BQML`` (Bq/ml after rescale): ``SUVbw = A · W / D_t``, with ``A`` the activity
  concentration (Bq/ml), ``W`` the ``PatientWeight`` in g (kg × 1000; tissue density 1 g/ml) and
  ``D_t`` the injected activity ``RadionuclideTotalDose`` (Bq) decayed to the time the image values
  refer to: ``D_t = D · 2^(−Δt / T½)`` with ``T½`` = ``RadionuclideHalfLife`` (s) and
  ``Δt`` = ``SeriesDate/SeriesTime`` − ``RadiopharmaceuticalStartDateTime`` (or the start time on the
  series date) when ``DecayCorrection`` is ``START``; ``Δt = 0`` when it is ``ADMIN`` (values already
  decay-corrected to the administration time);
* ``Units`` ``GML``: the values already are SUVbw;
* anything else (``CNTS``, ``DecayCorrection`` ``NONE``, ``CorrectedImage`` without ``ATTN``, a
  missing or implausible weight, a missing dose, half-life or injection time) is refused with a
  :class:`twinrt.errors.DicomImportError` naming the file and the tag: an SUV from guessed values is
  worse than none.

The scan time is the earlier of ``SeriesTime`` and ``AcquisitionTime`` (QIBA: some scanners rewrite
the series time). A folder with an attenuation-corrected and an uncorrected series gives the corrected
one. Slices share the CT reader's geometry checks (one orientation, uniform spacing, no gantry tilt: see
:mod:`twinrt.dicom.ct`); PET slices often carry a slope per slice, which is applied slice by slice.
The writer (:func:`write_pet_series`) stores SUV as Bq/ml (``BQML``, ``START``) with the radiopharmaceutical
data needed to convert back, one file per slice (``PT_0001.dcm``, ...).
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Optional

import numpy as np
from pydicom.dataset import Dataset

from twinrt.dicom.common import DicomContext, base_dataset, new_uid
from twinrt.dicom.ct import (_content_hash, _grid_from_slices, _read_rescaled, _select_series, _sorted_slices, save_series,
                             format_ds, format_ds_list, list_dicom_files)
from twinrt.errors import DicomImportError, InvalidInputError, MissingInputError, reading
from twinrt.model import Image

PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
#: Plausible patient weights (kg); anything outside is a unit error (g, lb) or a dummy value such as 0 or 999.
MIN_WEIGHT_KG, MAX_WEIGHT_KG = 1.0, 500.0
#: Half-life of fluorine-18 (s), for the writer's default radiopharmaceutical (FDG).
F18_HALF_LIFE_S = 6586.2


def has_pet_series(folder: str | Path) -> bool:
    """Whether ``folder`` holds at least one PET Image Storage file (not searched recursively)."""
    folder = Path(folder)
    return folder.is_dir() and any(str(ds.get("SOPClassUID", "")) == PET_IMAGE_STORAGE
                                   for _, ds in list_dicom_files(folder))


def _datetime(date: str, time: str, path: Path, what: str) -> _dt.datetime:
    date, time = str(date).strip(), str(time).strip()
    try:
        day = _dt.datetime.strptime(date[:8], "%Y%m%d")
        hh, mm, ss = int(time[0:2]), int(time[2:4] or 0), float(time[4:] or 0)
    except (ValueError, IndexError) as exc:
        raise DicomImportError(f"{path}: {what} date/time '{date} {time}' cannot be read (DICOM DA YYYYMMDD and "
                               "TM HHMMSS expected)", path) from exc
    return day + _dt.timedelta(hours=hh, minutes=mm, seconds=ss)


def _corrections(ds: Dataset) -> list[str]:
    value = ds.get("CorrectedImage", None)
    values = [value] if isinstance(value, str) else list(value or [])
    return [str(v).strip().upper() for v in values]


def suv_factor(ds: Dataset, path: Path) -> float:
    """Factor taking the rescaled pixel values of one PET slice to SUVbw (see the module docstring).

    :raises DicomImportError: the values cannot be converted to SUV without guessing (names the tag).
    """
    units = str(ds.get("Units", "")).strip().upper()
    if units == "GML":
        return 1.0
    if units != "BQML":
        raise DicomImportError(f"{path} has PET Units '{units or 'missing'}'; TwinRT converts BQML (Bq/ml) or GML "
                               "(SUVbw) to SUV: export the series in Bq/ml from the scanner", path)
    corrected = _corrections(ds)
    if "ATTN" not in corrected:
        raise DicomImportError(f"{path} is not marked attenuation-corrected (CorrectedImage {corrected or 'missing'}); "
                               "SUV needs the attenuation-corrected reconstruction (CorrectedImage with ATTN)", path)
    decay = str(ds.get("DecayCorrection", "")).strip().upper()
    if decay not in ("START", "ADMIN"):
        raise DicomImportError(f"{path} has DecayCorrection '{decay or 'missing'}'; TwinRT needs START or ADMIN "
                               "(images decay-corrected to a known time)", path)
    weight = ds.get("PatientWeight", None)
    if weight in (None, "") or not math.isfinite(float(weight)) or float(weight) <= 0:
        raise DicomImportError(f"{path} has no PatientWeight (0010,1030); SUVbw needs the patient's weight in kg: "
                               "add it to the series", path)
    if not MIN_WEIGHT_KG <= float(weight) <= MAX_WEIGHT_KG:
        raise DicomImportError(f"{path} has PatientWeight {float(weight):g} kg, outside {MIN_WEIGHT_KG:g}–"
                               f"{MAX_WEIGHT_KG:g} kg: check the unit (kg, not g or lb)", path)
    seq = ds.get("RadiopharmaceuticalInformationSequence", None)
    if not seq:
        raise DicomImportError(f"{path} has no RadiopharmaceuticalInformationSequence (0054,0016); the injected "
                               "activity and time are needed for SUV", path)
    rp = seq[0]
    dose, half_life = rp.get("RadionuclideTotalDose", None), rp.get("RadionuclideHalfLife", None)
    if dose in (None, "") or not (math.isfinite(float(dose)) and float(dose) > 0):
        raise DicomImportError(f"{path} has no RadionuclideTotalDose (0018,1074): the injected activity in Bq", path)
    if half_life in (None, "") or not (math.isfinite(float(half_life)) and float(half_life) > 0):
        raise DicomImportError(f"{path} has no RadionuclideHalfLife (0018,1075) in s", path)
    delta_s = 0.0
    if decay == "START":
        start_dt = str(rp.get("RadiopharmaceuticalStartDateTime", "") or "").strip()
        series_date = str(ds.get("SeriesDate", "") or ds.get("StudyDate", ""))
        if start_dt:
            injected = _datetime(start_dt[:8], start_dt[8:14], path, "RadiopharmaceuticalStartDateTime")
        elif str(rp.get("RadiopharmaceuticalStartTime", "") or "").strip():
            injected = _datetime(series_date, str(rp.RadiopharmaceuticalStartTime), path, "RadiopharmaceuticalStartTime")
        else:
            raise DicomImportError(f"{path} has no RadiopharmaceuticalStartDateTime/StartTime (0018,1078/1072): the "
                                   "injection time is needed to decay-correct the injected activity", path)
        scan = _datetime(series_date, str(ds.get("SeriesTime", "")), path, "Series")
        if str(ds.get("AcquisitionTime", "") or "").strip():
            # QIBA: the earlier of series and acquisition time (some scanners rewrite SeriesTime).
            acquired = _datetime(str(ds.get("AcquisitionDate", "") or series_date), str(ds.AcquisitionTime), path,
                                 "Acquisition")
            scan = min(scan, acquired)
        delta_s = (scan - injected).total_seconds()
        if not rp.get("RadiopharmaceuticalStartDateTime", None) and delta_s < 0:
            delta_s += 86400.0  # injection before midnight, scan after
        if not 0 <= delta_s <= 24 * 3600:
            raise DicomImportError(f"{path}: the scan starts {delta_s / 3600:.1f} h after the injection; check "
                                   "SeriesTime and the radiopharmaceutical start time", path)
    decayed_bq = float(dose) * 2.0 ** (-delta_s / float(half_life))
    return float(weight) * 1000.0 / decayed_bq


@reading("DICOM PET series")
def read_pet_series(folder: str | Path, series_instance_uid: Optional[str] = None) -> tuple[Image, DicomContext]:
    """Read a PET series from a folder of single-slice PET Image Storage files, as SUVbw.

    :param folder: folder holding the slices (other modalities in it are ignored).
    :param series_instance_uid: which series when the folder holds several PET series.
    :return: the SUVbw image (float32, modality ``"PT"``) on its own grid (mm, LPS) and the context
        (patient, study, frame of reference) of its first slice.
    :raises MissingInputError: no folder or no PET slice; :class:`DicomImportError`: geometry the grid
        cannot represent, or values that cannot be converted to SUV (see :func:`suv_factor`).
    """
    from twinrt.dicom.ct import context_from_dataset

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"PET folder {folder} does not exist; check the path", folder)
    pts = [(p, ds) for p, ds in list_dicom_files(folder) if str(ds.get("SOPClassUID", "")) == PET_IMAGE_STORAGE]
    if not pts:
        raise MissingInputError(f"No PET Image Storage file in folder {folder}", folder)
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in pts}
    if series_instance_uid is None and len(series) > 1:
        # An export often holds the attenuation-corrected series and the uncorrected one: take the former
        # (a series is corrected when every one of its slices says ATTN).
        corrected = [uid for uid in series
                     if all("ATTN" in _corrections(ds) for _, ds in pts if str(ds.get("SeriesInstanceUID", "")) == uid)]
        if len(corrected) == 1:
            series_instance_uid = corrected[0]
    pts = _select_series(pts, folder, series_instance_uid, "PET")
    slices = _sorted_slices(pts)
    grid = _grid_from_slices(slices)
    values = _read_rescaled(slices, grid).astype(np.float64)
    for k, s in enumerate(slices):
        values[k] *= suv_factor(s.ds, s.path)
    if not np.all(np.isfinite(values)):
        raise DicomImportError(f"PET series in {folder} has non-finite values after conversion to SUV", folder)
    return Image(values.astype(np.float32), grid, "PT"), context_from_dataset(slices[0].ds)


def write_pet_series(image: Image, ctx: DicomContext, folder: str | Path, weight_kg: float = 75.0,
                     injected_mbq: float = 350.0, uptake_s: float = 3600.0, half_life_s: float = F18_HALF_LIFE_S,
                     series_number: int = 2, series_description: str = "TwinRT PET (SUVbw)",
                     series_instance_uid: Optional[str] = None) -> Path:
    """Write an SUVbw image as a PET series in Bq/ml (``BQML``, decay-corrected to the series ``START``).

    The activity concentration is ``SUV · D_t / W`` with the injected activity ``injected_mbq``
    decayed over ``uptake_s`` (injection ``uptake_s`` before the series time); each slice has its own
    rescale slope (int16 pixels). Every file is built before the first is written; an error removes
    those already written.

    :param image: SUVbw (g/ml), finite and ≥ 0, on any orthonormal grid (mm, LPS).
    :param ctx: patient, study and frame of reference (those of the CT it was acquired with).
    :param weight_kg: patient weight (kg); ``injected_mbq``: injected activity (MBq).
    :return: ``folder``.
    """
    arr = np.asarray(image.array, dtype=np.float64)  # finite: an Image refuses NaN and infinities
    if arr.size and arr.min() < 0:
        raise InvalidInputError("A PET image must be non-negative (SUV) to be written")
    if not (weight_kg > 0 and injected_mbq > 0 and uptake_s >= 0 and half_life_s > 0):
        raise InvalidInputError("weight_kg, injected_mbq and half_life_s must be positive, uptake_s ≥ 0")
    folder = Path(folder)
    grid = image.grid
    nk, nj, ni = grid.shape
    if series_instance_uid is None:
        series_instance_uid = new_uid(ctx.study_instance_uid, ctx.frame_of_reference_uid, "PT", series_number,
                                      _content_hash(image))
    injected_bq = injected_mbq * 1e6
    bq_per_suv = injected_bq * 2.0 ** (-uptake_s / half_life_s) / (weight_kg * 1000.0)
    bqml = arr * bq_per_suv
    series_dt = _dt.datetime.strptime((ctx.study_date or "20000101")[:8] + "120000", "%Y%m%d%H%M%S")
    injection_dt = series_dt - _dt.timedelta(seconds=uptake_s)
    row, col = grid.direction[:, 0], grid.direction[:, 1]
    normal = np.cross(row, col)
    datasets = []
    for k in range(nk):
        top = float(bqml[k].max()) if bqml[k].size else 0.0
        slope = top / 32767.0 if top > 0 else 1.0
        pixels = np.clip(np.round(bqml[k] / slope), 0, 32767).astype("<i2")
        pos = grid.index_to_lps(np.array([0.0, 0.0, float(k)]))
        ds = base_dataset(PET_IMAGE_STORAGE, "PT", ctx, series_instance_uid, series_number, series_description,
                          new_uid(series_instance_uid, k))
        ds.SeriesDate, ds.SeriesTime = series_dt.strftime("%Y%m%d"), series_dt.strftime("%H%M%S")
        ds.AcquisitionDate, ds.AcquisitionTime = ds.SeriesDate, ds.SeriesTime
        ds.ContentDate, ds.ContentTime = ds.SeriesDate, ds.SeriesTime
        ds.PatientWeight = format_ds(weight_kg)
        ds.Laterality = ""  # type 2C: present (empty) as for TwinRT's CT
        # PET Series
        ds.Units = "BQML"
        ds.CountsSource = "EMISSION"
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.CorrectedImage = ["ATTN", "DECY"]
        ds.DecayCorrection = "START"
        ds.RandomsCorrectionMethod = "NONE"
        ds.CollimatorType = "NONE"
        # NM/PET Patient Orientation (type 2: present, empty)
        ds.PatientOrientationCodeSequence = []
        ds.PatientGantryRelationshipCodeSequence = []
        ds.NumberOfSlices = nk
        # PET Isotope
        rp = Dataset()
        rp.Radiopharmaceutical = "Fluorodeoxyglucose"
        rp.RadiopharmaceuticalStartTime = injection_dt.strftime("%H%M%S")
        rp.RadiopharmaceuticalStartDateTime = injection_dt.strftime("%Y%m%d%H%M%S")
        rp.RadionuclideTotalDose = format_ds(injected_bq)
        rp.RadionuclideHalfLife = format_ds(half_life_s)
        rp.RadionuclidePositronFraction = "0.9673"
        nuclide = Dataset()
        nuclide.CodeValue, nuclide.CodingSchemeDesignator, nuclide.CodeMeaning = "77004003", "SCT", "^18^Fluorine"
        rp.RadionuclideCodeSequence = [nuclide]
        ds.RadiopharmaceuticalInformationSequence = [rp]
        # PET Image
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.ImageIndex = k + 1
        ds.InstanceNumber = k + 1
        ds.FrameReferenceTime = "0"
        ds.ActualFrameDuration = 600000
        ds.DecayFactor = "1"
        ds.PatientOrientation = ""
        ds.PixelSpacing = format_ds_list([grid.spacing_mm[1], grid.spacing_mm[0]])
        ds.ImageOrientationPatient = format_ds_list([*row, *col])
        ds.ImagePositionPatient = format_ds_list(pos)
        ds.SliceThickness = format_ds(grid.spacing_mm[2])
        ds.SliceLocation = format_ds(float(pos @ normal))
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = format_ds(slope)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = nj, ni
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        datasets.append(ds)
    save_series(datasets, folder, "PT")
    return folder


__all__ = ["PET_IMAGE_STORAGE", "F18_HALF_LIFE_S", "has_pet_series", "suv_factor", "read_pet_series",
           "write_pet_series"]
