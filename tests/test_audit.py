"""Audit log (twinrt.audit): append-only entries, hash chain, JSON lines, atomic save, case metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest

from twinrt.audit import AI_ACTOR, KIND_AI_ACTION, KIND_HUMAN_MESSAGE, AuditLog, AuditLogError
from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.geometry import Grid
from twinrt.model import Case, Image


def make_log() -> AuditLog:
    log = AuditLog()
    log.ai_action("Contoured 12 structures", {"model": "stub", "weights_sha256": "ab" * 32})
    log.human_message("Dr. A. Reviewer", "Please spare the left parotid more")
    log.ai_action("Re-optimised plan", {"iterations": 80, "d95_gy": 59.1})
    return log


def test_entries_have_required_fields_and_chain():
    log = make_log()
    entries = log.entries
    assert [e["seq"] for e in entries] == [0, 1, 2]
    assert [e["actor"] for e in entries] == [AI_ACTOR, "Dr. A. Reviewer", AI_ACTOR]
    assert [e["kind"] for e in entries] == [KIND_AI_ACTION, KIND_HUMAN_MESSAGE, KIND_AI_ACTION]
    for e in entries:
        assert e["timestamp"].endswith("Z") and "T" in e["timestamp"]  # ISO 8601 UTC
        assert len(e["hash"]) == 64
    assert entries[1]["prev_hash"] == entries[0]["hash"] and log.head == entries[2]["hash"]
    assert entries[2]["details"] == {"iterations": 80, "d95_gy": 59.1}
    log.verify()


def test_entries_are_copies_and_there_is_no_delete_api():
    log = make_log()
    log.entries[0]["message"] = "changed"
    log.entries.clear()
    assert len(log) == 3 and log.entries[0]["message"] == "Contoured 12 structures"
    for name in ("remove", "delete", "pop", "clear", "edit", "__delitem__", "__setitem__"):
        assert not hasattr(log, name), name


@pytest.mark.parametrize("tamper", ["edit message", "edit details", "remove middle", "swap", "insert"])
def test_tampering_is_detected(tamper):
    case_entries = make_log()._entries  # the stored list, as it sits in case metadata or a scene
    stored = json.loads(json.dumps(case_entries))
    if tamper == "edit message":
        stored[1]["message"] = "Looks fine"
    elif tamper == "edit details":
        stored[2]["details"]["d95_gy"] = 60.0
    elif tamper == "remove middle":
        del stored[1]
    elif tamper == "swap":
        stored[0], stored[1] = stored[1], stored[0]
    else:
        stored.insert(1, dict(stored[1]))
    log = AuditLog(stored)
    with pytest.raises(AuditLogError) as info:
        log.verify()
    assert info.value.index in (0, 1, 2)
    with pytest.raises(AuditLogError):  # nothing can be chained onto a damaged log
        log.ai_action("more")


def test_rehashed_edit_breaks_the_successor():
    """Recomputing the edited entry's own hash is not enough: the next entry still points at the old one."""
    from twinrt.audit import _entry_hash

    stored = json.loads(json.dumps(make_log()._entries))
    stored[0]["message"] = "Contoured 11 structures"
    stored[0]["hash"] = _entry_hash(stored[0])
    with pytest.raises(AuditLogError, match="entry 1"):
        AuditLog(stored).verify()


@pytest.mark.parametrize("args", [("", KIND_AI_ACTION, "x"), ("  ", KIND_AI_ACTION, "x"), ("A", "gossip", "x"),
                                  ("A", KIND_AI_ACTION, " ")])
def test_bad_entries_are_refused_and_nothing_appended(args):
    log = make_log()
    with pytest.raises(InvalidInputError):
        log.append(*args)
    assert len(log) == 3


def test_details_must_be_json_ready():
    log = AuditLog()
    with pytest.raises(InvalidInputError, match="JSON"):
        log.ai_action("dose", {"array": np.zeros(3)})
    with pytest.raises(InvalidInputError, match="JSON"):
        log.ai_action("dose", {"d95": float("nan")})
    assert len(log) == 0


def test_jsonl_round_trip():
    log = make_log()
    text = log.to_jsonl()
    assert len(text.splitlines()) == 3
    back = AuditLog.from_jsonl(text + "\n\n")
    assert back.entries == log.entries and back.head == log.head
    with pytest.raises(AuditLogError, match="line 2"):
        AuditLog.from_jsonl(text.splitlines()[0] + "\n{not json\n")
    tampered = text.replace("spare the left parotid", "ignore the parotid")
    with pytest.raises(AuditLogError):
        AuditLog.from_jsonl(tampered)


def test_save_is_atomic_and_append_only(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = make_log()
    log.save(path)
    assert AuditLog.load(path).entries == log.entries
    assert [p.name for p in tmp_path.iterdir()] == ["audit.jsonl"]  # no temporary files left
    log.human_message("Dr. A. Reviewer", "Thanks")
    log.save(path)  # growing the log is fine
    assert len(AuditLog.load(path)) == 4
    stale = AuditLog.from_jsonl("".join(log.to_jsonl().splitlines(keepends=True)[:2]))
    with pytest.raises(AuditLogError, match="holds audit entries"):
        stale.save(path)  # a shorter or diverging copy must not overwrite the file
    assert len(AuditLog.load(path)) == 4
    with pytest.raises(MissingInputError):
        AuditLog.load(tmp_path / "none.jsonl")


def test_log_lives_in_case_metadata():
    grid = Grid((2, 2, 2), (1.0, 1.0, 1.0))
    case = Case("ANON-1", Image(np.zeros(grid.shape, np.int16), grid))
    log = AuditLog.of_case(case)
    log.ai_action("Imported case")
    assert case.metadata["audit_log"][0]["message"] == "Imported case"
    # JSON-serialisable, so everything that stores the metadata keeps it.
    again = AuditLog(json.loads(json.dumps(case.metadata))["audit_log"])
    again.verify()
    AuditLog.of_case(case).human_message("Dr. B", "ok")
    assert len(case.metadata["audit_log"]) == 2
    # Nothing identifying is added: the entries hold only what callers passed.
    assert "ANON-1" not in json.dumps(case.metadata["audit_log"])
