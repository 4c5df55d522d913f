"""An append-only, tamper-evident audit log kept with the case (and, through it, with the scene).

Every AI action and every human message of a case is one :class:`AuditLog` entry: a UTC timestamp
(ISO 8601), an actor (:data:`AI_ACTOR` or a person's name), a kind (:data:`KINDS`), a message and a
JSON-ready ``details`` dict. The log lives in ``case.metadata["audit_log"]`` as a list of plain
dicts, so everything that keeps the case metadata keeps it: the Slicer scene stores it on the study
item (``TwinRT.AuditLog``, one JSON line per entry; see ``TwinRTCommon.mrmlio``) and
:meth:`AuditLog.save` writes it as a JSON-lines file.

Entries are never edited or removed: there is no API to do so, and each entry carries a hash chain
(``prev_hash`` and ``hash``, sha256 of the previous hash and of the entry's canonical JSON), so that
:meth:`AuditLog.verify` detects an entry edited, inserted, removed or reordered anywhere but at the
very end. Truncating the *tail* leaves a valid shorter chain; compare :attr:`AuditLog.head` with a
copy kept elsewhere (a saved file, an exported report) to detect that too. :meth:`AuditLog.save`
refuses to overwrite a file whose log is not a prefix of this one, so a stale copy can never
shorten the log on disk.

The log holds what callers pass and nothing else: no patient identifiers are added here.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from twinrt.errors import InvalidInputError, MissingInputError, reading
from twinrt.io_utils import write_text_atomic

#: The actor of every action TwinRT's AI takes on its own.
AI_ACTOR = "TwinRT AI"

#: Entry kinds. ``ai_action``: something TwinRT computed or changed; ``human_message``: a note a
#: person typed; the plan workflow (:mod:`twinrt.planning.approval`) writes the others.
KIND_AI_ACTION = "ai_action"
KIND_HUMAN_MESSAGE = "human_message"
KIND_PROPOSAL = "proposal"
KIND_APPROVAL = "approval"
KIND_REJECTION = "rejection"
KIND_REVISION = "revision"
KINDS = (KIND_AI_ACTION, KIND_HUMAN_MESSAGE, KIND_PROPOSAL, KIND_APPROVAL, KIND_REJECTION, KIND_REVISION)

#: Key of the log in ``case.metadata``.
METADATA_KEY = "audit_log"

#: ``prev_hash`` of the first entry.
GENESIS_HASH = "0" * 64

#: Fields of an entry, in the order they are written.
ENTRY_FIELDS = ("seq", "timestamp", "actor", "kind", "message", "details", "prev_hash", "hash")


class AuditLogError(InvalidInputError):
    """An audit log that was edited, reordered or cut, or is not valid JSON lines.

    :param message: what is wrong and what to do.
    :param index: the first entry (0-based) that fails the check, when known.
    """

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def utc_now_iso() -> str:
    """The current UTC time as ISO 8601 with milliseconds and a ``Z`` suffix."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 of the entry's ``prev_hash`` and its canonical JSON (every field but ``hash``)."""
    body = {k: entry[k] for k in ENTRY_FIELDS if k != "hash"}
    # sort_keys and fixed separators make the text (and so the hash) independent of dict order.
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256((entry["prev_hash"] + text).encode("utf-8")).hexdigest()


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"An audit entry needs a non-empty {what} (text)")
    return value.strip()


