"""Typed errors raised by TwinRT.

Every error says what went wrong *and what to do*, names the file or structure involved, and is
raised before anything is written, so that a failed call leaves files and the scene as they were.
They subclass :class:`ValueError` (bad input) or :class:`FileNotFoundError` so that callers that
only know the builtin types still catch them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


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


class DamagedFileError(InvalidInputError):
    """A file whose content cannot be parsed (truncated, corrupted, wrong format); ``path`` names it."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None


def _malformed_content_errors() -> tuple[type[BaseException], ...]:
    import struct
    import zipfile
    import zlib

    # What parsers (pydicom, json, csv, numpy's npz, zipfile, int()/float()) raise on bad content.
    return (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError, EOFError,
            OverflowError, MemoryError, RecursionError, UnicodeError, OSError, zipfile.BadZipFile, zlib.error,
            struct.error)


def reading(what: str, path_arg: int = 0) -> Callable[[F], F]:
    """Decorator of a file importer: any parsing failure becomes a typed error naming the file.

    TwinRT's own errors pass through unchanged. Anything else a parser raises on malformed content
    (see :func:`_malformed_content_errors`) becomes :class:`DicomImportError` (for DICOM readers,
    ``what`` starting with "DICOM") or :class:`DamagedFileError`, naming the file (the importer's
    argument ``path_arg``), the reader's complaint and what to do. Found by fuzzing (issue 10).

    :param what: what the file should be, e.g. ``"DICOM RTSTRUCT"`` or ``"timeline folder"``.
    """
    import functools

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except TwinRTError:
                raise
            except _malformed_content_errors() as exc:
                path = args[path_arg] if len(args) > path_arg else next(iter(kwargs.values()), None)
                if isinstance(exc, FileNotFoundError):
                    raise MissingInputError(f"{path}: {exc.strerror or exc}; check the path", path) from exc
                cls = DicomImportError if what.startswith("DICOM") else DamagedFileError
                raise cls(f"{path} is not a readable {what}: {type(exc).__name__}: {str(exc)[:300]}. The file is "
                          "damaged or not what was expected; export it again from its source", path) from exc
        return wrapper  # type: ignore[return-value]

    return decorate
