"""Cross-module workflow: case -> scene -> .mrb -> scene -> case, through the shared MRML contract.

Runs in two places with the same code:

* in Slicer, as a ctest (``slicer_add_python_unittest`` in this folder's CMakeLists.txt), where the
  scene is ``slicer.mrmlScene``;
* headless under pytest with slicer-core, where ``slicer_harness`` provides a real scene and the
  application stand-ins (widgets are not exercised).

The synthetic phantom always runs; the bundled sample patient runs when ``twinrt/data/sample`` is
present and an OpenKBP patient when the shared data folder is (``twinrt.data.shared_data_dir()``);
otherwise those tests are skipped with the reason.
"""

import json
import os
import subprocess
import sys
import tempfile
import types
import unittest
from pathlib import Path

import numpy as np

try:
    import slicer
except ImportError as exc:  # plain Python without slicer-core: skip, as the module tests do
    raise unittest.SkipTest("slicer-core is not installed (pip install 'twinrt[slicer]')") from exc

try:  # headless: the harness lives beside this file; in Slicer it is neither needed nor installed
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import slicer_harness
except ImportError:
    slicer_harness = None

from TwinRTCommon import mrmlio  # noqa: E402
from TwinRTCommon.scene import isRealSlicer  # noqa: E402
from TwinRTCommon.testing import makeSyntheticCase  # noqa: E402

#: Tables are stored as text with 6 significant digits (vtkMRMLTableStorageNode), so DVH metrics
#: survive a save and reload to this relative precision, not bit for bit.
TABLE_RELATIVE_TOLERANCE = 1e-5
#: Dose voxels are float32 in the scene and in NRRD; a reload must give them back within this.
DOSE_TOLERANCE_GY = 1e-4


def freshScene():
    """An empty scene: ``slicer.mrmlScene`` cleared in Slicer, a new real scene headless."""
    if isRealSlicer():
        slicer.mrmlScene.Clear()
        return slicer.mrmlScene
    return slicer_harness.newScene()


