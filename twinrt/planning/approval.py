"""Plan review workflow: draft → proposed → approved or rejected, each step in the audit log.

::

    draft ──propose──▶ proposed ──approve(reviewer)──▶ approved   (terminal)
      ▲                   │
      │                   └──reject(reviewer, reason)──▶ rejected
      └──────────────revise(by)──────────────────────────────┘

Only :func:`approve` makes a plan ``approved``, and only with a human reviewer's name: an empty
name, white space or the AI's own name (:data:`twinrt.audit.AI_ACTOR`) is refused with
:class:`HumanReviewRequiredError`. The DICOM ApprovalStatus (``plan.approval``) is derived from the
state (:func:`twinrt.model.approval_status`): ``APPROVED`` only for ``approved``, ``REJECTED`` for
``rejected``, ``UNAPPROVED`` otherwise, so an RTPLAN carries APPROVED only after that action.

Every transition appends one entry to the case's :class:`twinrt.audit.AuditLog`, with the plan
label and a sha256 fingerprint of the plan's content (prescriptions and beams), so that the entry
names exactly what was proposed, approved or rejected. An invalid transition raises
:class:`InvalidTransitionError` naming the current state and changes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from twinrt.audit import (AI_ACTOR, KIND_APPROVAL, KIND_PROPOSAL, KIND_REJECTION, KIND_REVISION, AuditLog,
                          utc_now_iso)
from twinrt.errors import InvalidInputError
from twinrt.model import PLAN_STATES, Plan, approval_status, is_human_reviewer

DRAFT, PROPOSED, APPROVED, REJECTED = PLAN_STATES

#: Allowed transitions: action -> (from state, to state).
TRANSITIONS = {"propose": (DRAFT, PROPOSED), "approve": (PROPOSED, APPROVED), "reject": (PROPOSED, REJECTED),
               "revise": (REJECTED, DRAFT)}


class InvalidTransitionError(InvalidInputError):
    """A review action not allowed in the plan's current state.

    :param message: what is wrong and what to do; :param state: the plan's state.
    """

    def __init__(self, message: str, state: str):
        super().__init__(message)
        self.state = state


class HumanReviewRequiredError(InvalidInputError):
    """An approval or rejection without a human reviewer's name."""


