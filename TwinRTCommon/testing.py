"""Tiny synthetic patients and the shared self-tests of the modules (``<Module>Test``) and the workflow test.

The patients are built in memory with analytic content, so a test needs no file, no download and no
shared data, and runs the same under pytest (headless slicer-core) and under Slicer's own test
runner. :class:`CaseModuleTestMixin` holds the test methods all five ``<Module>Test`` classes share.
"""

from __future__ import annotations

import numpy as np

from twinrt.geometry import Grid
from twinrt.model import Case, Dose, Image, Prescription, Structure, StructureType


def makeSyntheticCase(patientId: str = "TwinRTPhantom", obliqueDirection: bool = False) -> Case:
    """A 12 x 14 x 16 voxel phantom with three structures and a dose in Gy.

    The CT is water (0 HU) in an ellipsoidal body of air (-1000 HU) outside; the target is a cube
    receiving a uniform 60 Gy (a step DVH), an organ next to it gets a 0-30 Gy gradient.

    :param patientId: the case's patient ID.
    :param obliqueDirection: use a rotated, non-axis-aligned grid (tests matrix handling).
    :return: the case; ``doses["reference"]`` is on the CT grid.
    """
    shape = (12, 14, 16)  # (k, j, i)
    direction = np.eye(3)
    if obliqueDirection:
        angle = np.deg2rad(20.0)
        direction = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0],
                              [0.0, 0.0, 1.0]])
    grid = Grid(shape, (2.0, 2.5, 3.0), (-15.0, -17.5, -16.5), direction)
    k, j, i = np.indices(shape)
    body = ((i - 7.5) / 7.0) ** 2 + ((j - 6.5) / 6.0) ** 2 + ((k - 5.5) / 6.0) ** 2 <= 1.0
    # Integer HU with a little texture so that an index mix-up cannot go unnoticed.
    ct = np.where(body, (i + 3 * j + 7 * k) % 40 - 20, -1000).astype(np.int16)
    target = np.zeros(shape, bool)
    target[4:8, 5:9, 6:10] = True
    organ = np.zeros(shape, bool)
    organ[4:8, 5:9, 11:14] = True
    dose = np.where(target, 60.0, 0.0) + np.where(body & ~target, 30.0 * np.exp(-np.abs(i - 8.0) / 3.0), 0.0)
    structures = [
        Structure("BODY", body, grid, (177, 122, 101), StructureType.EXTERNAL),
        Structure("PTV60", target, grid, (255, 0, 0), StructureType.TARGET),
        Structure("Organ", organ, grid, (0, 151, 206), StructureType.ORGAN),
    ]
    metadata = {"patient_name": "Phantom^TwinRT", "source": "TwinRTCommon.testing",
                "prescriptions": [Prescription("PTV60", 60.0, 30)], "study_instance_uid": "1.2.826.0.1.3680043.8.498.1"}
    return Case(patientId, Image(ct, grid, "CT"), structures,
                {"reference": Dose(dose.astype(np.float32), grid, "reference", source="synthetic")}, [], metadata)


def makePlanningPhantom(patientId: str = "TwinRTPlanPhantom", badTargets: bool = False) -> Case:
    """A water cylinder (radius 60 mm) with a 30 mm cubic target and an organ beside it, for planning.

    The CT grid is 28 x 28 x 20 voxels of 5 mm, small enough that a five-beam plan on a 5 mm dose
    grid takes about a second, and the case has no dose (planning makes one).

    :param patientId: the case's patient ID.
    :param badTargets: also add two unusable targets for the bad-input tests: ``EmptyTarget``
        (no voxel) and ``AirTarget`` (a cube in the air, outside the body).
    :return: the case; ``PTV`` is the target (60 Gy in 30 fractions in its metadata).
    """
    grid = Grid((20, 28, 28), (5.0, 5.0, 5.0), (-67.5, -67.5, -47.5))
    k, j, i = np.indices(grid.shape)
    points = grid.index_to_lps(np.stack([i, j, k], -1).astype(float))
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    body = x ** 2 + y ** 2 < 60.0 ** 2
    ct = np.where(body, 0, -1000).astype(np.int16)
    target = (np.abs(x) <= 15.0) & (np.abs(y) <= 15.0) & (np.abs(z) <= 15.0)
    organ = (np.abs(x - 32.0) <= 8.0) & (np.abs(y) <= 8.0) & (np.abs(z) <= 20.0)
    structures = [Structure("BODY", body, grid, (177, 122, 101), StructureType.EXTERNAL),
                  Structure("PTV", target, grid, (255, 0, 0), StructureType.TARGET),
                  Structure("Organ", organ & body, grid, (0, 151, 206), StructureType.ORGAN)]
    if badTargets:
        air = (np.abs(x - 60.0) <= 5.0) & (np.abs(y - 60.0) <= 5.0) & (np.abs(z) <= 5.0)
        structures += [Structure("EmptyTarget", np.zeros(grid.shape, bool), grid, (255, 255, 0), StructureType.TARGET),
                       Structure("AirTarget", air & ~body, grid, (255, 0, 255), StructureType.TARGET)]
    metadata = {"patient_name": "Phantom^Planning", "source": "TwinRTCommon.testing",
                "prescriptions": [Prescription("PTV", 60.0, 30)], "study_instance_uid": "1.2.826.0.1.3680043.8.498.2"}
    return Case(patientId, Image(ct, grid, "CT"), structures, {}, [], metadata)


