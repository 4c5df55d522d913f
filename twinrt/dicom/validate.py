"""Validation of written DICOM files with ``dciodvfy`` (Debian package dicom3tools).

``dciodvfy`` checks every attribute against the IOD of the file's SOP class. TwinRT's rule is zero
errors for every file type it writes; warnings are reported but do not fail. A validator that
crashes (exit status other than 0 or 1, e.g. an assertion) is reported as an error, never as a
clean file.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from twinrt.errors import MissingInputError


def dciodvfy_path() -> str | None:
    """Path of the ``dciodvfy`` executable, or ``None`` when dicom3tools is not installed."""
    return shutil.which("dciodvfy")


def validate_file(path: str | Path) -> tuple[list[str], list[str]]:
    """Run ``dciodvfy`` on one file.

    :return: (error lines, warning lines) as printed by dciodvfy; a crash adds an error line.
    :raises MissingInputError: when dciodvfy is not installed (``apt-get install dicom3tools``).
    """
    exe = dciodvfy_path()
    if exe is None:
        raise MissingInputError("dciodvfy not found; install it with 'apt-get install dicom3tools'")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    # DICOMDIR-only remarks do not apply to single files.
    warnings = [ln for ln in lines if ln.startswith("Warning") and "DICOMDIR" not in ln]
    if proc.returncode not in (0, 1):
        errors.append(f"Error - dciodvfy crashed with exit status {proc.returncode}: " + " | ".join(lines[-3:]))
    return errors, warnings


def validate_folder(folder: str | Path) -> list[tuple[Path, list[str], list[str]]]:
    """Validate every ``*.dcm`` file below ``folder``; returns (path, errors, warnings) per file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"Folder {folder} does not exist", folder)
    return [(p, *validate_file(p)) for p in sorted(folder.rglob("*.dcm"))]
