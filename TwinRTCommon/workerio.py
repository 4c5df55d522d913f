"""What a module's worker process and its Logic share: the line protocol and the npz helpers.

A worker (``DosePredictLib/worker.py``, ``AutoContourLib/worker.py``) runs one long computation in its
own process (STYLE.md section 6) and :mod:`TwinRTCommon.process` starts and follows it. Both sides
import this file, so the protocol exists once:

* stdout carries one line per event, flushed at once: ``PROGRESS <fraction 0..1> <text>`` while
  the worker works, ``ERRORTYPE <class name>`` then ``ERROR <message>`` when it fails; every other
  line is log text;
* exit codes: :data:`EXIT_OK` (the output file exists), :data:`EXIT_INPUT_ERROR` (a typed TwinRT
  error whose message says what to do: bad input, no such model, weights whose sha256 does not
  match...), :data:`EXIT_FAILED` (anything else: a bug, with the traceback on stderr). A cancelled
  worker is killed by the Logic and has no exit code of its own;
* data travels in uncompressed npz files written atomically, arrays in the (k, j, i) order of
  ``slicer.util.arrayFromVolume``, masks packed to one bit per voxel, text as unicode arrays (files
  are read with ``allow_pickle=False``).

A worker runs as ``python worker.py --core-dir DIR ...`` with only its own folder on ``sys.path``; it
puts ``--core-dir`` (the folder holding ``twinrt`` and ``TwinRTCommon``) on ``sys.path`` before it
imports this module. So this file imports only numpy at module level and never ``slicer``; twinrt is
imported inside the functions that need it.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

#: Version of the npz layouts; a reader refuses a file of another version.
FORMAT_VERSION = 1
#: Exit codes (module docstring).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INPUT_ERROR = 2
#: Prefixes of the lines the Logic parses (:func:`parseLine`).
PROGRESS_PREFIX = "PROGRESS"
ERROR_PREFIX = "ERROR"
ERROR_TYPE_PREFIX = "ERRORTYPE"


# ------------------------------------------------------------------------------------------ lines
def oneLine(text: str) -> str:
    """``text`` on one line: a newline would cut a message in two in the line-based protocol."""
    return " ".join(str(text).split())


def emitProgress(fraction: float, text: str) -> None:
    """Print a ``PROGRESS`` line (flushed: the Logic reads the pipe while the worker runs)."""
    fraction = min(max(float(fraction), 0.0), 1.0)
    print(f"{PROGRESS_PREFIX} {fraction:.4f} {oneLine(text)}", flush=True)


def emitError(exc: BaseException) -> None:
    """Print the error's class name and message, so the Logic can raise the same type."""
    print(f"{ERROR_TYPE_PREFIX} {type(exc).__name__}", flush=True)
    print(f"{ERROR_PREFIX} {oneLine(str(exc)) or type(exc).__name__}", flush=True)


def parseLine(line: str) -> tuple[str, object, str]:
    """Classify one output line of a worker.

    :return: ``("progress", fraction, text)``, ``("error", None, message)``,
        ``("errortype", None, class name)`` or ``("log", None, line)``.
    """
    kind, _, rest = line.partition(" ")
    if kind == PROGRESS_PREFIX:
        value, _, text = rest.partition(" ")
        try:
            return "progress", min(max(float(value), 0.0), 1.0), text
        except ValueError:
            return "log", None, line
    if kind == ERROR_PREFIX:
        return "error", None, rest
    if kind == ERROR_TYPE_PREFIX:
        return "errortype", None, rest.strip()
    return "log", None, line


def runMain(work: Callable[[], None], modelsDir: str = "") -> int:
    """Run a worker's computation and turn its outcome into the protocol's exit code and lines.

    :param work: the computation; it reads its input, reports with :func:`emitProgress` and writes
        its output, raising on failure.
    :param modelsDir: folder of installed models; when given it becomes ``$TWINRT_MODELS_DIR``.
    :return: the exit code (module docstring).
    """
    if modelsDir:
        os.environ["TWINRT_MODELS_DIR"] = str(modelsDir)
    start = time.perf_counter()
    try:
        from twinrt.errors import TwinRTError
    except ImportError as exc:
        emitError(exc)
        print("The twinrt package is not importable; pass --core-dir (the folder holding twinrt)", file=sys.stderr)
        return EXIT_FAILED
    try:
        work()
    except TwinRTError as exc:
        emitError(exc)
        return EXIT_INPUT_ERROR
    except Exception as exc:  # a bug: report it, with the traceback for the log
        traceback.print_exc()
        emitError(exc)
        return EXIT_FAILED
    print(f"Worker finished in {time.perf_counter() - start:.1f} s", flush=True)
    return EXIT_OK


