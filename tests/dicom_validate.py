"""Run dicom3tools' ``dciodvfy`` on written files and collect its errors.

``dciodvfy`` is the reference IOD validator; TwinRT's DICOM output must produce zero lines
starting with ``Error``. Tests skip when it is not installed, except in CI (``CI`` set), where a
missing validator is a failure so that validation is never silently dropped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def dciodvfy_path() -> str | None:
    """Path of the ``dciodvfy`` executable, or ``None`` when it is not installed."""
    return shutil.which("dciodvfy")


def require_dciodvfy() -> str:
    """The ``dciodvfy`` path; skips the test when absent (fails instead when ``CI`` is set)."""
    exe = dciodvfy_path()
    if exe is None:
        message = "dciodvfy (dicom3tools) is not installed; install it, e.g. apt-get install dicom3tools"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def dciodvfy_errors(path: str | Path) -> list[str]:
    """Lines of ``dciodvfy path`` output that start with ``Error``.

    :param path: a DICOM Part 10 file.
    :return: the error lines (empty when the file is valid); warnings are ignored.
    """
    exe = require_dciodvfy()
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]
