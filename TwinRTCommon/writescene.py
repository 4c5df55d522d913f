"""Write the Slicer scene (.mrb) of a DICOM patient folder, without the Slicer application.

Usage::

    python -m TwinRTCommon.writescene --dicom PATIENT_FOLDER --mrb OUT.mrb

Runs with ``slicer-core`` installed (``pip install 'twinrt[slicer]'``) or with Slicer's
``PythonSlicer``. The core pipeline (``twinrt run``) calls it in a child process because the core
never imports slicer. The case is imported with :func:`twinrt.dicom.folder.import_case`, put in a
headless scene with :func:`TwinRTCommon.mrmlio.caseToScene` and saved atomically, so on any error
nothing is written and the exit status is non-zero:

* 0: the .mrb was written;
* 2: bad input (missing folder, unreadable DICOM, NaN dose...): the message says what to fix;
* 1: an unexpected failure (a bug): the traceback is printed.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence


def buildParser() -> argparse.ArgumentParser:
    """Command-line options of the scene writer."""
    parser = argparse.ArgumentParser(prog="python -m TwinRTCommon.writescene",
                                     description="Write a Slicer scene bundle (.mrb) of a DICOM patient "
                                                 "folder (research use only).")
    parser.add_argument("--dicom", required=True, type=Path, help="folder with the patient's DICOM files")
    parser.add_argument("--mrb", required=True, type=Path, help="scene bundle to write (.mrb)")
    parser.add_argument("--dose", default=None, help="dose whose DVH goes in the scene (default: reference)")
    parser.add_argument("--no-dvh", action="store_true", help="do not add the DVH tables and chart")
    return parser


def writeScene(dicomDir: Path, mrbPath: Path, doseName: Optional[str] = None, computeDvh: bool = True) -> Path:
    """Import ``dicomDir`` and save its scene to ``mrbPath``.

    :param dicomDir: folder with the patient's DICOM files.
    :param mrbPath: the .mrb to write (replaced atomically if it exists).
    :param doseName: dose for the DVH (default: ``reference`` or the first dose).
    :param computeDvh: add DVH metrics, tables and chart.
    :return: ``mrbPath``.
    :raises twinrt.errors.TwinRTError: for bad input; nothing is written then.
    """
    from twinrt.dicom.folder import import_case
    from twinrt.errors import InvalidInputError, MissingInputError

    from TwinRTCommon import mrmlio
    from TwinRTCommon.scene import makeScene

    if mrbPath.suffix.lower() != ".mrb":
        raise InvalidInputError(f"Output must be a .mrb file, got '{mrbPath}'")
    if not dicomDir.is_dir():
        raise MissingInputError(f"DICOM folder {dicomDir} does not exist; check the path", dicomDir)
    # Everything that can fail on bad input happens before the first byte is written.
    case = import_case(dicomDir)
    scene, _logics = makeScene()
    mrmlio.caseToScene(case, scene, doseName=doseName, computeDvh=computeDvh)
    return mrmlio.saveSceneMrb(scene, mrbPath)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit status (see the module docstring)."""
    args = buildParser().parse_args(argv)
    try:
        from twinrt.errors import TwinRTError
    except ImportError as exc:  # pragma: no cover - broken installation
        print(f"error: the twinrt package is not importable ({exc}); add the TwinRT folder to PYTHONPATH",
              file=sys.stderr)
        return 2
    try:
        import slicer  # noqa: F401  (fail early and clearly when slicer-core is missing)
    except ImportError:
        print("error: slicer-core is not installed; run 'pip install twinrt[slicer]' or use Slicer's "
              "PythonSlicer", file=sys.stderr)
        return 2
    try:
        path = writeScene(args.dicom, args.mrb, args.dose, not args.no_dvh)
    except TwinRTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # an unexpected failure is a bug: keep the traceback for the report
        traceback.print_exc()
        return 1
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
