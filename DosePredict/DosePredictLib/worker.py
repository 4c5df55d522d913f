"""The DosePredict worker: one dose prediction in its own process (STYLE.md section 6).

Run as a script; it never imports ``slicer``, so it runs with ``PythonSlicer`` inside Slicer and with
any Python that has numpy, torch and MONAI outside it::

    PythonSlicer worker.py --input in.npz --output out.npz [--model ID_OR_PATH] [--mc-samples N]
        [--roi-map JSON] [--models-dir DIR] [--core-dir DIR] [--device cpu|cuda] [--threads N]

It reads the case the Logic exported (:func:`writeInput`), runs
:meth:`twinrt.dosepredict.predict.DosePredictor.predict_case` and writes the prediction
(:func:`writeOutput`) atomically, so the Logic never reads half a file. On stdout it prints one
line per event, flushed at once:

* ``PROGRESS <fraction 0..1> <text>`` while it works;
* ``ERRORTYPE <class name>`` then ``ERROR <message>`` when it fails.

Exit codes: 0 done (the output exists); 2 a typed TwinRT error (bad input, no such model, weights
whose sha256 does not match, a case without a PTV...), whose message says what to do; 1 anything
else (a bug: the traceback follows on stderr). A cancelled run is killed by the Logic and has no
exit code of its own.

Why a process: the model and torch's threads stay out of Slicer's process, a crash cannot take the
scene with it, and Cancel can stop the work at once by killing the process tree, whereas a thread
can only stop where it checks a token.

The file also holds the npz format both sides share (:func:`writeInput`/:func:`readInput`,
:func:`writeOutput`/:func:`readOutput`), so that the two cannot drift apart. Arrays keep the
(k, j, i) order of ``slicer.util.arrayFromVolume``. Only numpy is imported at module level; twinrt
is imported inside the functions, after ``--core-dir`` has put it on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import numpy as np

#: Version of the npz layout below; a worker refuses an input of another version.
FORMAT_VERSION = 1
#: Exit codes (module docstring).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INPUT_ERROR = 2
#: Prefixes of the lines the Logic parses (DosePredictLib.process).
PROGRESS_PREFIX = "PROGRESS"
ERROR_PREFIX = "ERROR"
ERROR_TYPE_PREFIX = "ERRORTYPE"

#: Keys an input file must hold.
INPUT_KEYS = ("format_version", "ct", "shape", "spacing", "origin", "direction", "masks", "names", "types",
              "prescriptions", "metadata")


# ------------------------------------------------------------------------------------------ lines
def _oneLine(text: str) -> str:
    # A message with a newline would be cut in two by the line-based protocol.
    return " ".join(str(text).split())


def emitProgress(fraction: float, text: str) -> None:
    """Print a ``PROGRESS`` line (flushed: the Logic reads the pipe while the worker runs)."""
    fraction = min(max(float(fraction), 0.0), 1.0)
    print(f"{PROGRESS_PREFIX} {fraction:.4f} {_oneLine(text)}", flush=True)


def emitError(exc: BaseException) -> None:
    """Print the error's class name and message, so the Logic can raise the same type."""
    print(f"{ERROR_TYPE_PREFIX} {type(exc).__name__}", flush=True)
    print(f"{ERROR_PREFIX} {_oneLine(str(exc)) or type(exc).__name__}", flush=True)


# ----------------------------------------------------------------------------------- npz format
def _text(value: Any) -> np.ndarray:
    """A unicode array (not an object array: files are read with ``allow_pickle=False``)."""
    return np.asarray(str(value))


