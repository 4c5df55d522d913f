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

    # What parsers (pydicom, json, csv, numpy's npz, zipfile, int()/float() of element values) raise
    # on bad content. Found by fuzzing every importer (issue 10).
    errors: tuple[type[BaseException], ...] = (
        ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError, EOFError, OverflowError,
        RecursionError, UnicodeError, OSError, zipfile.BadZipFile, zlib.error, struct.error)
    try:  # pydicom's own exceptions derive from Exception only (e.g. an odd-length value: BytesLengthException)
        from pydicom.errors import BytesLengthException, InvalidDicomError

        errors += (BytesLengthException, InvalidDicomError)
    except ImportError:
        pass
    return errors


def reading(what: str, path_arg: str = "") -> Callable[[F], F]:
    """Decorator of a file importer: a parsing failure becomes a typed error naming the file.

    TwinRT's own errors pass through unchanged, and so do wrong calls (the arguments are bound before
    the importer runs). What a parser raises on malformed content (see :func:`_malformed_content_errors`)
    becomes :class:`DicomImportError` (readers whose ``what`` starts with "DICOM") or
    :class:`DamagedFileError`, naming the file, the reader's complaint and what to do; a file that
    cannot be opened for permissions, or that does not fit in memory, says so. The traceback is logged
    at DEBUG (for a bug report, if the file is in fact valid).

    :param what: what the file should be, e.g. ``"DICOM RTSTRUCT file"`` or ``"timeline folder"``.
    :param path_arg: name of the importer's parameter holding the path (default: its first parameter
        other than ``self``/``cls``).
    """
    import functools
    import inspect
    import logging

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        names = [n for n in signature.parameters if n not in ("self", "cls")]
        key = path_arg or names[0]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)  # a wrong call is a TypeError of the caller's
            path = bound.arguments.get(key)
            try:
                return fn(*args, **kwargs)
            except TwinRTError:
                raise
            except FileNotFoundError as exc:
                raise MissingInputError(f"{path}: {exc.strerror or exc}; check the path", path) from exc
            except PermissionError as exc:
                raise MissingInputError(f"{path} cannot be read ({exc.strerror or exc}); check its permissions",
                                        path) from exc
            except MemoryError as exc:
                raise InvalidInputError(f"{path} does not fit in memory as a {what}; check its size (rows, "
                                        "columns, number of slices) or free memory") from exc
            except _malformed_content_errors() as exc:
                logging.getLogger(fn.__module__).debug("reading %s failed", path, exc_info=True)
                cls = DicomImportError if what.startswith("DICOM") else DamagedFileError
                raise cls(f"{path} is not a readable {what}: {type(exc).__name__}: {str(exc)[:300]}. The file is "
                          "damaged or not what was expected: export it again from its source (if it is valid, "
                          "please report a bug with this message)", path) from exc
        return wrapper  # type: ignore[return-value]

    return decorate