def assertCaseInScene(testCase, created: dict, case: Case, scene) -> None:
    """Check the MRML contract for ``case`` written by ``caseToScene`` (used by every module's self-test).

    :param testCase: the ``unittest.TestCase`` (a module's ``ScriptedLoadableModuleTest``).
    :param created: what :func:`TwinRTCommon.mrmlio.caseToScene` returned.
    :param case: the case that was written.
    :param scene: the scene it was written to.
    """
    import slicer

    from TwinRTCommon import mrmlio

    ct = created["ct"]
    testCase.assertTrue(ct.IsA("vtkMRMLScalarVolumeNode"))
    testCase.assertEqual(ct.GetAttribute(mrmlio.ROLE_ATTRIBUTE), mrmlio.ROLE_CT)
    testCase.assertIn("Research use only", ct.GetAttribute(mrmlio.RESEARCH_USE_ATTRIBUTE))
    testCase.assertTrue(np.array_equal(slicer.util.arrayFromVolume(ct), case.ct.array))
    testCase.assertTrue(mrmlio.volumeGrid(ct) == case.ct.grid)

    segmentation = created["segmentation"]
    testCase.assertTrue(segmentation.IsA("vtkMRMLSegmentationNode"))
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    testCase.assertEqual(segmentation.GetNodeReferenceID(role), ct.GetID())
    segments = segmentation.GetSegmentation()
    testCase.assertEqual(segments.GetNumberOfSegments(), len(case.structures))
    names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
    testCase.assertEqual(names, [s.name for s in case.structures])

    for name, doseNode in created["doses"].items():
        testCase.assertTrue(mrmlio.isDoseVolumeNode(doseNode))
        testCase.assertEqual(doseNode.GetAttribute("DicomRtImport.DoseVolume"), "1")
        testCase.assertEqual(doseNode.GetDisplayNode().GetColorNode().GetName(), "Dose_ColorTable")
        testCase.assertAlmostEqual(float(slicer.util.arrayFromVolume(doseNode).max()), case.doses[name].max_gy,
                                   places=4)

    sh = scene.GetSubjectHierarchyNode()
    study = created["studyItem"]
    testCase.assertEqual(sh.GetItemLevel(study), "Study")
    testCase.assertEqual(sh.GetItemLevel(sh.GetItemParent(study)), "Patient")
    testCase.assertEqual(sh.GetItemAttribute(study, "DicomRtImport.DoseUnitName"), "Gy")
    testCase.assertEqual(sh.GetItemAttribute(sh.GetItemParent(study), "DICOM.PatientID"), case.patient_id)
    dataNodes = [ct, segmentation, *created["doses"].values()]
    if "dvhMetricsTable" in created:
        dataNodes += [created["dvhMetricsTable"], created["dvhChart"], *created["dvhTables"].values(),
                      *created["dvhPlotSeries"].values()]
        rows = mrmlio.tableToRows(created["dvhMetricsTable"])
        testCase.assertEqual([r["structure"] for r in rows], [s.name for s in case.structures if not s.is_empty])
        testCase.assertEqual(created["dvhMetricsTable"].GetColumnUnitLabel("mean_gy"), "Gy")
        testCase.assertEqual(created["dvhChart"].GetNumberOfPlotSeriesNodes(), len(rows))
        for table in created["dvhTables"].values():
            testCase.assertEqual(table.GetAttribute("DoseVolumeHistogram.DVH"), "1")
    for node in dataNodes:
        testCase.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(node)), study, node.GetName())


