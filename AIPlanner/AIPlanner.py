"""AIPlanner: automatic treatment planning from a predicted dose (research use only).

The planner is built by issues 3 and 4; until then the Logic raises StageNotAvailableError.
This file follows Slicer's scripted-module template (Utilities/Templates/Modules/Scripted):
AIPlanner (module descriptor), AIPlannerParameterNode, AIPlannerWidget (thin: binds the .ui and calls
the Logic), AIPlannerLogic (all computation, batch-capable) and AIPlannerTest (runs headless too).
"""

from typing import Annotated, Optional

import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper, WithinRange

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from TwinRTCommon.logic import CaseLogicMixin, checkCtVolume, checkSegmentation


#
# AIPlanner
#


class AIPlanner(ScriptedLoadableModule):
    """Module descriptor. Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AIPlanner")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Radiotherapy.AI")]
        # Core modules only for now; the issue that first uses SlicerRT node types adds SlicerRT's.
        self.parent.dependencies = ["Segmentations", "SubjectHierarchy"]
        self.parent.contributors = ["TwinRT contributors"]
        self.parent.helpText = _("""
<b>Research use only, not for clinical decisions.</b><br>
Creates a deliverable treatment plan (SlicerRT RT plan with beams) for the prescription, optimized
towards an AI-predicted dose, through SlicerRT's scripted plan optimizer interface.
<br>The stage is not available yet (issue 3 and 4): the module loads a case (sample patient or DICOM
folder) into the scene, but <i>Apply</i> reports that the stage is missing.
""")
        self.parent.acknowledgementText = _("""
Part of the TwinRT extension suite. The sample patient is from the OpenKBP data set (Babier et al.,
Medical Physics 48(9), 2021) built on The Cancer Imaging Archive head-and-neck collections.
Built on 3D Slicer and SlicerRT.
""")
        # Register the sample patient after startup, when the Sample Data module exists.
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Register sample data sets in Sample Data module
#


def registerSampleData():
    """Add the TwinRT sample patient to Sample Data; all five modules call this, it registers once."""
    from TwinRTCommon.sampledata import registerSampleData as registerTwinRTSampleData

    registerTwinRTSampleData()


#
# AIPlannerParameterNode
#


@parameterNodeWrapper
class AIPlannerParameterNode:
    """The parameters of AIPlanner, saved with the scene.

    inputVolume - planning CT.
    inputSegmentation - structures, referencing the CT.
    prescriptionGy - prescribed dose to the primary target (Gy).
    fractions - number of fractions.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    prescriptionGy: Annotated[float, WithinRange(0.0, 200.0)] = 70.0
    fractions: Annotated[int, WithinRange(1, 100)] = 35


#
# AIPlannerWidget
#


class AIPlannerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and calls the Logic; holds no computation.

    Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        """Load the .ui and connect it; cheap and without prompts (the generic test builds it)."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AIPlanner.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # Set scene in MRML widgets; the .ui forwards mrmlSceneChanged to every node selector.
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AIPlannerLogic()
        self.ui.statusLabel.text = self.logic.stageStatusText()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSampleButton)
        self.ui.importDicomButton.connect("directoryChanged(QString)", self.onImportDicomFolder)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure the parameter node exists and is observed; preselect the obvious inputs."""
        self.setParameterNode(self.logic.getParameterNode())
        parameters = self._parameterNode
        if not parameters.inputVolume:
            parameters.inputVolume = self.logic.findCtVolume()

    def setParameterNode(self, inputParameterNode: Optional[AIPlannerParameterNode]) -> None:
        """Bind the GUI to ``inputParameterNode`` (widgets carry SlicerParameterName properties)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        ready = bool(parameters and parameters.inputVolume and parameters.inputSegmentation)
        self.ui.applyButton.enabled = ready
        # Say what is missing rather than leaving a greyed-out button unexplained.
        if ready:
            self.ui.applyButton.toolTip = _("Create the plan.")
        else:
            self.ui.applyButton.toolTip = _("Select the planning CT and its structures.")

    def onLoadSampleButton(self) -> None:
        """Load the bundled sample patient through the TwinRT case path."""
        with slicer.util.tryWithErrorDisplay(_("Failed to load the TwinRT sample patient."), waitCursor=True):
            self.logic.loadSampleCase()
            self.initializeParameterNode()

    def onImportDicomFolder(self, folder: str) -> None:
        """Import a DICOM patient folder (CT, RTSTRUCT, RTDOSE) into the scene."""
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the DICOM folder."), waitCursor=True):
            self.logic.importCase(folder)
            self.initializeParameterNode()

    def onApplyButton(self) -> None:
        """Run the stage; until issue 3 and 4 lands this reports that it is not available."""
        with slicer.util.tryWithErrorDisplay(_("Failed to create the plan."), waitCursor=True):
            parameters = self._parameterNode
            self.logic.createPlan(parameters.inputVolume, parameters.inputSegmentation, parameters.prescriptionGy,
                                  parameters.fractions)


#
# AIPlannerLogic
#


class AIPlannerLogic(ScriptedLoadableModuleLogic, CaseLogicMixin):
    """All computation of AIPlanner; usable without the GUI (batch mode, tests).

    Loading a case (``importCase``, ``loadSampleCase``, ``caseToScene``, ``sceneToCase``) comes from
    :class:`TwinRTCommon.logic.CaseLogicMixin`, so every module shares the one MRML contract.
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    stageName = "AI treatment planning"
    stageIssue = "3 and 4"

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return AIPlannerParameterNode(super().getParameterNode())

    def stageStatusText(self) -> str:
        """The text of the module panel's status label."""
        return _("Not available yet: {stage} is built by issue {issue}.").format(
            stage=self.stageName, issue=self.stageIssue)

    def createPlan(self, ctVolume, segmentation, prescriptionGy: float, fractions: int):
        """Create a treatment plan for a prescription.

        :param ctVolume: the planning CT (``vtkMRMLScalarVolumeNode``, HU).
        :param segmentation: the structures; must reference ``ctVolume``.
        :param prescriptionGy: prescribed dose to the primary target (Gy), > 0.
        :param fractions: number of fractions, >= 1.
        :return: the plan node.
        :raises InvalidInputError: missing inputs or an impossible prescription.
        :raises StageNotAvailableError: always, until issues 3 and 4 build the planner.
        """
        from twinrt.errors import InvalidInputError

        checkCtVolume(ctVolume, _("planning CT"))
        checkSegmentation(segmentation, ctVolume)
        if not prescriptionGy > 0 or int(fractions) < 1:
            raise InvalidInputError(_("The prescription needs a dose above 0 Gy and at least one fraction"))
        raise self.stageNotAvailable()


