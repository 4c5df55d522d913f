"""Plan review workflow (twinrt.planning.approval) and its RTPLAN ApprovalStatus."""

from __future__ import annotations

import datetime as dt

import pydicom
import pytest

from dicom_validate import dciodvfy_report
from twinrt.audit import AI_ACTOR, KIND_APPROVAL, KIND_PROPOSAL, KIND_REJECTION, KIND_REVISION, AuditLog
from twinrt.dicom.common import DicomContext
from twinrt.dicom.rtplan import read_rtplan, write_rtplan
from twinrt.errors import InvalidInputError
from twinrt.model import Plan, Prescription, approval_status
from twinrt.planning.approval import (HumanReviewRequiredError, InvalidTransitionError, PlanWorkflow, approve,
                                      plan_fingerprint, propose, reject, revise)

SS_UID = "1.2.826.0.1.3680043.8.498.77"
REVIEWER = "Smith^Jane^^Dr"


@pytest.fixture
def ctx() -> DicomContext:
    return DicomContext("TWINRT-AP-1", "Phantom^Approval")


def make_plan() -> Plan:
    return Plan("AI plan", [Prescription("PTV60", 60.0, 30)], [{"gantry_angle_deg": 90.0}])


def test_happy_path_approve():
    log, plan = AuditLog(), make_plan()
    assert plan.state == "draft" and plan.approval == "UNAPPROVED"
    propose(plan, log)
    assert plan.state == "proposed" and plan.approval == "UNAPPROVED"
    approve(plan, log, REVIEWER, "Dose to cord acceptable")
    assert (plan.state, plan.approval, plan.reviewer_name) == ("approved", "APPROVED", REVIEWER)
    assert plan.review_comment == "Dose to cord acceptable"
    assert dt.datetime.fromisoformat(plan.review_datetime.replace("Z", "+00:00")).tzinfo is not None
    entries = log.entries
    assert [(e["actor"], e["kind"]) for e in entries] == [(AI_ACTOR, KIND_PROPOSAL), (REVIEWER, KIND_APPROVAL)]
    assert entries[1]["details"]["plan_sha256"] == plan_fingerprint(plan) == entries[0]["details"]["plan_sha256"]
    assert entries[1]["timestamp"] == plan.review_datetime
    log.verify()


def test_reject_and_revise():
    log, plan = AuditLog(), make_plan()
    workflow = PlanWorkflow(log)
    workflow.propose(plan, by="Planner P")
    workflow.reject(plan, "Dr. Jones", "PTV coverage below 95%")
    assert (plan.state, plan.approval, plan.review_comment) == ("rejected", "REJECTED", "PTV coverage below 95%")
    workflow.revise(plan)
    assert (plan.state, plan.approval, plan.reviewer_name) == ("draft", "UNAPPROVED", "")
    assert [e["kind"] for e in log.entries] == [KIND_PROPOSAL, KIND_REJECTION, KIND_REVISION]
    assert log.entries[0]["actor"] == "Planner P"
    assert log.entries[2]["details"]["reason"] == "PTV coverage below 95%"


@pytest.mark.parametrize("name", ["", "   ", None, AI_ACTOR, "twinrt ai", " TwinRT AI "])
def test_approval_needs_a_human_name(name):
    log, plan = AuditLog(), propose(make_plan(), AuditLog())
    with pytest.raises(HumanReviewRequiredError, match="explicit human action with a name is required"):
        approve(plan, log, name)
    with pytest.raises(HumanReviewRequiredError, match="explicit human action with a name is required"):
        reject(plan, log, name, "no")
    assert plan.state == "proposed" and plan.approval == "UNAPPROVED" and len(log) == 0


@pytest.mark.parametrize("state, action", [("draft", "approve"), ("draft", "reject"), ("draft", "revise"),
                                           ("proposed", "propose"), ("approved", "reject"),
                                           ("approved", "propose"), ("approved", "approve"),
                                           ("rejected", "approve")])
def test_invalid_transitions_name_the_state(state, action):
    log, plan = AuditLog(), make_plan()
    plan.state = state
    calls = {"propose": lambda: propose(plan, log), "approve": lambda: approve(plan, log, REVIEWER),
             "reject": lambda: reject(plan, log, REVIEWER, "reason"), "revise": lambda: revise(plan, log)}
    with pytest.raises(InvalidTransitionError, match=f"it is {state}") as info:
        calls[action]()
    assert info.value.state == state and plan.state == state and len(log) == 0
    assert isinstance(info.value, InvalidInputError)


def test_reject_needs_a_reason():
    plan = propose(make_plan(), AuditLog())
    with pytest.raises(InvalidInputError, match="reason"):
        reject(plan, AuditLog(), REVIEWER, "  ")
    assert plan.state == "proposed"


