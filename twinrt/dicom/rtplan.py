"""RT Plan import and export: :class:`twinrt.model.Plan` <-> one RTPLAN file.

The plan holds label, prescriptions (one DoseReferenceSequence item per target, with the target
named in DoseReferenceDescription because TwinRT does not know the RTSTRUCT ROI numbers here),
fraction groups, approval status and beams. A beam is either

* a :class:`twinrt.planning.plan.PlanBeam` (or its ``to_dict()`` form): a step-and-shoot IMRT
  beam with ASYMX/ASYMY jaws and an MLCX leaf bank, written as control-point pairs (below); or
* a dict (keys documented in :func:`write_rtplan`): a static open field, as before.

Step-and-shoot encoding (PS3.3 C.8.8.14.5): segment ``k`` is control points ``2k`` and ``2k+1``
with the same leaf positions and CumulativeMetersetWeight rising by the segment's share of the
beam meterset; between ``2k+1`` and ``2k+2`` the weight is constant (beam off) while the leaves
move. Leaf positions change, so they are given at every control point; jaws, angles and isocentre
do not, so they are given at control point 0 only. BeamType is ``STATIC``: PS3.3 defines STATIC as
"all Control Point Sequence attributes remain unchanged between consecutive pairs of control points
with changing Cumulative Meterset Weight", which is exactly step-and-shoot (DYNAMIC is for leaves
moving while the beam is on: sliding window, VMAT). Some planning systems label step-and-shoot
DYNAMIC; :func:`read_rtplan` accepts both.

Approval: ApprovalStatus is derived from the plan's review state (:func:`twinrt.model.approval_status`):
``APPROVED`` only for a plan a named person approved through :func:`twinrt.planning.approval.approve`,
``REJECTED`` for one a named person rejected, ``UNAPPROVED`` for drafts and proposals (every AI plan).
APPROVED and REJECTED carry ReviewerName, ReviewDate and ReviewTime (local time, like the other
dates of the file); :func:`read_rtplan` gives them back as ``state``, ``reviewer_name`` and
``review_datetime`` (UTC ISO 8601).
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from twinrt.dicom.common import (RT_PLAN_STORAGE, RT_STRUCTURE_SET_STORAGE, DicomContext, base_dataset, new_uid,
                                 read_dicom_object, save_dataset)
from twinrt.dicom.ct import format_ds, format_ds_list
from twinrt.errors import DicomImportError, InvalidInputError, reading
from twinrt.model import Plan, Prescription, approval_status
from twinrt.planning.beams import Beam
from twinrt.planning.plan import PlanBeam, is_plan_beam_dict
from twinrt.planning.sequencing import ALGORITHM_CITATION, Segment

log = logging.getLogger(__name__)

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
        A :class:`~twinrt.planning.plan.PlanBeam` (or its ``to_dict()``) is written as a
        step-and-shoot IMRT beam, its BeamMeterset the MU per fraction. Any other beam is a dict
        of a static open field with optional keys ``name``, ``gantry_angle_deg``,
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
    if str(plan.approval).upper() not in APPROVAL_STATUSES:
        raise InvalidInputError(f"Plan approval '{plan.approval}' must be one of {', '.join(APPROVAL_STATUSES)}")
    # The status written is derived from the review state, never taken from ``plan.approval``
    # alone: APPROVED needs state "approved" and a named human reviewer (twinrt.planning.approval).
    approval = approval_status(plan)
    if str(plan.approval).upper() != approval:
        log.warning("Plan '%s': approval %s does not match its review state '%s'; writing %s", plan.label,
                    plan.approval, plan.state, approval)
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
    plan_beams = [PlanBeam.from_dict(b) if is_plan_beam_dict(b) else b for b in plan.beams]
    beams, metersets = [], []
    for n, b in enumerate(plan_beams, start=1):
        if isinstance(b, PlanBeam):
            beams.append(_imrt_beam_dataset(b, n, plan.radiation_type))
            metersets.append(b.meterset_mu)
        else:
            beams.append(_beam_dataset(b, n, plan.radiation_type))
            metersets.append(float({**BEAM_DEFAULTS, **b}["meterset_mu"]))
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
    # Approval (PS3.3 C.8.8.16): ReviewDate, ReviewTime (1C) and ReviewerName (2C) are required
    # for APPROVED and REJECTED, and absent for UNAPPROVED.
    ds.ApprovalStatus = approval
    if approval != "UNAPPROVED":
        reviewed = _review_local_time(plan.review_datetime)
        ds.ReviewDate = reviewed.strftime("%Y%m%d")
        ds.ReviewTime = reviewed.strftime("%H%M%S")
        ds.ReviewerName = _person_name(plan.reviewer_name)
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


def _beam_header(number: int, name: str, machine: str, sad_mm: float, radiation_type: str,
                 devices: list[tuple[str, int, list[float] | None]], n_control_points: int) -> Dataset:
    """The BeamSequence item without control points.

    :param devices: (RTBeamLimitingDeviceType, NumberOfLeafJawPairs, LeafPositionBoundaries or None).
    """
    ds = Dataset()
    ds.BeamNumber = number
    ds.BeamName = name[:64]
    ds.BeamType = "STATIC"
    ds.RadiationType = radiation_type.upper()
    ds.TreatmentMachineName = machine[:16]
    ds.PrimaryDosimeterUnit = "MU"
    ds.SourceAxisDistance = format_ds(sad_mm)
    ds.TreatmentDeliveryType = "TREATMENT"
    items = []
    for kind, pairs, boundaries in devices:
        d = Dataset()
        d.RTBeamLimitingDeviceType = kind
        d.NumberOfLeafJawPairs = pairs
        if boundaries is not None:
            d.LeafPositionBoundaries = format_ds_list(boundaries)
        items.append(d)
    ds.BeamLimitingDeviceSequence = items
    ds.NumberOfWedges = 0
    ds.NumberOfCompensators = 0
    ds.NumberOfBoli = 0
    ds.NumberOfBlocks = 0
    ds.FinalCumulativeMetersetWeight = "1"
    ds.NumberOfControlPoints = n_control_points
    return ds


def _device_positions(positions: list[tuple[str, list[float]]]) -> list[Dataset]:
    """BeamLimitingDevicePositionSequence items from (device type, positions in mm)."""
    items = []
    for kind, values in positions:
        p = Dataset()
        p.RTBeamLimitingDeviceType = kind
        p.LeafJawPositions = format_ds_list(values)
        items.append(p)
    return items


def _first_control_point(energy_mv: float, positions: list[tuple[str, list[float]]], gantry_deg: float,
                         collimator_deg: float, couch_deg: float, isocenter_mm: Any) -> Dataset:
    """Control point 0: every parameter of the beam (later control points list only what changes)."""
    cp0 = Dataset()
    cp0.ControlPointIndex = 0
    cp0.NominalBeamEnergy = format_ds(energy_mv)
    cp0.BeamLimitingDevicePositionSequence = _device_positions(positions)
    cp0.GantryAngle = format_ds(float(gantry_deg) % 360)
    cp0.GantryRotationDirection = "NONE"
    cp0.BeamLimitingDeviceAngle = format_ds(float(collimator_deg) % 360)
    cp0.BeamLimitingDeviceRotationDirection = "NONE"
    cp0.PatientSupportAngle = format_ds(float(couch_deg) % 360)
    cp0.PatientSupportRotationDirection = "NONE"
    cp0.TableTopEccentricAngle = "0"
    cp0.TableTopEccentricRotationDirection = "NONE"
    cp0.TableTopVerticalPosition = ""
    cp0.TableTopLongitudinalPosition = ""
    cp0.TableTopLateralPosition = ""
    cp0.IsocenterPosition = format_ds_list(isocenter_mm)
    cp0.CumulativeMetersetWeight = "0"
    return cp0


def _beam_dataset(beam: dict[str, Any], number: int, radiation_type: str) -> Dataset:
    """A static open field (two control points) from a beam dict."""
    b = {**BEAM_DEFAULTS, **beam}
    x1, x2, y1, y2 = (float(v) for v in b["jaws_mm"])
    jaws_only = [("ASYMX", 1, None), ("ASYMY", 1, None)]
    ds = _beam_header(number, str(b.get("name", f"Beam {number}")), str(b["machine"]),
                      float(b["source_axis_distance_mm"]), radiation_type, jaws_only, 2)
    cp0 = _first_control_point(b["energy_mv"], [("ASYMX", [x1, x2]), ("ASYMY", [y1, y2])], b["gantry_angle_deg"],
                               b["collimator_angle_deg"], b["couch_angle_deg"], b["isocenter_mm"])
    cp1 = Dataset()
    cp1.ControlPointIndex = 1
    cp1.CumulativeMetersetWeight = "1"
    ds.ControlPointSequence = [cp0, cp1]
    return ds


def _imrt_beam_dataset(beam: PlanBeam, number: int, radiation_type: str) -> Dataset:
    """A step-and-shoot beam: fixed jaws, an MLCX bank, two control points per segment."""
    total = beam.meterset_mu
    if not beam.segments or not total > 0:
        raise InvalidInputError(f"Beam '{beam.name}' has no segments with MU; leave it out of the plan or "
                                "sequence it again")
    bounds = list(beam.leaf_boundaries_mm)
    n_pairs = len(bounds) - 1
    x1, x2, y1, y2 = beam.jaws_mm
    ds = _beam_header(number, beam.name, beam.machine, beam.beam.sad_mm, radiation_type,
                      [("ASYMX", 1, None), ("ASYMY", 1, None), ("MLCX", n_pairs, bounds)], 2 * len(beam.segments))
    ds.BeamDescription = (f"Step-and-shoot IMRT, {len(beam.segments)} segments; leaf sequencing after "
                          f"{ALGORITHM_CITATION}")[:1024]
    # Cumulative weights as fractions of the beam meterset; the last is exactly 1 so that no
    # rounding leaves a sliver of MU undelivered.
    cumulative = [float(v) for v in np.cumsum([s.mu for s in beam.segments]) / total]
    cumulative[-1] = 1.0
    points = []
    for k, seg in enumerate(beam.segments):
        leaves = [*seg.left_mm, *seg.right_mm]
        for end in (0, 1):
            index = 2 * k + end
            weight = cumulative[k] if end else (cumulative[k - 1] if k else 0.0)
            if index == 0:
                cp = _first_control_point(beam.beam.energy_mv, [("ASYMX", [x1, x2]), ("ASYMY", [y1, y2]),
                                                                 ("MLCX", leaves)],
                                          beam.beam.gantry_deg, 0.0, beam.beam.couch_deg, beam.beam.isocenter_mm)
                cp.DoseRateSet = format_ds(beam.dose_rate_mu_per_min)
            else:
                cp = Dataset()
                cp.ControlPointIndex = index
                # Leaves change between segments, so PS3.3 C.8.8.14.5 wants them at every point.
                cp.BeamLimitingDevicePositionSequence = _device_positions([("MLCX", leaves)])
            cp.CumulativeMetersetWeight = format_ds(weight)
            points.append(cp)
    ds.ControlPointSequence = points
    return ds


@reading("DICOM RTPLAN file")
def read_rtplan(path: str | Path) -> Plan:
    """Read an RTPLAN file into a :class:`Plan` (label, prescriptions, approval, beams).

    A beam with an MLCX bank whose leaves stand still while the meterset rises (step-and-shoot)
    becomes a :class:`~twinrt.planning.plan.PlanBeam`: gantry, couch, isocentre, SAD, energy,
    leaf boundaries, each segment's leaf positions and MU (its share of the cumulative meterset
    weight times BeamMeterset); its jaws are not kept (they follow from the segments) and its
    bixel width is the :class:`~twinrt.planning.beams.Beam` default. Any other beam (open field,
    sliding window, arc, collimator not at 0) is read as a dict from its first control point.

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
    beams: list[Any] = []
    for b in ds.get("BeamSequence", []):
        plan_beam = _plan_beam(b, meterset)
        beams.append(plan_beam if plan_beam is not None else _beam_dict(b, meterset))
    radiation = str(ds.BeamSequence[0].get("RadiationType", "PHOTON")) if beams else "PHOTON"
    # ``approval`` follows from the review fields (Plan.__post_init__).
    return Plan(label=str(ds.get("RTPlanLabel", "") or path.stem), prescriptions=prescriptions, beams=beams,
                radiation_type=radiation, **_review_fields(ds))


