"""Typed errors raised by TwinRT.

Every error says what went wrong *and what to do*, names the file or structure involved, and is
raised before anything is written, so that a failed call leaves files and the scene as they were.
They subclass :class:`ValueError` (bad input) or :class:`FileNotFoundError` so that callers that
only know the builtin types still catch them.
"""

from __future__ import annotations

from pathlib import Path


class TwinRTError(Exception):
    """Base class of every error TwinRT raises on purpose."""


class InvalidInputError(TwinRTError, ValueError):
    """Input data that cannot be used as given (wrong values, wrong types, wrong sizes)."""


class GeometryError(InvalidInputError):
    """Grids that do not match, or a geometry TwinRT cannot represent (e.g. gantry tilt)."""


class StructureError(InvalidInputError):
    """A structure that is empty, outside the image, or otherwise unusable."""

    def __init__(self, message: str, structure: str | None = None):
        super().__init__(message)
        self.structure = structure


class DoseError(InvalidInputError):
    """A dose distribution with NaN, infinite or negative values, or wrong units."""


class DicomImportError(InvalidInputError):
    """A DICOM file or folder that cannot be imported; ``path`` names the offending file."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class MissingInputError(TwinRTError, FileNotFoundError):
    """A file or folder that does not exist, or a folder without the expected content."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class StageNotAvailableError(TwinRTError, RuntimeError):
    """A pipeline stage whose implementation has not landed yet."""
