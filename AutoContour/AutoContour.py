"""AutoContour: automatic contouring of organs at risk and targets on the planning CT (research use only).

Three ways to contour, all merged into the user's segmentation without losing a segment the user
already has: the organ-at-risk network (a MONAI 2.5D U-Net, :mod:`twinrt.autocontour.oar`) run in a
worker process with progress, cancel and a Monte-Carlo-dropout uncertainty volume
(``AutoContourLib/worker.py``, started by :mod:`TwinRTCommon.process`); Segment Anything prompts
(:mod:`twinrt.autocontour.sam`); and contours without a model (body, lungs, bones, air cavities
from Hounsfield units, :mod:`twinrt.autocontour.classical`).
This file follows Slicer's scripted-module template (Utilities/Templates/Modules/Scripted):
AutoContour (module descriptor), AutoContourParameterNode, AutoContourWidget (thin: binds the .ui and calls
the Logic), AutoContourLogic (all computation, batch-capable) and AutoContourTest (runs headless too).
"""

from typing import Annotated, Any, Optional

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper, WithinRange

from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode)

from TwinRTCommon.logic import CaseLogicMixin, checkCtVolume
from TwinRTCommon.runwidget import RunningWidgetMixin
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
Segments organs at risk on the planning CT and writes them as a segmentation that references the CT.
<br><i>Contour organs at risk</i> runs a MONAI network trained on head-and-neck CTs (OpenKBP) in a
separate process: choose the model, the organs and the number of Monte-Carlo dropout samples; the
button turns into <i>Cancel</i> while it runs. The organs get AAPM TG-263 names (Brainstem, SpinalCord,
Parotid_R, Parotid_L, Esophagus, Larynx, Bone_Mandible). With dropout samples an uncertainty volume
(per-voxel standard deviation of the organ probability) is added beside the CT.
<br>Segments you already have are kept, also when they are spelt differently (RightParotid is
Parotid_R), unless <i>Replace existing segments</i> is checked: then they are replaced in place.
Segments and the segmentation carry the model id and the weights' sha256 as <tt>AutoContour.*</tt> tags.
<br><i>Contour without a model</i> outlines the body, lungs, bones and air cavities from the CT's
Hounsfield units; <i>Segment Anything prompts</i> segment one structure from points or a box.
<br>Every AI contour is a proposal until a named reviewer checks it: type your name and click
<i>Accept AI contours</i> (in Results) to record, per segment, who accepted it and when
(<tt>AutoContour.AcceptedBy</tt>, <tt>AutoContour.AcceptedAt</tt>) and to add the acceptance to the
study's audit log. It covers the contours as they are then; accept again after editing one.
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


#: Parameter-node field of each organ of the organ-at-risk network -> its structure name (TG-263).
ORGAN_PARAMETERS = {"organBrainstem": "Brainstem", "organSpinalCord": "SpinalCord", "organParotidR": "Parotid_R",
                    "organParotidL": "Parotid_L", "organEsophagus": "Esophagus", "organLarynx": "Larynx",
                    "organMandible": "Bone_Mandible"}