def _review_local_time(iso: str) -> _dt.datetime:
    """Local wall-clock time of an ISO 8601 review time (now when empty or unreadable).

    Other dates in the file (InstanceCreationDate, RTPlanDate) are local time without an offset,
    so the review time is written the same way.
    """
    try:
        when = _dt.datetime.fromisoformat(iso.replace("Z", "+00:00")) if iso else None
    except ValueError:
        log.warning("Review time '%s' is not ISO 8601; writing the current time", iso)
        when = None
    if when is None:
        return _dt.datetime.now()
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.astimezone().replace(tzinfo=None)


def _person_name(name: str) -> str:
    """A reviewer name as DICOM PN: backslashes removed (value delimiter), at most 64 characters."""
    return name.strip().replace("\\", " ")[:64]


def _review_fields(ds: Dataset) -> dict[str, str]:
    """Plan review fields from the Approval module of ``ds`` (state, reviewer, UTC ISO time)."""
    approval = str(ds.get("ApprovalStatus", "UNAPPROVED") or "UNAPPROVED").upper()
    reviewer = str(ds.get("ReviewerName", "") or "").strip()
    if approval == "UNAPPROVED":
        return {"state": "draft"}
    if not reviewer:
        # APPROVED or REJECTED by nobody named: TwinRT cannot trust that, so the plan awaits review.
        log.warning("RTPLAN says %s without a ReviewerName; reading it as a proposed plan", approval)
        return {"state": "proposed"}
    when = ""
    date, time = str(ds.get("ReviewDate", "") or ""), str(ds.get("ReviewTime", "") or "")
    if date:
        try:
            local = _dt.datetime.strptime(date + (time.split(".")[0] or "000000").ljust(6, "0")[:6], "%Y%m%d%H%M%S")
            when = local.astimezone(_dt.timezone.utc).isoformat().replace("+00:00", "Z")
        except ValueError:
            log.warning("ReviewDate/ReviewTime '%s %s' unreadable; review time left empty", date, time)
    return {"state": "approved" if approval == "APPROVED" else "rejected", "reviewer_name": reviewer,
            "review_datetime": when}


