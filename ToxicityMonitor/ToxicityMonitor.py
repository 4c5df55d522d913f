"""ToxicityMonitor: normal-tissue toxicity risk (NTCP) from the dose, per organ and fraction (research use only).

The toxicity models are built by issue 8; until then the Logic raises StageNotAvailableError.
This file follows Slicer's scripted-module template (Utilities/Templates/Modules/Scripted):
ToxicityMonitor (module descriptor), ToxicityMonitorParameterNode, ToxicityMonitorWidget (thin: binds the .ui and calls
the Logic), ToxicityMonitorLogic (all computation, batch-capable) and ToxicityMonitorTest (runs headless too).
"""

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode

from TwinRTCommon.logic import CaseLogicMixin, checkDoseVolume, checkSegmentation
from TwinRTCommon.testing import CaseModuleTestMixin
from TwinRTCommon.widget import CaseModuleWidgetMixin


#
# ToxicityMonitor
#


class ToxicityMonitor(ScriptedLoadableModule):
    """Module descriptor. Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ToxicityMonitor")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Radiotherapy.AI")]
        # Core modules only for now; the issue that first uses SlicerRT node types adds SlicerRT's.
        self.parent.dependencies = ["Segmentations", "SubjectHierarchy"]
        self.parent.contributors = ["TwinRT contributors"]
        self.parent.helpText = _("""
<b>Research use only, not for clinical decisions.</b><br>
Estimates normal-tissue complication probabilities from the dose-volume histograms of the organs at
risk and reports them as a table (one row per organ and fraction) and a chart.
<br>The stage is not available yet (issue 8): the module loads a case (sample patient or DICOM
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
# ToxicityMonitorParameterNode
#


@parameterNodeWrapper
class ToxicityMonitorParameterNode:
    """The parameters of ToxicityMonitor, saved with the scene.

    inputDose - dose volume (Gy).
    inputSegmentation - organs at risk.
    outputTable - table that receives the risks (created when empty).
    """

    inputDose: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    outputTable: vtkMRMLTableNode


#
# ToxicityMonitorWidget
#


class ToxicityMonitorWidget(CaseModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and calls the Logic; holds no computation.

    The parameter-node and scene plumbing and the Load sample / Import DICOM buttons come from
    :class:`TwinRTCommon.widget.CaseModuleWidgetMixin`; this class adds the stage's Apply.
    Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setup(self) -> None:
        """Load the .ui and connect it; cheap and without prompts (the generic test builds it)."""
        ScriptedLoadableModuleWidget.setup(self)
        self.setupCaseModule(ToxicityMonitorLogic())

    def preselectInputs(self, parameters) -> None:
        """Preselect the scene's first segmentation: the organs at risk (there is no CT input here)."""
        if not parameters.inputSegmentation:
            parameters.inputSegmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")

    # Apply needs the dose and the organs at risk.
    applyRequires = ("inputDose", "inputSegmentation")
    applyReadyToolTip = _("Estimate the toxicity risks.")
    applyMissingToolTip = _("Select the dose and the organs at risk.")

    def onApplyButton(self) -> None:
        """Run the stage; until issue 8 lands this reports that it is not available."""
        with slicer.util.tryWithErrorDisplay(_("Failed to estimate the toxicity risks."), waitCursor=True):
            parameters = self._parameterNode
            self.logic.estimateToxicity(parameters.inputDose, parameters.inputSegmentation, parameters.outputTable)


#
# ToxicityMonitorLogic
#


class ToxicityMonitorLogic(ScriptedLoadableModuleLogic, CaseLogicMixin):
    """All computation of ToxicityMonitor; usable without the GUI (batch mode, tests).

    Loading a case (``importCase``, ``loadSampleCase``, ``caseToScene``, ``sceneToCase``) comes from
    :class:`TwinRTCommon.logic.CaseLogicMixin`, so every module shares the one MRML contract.
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    stageName = "toxicity risk estimation"
    stageIssue = "8"

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return ToxicityMonitorParameterNode(super().getParameterNode())

    def estimateToxicity(self, doseVolume, segmentation, outputTable=None):
        """Estimate the complication risk of each organ at risk.

        :param doseVolume: the dose (``DicomRtImport.DoseVolume`` set), Gy.
        :param segmentation: the organs at risk.
        :param outputTable: table to fill; a new table when None.
        :return: the table node (one row per organ and fraction, model citation in its attributes).
        :raises InvalidInputError: missing inputs or a volume that is not a dose.
        :raises StageNotAvailableError: always, until issue 8 builds the toxicity models.
        """
        checkDoseVolume(doseVolume)
        checkSegmentation(segmentation)
        raise self.stageNotAvailable()


#
# ToxicityMonitorTest
#


class ToxicityMonitorTest(CaseModuleTestMixin, ScriptedLoadableModuleTest):
    """Logic tests on a tiny synthetic case built in memory; they run in Slicer and headless.

    The test methods are :class:`TwinRTCommon.testing.CaseModuleTestMixin`'s, shared by the five
    modules; the attributes below say how to call this module's stage and what its parameter node holds.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    logicClass = ToxicityMonitorLogic
    stageMethodName = "estimateToxicity"
    stageArguments = ("dose", "segmentation")
    invalidStageArguments = ("ct", "segmentation")  # a CT where the dose belongs
    stageIssueText = "issue 8"
    parameterNodes = {"inputDose": "dose", "inputSegmentation": "segmentation", "outputTable": "dvhMetricsTable"}

    def runTest(self):
        """Run all tests of this module (Slicer's ctest and Reload and Test call only this)."""
        self.runCaseModuleTests()