@parameterNodeWrapper
class AutoContourParameterNode:
    """The parameters of AutoContour, saved with the scene.

    inputVolume - planning CT to contour.
    outputSegmentation - segmentation that receives the structures (created when empty).
    replaceExisting - replace segments the segmentation already has (else they are kept).
    modelId - organ-at-risk model id, or the path of its .json manifest entry (empty: the default model).
    mcSamples - Monte-Carlo dropout passes for the uncertainty volume (0: none; 1 is refused).
    organBrainstem ... organMandible - the organs the network contours (:data:`ORGAN_PARAMETERS`).
    samModel - registered SAM/MedSAM checkpoint id (or a vit_b .pth path) for prompts.
    positivePoints, negativePoints - point lists inside / outside the structure (one axial slice).
    promptBox - optional ROI around the structure on that slice.
    samSegmentName - name of the segment Segment Anything makes.
    propagate - carry the mask through neighbouring slices; maxSlices - at most this many each way (0: no limit).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    replaceExisting: bool = False
    modelId: str = ""
    mcSamples: Annotated[int, WithinRange(0, 64)] = 4
    organBrainstem: bool = True
    organSpinalCord: bool = True
    organParotidR: bool = True
    organParotidL: bool = True
    organEsophagus: bool = True
    organLarynx: bool = True
    organMandible: bool = True
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


class AutoContourWidget(RunningWidgetMixin, CaseModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and calls the Logic; holds no computation.

    The parameter-node and scene plumbing and the Load sample / Import DICOM buttons come from
    :class:`TwinRTCommon.widget.CaseModuleWidgetMixin`, Apply/Cancel and the progress bar from
    :class:`TwinRTCommon.runwidget.RunningWidgetMixin`. This class adds the model list, the buttons
    of the two in-process methods (no model, Segment Anything) and the log. While the network runs
    the Logic calls :meth:`onProgress` at least ten times a second; it pumps Qt events, so the
    Cancel click is seen and sets the CancelToken, and the Logic then kills the worker.
    Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    #: Lines kept in the log box (STYLE.md section 6: a log capped in size).
    LOG_LINES = 500

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        #: Set while the network runs; Apply then cancels it.
        self._cancelToken = None
        #: Installed model entries, in the order of the model selector (after "default").
        self._models = []

    def setup(self) -> None:
        """Load the .ui and connect it; cheap and without prompts (the generic test builds it)."""
        ScriptedLoadableModuleWidget.setup(self)
        logic = AutoContourLogic()
        # Machine-local settings (STYLE.md section 4): the models folder and the device live in QSettings.
        import qt

        settings = qt.QSettings()
        logic.modelsDirectory = str(settings.value("TwinRT/AutoContour/ModelsDirectory", "") or "")
        logic.device = str(settings.value("TwinRT/AutoContour/Device", "cpu") or "cpu")
        logic.logCallback = self.appendLog
        self.setupCaseModule(logic)
        self.ui.progressBar.visible = False
        self.ui.logTextEdit.setMaximumBlockCount(self.LOG_LINES)
        self.ui.classicalButton.connect("clicked(bool)", self.onClassicalButton)
        self.ui.samButton.connect("clicked(bool)", self.onSamButton)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.acceptContoursButton.connect("clicked(bool)", self.onAcceptContoursButton)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateAcceptButton)
        self.updateAcceptButton()
        self.refreshModels()

    # Apply needs the planning CT.
    applyRequires = ("inputVolume",)
    applyReadyToolTip = _("Contour the organs at risk on the selected CT with the AI network.")
    applyMissingToolTip = _("Select the planning CT.")
    # onProgress and setRunning come from RunningWidgetMixin; these say what they show and lock.
    applyIdleText = _("Contour organs at risk")
    lockedWhileRunning = ("patientCollapsibleButton", "inputsCollapsibleButton", "organsCollapsibleButton",
                          "classicalButton", "samCollapsibleButton", "acceptContoursButton")

    def appendLog(self, text: str) -> None:
        """A line in the log box (capped at :attr:`LOG_LINES`)."""
        self.ui.logTextEdit.appendPlainText(text)

    # ------------------------------------------------------------------------------------ models
    def refreshModels(self) -> None:
        """List the installed organ-at-risk models (the default model first) and show the selected one's license."""
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        self.ui.modelSelector.addItem(_("Default model"))
        try:
            self._models = self.logic.availableModels()
        except Exception as exc:  # a damaged manifest entry must not break the panel; say what is wrong
            self._models = []
            self.appendLog(str(exc))
        for entry in self._models:
            self.ui.modelSelector.addItem(f"{entry['id']} ({entry.get('version', '')})")
        self.ui.modelSelector.blockSignals(False)
        current = self._parameterNode.modelId if self._parameterNode else ""
        ids = [entry["id"] for entry in self._models]
        self.ui.modelSelector.currentIndex = ids.index(current) + 1 if current in ids else 0
        self.showModelLicense()

    def onModelSelected(self, index: int) -> None:
        """Put the chosen model's id into the model field (the parameter node keeps it)."""
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.modelId = self._models[index - 1]["id"] if index > 0 else ""
        self.showModelLicense()

    def showModelLicense(self) -> None:
        """The selected model's license, training data and validation (STYLE.md section 7)."""
        index = self.ui.modelSelector.currentIndex
        if index > 0:
            entry = self._models[index - 1]
            data = entry.get("data", {}) or {}
            dice = (entry.get("validation", {}) or {}).get("mean_dice")
            self.ui.modelLicenseLabel.text = _("License: {license}. Data: {data}. Mean Dice: {dice}.").format(
                license=entry.get("license", "?"), data=data.get("name", "?"),
                dice=f"{dice:.2f}" if isinstance(dice, (int, float)) else "?")
        elif not self._models:
            self.ui.modelLicenseLabel.text = _("No organ-at-risk model is installed; see the module help.")
        else:
            self.ui.modelLicenseLabel.text = ""

    # ------------------------------------------------------------------------------------ actions
    def onClassicalButton(self) -> None:
        """Contours without a model into the selected segmentation (a new one when none is selected)."""
        with slicer.util.tryWithErrorDisplay(_("Failed to contour the CT."), waitCursor=True):
            parameters = self._parameterNode
            result = self.logic.contourClassical(parameters.inputVolume, parameters.outputSegmentation,
                                                 replaceExisting=parameters.replaceExisting)
            parameters.outputSegmentation = result["segmentation"]

    def onSamButton(self) -> None:
        """Segment Anything on the placed prompts into the selected segmentation (a new one when none)."""
        with slicer.util.tryWithErrorDisplay(_("Failed to segment from the prompts."), waitCursor=True):
            p = self._parameterNode
            result = self.logic.contourWithPrompts(p.inputVolume, p.outputSegmentation, p.samModel, p.positivePoints,
                                                   p.negativePoints, p.promptBox, p.samSegmentName, p.propagate,
                                                   p.maxSlices or None, replaceExisting=p.replaceExisting)
            p.outputSegmentation = result["segmentation"]

    def onApplyButton(self) -> None:
        """Contour the organs at risk with the network, or cancel the run in progress."""
        from twinrt.progress import CancelledError, CancelToken

        if self._cancelToken is not None:
            self._cancelToken.cancel()
            self.ui.applyButton.text = _("Cancelling...")
            return
        p = self._parameterNode
        # No wait cursor: the user must see that Cancel can be clicked while the worker runs.
        with slicer.util.tryWithErrorDisplay(_("Failed to contour the organs at risk."), waitCursor=False):
            self._cancelToken = CancelToken()
            self.setRunning(True)
            try:
                result = self.logic.segmentCT(p.inputVolume, p.outputSegmentation, p.modelId,
                                              self.logic.selectedOrgans(p), p.replaceExisting, p.mcSamples,
                                              progress=self.onProgress, cancel=self._cancelToken)
            except CancelledError:
                # A cancel is the user's choice, not an error: no error pop-up.
                self.ui.resultsLabel.text = _("Contouring cancelled; the scene is unchanged.")
                return
            finally:
                self._cancelToken = None
                self.setRunning(False)
                # setRunning enables every locked widget; Accept needs a segmentation as well.
                self.updateAcceptButton()
            self.ui.resultsLabel.text = result["summary"]
            p.outputSegmentation = result["segmentation"]

    # ------------------------------------------------------------------------------------ review
    def updateAcceptButton(self, node=None) -> None:
        """Accept needs a segmentation to accept contours in (the Logic checks everything else)."""
        selected = self.ui.outputSegmentationSelector.currentNode() is not None
        self.ui.acceptContoursButton.enabled = selected
        self.ui.acceptContoursButton.toolTip = (
            _("Record that you reviewed and accept the AI contours of the selected segmentation that await review.")
            if selected else _("Select the segmentation whose AI contours you reviewed."))

    def onAcceptContoursButton(self) -> None:
        """Accept the AI contours awaiting review under the reviewer's name (the Logic refuses an empty name)."""
        with slicer.util.tryWithErrorDisplay(_("Failed to accept the AI contours."), waitCursor=True):
            result = self.logic.acceptContours(self._parameterNode.outputSegmentation,
                                               self.ui.reviewerNameLineEdit.text)
            if result["accepted"]:
                self.ui.resultsLabel.text = _("{count} AI contour(s) accepted by {name} at {time}: {names}.").format(
                    count=len(result["accepted"]), name=result["reviewer"], time=result["time"],
                    names=", ".join(result["accepted"]))
            else:
                self.ui.resultsLabel.text = _("No AI contours await review in this segmentation.")


#
# AutoContourLogic
#


