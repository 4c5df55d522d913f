"""AutoContour: automatic contouring of organs at risk and targets on the planning CT (research use only).

Contours without a model (body, lungs, bones, air cavities from Hounsfield units:
:mod:`twinrt.autocontour.classical`) are built; the MONAI network and Segment Anything prompts are
built by issue 6, and until then ``segmentCT`` raises StageNotAvailableError.
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
<br><i>Contour without a model</i> outlines the body, lungs, bones and air cavities from the CT's
Hounsfield units, adding segments to the chosen segmentation (segments you already have are kept).
AI contouring (MONAI network, Segment Anything prompts) is not available yet (issue 6): <i>Apply</i>
reports that it is missing.
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
        self.ui.classicalButton.connect("clicked(bool)", self.onClassicalButton)

    # Apply needs the planning CT.
    applyRequires = ("inputVolume",)
    applyReadyToolTip = _("Contour the selected CT.")
    applyMissingToolTip = _("Select the planning CT.")

    def onClassicalButton(self) -> None:
        """Contours without a model into the selected segmentation (a new one when none is selected)."""
        with slicer.util.tryWithErrorDisplay(_("Failed to contour the CT."), waitCursor=True):
            parameters = self._parameterNode
            result = self.logic.contourClassical(parameters.inputVolume, parameters.outputSegmentation)
            parameters.outputSegmentation = result["segmentation"]

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

    stageName = "AI contouring (MONAI network, Segment Anything prompts)"
    stageIssue = "6"
    #: Provenance written on the segmentation and its segments by :meth:`contourClassical`.
    CLASSICAL_MODEL_ID = "twinrt-classical-hu"
    CLASSICAL_METHOD = "HU thresholds, morphology and connected components (no model, no weights)"
    MODEL_ID_ATTRIBUTE = "AutoContour.ModelId"
    WEIGHTS_SHA256_ATTRIBUTE = "AutoContour.WeightsSha256"
    METHOD_ATTRIBUTE = "AutoContour.Method"

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return AutoContourParameterNode(super().getParameterNode())

    def stageStatusText(self) -> str:
        """Contours without a model work; the network and Segment Anything are still to come."""
        return _("Contours without a model (body, lungs, bones, air cavities) are available. "
                 "Not available yet: {stage} is built by issue {issue}.").format(stage=self.stageName,
                                                                               issue=self.stageIssue)

    def segmentCT(self, inputVolume, outputSegmentation=None, modelId: str = ""):
        """Contour organs and targets on a CT with an AI model.

        :param inputVolume: the planning CT (``vtkMRMLScalarVolumeNode``, HU).
        :param outputSegmentation: segmentation to fill; a new one referencing the CT when None.
        :param modelId: model from ``Resources/models.json``; empty selects the default.
        :return: the segmentation node.
        :raises InvalidInputError: when ``inputVolume`` is not a CT volume.
        :raises StageNotAvailableError: always, until issue 6 builds the network (contours without a
            model: :meth:`contourClassical`).
        """
        checkCtVolume(inputVolume, _("planning CT"))
        raise self.stageNotAvailable()

    def contourClassical(self, inputVolume, outputSegmentation=None, groups=None, replaceExisting: bool = False) -> dict:
        """Body, lungs, bones and air cavities without any model (:mod:`twinrt.autocontour.classical`).

        Runs in this process: it takes a few seconds even on a large CT, so there is no worker.
        The user's segments are never lost: a structure whose name (case-insensitive) the
        segmentation already holds is kept as it is, unless ``replaceExisting`` (then its labelmap
        is replaced under the same segment ID, so references to it survive).

        :param inputVolume: the planning CT (``vtkMRMLScalarVolumeNode``, HU).
        :param outputSegmentation: segmentation to add to; None creates one that references the CT,
            in the CT's study.
        :param groups: any of ``body``, ``lungs``, ``bones``, ``air``; None for all.
        :param replaceExisting: replace segments of the same name instead of keeping them.
        :return: ``segmentation`` (the node), ``added``, ``replaced``, ``kept`` (structure names).
        :raises InvalidInputError: not a CT volume, not HU, too small or too large, an unknown group,
            or a segmentation that references another volume; the scene is left as it was.
        """
        import numpy as np

        import twinrt
        from TwinRTCommon import mrmlio
        from twinrt.autocontour import classical_contours, merge_actions
        from twinrt.errors import InvalidInputError
        from twinrt.model import Image

        checkCtVolume(inputVolume, _("planning CT"))
        mrmlio.checkNoTransform(inputVolume)
        if outputSegmentation is not None:
            role = vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
            reference = outputSegmentation.GetNodeReferenceID(role)
            if reference and reference != inputVolume.GetID():
                raise InvalidInputError(f"Segmentation '{outputSegmentation.GetName()}' is drawn on another volume; "
                                        "choose a segmentation of this CT or let AutoContour create one")
        # All computation (and every refusal) before the scene is touched.
        grid = mrmlio.volumeGrid(inputVolume)
        ct = Image(np.array(slicer.util.arrayFromVolume(inputVolume)), grid)
        structures = classical_contours(ct, groups)
        scene = inputVolume.GetScene() or slicer.mrmlScene
        added, replaced, kept = [], [], []
        with mrmlio.sceneTransaction(scene):
            segmentationNode = outputSegmentation
            if segmentationNode is None:
                segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                           f"{inputVolume.GetName()} contours")
                segmentationNode.CreateDefaultDisplayNodes()
                mrmlio.tagNode(segmentationNode, mrmlio.ROLE_STRUCTURES, createdBy="AutoContour")
                sh = scene.GetSubjectHierarchyNode()
                study = mrmlio.studyItemOf(inputVolume)
                item = sh.GetItemByDataNode(segmentationNode)
                if study and item:
                    sh.SetItemParent(item, study)
                elif study:
                    sh.CreateItem(study, segmentationNode)
            if not segmentationNode.GetNodeReferenceID(vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()):
                segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
            segmentation = segmentationNode.GetSegmentation()
            existing = {}
            for index in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(index)
                existing.setdefault(segmentation.GetSegment(segmentId).GetName().lower(), segmentId)
            actions = merge_actions(existing, [s.name for s in structures], replaceExisting)
            for structure in structures:
                action = actions[structure.name]
                {"add": added, "replace": replaced, "keep": kept}[action].append(structure.name)
                if action == "keep":
                    continue
                segmentId = existing.get(structure.name.lower(), "")
                if action == "replace":
                    segmentation.RemoveSegment(segmentId)
                newId = mrmlio.addStructureSegment(segmentationNode, inputVolume, structure, segmentId)
                segment = segmentation.GetSegment(newId)
                segment.SetTag(self.MODEL_ID_ATTRIBUTE, self.CLASSICAL_MODEL_ID)
                segment.SetTag(self.METHOD_ATTRIBUTE, self.CLASSICAL_METHOD)
            if added or replaced:
                segmentationNode.SetAttribute(self.MODEL_ID_ATTRIBUTE, self.CLASSICAL_MODEL_ID)
                segmentationNode.SetAttribute(self.WEIGHTS_SHA256_ATTRIBUTE, "")
                segmentationNode.SetAttribute(self.METHOD_ATTRIBUTE, self.CLASSICAL_METHOD)
                segmentationNode.SetAttribute(mrmlio.RESEARCH_USE_ATTRIBUTE, twinrt.RESEARCH_USE_ONLY)
        self.log(f"AutoContour (no model): added {', '.join(added) or 'nothing'}; replaced "
                 f"{', '.join(replaced) or 'nothing'}; kept the existing {', '.join(kept) or '-'}")
        return {"segmentation": segmentationNode, "added": added, "replaced": replaced, "kept": kept}


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
    stageMethodName = "contourClassical"
    stageArguments = ("ct", "segmentation")
    invalidStageArguments = (None,)  # no CT selected
    pendingMethodName = "segmentCT"
    pendingArguments = ("ct", "segmentation")
    stageIssueText = "issue 6"
    parameterNodes = {"inputVolume": "ct"}
    parameterValues = {"modelId": "test-model"}
    parameterDefaults = {"outputSegmentation": None}  # created by the stage when left empty

    def runTest(self):
        """Run all tests of this module (Slicer's ctest and Reload and Test call only this)."""
        self.runCaseModuleTests(self.test_ClassicalContoursKeepTheUsersSegments, self.test_ClassicalContoursBadInput)

    def test_ClassicalContoursKeepTheUsersSegments(self):
        """A new segmentation on the CT, then merging into the user's: kept unless asked, replaced in place."""
        import numpy as np

        from TwinRTCommon import mrmlio

        self.delayDisplay("Contours without a model")
        logic = AutoContourLogic()
        created = logic.caseToScene(_syntheticCase())
        ct, userSegmentation = created["ct"], created["segmentation"]
        result = logic.contourClassical(ct)
        segmentation = result["segmentation"]
        self.assertIsNot(segmentation, userSegmentation)
        self.assertEqual(result["added"], ["External"])  # the phantom is water: no lungs, bones or air
        role = vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        self.assertEqual(segmentation.GetNodeReferenceID(role), ct.GetID())
        self.assertEqual(segmentation.GetAttribute(logic.MODEL_ID_ATTRIBUTE), logic.CLASSICAL_MODEL_ID)
        self.assertEqual(segmentation.GetAttribute(mrmlio.RESEARCH_USE_ATTRIBUTE), twinrtResearchUse())
        self.assertEqual(mrmlio.studyItemOf(segmentation), mrmlio.studyItemOf(ct))
        externalId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("External")
        mask = mrmlio.segmentMask(segmentation, externalId, ct)
        body = np.asarray(slicer.util.arrayFromVolume(ct)) > -500  # the phantom's water ellipsoid
        self.assertFalse((mask & ~body).any())
        self.assertGreaterEqual(int(mask.sum()), 0.95 * int(body.sum()))

        # Into the user's segmentation: External is new there, BODY/PTV60/Organ stay as they were.
        before = {n: mrmlio.segmentMask(userSegmentation, userSegmentation.GetSegmentation().GetSegmentIdBySegmentName(n),
                                        ct).copy() for n in ("BODY", "PTV60", "Organ")}
        first = logic.contourClassical(ct, userSegmentation)
        self.assertEqual((first["added"], first["kept"]), (["External"], []))
        userExternal = userSegmentation.GetSegmentation().GetSegmentIdBySegmentName("External")
        # The user edits External; a second run keeps the edit, a run asked to replace restores it in place.
        edited = mrmlio.segmentMask(userSegmentation, userExternal, ct).copy()
        edited[:, :, :4] = False
        slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), userSegmentation, userExternal, ct)
        second = logic.contourClassical(ct, userSegmentation)
        self.assertEqual((second["added"], second["kept"]), ([], ["External"]))
        self.assertEqual(int(mrmlio.segmentMask(userSegmentation, userExternal, ct).sum()), int(edited.sum()))
        third = logic.contourClassical(ct, userSegmentation, replaceExisting=True)
        self.assertEqual(third["replaced"], ["External"])
        self.assertEqual(userSegmentation.GetSegmentation().GetSegmentIdBySegmentName("External"), userExternal)
        self.assertTrue(np.array_equal(mrmlio.segmentMask(userSegmentation, userExternal, ct), mask))
        for name, array in before.items():
            segmentId = userSegmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
            self.assertTrue(np.array_equal(mrmlio.segmentMask(userSegmentation, segmentId, ct), array), name)
        self.delayDisplay("Test passed")

    def test_ClassicalContoursBadInput(self):
        """A volume that is not a CT in HU, or a segmentation of another volume: typed errors, scene unchanged."""
        import numpy as np

        from TwinRTCommon import mrmlio
        from twinrt.errors import InvalidInputError

        self.delayDisplay("Contours without a model: bad input")
        logic = AutoContourLogic()
        created = logic.caseToScene(_syntheticCase())
        ct = created["ct"]
        scaled = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Normalised")
        scaled.CopyOrientation(ct)
        slicer.util.updateVolumeFromArray(scaled, (np.asarray(slicer.util.arrayFromVolume(ct), dtype=np.float32) + 1000.0)
                                          / 2000.0)
        other = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Other")
        other.SetReferenceImageGeometryParameterFromVolumeNode(scaled)
        before = mrmlio.nodeIds(slicer.mrmlScene)
        userSegments = created["segmentation"].GetSegmentation().GetNumberOfSegments()
        with self.assertRaisesRegex(InvalidInputError, "not a CT in Hounsfield"):
            logic.contourClassical(scaled)
        with self.assertRaisesRegex(InvalidInputError, "another volume"):
            logic.contourClassical(ct, other)
        with self.assertRaisesRegex(InvalidInputError, "Unknown contour group"):
            logic.contourClassical(ct, created["segmentation"], groups=["heart"])
        self.assertEqual(mrmlio.nodeIds(slicer.mrmlScene), before)
        self.assertEqual(created["segmentation"].GetSegmentation().GetNumberOfSegments(), userSegments)
        self.delayDisplay("Test passed")


def _syntheticCase():
    from TwinRTCommon.testing import makeSyntheticCase

    return makeSyntheticCase()


def twinrtResearchUse():
    import twinrt

    return twinrt.RESEARCH_USE_ONLY
