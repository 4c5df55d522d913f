"""AIPlanner headless: its AIPlannerTest methods, descriptor, parameter node, Widget plumbing, .ui, icon, CMake.

Every check is in Testing/Python/module_checks.py (ModuleChecks), written once for the five modules.
"""

import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'twinrt[slicer]')")

from module_checks import ModuleChecks  # noqa: E402  (Testing/Python, put on sys.path by conftest.py)


class TestAIPlanner(ModuleChecks):
    moduleName = "AIPlanner"


# The SlicerRT plan optimizer cannot run here (no SlicerRT outside Slicer): these check only that it
# stays out of the way without SlicerRT and that its pure parts translate SlicerRT's objectives.
def test_slicerRtOptimizerIsGuardedWithoutSlicerRT(slicerScene):
    import slicer_harness

    slicer_harness.importModule("AIPlanner")
    from AIPlannerLib import slicerRtOptimizer

    if slicerRtOptimizer.AbstractScriptedPlanOptimizer is not None:
        pytest.skip("SlicerRT is importable here; registration is SlicerRT's to test")
    assert slicerRtOptimizer.registerPlanOptimizer() is False
    # The class the C++ adaptor looks up by file name exists either way.
    assert slicerRtOptimizer.slicerRtOptimizerPlanOptimizer is slicerRtOptimizer.TwinRTPlanOptimizer


def test_slicerRtOptimizerObjectivesAndErrors(slicerScene):
    import types

    import slicer_harness

    slicer_harness.importModule("AIPlanner")
    from AIPlannerLib import slicerRtOptimizer
    from twinrt.planning.objectives import objective_from_dict

    optimizer = slicerRtOptimizer.TwinRTPlanOptimizer(types.SimpleNamespace(name=""))
    assert optimizer.scriptedPlanOptimizer.name == "TwinRT"
    available = optimizer.setAvailableObjectives()
    assert set(available) == set(slicerRtOptimizer.OBJECTIVE_KINDS)
    assert available["Max DVH"]["v_max"] == {"default": 50.0}
    objective = slicerRtOptimizer.objectiveFromNode("Max DVH", "Rectum", {"d": "40", "v_max": "30", "penalty": "50"})
    assert objective == {"structure": "Rectum", "kind": "max_dvh", "dose_gy": 40.0, "volume_percent": 30.0,
                         "weight": 50.0}
    objective_from_dict(objective)  # a valid TwinRT objective
    with pytest.raises(ValueError, match="no objective 'EUD'"):
        slicerRtOptimizer.objectiveFromNode("EUD", "Rectum", {})
    # A plan without a target: SlicerRT gets a message back, not an exception.
    plan = types.SimpleNamespace(GetReferenceVolumeNode=lambda: None, GetSegmentationNode=lambda: None,
                                 GetTargetSegmentID=lambda: "")
    message = optimizer.optimizePlanUsingOptimizer(plan, [], None)
    assert "target segment" in message