def plan_fingerprint(plan: Plan) -> str:
    """sha256 of what a reviewer judges: label, prescriptions, beams and radiation type.

    Review fields are left out so the fingerprint of a plan is the same before and after review.

    :param plan: the plan.
    """
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        return repr(value)

    content = {"label": plan.label, "prescriptions": plan.prescriptions, "beams": plan.beams,
               "radiation_type": plan.radiation_type}
    text = json.dumps(content, default=plain, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check(plan: Plan, action: str) -> str:
    """The target state of ``action``; raises when the plan is not in the state it starts from."""
    start, end = TRANSITIONS[action]
    if plan.state != start:
        allowed = [a for a, (s, _) in TRANSITIONS.items() if s == plan.state]
        hint = f"allowed now: {', '.join(allowed)}" if allowed else "an approved plan is final; copy it to change it"
        raise InvalidTransitionError(f"Cannot {action} plan '{plan.label}': it is {plan.state}, and {action} needs "
                                     f"a {start} plan ({hint})", plan.state)
    return end


def _check_reviewer(name: Any, action: str) -> str:
    if not is_human_reviewer(name):
        raise HumanReviewRequiredError(
            f"Cannot {action} the plan without a reviewer: an explicit human action with a name is required "
            f"(got {name!r}; the AI, '{AI_ACTOR}', can never {action} a plan)")
    return name.strip()


def _details(plan: Plan, start: str, end: str, **extra: Any) -> dict[str, Any]:
    return {"plan_label": plan.label, "from_state": start, "to_state": end,
            "plan_sha256": plan_fingerprint(plan), **extra}


def propose(plan: Plan, log: AuditLog, by: str = AI_ACTOR, message: str = "") -> Plan:
    """draft → proposed: the plan is ready for human review.

    :param plan: a draft plan; changed in place and returned.
    :param log: the case's audit log.
    :param by: who proposes (the AI by default, or a planner's name).
    :param message: optional note; default says the plan awaits review.
    :raises InvalidTransitionError: the plan is not a draft.
    """
    end = _check(plan, "propose")
    by = by.strip() if isinstance(by, str) and by.strip() else AI_ACTOR
    log.append(by, KIND_PROPOSAL, message or f"Plan '{plan.label}' proposed for human review",
               _details(plan, plan.state, end))
    plan.state = end
    plan.approval = approval_status(plan)
    return plan


def approve(plan: Plan, log: AuditLog, reviewer_name: str, comment: str = "") -> Plan:
    """proposed → approved, by a named person. Only this makes the RTPLAN say APPROVED.

    :param plan: a proposed plan; changed in place and returned.
    :param log: the case's audit log.
    :param reviewer_name: the approving person's name (not empty, not the AI).
    :param comment: optional review comment.
    :raises HumanReviewRequiredError: no human name. :raises InvalidTransitionError: not proposed.
    """
    reviewer_name = _check_reviewer(reviewer_name, "approve")
    end = _check(plan, "approve")
    when = utc_now_iso()
    # Log first: if the log refuses (damaged chain), the plan stays unapproved.
    log.append(reviewer_name, KIND_APPROVAL, f"Plan '{plan.label}' approved" + (f": {comment}" if comment else ""),
               _details(plan, plan.state, end, comment=comment), timestamp=when)
    plan.state, plan.reviewer_name, plan.review_datetime, plan.review_comment = end, reviewer_name, when, comment
    plan.approval = approval_status(plan)
    return plan


def reject(plan: Plan, log: AuditLog, reviewer_name: str, reason: str) -> Plan:
    """proposed → rejected, by a named person with a reason.

    :param plan: a proposed plan; changed in place and returned.
    :param log: the case's audit log.
    :param reviewer_name: the rejecting person's name (not empty, not the AI).
    :param reason: why; required, so that the next draft can address it.
    :raises HumanReviewRequiredError: no human name. :raises InvalidInputError: empty reason.
    :raises InvalidTransitionError: not proposed.
    """
    reviewer_name = _check_reviewer(reviewer_name, "reject")
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInputError("A rejection needs a reason; say what must change in the plan")
    end = _check(plan, "reject")
    when = utc_now_iso()
    log.append(reviewer_name, KIND_REJECTION, f"Plan '{plan.label}' rejected: {reason.strip()}",
               _details(plan, plan.state, end, reason=reason.strip()), timestamp=when)
    plan.state, plan.reviewer_name, plan.review_datetime = end, reviewer_name, when
    plan.review_comment = reason.strip()
    plan.approval = approval_status(plan)
    return plan


def revise(plan: Plan, log: AuditLog, by: str = AI_ACTOR, message: str = "") -> Plan:
    """rejected → draft, to rework the plan; the review fields are cleared (the log keeps them).

    :param plan: a rejected plan; changed in place and returned.
    :param log: the case's audit log.
    :param by: who reopens it (the AI by default, or a planner's name).
    :param message: optional note.
    :raises InvalidTransitionError: the plan is not rejected.
    """
    end = _check(plan, "revise")
    by = by.strip() if isinstance(by, str) and by.strip() else AI_ACTOR
    log.append(by, KIND_REVISION, message or f"Plan '{plan.label}' reopened as a draft after rejection",
               _details(plan, plan.state, end, rejected_by=plan.reviewer_name, reason=plan.review_comment))
    plan.state, plan.reviewer_name, plan.review_datetime, plan.review_comment = end, "", "", ""
    plan.approval = approval_status(plan)
    return plan


class PlanWorkflow:
    """The review actions bound to one audit log (e.g. ``PlanWorkflow(AuditLog.of_case(case))``).

    :param log: the case's audit log.
    """

    def __init__(self, log: AuditLog):
        self.log = log

    def propose(self, plan: Plan, by: str = AI_ACTOR, message: str = "") -> Plan:
        """See :func:`propose`."""
        return propose(plan, self.log, by, message)

    def approve(self, plan: Plan, reviewer_name: str, comment: str = "") -> Plan:
        """See :func:`approve`."""
        return approve(plan, self.log, reviewer_name, comment)

    def reject(self, plan: Plan, reviewer_name: str, reason: str) -> Plan:
        """See :func:`reject`."""
        return reject(plan, self.log, reviewer_name, reason)

    def revise(self, plan: Plan, by: str = AI_ACTOR, message: str = "") -> Plan:
        """See :func:`revise`."""
        return revise(plan, self.log, by, message)


__all__ = ["DRAFT", "PROPOSED", "APPROVED", "REJECTED", "TRANSITIONS", "InvalidTransitionError",
           "HumanReviewRequiredError", "PlanWorkflow", "plan_fingerprint", "propose", "approve", "reject", "revise"]
