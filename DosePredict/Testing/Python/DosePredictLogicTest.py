"""Headless tests of DosePredict's Logic against a real slicer-core scene (widgets are not exercised).

Runs DosePredictTest's methods (the same ones Slicer's runner runs) under the harness in
Testing/Python/slicer_harness.py, plus checks of the module descriptor, the parameter node, the
.ui file, the icon and the CMake listing.
"""

import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'twinrt[slicer]')")

import module_checks  # noqa: E402  (Testing/Python, put on sys.path by conftest.py)
import slicer_harness  # noqa: E402

MODULE_NAME = "DosePredict"
module = slicer_harness.importModule(MODULE_NAME)


@pytest.mark.parametrize("methodName", slicer_harness.selfTestNames(module.DosePredictTest))
def test_selfTest(slicerScene, methodName):
    """Each DosePredictTest method passes headless."""
    slicer_harness.runSelfTest(module.DosePredictTest, methodName)


def test_runTestRunsEveryMethod(slicerScene):
    """runTest (what ctest calls in Slicer) runs every test method."""
    module_checks.checkRunTestCoversMethods(module.DosePredictTest)


def test_moduleDescriptor(slicerScene):
    """Title, category, research-use help text and the sample-data hook."""
    module_checks.checkModuleDescriptor(module, MODULE_NAME)


def test_parameterNodeIsSceneSingleton(slicerScene):
    """getParameterNode returns the same scripted-module node, stored in the scene."""
    module_checks.checkParameterNodeSingleton(module.DosePredictLogic(), MODULE_NAME, slicerScene)


def test_stageErrorNamesIssue(slicerScene):
    """The stage error and the status text name issue 5."""
    logic = module.DosePredictLogic()
    assert "issue 5" in logic.stageStatusText()
    error = logic.stageNotAvailable()
    assert "issue 5" in str(error)
    assert isinstance(error, RuntimeError)


def test_uiFile():
    """The .ui is valid Qt Designer XML binding every parameter, with status and research labels."""
    fields = list(module.DosePredictParameterNode.allParameters)
    module_checks.checkUiFile(MODULE_NAME, fields, "issue 5")


def test_iconAndCMakeLists():
    """128x128 icon; CMakeLists lists files that exist and keeps the generic tests."""
    module_checks.checkIcon(MODULE_NAME)
    module_checks.checkModuleCMakeLists(MODULE_NAME)