class TwinRTWorkflowTest(unittest.TestCase):
    """Round trips of whole cases through the scene and a .mrb bundle."""

    def setUp(self):
        self.scene = freshScene()
        self.tmp = Path(tempfile.mkdtemp(prefix="twinrt-workflow-"))

    # ---------------------------------------------------------------- helpers
    def roundTrip(self, case, doseName=None):
        """Write ``case`` to the scene, save and reload the bundle, and check everything came back."""
        created = mrmlio.caseToScene(case, self.scene, doseName=doseName)
        metricsBefore = mrmlio.tableToRows(created["dvhMetricsTable"]) if "dvhMetricsTable" in created else None
        curvesBefore = {name: mrmlio.tableToRows(t) for name, t in created.get("dvhTables", {}).items()}
        mrbPath = mrmlio.saveSceneMrb(self.scene, self.tmp / f"{case.patient_id}.mrb")
        self.assertTrue(mrbPath.is_file())
        self.assertEqual([p.name for p in self.tmp.iterdir()], [mrbPath.name], "no temporary files left")

        reloaded = mrmlio.loadSceneMrb(mrbPath, None if isRealSlicer() else slicer_harness.newScene())
        back = mrmlio.sceneToCase(reloaded)
        self.assertCasesEqual(case, back)
        self.assertHierarchy(reloaded, case)
        if metricsBefore is not None:
            metricsTable = self.nodeByRole(reloaded, mrmlio.ROLE_DVH_METRICS)
            self.assertRowsClose(mrmlio.tableToRows(metricsTable), metricsBefore)
            for column in ("mean_gy", "volume_cc"):
                self.assertEqual(metricsTable.GetColumnUnitLabel(column), mrmlio.metricUnit(column))
            for table in self.nodesByRole(reloaded, mrmlio.ROLE_DVH_TABLE):
                self.assertEqual(table.GetAttribute(mrmlio.DVH_IDENTIFIER_ATTRIBUTE), "1")
                structure = table.GetName()[:-len("_DvhTable")]
                self.assertRowsClose(mrmlio.tableToRows(table), curvesBefore[structure])
            chart = self.nodeByRole(reloaded, mrmlio.ROLE_DVH_CHART)
            self.assertEqual(chart.GetNumberOfPlotSeriesNodes(), len(metricsBefore))
        return back

    def assertCasesEqual(self, case, back):
        self.assertEqual(back.patient_id, case.patient_id)
        self.assertEqual(back.ct.grid, case.ct.grid)
        self.assertTrue(np.array_equal(back.ct.array, case.ct.array), "CT voxels changed")
        self.assertEqual([s.name for s in back.structures], [s.name for s in case.structures])
        for original, reloaded in zip(case.structures, back.structures):
            self.assertTrue(np.array_equal(reloaded.mask, original.on_grid(case.ct.grid)), original.name)
            self.assertEqual(reloaded.type, original.type, original.name)
            self.assertEqual(reloaded.color, original.color, original.name)
        self.assertEqual(sorted(back.doses), sorted(case.doses))
        for name, dose in case.doses.items():
            self.assertEqual(back.doses[name].grid, dose.grid, name)
            self.assertLess(float(np.abs(back.doses[name].array - dose.array).max()), DOSE_TOLERANCE_GY, name)
        stored, _skipped = mrmlio._encodeMetadata(case.metadata)
        self.assertEqual(mrmlio._encodeMetadata(back.metadata)[0], stored)

    def assertHierarchy(self, scene, case):
        """One patient holding one study; every TwinRT node sits directly under that study."""
        sh = scene.GetSubjectHierarchyNode()
        constants = slicer.vtkMRMLSubjectHierarchyConstants
        patients = [i for i in mrmlio._allItems(sh) if sh.GetItemLevel(i) == constants.GetDICOMLevelPatient()]
        self.assertEqual(len(patients), 1)
        self.assertEqual(sh.GetItemAttribute(patients[0], constants.GetDICOMPatientIDAttributeName()), case.patient_id)
        studies = [i for i in mrmlio._allItems(sh) if sh.GetItemLevel(i) == constants.GetDICOMLevelStudy()]
        self.assertEqual(len(studies), 1)
        self.assertEqual(sh.GetItemParent(studies[0]), patients[0])
        if case.doses:
            self.assertEqual(sh.GetItemAttribute(studies[0], mrmlio.DOSE_UNIT_NAME_ATTRIBUTE), "Gy")
        tagged = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())
                  if scene.GetNthNode(i).GetAttribute(mrmlio.ROLE_ATTRIBUTE)]
        self.assertGreaterEqual(len(tagged), 1 + bool(case.structures) + len(case.doses))
        for node in tagged:
            self.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(node)), studies[0], node.GetName())
            self.assertIn("Research use only", node.GetAttribute(mrmlio.RESEARCH_USE_ATTRIBUTE))

    def assertRowsClose(self, rows, expected):
        self.assertEqual(len(rows), len(expected))
        for row, reference in zip(rows, expected):
            self.assertEqual(sorted(row), sorted(reference))
            for key, value in reference.items():
                if isinstance(value, str):
                    self.assertEqual(row[key], value)
                else:
                    self.assertTrue(np.isclose(row[key], value, rtol=TABLE_RELATIVE_TOLERANCE, atol=1e-9),
                                    f"{key}: {row[key]} != {value}")

    @staticmethod
    def nodesByRole(scene, role):
        return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())
                if scene.GetNthNode(i).GetAttribute(mrmlio.ROLE_ATTRIBUTE) == role]

    def nodeByRole(self, scene, role):
        nodes = self.nodesByRole(scene, role)
        self.assertEqual(len(nodes), 1, role)
        return nodes[0]

    # ---------------------------------------------------------------- tests
    def test_syntheticRoundTrip(self):
        """The in-memory phantom survives case -> scene -> .mrb -> scene -> case."""
        self.roundTrip(makeSyntheticCase())

    def test_obliqueGridRoundTrip(self):
        """A rotated (non axis-aligned) grid keeps its direction matrix through the bundle."""
        back = self.roundTrip(makeSyntheticCase("Oblique", obliqueDirection=True))
        self.assertFalse(back.ct.grid.is_axis_aligned)

    def test_sampleRoundTrip(self):
        """The bundled sample patient (DICOM) survives the round trip."""
        from twinrt.errors import MissingInputError
        from twinrt.sample import load_sample_case

        try:
            case = load_sample_case()
        except MissingInputError as exc:
            self.skipTest(f"bundled sample not present: {exc}")
        self.roundTrip(case)

    def test_openKbpRoundTrip(self):
        """One OpenKBP validation patient survives the round trip (needs ../shared/data)."""
        from twinrt.data import load_openkbp, openkbp_patients, shared_data_dir

        if shared_data_dir() is None:
            self.skipTest("shared data folder not found (set TWINRT_SHARED_DATA)")
        patients = openkbp_patients("validation")
        if not patients:
            self.skipTest("no OpenKBP validation patients in the shared data folder")
        self.roundTrip(load_openkbp(patients[0]))

    def test_modulesShareOneCase(self):
        """What one module's Logic writes, the other four read back unchanged."""
        if slicer_harness is not None and not isRealSlicer():
            modules = {name: slicer_harness.importModule(name) for name in slicer_harness.MODULE_NAMES}
        else:
            import importlib

            modules = {name: importlib.import_module(name) for name in
                       ("AutoContour", "DosePredict", "AIPlanner", "DigitalTwin", "ToxicityMonitor")}
        case = makeSyntheticCase()
        getattr(modules["AutoContour"], "AutoContourLogic")().caseToScene(case)
        for name, module in modules.items():
            back = getattr(module, f"{name}Logic")().sceneToCase()
            self.assertEqual([s.name for s in back.structures], [s.name for s in case.structures], name)
            self.assertTrue(np.array_equal(back.doses["reference"].array, case.doses["reference"].array), name)

    def test_allInOneFiveModulesOnOneScene(self):
        """The All-in-One pipeline from Slicer: the five modules' Logic in order on one scene, each
        reading what the previous one wrote (issue 9).

        AutoContour adds the organs the user did not draw (the user's kept), DosePredict predicts from
        the completed segmentation, AIPlanner plans from that prediction, DigitalTwin takes the plan and
        a simulated first week, ToxicityMonitor scores the twin's organs. On the bundled sample patient
        (skipped without it); the plan uses a coarse 5-beam set-up so the test stays short.
        """
        import dataclasses

        from twinrt.planning.workflow import PlanSetup
        from twinrt.sample import SAMPLE_DICOM_DIR, load_sample_case

        if not any(SAMPLE_DICOM_DIR.glob("*.dcm")):
            self.skipTest("the bundled sample patient is not built (twinrt/data/sample)")
        if slicer_harness is not None and not isRealSlicer():
            modules = {name: slicer_harness.importModule(name) for name in slicer_harness.MODULE_NAMES}
        else:
            import importlib

            modules = {name: importlib.import_module(name) for name in
                       ("AutoContour", "DosePredict", "AIPlanner", "DigitalTwin", "ToxicityMonitor")}
        logic = {name: getattr(module, f"{name}Logic")() for name, module in modules.items()}
        full = load_sample_case()
        # The user drew the targets and the parotids; the network adds the rest.
        userNames = ["PTV56", "PTV63", "PTV70", "RightParotid", "LeftParotid"]
        case = dataclasses.replace(full, structures=[s for s in full.structures if s.name in userNames],
                                   doses={}, metadata=dict(full.metadata))
        created = mrmlio.caseToScene(case, self.scene)
        ct, segmentation = created["ct"], created["segmentation"]

        userStructures = mrmlio.structuresFromSegmentation(segmentation, ct)
        contours = logic["AutoContour"].segmentCT(ct, segmentation, mcSamples=0)
        names = set(logic["AutoContour"].segmentNames(segmentation))
        self.assertTrue(set(contours["added"]) <= names and len(names) > len(userNames))
        self.assertTrue(any("esophagus" in n.lower() for n in contours["added"]), contours["added"])
        self.assertTrue(any("parotid" in n.lower() for n in contours["kept"]), contours["kept"])
        self.assertFalse(any("parotid" in n.lower() for n in contours["added"]), contours["added"])
        self.assertEqual(len(contours["sha256"]), 64)
        after = {s.name: s for s in mrmlio.structuresFromSegmentation(segmentation, ct)}
        for s in userStructures:  # the user's own contours are kept voxel for voxel
            self.assertTrue(np.array_equal(after[s.name].mask, s.mask), s.name)

        prediction = logic["DosePredict"].predictDose(ct, segmentation, mcSamples=0)
        predicted = prediction["predictedDose"]
        # DosePredict read the organs AutoContour added (not only the user's).
        used = set(prediction["roiMap"].values())
        self.assertTrue(used & set(contours["added"]), (prediction["roiMap"], contours["added"]))
        self.assertTrue(mrmlio.isDoseVolumeNode(predicted))
        predictedArray = slicer.util.arrayFromVolume(predicted)
        self.assertGreater(float(predictedArray.max()), 60.0)

        setup = PlanSetup.equispaced(5, 10.0, dose_grid_mm=5.0, max_iter=60, levels=8)
        plan = logic["AIPlanner"].createPlanFromPrediction(ct, segmentation, ["PTV70"], 70.0, 35, predicted,
                                                            setup=setup)
        planned = plan["plannedDose"]
        self.assertTrue(mrmlio.isDoseVolumeNode(planned))
        self.assertNotEqual(planned.GetID(), predicted.GetID())
        back = logic["AIPlanner"].sceneToCase(self.scene, ct, segmentation)
        from twinrt import dvh

        ptv = dvh.structure_dvh(back.doses[plan["doseName"]], back.structure("PTV70"))
        self.assertGreater(ptv.mean_gy, 60.0)

        twinLogic = logic["DigitalTwin"]
        course = twinLogic.simulateCourse(ct, planned, 35, segmentation=segmentation, upTo=3,
                                          startDate="2026-01-05")
        self.assertEqual(twinLogic.twin.delivered, 3)
        self.assertTrue(mrmlio.isDoseVolumeNode(course["accumulatedDose"]))

        risk = logic["ToxicityMonitor"].monitor(twinLogic, scene=self.scene)
        organs = set(risk["risks"])
        self.assertTrue({"RightParotid", "LeftParotid"} <= organs, organs)
        self.assertTrue(all(len(v) == 3 for v in risk["risks"].values()))
        self.assertEqual(risk["modelId"], "toxicity-gruae-v2")
        self.assertEqual(risk["table"].GetScene(), self.scene)
        # Everything sits in the one patient study of the scene.
        sh = self.scene.GetSubjectHierarchyNode()
        study = sh.GetItemParent(sh.GetItemByDataNode(ct))
        for node in (segmentation, predicted, planned, course["accumulatedDose"], risk["table"]):
            self.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(node)), study, node.GetName())

    def test_badInputLeavesSceneUnchanged(self):
        """A NaN dose and a segmentation that does not reference the CT: typed errors, scene unchanged."""
        from twinrt.errors import DoseError, GeometryError, MissingInputError

        with self.assertRaises(MissingInputError):
            mrmlio.sceneToCase(self.scene)  # empty scene: no CT volume
        created = mrmlio.caseToScene(makeSyntheticCase(), self.scene)
        before = mrmlio.nodeIds(self.scene)
        bad = makeSyntheticCase("NaN")
        bad.doses["reference"].array[0, 0, 0] = np.nan
        with self.assertRaises(DoseError):
            mrmlio.caseToScene(bad, self.scene)
        self.assertEqual(mrmlio.nodeIds(self.scene), before)
        # A segmentation whose reference geometry is another volume is not the CT's structures.
        segmentation = created["segmentation"]
        other = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Other")
        segmentation.SetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole(),
                                        other.GetID())
        with self.assertRaises(GeometryError):
            mrmlio.sceneToCase(self.scene, created["ct"])
        with self.assertRaises(GeometryError):
            mrmlio.sceneToCase(self.scene, created["ct"], segmentation)


