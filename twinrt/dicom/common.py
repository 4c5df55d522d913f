"""Shared DICOM writing helpers: UIDs, the patient/study/series/equipment modules, atomic save.

Every object TwinRT writes (CT, RTSTRUCT, RTDOSE, RTPLAN) starts from :func:`base_dataset`, so the
patient, study and frame of reference are consistent across a case and all files pass ``dciodvfy``.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

import twinrt
from twinrt.errors import DicomImportError, MissingInputError
from twinrt.io_utils import atomic_path

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"

MANUFACTURER = "TwinRT"


def new_uid(*entropy: Any) -> str:
    """A new DICOM UID; deterministic when ``entropy`` values are given (same inputs, same UID)."""
    if entropy:
        return generate_uid(entropy_srcs=[str(e) for e in entropy])
    return generate_uid()


def _dicom_name(name: str) -> str:
    # PN components are separated by '^'; keep it within 64 characters.
    return str(name)[:64]


@dataclass
class DicomContext:
    """Patient, study and frame-of-reference identity shared by all files of one case.

    :param patient_id: DICOM PatientID.
    :param patient_name: DICOM PatientName (``Family^Given``).
    :param study_instance_uid: StudyInstanceUID shared by all series.
    :param frame_of_reference_uid: FrameOfReferenceUID shared by CT, RTSTRUCT, RTDOSE, RTPLAN.
    """

    patient_id: str
    patient_name: str = "Anonymous"
    study_instance_uid: str = field(default_factory=new_uid)
    frame_of_reference_uid: str = field(default_factory=new_uid)
    study_id: str = "1"
    study_description: str = "TwinRT"
    study_date: str = field(default_factory=lambda: _dt.date.today().strftime("%Y%m%d"))
    study_time: str = field(default_factory=lambda: _dt.datetime.now().strftime("%H%M%S"))
    patient_birth_date: str = ""
    patient_sex: str = "O"

    @classmethod
    def from_case(cls, case: "twinrt.model.Case") -> "DicomContext":
        """The context stored in ``case.metadata`` (keys as produced by the importers), or a new one.

        UIDs missing from the metadata are derived deterministically from the patient id, so that
        exporting the same case twice gives the same study and frame of reference.
        """
        m = case.metadata
        return cls(
            patient_id=case.patient_id,
            patient_name=str(m.get("patient_name", case.patient_id)),
            study_instance_uid=m.get("study_instance_uid") or new_uid(case.patient_id, "study"),
            frame_of_reference_uid=m.get("frame_of_reference_uid") or new_uid(case.patient_id, "for"),
            study_id=str(m.get("study_id", "1")),
            study_description=str(m.get("study_description", "TwinRT")),
            study_date=str(m.get("study_date", _dt.date.today().strftime("%Y%m%d"))),
            study_time=str(m.get("study_time", "000000")),
            patient_birth_date=str(m.get("patient_birth_date", "")),
            patient_sex=str(m.get("patient_sex", "O")),
        )

    def to_metadata(self) -> dict[str, str]:
        """The fields as ``case.metadata`` keys (what :meth:`from_case` reads)."""
        return {"patient_name": self.patient_name, "study_instance_uid": self.study_instance_uid,
                "frame_of_reference_uid": self.frame_of_reference_uid, "study_id": self.study_id,
                "study_description": self.study_description, "study_date": self.study_date,
                "study_time": self.study_time, "patient_birth_date": self.patient_birth_date,
                "patient_sex": self.patient_sex}


def base_dataset(sop_class_uid: str, modality: str, ctx: DicomContext, series_instance_uid: str,
                 series_number: int, series_description: str, sop_instance_uid: str | None = None,
                 frame_of_reference: bool = True) -> FileDataset:
    """A dataset with file meta, SOP Common, Patient, General Study, General Series, Frame of
    Reference and General Equipment modules filled in.

    :param sop_class_uid: storage SOP class (one of the ``*_STORAGE`` constants).
    :param modality: ``CT``, ``RTSTRUCT``, ``RTDOSE`` or ``RTPLAN``.
    :param frame_of_reference: include the Frame of Reference module. Every TwinRT object does:
        dciodvfy requires it for RTSTRUCT too, beside ReferencedFrameOfReferenceSequence.
    """
    sop_instance_uid = sop_instance_uid or new_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"TWINRT_{twinrt.__version__}"[:16]
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    now = _dt.datetime.now()
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    # Patient
    ds.PatientName = _dicom_name(ctx.patient_name)
    ds.PatientID = ctx.patient_id[:64]
    ds.PatientBirthDate = ctx.patient_birth_date
    ds.PatientSex = ctx.patient_sex
    # General Study
    ds.StudyInstanceUID = ctx.study_instance_uid
    ds.StudyDate = ctx.study_date
    ds.StudyTime = ctx.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = ctx.study_id
    ds.AccessionNumber = ""
    ds.StudyDescription = ctx.study_description[:64]
    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description[:64]
    ds.SeriesDate = now.strftime("%Y%m%d")
    ds.SeriesTime = now.strftime("%H%M%S")
    ds.OperatorsName = ""
    if frame_of_reference:
        ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "TwinRT"
    ds.SoftwareVersions = twinrt.__version__
    ds.InstitutionName = ""
    return ds


def save_dataset(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    return path


@dataclass
class CtReference:
    """What an RTSTRUCT must reference of its CT series.

    :param series_instance_uid: the CT SeriesInstanceUID.
    :param sop_instance_uids: SOPInstanceUID of each CT slice, in k order (index k of the image).
    :param sop_class_uid: SOP class of the slices (CT Image Storage).
    """

    series_instance_uid: str
    sop_instance_uids: list[str]
    sop_class_uid: str = CT_IMAGE_STORAGE


def read_header(path: Path) -> Dataset | None:
    """The DICOM header of ``path`` without pixel data, or ``None`` when it is not a DICOM file.

    :raises DicomImportError: the file looks like DICOM (Part 10 preamble) but cannot be parsed.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        # No 'DICM' marker and not parseable: a README, thumbnail, DICOMDIR index... ignored.
        return None
    except Exception as exc:  # truncated or corrupt file: pydicom raises many types here
        if _has_dicm_marker(path):
            raise DicomImportError(f"DICOM file {path} cannot be read ({exc}); re-export or remove it",
                                   path) from exc
        return None


def _has_dicm_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def read_dicom_object(path: str | Path, modality: str, role: str) -> Dataset:
    """Read one DICOM file that must be of ``modality`` (pixel data included).

    :param path: the file.
    :param modality: required DICOM Modality, e.g. ``"RTDOSE"``.
    :param role: what the user should choose instead, for messages, e.g. ``"the dose file"``.
    :raises MissingInputError: the file does not exist.
    :raises DicomImportError: not DICOM, unreadable, or another modality; names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{modality} file {path} does not exist; check the path", path)
    header = read_header(path)
    if header is None or str(header.get("Modality", "")) != modality:
        what = "not DICOM" if header is None else f"modality {header.get('Modality', '?')}"
        raise DicomImportError(f"{path} is not an {modality} file ({what}); choose {role}", path)
    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # corrupt pixel data after a readable header
        raise DicomImportError(f"DICOM file {path} cannot be read ({exc}); re-export it", path) from exc
