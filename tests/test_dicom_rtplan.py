"""RTPLAN skeleton export/import (twinrt.dicom.rtplan): round trip, geometry, validity, errors."""

from __future__ import annotations

import pydicom
import pytest

from dicom_validate import dciodvfy_report
from twinrt.dicom.common import RT_STRUCTURE_SET_STORAGE, DicomContext
from twinrt.dicom.rtplan import read_rtplan, write_rtplan
from twinrt.errors import DicomImportError, InvalidInputError, MissingInputError
from twinrt.model import Plan, Prescription

SS_UID = "1.2.826.0.1.3680043.8.498.77"


@pytest.fixture
def ctx() -> DicomContext:
    return DicomContext("TWINRT-RP-1", "Phantom^Plan")


def make_plan(**kw) -> Plan:
    rx = [Prescription("PTV70", 70.0, 35), Prescription("PTV56", 56.0, 35), Prescription("Boost", 10.0, 5)]
    return Plan(kw.pop("label", "AI plan"), kw.pop("prescriptions", rx), **kw)


def test_round_trip_skeleton(tmp_path, ctx):
    plan = make_plan()
    uid = write_rtplan(plan, ctx, tmp_path / "rp.dcm")
    back = read_rtplan(tmp_path / "rp.dcm")
    assert back.label == "AI plan" and back.approval == "UNAPPROVED" and back.beams == []
    assert back.prescriptions == plan.prescriptions
    ds = pydicom.dcmread(tmp_path / "rp.dcm")
    assert ds.SOPInstanceUID == uid and ds.RTPlanGeometry == "TREATMENT_DEVICE"
    assert "ReferencedStructureSetSequence" not in ds
    assert [fg.NumberOfFractionsPlanned for fg in ds.FractionGroupSequence] == [5, 35]


def test_patient_geometry_references_structure_set(tmp_path, ctx):
    write_rtplan(make_plan(), ctx, tmp_path / "rp.dcm", structure_set_sop_uid=SS_UID)
    ds = pydicom.dcmread(tmp_path / "rp.dcm")
    assert ds.RTPlanGeometry == "PATIENT"
    ref = ds.ReferencedStructureSetSequence[0]
    assert ref.ReferencedSOPInstanceUID == SS_UID and ref.ReferencedSOPClassUID == RT_STRUCTURE_SET_STORAGE


def test_beams_round_trip(tmp_path, ctx):
    beams = [{"name": f"G{a}", "gantry_angle_deg": float(a), "isocenter_mm": (1.0, -2.0, 3.5),
              "meterset_mu": 123.4, "jaws_mm": (-40.0, 45.0, -30.0, 35.0)} for a in (0, 120, 240)]
    write_rtplan(make_plan(beams=beams), ctx, tmp_path / "rp.dcm", SS_UID)
    back = read_rtplan(tmp_path / "rp.dcm")
    assert [b["gantry_angle_deg"] for b in back.beams] == [0.0, 120.0, 240.0]
    assert back.beams[1]["isocenter_mm"] == (1.0, -2.0, 3.5)
    assert back.beams[2]["jaws_mm"] == (-40.0, 45.0, -30.0, 35.0)
    assert back.beams[0]["meterset_mu"] == pytest.approx(123.4)


@pytest.mark.parametrize("variant", ["skeleton", "patient", "beams", "approved", "no prescription"])
def test_rtplan_passes_dciodvfy(tmp_path, ctx, variant):
    plan = {"skeleton": make_plan(), "patient": make_plan(),
            "beams": make_plan(beams=[{"gantry_angle_deg": 90.0}]),
            "approved": make_plan(approval="APPROVED"),
            "no prescription": make_plan(prescriptions=[])}[variant]
    ss = None if variant in ("skeleton", "no prescription") else SS_UID
    write_rtplan(plan, ctx, tmp_path / "rp.dcm", ss)
    errors, warnings = dciodvfy_report(tmp_path / "rp.dcm")
    assert errors == [] and warnings == [], errors + warnings


def test_bad_plan_writes_nothing(tmp_path, ctx):
    with pytest.raises(InvalidInputError, match="approval"):
        write_rtplan(make_plan(approval="MAYBE"), ctx, tmp_path / "rp.dcm")
    with pytest.raises(InvalidInputError, match="label"):
        write_rtplan(make_plan(label="  "), ctx, tmp_path / "rp.dcm")
    assert list(tmp_path.iterdir()) == []


def test_not_rtplan(tmp_path):
    (tmp_path / "x.dcm").write_text("junk")
    with pytest.raises(DicomImportError, match="x.dcm"):
        read_rtplan(tmp_path / "x.dcm")
    with pytest.raises(MissingInputError):
        read_rtplan(tmp_path / "none.dcm")