class AuditLog:
    """An append-only list of audit entries with a sha256 hash chain.

    :param entries: the backing list of entry dicts; it is used as is (not copied), so a log made
        by :meth:`of_case` appends straight into ``case.metadata["audit_log"]``. Default: a new
        empty list. The entries are not verified here; call :meth:`verify`.
    """

    def __init__(self, entries: list[dict[str, Any]] | None = None):
        if entries is None:
            entries = []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise AuditLogError("An audit log is a list of entry dicts; the stored log is damaged")
        self._entries = entries

    @classmethod
    def of_case(cls, case: Any) -> "AuditLog":
        """The log of ``case`` (``case.metadata["audit_log"]``), created empty when absent.

        :param case: a :class:`twinrt.model.Case` (anything with a ``metadata`` dict).
        """
        entries = case.metadata.setdefault(METADATA_KEY, [])
        return cls(entries)

    # ------------------------------------------------------------------ reading
    @property
    def entries(self) -> list[dict[str, Any]]:
        """Copies of the entries, oldest first (editing them does not change the log)."""
        return [json.loads(json.dumps(e)) for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def head(self) -> str:
        """Hash of the last entry (:data:`GENESIS_HASH` when empty): the fingerprint of the whole log."""
        return self._entries[-1]["hash"] if self._entries else GENESIS_HASH

    def verify(self) -> None:
        """Check the hash chain.

        :raises AuditLogError: naming the first entry that was edited, inserted, removed or moved.
        """
        previous = GENESIS_HASH
        for index, entry in enumerate(self._entries):
            missing = [k for k in ENTRY_FIELDS if k not in entry]
            if missing:
                raise AuditLogError(f"Audit entry {index} lacks {', '.join(missing)}; the log was edited", index)
            if entry["seq"] != index or entry["prev_hash"] != previous:
                raise AuditLogError(f"Audit entry {index} does not follow entry {index - 1}: an entry was removed, "
                                    "inserted or moved; restore the log from a saved copy", index)
            try:
                expected = _entry_hash(entry)
            except (TypeError, ValueError) as exc:
                raise AuditLogError(f"Audit entry {index} is not valid JSON ({exc})", index) from exc
            if entry["hash"] != expected:
                raise AuditLogError(f"Audit entry {index} was changed after it was written (hash mismatch); "
                                    "restore the log from a saved copy", index)
            previous = entry["hash"]

    # ------------------------------------------------------------------ writing
    def append(self, actor: str, kind: str, message: str, details: Mapping[str, Any] | None = None,
               timestamp: str | None = None) -> dict[str, Any]:
        """Append one entry and return a copy of it.

        :param actor: :data:`AI_ACTOR` or the name of the person acting.
        :param kind: one of :data:`KINDS`.
        :param message: what happened, in words.
        :param details: JSON-ready facts (plan label, model id, numbers); no NaN or infinity.
        :param timestamp: ISO 8601 UTC time; default now. For imports and tests only.
        :raises InvalidInputError: empty actor or message, unknown kind, details not JSON-ready;
            nothing is appended.
        :raises AuditLogError: the existing log fails :meth:`verify` (appending would hide that).
        """
        actor = _check_text(actor, "actor")
        message = _check_text(message, "message")
        if kind not in KINDS:
            raise InvalidInputError(f"Unknown audit entry kind '{kind}'; use one of {', '.join(KINDS)}")
        details = dict(details or {})
        try:
            # Round trip through JSON: the stored entry must be exactly what a reload gives back.
            details = json.loads(json.dumps(details, sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"Audit details must be JSON-ready (text, numbers, lists, dicts): {exc}") from exc
        # Chaining onto a damaged log would give the damage a valid-looking successor.
        self.verify()
        entry = {"seq": len(self._entries), "timestamp": timestamp or utc_now_iso(), "actor": actor, "kind": kind,
                 "message": message, "details": details, "prev_hash": self.head}
        entry["hash"] = _entry_hash(entry)
        self._entries.append(entry)
        return dict(entry)

    def ai_action(self, message: str, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Append an ``ai_action`` entry by :data:`AI_ACTOR`.

        :param message: what TwinRT did; :param details: JSON-ready facts.
        """
        return self.append(AI_ACTOR, KIND_AI_ACTION, message, details)

    def human_message(self, author: str, message: str, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Append a ``human_message`` entry.

        :param author: the person's name; :param message: the text; :param details: JSON-ready facts.
        """
        return self.append(author, KIND_HUMAN_MESSAGE, message, details)

    # ------------------------------------------------------------------ JSON lines
    def to_jsonl(self) -> str:
        """The log as JSON lines (one entry per line, keys sorted), ending in a newline when not empty."""
        return "".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in self._entries)

    @classmethod
    def from_jsonl(cls, text: str, verify: bool = True) -> "AuditLog":
        """A log from :meth:`to_jsonl` text; blank lines are ignored.

        :param text: JSON lines.
        :param verify: check the hash chain (default).
        :raises AuditLogError: a line is not a JSON object, or the chain is broken.
        """
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AuditLogError(f"Audit log line {number} is not valid JSON ({exc})", len(entries)) from exc
            if not isinstance(entry, dict):
                raise AuditLogError(f"Audit log line {number} is not a JSON object", len(entries))
            entries.append(entry)
        log = cls(entries)
        if verify:
            log.verify()
        return log

    def save(self, path: str | Path) -> Path:
        """Write the log as JSON lines, atomically (the whole file is replaced in one rename).

        :param path: the file; a file already there must hold a prefix of this log (same entries,
            possibly fewer), so that saving never drops entries someone else wrote.
        :return: ``path``.
        :raises AuditLogError: this log fails :meth:`verify`, or the file holds entries this log does not.
        """
        self.verify()
        path = Path(path)
        if path.exists():
            stored = AuditLog.from_jsonl(path.read_text(encoding="utf-8"))
            if not self.extends(stored):
                raise AuditLogError(f"{path} holds audit entries this log does not have; load it, append to it "
                                    "and save again instead of overwriting it")
        return write_text_atomic(path, self.to_jsonl())

    @classmethod
    @reading("audit log (JSON lines)")
    def load(cls, path: str | Path) -> "AuditLog":
        """A log saved by :meth:`save`, verified.

        :param path: the JSON-lines file.
        :raises MissingInputError: no such file. :raises AuditLogError: the chain is broken.
        """
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"Audit log {path} does not exist", path)
        try:
            return cls.from_jsonl(path.read_text(encoding="utf-8"))
        except AuditLogError as exc:
            raise AuditLogError(f"{path}: {exc}", exc.index) from exc

    def extends(self, other: "AuditLog | Iterable[dict[str, Any]]") -> bool:
        """True when ``other``'s entries are the first entries of this log (append-only growth).

        :param other: a log or a list of entry dicts.
        """
        theirs = list(other._entries if isinstance(other, AuditLog) else other)
        return len(theirs) <= len(self._entries) and all(
            a.get("hash") == b.get("hash") for a, b in zip(theirs, self._entries))


__all__ = ["AI_ACTOR", "KINDS", "KIND_AI_ACTION", "KIND_HUMAN_MESSAGE", "KIND_PROPOSAL", "KIND_APPROVAL",
           "KIND_REJECTION", "KIND_REVISION", "METADATA_KEY", "AuditLog", "AuditLogError", "utc_now_iso"]