def _saveNpz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed npz atomically (temporary sibling, then rename).

    Uncompressed: the file lives a few seconds in a temporary folder and compressing a CT and its
    masks would cost more time than writing them.
    """
    from twinrt.io_utils import atomic_path

    with atomic_path(path) as tmp:
        # A file object, not a name: np.savez appends ".npz" to a name that lacks it.
        with open(tmp, "wb") as stream:
            np.savez(stream, **arrays)


def _loadNpz(path: str | os.PathLike, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    from twinrt.errors import InvalidInputError, MissingInputError

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"The {what} {path} does not exist", path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:  # numpy raises several unrelated types for a damaged file
        raise InvalidInputError(f"The {what} {path} is not a readable npz file ({exc})") from exc
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise InvalidInputError(f"The {what} {path} lacks {', '.join(missing)}; it was not written by "
                                "this version of DosePredict")
    if int(arrays["format_version"]) != FORMAT_VERSION:
        raise InvalidInputError(f"The {what} {path} has format version {int(arrays['format_version'])}; "
                                f"this worker reads version {FORMAT_VERSION}")
    return arrays


def _packMasks(masks: np.ndarray) -> np.ndarray:
    """(n, k, j, i) bool -> (n, ceil(k*j*i / 8)) uint8: a CT-sized mask costs one bit per voxel, not a byte."""
    # An explicit size: reshape(0, -1) is ambiguous for a case without structures.
    return np.packbits(masks.reshape(masks.shape[0], int(np.prod(masks.shape[1:]))), axis=1)


def _unpackMasks(packed: np.ndarray, count: int, shape: tuple[int, ...]) -> np.ndarray:
    from twinrt.errors import GeometryError

    voxels = int(np.prod(shape))
    if packed.ndim != 2 or packed.shape[0] != count or packed.shape[1] != (voxels + 7) // 8:
        raise GeometryError(f"The worker input holds packed masks of shape {packed.shape}; expected {count} masks "
                            f"of {shape} voxels")
    return np.unpackbits(packed, axis=1, count=voxels).reshape((count,) + tuple(shape)).astype(bool)


def writeInput(path: str | os.PathLike, case, possibleDoseMask: Optional[np.ndarray] = None) -> None:
    """Write what the worker needs of a case: CT, grid, structures, prescriptions.

    :param path: the npz file to write.
    :param case: a :class:`twinrt.model.Case` (structures not on the CT grid are resampled onto it);
        the Logic passes only the structures the ROI mapping uses.
    :param possibleDoseMask: optional (k, j, i) bool mask of the voxels that may receive dose;
        without one the worker uses the body thresholded from the CT.
    """
    import dataclasses

    grid = case.ct.grid
    masks = np.zeros((len(case.structures),) + tuple(grid.shape), dtype=bool)
    for index, structure in enumerate(case.structures):
        masks[index] = structure.mask if structure.grid.is_same(grid) else structure.on_grid(grid)
    metadata = {"patient_id": case.patient_id}
    for key in ("patient_position", "body_site", "source"):
        if isinstance(case.metadata.get(key), str):
            metadata[key] = case.metadata[key]
    arrays = {
        "format_version": np.asarray(FORMAT_VERSION),
        "ct": np.ascontiguousarray(case.ct.array),
        "shape": np.asarray(grid.shape, dtype=np.int64),
        "spacing": np.asarray(grid.spacing_mm, dtype=float),
        "origin": np.asarray(grid.origin_mm, dtype=float),
        "direction": np.asarray(grid.direction, dtype=float),
        "masks": _packMasks(masks),
        # An (n,) unicode array; np.asarray of an empty list would be float, hence the dtype.
        "names": np.asarray([s.name for s in case.structures], dtype=str),
        "types": np.asarray([s.type.name for s in case.structures], dtype=str),
        "prescriptions": _text(json.dumps([dataclasses.asdict(p) for p in case.prescriptions])),
        "metadata": _text(json.dumps(metadata)),
    }
    if possibleDoseMask is not None:
        arrays["possible_dose_mask"] = _packMasks(np.asarray(possibleDoseMask, dtype=bool)[None])
    _saveNpz(path, arrays)


def readInput(path: str | os.PathLike):
    """Read a file written by :func:`writeInput`.

    :return: ``(case, possibleDoseMask or None)``.
    :raises InvalidInputError: a damaged or inconsistent file (``GeometryError`` for shapes).
    """
    from twinrt.errors import GeometryError, InvalidInputError
    from twinrt.geometry import Grid
    from twinrt.model import Case, Image, Prescription, Structure, StructureType

    arrays = _loadNpz(path, INPUT_KEYS, "worker input")
    shape = tuple(int(n) for n in arrays["shape"])
    grid = Grid(shape, tuple(arrays["spacing"]), tuple(arrays["origin"]), np.asarray(arrays["direction"]))
    ct = arrays["ct"]
    if ct.shape != shape:
        raise GeometryError(f"The worker input's CT has shape {ct.shape}, its grid says {shape}")
    names = [str(n) for n in arrays["names"]]
    types = [str(t) for t in arrays["types"]]
    if len(types) != len(names):
        raise GeometryError(f"The worker input holds {len(names)} structure names but {len(types)} types")
    masks = _unpackMasks(arrays["masks"], len(names), shape)
    structures = [Structure(name, masks[index].astype(bool), grid,
                            type=StructureType[types[index]] if types[index] in StructureType.__members__
                            else StructureType.guess(name))
                  for index, name in enumerate(names)]
    try:
        metadata = json.loads(str(arrays["metadata"]))
        prescriptions = [Prescription(**p) for p in json.loads(str(arrays["prescriptions"]))]
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"The worker input's metadata or prescriptions are damaged ({exc})") from exc
    patientId = str(metadata.pop("patient_id", "") or "anonymous")
    metadata["prescriptions"] = prescriptions
    possibleDoseMask = arrays.get("possible_dose_mask")
    if possibleDoseMask is not None:
        possibleDoseMask = _unpackMasks(possibleDoseMask, 1, shape)[0]
        # The core reads the mask from here (twinrt.dosepredict.inputs.prepare_case).
        metadata["possible_dose_mask"] = possibleDoseMask
    return Case(patientId, Image(ct, grid, "CT"), structures, {}, [], metadata), possibleDoseMask


def writeOutput(path: str | os.PathLike, result, modelVersion: str = "") -> None:
    """Write a prediction: the dose, its standard deviation when computed, and what made it.

    :param path: the npz file to write.
    :param result: a :class:`twinrt.dosepredict.predict.PredictionResult`.
    :param modelVersion: the model's version (the result does not carry it).
    """
    meta = {"model_id": result.model_id, "model_version": modelVersion, "sha256": result.sha256,
            "roi_map": dict(result.roi_map), "warnings": list(result.warnings), "seconds": float(result.seconds),
            "mc_samples": int(result.mc_samples), "research_use_only": result.research_use_only,
            "dose_source": result.dose.source, "std_source": result.std.source if result.std is not None else ""}
    arrays = {"format_version": np.asarray(FORMAT_VERSION), "dose": np.asarray(result.dose.array, np.float32),
              "meta": _text(json.dumps(meta))}
    if result.std is not None:
        arrays["std"] = np.asarray(result.std.array, np.float32)
    _saveNpz(path, arrays)


def readOutput(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`writeOutput`.

    :return: the metadata dict (``model_id``, ``model_version``, ``sha256``, ``roi_map``,
        ``warnings``, ``seconds``, ``mc_samples``, ``research_use_only``, ``dose_source``,
        ``std_source``) plus ``dose`` and ``std`` (float32 arrays; ``std`` is None when not computed).
    """
    from twinrt.errors import InvalidInputError

    arrays = _loadNpz(path, ("format_version", "dose", "meta"), "worker output")
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError as exc:
        raise InvalidInputError(f"The worker output {path} has damaged metadata ({exc})") from exc
    meta["dose"] = arrays["dose"]
    meta["std"] = arrays.get("std")
    return meta


