"""The DosePredict worker: one dose prediction in its own process (STYLE.md section 6).

Run as a script; it never imports ``slicer``, so it runs with ``PythonSlicer`` inside Slicer and with
any Python that has numpy, torch and MONAI outside it::

    PythonSlicer worker.py --input in.npz --output out.npz [--model ID_OR_PATH] [--mc-samples N]
        [--roi-map JSON] [--models-dir DIR] [--core-dir DIR] [--device cpu|cuda] [--threads N]

It reads the case the Logic exported (:func:`writeInput`), runs
:meth:`twinrt.dosepredict.predict.DosePredictor.predict_case` and writes the prediction
(:func:`writeOutput`) atomically, so the Logic never reads half a file. Its output lines
(``PROGRESS``, ``ERRORTYPE``, ``ERROR``) and exit codes (2: a typed TwinRT error such as a case
without a PTV; 1: a bug) are the protocol of :mod:`TwinRTCommon.workerio`, which
:mod:`TwinRTCommon.process` follows on the Logic's side.

Why a process: the model and torch's threads stay out of Slicer's process, a crash cannot take the
scene with it, and Cancel can stop the work at once by killing the process tree, whereas a thread
can only stop where it checks a token.

The file also holds the npz layouts both sides share (:func:`writeInput`/:func:`readInput`,
:func:`writeOutput`/:func:`readOutput`), so that the two cannot drift apart; the helpers under them
are :mod:`TwinRTCommon.workerio`'s. Only numpy and that module are imported at module level; twinrt
is imported inside the functions. Run as a script, the file first puts ``--core-dir`` (the folder
holding ``twinrt`` and ``TwinRTCommon``) on ``sys.path``, because only its own folder is there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

if __name__ == "__main__":
    # A script has only its own folder on sys.path: --core-dir (the folder holding twinrt and
    # TwinRTCommon) goes first, before the TwinRTCommon import below.
    _bootstrap = argparse.ArgumentParser(add_help=False)
    _bootstrap.add_argument("--core-dir", default="")
    _coreDir = _bootstrap.parse_known_args()[0].core_dir
    if _coreDir and _coreDir not in sys.path:
        sys.path.insert(0, _coreDir)

from TwinRTCommon.workerio import (GRID_KEYS, emitProgress, gridArrays, gridFromArrays, loadNpz,  # noqa: E402
                                   packMasks, runMain, saveNpz, textArray, unpackMasks)

#: This script (what :func:`TwinRTCommon.process.runWorker` runs).
WORKER_SCRIPT = Path(__file__).resolve().with_name("worker.py")
#: Keys an input file must hold.
INPUT_KEYS = ("ct",) + GRID_KEYS + ("masks", "names", "types", "prescriptions", "metadata")


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
        "ct": np.ascontiguousarray(case.ct.array),
        **gridArrays(grid),
        "masks": packMasks(masks),
        # An (n,) unicode array; np.asarray of an empty list would be float, hence the dtype.
        "names": np.asarray([s.name for s in case.structures], dtype=str),
        "types": np.asarray([s.type.name for s in case.structures], dtype=str),
        "prescriptions": textArray(json.dumps([dataclasses.asdict(p) for p in case.prescriptions])),
        "metadata": textArray(json.dumps(metadata)),
    }
    if possibleDoseMask is not None:
        arrays["possible_dose_mask"] = packMasks(np.asarray(possibleDoseMask, dtype=bool)[None])
    saveNpz(path, arrays)


def readInput(path: str | os.PathLike):
    """Read a file written by :func:`writeInput`.

    :return: ``(case, possibleDoseMask or None)``.
    :raises InvalidInputError: a damaged or inconsistent file (``GeometryError`` for shapes).
    """
    from twinrt.errors import GeometryError, InvalidInputError
    from twinrt.model import Case, Image, Prescription, Structure, StructureType

    arrays = loadNpz(path, INPUT_KEYS, "worker input")
    grid = gridFromArrays(arrays)
    shape = grid.shape
    ct = arrays["ct"]
    if ct.shape != shape:
        raise GeometryError(f"The worker input's CT has shape {ct.shape}, its grid says {shape}")
    names = [str(n) for n in arrays["names"]]
    types = [str(t) for t in arrays["types"]]
    if len(types) != len(names):
        raise GeometryError(f"The worker input holds {len(names)} structure names but {len(types)} types")
    masks = unpackMasks(arrays["masks"], len(names), shape)
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
        possibleDoseMask = unpackMasks(possibleDoseMask, 1, shape)[0]
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
    arrays = {"dose": np.asarray(result.dose.array, np.float32), "meta": textArray(json.dumps(meta))}
    if result.std is not None:
        arrays["std"] = np.asarray(result.std.array, np.float32)
    saveNpz(path, arrays)


def readOutput(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`writeOutput`.

    :return: the metadata dict (``model_id``, ``model_version``, ``sha256``, ``roi_map``,
        ``warnings``, ``seconds``, ``mc_samples``, ``research_use_only``, ``dose_source``,
        ``std_source``) plus ``dose`` and ``std`` (float32 arrays; ``std`` is None when not computed).
    """
    from twinrt.errors import InvalidInputError

    arrays = loadNpz(path, ("dose", "meta"), "worker output")
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
    parser.add_argument("--core-dir", default="",
                        help="folder holding the twinrt and TwinRTCommon packages (put on sys.path)")
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
    """Run the worker; returns the exit code (:mod:`TwinRTCommon.workerio`)."""
    arguments = parseArguments(argv)
    if arguments.core_dir and arguments.core_dir not in sys.path:
        sys.path.insert(0, arguments.core_dir)
    return runMain(lambda: predict(arguments), arguments.models_dir)


if __name__ == "__main__":
    sys.exit(main())