def sceneState(scene) -> tuple:
    """Node IDs, subject-hierarchy items and their attributes: what a failed Logic call must not change."""
    import vtk

    from TwinRTCommon import mrmlio

    sh = scene.GetSubjectHierarchyNode()
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    items = [ids.GetId(i) for i in range(ids.GetNumberOfIds())]
    attributes = {item: {name: sh.GetItemAttribute(item, name) for name in sh.GetItemAttributeNames(item)}
                  for item in items}
    return mrmlio.nodeIds(scene), items, attributes


def assertBadInputLeavesSceneUnchanged(testCase, logic, scene) -> None:
    """A NaN dose and a non-Case input raise typed errors and add nothing to ``scene``.

    :param testCase: the ``unittest.TestCase``.
    :param logic: a module Logic (has ``caseToScene``).
    :param scene: the scene.
    """
    from TwinRTCommon import mrmlio
    from twinrt.errors import DoseError, InvalidInputError

    before = mrmlio.nodeIds(scene)
    itemsBefore = scene.GetSubjectHierarchyNode().GetNumberOfItems()
    case = makeSyntheticCase("BadDose")
    # Dose validates on construction; corrupting it afterwards is what a buggy producer would do.
    case.doses["reference"].array[3, 4, 5] = np.nan
    with testCase.assertRaises(DoseError):
        logic.caseToScene(case, scene)
    with testCase.assertRaises(InvalidInputError):
        logic.caseToScene("not a case", scene)
    testCase.assertEqual(mrmlio.nodeIds(scene), before)
    testCase.assertEqual(scene.GetSubjectHierarchyNode().GetNumberOfItems(), itemsBefore)