class TwinRTHeadlessToolsTest(unittest.TestCase):
    """The scene writer CLI and Sample Data registration, checked headless (they need no GUI)."""

    def setUp(self):
        if isRealSlicer():
            self.skipTest("headless-only checks (the Slicer application provides these itself)")
        self.scene = freshScene()
        self.tmp = Path(tempfile.mkdtemp(prefix="twinrt-tools-"))

    def runWriter(self, *args):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(slicer_harness.REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return subprocess.run([sys.executable, "-m", "TwinRTCommon.writescene", *args], capture_output=True,
                              text=True, env=env, timeout=300)

    def test_writeSceneFromDicomFolder(self):
        """DICOM folder -> .mrb with the CLI; the bundle holds the same case."""
        from twinrt.dicom.folder import export_case, import_case

        case = makeSyntheticCase("CliPatient")
        export_case(case, self.tmp / "dicom")
        expected = import_case(self.tmp / "dicom")  # what DICOM keeps of the case
        result = self.runWriter("--dicom", str(self.tmp / "dicom"), "--mrb", str(self.tmp / "out.mrb"))
        self.assertEqual(result.returncode, 0, result.stderr)
        back = mrmlio.sceneToCase(mrmlio.loadSceneMrb(self.tmp / "out.mrb", slicer_harness.newScene()))
        self.assertEqual(back.patient_id, expected.patient_id)
        self.assertTrue(np.array_equal(back.ct.array, expected.ct.array))
        for original, reloaded in zip(expected.structures, back.structures):
            self.assertTrue(np.array_equal(original.on_grid(expected.ct.grid), reloaded.mask), original.name)

    def test_writerRefusesBadInputAndWritesNothing(self):
        """Missing folder or a folder without DICOM: non-zero exit, clear message, no file."""
        (self.tmp / "empty").mkdir()
        for folder in (self.tmp / "missing", self.tmp / "empty"):
            result = self.runWriter("--dicom", str(folder), "--mrb", str(self.tmp / "out.mrb"))
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertIn("error:", result.stderr)
            self.assertFalse((self.tmp / "out.mrb").exists())
        self.assertEqual(sorted(p.name for p in self.tmp.iterdir()), ["empty"])

    def test_sampleDataRegisteredOnceForAllModules(self):
        """Every module hooks startupCompleted(); the sample is registered in Sample Data once."""
        from TwinRTCommon import sampledata

        calls = []
        stub = types.ModuleType("SampleData")
        stub.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: calls.append(kw))
        saved = sys.modules.get("SampleData")
        sys.modules["SampleData"] = stub
        sampledata._registered = False
        try:
            for name in slicer_harness.MODULE_NAMES:
                module = slicer_harness.importModule(name)
                getattr(module, name)(types.SimpleNamespace())
            slicer.app.emit("startupCompleted()")
        finally:
            if saved is None:
                sys.modules.pop("SampleData", None)
            else:
                sys.modules["SampleData"] = saved
        self.assertEqual(len(calls), 1)
        source = calls[0]
        self.assertEqual(source["category"], sampledata.SAMPLE_CATEGORY)
        self.assertIs(source["customDownloader"], sampledata.loadSample)
        self.assertTrue(Path(source["thumbnailFileName"]).is_file())
        json.dumps({k: v for k, v in source.items() if k != "customDownloader"})  # plain values only

    def test_sampleDataLoaderImportsTheSample(self):
        """The Sample Data loader puts the bundled sample in slicer.mrmlScene via the case path."""
        from TwinRTCommon import sampledata
        from twinrt.errors import MissingInputError
        from twinrt.sample import sample_dicom_dir

        try:
            sample_dicom_dir()
        except MissingInputError as exc:
            self.skipTest(f"bundled sample not present: {exc}")
        created = sampledata.loadSample(None)
        self.assertEqual(created["ct"].GetScene(), slicer.mrmlScene)
        self.assertTrue(mrmlio.isDoseVolumeNode(created["doses"]["reference"]))


if __name__ == "__main__":
    unittest.main()
