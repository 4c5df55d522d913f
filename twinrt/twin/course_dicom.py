"""A treatment course to and from DICOM: one folder for the plan, one per fraction.

Layout (what :func:`export_course` writes and :func:`import_course` reads)::

    course/
      plan/          CT series + RTSTRUCT + RTPLAN + RTDOSE (the planned dose)
      fraction_001/  the day's CT (or CBCT) series + RTSTRUCT (optional) + RTDOSE (optional, the
      fraction_002/  dose delivered that day, DoseSummationType FRACTION) + PET series (optional,
      ...            a PET of that day in the CT's frame of reference, e.g. an interim PET/CT;
                     read as SUVbw by :func:`twinrt.dicom.pet.read_pet_series`)

Each fraction folder is its own DICOM study of the same patient (StudyDate = the fraction's date,
StudyDescription ``"TwinRT fraction <n> of <N>"``). On import a folder is a fraction when its
StudyDescription names a fraction number (``fraction 7``, ``Fx 7``) or, failing that, by its study
date and time order; the one folder without a fraction number that holds an RTPLAN or the planned
dose is the plan. Folder names do not matter. A fraction folder of another patient or frame of
reference is still imported: the twin refuses it with the reason (:class:`~twinrt.twin.twin.FractionRefusedError`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional

from twinrt.errors import DicomImportError, InvalidInputError, MissingInputError
from twinrt.io_utils import atomic_dir
from twinrt.model import Case
from twinrt.twin.timeline import CaseTimeline, Fraction, parse_date, pet_mismatch

_FRACTION_RE = re.compile(r"\b(?:fraction|fx)\s*#?\s*(\d+)", re.IGNORECASE)


def _fraction_case(timeline: CaseTimeline, fraction: Fraction) -> Case:
    from twinrt.dicom.common import new_uid

    plan_meta = timeline.planning.metadata
    meta = {
        "patient_name": plan_meta.get("patient_name", timeline.patient_id),
        "frame_of_reference_uid": fraction.frame_of_reference_uid or plan_meta.get("frame_of_reference_uid", ""),
        "study_instance_uid": new_uid(timeline.patient_id, "fraction", fraction.number, fraction.date),
        "study_id": str(fraction.number),
        "study_description": f"TwinRT fraction {fraction.number} of {timeline.n_fractions}",
        "study_date": parse_date(fraction.date).strftime("%Y%m%d"),
        "study_time": "080000",
        "patient_birth_date": plan_meta.get("patient_birth_date", ""),
        "patient_sex": plan_meta.get("patient_sex", "O"),
        "prescriptions": list(timeline.planning.prescriptions),
    }
    doses = {}
    if fraction.dose is not None:
        d = fraction.dose
        doses["fraction"] = type(d)(d.array, d.grid, "fraction", d.dose_type, "FRACTION", d.source)
    return Case(fraction.patient_id or timeline.patient_id, fraction.image, list(fraction.structures), doses, [], meta)


def export_course(timeline: CaseTimeline, folder: str | Path, fractions: Optional[Iterable[Fraction]] = None) -> Path:
    """Write the plan and the fractions as DICOM (``plan/``, ``fraction_NNN/``), all or nothing.

    :param timeline: the course (its planning case and planned dose, and its fractions).
    :param fractions: the fractions to write (default: those in the timeline), e.g. simulated ones.
    :param folder: a new or empty folder, or a course folder written before (replaced).
    :return: ``folder``.
    """
    from twinrt.dicom.folder import export_case

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / "plan").is_dir():
        raise InvalidInputError(f"{folder} exists and is not a course folder; choose a new or empty folder")
    fractions = list(timeline.fractions if fractions is None else fractions)
    with atomic_dir(folder) as tmp:
        export_case(timeline.planning, tmp / "plan")
        for f in fractions:
            case = _fraction_case(timeline, f)
            export_case(case, tmp / f"fraction_{f.number:03d}")
            if f.pet is not None:
                from twinrt.dicom.common import DicomContext
                from twinrt.dicom.pet import write_pet_series

                # the context export_case used (it stores its UIDs in the case's metadata)
                write_pet_series(f.pet, DicomContext.from_case(case), tmp / f"fraction_{f.number:03d}")
    return folder


def import_course(folder: str | Path, n_fractions: Optional[int] = None, planned_dose: Optional[str] = None,
                  tumour: str = "GTV", start_date: Optional[str] = None) -> tuple[CaseTimeline, list[Fraction]]:
    """Read a course folder: the planning timeline (no fraction taken yet) and the fractions in order.

    Feed the fractions to :meth:`twinrt.twin.twin.DigitalTwin.add_fraction` one by one: it checks
    each (patient, frame of reference, order) and refuses those it cannot take.

    :param n_fractions: fractions in the course (default: the plan's prescription).
    :param planned_dose: the plan folder's dose to use (default: its only dose).
    :param start_date: course start (default: the first fraction's date).
    :raises MissingInputError: no such folder, or no plan folder.
    :raises DicomImportError: several candidate plan folders, a fraction number used twice, or an
        unreadable folder (named).
    """
    from twinrt.dicom.folder import import_case
    from twinrt.dicom.pet import has_pet_series, read_pet_series

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"Course folder {folder} does not exist; check the path", folder)
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    plans: list[tuple[Path, Case]] = []
    days: list[tuple[Optional[int], str, Path, Case]] = []
    for sub in subfolders:
        case = import_case(sub)
        m = _FRACTION_RE.search(str(case.metadata.get("study_description", "")))
        if m:
            days.append((int(m.group(1)), str(case.metadata.get("study_date", "")), sub, case))
        elif case.plans or (case.doses and not any(d.summation == "FRACTION" for d in case.doses.values())):
            plans.append((sub, case))
        else:
            days.append((None, str(case.metadata.get("study_date", "")) + str(case.metadata.get("study_time", "")),
                         sub, case))
    if not plans:
        raise MissingInputError(f"No plan folder in {folder} (a folder with the planning CT and its RTPLAN or "
                                "planned RTDOSE)", folder)
    if len(plans) > 1:
        raise DicomImportError(f"Several plan folders in {folder}: {', '.join(p.name for p, _ in plans)}; keep one",
                               plans[1][0])
    plan_folder, planning = plans[0]
    if planned_dose is None:
        if len(planning.doses) != 1:
            raise DicomImportError(f"The plan folder {plan_folder} has {len(planning.doses)} doses "
                                   f"({', '.join(planning.doses) or 'none'}); name the planned one", plan_folder)
        planned_dose = next(iter(planning.doses))
    numbered = [d for d in days if d[0] is not None]
    if len({d[0] for d in numbered}) != len(numbered):
        dup = sorted(d[0] for d in numbered if sum(e[0] == d[0] for e in numbered) > 1)[0]
        raise DicomImportError(f"Fraction {dup} appears in two folders of {folder}; keep one", folder)
    unnumbered = sorted((d for d in days if d[0] is None), key=lambda d: d[1])
    taken = {d[0] for d in numbered}
    n = 1
    for d in unnumbered:
        while n in taken:
            n += 1
        numbered.append((n, d[1], d[2], d[3]))
        taken.add(n)
    numbered.sort(key=lambda d: d[0])
    fractions = []
    for number, _, sub, case in numbered:
        date = str(case.metadata.get("study_date", ""))[:8]
        try:
            iso = parse_date(date).isoformat()
        except InvalidInputError as exc:
            raise DicomImportError(f"{sub} has no valid StudyDate ({date!r}); the fraction's date is needed",
                                   sub) from exc
        dose = next(iter(case.doses.values()), None)
        frame = str(case.metadata.get("frame_of_reference_uid", ""))
        pet = None
        if has_pet_series(sub):
            pet, pet_ctx = read_pet_series(sub)
            problem = pet_mismatch(pet_ctx.patient_id, pet_ctx.frame_of_reference_uid, case.patient_id, frame)
            if problem:
                raise DicomImportError(f"The PET in {sub} does not belong to that day's CT: {problem}; register it "
                                       "to that CT first or remove it", sub)
        fractions.append(Fraction(number, iso, case.ct, case.structures, dose, case.patient_id, frame,
                                  {"source": "DICOM", "dicom_folder": str(sub)}, pet))
    if n_fractions is None:
        rx = planning.prescriptions
        if not rx:
            raise DicomImportError(f"The plan in {plan_folder} has no prescription (number of fractions); "
                                   "give the number of fractions", plan_folder)
        n_fractions = max(p.fractions for p in rx)
    start = start_date or (fractions[0].date if fractions else parse_date(str(planning.metadata.get("study_date", "")
                                                                              )).isoformat())
    timeline = CaseTimeline(planning, planned_dose, n_fractions, start, tumour,
                            metadata={"source": "DICOM", "course_folder": str(folder)})
    return timeline, fractions
