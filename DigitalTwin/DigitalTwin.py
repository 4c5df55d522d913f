"""DigitalTwin: a per-fraction digital twin of the treatment course (research use only).

The digital twin is built by issue 7; until then the Logic raises StageNotAvailableError.
This file follows Slicer's scripted-module template (Utilities/Templates/Modules/Scripted):
DigitalTwin (module descriptor), DigitalTwinParameterNode, DigitalTwinWidget (thin: binds the .ui and calls
the Logic), DigitalTwinLogic (all computation, batch-capable) and DigitalTwinTest (runs headless too).
"""

from typing import Annotated

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper, WithinRange

from slicer import vtkMRMLScalarVolumeNode

from TwinRTCommon.logic import CaseLogicMixin, checkCtVolume, checkDoseVolume
from TwinRTCommon.testing import CaseModuleTestMixin
from TwinRTCommon.widget import CaseModuleWidgetMixin


#
# DigitalTwin
#


class DigitalTwin(ScriptedLoadableModule):
    """Module descriptor. Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DigitalTwin")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Radiotherapy.AI")]
        # Core modules only for now; the issue that first uses SlicerRT node types adds SlicerRT's.
        self.parent.dependencies = ["Segmentations", "SubjectHierarchy"]
        self.parent.contributors = ["TwinRT contributors"]
        self.parent.helpText = _("""
<b>Research use only, not for clinical decisions.</b><br>
Follows the treatment course fraction by fraction: anatomy changes and delivered dose are kept as a
sequence indexed by fraction, for review and for ToxicityMonitor.
<br>The stage is not available yet (issue 7): the module loads a case (sample patient or DICOM
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
# DigitalTwinParameterNode
#


@parameterNodeWrapper
class DigitalTwinParameterNode:
    """The parameters of DigitalTwin, saved with the scene.

    inputVolume - planning CT.
    inputDose - planned dose (a dose volume, Gy).
    fractions - number of fractions in the course.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    inputDose: vtkMRMLScalarVolumeNode
    fractions: Annotated[int, WithinRange(1, 100)] = 35


#
# DigitalTwinWidget
#


class DigitalTwinWidget(CaseModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and calls the Logic; holds no computation.

    The parameter-node and scene plumbing and the Load sample / Import DICOM buttons come from
    :class:`TwinRTCommon.widget.CaseModuleWidgetMixin`; this class adds the stage's Apply.
    Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setup(self) -> None:
        """Load the .ui and connect it; cheap and without prompts (the generic test builds it)."""
        ScriptedLoadableModuleWidget.setup(self)
        self.setupCaseModule(DigitalTwinLogic())

    # Apply needs the planning CT and the planned dose.
    applyRequires = ("inputVolume", "inputDose")
    applyReadyToolTip = _("Simulate the treatment course.")
    applyMissingToolTip = _("Select the planning CT and the planned dose.")

    def onApplyButton(self) -> None:
        """Run the stage; until issue 7 lands this reports that it is not available."""
        with slicer.util.tryWithErrorDisplay(_("Failed to build the digital twin."), waitCursor=True):
            parameters = self._parameterNode
            self.logic.simulateCourse(parameters.inputVolume, parameters.inputDose, parameters.fractions)


#
# DigitalTwinLogic
#


class DigitalTwinLogic(ScriptedLoadableModuleLogic, CaseLogicMixin):
    """All computation of DigitalTwin; usable without the GUI (batch mode, tests).

    Loading a case (``importCase``, ``loadSampleCase``, ``caseToScene``, ``sceneToCase``) comes from
    :class:`TwinRTCommon.logic.CaseLogicMixin`, so every module shares the one MRML contract.
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    stageName = "the digital twin"
    stageIssue = "7"

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DigitalTwinParameterNode(super().getParameterNode())

    def simulateCourse(self, ctVolume, doseVolume, fractions: int):
        """Build the per-fraction twin of a treatment course.

        :param ctVolume: the planning CT (``vtkMRMLScalarVolumeNode``, HU).
        :param doseVolume: the planned dose (``DicomRtImport.DoseVolume`` set), Gy.
        :param fractions: number of fractions, >= 1.
        :return: the sequence browser of the course (index name ``fraction``).
        :raises InvalidInputError: missing inputs or a volume that is not a dose.
        :raises StageNotAvailableError: always, until issue 7 builds the digital twin.
        """
        from twinrt.errors import InvalidInputError

        checkCtVolume(ctVolume, _("planning CT"))
        checkDoseVolume(doseVolume)
        if int(fractions) < 1:
            raise InvalidInputError(_("A treatment course needs at least one fraction"))
        raise self.stageNotAvailable()


#
# DigitalTwinTest
#


class DigitalTwinTest(CaseModuleTestMixin, ScriptedLoadableModuleTest):
    """Logic tests on a tiny synthetic case built in memory; they run in Slicer and headless.

    The test methods are :class:`TwinRTCommon.testing.CaseModuleTestMixin`'s, shared by the five
    modules; the attributes below say how to call this module's stage and what its parameter node holds.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    logicClass = DigitalTwinLogic
    stageMethodName = "simulateCourse"
    stageArguments = ("ct", "dose", 30)
    invalidStageArguments = ("ct", "ct", 30)  # a CT where the dose belongs
    stageIssueText = "issue 7"
    parameterNodes = {"inputVolume": "ct", "inputDose": "dose"}
    parameterValues = {"fractions": 5}

    def runTest(self):
        """Run all tests of this module (Slicer's ctest and Reload and Test call only this)."""
        self.runCaseModuleTests()
