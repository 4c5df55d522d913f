"""Headless tests of DosePredict against a real slicer-core scene: every check in Testing/Python/module_checks.py.

That is DosePredictTest's methods (the same ones Slicer's runner runs) under the harness in
Testing/Python/slicer_harness.py, plus the module descriptor, the parameter node, the Widget's
parameter-node plumbing, the .ui file, the icon and the CMake listing.
"""

import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'twinrt[slicer]')")

from module_checks import ModuleChecks  # noqa: E402  (Testing/Python, put on sys.path by conftest.py)


class TestDosePredict(ModuleChecks):
    moduleName = "DosePredict"
