"""AIPlanner: automatic treatment planning from a predicted dose (research use only).

The planner is built by issues 3 and 4; until then the Logic raises StageNotAvailableError.
This file follows Slicer's scripted-module template (Utilities/Templates/Modules/Scripted):
AIPlanner (module descriptor), AIPlannerParameterNode, AIPlannerWidget (thin: binds the .ui and calls
the Logic), AIPlannerLogic (all computation, batch-capable) and AIPlannerTest (runs headless too).
"""

from typing import Annotated

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper, WithinRange

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from TwinRTCommon.logic import CaseLogicMixin, checkCtVolume, checkSegmentation
from TwinRTCommon.testing import CaseModuleTestMixin
from TwinRTCommon.widget import CaseModuleWidgetMixin


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


class AIPlannerWidget(CaseModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and calls the Logic; holds no computation.

    The parameter-node and scene plumbing and the Load sample / Import DICOM buttons come from
    :class:`TwinRTCommon.widget.CaseModuleWidgetMixin`; this class adds the stage's Apply.
    Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setup(self) -> None:
        """Load the .ui and connect it; cheap and without prompts (the generic test builds it)."""
        ScriptedLoadableModuleWidget.setup(self)
        self.setupCaseModule(AIPlannerLogic())

    # Apply needs the planning CT and its structures (the prescription always has a valid value).
    applyRequires = ("inputVolume", "inputSegmentation")
    applyReadyToolTip = _("Create the plan.")
    applyMissingToolTip = _("Select the planning CT and its structures.")

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


class AIPlannerTest(CaseModuleTestMixin, ScriptedLoadableModuleTest):
    """Logic tests on a tiny synthetic case built in memory; they run in Slicer and headless.

    The test methods are :class:`TwinRTCommon.testing.CaseModuleTestMixin`'s, shared by the five
    modules; the attributes below say how to call this module's stage and what its parameter node holds.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    logicClass = AIPlannerLogic
    stageMethodName = "createPlan"
    stageArguments = ("ct", "segmentation", 60.0, 30)
    invalidStageArguments = ("ct", "segmentation", 0.0, 30)  # a 0 Gy prescription
    stageIssueText = "issue 3"
    parameterNodes = {"inputVolume": "ct"}
    parameterValues = {"prescriptionGy": 60.0, "fractions": 30}
    invalidParameterValues = {"fractions": 0}  # WithinRange(1, 100)

    def runTest(self):
        """Run all tests of this module (Slicer's ctest and Reload and Test call only this)."""
        self.runCaseModuleTests()
