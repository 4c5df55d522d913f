"""Sequenced step-and-shoot plans as RTPLAN (and the RTDOSE that references them): content, dciodvfy, round trips."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pydicom
import pytest

from dicom_validate import dciodvfy_report
from twinrt.dicom import export_case, import_case
from twinrt.dicom.common import DicomContext
from twinrt.dicom.rtplan import read_rtplan, write_rtplan
from twinrt.errors import InvalidInputError
from twinrt.geometry import Grid
from twinrt.model import Case, Dose, Image, Plan, Prescription, Structure, StructureType
from twinrt.planning.beams import Beam, BeamRays
from twinrt.planning.plan import PlanBeam, sequence_plan

SS_UID = "1.2.826.0.1.3680043.8.498.78"
WIDTH = 5.0
ISO = (1.5, -20.0, 12.25)


@pytest.fixture
def ctx() -> DicomContext:
    return DicomContext("TWINRT-SEQ-1", "Phantom^Sequenced")


def hand_made_beams() -> tuple[list[BeamRays], np.ndarray]:
    """Three beams on a 9 x 7 lattice: uniform, a ramp along x, and a two-step block."""
    xs = (np.arange(9) - 4) * WIDTH
    zs = (np.arange(7) - 3) * WIDTH
    x, z = (a.ravel() for a in np.meshgrid(xs, zs, indexing="ij"))
    pos = np.stack([x, np.zeros_like(x), z], axis=1)
    beams = [BeamRays(Beam(g, couch, ISO, bixel_width_mm=WIDTH), pos) for g, couch in ((0.0, 0.0), (90.0, 0.0),
                                                                                        (270.0, 10.0))]
    uniform = np.full(x.size, 2.0)
    ramp = (x / WIDTH + 5) / 4.5  # 9 levels, max 2
    block = np.where(np.abs(z) <= 5, 2.0, 2.0 / 3) * (np.abs(x) <= 10)  # 9 and 3 levels
    return beams, np.concatenate([uniform, ramp, block])


def sequenced(**kw):
    beams, weights = hand_made_beams()
    rx = [Prescription("PTV60", 60.0, 30), Prescription("PTV54", 54.0, 30)]
    return sequence_plan(beams, weights, rx, mu_per_unit_weight=3000.0, label="IMRT test", levels=9,
                         names=["AP", "LL", "RL"], **kw)


def test_sequenced_plan_content():
    result = sequenced()
    plan = result.plan
    assert [len(b.segments) for b in plan.beams] == [1, 9, 2]
    # 3000 MU per unit weight over 30 fractions: weight 2 is 200 MU per fraction.
    assert plan.beams[0].meterset_mu == pytest.approx(200.0)
    assert plan.beams[1].meterset_mu == pytest.approx(200.0)  # 9 levels of 200/9 MU
    assert plan.beams[2].meterset_mu == pytest.approx(200.0)
    assert plan.beams[0].jaws_mm == (-22.5, 22.5, -17.5, 17.5)
    assert plan.beams[2].jaws_mm == (-12.5, 12.5, -17.5, 17.5)
    assert result.report["relative_fluence_error"] < 1e-12


def test_rtplan_step_and_shoot_structure(tmp_path, ctx):
    plan = sequenced().plan
    write_rtplan(plan, ctx, tmp_path / "rp.dcm", SS_UID)
    ds = pydicom.dcmread(tmp_path / "rp.dcm")
    assert ds.ApprovalStatus == "UNAPPROVED" and ds.RTPlanGeometry == "PATIENT"
    fg = ds.FractionGroupSequence[0]
    assert fg.NumberOfFractionsPlanned == 30 and fg.NumberOfBeams == 3
    assert [float(rb.BeamMeterset) for rb in fg.ReferencedBeamSequence] == pytest.approx([200.0] * 3)
    ramp = ds.BeamSequence[1]
    assert ramp.BeamType == "STATIC" and ramp.BeamName == "LL" and "Bortfeld" in ramp.BeamDescription
    devices = {d.RTBeamLimitingDeviceType: d for d in ramp.BeamLimitingDeviceSequence}
    assert set(devices) == {"ASYMX", "ASYMY", "MLCX"}
    assert devices["MLCX"].NumberOfLeafJawPairs == 7
    assert [float(v) for v in devices["MLCX"].LeafPositionBoundaries] == pytest.approx(np.arange(-17.5, 18, 5))
    cps = ramp.ControlPointSequence
    assert ramp.NumberOfControlPoints == len(cps) == 18
    weights = [float(cp.CumulativeMetersetWeight) for cp in cps]
    # Pairs: the weight rises within a segment and stands still between segments.
    assert weights[0] == 0 and weights[-1] == 1 and float(ramp.FinalCumulativeMetersetWeight) == 1
    assert all(weights[2 * k + 1] > weights[2 * k] for k in range(9))
    assert all(weights[2 * k + 2] == weights[2 * k + 1] for k in range(8))
    for k in range(9):
        a, b = (list(cps[i].BeamLimitingDevicePositionSequence[-1].LeafJawPositions) for i in (2 * k, 2 * k + 1))
        assert a == b and len(a) == 14
        assert float(a[0]) == pytest.approx(-22.5 + 5 * k)  # the trailing leaf steps one bixel per segment
    cp0 = cps[0]
    assert float(cp0.GantryAngle) == 90 and [float(v) for v in cp0.IsocenterPosition] == list(ISO)
    assert {p.RTBeamLimitingDeviceType for p in cp0.BeamLimitingDevicePositionSequence} == {"ASYMX", "ASYMY", "MLCX"}
    assert float(ds.BeamSequence[2].ControlPointSequence[0].PatientSupportAngle) == 10


@pytest.mark.parametrize("variant", ["patient", "treatment device", "with static beam", "min MU"])
def test_step_and_shoot_rtplan_passes_dciodvfy(tmp_path, ctx, variant):
    plan = (sequenced(min_segment_mu=30.0) if variant == "min MU" else sequenced()).plan
    if variant == "with static beam":
        plan.beams.append({"name": "open", "gantry_angle_deg": 180.0, "meterset_mu": 50.0})
    write_rtplan(plan, ctx, tmp_path / "rp.dcm", None if variant == "treatment device" else SS_UID)
    errors, warnings = dciodvfy_report(tmp_path / "rp.dcm")
    assert errors == [] and warnings == [], errors + warnings


def test_write_read_round_trip(tmp_path, ctx):
    plan = sequenced(min_segment_mu=5.0).plan
    plan.beams.append({"name": "open", "gantry_angle_deg": 180.0, "meterset_mu": 50.0})
    write_rtplan(plan, ctx, tmp_path / "rp.dcm", SS_UID)
    back = read_rtplan(tmp_path / "rp.dcm")
    assert back.label == "IMRT test" and back.approval == "UNAPPROVED" and back.prescriptions == plan.prescriptions
    assert isinstance(back.beams[3], dict) and back.beams[3]["gantry_angle_deg"] == 180.0
    for want, got in zip(plan.beams[:3], back.beams[:3]):
        assert isinstance(got, PlanBeam)
        assert (got.name, got.machine) == (want.name, want.machine)
        assert got.beam.gantry_deg == want.beam.gantry_deg and got.beam.couch_deg == want.beam.couch_deg
        assert got.beam.isocenter_mm == ISO and got.beam.sad_mm == 1000.0 and got.beam.energy_mv == 6.0
        assert got.dose_rate_mu_per_min == want.dose_rate_mu_per_min
        assert got.meterset_mu == pytest.approx(want.meterset_mu, rel=1e-12)
        assert len(got.segments) == len(want.segments)
        for a, b in zip(got.segments, want.segments):
            assert a.leaf_boundaries_mm == b.leaf_boundaries_mm
            assert a.left_mm == b.left_mm and a.right_mm == b.right_mm
            assert a.mu == pytest.approx(b.mu, rel=1e-12)
        assert got.jaws_mm == want.jaws_mm


def test_plan_beams_survive_json_as_dicts(tmp_path, ctx):
    # The Slicer scene stores plans as JSON (dataclasses.asdict); the writer takes that form too.
    plan = sequenced().plan
    data = json.loads(json.dumps(dataclasses.asdict(plan)))
    as_dicts = Plan(data["label"], [Prescription(**p) for p in data["prescriptions"]], data["beams"])
    assert PlanBeam.from_dict(data["beams"][1]).segments == plan.beams[1].segments
    write_rtplan(as_dicts, ctx, tmp_path / "a.dcm", SS_UID, sop_instance_uid="1.2.3.4")
    write_rtplan(plan, ctx, tmp_path / "b.dcm", SS_UID, sop_instance_uid="1.2.3.4")
    a, b = (pydicom.dcmread(tmp_path / n) for n in ("a.dcm", "b.dcm"))
    assert a.BeamSequence == b.BeamSequence and a.FractionGroupSequence == b.FractionGroupSequence


def test_beam_without_segments_is_refused(tmp_path, ctx):
    plan = Plan("empty", [Prescription("PTV", 2.0, 1)], [PlanBeam(Beam(0.0))])
    with pytest.raises(InvalidInputError, match="no segments"):
        write_rtplan(plan, ctx, tmp_path / "rp.dcm")
    assert list(tmp_path.iterdir()) == []


def test_dynamic_mlc_is_read_as_plain_beam(tmp_path, ctx):
    write_rtplan(sequenced().plan, ctx, tmp_path / "rp.dcm", SS_UID)
    ds = pydicom.dcmread(tmp_path / "rp.dcm")
    # Move the leaves of the ramp beam while the beam is on: that is sliding window, not step-and-shoot.
    cp1 = ds.BeamSequence[1].ControlPointSequence[1]
    leaves = [float(v) for v in cp1.BeamLimitingDevicePositionSequence[0].LeafJawPositions]
    cp1.BeamLimitingDevicePositionSequence[0].LeafJawPositions = [v + 1.0 for v in leaves]
    ds.save_as(tmp_path / "dyn.dcm")
    back = read_rtplan(tmp_path / "dyn.dcm")
    assert isinstance(back.beams[0], PlanBeam) and isinstance(back.beams[2], PlanBeam)
    assert isinstance(back.beams[1], dict) and back.beams[1]["gantry_angle_deg"] == 90.0


def test_exported_case_rtdose_references_the_sequenced_plan(tmp_path):
    shape = (12, 14, 16)
    grid = Grid(shape, (3.0, 3.0, 3.0), (-22.5, -39.0, -10.0))
    ptv = np.zeros(shape, bool)
    ptv[4:8, 5:9, 6:10] = True
    body = np.zeros(shape, bool)
    body[1:11, 1:13, 1:15] = True
    dose = Dose(np.where(ptv, 60.0, 10.0).astype(np.float32), grid, name="sequenced")
    case = Case("TWINRT-SEQ-2", Image(np.zeros(shape, np.int16), grid),
                [Structure("BODY", body, grid, (0, 255, 0), StructureType.EXTERNAL),
                 Structure("PTV60", ptv, grid, (255, 0, 0), StructureType.TARGET)],
                {"sequenced": dose}, [sequenced().plan], {"patient_name": "Phantom^Sequenced"})
    files = export_case(case, tmp_path / "out")
    (plan_file,), (dose_file,) = files["rtplan"], files["rtdose"]
    rp, rd = pydicom.dcmread(plan_file), pydicom.dcmread(dose_file)
    assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == rp.SOPInstanceUID
    assert rp.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == pydicom.dcmread(
        files["rtstruct"][0]).SOPInstanceUID
    for path in (plan_file, dose_file):
        errors, _ = dciodvfy_report(path)
        assert errors == [], (path.name, errors)
    back = import_case(tmp_path / "out")
    assert [type(b).__name__ for b in back.plans[0].beams] == ["PlanBeam"] * 3
    assert back.plans[0].beams[1].meterset_mu == pytest.approx(200.0)
