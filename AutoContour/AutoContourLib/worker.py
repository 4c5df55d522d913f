"""The AutoContour worker: the organ-at-risk network on one CT, in its own process (STYLE.md section 6).

Run as a script; it never imports ``slicer``, so it runs with ``PythonSlicer`` inside Slicer and with
any Python that has numpy, torch and MONAI outside it::

    PythonSlicer worker.py --input in.npz --output out.npz [--model ID_OR_PATH] [--organs JSON]
        [--mc-samples N] [--models-dir DIR] [--core-dir DIR] [--device cpu|cuda] [--threads N]

It reads the CT the Logic exported (:func:`writeInput`), runs
:meth:`twinrt.autocontour.oar.OarSegmenter.segment_ct` and writes the organs (:func:`writeOutput`)
atomically, so the Logic never reads half a file. Its output lines (``PROGRESS``, ``ERRORTYPE``,
``ERROR``) and exit codes (2: a typed TwinRT error such as a volume that is not a CT, an unknown
model or organ, weights whose sha256 differs from their manifest entry; 1: a bug) are the protocol
of :mod:`TwinRTCommon.workerio`, which :mod:`TwinRTCommon.process` follows on the Logic's side.

The file also holds the npz layouts both sides share, so that the two cannot drift apart: the
input is the CT (k, j, i) in HU and its grid; the output the organ masks on that grid (packed, one
bit per voxel), their names (AAPM TG-263) and colours, the MC-dropout uncertainty map (float32,
only when computed) and what made them (model id, version, weights sha256, samples, seconds).
Run as a script, the file first puts ``--core-dir`` (the folder holding ``twinrt`` and
``TwinRTCommon``) on ``sys.path``, because only its own folder is there.
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
#: Keys an input and an output file must hold.
INPUT_KEYS = ("ct",) + GRID_KEYS
OUTPUT_KEYS = ("masks", "names", "colors", "meta") + GRID_KEYS


def writeInput(path: str | os.PathLike, ct) -> None:
    """Write what the worker needs: the CT and its grid.

    :param path: the npz file to write.
    :param ct: a :class:`twinrt.model.Image` in HU, (k, j, i) as ``slicer.util.arrayFromVolume`` gives it.
    """
    saveNpz(path, {"ct": np.ascontiguousarray(ct.array), **gridArrays(ct.grid)})


def readInput(path: str | os.PathLike):
    """Read a file written by :func:`writeInput`.

    :return: the CT (:class:`twinrt.model.Image`).
    :raises InvalidInputError: a damaged file (``GeometryError`` when the CT does not fit its grid).
    """
    from twinrt.errors import GeometryError
    from twinrt.model import Image

    arrays = loadNpz(path, INPUT_KEYS, "worker input")
    grid = gridFromArrays(arrays)
    if arrays["ct"].shape != tuple(grid.shape):
        raise GeometryError(f"The worker input's CT has shape {arrays['ct'].shape}, its grid says {grid.shape}")
    return Image(arrays["ct"], grid, "CT")


def writeOutput(path: str | os.PathLike, result, grid) -> None:
    """Write the organs the network found, their uncertainty and what made them.

    :param path: the npz file to write.
    :param result: a :class:`twinrt.autocontour.oar.OarResult`.
    :param grid: the CT's :class:`twinrt.geometry.Grid`, which the result's structures are on.
    """
    meta = {"model_id": result.model_id, "version": result.version, "sha256": result.sha256,
            "mc_samples": int(result.mc_samples), "seconds": float(result.seconds),
            "organ_uncertainty": {k: float(v) for k, v in result.organ_uncertainty.items()},
            "missing": list(result.missing), "notes": list(result.notes), "source": result.source,
            "research_use_only": _researchUseOnly()}
    masks = np.zeros((len(result.structures),) + tuple(grid.shape), dtype=bool)
    for index, structure in enumerate(result.structures):
        masks[index] = structure.mask
    arrays = {"masks": packMasks(masks),
              # (n,) unicode and (n, 3) uint8 arrays; the dtypes keep an empty list typed.
              "names": np.asarray([s.name for s in result.structures], dtype=str),
              "colors": np.asarray([tuple(s.color) for s in result.structures], dtype=np.uint8).reshape(-1, 3),
              "meta": textArray(json.dumps(meta)), **gridArrays(grid)}
    if result.uncertainty is not None:
        arrays["uncertainty"] = np.asarray(result.uncertainty.array, np.float32)
    saveNpz(path, arrays)


def readOutput(path: str | os.PathLike, grid) -> dict[str, Any]:
    """Read a file written by :func:`writeOutput` as structures on ``grid`` (the CT's).

    :param grid: the CT's :class:`twinrt.geometry.Grid`; the output must be on it.
    :return: the metadata (``model_id``, ``version``, ``sha256``, ``mc_samples``, ``seconds``,
        ``organ_uncertainty``, ``missing``, ``notes``, ``source``, ``research_use_only``) plus
        ``structures`` (:class:`twinrt.model.Structure` list, organs) and ``uncertainty`` (float32
        (k, j, i) array, or None when not computed).
    :raises InvalidInputError: a damaged file; ``GeometryError``: not on ``grid``.
    """
    from twinrt.errors import GeometryError, InvalidInputError
    from twinrt.model import Structure, StructureType

    arrays = loadNpz(path, OUTPUT_KEYS, "worker output")
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError as exc:
        raise InvalidInputError(f"The worker output {path} has damaged metadata ({exc})") from exc
    if not gridFromArrays(arrays).is_same(grid):
        raise GeometryError(f"The worker returned organs on a grid of shape {tuple(arrays['shape'])} for a CT of "
                            f"shape {grid.shape}")
    names = [str(n) for n in arrays["names"]]
    colors = np.asarray(arrays["colors"]).reshape(-1, 3)
    if len(colors) != len(names):
        raise InvalidInputError(f"The worker output holds {len(names)} organ names but {len(colors)} colours")
    masks = unpackMasks(arrays["masks"], len(names), tuple(grid.shape))
    uncertainty = arrays.get("uncertainty")
    meta["structures"] = [Structure(name, masks[index], grid, tuple(int(c) for c in colors[index]),
                                    StructureType.ORGAN) for index, name in enumerate(names)]
    if uncertainty is not None and uncertainty.shape != tuple(grid.shape):
        raise GeometryError(f"The worker's uncertainty map has shape {uncertainty.shape}, the CT {grid.shape}")
    meta["uncertainty"] = np.asarray(uncertainty, np.float32) if uncertainty is not None else None
    return meta


def _researchUseOnly() -> str:
    import twinrt

    return twinrt.RESEARCH_USE_ONLY


# ----------------------------------------------------------------------------------------- main
def parseArguments(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="TwinRT AutoContour organ-at-risk worker (research use only)")
    parser.add_argument("--input", required=True, help="npz written by AutoContourLib.worker.writeInput")
    parser.add_argument("--output", required=True, help="npz to write the organs to")
    parser.add_argument("--model", default="", help="model id or .json/.pt path; empty: the default model")
    parser.add_argument("--organs", default="", help="JSON list of organs (TG-263 or OpenKBP names); empty: all")
    parser.add_argument("--mc-samples", type=int, default=None,
                        help="MC-dropout passes for the uncertainty map (0: none); default the model's")
    parser.add_argument("--models-dir", default="",
                        help="folder of installed models (sets TWINRT_MODELS_DIR; models in its 'autocontour')")
    parser.add_argument("--core-dir", default="",
                        help="folder holding the twinrt and TwinRTCommon packages (put on sys.path)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def segment(arguments: argparse.Namespace) -> None:
    """Read the CT, run the network and write the organs (raises on failure)."""
    from twinrt.autocontour.classical import check_ct
    from twinrt.errors import InvalidInputError

    emitProgress(0.0, "Reading the CT")
    ct = readInput(arguments.input)
    # A volume that is not a CT is refused before torch is loaded (seconds).
    check_ct(ct)
    organs = None
    if arguments.organs:
        try:
            organs = json.loads(arguments.organs)
        except ValueError as exc:
            raise InvalidInputError(f"--organs is not valid JSON ({exc})") from exc
        if not isinstance(organs, list) or not all(isinstance(o, str) for o in organs):
            raise InvalidInputError("--organs must be a JSON list of organ names")
    emitProgress(0.02, "Loading the model")
    import torch

    from twinrt.autocontour.oar import OarSegmenter

    if arguments.threads > 0:
        torch.set_num_threads(int(arguments.threads))
    segmenter = OarSegmenter(arguments.model or None, arguments.device)
    emitProgress(0.1, f"Model {segmenter.model_id} {segmenter.version} loaded")

    def coreProgress(fraction: float, text: str) -> None:
        emitProgress(0.1 + 0.85 * fraction, text)

    result = segmenter.segment_ct(ct, organs, arguments.mc_samples, progress=coreProgress)
    emitProgress(0.97, "Writing the contours")
    writeOutput(arguments.output, result, ct.grid)
    emitProgress(1.0, f"Done in {result.seconds:.1f} s")


def main(argv: Optional[list[str]] = None) -> int:
    """Run the worker; returns the exit code (:mod:`TwinRTCommon.workerio`)."""
    arguments = parseArguments(argv)
    if arguments.core_dir and arguments.core_dir not in sys.path:
        sys.path.insert(0, arguments.core_dir)
    return runMain(lambda: segment(arguments), arguments.models_dir)


if __name__ == "__main__":
    sys.exit(main())
