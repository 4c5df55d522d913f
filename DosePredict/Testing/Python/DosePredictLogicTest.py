"""DosePredict headless: its DosePredictTest methods, descriptor, parameter node, Widget plumbing, .ui, icon, CMake.

Every check is in Testing/Python/module_checks.py (ModuleChecks), written once for the five modules.
"""

import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'twinrt[slicer]')")

from module_checks import ModuleChecks  # noqa: E402  (Testing/Python, put on sys.path by conftest.py)


class TestDosePredict(ModuleChecks):
    moduleName = "DosePredict"
