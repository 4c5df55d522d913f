"""DosePredict: AI prediction of the 3D dose distribution from CT and structures (research use only).

The dose prediction model is built by issue 5; until then the Logic raises StageNotAvailableError.
This file follows Slicer's scripted-module template (Utilities/Templates/Modules/Scripted):
DosePredict (module descriptor), DosePredictParameterNode, DosePredictWidget (thin: binds the .ui and calls
the Logic), DosePredictLogic (all computation, batch-capable) and DosePredictTest (runs headless too).
"""

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from TwinRTCommon.logic import CaseLogicMixin, checkCtVolume, checkSegmentation
from TwinRTCommon.testing import CaseModuleTestMixin
from TwinRTCommon.widget import CaseModuleWidgetMixin


#
# DosePredict
#


class DosePredict(ScriptedLoadableModule):
    """Module descriptor. Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DosePredict")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Radiotherapy.AI")]
        # Core modules only for now; the issue that first uses SlicerRT node types adds SlicerRT's.
        self.parent.dependencies = ["Segmentations", "SubjectHierarchy"]
        self.parent.contributors = ["TwinRT contributors"]
        self.parent.helpText = _("""
<b>Research use only, not for clinical decisions.</b><br>
Predicts a 3D dose distribution (Gy) from the planning CT and its structures; the result is a dose
volume that SlicerRT's DVH, Isodose and RTDOSE export accept.
<br>The stage is not available yet (issue 5): the module loads a case (sample patient or DICOM
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
# DosePredictParameterNode
#


@parameterNodeWrapper
class DosePredictParameterNode:
    """The parameters of DosePredict, saved with the scene.

    inputVolume - planning CT.
    inputSegmentation - structures, referencing the CT.
    outputDose - dose volume that receives the prediction (created when empty).
    modelId - dose model from Resources/models.json (empty: the default model).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    outputDose: vtkMRMLScalarVolumeNode
    modelId: str = ""


#
# DosePredictWidget
#


class DosePredictWidget(CaseModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and calls the Logic; holds no computation.

    The parameter-node and scene plumbing and the Load sample / Import DICOM buttons come from
    :class:`TwinRTCommon.widget.CaseModuleWidgetMixin`; this class adds the stage's Apply.
    Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setup(self) -> None:
        """Load the .ui and connect it; cheap and without prompts (the generic test builds it)."""
        ScriptedLoadableModuleWidget.setup(self)
        self.setupCaseModule(DosePredictLogic())

    # Apply needs the planning CT and its structures.
    applyRequires = ("inputVolume", "inputSegmentation")
    applyReadyToolTip = _("Predict the dose.")
    applyMissingToolTip = _("Select the planning CT and its structures.")

    def onApplyButton(self) -> None:
        """Run the stage; until issue 5 lands this reports that it is not available."""
        with slicer.util.tryWithErrorDisplay(_("Failed to predict the dose."), waitCursor=True):
            parameters = self._parameterNode
            self.logic.predictDose(parameters.inputVolume, parameters.inputSegmentation, parameters.outputDose,
                                   parameters.modelId)


#
# DosePredictLogic
#


class DosePredictLogic(ScriptedLoadableModuleLogic, CaseLogicMixin):
    """All computation of DosePredict; usable without the GUI (batch mode, tests).

    Loading a case (``importCase``, ``loadSampleCase``, ``caseToScene``, ``sceneToCase``) comes from
    :class:`TwinRTCommon.logic.CaseLogicMixin`, so every module shares the one MRML contract.
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    stageName = "dose prediction"
    stageIssue = "5"

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DosePredictParameterNode(super().getParameterNode())

    def predictDose(self, ctVolume, segmentation, outputDose=None, modelId: str = ""):
        """Predict the dose (Gy) of a plan for this CT and these structures.

        :param ctVolume: the planning CT (``vtkMRMLScalarVolumeNode``, HU).
        :param segmentation: the structures; must reference ``ctVolume``.
        :param outputDose: volume to fill; a new dose volume when None.
        :param modelId: model from ``Resources/models.json``; empty selects the default.
        :return: the dose volume (tagged ``DicomRtImport.DoseVolume``).
        :raises InvalidInputError: missing inputs; :raises GeometryError: structures not on the CT.
        :raises StageNotAvailableError: always, until issue 5 builds the dose prediction stage.
        """
        checkCtVolume(ctVolume, _("planning CT"))
        checkSegmentation(segmentation, ctVolume)
        raise self.stageNotAvailable()


#
# DosePredictTest
#


class DosePredictTest(CaseModuleTestMixin, ScriptedLoadableModuleTest):
    """Logic tests on a tiny synthetic case built in memory; they run in Slicer and headless.

    The test methods are :class:`TwinRTCommon.testing.CaseModuleTestMixin`'s, shared by the five
    modules; the attributes below say how to call this module's stage and what its parameter node holds.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    logicClass = DosePredictLogic
    stageMethodName = "predictDose"
    stageArguments = ("ct", "segmentation")
    invalidStageArguments = ("ct", None)  # no structures selected
    stageIssueText = "issue 5"
    parameterNodes = {"inputVolume": "ct", "inputSegmentation": "segmentation"}
    parameterDefaults = {"modelId": ""}  # empty selects the default model

    def runTest(self):
        """Run all tests of this module (Slicer's ctest and Reload and Test call only this)."""
        self.runCaseModuleTests()
