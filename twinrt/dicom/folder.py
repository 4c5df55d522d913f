"""A whole patient as one DICOM folder: CT series, RTSTRUCT, RTDOSE(s) and RTPLAN(s).

:func:`export_case` writes every object of a :class:`twinrt.model.Case` into a temporary sibling
folder and renames it into place only when all files are written, so a failure leaves either the
previous folder or nothing. :func:`import_case` finds the objects in a folder by Modality.

File names: ``CT_0001.dcm`` ... (one per slice, k order), ``RTSTRUCT.dcm``,
``RTDOSE_<dose name>.dcm`` and ``RTPLAN_<n>_<label>.dcm``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom

from twinrt.dicom.common import DicomContext, new_uid
from twinrt.dicom.ct import list_dicom_files, read_ct_series, write_ct_series
from twinrt.dicom.rtdose import read_rtdose, write_rtdose
from twinrt.dicom.rtplan import read_rtplan, write_rtplan
from twinrt.errors import DicomImportError, InvalidInputError, MissingInputError, reading
from twinrt.io_utils import atomic_dir
from twinrt.model import Case, Dose, Plan

log = logging.getLogger(__name__)

#: What :func:`export_case` writes by default.
ALL_OBJECTS = ("ct", "rtstruct", "rtdose", "rtplan")
#: The case's audit log (JSON lines, hash-chained; see :mod:`twinrt.audit`) beside the DICOM files.
AUDIT_FILE = "AUDIT.jsonl"

# Series numbers keep the objects in a predictable order in PACS and Slicer's DICOM browser.
_SERIES_CT, _SERIES_RTSTRUCT, _SERIES_RTPLAN, _SERIES_RTDOSE = 1, 2, 3, 10


def _safe_name(text: str) -> str:
    """``text`` reduced to characters that are safe in file names on every OS."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "unnamed"


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
    return h.hexdigest()[:32]


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace a folder that does not look like a DICOM export.

    :func:`atomic_dir` replaces the whole folder; exporting to e.g. a home folder by mistake must
    not delete it. A folder is replaceable when it is empty or holds only files, at least one of
    them ``*.dcm``.
    """
    if not folder.exists():
        return
    if not folder.is_dir():
        raise InvalidInputError(f"Export target {folder} is a file; choose a folder")
    entries = list(folder.iterdir())
    if not entries:
        return
    if any(e.is_dir() for e in entries) or not any(e.suffix.lower() == ".dcm" for e in entries):
        raise InvalidInputError(f"Export folder {folder} already exists and does not look like a DICOM export "
                                "(it has subfolders or no .dcm files); its content would be replaced: choose a "
                                "new or empty folder")


def export_case(case: Case, folder: str | Path, include: Iterable[str] = ALL_OBJECTS) -> dict[str, list[Path]]:
    """Write ``case`` as DICOM into ``folder`` (replaced as a whole, atomically).

    Doses reference the first plan written (DICOM requires a plan reference for DoseSummationType
    PLAN). A case with doses but no plan gets an RTPLAN skeleton (its prescriptions, no beams,
    UNAPPROVED) so that its RTDOSE files are valid; when ``rtplan`` is not included, doses are
    written without a reference.
    The UIDs used are stored in ``case.metadata`` (:meth:`DicomContext.to_metadata` keys plus
    ``series_instance_uid``, ``ct_sop_instance_uids``, ``rtstruct_sop_instance_uid``,
    ``rtdose_sop_instance_uids`` and ``rtplan_sop_instance_uids``), so a second export gives the same
    study, frame of reference and CT UIDs.

    :param case: the patient; its CT is always needed (RTSTRUCT references it).
    :param folder: output folder; an existing DICOM export folder is replaced, any other existing
        non-empty folder is refused.
    :param include: objects to write, any of ``"ct"``, ``"rtstruct"``, ``"rtdose"``, ``"rtplan"``.
    :return: the written files (final paths) per object kind.
    :raises InvalidInputError: unknown ``include`` entry or an unsafe target folder; nothing is written.
    """
    include = tuple(include)
    unknown = [x for x in include if x not in ALL_OBJECTS]
    if unknown:
        raise InvalidInputError(f"Unknown DICOM object kinds {unknown}; choose from {', '.join(ALL_OBJECTS)}")
    folder = Path(folder)
    _check_replaceable(folder)
    ctx = DicomContext.from_case(case)
    meta = case.metadata
    ct_series_uid = meta.get("series_instance_uid") or new_uid(ctx.study_instance_uid, "CT",
                                                               _digest(case.ct.array, case.ct.grid.origin_mm))
    ct_uids = meta.get("ct_sop_instance_uids")
    if not ct_uids or len(ct_uids) != case.ct.grid.shape[0]:
        ct_uids = None  # the CT changed size since import: its old slice UIDs no longer apply
    out: dict[str, list[Path]] = {k: [] for k in include}
    new_meta: dict[str, object] = {}
    with atomic_dir(folder) as tmp:
        # The CT is always built (the RTSTRUCT needs its UIDs); it is only kept when asked for.
        ct_ref = write_ct_series(case.ct, ctx, tmp, ct_series_uid, _SERIES_CT, sop_instance_uids=ct_uids)
        if "ct" in include:
            out["ct"] = sorted(tmp.glob("CT_*.dcm"))
        else:
            for p in tmp.glob("CT_*.dcm"):
                p.unlink()
        new_meta["series_instance_uid"] = ct_ref.series_instance_uid
        new_meta["ct_sop_instance_uids"] = list(ct_ref.sop_instance_uids)
        structure_set_uid = None
        if "rtstruct" in include and case.structures:
            from twinrt.dicom.rtstruct import write_rtstruct

            path = tmp / "RTSTRUCT.dcm"
            written = write_rtstruct(case.structures, ct_ref, ctx, path)
            structure_set_uid = written if isinstance(written, str) else str(
                pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            out["rtstruct"] = [path]
            new_meta["rtstruct_sop_instance_uid"] = structure_set_uid
        plan_uids: list[str] = []
        plans = list(case.plans)
        if not plans and case.doses and "rtdose" in include:
            plans = [Plan("TwinRT", list(case.prescriptions))]
        if "rtplan" in include:
            for n, plan in enumerate(plans, start=1):
                path = tmp / f"RTPLAN_{n}_{_safe_name(plan.label)}.dcm"
                uid = new_uid(ctx.study_instance_uid, "RTPLAN", n, _digest(plan, structure_set_uid))
                plan_uids.append(write_rtplan(plan, ctx, path, structure_set_uid, series_number=_SERIES_RTPLAN,
                                              sop_instance_uid=uid, series_instance_uid=new_uid(uid, "series")))
                out["rtplan"].append(path)
            new_meta["rtplan_sop_instance_uids"] = plan_uids
        if "rtdose" in include:
            dose_uids: dict[str, str] = {}
            used: set[str] = set()
            for n, (key, dose) in enumerate(case.doses.items()):
                name = _safe_name(key)
                while name.lower() in used:  # two keys that differ only in unsafe characters
                    name += "_"
                used.add(name.lower())
                path = tmp / f"RTDOSE_{name}.dcm"
                named = dose if dose.name == key else Dose(dose.array, dose.grid, key, dose.dose_type,
                                                           dose.summation, dose.source)
                uid = new_uid(ctx.study_instance_uid, "RTDOSE", key, _digest(dose.array, dose.grid.origin_mm),
                              plan_uids[:1])
                dose_uids[key] = write_rtdose(named, ctx, path, plan_uids[0] if plan_uids else None,
                                              series_instance_uid=new_uid(uid, "series"),
                                              series_number=_SERIES_RTDOSE + n, sop_instance_uid=uid)
                out["rtdose"].append(path)
            new_meta["rtdose_sop_instance_uids"] = dose_uids
        if case.metadata.get("audit_log"):
            from twinrt.audit import AuditLog

            # The audit log travels with the DICOM export (it has no DICOM home): AUDIT.jsonl.
            AuditLog(list(case.metadata["audit_log"])).save(tmp / AUDIT_FILE)
            out.setdefault("audit", []).append(tmp / AUDIT_FILE)
    # Report final paths (the temporary folder has been renamed onto ``folder``).
    result = {k: [folder / p.name for p in v] for k, v in out.items()}
    case.metadata.update(ctx.to_metadata())
    case.metadata.update(new_meta)
    return result


@reading("DICOM patient folder")
def import_case(folder: str | Path) -> Case:
    """Read a patient folder: one CT series plus optional RTSTRUCT, RTDOSE(s) and RTPLAN(s).

    Files are recognised by Modality; non-DICOM files are ignored. Every object must belong to the
    CT's patient, and doses to its frame of reference.

    :param folder: the folder (not searched recursively).
    :return: the case; doses are keyed by their name (DoseComment, else series description, else file
        name), made unique with ``_2``, ``_3`` suffixes.
    :raises MissingInputError: the folder does not exist or has no CT.
    :raises DicomImportError: mixed series, several RTSTRUCTs, an object of another patient or frame
        of reference, an RTSTRUCT drawn on another CT series, or any unreadable file; names the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"DICOM folder {folder} does not exist; check the path", folder)
    headers = list_dicom_files(folder)
    image, ct_ref, ctx = read_ct_series(folder)
    by_modality: dict[str, list[Path]] = {}
    for path, ds in headers:
        modality = str(ds.get("Modality", ""))
        if modality != "CT" and str(ds.get("PatientID", "")) != ctx.patient_id:
            raise DicomImportError(f"{path} belongs to patient '{ds.get('PatientID', '')}' but the CT to "
                                   f"'{ctx.patient_id}'; keep one patient per folder", path)
        by_modality.setdefault(modality, []).append(path)
    structures = []
    rtstructs = by_modality.get("RTSTRUCT", [])
    if len(rtstructs) > 1:
        raise DicomImportError(f"Folder {folder} has {len(rtstructs)} RTSTRUCT files "
                               f"({', '.join(p.name for p in rtstructs)}); keep the one to use and move the others",
                               rtstructs[1])
    if rtstructs:
        from twinrt.dicom.rtstruct import read_rtstruct

        structures = read_rtstruct(rtstructs[0], image, ct_ref)
    doses: dict[str, Dose] = {}
    dose_headers = {p: ds for p, ds in headers if p in set(by_modality.get("RTDOSE", []))}
    for path, ds in dose_headers.items():
        frame = str(ds.get("FrameOfReferenceUID", ""))
        if frame and frame != ctx.frame_of_reference_uid:
            raise DicomImportError(f"{path} uses frame of reference {frame} but the CT uses "
                                   f"{ctx.frame_of_reference_uid}: the dose is not registered to this CT; "
                                   "register it first or remove it from the folder", path)
        dose = read_rtdose(path)
        name, n = dose.name, 2
        while name in doses:
            name, n = f"{dose.name}_{n}", n + 1
        dose.name = name
        doses[name] = dose
    plans: list[Plan] = [read_rtplan(p) for p in by_modality.get("RTPLAN", [])]
    metadata: dict[str, object] = {**ctx.to_metadata(), "series_instance_uid": ct_ref.series_instance_uid,
                                   "ct_sop_instance_uids": list(ct_ref.sop_instance_uids), "source": "DICOM",
                                   "dicom_folder": str(folder)}
    prescriptions = next((p.prescriptions for p in plans if p.prescriptions), [])
    if prescriptions:
        metadata["prescriptions"] = list(prescriptions)
    if (folder / AUDIT_FILE).is_file():
        from twinrt.audit import AuditLog

        metadata["audit_log"] = AuditLog.load(folder / AUDIT_FILE).entries
    return Case(ctx.patient_id, image, structures, doses, plans, metadata)
