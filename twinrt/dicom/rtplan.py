"""RT Plan import and export: :class:`twinrt.model.Plan` <-> one RTPLAN file.

The plan is a *skeleton*: label, prescriptions (one DoseReferenceSequence item per target, with
the target named in DoseReferenceDescription because TwinRT does not know the RTSTRUCT ROI
numbers here), fraction groups and approval status. Beams are written as static open fields when
``plan.beams`` has any (dict keys documented in :func:`write_rtplan`); AIPlanner will replace this
with its beam model. AI plans are always written ``UNAPPROVED``: a person must review them in a
treatment planning system.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from twinrt.dicom.common import (RT_PLAN_STORAGE, RT_STRUCTURE_SET_STORAGE, DicomContext, base_dataset, new_uid,
                                 read_dicom_object, save_dataset)
from twinrt.dicom.ct import format_ds, format_ds_list
from twinrt.errors import DicomImportError, InvalidInputError
from twinrt.model import Plan, Prescription

APPROVAL_STATUSES = ("APPROVED", "UNAPPROVED", "REJECTED")

#: Defaults of a static beam written from a ``plan.beams`` dict.
BEAM_DEFAULTS: dict[str, Any] = {"gantry_angle_deg": 0.0, "collimator_angle_deg": 0.0, "couch_angle_deg": 0.0,
                                 "isocenter_mm": (0.0, 0.0, 0.0), "energy_mv": 6.0, "meterset_mu": 100.0,
                                 "jaws_mm": (-50.0, 50.0, -50.0, 50.0), "machine": "TwinRT",
                                 "source_axis_distance_mm": 1000.0}


def write_rtplan(plan: Plan, ctx: DicomContext, path: str | Path, structure_set_sop_uid: str | None = None,
                 series_instance_uid: str | None = None, series_number: int = 1,
                 sop_instance_uid: str | None = None, description: str = "") -> str:
    """Write ``plan`` as an RTPLAN file.

    :param plan: label (at most 16 characters are kept), prescriptions in Gy, approval, beams.
        Each beam is a dict with optional keys ``name``, ``gantry_angle_deg``,
        ``collimator_angle_deg``, ``couch_angle_deg``, ``isocenter_mm`` (LPS, mm), ``energy_mv``,
        ``meterset_mu``, ``jaws_mm`` (X1, X2, Y1, Y2 in mm at the isocentre), ``machine``,
        ``source_axis_distance_mm`` (defaults in :data:`BEAM_DEFAULTS`).
    :param ctx: patient, study and frame of reference of the case.
    :param path: output file; written atomically.
    :param structure_set_sop_uid: the RTSTRUCT the plan is based on. With it the plan geometry is
        ``PATIENT``; without it ``TREATMENT_DEVICE`` (DICOM requires a structure set reference for
        ``PATIENT``).
    :param series_instance_uid: series UID; default derived from the SOP instance UID.
    :param sop_instance_uid: SOP instance UID; default a new random UID.
    :param description: RTPlanDescription; default says the plan is a research, unapproved skeleton.
    :return: the SOPInstanceUID written.
    """
    approval = plan.approval.upper()
    if approval not in APPROVAL_STATUSES:
        raise InvalidInputError(f"Plan approval '{plan.approval}' must be one of {', '.join(APPROVAL_STATUSES)}")
    if not plan.label.strip():
        raise InvalidInputError("The plan needs a non-empty label (DICOM RTPlanLabel)")
    sop_instance_uid = sop_instance_uid or new_uid()
    series_instance_uid = series_instance_uid or new_uid(sop_instance_uid, "series")
    ds = base_dataset(RT_PLAN_STORAGE, "RTPLAN", ctx, series_instance_uid, series_number,
                      f"TwinRT plan {plan.label}"[:64], sop_instance_uid)
    # RT General Plan
    ds.RTPlanLabel = plan.label[:16]
    ds.RTPlanName = plan.label[:64]
    ds.RTPlanDescription = description or ("TwinRT plan (research use only, not for clinical decisions); "
                                           f"approval {approval}")
    ds.RTPlanDate = ds.InstanceCreationDate
    ds.RTPlanTime = ds.InstanceCreationTime
    ds.PlanIntent = "RESEARCH"
    if structure_set_sop_uid:
        ds.RTPlanGeometry = "PATIENT"
        ref = Dataset()
        ref.ReferencedSOPClassUID = RT_STRUCTURE_SET_STORAGE
        ref.ReferencedSOPInstanceUID = structure_set_sop_uid
        ds.ReferencedStructureSetSequence = [ref]
    else:
        ds.RTPlanGeometry = "TREATMENT_DEVICE"
    # RT Prescription: targets by name (SITE), prescribed dose in Gy.
    dose_refs = []
    for n, p in enumerate(plan.prescriptions, start=1):
        item = Dataset()
        item.DoseReferenceNumber = n
        item.DoseReferenceUID = new_uid(sop_instance_uid, "doseref", n)
        item.DoseReferenceStructureType = "SITE"
        item.DoseReferenceDescription = p.target[:64]
        item.DoseReferenceType = "TARGET"
        item.TargetPrescriptionDose = format_ds(p.dose_gy)
        dose_refs.append(item)
    if dose_refs:
        ds.DoseReferenceSequence = dose_refs
    beams = [_beam_dataset(b, n, plan.radiation_type) for n, b in enumerate(plan.beams, start=1)]
    metersets = [float({**BEAM_DEFAULTS, **b}["meterset_mu"]) for b in plan.beams]
    if beams:
        ds.BeamSequence = beams
        # Patient Setup: required by the RT Beams module to say how the patient lies.
        setup = Dataset()
        setup.PatientSetupNumber = 1
        setup.PatientPosition = "HFS"
        ds.PatientSetupSequence = [setup]
        for b in beams:
            b.ReferencedPatientSetupNumber = 1
    ds.FractionGroupSequence = _fraction_groups(plan, beams, metersets)
    # Approval: AI plans stay UNAPPROVED; review details are only required for APPROVED/REJECTED.
    ds.ApprovalStatus = approval
    if approval != "UNAPPROVED":
        now = _dt.datetime.now()
        ds.ReviewDate = now.strftime("%Y%m%d")
        ds.ReviewTime = now.strftime("%H%M%S")
        ds.ReviewerName = ""
    save_dataset(ds, path)
    return sop_instance_uid


def _fraction_groups(plan: Plan, beams: list[Dataset], metersets: list[float]) -> list[Dataset]:
    """One fraction group per distinct number of fractions, referencing its prescriptions.

    Prescriptions with different fraction numbers (e.g. a sequential boost) cannot share a group,
    and keeping them apart lets :func:`read_rtplan` restore each prescription's fractions.
    """
    by_fractions: dict[int, list[int]] = {}
    for n, p in enumerate(plan.prescriptions, start=1):
        by_fractions.setdefault(p.fractions, []).append(n)
    if not by_fractions:
        by_fractions[plan.fractions] = []
    groups = []
    for g, (fractions, refs) in enumerate(sorted(by_fractions.items()), start=1):
        fg = Dataset()
        fg.FractionGroupNumber = g
        fg.NumberOfFractionsPlanned = fractions
        # Beams belong to the first group; a skeleton plan has no per-group beam split.
        group_beams = beams if g == 1 else []
        fg.NumberOfBeams = len(group_beams)
        fg.NumberOfBrachyApplicationSetups = 0
        if group_beams:
            items = []
            for b, mu in zip(group_beams, metersets):
                rb = Dataset()
                rb.ReferencedBeamNumber = b.BeamNumber
                rb.BeamMeterset = format_ds(mu)
                items.append(rb)
            fg.ReferencedBeamSequence = items
        if refs:
            items = []
            for n in refs:
                rd = Dataset()
                rd.ReferencedDoseReferenceNumber = n
                items.append(rd)
            fg.ReferencedDoseReferenceSequence = items
        groups.append(fg)
    return groups


def _beam_dataset(beam: dict[str, Any], number: int, radiation_type: str) -> Dataset:
    """A static open field (two control points) from a beam dict."""
    b = {**BEAM_DEFAULTS, **beam}
    x1, x2, y1, y2 = (float(v) for v in b["jaws_mm"])
    ds = Dataset()
    ds.BeamNumber = number
    ds.BeamName = str(b.get("name", f"Beam {number}"))[:64]
    ds.BeamType = "STATIC"
    ds.RadiationType = radiation_type.upper()
    ds.TreatmentMachineName = str(b["machine"])[:16]
    ds.PrimaryDosimeterUnit = "MU"
    ds.SourceAxisDistance = format_ds(b["source_axis_distance_mm"])
    ds.TreatmentDeliveryType = "TREATMENT"
    devices = []
    for kind in ("ASYMX", "ASYMY"):
        d = Dataset()
        d.RTBeamLimitingDeviceType = kind
        d.NumberOfLeafJawPairs = 1
        devices.append(d)
    ds.BeamLimitingDeviceSequence = devices
    ds.NumberOfWedges = 0
    ds.NumberOfCompensators = 0
    ds.NumberOfBoli = 0
    ds.NumberOfBlocks = 0
    ds.FinalCumulativeMetersetWeight = "1"
    ds.NumberOfControlPoints = 2
    cp0 = Dataset()
    cp0.ControlPointIndex = 0
    cp0.NominalBeamEnergy = format_ds(b["energy_mv"])
    positions = []
    for kind, pair in (("ASYMX", (x1, x2)), ("ASYMY", (y1, y2))):
        p = Dataset()
        p.RTBeamLimitingDeviceType = kind
        p.LeafJawPositions = format_ds_list(pair)
        positions.append(p)
    cp0.BeamLimitingDevicePositionSequence = positions
    cp0.GantryAngle = format_ds(float(b["gantry_angle_deg"]) % 360)
    cp0.GantryRotationDirection = "NONE"
    cp0.BeamLimitingDeviceAngle = format_ds(float(b["collimator_angle_deg"]) % 360)
    cp0.BeamLimitingDeviceRotationDirection = "NONE"
    cp0.PatientSupportAngle = format_ds(float(b["couch_angle_deg"]) % 360)
    cp0.PatientSupportRotationDirection = "NONE"
    cp0.TableTopEccentricAngle = "0"
    cp0.TableTopEccentricRotationDirection = "NONE"
    cp0.TableTopVerticalPosition = ""
    cp0.TableTopLongitudinalPosition = ""
    cp0.TableTopLateralPosition = ""
    cp0.IsocenterPosition = format_ds_list(b["isocenter_mm"])
    cp0.CumulativeMetersetWeight = "0"
    cp1 = Dataset()
    cp1.ControlPointIndex = 1
    cp1.CumulativeMetersetWeight = "1"
    ds.ControlPointSequence = [cp0, cp1]
    return ds


def read_rtplan(path: str | Path) -> Plan:
    """Read an RTPLAN file into a :class:`Plan` (label, prescriptions, approval, static beams).

    A prescription is read from each TARGET DoseReferenceSequence item that has a
    TargetPrescriptionDose; its fractions come from the fraction group that references it (else
    the first fraction group).

    :param path: the RTPLAN file.
    :raises MissingInputError: the file does not exist.
    :raises DicomImportError: the file is not an RTPLAN; the message names the file.
    """
    path = Path(path)
    ds = read_dicom_object(path, "RTPLAN", "the plan file")
    groups = list(ds.get("FractionGroupSequence", []))
    default_fractions = int(groups[0].get("NumberOfFractionsPlanned", 1) or 1) if groups else 1
    fractions_of: dict[int, int] = {}
    for fg in groups:
        for rd in fg.get("ReferencedDoseReferenceSequence", []):
            fractions_of[int(rd.ReferencedDoseReferenceNumber)] = int(fg.get("NumberOfFractionsPlanned", 1) or 1)
    prescriptions = []
    for item in ds.get("DoseReferenceSequence", []):
        dose = item.get("TargetPrescriptionDose")
        if str(item.get("DoseReferenceType", "")) != "TARGET" or dose in (None, ""):
            continue
        number = int(item.get("DoseReferenceNumber", 0) or 0)
        target = str(item.get("DoseReferenceDescription", "") or f"Target {number}")
        try:
            prescriptions.append(Prescription(target, float(dose), fractions_of.get(number, default_fractions)))
        except InvalidInputError as exc:
            raise DicomImportError(f"{path}: {exc}", path) from exc
    meterset = {}
    if groups:
        for rb in groups[0].get("ReferencedBeamSequence", []):
            meterset[int(rb.ReferencedBeamNumber)] = float(rb.get("BeamMeterset", 0) or 0)
    beams = [_beam_dict(b, meterset) for b in ds.get("BeamSequence", [])]
    radiation = str(ds.BeamSequence[0].get("RadiationType", "PHOTON")) if beams else "PHOTON"
    return Plan(label=str(ds.get("RTPlanLabel", "") or path.stem), prescriptions=prescriptions, beams=beams,
                approval=str(ds.get("ApprovalStatus", "UNAPPROVED") or "UNAPPROVED"), radiation_type=radiation)


def _beam_dict(beam: Dataset, meterset: dict[int, float]) -> dict[str, Any]:
    """The beam dict of :func:`write_rtplan` from a BeamSequence item (first control point)."""
    cp0 = beam.ControlPointSequence[0] if beam.get("ControlPointSequence") else Dataset()
    out: dict[str, Any] = {"name": str(beam.get("BeamName", "")),
                           "machine": str(beam.get("TreatmentMachineName", ""))}

    def num(ds: Dataset, keyword: str) -> float | None:
        value = ds.get(keyword)
        return None if value in (None, "") else float(value)

    for key, keyword in (("gantry_angle_deg", "GantryAngle"), ("collimator_angle_deg", "BeamLimitingDeviceAngle"),
                         ("couch_angle_deg", "PatientSupportAngle"), ("energy_mv", "NominalBeamEnergy")):
        value = num(cp0, keyword)
        if value is not None:
            out[key] = value
    if cp0.get("IsocenterPosition"):
        out["isocenter_mm"] = tuple(float(v) for v in cp0.IsocenterPosition)
    jaws = {p.RTBeamLimitingDeviceType: [float(v) for v in p.LeafJawPositions]
            for p in cp0.get("BeamLimitingDevicePositionSequence", [])
            if p.RTBeamLimitingDeviceType in ("ASYMX", "ASYMY", "X", "Y")}
    x = jaws.get("ASYMX") or jaws.get("X")
    y = jaws.get("ASYMY") or jaws.get("Y")
    if x and y:
        out["jaws_mm"] = (x[0], x[1], y[0], y[1])
    if beam.get("SourceAxisDistance") not in (None, ""):
        out["source_axis_distance_mm"] = float(beam.SourceAxisDistance)
    if int(beam.BeamNumber) in meterset:
        out["meterset_mu"] = meterset[int(beam.BeamNumber)]
    return out

