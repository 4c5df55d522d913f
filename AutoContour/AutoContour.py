"""AutoContour: automatic contouring of organs at risk and targets on the planning CT (research use only).

The contouring model is built by issue 6; until then the Logic raises StageNotAvailableError.
This file follows Slicer's scripted-module template (Utilities/Templates/Modules/Scripted):
AutoContour (module descriptor), AutoContourParameterNode, AutoContourWidget (thin: binds the .ui and calls
the Logic), AutoContourLogic (all computation, batch-capable) and AutoContourTest (runs headless too).
"""

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from TwinRTCommon.logic import CaseLogicMixin, checkCtVolume
from TwinRTCommon.testing import CaseModuleTestMixin
from TwinRTCommon.widget import CaseModuleWidgetMixin


#
# AutoContour
#


class AutoContour(ScriptedLoadableModule):
    """Module descriptor. Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AutoContour")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Radiotherapy.AI")]
        # Core modules only for now; the issue that first uses SlicerRT node types adds SlicerRT's.
        self.parent.dependencies = ["Segmentations", "SubjectHierarchy"]
        self.parent.contributors = ["TwinRT contributors"]
        self.parent.helpText = _("""
<b>Research use only, not for clinical decisions.</b><br>
Segments organs at risk and targets on the planning CT with an AI model and writes them as a
segmentation that references the CT.
<br>The stage is not available yet (issue 6): the module loads a case (sample patient or DICOM
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
# AutoContourParameterNode
#


@parameterNodeWrapper
class AutoContourParameterNode:
    """The parameters of AutoContour, saved with the scene.

    inputVolume - planning CT to contour.
    outputSegmentation - segmentation that receives the structures (created when empty).
    modelId - contouring model from Resources/models.json (empty: the default model).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelId: str = ""


#
# AutoContourWidget
#


class AutoContourWidget(CaseModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and calls the Logic; holds no computation.

    The parameter-node and scene plumbing and the Load sample / Import DICOM buttons come from
    :class:`TwinRTCommon.widget.CaseModuleWidgetMixin`; this class adds the stage's Apply.
    Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setup(self) -> None:
        """Load the .ui and connect it; cheap and without prompts (the generic test builds it)."""
        ScriptedLoadableModuleWidget.setup(self)
        self.setupCaseModule(AutoContourLogic())

    # Apply needs the planning CT.
    applyRequires = ("inputVolume",)
    applyReadyToolTip = _("Contour the selected CT.")
    applyMissingToolTip = _("Select the planning CT.")

    def onApplyButton(self) -> None:
        """Run the stage; until issue 6 lands this reports that it is not available."""
        with slicer.util.tryWithErrorDisplay(_("Failed to contour the CT."), waitCursor=True):
            parameters = self._parameterNode
            self.logic.segmentCT(parameters.inputVolume, parameters.outputSegmentation, parameters.modelId)


#
# AutoContourLogic
#


class AutoContourLogic(ScriptedLoadableModuleLogic, CaseLogicMixin):
    """All computation of AutoContour; usable without the GUI (batch mode, tests).

    Loading a case (``importCase``, ``loadSampleCase``, ``caseToScene``, ``sceneToCase``) comes from
    :class:`TwinRTCommon.logic.CaseLogicMixin`, so every module shares the one MRML contract.
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    stageName = "automatic contouring"
    stageIssue = "6"

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return AutoContourParameterNode(super().getParameterNode())

    def segmentCT(self, inputVolume, outputSegmentation=None, modelId: str = ""):
        """Contour organs and targets on a CT.

        :param inputVolume: the planning CT (``vtkMRMLScalarVolumeNode``, HU).
        :param outputSegmentation: segmentation to fill; a new one referencing the CT when None.
        :param modelId: model from ``Resources/models.json``; empty selects the default.
        :return: the segmentation node.
        :raises InvalidInputError: when ``inputVolume`` is not a CT volume.
        :raises StageNotAvailableError: always, until issue 6 builds the contouring stage.
        """
        checkCtVolume(inputVolume, _("planning CT"))
        raise self.stageNotAvailable()


#
# AutoContourTest
#


class AutoContourTest(CaseModuleTestMixin, ScriptedLoadableModuleTest):
    """Logic tests on a tiny synthetic case built in memory; they run in Slicer and headless.

    The test methods are :class:`TwinRTCommon.testing.CaseModuleTestMixin`'s, shared by the five
    modules; the attributes below say how to call this module's stage and what its parameter node holds.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    logicClass = AutoContourLogic
    stageMethodName = "segmentCT"
    stageArguments = ("ct", "segmentation")
    invalidStageArguments = (None,)  # no CT selected
    stageIssueText = "issue 6"
    parameterNodes = {"inputVolume": "ct"}
    parameterValues = {"modelId": "test-model"}
    parameterDefaults = {"outputSegmentation": None}  # created by the stage when left empty

    def runTest(self):
        """Run all tests of this module (Slicer's ctest and Reload and Test call only this)."""
        self.runCaseModuleTests()
