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

from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode)

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
    samModel - registered SAM/MedSAM checkpoint id (or a vit_b .pth path) for prompts.
    positivePoints, negativePoints - point lists inside / outside the structure (one axial slice).
    promptBox - optional ROI around the structure on that slice.
    samSegmentName - name of the segment Segment Anything makes.
    propagate - carry the mask through neighbouring slices; maxSlices - at most this many each way (0: no limit).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelId: str = ""
    samModel: str = ""
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    promptBox: vtkMRMLMarkupsROINode
    samSegmentName: str = "SAM structure"
    propagate: bool = True
    maxSlices: int = 0


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
        self.ui.samButton.connect("clicked(bool)", self.onSamButton)

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

    def onSamButton(self) -> None:
        """Segment Anything on the placed prompts into the selected segmentation (a new one when none)."""
        with slicer.util.tryWithErrorDisplay(_("Failed to segment from the prompts."), waitCursor=True):
            p = self._parameterNode
            result = self.logic.contourWithPrompts(p.inputVolume, p.outputSegmentation, p.samModel, p.positivePoints,
                                                   p.negativePoints, p.promptBox, p.samSegmentName, p.propagate,
                                                   p.maxSlices or None)
            p.outputSegmentation = result["segmentation"]

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
        from twinrt.autocontour import classical_contours
        from twinrt.model import Image

        ct = self._checkInputs(inputVolume, outputSegmentation)
        # All computation (and every refusal) before the scene is touched.
        structures = classical_contours(Image(ct, self._grid(inputVolume)), groups)
        result = self._writeStructures(inputVolume, outputSegmentation, structures, replaceExisting,
                                       self.CLASSICAL_MODEL_ID, "", self.CLASSICAL_METHOD)
        self.log(f"AutoContour (no model): added {', '.join(result['added']) or 'nothing'}; replaced "
                 f"{', '.join(result['replaced']) or 'nothing'}; kept the existing {', '.join(result['kept']) or '-'}")
        return result

    def contourWithPrompts(self, inputVolume, outputSegmentation, modelId: str, positivePoints, negativePoints=None,
                           boxRoi=None, segmentName: str = "SAM structure", propagate: bool = True,
                           maxSlices=None, replaceExisting: bool = False, modelsDir=None, progress=None,
                           cancel=None) -> dict:
        """Segment Anything: prompts on one axial slice → a segment, propagated through the neighbouring slices.

        Runs in this process (a vit_b forward pass is seconds per slice on a CPU; the worker process
        of issue 6 is not built yet).

        :param inputVolume: the planning CT (HU).
        :param outputSegmentation: segmentation to add to (None: a new one on the CT).
        :param modelId: a registered SAM/MedSAM checkpoint (``twinrt contour sam-register``) or a
            ``.pth`` path (a vit_b then).
        :param positivePoints: markups node (``vtkMRMLMarkupsFiducialNode``) of points inside the
            structure, or None; ``negativePoints``: points outside it. All on one axial slice.
        :param boxRoi: optional markups ROI node: its extent on that slice is the box prompt.
        :param segmentName: the new segment's name.
        :param propagate: carry the mask through the neighbouring slices; ``maxSlices`` each way at most.
        :param replaceExisting: replace a segment of the same name (else such a name is refused).
        :param modelsDir: models folder (default ``$TWINRT_MODELS_DIR`` or ``~/.twinrt/models``).
        :param progress: ``progress(fraction, text)``, called once per slice.
        :param cancel: a :class:`twinrt.progress.CancelToken`; cancelling stops at the next slice
            (:class:`twinrt.progress.CancelledError`) with the scene unchanged.
        :return: ``segmentation``, ``added``, ``replaced``, ``kept``, ``report`` (prompt slice, score,
            slices propagated and why each direction stopped), ``modelId``, ``sha256``.
        :raises InvalidInputError: no prompt, points on several slices or outside the CT, a model that
            cannot be loaded, an existing segment of that name; the scene is left as it was.
        """
        from pathlib import Path

        from twinrt.autocontour import merge_actions
        from twinrt.autocontour import sam as samlib
        from twinrt.errors import InvalidInputError
        from twinrt.geometry import ras_to_lps
        from twinrt.model import Structure, StructureType

        ct = self._checkInputs(inputVolume, outputSegmentation)
        if not str(segmentName).strip():
            raise InvalidInputError("Give the new segment a name")
        points, labels = [], []
        for node, label in ((positivePoints, 1), (negativePoints, 0)):
            for ras in self._markupsRas(node):
                points.append(ras_to_lps(ras))
                labels.append(label)
        corners, center = self._roiCornersRas(boxRoi) if boxRoi is not None else (None, None)
        k, pointsIj, labels, box = samlib.prompts_on_slice(
            self._grid(inputVolume), points, labels, None if corners is None else ras_to_lps(corners),
            None if center is None else ras_to_lps(center))
        if outputSegmentation is not None:
            names = [outputSegmentation.GetSegmentation().GetNthSegment(i).GetName()
                     for i in range(outputSegmentation.GetSegmentation().GetNumberOfSegments())]
            if merge_actions(names, [segmentName], replaceExisting)[segmentName] == "keep":
                taken = next(n for n in names if n.lower() == str(segmentName).lower())
                raise InvalidInputError(f"'{outputSegmentation.GetName()}' already has a segment '{taken}'; "
                                        "choose another name or ask to replace it")
        path = Path(str(modelId))
        loaded = (samlib.load_sam(path, "vit_b") if path.suffix in (".pth", ".pt")
                  else samlib.load_registered(str(modelId), modelsDir))
        mask, report = samlib.segment_structure(ct, samlib.SliceSegmenter(loaded), k, pointsIj or None,
                                                labels or None, box, propagate, maxSlices, progress, cancel)
        if not mask.any():
            raise InvalidInputError("Segment Anything returned an empty mask for these prompts; move or add points")
        structure = Structure(segmentName, mask, self._grid(inputVolume), (230, 220, 70), StructureType.guess(segmentName))
        modelName = loaded.model_id or loaded.path.name
        result = self._writeStructures(inputVolume, outputSegmentation, [structure], replaceExisting, modelName,
                                       loaded.sha256, f"Segment Anything ({loaded.model_type}) prompts on slice {k}")
        self.log(f"AutoContour (Segment Anything {modelName}, sha256 {loaded.sha256[:12]}…): '{segmentName}' on "
                 f"{int(mask.any(axis=(1, 2)).sum())} slice(s); {report.get('stopped', {})}")
        return {**result, "report": report, "modelId": modelName, "sha256": loaded.sha256}

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _grid(volumeNode):
        from TwinRTCommon import mrmlio

        return mrmlio.volumeGrid(volumeNode)

    def _checkInputs(self, inputVolume, outputSegmentation):
        """Refuse a missing/transformed CT or a segmentation of another volume; the CT array (k, j, i)."""
        import numpy as np

        from TwinRTCommon import mrmlio
        from twinrt.errors import InvalidInputError

        checkCtVolume(inputVolume, _("planning CT"))
        mrmlio.checkNoTransform(inputVolume)
        if outputSegmentation is not None:
            if mrmlio.referenceVolumeId(outputSegmentation) not in ("", inputVolume.GetID()):
                raise InvalidInputError(f"Segmentation '{outputSegmentation.GetName()}' is drawn on another volume; "
                                        "choose a segmentation of this CT or let AutoContour create one")
        return np.array(slicer.util.arrayFromVolume(inputVolume))

    @staticmethod
    def _markupsRas(markupsNode):
        """The control points of a markups node (world RAS, mm); none for None."""
        if markupsNode is None:
            return []
        out = []
        for index in range(markupsNode.GetNumberOfControlPoints()):
            ras = [0.0, 0.0, 0.0]
            markupsNode.GetNthControlPointPositionWorld(index, ras)
            out.append(ras)
        return out

    @staticmethod
    def _roiCornersRas(roiNode):
        """(8 corners, centre) of a markups ROI in world RAS (mm), along the ROI's own axes."""
        import itertools

        import numpy as np

        center, size = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
        roiNode.GetCenterWorld(center)
        roiNode.GetSizeWorld(size)
        axes = []
        for getter in (roiNode.GetXAxisWorld, roiNode.GetYAxisWorld, roiNode.GetZAxisWorld):
            axis = [0.0, 0.0, 0.0]
            getter(axis)
            axes.append(np.asarray(axis, dtype=float))
        corners = [np.asarray(center) + sum(sign * h / 2.0 * a for sign, h, a in zip(signs, size, axes))
                   for signs in itertools.product((-1.0, 1.0), repeat=3)]
        return np.array(corners), np.asarray(center, dtype=float)

    def _roiToIjkBox(self, volumeNode, roiNode):
        """(i0, j0, i1, j1, k) of a markups ROI on the slice of its centre (:func:`twinrt.autocontour.sam.prompts_on_slice`)."""
        from twinrt.autocontour.sam import prompts_on_slice
        from twinrt.geometry import ras_to_lps

        corners, center = self._roiCornersRas(roiNode)
        k, _, _, box = prompts_on_slice(self._grid(volumeNode), (), (), ras_to_lps(corners), ras_to_lps(center))
        return (*box, k)

    def _writeStructures(self, inputVolume, outputSegmentation, structures, replaceExisting, modelId, sha256, method):
        """Add ``structures`` to the segmentation (a new one on the CT when None) in one transaction.

        Existing segments of the same name are kept unless ``replaceExisting`` (then replaced under
        their segment ID). Segments and the segmentation carry the model id, sha256, method and the
        research-use label.
        """
        import twinrt
        from TwinRTCommon import mrmlio
        from twinrt.autocontour import merge_actions

        scene = inputVolume.GetScene() or slicer.mrmlScene
        added, replaced, kept = [], [], []
        with mrmlio.sceneTransaction(scene):
            segmentationNode = outputSegmentation
            if segmentationNode is None:
                segmentationNode = mrmlio.addSegmentationNode(scene, inputVolume, f"{inputVolume.GetName()} contours",
                                                              createdBy="AutoContour")
            elif not mrmlio.referenceVolumeId(segmentationNode):
                segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
            segmentation = segmentationNode.GetSegmentation()
            existing = {}
            for index in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(index)
                existing.setdefault(segmentation.GetSegment(segmentId).GetName().lower(), segmentId)
            actions = merge_actions(existing, [s.name for s in structures], replaceExisting)
            # The scene transaction undoes new nodes, not changes to the user's segmentation: what
            # this loop adds or replaces there is undone here if any segment fails.
            backups, newIds = {}, []
            try:
                for structure in structures:
                    action = actions[structure.name]
                    {"add": added, "replace": replaced, "keep": kept}[action].append(structure.name)
                    if action == "keep":
                        continue
                    segmentId = existing.get(structure.name.lower(), "")
                    if action == "replace":
                        backup = slicer.vtkSegment()
                        backup.DeepCopy(segmentation.GetSegment(segmentId))
                        backups[segmentId] = backup
                        segmentation.RemoveSegment(segmentId)
                    newId = mrmlio.addStructureSegment(segmentationNode, inputVolume, structure, segmentId)
                    newIds.append(newId)
                    segment = segmentation.GetSegment(newId)
                    segment.SetTag(self.MODEL_ID_ATTRIBUTE, modelId)
                    segment.SetTag(self.WEIGHTS_SHA256_ATTRIBUTE, sha256)
                    segment.SetTag(self.METHOD_ATTRIBUTE, method)
            except BaseException:
                for newId in newIds:
                    if segmentation.GetSegment(newId) is not None:
                        segmentation.RemoveSegment(newId)
                for segmentId, backup in backups.items():
                    if segmentation.GetSegment(segmentId) is None:
                        segmentation.AddSegment(backup, segmentId)
                raise
            if added or replaced:
                segmentationNode.SetAttribute(self.MODEL_ID_ATTRIBUTE, modelId)
                segmentationNode.SetAttribute(self.WEIGHTS_SHA256_ATTRIBUTE, sha256)
                segmentationNode.SetAttribute(self.METHOD_ATTRIBUTE, method)
                segmentationNode.SetAttribute(mrmlio.RESEARCH_USE_ATTRIBUTE, twinrt.RESEARCH_USE_ONLY)
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
    parameterDefaults = {"outputSegmentation": None,  # created by the stage when left empty
                         "positivePoints": None, "negativePoints": None, "promptBox": None,
                         "samSegmentName": "SAM structure", "propagate": True, "maxSlices": 0}

    def runTest(self):
        """Run all tests of this module (Slicer's ctest and Reload and Test call only this)."""
        self.runCaseModuleTests(self.test_ClassicalContoursKeepTheUsersSegments, self.test_ClassicalContoursBadInput,
                                self.test_ContourWithPrompts)

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

        # A replacement that fails half-way gives the user's segment back (same ID, same voxels).
        from twinrt.errors import StructureError

        original = mrmlio.addStructureSegment

        def failing(*args, **kwargs):
            raise StructureError("Slicer refused structure 'External'", "External")

        mrmlio.addStructureSegment = failing
        try:
            with self.assertRaises(StructureError):
                logic.contourClassical(ct, userSegmentation, replaceExisting=True)
        finally:
            mrmlio.addStructureSegment = original
        self.assertEqual(userSegmentation.GetSegmentation().GetSegmentIdBySegmentName("External"), userExternal)
        self.assertTrue(np.array_equal(mrmlio.segmentMask(userSegmentation, userExternal, ct), mask))
        self.delayDisplay("Test passed")

    def test_ContourWithPrompts(self):
        """Markups (RAS) → voxel prompts on the right slice → a propagated segment with the model's identity.

        A tiny random SAM (segment-anything's classes) is registered and loaded through the real
        registry; its slice masks are replaced by a 2-voxel disk around the prompt point, so that
        the RAS → (i, j, k) conversion and the propagation can be checked exactly.
        """
        import tempfile

        import numpy as np
        import torch
        import vtk

        from TwinRTCommon import mrmlio
        from twinrt.autocontour import sam as samlib
        from twinrt.autocontour.tv_compat import ensure_torchvision
        from twinrt.errors import InvalidInputError, MissingInputError

        ensure_torchvision()  # segment_anything imports torchvision when imported
        import segment_anything

        self.delayDisplay("Segment Anything prompts")
        logic = AutoContourLogic()
        created = logic.caseToScene(_syntheticCase())
        ct = created["ct"]
        models = tempfile.mkdtemp()
        checkpoint = f"{models}/tiny.pth"
        torch.save(_tinySam().state_dict(), checkpoint)
        entry = samlib.register_checkpoint(checkpoint, "vit_b", "tiny", models, builder=_tinySam)
        registry = dict(segment_anything.sam_model_registry)
        originalSegment = samlib.SliceSegmenter.segment

        def disk(segmenter, sliceHu, points=None, labels=None, box=None):
            jj, ii = np.mgrid[:sliceHu.shape[0], :sliceHu.shape[1]]
            i, j = points[0]
            return (ii - i) ** 2 + (jj - j) ** 2 <= 1.0, 0.9

        segment_anything.sam_model_registry["vit_b"] = lambda checkpoint=None: _tinySam()
        samlib.SliceSegmenter.segment = disk
        try:
            ijkToRas = vtk.vtkMatrix4x4()
            ct.GetIJKToRASMatrix(ijkToRas)
            ras = ijkToRas.MultiplyPoint([11.0, 5.0, 5.0, 1.0])[:3]  # voxel (i, j, k) = (11, 5, 5)
            points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Inside")
            points.AddControlPoint(vtk.vtkVector3d(*ras))
            result = logic.contourWithPrompts(ct, None, "tiny", points, segmentName="GTV", maxSlices=2, modelsDir=models)
            segmentation = result["segmentation"]
            segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("GTV")
            mask = mrmlio.segmentMask(segmentation, segmentId, ct)
            self.assertTrue(mask[5, 5, 11])  # the prompt voxel, in (k, j, i)
            self.assertFalse(mask[5, 11, 5])  # what an (i, j) swap would have marked
            self.assertEqual(np.nonzero(mask.any(axis=(1, 2)))[0].tolist(), [3, 4, 5, 6, 7])  # k = 5 ± 2
            self.assertEqual(result["report"]["prompt_slice"], 5)
            segment = segmentation.GetSegmentation().GetSegment(segmentId)
            for tag, expected in ((logic.MODEL_ID_ATTRIBUTE, "tiny"), (logic.WEIGHTS_SHA256_ATTRIBUTE, entry["sha256"])):
                value = vtk.reference("")
                self.assertTrue(segment.GetTag(tag, value))
                self.assertEqual(str(value), expected)
            self.assertEqual(result["sha256"], entry["sha256"])

            # Progress once per slice; a cancel stops at the next slice and leaves the scene as it was.
            from twinrt.progress import CancelledError, CancelToken

            seen = []
            token = CancelToken()

            def progress(fraction, text):
                seen.append(fraction)
                if len(seen) == 3:
                    token.cancel()

            nodesBefore = mrmlio.nodeIds(slicer.mrmlScene)
            with self.assertRaises(CancelledError):
                logic.contourWithPrompts(ct, segmentation, "tiny", points, segmentName="Cancelled", modelsDir=models,
                                         progress=progress, cancel=token)
            self.assertEqual(mrmlio.nodeIds(slicer.mrmlScene), nodesBefore)
            self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 1)
            self.assertTrue(all(0.0 <= f <= 1.0 for f in seen))

            # A box prompt (markups ROI, rotated 90° about the slice normal): its voxel extent on slice 5.
            roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
            rotation = vtk.vtkMatrix4x4()  # ROI x -> RAS y, ROI y -> RAS -x
            rotation.SetElement(0, 0, 0.0)
            rotation.SetElement(0, 1, -1.0)
            rotation.SetElement(1, 0, 1.0)
            rotation.SetElement(1, 1, 0.0)
            roi.SetAndObserveObjectToNodeMatrix(rotation)
            roi.SetCenterWorld(ijkToRas.MultiplyPoint([11.0, 5.0, 5.0, 1.0])[:3])
            spacing = ct.GetSpacing()  # (i, j, k) = (2.0, 2.5, 3.0) mm, identity LPS directions
            # 10 mm along the ROI's x (RAS y: j, 4 voxels) and 12 mm along its y (RAS x: i, 6 voxels);
            # unrotated it would be 5 voxels in i and 4.8 in j.
            roi.SetSize(4.0 * spacing[1], 6.0 * spacing[0], 1.0)
            box = logic._roiToIjkBox(ct, roi)
            self.assertEqual(box[4], 5)
            self.assertAlmostEqual(box[2] - box[0], 6.0, places=3)
            self.assertAlmostEqual(box[3] - box[1], 4.0, places=3)
            self.assertAlmostEqual((box[0] + box[2]) / 2.0, 11.0, places=3)
            self.assertAlmostEqual((box[1] + box[3]) / 2.0, 5.0, places=3)
            slicer.mrmlScene.RemoveNode(roi)

            # Bad prompts: nothing placed, points on two slices, a name already taken; scene unchanged.
            empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Empty")
            before = mrmlio.nodeIds(slicer.mrmlScene)
            with self.assertRaisesRegex(InvalidInputError, "at least one point"):
                logic.contourWithPrompts(ct, segmentation, "tiny", empty, modelsDir=models)
            other = ijkToRas.MultiplyPoint([11.0, 5.0, 7.0, 1.0])[:3]
            points.AddControlPoint(vtk.vtkVector3d(*other))
            with self.assertRaisesRegex(InvalidInputError, "slices 5, 7"):
                logic.contourWithPrompts(ct, segmentation, "tiny", points, modelsDir=models)
            points.RemoveNthControlPoint(1)
            with self.assertRaisesRegex(InvalidInputError, "already has a segment 'GTV'"):
                logic.contourWithPrompts(ct, segmentation, "tiny", points, segmentName="gtv", modelsDir=models)
            with self.assertRaisesRegex(MissingInputError, "register"):
                logic.contourWithPrompts(ct, segmentation, "absent-model", points, segmentName="X", modelsDir=models)
            self.assertEqual(mrmlio.nodeIds(slicer.mrmlScene), before)
            self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 1)
        finally:
            segment_anything.sam_model_registry.clear()
            segment_anything.sam_model_registry.update(registry)
            samlib.SliceSegmenter.segment = originalSegment
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


def _tinySam():
    """A tiny, randomly initialised SAM (:func:`twinrt.autocontour.sam.build_tiny_sam`): no SAM/MedSAM
    checkpoint can be downloaded for tests; it exercises the checkpoint, registry and prompt
    plumbing, and its masks are meaningless."""
    from twinrt.autocontour.sam import build_tiny_sam

    return build_tiny_sam()


def _syntheticCase():
    from TwinRTCommon.testing import makeSyntheticCase

    return makeSyntheticCase()


def twinrtResearchUse():
    import twinrt

    return twinrt.RESEARCH_USE_ONLY