class AutoContourLogic(ScriptedLoadableModuleLogic, CaseLogicMixin):
    """All computation of AutoContour; usable without the GUI (batch mode, tests).

    Loading a case (``importCase``, ``loadSampleCase``, ``caseToScene``, ``sceneToCase``) comes from
    :class:`TwinRTCommon.logic.CaseLogicMixin`, so every module shares the one MRML contract. The
    organ-at-risk network runs in a worker process (``AutoContourLib/worker.py``, started by
    :mod:`TwinRTCommon.process`); this class exports the CT to it and writes its organs back, all or
    nothing, into the user's segmentation without losing the user's segments.
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    stageName = "AI contouring"
    # Every part of the stage is built (issue 6): nothing is pending.
    stageIssue = None
    #: ``TwinRT.CreatedBy`` of every node this Logic writes.
    createdBy = "AutoContour"
    #: What the worker computes, in its messages ("Organ-at-risk contouring cancelled by the user").
    WORKER_LABEL = "organ-at-risk contouring"
    #: Provenance written on the segmentation and its segments by :meth:`contourClassical`.
    CLASSICAL_MODEL_ID = "twinrt-classical-hu"
    CLASSICAL_METHOD = "HU thresholds, morphology and connected components (no model, no weights)"
    MODEL_ID_ATTRIBUTE = "AutoContour.ModelId"
    WEIGHTS_SHA256_ATTRIBUTE = "AutoContour.WeightsSha256"
    METHOD_ATTRIBUTE = "AutoContour.Method"
    #: Further provenance of the network's output (segmentation and uncertainty volume).
    MODEL_VERSION_ATTRIBUTE = "AutoContour.ModelVersion"
    MC_SAMPLES_ATTRIBUTE = "AutoContour.MCSamples"
    RESEARCH_USE_ATTRIBUTE = "AutoContour.ResearchUseOnly"
    #: Segment tag: the organ's mean MC-dropout standard deviation on its boundary voxels.
    BOUNDARY_UNCERTAINTY_TAG = "AutoContour.BoundaryUncertainty"
    #: ``TwinRT.Role`` and unit of the uncertainty volume, and the segmentation's reference to it.
    ROLE_UNCERTAINTY = "ContourUncertainty"
    UNIT_ATTRIBUTE = "AutoContour.Unit"
    UNCERTAINTY_UNIT = "probability standard deviation (0-0.5)"
    UNCERTAINTY_REFERENCE_ROLE = "uncertaintyVolumeRef"
    REFERENCE_VOLUME_REFERENCE_ROLE = "referenceVolumeRef"
    #: Segment tags of a person's acceptance of an AI segment (:meth:`acceptContours`): the name, and
    #: the UTC time (ISO 8601). An AI segment is one with the :attr:`MODEL_ID_ATTRIBUTE` tag.
    ACCEPTED_BY_TAG = "AutoContour.AcceptedBy"
    ACCEPTED_AT_TAG = "AutoContour.AcceptedAt"

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        #: Folder of installed models (organ-at-risk models in its ``autocontour`` folder); empty:
        #: ``$TWINRT_MODELS_DIR``, else ``~/.twinrt/models``.
        self.modelsDirectory = ""
        #: torch device of the worker (``cpu`` or ``cuda``) and its CPU threads (0: torch's default).
        self.device = "cpu"
        self.threads = 0

    def getParameterNode(self):
        return AutoContourParameterNode(super().getParameterNode())

    def stageStatusText(self) -> str:
        """The panel's status: every way to contour is available, for research use only."""
        return _("AI contouring available: organs at risk by a MONAI network (with an uncertainty volume), "
                 "Segment Anything prompts, and contours without a model. "
                 "Research use only, not for clinical decisions.")

    # ------------------------------------------------------------------------------------ models
    def availableModels(self) -> list[dict[str, Any]]:
        """The installed organ-at-risk models (manifest entries: ``id``, ``version``, ``license``, ``data``,
        ``validation``..., and ``path``), those in :attr:`modelsDirectory` first.

        :raises InvalidInputError: a damaged manifest entry.
        """
        import os

        from twinrt.autocontour.oar import list_models
        from twinrt.dosepredict.weights import MODELS_DIR_ENV

        # The core reads the folder from the environment at call time; set it only for this call.
        previous = os.environ.get(MODELS_DIR_ENV)
        try:
            if self.modelsDirectory:
                os.environ[MODELS_DIR_ENV] = str(self.modelsDirectory)
            return list_models()
        finally:
            if self.modelsDirectory:
                if previous is None:
                    os.environ.pop(MODELS_DIR_ENV, None)
                else:
                    os.environ[MODELS_DIR_ENV] = previous

    @staticmethod
    def selectedOrgans(parameters) -> Optional[list[str]]:
        """The organs checked in the parameter node (:data:`ORGAN_PARAMETERS`); None when all are."""
        chosen = [name for field, name in ORGAN_PARAMETERS.items() if getattr(parameters, field)]
        return None if len(chosen) == len(ORGAN_PARAMETERS) else chosen

    # -------------------------------------------------------------------------- organ network
    def segmentCT(self, inputVolume, outputSegmentation=None, modelId: str = "", organs=None,
                  replaceExisting: bool = False, mcSamples: Optional[int] = None, progress=None,
                  cancel=None) -> dict[str, Any]:
        """Contour organs at risk on a CT with the organ-at-risk network, in a worker process.

        The organs are merged into the segmentation without losing the user's segments: an organ the
        segmentation already has, under its TG-263 name or another spelling
        (:func:`twinrt.dosepredict.inputs.match_rois`: ``RightParotid``, ``Parotid R``... are
        ``Parotid_R``), is kept as the user drew it, unless ``replaceExisting`` (then its labelmap is
        replaced under the user's name and segment ID, so references to it survive).

        :param inputVolume: the planning CT (``vtkMRMLScalarVolumeNode``, HU).
        :param outputSegmentation: segmentation to add to; None creates one that references the CT,
            in the CT's study.
        :param modelId: model id (:meth:`availableModels`) or the path of a model's ``.json`` manifest
            entry (its weights beside it); empty selects the default model.
        :param organs: organs to contour (TG-263 or OpenKBP names); None for all the model knows.
        :param replaceExisting: replace the organs the segmentation already has instead of keeping them.
        :param mcSamples: Monte-Carlo dropout passes for the uncertainty volume (0: none, None: the
            model's default; 1 is refused: one pass has no spread).
        :param progress: ``progress(fraction, text)``, called at least every 0.1 s while the worker runs
            (the Widget pumps events in it).
        :param cancel: a :class:`twinrt.progress.CancelToken`; a cancel kills the worker's process tree.
        :return: ``segmentation`` (the node), ``added``, ``replaced``, ``kept`` (segment names),
            ``missing`` (organs the network did not find), ``uncertaintyVolume`` (or None),
            ``organUncertainty`` (segment name -> mean standard deviation on its boundary),
            ``modelId``, ``modelVersion``, ``sha256``, ``mcSamples``, ``seconds``, ``notes``,
            ``researchUseOnly`` and ``summary`` (text).
        :raises InvalidInputError: not a CT in HU, a segmentation of another volume, no organ selected,
            an organ the model does not know, bad MC samples; ``MissingInputError``: no such model
            installed; ``WeightsIntegrityError``: weights whose sha256 differs from the manifest entry.
        :raises twinrt.progress.CancelledError: cancelled. :raises WorkerFailedError: the worker crashed.
            In every error case the scene is unchanged.
        """
        import json
        import tempfile
        from pathlib import Path

        from AutoContourLib import worker
        from TwinRTCommon import mrmlio, process
        from twinrt.autocontour import check_ct, merge_actions
        from twinrt.autocontour.oar import to_existing_names
        from twinrt.errors import InvalidInputError
        from twinrt.model import Image
        from twinrt.progress import report

        ct = self._checkInputs(inputVolume, outputSegmentation)
        if mcSamples is not None and (int(mcSamples) < 0 or int(mcSamples) == 1):
            raise InvalidInputError(_("The number of Monte-Carlo dropout samples must be 0 (no uncertainty) or at "
                                      "least 2, got {count}").format(count=mcSamples))
        if organs is not None:
            organs = [str(organ) for organ in organs]
            if not organs:
                raise InvalidInputError(_("Select at least one organ to contour"))
        grid = self._grid(inputVolume)
        image = Image(ct, grid, "CT")
        # Refused here, before the worker spends seconds loading torch (the worker checks again).
        check_ct(image)

        def workerProgress(fraction: float, text: str) -> None:
            report(progress, 0.05 + 0.85 * fraction, text)

        arguments = ["--model", str(modelId or ""), "--device", self.device]
        if organs is not None:
            arguments += ["--organs", json.dumps(organs)]
        if mcSamples is not None:
            arguments += ["--mc-samples", str(int(mcSamples))]
        if self.modelsDirectory:
            arguments += ["--models-dir", str(self.modelsDirectory)]
        if self.threads:
            arguments += ["--threads", str(int(self.threads))]
        with tempfile.TemporaryDirectory(prefix="TwinRT-AutoContour-") as folder:
            inputPath, outputPath = Path(folder) / "input.npz", Path(folder) / "output.npz"
            report(progress, 0.0, "Writing the worker input", cancel)
            worker.writeInput(inputPath, image)
            process.runWorker(worker.WORKER_SCRIPT, ["--input", str(inputPath), "--output", str(outputPath)]
                              + arguments, workerProgress if progress is not None else None, cancel, self.logCallback,
                              label=self.WORKER_LABEL)
            output = worker.readOutput(outputPath, grid)
        report(progress, 0.9, "Writing the contours into the scene", cancel)

        # An organ the user has under another spelling is that segment: kept, or replaced in place.
        existing = self.segmentNames(outputSegmentation) if outputSegmentation is not None else []
        structures, networkNames = to_existing_names(existing, output["structures"])
        actions = merge_actions(existing, [s.name for s in structures], replaceExisting)
        method = (f"Organ-at-risk network {output['model_id']} {output['version']} (MONAI 2.5D U-Net); "
                  f"MC-dropout samples {output['mc_samples']}")
        scene = inputVolume.GetScene()
        oldUncertainty = self._previousUncertainty(outputSegmentation)
        record = {self.MODEL_ID_ATTRIBUTE: output["model_id"], self.MODEL_VERSION_ATTRIBUTE: output["version"],
                  self.WEIGHTS_SHA256_ATTRIBUTE: output["sha256"], self.MC_SAMPLES_ATTRIBUTE: str(output["mc_samples"]),
                  self.METHOD_ATTRIBUTE: method, self.RESEARCH_USE_ATTRIBUTE: output["research_use_only"]}
        with mrmlio.sceneTransaction(scene):
            # First what the transaction can undo (the audit entry, new nodes); then the user's
            # segmentation (_writeStructures restores it itself on failure); an earlier uncertainty
            # volume is refilled last.
            self._auditNetworkRun(inputVolume, output, actions)
            uncertainty = None
            if output["uncertainty"] is not None and oldUncertainty is None:
                uncertainty = self._addUncertaintyVolume(inputVolume, output["uncertainty"], output["source"], record)
            result = self._writeStructures(inputVolume, outputSegmentation, structures, replaceExisting,
                                           output["model_id"], output["sha256"], method)
            segmentation = result["segmentation"]
            organUncertainty = {}
            for name in result["added"] + result["replaced"]:
                segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
                segment = segmentation.GetSegmentation().GetSegment(segmentId)
                # Standard terminology (SNOMED CT) of the organ the network found, also when the
                # segment keeps the user's spelling of it (RightParotid is Parotid_R).
                entry = mrmlio.tg263TerminologyEntry(networkNames[name])
                if entry:
                    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
                value = output["organ_uncertainty"].get(networkNames[name])
                if value is None:
                    continue
                organUncertainty[name] = value
                segment.SetTag(self.BOUNDARY_UNCERTAINTY_TAG, f"{value:.4f}")
            if result["added"] or result["replaced"]:
                for name, value in record.items():
                    segmentation.SetAttribute(name, value)
            if output["uncertainty"] is not None and oldUncertainty is not None:
                uncertainty = oldUncertainty
                self._fillUncertaintyVolume(uncertainty, inputVolume, output["uncertainty"], output["source"], record)
            if uncertainty is not None:
                segmentation.SetNodeReferenceID(self.UNCERTAINTY_REFERENCE_ROLE, uncertainty.GetID())
            elif result["added"] or result["replaced"]:
                # New contours without samples: an earlier run's map no longer describes them.
                segmentation.SetNodeReferenceID(self.UNCERTAINTY_REFERENCE_ROLE, None)
        summary = _("Contoured {added} new, replaced {replaced}, kept {kept} of your segments; not found: {missing}. "
                    "Model {model} {version}, {seconds:.1f} s{uncertainty}. Research use only, not for clinical "
                    "decisions.").format(
            added=len(result["added"]), replaced=len(result["replaced"]), kept=len(result["kept"]),
            missing=", ".join(output["missing"]) or _("none"), model=output["model_id"], version=output["version"],
            seconds=output["seconds"],
            uncertainty=_("; uncertainty volume '{name}'").format(name=uncertainty.GetName()) if uncertainty else "")
        listed = {key: ", ".join(names) or "-" for key, names in (
            ("added", result["added"]), ("replaced", result["replaced"]), ("kept", result["kept"]),
            ("missing", output["missing"]))}
        self.log(f"AutoContour (network {output['model_id']} {output['version']}, sha256 {output['sha256'][:12]}…): "
                 f"added {listed['added']}; replaced {listed['replaced']}; kept the existing {listed['kept']}; "
                 f"not found {listed['missing']}")
        for note in output["notes"]:
            self.log(f"AutoContour: {note}")
        report(progress, 1.0, "Organs at risk contoured")
        return {**result, "missing": list(output["missing"]), "uncertaintyVolume": uncertainty,
                "organUncertainty": organUncertainty, "modelId": output["model_id"],
                "modelVersion": output["version"], "sha256": output["sha256"], "mcSamples": int(output["mc_samples"]),
                "seconds": float(output["seconds"]), "notes": list(output["notes"]),
                "researchUseOnly": output["research_use_only"], "summary": summary}

    @staticmethod
    def segmentNames(segmentation) -> list[str]:
        """Names of the segments of ``segmentation``, in order."""
        segments = segmentation.GetSegmentation()
        return [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]

    def _auditNetworkRun(self, inputVolume, output: dict, actions: dict) -> None:
        """The AI action, with the model and its weights' sha256, in the CT's study audit log (when it has a study)."""
        from TwinRTCommon import mrmlio
        from twinrt.autocontour.oar import audit_entry

        study = mrmlio.studyItemOf(inputVolume)
        if not study:
            return
        scene = inputVolume.GetScene()
        log = mrmlio.studyAuditLog(study, scene)
        log.ai_action(*audit_entry(output["model_id"], output["version"], output["sha256"], output["mc_samples"],
                                   [s.name for s in output["structures"]], actions, output["missing"],
                                   output["seconds"]))
        mrmlio.setStudyAuditLog(study, log, scene)

    def _previousUncertainty(self, segmentation):
        """The uncertainty volume an earlier run left on ``segmentation`` (refilled, not duplicated), or None."""
        if segmentation is None:
            return None
        node = segmentation.GetNodeReference(self.UNCERTAINTY_REFERENCE_ROLE)
        from TwinRTCommon import mrmlio

        if node is None or node.GetAttribute(mrmlio.ROLE_ATTRIBUTE) != self.ROLE_UNCERTAINTY:
            return None
        return node

    def _addUncertaintyVolume(self, inputVolume, array, source: str, record: dict):
        """A new scalar volume beside the CT (its study) holding the network's uncertainty map."""
        from TwinRTCommon import mrmlio

        scene = inputVolume.GetScene()
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                       scene.GenerateUniqueName(f"{inputVolume.GetName()} OAR uncertainty"))
        self._fillUncertaintyVolume(node, inputVolume, array, source, record)
        mrmlio.placeInStudy(node, mrmlio.studyItemOf(inputVolume))
        return node

    def _fillUncertaintyVolume(self, node, inputVolume, array, source: str, record: dict) -> None:
        """Voxels on the CT's grid, provenance and a 0..max window. Deliberately not a dose volume, and
        not a CT: its ``TwinRT.Role`` keeps it out of :func:`TwinRTCommon.mrmlio.findCtVolume`."""
        from TwinRTCommon import mrmlio

        mrmlio.fillScalarMap(node, array, self._grid(inputVolume), self.ROLE_UNCERTAINTY, source, self.createdBy,
                             self.UNIT_ATTRIBUTE, self.UNCERTAINTY_UNIT)
        for name, value in record.items():
            node.SetAttribute(name, value)
        node.SetNodeReferenceID(self.REFERENCE_VOLUME_REFERENCE_ROLE, inputVolume.GetID())

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

    # ------------------------------------------------------------------------------------ review
    def acceptContours(self, segmentation, reviewer: str, segmentIds=None) -> dict[str, Any]:
        """A named person accepts AI contours as reviewed: the clinician's step after every AI method.

        AI segments are those with the :attr:`MODEL_ID_ATTRIBUTE` tag, which the organ-at-risk
        network, Segment Anything and the contours without a model all write; they are proposals
        until accepted. Each accepted segment gets the tags :attr:`ACCEPTED_BY_TAG` (the reviewer)
        and :attr:`ACCEPTED_AT_TAG` (UTC, ISO 8601), and the acceptance is one ``human_message``
        entry by the reviewer in the study's audit log (when the segmentation is in a study), naming
        each segment with its model, weights' sha256 and method.

        Acceptance is of each segment as it is at that moment: an edit made afterwards does not undo
        it (nothing here watches the voxels), so accept a segment again after editing it; the audit
        log keeps both entries. A segment replaced by a later AI run is a new proposal (new segment,
        no acceptance tags).

        :param segmentation: the ``vtkMRMLSegmentationNode``.
        :param reviewer: the accepting person's name; empty, blank or the AI's own name is refused
            (:func:`twinrt.model.is_human_reviewer`, as for plan approval).
        :param segmentIds: IDs of the segments to accept, all AI segments (one already accepted is
            accepted again under this reviewer); None for every AI segment not yet accepted.
        :return: ``accepted`` (segment names; empty when nothing awaited review, and then nothing is
            written), ``reviewer`` (the name, stripped), ``time`` (UTC ISO 8601) and ``audited``
            (whether the study's audit log got the entry).
        :raises InvalidInputError: no segmentation, no reviewer, a segment ID the segmentation does
            not have, or a segment that is not an AI contour (the user's own needs no acceptance);
            the scene is then unchanged. :raises twinrt.audit.AuditLogError: the study's audit log
            fails verification (nothing is written).
        """
        from TwinRTCommon import mrmlio
        from twinrt.audit import utc_now_iso
        from twinrt.errors import InvalidInputError
        from twinrt.model import is_human_reviewer

        if segmentation is None:
            raise InvalidInputError(_("Select the segmentation whose AI contours you reviewed"))
        if not is_human_reviewer(reviewer):
            raise InvalidInputError(_("Type your name as reviewer: only a named person can accept AI contours "
                                      "(got {name})").format(name=repr(reviewer)))
        reviewer = reviewer.strip()
        segments = segmentation.GetSegmentation()
        if segmentIds is None:
            chosen = self._pendingSegmentIds(segmentation)
        else:
            # Every ID is checked before anything is written: all of them are accepted, or none.
            chosen = []
            for segmentId in segmentIds:
                segment = segments.GetSegment(str(segmentId))
                if segment is None:
                    raise InvalidInputError(_("Segmentation '{segmentation}' has no segment with ID '{id}'").format(
                        segmentation=segmentation.GetName(), id=segmentId))
                if not self._isAiSegment(segment):
                    raise InvalidInputError(_("Segment '{name}' is not an AI contour (it has no {tag} tag): your own "
                                              "segments need no acceptance").format(name=segment.GetName(),
                                                                                    tag=self.MODEL_ID_ATTRIBUTE))
                if str(segmentId) not in chosen:
                    chosen.append(str(segmentId))
        time = utc_now_iso()
        if not chosen:
            return {"accepted": [], "reviewer": reviewer, "time": time, "audited": False}

        names = [segments.GetSegment(segmentId).GetName() for segmentId in chosen]
        # What was accepted, with the provenance the AI method left on each segment.
        described = []
        for segmentId in chosen:
            segment = segments.GetSegment(segmentId)
            described.append({"segment_id": segmentId, "name": segment.GetName(),
                              "model_id": self._segmentTag(segment, self.MODEL_ID_ATTRIBUTE),
                              "sha256": self._segmentTag(segment, self.WEIGHTS_SHA256_ATTRIBUTE),
                              "method": self._segmentTag(segment, self.METHOD_ATTRIBUTE)})
        scene = segmentation.GetScene()
        study = mrmlio.studyItemOf(segmentation)
        if study:
            # Appending to the log read from the scene raises (on a damaged log) before anything is stored.
            log = mrmlio.studyAuditLog(study, scene)
            log.human_message(reviewer, f"Accepted AI contours as reviewed: {', '.join(names)} "
                                        f"(segmentation '{segmentation.GetName()}')",
                              {"segmentation": segmentation.GetName(), "accepted_at": time, "segments": described})
            mrmlio.setStudyAuditLog(study, log, scene)
        for segmentId in chosen:
            segment = segments.GetSegment(segmentId)
            segment.SetTag(self.ACCEPTED_BY_TAG, reviewer)
            segment.SetTag(self.ACCEPTED_AT_TAG, time)
        self.log(f"AutoContour: {reviewer} accepted {', '.join(names)} in '{segmentation.GetName()}' at {time}")
        return {"accepted": names, "reviewer": reviewer, "time": time, "audited": bool(study)}

    def pendingReview(self, segmentation) -> list[str]:
        """Names of the AI segments no person has accepted yet (:meth:`acceptContours`), in order.

        For reports ("contours not reviewed"): empty when every AI segment is accepted, when the
        segmentation has only the user's own segments, or when ``segmentation`` is None.

        :param segmentation: a ``vtkMRMLSegmentationNode``, or None.
        """
        if segmentation is None:
            return []
        segments = segmentation.GetSegmentation()
        return [segments.GetSegment(segmentId).GetName() for segmentId in self._pendingSegmentIds(segmentation)]

    def _pendingSegmentIds(self, segmentation) -> list[str]:
        """IDs of the AI segments without :attr:`ACCEPTED_BY_TAG`, in the segmentation's order."""
        segments = segmentation.GetSegmentation()
        return [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())
                if self._isAiSegment(segments.GetNthSegment(i))
                and not self._segmentTag(segments.GetNthSegment(i), self.ACCEPTED_BY_TAG)]

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _segmentTag(segment, tag: str) -> str:
        """The value of a segment tag, "" when the segment does not have it."""
        import vtk

        value = vtk.reference("")
        return str(value) if segment.GetTag(tag, value) else ""

    def _isAiSegment(self, segment) -> bool:
        """A segment one of this module's AI methods wrote (it carries the model tag), not the user's own."""
        import vtk

        return bool(segment.GetTag(self.MODEL_ID_ATTRIBUTE, vtk.reference("")))

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

    The shared tests are :class:`TwinRTCommon.testing.CaseModuleTestMixin`'s (the attributes below
    say how to call this module's stage and what its parameter node holds). The network tests use
    :func:`makeTinyOarModel`, an UNTRAINED tiny network: they test the code path (worker process,
    sha256 check, merging into the user's segments, provenance), never the quality of a contour.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    logicClass = AutoContourLogic
    stageMethodName = "segmentCT"
    stageArguments = ("ct", "segmentation")
    invalidStageArguments = (None,)  # no CT selected
    # Every part of the stage is built (issue 6): nothing is pending.
    stageIssueText = ""
    parameterNodes = {"inputVolume": "ct"}
    parameterValues = {"modelId": "test-model", "organLarynx": False, "replaceExisting": True}
    invalidParameterValues = {"mcSamples": -1}
    parameterDefaults = {"outputSegmentation": None,  # created by the stage when left empty
                         "mcSamples": 4, "organBrainstem": True, "organMandible": True,
                         "positivePoints": None, "negativePoints": None, "promptBox": None,
                         "samSegmentName": "SAM structure", "propagate": True, "maxSlices": 0}

    def runTest(self):
        """Run all tests of this module (Slicer's ctest and Reload and Test call only this)."""
        self.runCaseModuleTests(self.test_ClassicalContoursKeepTheUsersSegments, self.test_ClassicalContoursBadInput,
                                self.test_ContourWithPrompts, self.test_SegmentCT,
                                self.test_SegmentCTKeepsTheUsersSegments, self.test_SegmentCTCancelled,
                                self.test_SegmentCTBadInput, self.test_SegmentCTCorruptWeights,
                                self.test_AcceptContours, self.test_AcceptContoursRefused)

    @staticmethod
    def oarLogic():
        """A Logic that finds the tiny untrained model in its models folder."""
        logic = AutoContourLogic()
        logic.modelsDirectory = makeTinyOarModel()["modelsDirectory"]
        return logic

    @staticmethod
    def segmentState(segmentation) -> list:
        """(segment ID, name) of every segment: what a failed run must not change."""
        segments = segmentation.GetSegmentation()
        return [(segments.GetNthSegmentID(i), segments.GetNthSegment(i).GetName())
                for i in range(segments.GetNumberOfSegments())]

    def test_SegmentCT(self):
        """The network (untrained tiny model) in the worker: TG-263 segments on the CT, provenance, uncertainty."""
        import numpy as np
        import vtk

        from TwinRTCommon import mrmlio
        from twinrt.autocontour.oar import TG263_NAMES

        self.delayDisplay("Organ-at-risk network (untrained test model: the code path, not accuracy)")
        logic = self.oarLogic()
        model = makeTinyOarModel()
        created = logic.caseToScene(_syntheticCase())
        ct = created["ct"]
        steps = []
        result = logic.segmentCT(ct, modelId=model["modelId"], mcSamples=2,
                                 progress=lambda f, text: steps.append((f, text)))
        fractions = [f for f, _text in steps]
        self.assertEqual((fractions[0], fractions[-1]), (0.0, 1.0))
        self.assertEqual(fractions, sorted(fractions))
        self.assertIn("Reading the CT", [text for _f, text in steps])  # the worker's own lines arrive

        # A new segmentation on the CT, in its study, with TG-263 names; every organ found or missing.
        segmentation = result["segmentation"]
        self.assertIsNot(segmentation, created["segmentation"])
        self.assertEqual(mrmlio.referenceVolumeId(segmentation), ct.GetID())
        self.assertEqual(mrmlio.studyItemOf(segmentation), created["studyItem"])
        names = self.logicClass.segmentNames(segmentation)
        self.assertTrue(names, "the tiny model found nothing on the phantom")
        self.assertEqual(names, result["added"])
        self.assertEqual(sorted(names + result["missing"]), sorted(TG263_NAMES.values()))
        for name in names:
            segment = segmentation.GetSegmentation().GetSegment(
                segmentation.GetSegmentation().GetSegmentIdBySegmentName(name))
            for tag, expected in ((logic.MODEL_ID_ATTRIBUTE, model["modelId"]),
                                  (logic.WEIGHTS_SHA256_ATTRIBUTE, model["sha256"])):
                value = vtk.reference("")
                self.assertTrue(segment.GetTag(tag, value), tag)
                self.assertEqual(str(value), expected)
            value = vtk.reference("")
            self.assertTrue(segment.GetTag(logic.BOUNDARY_UNCERTAINTY_TAG, value), name)
            self.assertGreaterEqual(float(str(value)), 0.0)
            mask = mrmlio.segmentMask(segmentation, segmentation.GetSegmentation().GetSegmentIdBySegmentName(name), ct)
            self.assertTrue(mask.any(), name)
            # Standard terminology: the organ's SNOMED CT entry (TwinRTCommon.mrmlio.TG263_TERMINOLOGY).
            value = vtk.reference("")
            self.assertTrue(segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value), name)
            self.assertEqual(str(value), mrmlio.tg263TerminologyEntry(name))
            self.assertIn(f"^{mrmlio.TG263_TERMINOLOGY[name][0]}^", str(value))
        self.assertEqual(logic.pendingReview(segmentation), names)  # AI proposals until someone accepts them
        self.assertEqual(segmentation.GetAttribute(logic.MODEL_ID_ATTRIBUTE), model["modelId"])
        self.assertEqual(segmentation.GetAttribute(logic.WEIGHTS_SHA256_ATTRIBUTE), model["sha256"])
        self.assertEqual(segmentation.GetAttribute(logic.MC_SAMPLES_ATTRIBUTE), "2")
        self.assertEqual(segmentation.GetAttribute(mrmlio.RESEARCH_USE_ATTRIBUTE), twinrtResearchUse())
        self.assertIn("Research use only", segmentation.GetAttribute(logic.RESEARCH_USE_ATTRIBUTE))
        self.assertEqual((result["modelId"], result["sha256"], result["mcSamples"]),
                         (model["modelId"], model["sha256"], 2))

        # The uncertainty volume: the CT's grid and study, values in [0, 0.5], the same provenance.
        uncertainty = result["uncertaintyVolume"]
        self.assertIsNotNone(uncertainty)
        self.assertEqual(uncertainty.GetName(), f"{ct.GetName()} OAR uncertainty")
        self.assertTrue(mrmlio.volumeGrid(uncertainty) == mrmlio.volumeGrid(ct))
        self.assertEqual(mrmlio.studyItemOf(uncertainty), created["studyItem"])
        values = slicer.util.arrayFromVolume(uncertainty)
        self.assertTrue(np.isfinite(values).all())
        self.assertGreaterEqual(float(values.min()), 0.0)
        self.assertLessEqual(float(values.max()), 0.5 + 1e-6)
        self.assertGreater(float(values.max()), 0.0)
        self.assertFalse(mrmlio.isDoseVolumeNode(uncertainty))
        self.assertEqual(uncertainty.GetAttribute(logic.MODEL_ID_ATTRIBUTE), model["modelId"])
        self.assertEqual(uncertainty.GetAttribute(logic.WEIGHTS_SHA256_ATTRIBUTE), model["sha256"])
        self.assertIn("Research use only", uncertainty.GetAttribute(mrmlio.RESEARCH_USE_ATTRIBUTE))
        self.assertEqual(segmentation.GetNodeReference(logic.UNCERTAINTY_REFERENCE_ROLE).GetID(), uncertainty.GetID())
        # The uncertainty volume is never taken for the CT.
        self.assertEqual(logic.findCtVolume().GetID(), ct.GetID())

        # The AI action is in the study's audit log, with the model and its weights' sha256.
        entry = mrmlio.studyAuditLog(created["studyItem"]).entries[-1]
        self.assertIn(model["sha256"], str(entry))

        # A second run into the same segmentation, asked to replace: the same segment IDs, no new node,
        # the uncertainty volume refilled rather than duplicated.
        before = mrmlio.nodeIds(slicer.mrmlScene)
        ids = self.segmentState(segmentation)
        again = logic.segmentCT(ct, segmentation, model["modelId"], replaceExisting=True, mcSamples=2)
        self.assertEqual((again["added"], again["kept"]), ([], []))
        self.assertEqual(sorted(again["replaced"]), sorted(names))
        self.assertEqual(self.segmentState(segmentation), ids)
        self.assertIs(again["uncertaintyVolume"], uncertainty)
        self.assertEqual(mrmlio.nodeIds(slicer.mrmlScene), before)
        self.delayDisplay("Test passed")

    def test_SegmentCTKeepsTheUsersSegments(self):
        """The user's organs are kept (also when spelt differently: no duplicate), or replaced in place."""
        import numpy as np

        from TwinRTCommon import mrmlio
        from twinrt.model import Structure

        self.delayDisplay("Organ-at-risk network: the user's segments")
        logic = self.oarLogic()
        created = logic.caseToScene(_syntheticCase())
        ct, userSegmentation = created["ct"], created["segmentation"]
        # What the network finds on its own (a new segmentation), to compare with; the model given
        # by the path of its manifest entry, without uncertainty (no samples, no volume).
        model = makeTinyOarModel()
        modelId = model["modelId"]
        alone = logic.segmentCT(ct, modelId=model["entry"], mcSamples=0)
        self.assertIsNone(alone["uncertaintyVolume"])
        self.assertEqual((alone["modelId"], alone["mcSamples"]), (modelId, 0))
        found = alone["added"]
        # The user has two of those organs: one under its TG-263 name, one under a synonym.
        synonyms = {"Parotid_R": "RightParotid", "Parotid_L": "LeftParotid", "SpinalCord": "Spinal Cord",
                    "Brainstem": "Brain_Stem", "Esophagus": "Oesophagus", "Bone_Mandible": "Mandible",
                    "Larynx": "larynx"}
        self.assertGreaterEqual(len(found), 2, found)
        synonym = "Parotid_R" if "Parotid_R" in found else found[1]
        exact = next(name for name in found if name != synonym)
        userName = synonyms[synonym]
        grid = mrmlio.volumeGrid(ct)
        drawn = np.zeros(grid.shape, bool)
        drawn[5:7, 6:8, 7:9] = True
        userIds = {name: mrmlio.addStructureSegment(userSegmentation, ct, Structure(name, drawn, grid))
                   for name in (exact, userName)}
        segments = userSegmentation.GetSegmentation()
        userBefore = {name: mrmlio.segmentMask(userSegmentation, segments.GetSegmentIdBySegmentName(name), ct).copy()
                      for name in self.logicClass.segmentNames(userSegmentation)}

        result = logic.segmentCT(ct, userSegmentation, modelId, organs=[exact, synonym], mcSamples=0)
        self.assertIs(result["segmentation"], userSegmentation)
        self.assertEqual(sorted(result["kept"]), sorted([exact, userName]))
        self.assertEqual(result["added"], [])  # only the two organs asked for
        self.assertIsNone(result["uncertaintyVolume"])
        names = self.logicClass.segmentNames(userSegmentation)
        self.assertNotIn(synonym, names)  # no duplicate of the user's organ under the network's spelling
        for name, mask in userBefore.items():
            segmentId = userSegmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
            self.assertTrue(np.array_equal(mrmlio.segmentMask(userSegmentation, segmentId, ct), mask), name)

        # Asked to replace: the user's two segments take the network's voxels under their own names and IDs.
        replaced = logic.segmentCT(ct, userSegmentation, modelId, [exact, synonym], replaceExisting=True, mcSamples=0)
        self.assertEqual(sorted(replaced["replaced"]), sorted([exact, userName]))
        self.assertEqual(len(self.logicClass.segmentNames(userSegmentation)), len(names))
        for name, networkName in ((exact, exact), (userName, synonym)):
            self.assertEqual(userSegmentation.GetSegmentation().GetSegmentIdBySegmentName(name), userIds[name])
            expected = mrmlio.segmentMask(alone["segmentation"], alone["segmentation"].GetSegmentation()
                                          .GetSegmentIdBySegmentName(networkName), ct)
            self.assertTrue(np.array_equal(mrmlio.segmentMask(userSegmentation, userIds[name], ct), expected), name)
            # The terminology is the organ's, under the user's spelling too (RightParotid is Parotid_R).
            self.assertEqual(logic._segmentTag(userSegmentation.GetSegmentation().GetSegment(userIds[name]),
                                               slicer.vtkSegment.GetTerminologyEntryTagName()),
                             mrmlio.tg263TerminologyEntry(networkName), name)
        # The other segments of the user are untouched.
        for name in ("BODY", "PTV60", "Organ"):
            segmentId = userSegmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
            self.assertTrue(np.array_equal(mrmlio.segmentMask(userSegmentation, segmentId, ct), userBefore[name]), name)
        self.delayDisplay("Test passed")

    def test_SegmentCTCancelled(self):
        """A cancel before the start or while the worker runs raises CancelledError; the scene is unchanged."""
        from TwinRTCommon.testing import sceneState
        from twinrt.progress import CancelledError, CancelToken

        self.delayDisplay("Organ-at-risk network: cancel")
        logic = self.oarLogic()
        created = logic.caseToScene(_syntheticCase())
        ct, segmentation = created["ct"], created["segmentation"]
        before, segmentsBefore = sceneState(slicer.mrmlScene), self.segmentState(segmentation)
        token = CancelToken()
        token.cancel()
        with self.assertRaises(CancelledError):
            logic.segmentCT(ct, segmentation, makeTinyOarModel()["modelId"], cancel=token)
        self.assertEqual(sceneState(slicer.mrmlScene), before)

        # Cancelled by the user once the worker reports (what the Widget's Cancel does).
        token = CancelToken()
        seen = []

        def cancelWhileRunning(fraction: float, text: str) -> None:
            seen.append(text)
            if fraction > 0.05:
                token.cancel()

        with self.assertRaises(CancelledError) as context:
            logic.segmentCT(ct, segmentation, makeTinyOarModel()["modelId"], mcSamples=2, progress=cancelWhileRunning,
                            cancel=token)
        self.assertIn("Organ-at-risk contouring cancelled", str(context.exception))
        self.assertIn("Reading the CT", seen)  # the worker's first line arrived before the cancel
        self.assertEqual(sceneState(slicer.mrmlScene), before)
        self.assertEqual(self.segmentState(segmentation), segmentsBefore)
        self.delayDisplay("Test passed")

    def test_SegmentCTBadInput(self):
        """Not a CT, bad samples or organs, an unknown model or organ: typed errors, the scene unchanged."""
        import subprocess
        import tempfile
        from pathlib import Path

        import numpy as np

        from AutoContourLib import worker
        from TwinRTCommon import mrmlio, process, workerio
        from TwinRTCommon.testing import sceneState
        from twinrt.errors import InvalidInputError, MissingInputError
        from twinrt.model import Image

        self.delayDisplay("Organ-at-risk network: bad input")
        logic = self.oarLogic()
        created = logic.caseToScene(_syntheticCase())
        ct, segmentation = created["ct"], created["segmentation"]
        before, segmentsBefore = sceneState(slicer.mrmlScene), self.segmentState(segmentation)

        def refused(error, match, *args, **kwargs):
            with self.assertRaises(error) as context:
                logic.segmentCT(*args, **kwargs)
            self.assertIn(match, str(context.exception))
            self.assertEqual(sceneState(slicer.mrmlScene), before, match)
            self.assertEqual(self.segmentState(segmentation), segmentsBefore, match)

        refused(InvalidInputError, "Select a planning CT", None)
        refused(InvalidInputError, "at least 2", ct, segmentation, mcSamples=1)
        refused(InvalidInputError, "at least one organ", ct, segmentation, organs=[])
        # From the worker, typed: an organ the model does not know, a model that is not installed.
        refused(InvalidInputError, "'Heart'", ct, segmentation, makeTinyOarModel()["modelId"], organs=["Heart"],
                mcSamples=0)
        refused(MissingInputError, "no-such-model", ct, segmentation, modelId="no-such-model")

        # A volume that is not a CT in HU: refused by the Logic, and by the worker as a typed error.
        scaled = (np.asarray(slicer.util.arrayFromVolume(ct), dtype=np.float32) + 1000.0) / 2000.0
        with tempfile.TemporaryDirectory() as folder:
            inputPath = Path(folder) / "in.npz"
            worker.writeInput(inputPath, Image(scaled, mrmlio.volumeGrid(ct)))
            arguments = ["--input", str(inputPath), "--output", str(Path(folder) / "out.npz")]
            run = subprocess.run(process.workerCommand(worker.WORKER_SCRIPT, arguments),
                                 env=process.workerEnvironment(), capture_output=True, text=True, timeout=120)
            self.assertEqual(run.returncode, workerio.EXIT_INPUT_ERROR, run.stdout + run.stderr)
            self.assertIn("ERRORTYPE InvalidInputError", run.stdout.splitlines())
            with self.assertRaisesRegex(InvalidInputError, "not a CT in Hounsfield"):
                process.runWorker(worker.WORKER_SCRIPT, arguments)
            self.assertFalse((Path(folder) / "out.npz").exists())
        self.delayDisplay("Test passed")

    def test_SegmentCTCorruptWeights(self):
        """Weights changed by one byte are refused by the sha256 check (WeightsIntegrityError); scene unchanged."""
        import shutil
        import tempfile
        from pathlib import Path

        from TwinRTCommon.testing import sceneState
        from twinrt.dosepredict.weights import WeightsIntegrityError

        self.delayDisplay("Organ-at-risk network: corrupt weights")
        logic = AutoContourLogic()
        model = makeTinyOarModel()
        created = logic.caseToScene(_syntheticCase())
        ct, segmentation = created["ct"], created["segmentation"]
        before, segmentsBefore = sceneState(slicer.mrmlScene), self.segmentState(segmentation)
        with tempfile.TemporaryDirectory() as folder:
            entry = Path(shutil.copy(model["entry"], folder))
            weights = Path(shutil.copy(model["weights"], folder))
            data = bytearray(weights.read_bytes())
            data[len(data) // 2] ^= 0xFF
            weights.write_bytes(bytes(data))
            with self.assertRaises(WeightsIntegrityError) as context:
                logic.segmentCT(ct, segmentation, modelId=str(entry), mcSamples=0)
            self.assertIn("sha256", str(context.exception).lower())
        self.assertEqual(sceneState(slicer.mrmlScene), before)
        self.assertEqual(self.segmentState(segmentation), segmentsBefore)
        self.delayDisplay("Test passed")

    def segmentTags(self, segmentation) -> list:
        """(segment ID, acceptance tags) of every segment: what a refused acceptance must not change."""
        logic, segments = AutoContourLogic(), segmentation.GetSegmentation()
        return [(segments.GetNthSegmentID(i), logic._segmentTag(segments.GetNthSegment(i), logic.ACCEPTED_BY_TAG),
                 logic._segmentTag(segments.GetNthSegment(i), logic.ACCEPTED_AT_TAG))
                for i in range(segments.GetNumberOfSegments())]

    def test_AcceptContours(self):
        """A named reviewer accepts the AI segments: tags, a human_message in the audit log, nothing pending."""
        import datetime

        from TwinRTCommon import mrmlio

        self.delayDisplay("Accept AI contours")
        logic = AutoContourLogic()
        created = logic.caseToScene(_syntheticCase())
        ct, segmentation, study = created["ct"], created["segmentation"], created["studyItem"]
        # The user's own segments (BODY, PTV60, Organ) are not AI proposals: nothing awaits review.
        self.assertEqual(logic.pendingReview(segmentation), [])
        self.assertEqual(logic.pendingReview(None), [])
        logic.contourClassical(ct, segmentation)
        self.assertEqual(logic.pendingReview(segmentation), ["External"])
        external = segmentation.GetSegmentation().GetSegmentIdBySegmentName("External")
        entries = len(mrmlio.studyAuditLog(study).entries)

        result = logic.acceptContours(segmentation, "  Dr^Test ")
        self.assertEqual((result["accepted"], result["reviewer"], result["audited"]), (["External"], "Dr^Test", True))
        accepted = datetime.datetime.fromisoformat(result["time"].replace("Z", "+00:00"))
        self.assertEqual(accepted.utcoffset(), datetime.timedelta(0))  # UTC
        segment = segmentation.GetSegmentation().GetSegment(external)
        self.assertEqual(logic._segmentTag(segment, logic.ACCEPTED_BY_TAG), "Dr^Test")
        self.assertEqual(logic._segmentTag(segment, logic.ACCEPTED_AT_TAG), result["time"])
        for name in ("BODY", "PTV60", "Organ"):  # the user's segments are not marked
            userSegment = segmentation.GetSegmentation().GetSegment(
                segmentation.GetSegmentation().GetSegmentIdBySegmentName(name))
            self.assertEqual(logic._segmentTag(userSegment, logic.ACCEPTED_BY_TAG), "", name)
        self.assertEqual(logic.pendingReview(segmentation), [])

        # One human_message by the reviewer, naming the segment and its model; the chain still verifies.
        log = mrmlio.studyAuditLog(study)
        log.verify()
        self.assertEqual(len(log.entries), entries + 1)
        entry = log.entries[-1]
        self.assertEqual((entry["kind"], entry["actor"]), ("human_message", "Dr^Test"))
        self.assertIn("External", entry["message"])
        self.assertEqual(entry["details"]["accepted_at"], result["time"])
        self.assertEqual([(s["segment_id"], s["name"], s["model_id"]) for s in entry["details"]["segments"]],
                         [(external, "External", logic.CLASSICAL_MODEL_ID)])

        # Nothing left to accept: nothing is written.
        again = logic.acceptContours(segmentation, "Dr^Test")
        self.assertEqual((again["accepted"], again["audited"]), ([], False))
        self.assertEqual(len(mrmlio.studyAuditLog(study).entries), entries + 1)

        # Accepted again by name (e.g. after an edit): the new reviewer and time, a second entry.
        second = logic.acceptContours(segmentation, "Dr^Second", [external])
        self.assertEqual(second["accepted"], ["External"])
        self.assertEqual(logic._segmentTag(segment, logic.ACCEPTED_BY_TAG), "Dr^Second")
        self.assertEqual(len(mrmlio.studyAuditLog(study).entries), entries + 2)

        # A later AI run that replaces the segment makes a new proposal: it awaits review again.
        logic.contourClassical(ct, segmentation, replaceExisting=True)
        self.assertEqual(logic.pendingReview(segmentation), ["External"])
        self.delayDisplay("Test passed")

    def test_AcceptContoursRefused(self):
        """No reviewer, an unknown segment, the user's own segment: InvalidInputError, the scene unchanged."""
        from TwinRTCommon.testing import sceneState
        from twinrt.errors import InvalidInputError

        self.delayDisplay("Accept AI contours: refused")
        logic = AutoContourLogic()
        created = logic.caseToScene(_syntheticCase())
        ct, segmentation = created["ct"], created["segmentation"]
        logic.contourClassical(ct, segmentation)
        segments = segmentation.GetSegmentation()
        external, body = (segments.GetSegmentIdBySegmentName(name) for name in ("External", "BODY"))
        before, tagsBefore = sceneState(slicer.mrmlScene), self.segmentTags(segmentation)

        def refused(match, *args):
            with self.assertRaises(InvalidInputError) as context:
                logic.acceptContours(*args)
            self.assertIn(match, str(context.exception))
            self.assertEqual(sceneState(slicer.mrmlScene), before, match)  # the audit log included
            self.assertEqual(self.segmentTags(segmentation), tagsBefore, match)

        refused("Type your name", segmentation, "")
        refused("Type your name", segmentation, "   ")
        refused("Type your name", segmentation, None)
        refused("Type your name", segmentation, "TwinRT AI")  # the AI cannot accept its own contours
        refused("Select the segmentation", None, "Dr^Test")
        refused("no segment with ID 'NoSuchSegment'", segmentation, "Dr^Test", ["NoSuchSegment"])
        # The user's own segment needs no acceptance; with it in the list, not even External is accepted.
        refused("'BODY' is not an AI contour", segmentation, "Dr^Test", [body])
        refused("'BODY' is not an AI contour", segmentation, "Dr^Test", [external, body])
        self.assertEqual(logic.pendingReview(segmentation), ["External"])
        self.delayDisplay("Test passed")

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


#: The tiny untrained organ model of the self-tests, built once per process (see :func:`makeTinyOarModel`).
_TINY_OAR_MODEL: dict = {}


def makeTinyOarModel() -> dict:
    """A tiny organ-at-risk network, UNTRAINED (random weights), in a temporary models folder (tests only).

    Its masks mean nothing: the tests check the code path (manifest and sha256, the worker process,
    merging into the user's segments, the MRML contract of the result), never the quality of a
    contour. Written by the core's :func:`twinrt.autocontour.oar.write_tiny_model` into
    ``<modelsDirectory>/autocontour``, where the core looks for installed models.

    :return: ``modelsDirectory``, ``modelId``, ``entry`` (the ``.json`` manifest entry), ``weights``
        (the ``.pt`` file beside it) and ``sha256`` (of the weights, as the manifest records it).
    """
    if _TINY_OAR_MODEL:
        return _TINY_OAR_MODEL
    import atexit
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from twinrt.autocontour.oar import USER_SUBDIR, write_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="TwinRT-AutoContour-test-models-"))
    atexit.register(shutil.rmtree, folder, True)
    entryPath = write_tiny_model(folder / USER_SUBDIR)
    entry = json.loads(entryPath.read_text(encoding="utf-8"))
    _TINY_OAR_MODEL.update(modelsDirectory=str(folder), modelId=entry["id"], entry=str(entryPath),
                           weights=str(entryPath.parent / entry["file"]), sha256=entry["sha256"])
    return _TINY_OAR_MODEL


def twinrtResearchUse():
    import twinrt

    return twinrt.RESEARCH_USE_ONLY