# ----------------------------------------------------------------------------------- npz format
def textArray(value: Any) -> np.ndarray:
    """A unicode array (not an object array: files are read with ``allow_pickle=False``)."""
    return np.asarray(str(value))


def saveNpz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed npz atomically (temporary sibling, then rename).

    Uncompressed: the file lives a few seconds in a temporary folder and compressing a CT and its
    masks would cost more time than writing them. ``format_version`` is added when missing.
    """
    from twinrt.io_utils import atomic_path

    arrays = {"format_version": np.asarray(FORMAT_VERSION), **arrays}
    with atomic_path(path) as tmp:
        # A file object, not a name: np.savez appends ".npz" to a name that lacks it.
        with open(tmp, "wb") as stream:
            np.savez(stream, **arrays)


def loadNpz(path: str | os.PathLike, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """Read an npz written by :func:`saveNpz` and check that it holds ``keys``.

    :param what: what the file is, for the messages (``"worker input"``).
    :raises MissingInputError: no such file.
    :raises InvalidInputError: not an npz, a key missing, or another format version.
    """
    from twinrt.errors import InvalidInputError, MissingInputError

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"The {what} {path} does not exist", path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:  # numpy raises several unrelated types for a damaged file
        raise InvalidInputError(f"The {what} {path} is not a readable npz file ({exc})") from exc
    missing = [key for key in ("format_version",) + tuple(keys) if key not in arrays]
    if missing:
        raise InvalidInputError(f"The {what} {path} lacks {', '.join(missing)}; it was not written by "
                                "this version of TwinRT")
    if int(arrays["format_version"]) != FORMAT_VERSION:
        raise InvalidInputError(f"The {what} {path} has format version {int(arrays['format_version'])}; "
                                f"this version of TwinRT reads version {FORMAT_VERSION}")
    return arrays


def packMasks(masks: np.ndarray) -> np.ndarray:
    """(n, k, j, i) bool -> (n, ceil(k*j*i / 8)) uint8: a CT-sized mask costs one bit per voxel, not a byte."""
    # An explicit size: reshape(0, -1) is ambiguous for a case without structures.
    return np.packbits(masks.reshape(masks.shape[0], int(np.prod(masks.shape[1:]))), axis=1)


def unpackMasks(packed: np.ndarray, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`packMasks`: ``count`` bool masks of ``shape``.

    :raises GeometryError: ``packed`` does not hold ``count`` masks of that shape.
    """
    from twinrt.errors import GeometryError

    voxels = int(np.prod(shape))
    if packed.ndim != 2 or packed.shape[0] != count or packed.shape[1] != (voxels + 7) // 8:
        raise GeometryError(f"The worker file holds packed masks of shape {packed.shape}; expected {count} masks "
                            f"of {shape} voxels")
    return np.unpackbits(packed, axis=1, count=voxels).reshape((count,) + tuple(shape)).astype(bool)


#: Keys :func:`gridArrays` writes.
GRID_KEYS = ("shape", "spacing", "origin", "direction")


def gridArrays(grid) -> dict[str, np.ndarray]:
    """The arrays that describe a :class:`twinrt.geometry.Grid` in a worker file."""
    return {"shape": np.asarray(grid.shape, dtype=np.int64), "spacing": np.asarray(grid.spacing_mm, dtype=float),
            "origin": np.asarray(grid.origin_mm, dtype=float), "direction": np.asarray(grid.direction, dtype=float)}


def gridFromArrays(arrays: dict[str, np.ndarray]):
    """The :class:`twinrt.geometry.Grid` written by :func:`gridArrays`."""
    from twinrt.geometry import Grid

    shape = tuple(int(n) for n in arrays["shape"])
    return Grid(shape, tuple(float(s) for s in arrays["spacing"]), tuple(float(o) for o in arrays["origin"]),
                np.asarray(arrays["direction"]))


__all__ = ["FORMAT_VERSION", "EXIT_OK", "EXIT_FAILED", "EXIT_INPUT_ERROR", "PROGRESS_PREFIX", "ERROR_PREFIX",
           "ERROR_TYPE_PREFIX", "GRID_KEYS", "oneLine", "emitProgress", "emitError", "parseLine", "runMain",
           "textArray", "saveNpz", "loadNpz", "packMasks", "unpackMasks", "gridArrays", "gridFromArrays"]