def test_approval_cannot_be_set_by_hand():
    """Only the workflow approves: APPROVED passed to the constructor, or a state without a name, gives UNAPPROVED."""
    assert Plan("P", approval="APPROVED").approval == "UNAPPROVED"
    assert Plan("P", state="approved").approval == "UNAPPROVED"
    assert Plan("P", state="approved", reviewer_name=AI_ACTOR).approval == "UNAPPROVED"
    assert Plan("P", state="approved", reviewer_name="Dr. X").approval == "APPROVED"
    with pytest.raises(InvalidInputError, match="state"):
        Plan("P", state="signed")
    plan = make_plan()
    plan.approval = "APPROVED"  # a stray assignment still cannot reach the RTPLAN
    assert approval_status(plan) == "UNAPPROVED"


def test_positional_constructor_is_unchanged():
    plan = Plan("L", [Prescription("PTV", 2.0, 1)], [], "UNAPPROVED", "PHOTON")
    assert (plan.label, plan.radiation_type, plan.state, plan.reviewer_name) == ("L", "PHOTON", "draft", "")


def _written(tmp_path, ctx, plan):
    path = tmp_path / "rp.dcm"
    write_rtplan(plan, ctx, path, SS_UID)
    return path, pydicom.dcmread(path)


def test_approved_plan_exports_approved_with_reviewer_and_passes_dciodvfy(tmp_path, ctx):
    log = AuditLog()
    plan = approve(propose(make_plan(), log), log, REVIEWER, "ok")
    path, ds = _written(tmp_path, ctx, plan)
    assert ds.ApprovalStatus == "APPROVED" and str(ds.ReviewerName) == REVIEWER
    local = dt.datetime.fromisoformat(plan.review_datetime.replace("Z", "+00:00")).astimezone().replace(tzinfo=None)
    assert ds.ReviewDate == local.strftime("%Y%m%d") and ds.ReviewTime == local.strftime("%H%M%S")
    errors, warnings = dciodvfy_report(path)
    assert errors == [], errors
    assert warnings == [], warnings
    back = read_rtplan(path)
    assert (back.state, back.approval, back.reviewer_name) == ("approved", "APPROVED", REVIEWER)
    # DICOM keeps whole seconds.
    original = dt.datetime.fromisoformat(plan.review_datetime.replace("Z", "+00:00"))
    reread = dt.datetime.fromisoformat(back.review_datetime.replace("Z", "+00:00"))
    assert abs((original - reread).total_seconds()) < 1.0


def test_rejected_plan_exports_rejected_and_passes_dciodvfy(tmp_path, ctx):
    log = AuditLog()
    plan = reject(propose(make_plan(), log), log, "Dr. Jones", "too hot")
    path, ds = _written(tmp_path, ctx, plan)
    assert ds.ApprovalStatus == "REJECTED" and str(ds.ReviewerName) == "Dr. Jones" and ds.ReviewDate
    errors, warnings = dciodvfy_report(path)
    assert errors == [], errors
    # A free-text name is written as typed; dciodvfy only warns that "Dr. Jones" looks like the
    # retired (pre-'^') Person Name form. Names in Family^Given form give no warning (test above).
    assert all("Reviewer Name" in w for w in warnings), warnings
    assert read_rtplan(path).state == "rejected"


@pytest.mark.parametrize("step", ["draft", "proposed"])
def test_unreviewed_plan_exports_unapproved_without_review_fields(tmp_path, ctx, step):
    plan = make_plan()
    if step == "proposed":
        propose(plan, AuditLog())
    path, ds = _written(tmp_path, ctx, plan)
    assert ds.ApprovalStatus == "UNAPPROVED"
    assert "ReviewerName" not in ds and "ReviewDate" not in ds and "ReviewTime" not in ds
    assert dciodvfy_report(path) == ([], [])
    assert read_rtplan(path).state == "draft"


def test_approved_file_without_reviewer_is_read_as_proposed(tmp_path, ctx):
    log = AuditLog()
    path, ds = _written(tmp_path, ctx, approve(propose(make_plan(), log), log, REVIEWER))
    ds.ReviewerName = ""
    ds.save_as(path)
    back = read_rtplan(path)
    assert (back.state, back.approval) == ("proposed", "UNAPPROVED")


def test_audit_log_travels_with_the_dicom_export(tmp_path):
    """export_case writes AUDIT.jsonl beside the DICOM files; import_case reads it back verified."""
    import numpy as np

    from twinrt.audit import AuditLog
    from twinrt.dicom.folder import AUDIT_FILE, export_case, import_case
    from twinrt.geometry import Grid
    from twinrt.model import Case, Image

    grid = Grid((3, 4, 5), (2.0, 2.0, 2.0))
    case = Case("AUDIT1", Image(np.zeros(grid.shape, np.int16), grid), metadata={"patient_name": "Audit^Test"})
    log = AuditLog.of_case(case)
    log.ai_action("Planned 9 beams", {"beams": 9})
    log.human_message("Dr Reviewer", "keep the cord under 45 Gy")
    export_case(case, tmp_path / "out")
    assert (tmp_path / "out" / AUDIT_FILE).is_file()
    back = import_case(tmp_path / "out")
    restored = AuditLog(back.metadata["audit_log"])
    restored.verify()
    assert [e["message"] for e in restored.entries] == ["Planned 9 beams", "keep the cord under 45 Gy"]
