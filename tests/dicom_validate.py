"""Test helpers around :mod:`twinrt.dicom.validate` (dicom3tools' ``dciodvfy``).

Tests skip when dciodvfy is not installed, except in CI (``CI`` set), where a missing validator
is a failure so that validation is never silently dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from twinrt.dicom.validate import dciodvfy_path, validate_file


def require_dciodvfy() -> str:
    """The ``dciodvfy`` path; skips the test when absent (fails instead when ``CI`` is set)."""
    exe = dciodvfy_path()
    if exe is None:
        message = "dciodvfy (dicom3tools) is not installed; install it, e.g. apt-get install dicom3tools"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def dciodvfy_report(path: str | Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of ``dciodvfy path``; a validator crash counts as an error."""
    require_dciodvfy()
    return validate_file(path)


def dciodvfy_errors(path: str | Path) -> list[str]:
    """Error lines of ``dciodvfy path`` (empty when the file is valid)."""
    return dciodvfy_report(path)[0]