def _num(ds: Dataset, keyword: str, default: float | None = None) -> float | None:
    """A numeric attribute of ``ds``, ``default`` when absent or empty."""
    value = ds.get(keyword)
    return default if value in (None, "") else float(value)


def _plan_beam(beam: Dataset, meterset: dict[int, float]) -> PlanBeam | None:
    """The step-and-shoot :class:`PlanBeam` of a BeamSequence item, or None when it is not one."""
    devices = {str(d.get("RTBeamLimitingDeviceType", "")): d for d in beam.get("BeamLimitingDeviceSequence", [])}
    points = list(beam.get("ControlPointSequence", []))
    mlc = devices.get("MLCX")
    name = str(beam.get("BeamName", "") or f"Beam {beam.get('BeamNumber', '')}")
    if mlc is None or not mlc.get("LeafPositionBoundaries") or len(points) < 2:
        return None
    cp0 = points[0]
    if abs(_num(cp0, "BeamLimitingDeviceAngle", 0.0) % 360) > 1e-6:
        log.info("Beam '%s': collimator not at 0; read as a plain beam", name)
        return None
    bounds = [float(v) for v in mlc.LeafPositionBoundaries]
    n_pairs = len(bounds) - 1
    # Segment MU = its share of the cumulative weight times BeamMeterset; planning systems use
    # either 1 or the beam MU as the final weight, so divide by whatever the file states.
    final = _num(beam, "FinalCumulativeMetersetWeight", 1.0) or 1.0
    mu_total = meterset.get(int(beam.BeamNumber), 0.0)
    # Walk the control points carrying forward what a point leaves out (PS3.3 C.8.8.14.5).
    leaves: list[float] | None = None
    weight = 0.0
    states = []
    for cp in points:
        for p in cp.get("BeamLimitingDevicePositionSequence", []):
            if p.RTBeamLimitingDeviceType == "MLCX":
                leaves = [float(v) for v in p.LeafJawPositions]
        for keyword in ("GantryAngle", "PatientSupportAngle"):
            if cp is not cp0 and keyword in cp and _num(cp, keyword) != _num(cp0, keyword):
                log.info("Beam '%s': %s changes between control points; read as a plain beam", name, keyword)
                return None
        weight = _num(cp, "CumulativeMetersetWeight", weight) or 0.0
        if leaves is None or len(leaves) != 2 * n_pairs:
            return None
        states.append((leaves, weight))
    segments = []
    for (start, w0), (stop, w1) in zip(states, states[1:]):
        if w1 <= w0:
            continue
        if not np.allclose(start, stop, atol=1e-6):
            log.info("Beam '%s': leaves move while the beam is on (dynamic MLC); read as a plain beam", name)
            return None
        segments.append(Segment(bounds, start[:n_pairs], start[n_pairs:], (w1 - w0) / final * mu_total))
    if not segments:
        return None
    # DICOM has no bixel width; the Beam default stands in (it only matters for re-sequencing).
    geometry = Beam(gantry_deg=_num(cp0, "GantryAngle", 0.0), couch_deg=_num(cp0, "PatientSupportAngle", 0.0),
                    isocenter_mm=tuple(float(v) for v in cp0.get("IsocenterPosition", [0.0, 0.0, 0.0])),
                    sad_mm=_num(beam, "SourceAxisDistance", 1000.0),
                    energy_mv=_num(cp0, "NominalBeamEnergy", 6.0))
    return PlanBeam(geometry, segments, name, str(beam.get("TreatmentMachineName", "") or "TwinRT"),
                    _num(cp0, "DoseRateSet", 600.0))


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

