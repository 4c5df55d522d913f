"""The README's bad-input table (issue 10), Slicer Logic rows: typed error, scene unchanged.

Each row calls one module's Logic with a bad input on a scene holding the synthetic phantom, and
checks the typed error *and* that the scene's nodes are exactly those before the call (node IDs,
and each node's modified time). :data:`ROWS` is the table; the README holds the same rows (checked).
Core and command-line rows are in ``tests/test_bad_input_table.py``.
"""

import sys
import unittest
from pathlib import Path

try:
    import slicer
except ImportError as exc:  # plain Python without slicer-core: skip, as the module tests do
    raise unittest.SkipTest("slicer-core is not installed (pip install 'twinrt[slicer]')") from exc

try:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import slicer_harness
except ImportError:
    slicer_harness = None

from TwinRTCommon import mrmlio  # noqa: E402
from TwinRTCommon.scene import isRealSlicer  # noqa: E402
from TwinRTCommon.testing import makeSyntheticCase  # noqa: E402

#: The five modules (also ``slicer_harness.MODULE_NAMES``; the harness is not installed inside Slicer).
MODULE_NAMES = ("AutoContour", "DosePredict", "AIPlanner", "DigitalTwin", "ToxicityMonitor")

#: (entry point, bad input, error class name). ``TwinRTBadInputTest.call_<n>`` runs row n.
ROWS = [
    ("`AutoContourLogic.segmentCT(ct)`", "no CT selected", "InvalidInputError"),
    ("`AutoContourLogic.segmentCT(ct, segmentation)`", "a segmentation of another volume", "InvalidInputError"),
    ("`DosePredictLogic.predictDose(ct, segmentation)`", "no PTV among the segments", "StructureError"),
    ("`AIPlannerLogic.createPlan(...)`", "prescription NaN Gy", "InvalidInputError"),
    ("`AIPlannerLogic.createPlan(...)`", "a target segment that does not exist", "StructureError"),
    ("`DigitalTwinLogic.buildTwin(ct, segmentation, dose, n)`", "0 fractions", "InvalidInputError"),
    ("`DigitalTwinLogic.buildTwin(ct, segmentation, dose, n)`", "a CT volume instead of a dose", "InvalidInputError"),
    ("`DigitalTwinLogic.addFraction(image)`", "no twin built yet", "InvalidInputError"),
    ("`ToxicityMonitorLogic.monitor(twin)`", "risk threshold 2 (outside 0–1)", "InvalidInputError"),
    ("`ToxicityMonitorLogic.monitor(twin)`", "no twin", "InvalidInputError"),
    ("`caseToScene(case)` (every module's Logic)", "a dose with a NaN voxel", "DoseError"),
]


def _modules():
    if slicer_harness is not None and not isRealSlicer():
        return {name: slicer_harness.importModule(name) for name in MODULE_NAMES}
    import importlib

    return {name: importlib.import_module(name) for name in MODULE_NAMES}


class TwinRTBadInputTest(unittest.TestCase):
    """Every Logic row of the bad-input table: its typed error, and the scene as it was."""

    def setUp(self):
        if isRealSlicer():
            slicer.mrmlScene.Clear()
            self.scene = slicer.mrmlScene
        else:
            self.scene = slicer_harness.newScene()
        self.modules = _modules()
        self.created = mrmlio.caseToScene(makeSyntheticCase(), self.scene)

    def logic(self, name):
        logic = getattr(self.modules[name], f"{name}Logic")()
        return logic

    def sceneState(self):
        """Every node (ID, modified time) and the subject hierarchy's items (name, parent, data node)."""
        import vtk

        nodes = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
        state = sorted((n.GetID(), n.GetMTime()) for n in nodes if not n.IsA("vtkMRMLSubjectHierarchyNode"))
        sh = self.scene.GetSubjectHierarchyNode()
        ids = vtk.vtkIdList()
        sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
        items = [ids.GetId(i) for i in range(ids.GetNumberOfIds())]
        data = [sh.GetItemDataNode(i) for i in items]
        return state + sorted((str(i), sh.GetItemName(i), str(sh.GetItemParent(i)), d.GetID() if d else "")
                              for i, d in zip(items, data))

    def checkRow(self, index, call):
        from twinrt import errors

        entry, bad, error = ROWS[index]
        before = self.sceneState()
        with self.assertRaises(errors.TwinRTError) as info:
            call()
        self.assertEqual(type(info.exception).__name__, error, f"{entry} | {bad}: {info.exception}")
        self.assertGreater(len(str(info.exception)), 20)
        after = self.sceneState()
        changed = sorted(set(after) ^ set(before))
        self.assertEqual(after, before, f"{entry} | {bad}: the scene changed: {changed}")

    # ------------------------------------------------------------------------------------------ rows
    def test_row0(self):
        self.checkRow(0, lambda: self.logic("AutoContour").segmentCT(None))

    def test_row1(self):
        other = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Other")
        segmentation = self.created["segmentation"]
        segmentation.SetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole(),
                                        other.GetID())
        self.checkRow(1, lambda: self.logic("AutoContour").segmentCT(self.created["ct"], segmentation))

    def test_row2(self):
        self.checkRow(2, lambda: self.logic("DosePredict").predictDose(self.created["ct"], self.created["segmentation"]))

    def test_row3(self):
        self.checkRow(3, lambda: self.logic("AIPlanner").createPlan(
            self.created["ct"], self.created["segmentation"], ["Target"], float("nan"), 30))

    def test_row4(self):
        self.checkRow(4, lambda: self.logic("AIPlanner").createPlan(
            self.created["ct"], self.created["segmentation"], ["NoSuchSegment"], 60.0, 30))

    def doseNode(self):
        return self.created["doses"]["reference"]

    def test_row5(self):
        self.checkRow(5, lambda: self.logic("DigitalTwin").buildTwin(
            self.created["ct"], self.created["segmentation"], self.doseNode(), 0))

    def test_row6(self):
        self.checkRow(6, lambda: self.logic("DigitalTwin").buildTwin(
            self.created["ct"], self.created["segmentation"], self.created["ct"], 30))

    def test_row7(self):
        self.checkRow(7, lambda: self.logic("DigitalTwin").addFraction(self.created["ct"]))

    def test_row8(self):
        from twinrt.twin.timeline import CaseTimeline
        from twinrt.twin.twin import DigitalTwin, TwinSettings

        twin = DigitalTwin(CaseTimeline(makeSyntheticCase(), "reference", 5, "2026-01-05", "Target"),
                           TwinSettings(goal_set=None, calibrate=False))
        self.checkRow(8, lambda: self.logic("ToxicityMonitor").monitor(twin, threshold=2.0, scene=self.scene))

    def test_row9(self):
        self.checkRow(9, lambda: self.logic("ToxicityMonitor").monitor(None, scene=self.scene))

    def test_row10(self):
        import numpy as np

        bad = makeSyntheticCase("NaN")
        bad.doses["reference"].array[0, 0, 0] = np.nan
        self.checkRow(10, lambda: self.logic("AutoContour").caseToScene(bad))

    def test_readmeListsEveryRow(self):
        readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
        missing = [f"| {e} | {b} | {r} |" for e, b, r in ROWS if f"| {e} | {b} | {r} |" not in readme]
        self.assertEqual(missing, [], "README's bad-input table lacks these Logic rows")

    def test_everyRowHasATest(self):
        self.assertEqual(sorted(n for n in dir(self) if n.startswith("test_row")),
                         sorted(f"test_row{i}" for i in range(len(ROWS))))


if __name__ == "__main__":
    unittest.main()