# ----------------------------------------------------------------------------------------- main
def parseArguments(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="TwinRT DosePredict worker (research use only)")
    parser.add_argument("--input", required=True, help="npz written by DosePredictLib.worker.writeInput")
    parser.add_argument("--output", required=True, help="npz to write the prediction to")
    parser.add_argument("--model", default="", help="model id or .pt/.json path; empty: the default model")
    parser.add_argument("--mc-samples", type=int, default=None,
                        help="MC-dropout passes for the standard deviation (0: none); default the model's")
    parser.add_argument("--roi-map", default="", help="JSON object: model ROI -> structure name; default automatic")
    parser.add_argument("--models-dir", default="", help="folder of installed models (sets TWINRT_MODELS_DIR)")
    parser.add_argument("--core-dir", default="", help="folder holding the twinrt package (put on sys.path)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def predict(arguments: argparse.Namespace) -> None:
    """Read the input, predict and write the output (raises on failure)."""
    from twinrt.errors import InvalidInputError

    emitProgress(0.0, "Reading the case")
    case, _possibleDoseMask = readInput(arguments.input)
    roiMap = None
    if arguments.roi_map:
        try:
            roiMap = json.loads(arguments.roi_map)
        except ValueError as exc:
            raise InvalidInputError(f"--roi-map is not valid JSON ({exc})") from exc
        if not isinstance(roiMap, dict):
            raise InvalidInputError("--roi-map must be a JSON object: model ROI -> structure name")
    emitProgress(0.02, "Loading the model")
    # Imported here: torch and MONAI take seconds to load, and a bad input is reported before that.
    from twinrt.dosepredict.predict import DosePredictor

    predictor = DosePredictor(arguments.model or None, arguments.device, arguments.threads or None)
    emitProgress(0.1, f"Model {predictor.model_id} loaded")

    def coreProgress(fraction: float, text: str) -> None:
        emitProgress(0.1 + 0.85 * fraction, text)

    # The core cuts the dose to the possible-dose mask on the CT grid (the mask readInput put in the
    # case's metadata, else the body).
    result = predictor.predict_case(case, roiMap, arguments.mc_samples, progress=coreProgress)
    emitProgress(0.97, "Writing the prediction")
    writeOutput(arguments.output, result, predictor.version)
    emitProgress(1.0, f"Done in {result.seconds:.1f} s")


def main(argv: Optional[list[str]] = None) -> int:
    """Run the worker; returns the exit code (module docstring)."""
    arguments = parseArguments(argv)
    if arguments.core_dir and arguments.core_dir not in sys.path:
        sys.path.insert(0, arguments.core_dir)
    if arguments.models_dir:
        os.environ["TWINRT_MODELS_DIR"] = arguments.models_dir
    start = time.perf_counter()
    try:
        from twinrt.errors import TwinRTError
    except ImportError as exc:
        emitError(exc)
        print("The twinrt package is not importable; pass --core-dir (the folder holding twinrt)", file=sys.stderr)
        return EXIT_FAILED
    try:
        predict(arguments)
    except TwinRTError as exc:
        emitError(exc)
        return EXIT_INPUT_ERROR
    except Exception as exc:  # a bug: report it, with the traceback for the log
        traceback.print_exc()
        emitError(exc)
        return EXIT_FAILED
    print(f"Worker finished in {time.perf_counter() - start:.1f} s", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
