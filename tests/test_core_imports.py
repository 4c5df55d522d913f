"""The core never imports Slicer, VTK, Qt or CTK, and loads heavy packages only lazily."""

import pkgutil
import subprocess
import sys

import twinrt


def test_core_modules_import_without_slicer_vtk_qt_or_heavy_packages():
    names = [m.name for m in pkgutil.walk_packages(twinrt.__path__, "twinrt.")]
    assert "twinrt.dicom.folder" in names and "twinrt.dvh" in names
    code = ("import importlib, sys\n"
            f"for n in {names!r}: importlib.import_module(n)\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'slicer', 'vtk', 'vtkmodules', 'qt', 'ctk', 'torch', 'monai'})\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