#
# AIPlannerTest
#


class AIPlannerTest(ScriptedLoadableModuleTest):
    """Logic tests on a tiny synthetic case built in memory; they run in Slicer and headless.

    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setUp(self):
        """Start every test from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run all tests of this module."""
        for test in (self.test_AIPlannerCaseToScene, self.test_AIPlannerStageNotAvailable,
                     self.test_AIPlannerBadInputLeavesSceneUnchanged, self.test_AIPlannerParameterNode):
            self.setUp()
            test()

    def test_AIPlannerCaseToScene(self):
        """A case goes into the scene through this module's Logic following the MRML contract."""
        from TwinRTCommon.testing import assertCaseInScene, makeSyntheticCase

        self.delayDisplay("Case to scene")
        logic = AIPlannerLogic()
        case = makeSyntheticCase()
        created = logic.caseToScene(case)
        assertCaseInScene(self, created, case, slicer.mrmlScene)
        back = logic.sceneToCase()
        self.assertEqual(back.patient_id, case.patient_id)
        for original, reloaded in zip(case.structures, back.structures):
            self.assertEqual(original.name, reloaded.name)
            self.assertTrue((original.mask == reloaded.mask).all(), original.name)
        self.delayDisplay("Test passed")

    def test_AIPlannerStageNotAvailable(self):
        """The stage method says plainly that it is not built yet, and changes nothing."""
        from TwinRTCommon import mrmlio
        from TwinRTCommon.testing import makeSyntheticCase
        from twinrt.errors import InvalidInputError, StageNotAvailableError

        self.delayDisplay("Stage not available")
        logic = AIPlannerLogic()
        created = logic.caseToScene(makeSyntheticCase())
        before = mrmlio.nodeIds(slicer.mrmlScene)
        with self.assertRaises(StageNotAvailableError) as context:
            logic.createPlan(created["ct"], created["segmentation"], 60.0, 30)
        self.assertIn("issue 3", str(context.exception))
        with self.assertRaises(InvalidInputError):
            logic.createPlan(created["ct"], created["segmentation"], 0.0, 30)
        self.assertEqual(mrmlio.nodeIds(slicer.mrmlScene), before)
        self.delayDisplay("Test passed")

    def test_AIPlannerBadInputLeavesSceneUnchanged(self):
        """A dose with NaN voxels raises DoseError and leaves the scene as it was."""
        from TwinRTCommon.testing import assertBadInputLeavesSceneUnchanged, makeSyntheticCase

        self.delayDisplay("Bad input")
        logic = AIPlannerLogic()
        logic.caseToScene(makeSyntheticCase("Existing"))  # a scene with content, which must survive
        assertBadInputLeavesSceneUnchanged(self, logic, slicer.mrmlScene)
        self.delayDisplay("Test passed")

    def test_AIPlannerParameterNode(self):
        """The parameter node is a scene singleton and keeps typed values and node references."""
        from TwinRTCommon.testing import makeSyntheticCase

        self.delayDisplay("Parameter node")
        logic = AIPlannerLogic()
        created = logic.caseToScene(makeSyntheticCase())
        parameters = logic.getParameterNode()
        parameters.inputVolume = created["ct"]
        parameters.prescriptionGy = 60.0
        parameters.fractions = 30
        with self.assertRaises(ValueError):
            parameters.fractions = 0
        again = logic.getParameterNode()
        self.assertIs(again.parameterNode, parameters.parameterNode)
        self.assertEqual(again.prescriptionGy, 60.0)
        self.assertEqual(again.fractions, 30)
        self.assertEqual(again.inputVolume.GetID(), created["ct"].GetID())
        self.delayDisplay("Test passed")