class CaseModuleTestMixin:
    """The self-tests every module runs, parameterised by the class attributes below.

    A ``<Module>Test`` derives from this mixin *and* ``ScriptedLoadableModuleTest`` (mixin first, so
    its ``setUp`` wins), sets the attributes and keeps only what is its own plus ``runTest``, which
    calls :meth:`runCaseModuleTests`. The mixin is not a ``unittest.TestCase``, so ``unittest``
    discovery in a ``<Module>.py`` finds only the module's Test class, with these methods inherited.

    A ``str`` in ``stageArguments``, ``invalidStageArguments`` and ``parameterNodes`` names a node
    of the synthetic case in the scene (see :meth:`caseNode`); every other value is passed as is.
    """

    #: The module's Logic class (a ``CaseLogicMixin``).
    logicClass = None
    #: Name of the Logic method that runs the stage, e.g. ``"segmentCT"``.
    stageMethodName = ""
    #: Valid arguments of the stage method; while the stage is not built it must raise ``StageNotAvailableError``.
    stageArguments: tuple = ()
    #: Invalid arguments of the stage method: it must raise ``InvalidInputError``.
    invalidStageArguments: tuple = ()
    #: Once the stage is built and a part of the module is still pending: the Logic method of that
    #: part and its valid arguments. That method must raise ``StageNotAvailableError`` instead.
    pendingMethodName = ""
    pendingArguments: tuple = ()
    #: Text the stage error must contain, e.g. ``"issue 6"`` (also checked in the .ui status label);
    #: empty once every stage of the module is built.
    stageIssueText = ""
    #: Parameter name -> case node stored in it (node references must survive re-wrapping).
    parameterNodes: dict = {}
    #: Parameter name -> plain value stored in it.
    parameterValues: dict = {}
    #: Parameter name -> value the wrapper must refuse with ``ValueError``.
    invalidParameterValues: dict = {}
    #: Parameter name -> value it must hold when the test did not set it (its default).
    parameterDefaults: dict = {}

    def setUp(self):
        """Start every test from an empty scene."""
        import slicer

        slicer.mrmlScene.Clear()

    def runCaseModuleTests(self, *moduleTests) -> None:
        """Run the shared tests, then ``moduleTests`` (the module's own bound methods), each after setUp.

        Slicer's ctest and *Reload and Test* call only ``runTest``, so this is what they run.
        """
        shared = [self.test_CaseToScene, self.test_StageNotAvailable, self.test_BadInputLeavesSceneUnchanged,
                  self.test_ParameterNode]
        for test in shared + list(moduleTests):
            self.setUp()
            test()

    @staticmethod
    def caseNode(created: dict, name):
        """The node ``name`` of the synthetic case in the scene; a non-str ``name`` is returned as is.

        :param created: what ``caseToScene`` returned.
        :param name: ``"dose"`` (the reference dose) or a key of ``created`` (``"ct"``, ``"segmentation"``,
            ``"dvhMetricsTable"``, ...).
        """
        if not isinstance(name, str):
            return name
        return created["doses"]["reference"] if name == "dose" else created[name]

    def test_CaseToScene(self):
        """A case goes into the scene through this module's Logic following the MRML contract."""
        import slicer

        self.delayDisplay("Case to scene")
        logic = self.logicClass()
        case = makeSyntheticCase()
        created = logic.caseToScene(case)
        assertCaseInScene(self, created, case, slicer.mrmlScene)
        back = logic.sceneToCase()
        self.assertEqual(back.patient_id, case.patient_id)
        for original, reloaded in zip(case.structures, back.structures):
            self.assertEqual(original.name, reloaded.name)
            self.assertTrue((original.mask == reloaded.mask).all(), original.name)
        self.delayDisplay("Test passed")

    def test_StageNotAvailable(self):
        """What is not built yet says so plainly; invalid stage input is refused first; nothing changes.

        The method that must raise ``StageNotAvailableError`` is the stage method until the stage is
        built, then the module's still pending part (:attr:`pendingMethodName`).
        """
        import slicer

        from TwinRTCommon import mrmlio
        from twinrt.errors import InvalidInputError, StageNotAvailableError

        self.delayDisplay("Stage not available")
        logic = self.logicClass()
        created = logic.caseToScene(makeSyntheticCase())
        before = mrmlio.nodeIds(slicer.mrmlScene)
        stage = getattr(logic, self.stageMethodName)
        pending, pendingArguments = stage, self.stageArguments
        if self.pendingMethodName:
            pending, pendingArguments = getattr(logic, self.pendingMethodName), self.pendingArguments
        # A module whose every stage is built (empty stageIssueText) has nothing pending to check.
        if self.stageIssueText:
            with self.assertRaises(StageNotAvailableError) as context:
                pending(*[self.caseNode(created, argument) for argument in pendingArguments])
            self.assertIn(self.stageIssueText, str(context.exception))
        # Input checks come first: a user with a wrong selection learns that, not "not available".
        with self.assertRaises(InvalidInputError):
            stage(*[self.caseNode(created, argument) for argument in self.invalidStageArguments])
        self.assertEqual(mrmlio.nodeIds(slicer.mrmlScene), before)
        self.delayDisplay("Test passed")

    def test_BadInputLeavesSceneUnchanged(self):
        """A dose with NaN voxels raises DoseError and leaves the scene as it was."""
        import slicer

        self.delayDisplay("Bad input")
        logic = self.logicClass()
        logic.caseToScene(makeSyntheticCase("Existing"))  # a scene with content, which must survive
        assertBadInputLeavesSceneUnchanged(self, logic, slicer.mrmlScene)
        self.delayDisplay("Test passed")

    def test_ParameterNode(self):
        """The parameter node is a scene singleton and keeps typed values and node references."""
        self.delayDisplay("Parameter node")
        logic = self.logicClass()
        created = logic.caseToScene(makeSyntheticCase())
        parameters = logic.getParameterNode()
        for name, nodeName in self.parameterNodes.items():
            setattr(parameters, name, self.caseNode(created, nodeName))
        for name, value in self.parameterValues.items():
            setattr(parameters, name, value)
        for name, value in self.invalidParameterValues.items():
            with self.assertRaises(ValueError, msg=name):
                setattr(parameters, name, value)
        # A fresh wrapper reads everything back from the scene's node, as after a scene reload.
        again = logic.getParameterNode()
        self.assertIs(again.parameterNode, parameters.parameterNode)
        for name, nodeName in self.parameterNodes.items():
            self.assertEqual(getattr(again, name).GetID(), self.caseNode(created, nodeName).GetID(), name)
        for name, value in {**self.parameterValues, **self.parameterDefaults}.items():
            if value is None:
                self.assertIsNone(getattr(again, name), name)
            else:
                self.assertEqual(getattr(again, name), value, name)
        self.delayDisplay("Test passed")
