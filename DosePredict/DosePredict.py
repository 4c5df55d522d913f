"""DosePredict: AI prediction of the 3D dose distribution from CT and structures (research use only).

Issue 5 built the stage: the CT and the structures mapped to the model's structures (ROI mapping,
suggested automatically and editable) go to a worker process (``DosePredictLib/worker.py``) that runs
:meth:`twinrt.dosepredict.predict.DosePredictor.predict_case`; the predicted dose comes back as a
SlicerRT dose volume in Gy, with a Monte-Carlo-dropout uncertainty volume beside it, both carrying
the model id, the weights' sha256 and the research-use label. Where SlicerRT is installed the same
prediction is offered in External Beam Planning as a dose engine (``DosePredictLib/slicerRtDoseEngine.py``).
This file follows Slicer's scripted-module template (Utilities/Templates/Modules/Scripted):
DosePredict (module descriptor), DosePredictParameterNode, DosePredictWidget (thin: binds the .ui and calls
the Logic), DosePredictLogic (all computation, batch-capable) and DosePredictTest (runs headless too).
"""

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper, WithinRange

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from TwinRTCommon.logic import CaseLogicMixin, checkCtVolume, checkSegmentation
from TwinRTCommon.testing import CaseModuleTestMixin
from TwinRTCommon.runwidget import RunningWidgetMixin
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
        # Core modules only: the prediction is a plain scalar volume tagged as dose, so the module
        # works without SlicerRT; its dose engine is registered when SlicerRT is there.
        self.parent.dependencies = ["Segmentations", "SubjectHierarchy"]
        self.parent.contributors = ["TwinRT contributors"]
        self.parent.helpText = _("""
<b>Research use only, not for clinical decisions.</b><br>
Predicts a 3D dose distribution (Gy) from the planning CT and its structures with a 3D U-Net trained on
head-and-neck cases (OpenKBP). Map your segments to the model's structures in the table (suggested
automatically; at least one target, PTV56, PTV63 or PTV70, is required), choose the model and the number
of Monte-Carlo dropout samples, and press <i>Predict dose</i>.
<br>The result is a dose volume in the CT's study that SlicerRT's DVH, Isodose and RTDOSE export accept,
and an uncertainty volume (per-voxel standard deviation, Gy). Both carry the model id, the weights'
sha256 and the warnings of the prediction as <tt>DosePredict.*</tt> attributes.
<br>Where SlicerRT is installed the prediction is also offered as the "TwinRT DosePredict" dose engine
in External Beam Planning (untested in TwinRT's own test suite).
""")
        self.parent.acknowledgementText = _("""
Part of the TwinRT extension suite. The sample patient and the training data are from the OpenKBP data set
(Babier et al., Medical Physics 48(9), 2021) built on The Cancer Imaging Archive head-and-neck collections.
The network is MONAI's U-Net. Built on 3D Slicer and SlicerRT.
""")
        # Register the sample patient after startup, when the Sample Data module exists, and the
        # dose engine once SlicerRT's External Beam Planning (if installed) has loaded.
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", registerSlicerRtDoseEngine)


#
# Register sample data sets in Sample Data module
#


def registerSampleData():
    """Add the TwinRT sample patient to Sample Data; all five modules call this, it registers once."""
    from TwinRTCommon.sampledata import registerSampleData as registerTwinRTSampleData

    registerTwinRTSampleData()


def registerSlicerRtDoseEngine() -> bool:
    """Offer the dose prediction in SlicerRT's External Beam Planning; nothing happens without SlicerRT.

    :return: True when registered.
    """
    from DosePredictLib.slicerRtDoseEngine import registerDoseEngine

    return registerDoseEngine()


#
# DosePredictParameterNode
#


@parameterNodeWrapper
class DosePredictParameterNode:
    """The parameters of DosePredict, saved with the scene.

    inputVolume - planning CT.
    inputSegmentation - structures, referencing the CT.
    outputDose - dose volume that receives the prediction (created when empty).
    modelId - dose model id or weights path (empty: the default model).
    mcSamples - Monte-Carlo dropout passes for the uncertainty volume (0: none; 1 is refused).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    outputDose: vtkMRMLScalarVolumeNode
    modelId: str = ""
    mcSamples: Annotated[int, WithinRange(0, 64)] = 4


#
# DosePredictWidget
#


class DosePredictWidget(RunningWidgetMixin, CaseModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and calls the Logic; holds no computation.

    The parameter-node and scene plumbing and the Load sample / Import DICOM buttons come from
    :class:`TwinRTCommon.widget.CaseModuleWidgetMixin`. This class adds the model list, the ROI
    mapping table, Apply (which turns into Cancel while the worker runs), the progress bar and the log.
    The Logic calls :meth:`onProgress` at least ten times a second while the worker runs; it pumps Qt
    events, so the Cancel click is seen and sets the CancelToken, and the Logic then kills the worker.
    Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    #: Lines kept in the log box (STYLE.md section 6: a log capped in size).
    LOG_LINES = 500

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        #: Set while a prediction runs; Apply then cancels it.
        self._cancelToken = None
        #: ID of the segmentation whose segments the ROI table offers ("" when none).
        self._roiTableSegmentationId = ""
        #: Installed model entries, in the order of the model selector (after "default").
        self._models = []

    def setup(self) -> None:
        """Load the .ui and connect it; cheap and without prompts (the generic test builds it)."""
        ScriptedLoadableModuleWidget.setup(self)
        logic = DosePredictLogic()
        # Machine-local settings (STYLE.md section 4): the models folder and the device live in QSettings.
        import qt

        settings = qt.QSettings()
        logic.modelsDirectory = str(settings.value("TwinRT/DosePredict/ModelsDirectory", "") or "")
        logic.device = str(settings.value("TwinRT/DosePredict/Device", "cpu") or "cpu")
        logic.logCallback = self.appendLog
        self.setupCaseModule(logic)
        self.ui.progressBar.visible = False
        self.ui.logTextEdit.setMaximumBlockCount(self.LOG_LINES)
        self.setupRoiTable()
        self.ui.inputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.suggestMappingButton.connect("clicked(bool)", self.onSuggestMappingButton)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModelButton)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolderButton)
        self.refreshModels()
        self.onSegmentationChanged(self.ui.inputSegmentationSelector.currentNode())

    # Apply needs the planning CT and its structures; the ROI mapping is checked by the Logic,
    # whose message says which structure to map.
    applyRequires = ("inputVolume", "inputSegmentation")
    applyReadyToolTip = _("Predict the dose.")
    applyMissingToolTip = _("Select the planning CT and its structures.")

    def preselectInputs(self, parameters) -> None:
        """The scene's only CT and the structures referencing it."""
        super().preselectInputs(parameters)
        if parameters.inputVolume and not parameters.inputSegmentation:
            parameters.inputSegmentation = self.logic.findSegmentation(parameters.inputVolume)

    # ------------------------------------------------------------------------------------ models
    def refreshModels(self) -> None:
        """List the installed models (the default model first) and show the selected one's license."""
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        self.ui.modelSelector.addItem(_("Default model"))
        try:
            self._models = self.logic.availableModels()
        except Exception as exc:  # a damaged manifest must not break the panel; say what is wrong
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

    def onImportModelButton(self) -> None:
        """Install a model from its files (STYLE.md section 7: downloads are often blocked)."""
        import qt

        path = qt.QFileDialog.getOpenFileName(self.parent, _("Import dose model"), "",
                                              _("Model manifest entry (*.json)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the dose model."), waitCursor=True):
            entry = self.logic.importModel(path)
            self.refreshModels()
            self._parameterNode.modelId = entry["id"]
            self.refreshModels()

    def onOpenModelsFolderButton(self) -> None:
        """Show the models folder in the file browser (created when missing)."""
        import qt

        folder = self.logic.modelsFolder()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def showModelLicense(self) -> None:
        """The selected model's license and training data (STYLE.md section 7)."""
        index = self.ui.modelSelector.currentIndex
        if index > 0:
            entry = self._models[index - 1]
            data = entry.get("data", {}) or {}
            self.ui.modelLicenseLabel.text = _("License: {license}. Data: {data}.").format(
                license=entry.get("license", "?"), data=data.get("name", "?"))
        elif not self._models:
            self.ui.modelLicenseLabel.text = _("No dose model is installed; see the module help.")
        else:
            self.ui.modelLicenseLabel.text = ""

    # --------------------------------------------------------------------------------- ROI table
    def setupRoiTable(self) -> None:
        """One row per model structure; the second column chooses the segment mapped to it."""
        import qt

        table = self.ui.roiMappingTable
        rois = DosePredictLogic.modelRois()
        table.setRowCount(len(rois))
        for row, roi in enumerate(rois):
            required = roi in DosePredictLogic.targetRois()
            item = qt.QTableWidgetItem(roi + (" *" if required else ""))
            item.setFlags(qt.Qt.ItemIsEnabled)
            item.setToolTip(_("A target: at least one target is required.") if required
                            else _("An organ at risk: optional, the dose there is less reliable without it."))
            table.setItem(row, 0, item)
            table.setCellWidget(row, 1, qt.QComboBox())

    def onSegmentationChanged(self, segmentation) -> None:
        """Offer the new segmentation's segments and show the suggested mapping."""
        self.fillRoiTable(segmentation, self.logic.suggestRoiMapping(segmentation) if segmentation else {})

    def onSuggestMappingButton(self) -> None:
        """Replace the table's choices by the automatic suggestion."""
        segmentation = self.ui.inputSegmentationSelector.currentNode()
        with slicer.util.tryWithErrorDisplay(_("Failed to suggest the structure mapping."), waitCursor=True):
            self.fillRoiTable(segmentation, self.logic.suggestRoiMapping(segmentation) if segmentation else {})

    def fillRoiTable(self, segmentation, roiMap: dict) -> None:
        """Segment choices ("" = not mapped) for every model structure, ``roiMap``'s selected."""
        names = self.logic.segmentNames(segmentation) if segmentation else []
        self._roiTableSegmentationId = segmentation.GetID() if segmentation else ""
        for row, roi in enumerate(DosePredictLogic.modelRois()):
            combo = self.ui.roiMappingTable.cellWidget(row, 1)
            combo.clear()
            combo.addItems([""] + names)
            combo.currentIndex = names.index(roiMap[roi]) + 1 if roi in roiMap and roiMap[roi] in names else 0

    def roiMapFromTable(self, segmentation) -> Optional[dict]:
        """The mapping chosen in the table; None (automatic) when the table shows another segmentation."""
        if segmentation is None or segmentation.GetID() != self._roiTableSegmentationId:
            return None
        roiMap = {}
        for row, roi in enumerate(DosePredictLogic.modelRois()):
            name = self.ui.roiMappingTable.cellWidget(row, 1).currentText
            if name:
                roiMap[roi] = name
        return roiMap

    # ------------------------------------------------------------------------------------- apply
    def appendLog(self, text: str) -> None:
        """A line in the log box (capped at :attr:`LOG_LINES`)."""
        self.ui.logTextEdit.appendPlainText(text)

    # onProgress and setRunning come from RunningWidgetMixin; these say what they show and lock.
    applyIdleText = _("Predict dose")
    lockedWhileRunning = ("patientCollapsibleButton", "inputsCollapsibleButton", "mappingCollapsibleButton")

    def onApplyButton(self) -> None:
        """Predict the dose, or cancel the prediction that runs."""
        from twinrt.progress import CancelledError, CancelToken

        if self._cancelToken is not None:
            self._cancelToken.cancel()
            self.ui.applyButton.text = _("Cancelling...")
            return
        parameters = self._parameterNode
        # No wait cursor: the user must see that Cancel can be clicked while the worker runs.
        with slicer.util.tryWithErrorDisplay(_("Failed to predict the dose."), waitCursor=False):
            # psutil lets Cancel stop the worker's whole process tree; pip_ensure asks first and
            # skips in --testing (STYLE.md section 7).
            slicer.packaging.pip_ensure(slicer.packaging.load_requirements(self.resourcePath("requirements.txt")),
                                        requester="DosePredict")
            roiMap = self.roiMapFromTable(parameters.inputSegmentation)
            self._cancelToken = CancelToken()
            self.setRunning(True)
            try:
                created = self.logic.predictDose(parameters.inputVolume, parameters.inputSegmentation,
                                                 parameters.outputDose, parameters.modelId, roiMap,
                                                 parameters.mcSamples, progress=self.onProgress,
                                                 cancel=self._cancelToken)
            except CancelledError:
                # A cancel is the user's choice, not an error: no error pop-up.
                self.ui.resultsLabel.text = _("Prediction cancelled; the scene is unchanged.")
                return
            finally:
                self._cancelToken = None
                self.setRunning(False)
            self.ui.resultsLabel.text = created["summary"]
            if not parameters.outputDose:
                parameters.outputDose = created["predictedDose"]
            slicer.util.setSliceViewerLayers(foreground=created["predictedDose"], foregroundOpacity=0.5)


#
# DosePredictLogic
#


class DosePredictLogic(ScriptedLoadableModuleLogic, CaseLogicMixin):
    """All computation of DosePredict; usable without the GUI (batch mode, tests).

    Loading a case (``importCase``, ``loadSampleCase``, ``caseToScene``, ``sceneToCase``) comes from
    :class:`TwinRTCommon.logic.CaseLogicMixin`, so every module shares the one MRML contract. The
    prediction itself runs in a worker process (``DosePredictLib/worker.py``, started by
    :mod:`TwinRTCommon.process`); this class exports the case to it and writes its result back,
    all or nothing.
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    stageName = "dose prediction"
    # The stage is built (issue 5): nothing is pending.
    stageIssue = None

    #: ``TwinRT.CreatedBy`` of every node this Logic writes.
    createdBy = "DosePredict"
    #: What the worker computes, in its messages ("Dose prediction cancelled by the user").
    WORKER_LABEL = "dose prediction"
    #: Attributes of the predicted dose and of its uncertainty volume (STYLE.md section 7).
    MODEL_ID_ATTRIBUTE = "DosePredict.ModelId"
    MODEL_VERSION_ATTRIBUTE = "DosePredict.ModelVersion"
    WEIGHTS_SHA256_ATTRIBUTE = "DosePredict.WeightsSHA256"
    WARNINGS_ATTRIBUTE = "DosePredict.Warnings"
    ROI_MAP_ATTRIBUTE = "DosePredict.ROIMap"
    MC_SAMPLES_ATTRIBUTE = "DosePredict.MCSamples"
    RESEARCH_USE_ATTRIBUTE = "DosePredict.ResearchUseOnly"
    #: Unit of the uncertainty volume (it is not a dose volume, so SlicerRT's study unit does not apply).
    UNIT_ATTRIBUTE = "DosePredict.Unit"
    #: ``TwinRT.Role`` of the uncertainty volume (the dose has ``TwinRT.Role = Dose``).
    ROLE_UNCERTAINTY = "DoseUncertainty"
    #: Node reference roles between the prediction's nodes and to its inputs.
    UNCERTAINTY_REFERENCE_ROLE = "uncertaintyVolumeRef"
    PREDICTED_DOSE_REFERENCE_ROLE = "predictedDoseRef"
    REFERENCE_VOLUME_REFERENCE_ROLE = "referenceVolumeRef"
    SEGMENTATION_REFERENCE_ROLE = "segmentationRef"
    #: ``TwinRT.DoseName`` of a prediction (``predicted 2``... when the study has one already).
    DOSE_NAME = "predicted"

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        #: Folder of installed models; empty: ``$TWINRT_MODELS_DIR``, else ``~/.twinrt/models``.
        self.modelsDirectory = ""
        #: torch device of the worker (``cpu`` or ``cuda``) and its CPU threads (0: torch's default).
        self.device = "cpu"
        self.threads = 0

    def getParameterNode(self):
        return DosePredictParameterNode(super().getParameterNode())

    def stageStatusText(self) -> str:
        """The panel's status: the prediction is available, for research use only."""
        return _("Dose prediction available: a 3D U-Net predicts the dose from the CT and the structures. "
                 "Research use only, not for clinical decisions.")


    # ------------------------------------------------------------------------------------ models
    def availableModels(self) -> list[dict[str, Any]]:
        """The installed dose models (manifest entries: ``id``, ``version``, ``license``, ``sizeMB``, ``data``...).

        :raises InvalidInputError: a damaged ``models.json``.
        """
        from twinrt.dosepredict.weights import MODELS_DIR_ENV, list_models

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

    def modelsFolder(self) -> Path:
        """The installed models' folder: :attr:`modelsDirectory`, else $TWINRT_MODELS_DIR, else ~/.twinrt/models."""
        from twinrt.dosepredict.weights import user_models_dir

        return Path(self.modelsDirectory).expanduser() if self.modelsDirectory else user_models_dir()

    def importModel(self, entryPath, makeDefault: bool = False) -> dict[str, Any]:
        """Install a model from files (behind a firewall, a model trained elsewhere) into :meth:`modelsFolder`.

        :param entryPath: the model's manifest entry ``<id>.json``, its weights file beside it.
        :param makeDefault: make it the default model (the first model installed always is).
        :return: the installed model's entry.
        :raises MissingInputError: no such file; :raises WeightsIntegrityError: weights whose sha256
            differs from the entry; :raises InvalidInputError: not a manifest entry.
        """
        from twinrt.dosepredict.weights import register_model

        # register_model validates the entry and the weights' sha256 before it copies anything.
        register_model(entryPath, self.modelsFolder(), make_default=makeDefault)
        entry = json.loads(Path(entryPath).read_text(encoding="utf-8"))
        self.log(f"DosePredict: installed model {entry['id']} {entry.get('version', '')} into {self.modelsFolder()}")
        return next(m for m in self.availableModels() if m["id"] == entry["id"])

    # ------------------------------------------------------------------------------- ROI mapping
    @staticmethod
    def modelRois() -> list[str]:
        """The model's structures: organs at risk, then targets (OpenKBP names)."""
        from twinrt.dosepredict.config import MODEL_ROIS

        return list(MODEL_ROIS)

    @staticmethod
    def targetRois() -> list[str]:
        """The model's targets; at least one must be mapped."""
        from twinrt.dosepredict.config import PTV_ROIS

        return list(PTV_ROIS)

    @staticmethod
    def segmentNames(segmentation) -> list[str]:
        """Names of the segments of ``segmentation``, in order."""
        segments = segmentation.GetSegmentation()
        return [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]

    @staticmethod
    def studyPrescriptions(node) -> dict[str, float]:
        """Target name -> prescription (Gy) stored with the case in ``node``'s study ({} when none)."""
        from TwinRTCommon import mrmlio

        study = mrmlio.studyItemOf(node)
        if not study:
            return {}
        text = node.GetScene().GetSubjectHierarchyNode().GetItemAttribute(study, mrmlio.CASE_METADATA_ATTRIBUTE)
        try:
            prescriptions = json.loads(text or "{}").get("prescriptions") or []
            return {str(p["target"]): float(p["dose_gy"]) for p in prescriptions}
        except (ValueError, TypeError, KeyError, AttributeError):
            return {}  # only a hint for the suggestion; sceneToCase reports a damaged attribute

    def suggestRoiMapping(self, segmentation, prescriptions: Optional[dict] = None) -> dict[str, str]:
        """The automatic model structure -> segment name mapping, for the user to check and edit.

        Matching (:func:`twinrt.dosepredict.inputs.match_rois`) ignores case, separators and word order
        and knows synonyms and laterality forms (``Parotid_L``, ``Spinal Cord``, ``PTV_70``); a
        target whose prescription is known maps to the PTV of that dose whatever its name.

        :param segmentation: the structures (``vtkMRMLSegmentationNode``).
        :param prescriptions: target name -> prescription (Gy); default those stored in the study.
        :return: model structure (e.g. ``"LeftParotid"``) -> segment name; unmatched ones are absent.
        """
        from twinrt.dosepredict.inputs import match_rois

        checkSegmentation(segmentation)
        if prescriptions is None:
            prescriptions = self.studyPrescriptions(segmentation)
        mapping, _unmatched = match_rois(self.segmentNames(segmentation), prescriptions)
        return mapping

    def checkRoiMapping(self, segmentation, roiMap: dict) -> tuple[dict[str, str], list[str]]:
        """Check a mapping and return it with segment names, and the optional structures it leaves out.

        :param segmentation: the structures.
        :param roiMap: model structure -> segment name or ID; empty values mean "not mapped".
        :return: ``(mapping by segment name, unmapped organs at risk)``.
        :raises InvalidInputError: a key that is not a model structure.
        :raises StructureError: a segment the segmentation lacks, or no target mapped (the message
            names the required structures).
        """
        from twinrt.dosepredict.inputs import check_roi_map

        # Segment IDs (what scripts pass) become names; the core checks the mapping.
        segments = segmentation.GetSegmentation()
        named = {roi: (segments.GetSegment(str(value)).GetName()
                       if value and segments.GetSegment(str(value)) is not None else value)
                 for roi, value in dict(roiMap or {}).items()}
        return check_roi_map(named, self.segmentNames(segmentation), f"'{segmentation.GetName()}'")

    # -------------------------------------------------------------------------------- prediction
    def _checkInputs(self, ctVolume, segmentation, outputDose, mcSamples) -> None:
        from twinrt.errors import GeometryError, InvalidInputError

        checkCtVolume(ctVolume, _("planning CT"))
        checkSegmentation(segmentation, ctVolume)
        if mcSamples is not None and (int(mcSamples) < 0 or int(mcSamples) == 1):
            raise InvalidInputError(_("The number of Monte-Carlo dropout samples must be 0 (no uncertainty) or at "
                                      "least 2, got {count}").format(count=mcSamples))
        if outputDose is not None:
            if (not outputDose.IsA("vtkMRMLScalarVolumeNode") or outputDose.IsA("vtkMRMLLabelMapVolumeNode")
                    or outputDose.GetID() == ctVolume.GetID()):
                raise InvalidInputError(_("The output dose must be a scalar volume other than the CT; leave it empty "
                                          "to create one"))
            if outputDose.GetParentTransformNode() is not None:
                raise GeometryError(_("The output dose '{name}' is under a transform; choose another output or leave "
                                      "it empty").format(name=outputDose.GetName()))

    def runPrediction(self, ctVolume, segmentation, modelId: str = "", roiMap: Optional[dict] = None,
                      mcSamples: Optional[int] = None, progress=None, cancel=None) -> dict[str, Any]:
        """Predict the dose in the worker process; the scene is not changed.

        :param ctVolume: the planning CT; :param segmentation: its structures.
        :param modelId: model id or ``.pt``/``.json`` path; empty: the default model.
        :param roiMap: model structure -> segment name or ID; None: :meth:`suggestRoiMapping`.
        :param mcSamples: Monte-Carlo dropout passes for the uncertainty (0: none; None: the model's).
        :param progress: ``progress(fraction, text)``, called at least every 0.1 s while the worker runs.
        :param cancel: a :class:`twinrt.progress.CancelToken`; a cancel kills the worker's process tree.
        :return: ``case`` (read from the scene), ``dose`` and ``std`` (:class:`twinrt.model.Dose` on the
            CT grid; ``std`` None without MC samples), ``roiMap``, ``missingROIs``, ``warnings``, ``modelId``,
            ``modelVersion``, ``sha256``, ``mcSamples``, ``seconds``, ``researchUseOnly``.
        :raises: see :meth:`predictDose`.
        """
        import dataclasses

        import numpy as np

        from twinrt.errors import StructureError
        from twinrt.model import Dose, StructureType
        from twinrt.progress import report

        from DosePredictLib import worker
        from TwinRTCommon import process

        self._checkInputs(ctVolume, segmentation, None, mcSamples)
        if roiMap is None:
            roiMap = self.suggestRoiMapping(segmentation)
        mapping, missing = self.checkRoiMapping(segmentation, roiMap)
        report(progress, 0.0, "Reading the case from the scene", cancel)
        case = self.sceneToCase(ctVolume.GetScene(), ctVolume, segmentation)
        # Empty targets are dropped by the core; with none left it would fail after loading the model.
        targetNames = [name for roi, name in mapping.items() if roi in self.targetRois()]
        if all(case.structure(name).is_empty for name in targetNames):
            raise StructureError(_("The target segment(s) {targets} are empty; draw the target or map another "
                                   "segment").format(targets=", ".join(f"'{n}'" for n in targetNames)), targetNames[0])
        # The body structure, when the case has one, bounds the dose; else the worker thresholds the CT.
        bodies = [s for s in case.structures if s.type == StructureType.EXTERNAL and not s.is_empty]
        possibleDoseMask = bodies[0].mask if bodies else None
        # The worker needs only the mapped structures (a CT-sized mask each).
        exported = dataclasses.replace(case, structures=[s for s in case.structures if s.name in mapping.values()],
                                       doses={}, plans=[])

        def workerProgress(fraction: float, text: str) -> None:
            report(progress, 0.05 + 0.85 * fraction, text)

        arguments = ["--model", modelId or "", "--roi-map", json.dumps(mapping), "--device", self.device]
        if mcSamples is not None:
            arguments += ["--mc-samples", str(int(mcSamples))]
        if self.modelsDirectory:
            arguments += ["--models-dir", str(self.modelsDirectory)]
        if self.threads:
            arguments += ["--threads", str(int(self.threads))]
        with tempfile.TemporaryDirectory(prefix="TwinRT-DosePredict-") as folder:
            inputPath, outputPath = Path(folder) / "input.npz", Path(folder) / "output.npz"
            report(progress, 0.02, "Writing the worker input", cancel)
            worker.writeInput(inputPath, exported, possibleDoseMask)
            process.runWorker(worker.WORKER_SCRIPT, ["--input", str(inputPath), "--output", str(outputPath)]
                              + arguments, workerProgress if progress is not None else None, cancel, self.logCallback,
                              label=self.WORKER_LABEL)
            output = worker.readOutput(outputPath)
        grid = case.ct.grid
        if output["dose"].shape != grid.shape:
            raise process.WorkerFailedError(f"The worker returned a dose of shape {output['dose'].shape} for a CT of "
                                            f"shape {grid.shape}")
        # Dose() refuses NaN or negative voxels: a broken model cannot reach the scene.
        dose = Dose(np.asarray(output["dose"], np.float32), grid, self.DOSE_NAME, source=output["dose_source"])
        std = None
        if output["std"] is not None:
            std = Dose(np.asarray(output["std"], np.float32), grid, f"{self.DOSE_NAME}_std",
                       source=output["std_source"])
        for warning in output["warnings"]:
            self.log(f"DosePredict: {warning}", logging.WARNING)
        return {"case": case, "dose": dose, "std": std, "roiMap": dict(output["roi_map"]), "missingROIs": missing,
                "warnings": list(output["warnings"]), "modelId": output["model_id"],
                "modelVersion": output["model_version"], "sha256": output["sha256"],
                "mcSamples": int(output["mc_samples"]), "seconds": float(output["seconds"]),
                "researchUseOnly": output["research_use_only"]}

    def predictDose(self, ctVolume, segmentation, outputDose=None, modelId: str = "", roiMap: Optional[dict] = None,
                    mcSamples: Optional[int] = None, progress=None, cancel=None) -> dict[str, Any]:
        """Predict the dose (Gy) of a plan for this CT and these structures, and add it to the CT's study.

        :param ctVolume: the planning CT (``vtkMRMLScalarVolumeNode``, HU).
        :param segmentation: the structures; must reference ``ctVolume``. A structure of type external
            (or named BODY/External) bounds the dose; without one the body is thresholded from the CT.
        :param outputDose: volume to fill (written last, see :meth:`addPredictionToScene`); a new dose
            volume when None.
        :param modelId: model id or ``.pt``/``.json`` path; empty selects the default model.
        :param roiMap: model structure (``PTV70``, ``LeftParotid``...) -> segment name or ID; None uses
            :meth:`suggestRoiMapping`. At least one target (PTV56, PTV63, PTV70) must be mapped.
        :param mcSamples: Monte-Carlo dropout passes for the uncertainty volume (0: none, None: the model's).
        :param progress: ``progress(fraction, text)``, called at least every 0.1 s while the worker runs
            (the Widget pumps events in it).
        :param cancel: a :class:`twinrt.progress.CancelToken`.
        :return: ``predictedDose`` (the dose volume), ``uncertaintyVolume`` (or None), ``studyItem``,
            ``doseName``, ``warnings``, ``missingROIs``, ``roiMap``, ``modelId``, ``modelVersion``,
            ``sha256``, ``summary`` (text) and ``prediction`` (what :meth:`runPrediction` returned).
        :raises InvalidInputError: missing or invalid inputs; its subclasses ``StructureError`` (no
            target mapped: the message names the required structures; a segment that does not exist)
            and ``GeometryError`` (structures not on the CT); ``MissingInputError``: no such model
            installed; ``WeightsIntegrityError``: weights whose sha256 differs from the manifest.
        :raises twinrt.progress.CancelledError: cancelled. :raises WorkerFailedError: the worker crashed.
            In every error case the scene is unchanged.
        """
        from twinrt.progress import report

        self._checkInputs(ctVolume, segmentation, outputDose, mcSamples)
        prediction = self.runPrediction(ctVolume, segmentation, modelId, roiMap, mcSamples, progress, cancel)
        report(progress, 0.9, "Writing the prediction into the scene", cancel)
        created = self.addPredictionToScene(prediction, ctVolume, segmentation, outputDose)
        self.log(f"DosePredict: {created['summary']}")
        report(progress, 1.0, "Dose predicted")
        return created

    # ----------------------------------------------------------------------------- scene writing
    def _studyItem(self, scene, ctVolume, patientId: str) -> int:
        """The CT's study; a CT outside any study (loaded from a file) gets a new one for the dose."""
        from TwinRTCommon import mrmlio

        study = mrmlio.studyItemOf(ctVolume)
        if study:
            return study
        # SlicerRT reads the dose unit from the study of a dose, so the prediction needs one.
        sh = scene.GetSubjectHierarchyNode()
        ctItem = sh.GetItemByDataNode(ctVolume)
        levels = slicer.vtkMRMLSubjectHierarchyConstants
        patient = sh.GetItemAncestorAtLevel(ctItem, levels.GetDICOMLevelPatient()) if ctItem else 0
        if not patient:
            patient = sh.CreateSubjectItem(sh.GetSceneItemID(), patientId)
        return sh.CreateStudyItem(patient, "TwinRT dose prediction")

    def _addUncertaintyVolume(self, scene, std, studyItem: int, name: str, source: str):
        """A scalar volume of the per-voxel standard deviation (Gy); deliberately *not* tagged as a dose."""
        from TwinRTCommon import mrmlio

        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        mrmlio.fillScalarMap(node, std.array, std.grid, self.ROLE_UNCERTAINTY, source, self.createdBy,
                             self.UNIT_ATTRIBUTE, "Gy")
        scene.GetSubjectHierarchyNode().CreateItem(studyItem, node)
        return node

    @staticmethod
    def _copyVolume(source, target, studyItem: int) -> None:
        """Make ``target`` hold ``source``'s voxels, geometry, attributes and display; move it under the study."""
        import vtk

        from TwinRTCommon import mrmlio

        matrix = vtk.vtkMatrix4x4()
        source.GetIJKToRASMatrix(matrix)
        target.SetIJKToRASMatrix(matrix)
        image = vtk.vtkImageData()
        image.DeepCopy(source.GetImageData())
        target.SetAndObserveImageData(image)
        for name in source.GetAttributeNames():
            target.SetAttribute(name, source.GetAttribute(name))
        if target.GetDisplayNode() is None:
            target.CreateDefaultDisplayNodes()
        fromDisplay, toDisplay = source.GetDisplayNode(), target.GetDisplayNode()
        toDisplay.SetAndObserveColorNodeID(fromDisplay.GetColorNodeID())
        toDisplay.AutoWindowLevelOff()
        toDisplay.SetWindowLevelMinMax(fromDisplay.GetWindowLevelMin(), fromDisplay.GetWindowLevelMax())
        toDisplay.SetLowerThreshold(fromDisplay.GetLowerThreshold())
        toDisplay.SetUpperThreshold(fromDisplay.GetUpperThreshold())
        toDisplay.SetApplyThreshold(fromDisplay.GetApplyThreshold())
        mrmlio.placeInStudy(target, studyItem)

    @staticmethod
    def _removeVolume(node) -> None:
        """Remove a volume and its display nodes (removing a node leaves its display nodes behind)."""
        scene = node.GetScene()
        displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        scene.RemoveNode(node)
        for display in displays:
            if display is not None:
                scene.RemoveNode(display)

    def addPredictionToScene(self, prediction: dict[str, Any], ctVolume, segmentation, outputDose=None
                             ) -> dict[str, Any]:
        """Write a prediction (:meth:`runPrediction`) into the CT's study in one scene transaction.

        New nodes are added first; an existing ``outputDose`` (and the uncertainty volume it references
        from an earlier prediction) is filled last, because the transaction undoes added nodes but not
        changes to existing ones.

        :param prediction: what :meth:`runPrediction` returned.
        :param ctVolume: the planning CT; :param segmentation: its structures.
        :param outputDose: volume to fill, or None for a new dose volume.
        :return: see :meth:`predictDose`.
        """
        from TwinRTCommon import mrmlio

        scene = ctVolume.GetScene()
        case = prediction["case"]
        record = {self.MODEL_ID_ATTRIBUTE: prediction["modelId"],
                  self.MODEL_VERSION_ATTRIBUTE: prediction["modelVersion"],
                  self.WEIGHTS_SHA256_ATTRIBUTE: prediction["sha256"],
                  self.WARNINGS_ATTRIBUTE: json.dumps(prediction["warnings"]),
                  self.ROI_MAP_ATTRIBUTE: json.dumps(prediction["roiMap"], sort_keys=True),
                  self.MC_SAMPLES_ATTRIBUTE: str(prediction["mcSamples"]),
                  self.RESEARCH_USE_ATTRIBUTE: prediction["researchUseOnly"]}
        oldUncertainty = outputDose.GetNodeReference(self.UNCERTAINTY_REFERENCE_ROLE) if outputDose else None
        with mrmlio.sceneTransaction(scene):
            studyItem = self._studyItem(scene, ctVolume, case.patient_id)
            doseName = mrmlio.uniqueDoseName(scene, studyItem, self.DOSE_NAME, exclude=outputDose)
            baseName = f"{case.patient_id} Dose {doseName}"
            doseNode = mrmlio.addDoseVolume(scene, prediction["dose"], studyItem, baseName, doseName,
                                            prediction["dose"].source, self.createdBy)
            uncertainty = None
            if prediction["std"] is not None:
                uncertainty = self._addUncertaintyVolume(scene, prediction["std"], studyItem,
                                                         f"{baseName} uncertainty (SD)", prediction["std"].source)
            # Last: an existing output node (and its earlier uncertainty volume) takes the new content.
            if outputDose is not None:
                self._copyVolume(doseNode, outputDose, studyItem)
                self._removeVolume(doseNode)
                doseNode = outputDose
                if uncertainty is not None and oldUncertainty is not None and \
                        scene.GetNodeByID(oldUncertainty.GetID()) is not None:
                    self._copyVolume(uncertainty, oldUncertainty, studyItem)
                    self._removeVolume(uncertainty)
                    uncertainty = oldUncertainty
            doseNode.SetNodeReferenceID(self.UNCERTAINTY_REFERENCE_ROLE, uncertainty.GetID() if uncertainty else None)
            for node in (doseNode, uncertainty):
                if node is None:
                    continue
                for name, value in record.items():
                    node.SetAttribute(name, value)
                node.SetNodeReferenceID(self.REFERENCE_VOLUME_REFERENCE_ROLE, ctVolume.GetID())
                node.SetNodeReferenceID(self.SEGMENTATION_REFERENCE_ROLE, segmentation.GetID())
            if uncertainty is not None:
                uncertainty.SetNodeReferenceID(self.PREDICTED_DOSE_REFERENCE_ROLE, doseNode.GetID())
        dose = prediction["dose"]
        summary = _("Predicted dose '{name}' with model {model} {version} in {seconds:.1f} s: maximum {maximum:.1f} "
                    "Gy{uncertainty}; {count} warning(s). Research use only, not for clinical decisions.").format(
            name=doseNode.GetName(), model=prediction["modelId"], version=prediction["modelVersion"],
            seconds=prediction["seconds"], maximum=dose.max_gy, count=len(prediction["warnings"]),
            uncertainty=_(", mean uncertainty {sd:.2f} Gy inside the body").format(
                sd=float(prediction["std"].array[dose.array > 0].mean()) if (dose.array > 0).any() else 0.0)
            if prediction["std"] is not None else "")
        return {"predictedDose": doseNode, "uncertaintyVolume": uncertainty, "studyItem": studyItem,
                "doseName": doseNode.GetAttribute(mrmlio.DOSE_NAME_ATTRIBUTE), "warnings": prediction["warnings"],
                "missingROIs": prediction["missingROIs"], "roiMap": prediction["roiMap"],
                "modelId": prediction["modelId"], "modelVersion": prediction["modelVersion"],
                "sha256": prediction["sha256"], "summary": summary, "prediction": prediction}


#
# DosePredictTest
#

#: The tiny random model of the self-tests, built once per process (see :func:`makeTinyModel`).
_TINY_MODEL: dict = {}


def makeTinyModel() -> dict:
    """A tiny dose model with RANDOM weights, installed in a temporary models folder (tests only).

    The weights are random on purpose: the tests check the code path (manifest and sha256, the worker
    process, the MRML contract of the result), never the accuracy of a dose. Its recipe is shrunk
    (a 32^3 model grid, two U-Net levels of 4 and 8 channels) so that a prediction takes about a
    second after torch has loaded. Built with the core's own functions (``save_model``,
    ``register_model``) and registered as the folder's default model.

    :return: ``modelsDirectory``, ``modelId``, ``weights`` (the registered ``.pt`` file) and ``entry``
        (the manifest entry ``save_model`` wrote, before registration).
    """
    if _TINY_MODEL:
        return _TINY_MODEL
    import atexit
    import shutil

    import torch

    from twinrt.dosepredict.config import DosePredictConfig
    from twinrt.dosepredict.model import build_network
    from twinrt.dosepredict.weights import register_model, save_model

    folder = Path(tempfile.mkdtemp(prefix="TwinRT-DosePredict-test-models-"))
    atexit.register(shutil.rmtree, folder, True)
    config = DosePredictConfig.from_dict({
        "model_id": "tiny-random-test", "version": "0.0.1",
        "comment": "Random weights for DosePredict's self-tests: tests the code path, not accuracy.",
        "network": {"channels": [4, 8], "strides": [2], "num_res_units": 0, "dropout": 0.2},
        "inputs": {"model_shape": [32, 32, 32], "downsample": 2, "crop_shape": [16, 16, 16]},
        "predict": {"mc_samples": 2}})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        network = build_network(config)
    _entry, entryPath = save_model(network, config, folder / "trained",
                                   data={"name": "none (random weights, tests only)", "citation": ""})
    register_model(entryPath, folder / "models", make_default=True)
    _TINY_MODEL.update(modelsDirectory=str(folder / "models"), modelId=config.model_id,
                       weights=folder / "models" / f"{config.model_id}.pt", entry=entryPath)
    return _TINY_MODEL


def makeDosePredictPhantom(patientId: str = "TwinRTDosePhantom"):
    """A 24 x 28 x 28 voxel (3 mm) head-and-neck-like phantom with OpenKBP-style structures.

    Water in an ellipsoidal body, PTV70 inside PTV56, spinal cord, brainstem and a left parotid;
    the right parotid, oesophagus, larynx and mandible are missing (optional structures).

    :return: ``(case, body mask)``.
    """
    import numpy as np

    from twinrt.geometry import Grid
    from twinrt.model import Case, Image, Prescription, Structure, StructureType

    shape = (24, 28, 28)  # (k, j, i)
    grid = Grid(shape, (3.0, 3.0, 3.0), (-40.5, -40.5, -34.5))
    k, j, i = np.indices(shape)
    body = ((i - 13.5) / 12.5) ** 2 + ((j - 13.5) / 11.5) ** 2 + ((k - 11.5) / 11.5) ** 2 <= 1.0
    ct = np.where(body, (i + 3 * j + 7 * k) % 40 - 20, -1000).astype(np.int16)

    def box(k0, k1, j0, j1, i0, i1):
        mask = np.zeros(shape, bool)
        mask[k0:k1, j0:j1, i0:i1] = True
        return mask & body

    structures = [Structure("BODY", body, grid, (177, 122, 101), StructureType.EXTERNAL),
                  Structure("PTV70", box(8, 16, 9, 17, 8, 16), grid, (255, 0, 0), StructureType.TARGET),
                  Structure("PTV56", box(6, 18, 7, 19, 6, 18), grid, (255, 128, 0), StructureType.TARGET),
                  Structure("SpinalCord", box(2, 22, 20, 22, 13, 15), grid, (255, 255, 0), StructureType.ORGAN),
                  Structure("Brainstem", box(18, 22, 15, 19, 12, 16), grid, (0, 255, 0), StructureType.ORGAN),
                  Structure("Parotid_L", box(10, 15, 12, 16, 20, 24), grid, (0, 151, 206), StructureType.ORGAN)]
    metadata = {"patient_name": "Phantom^DosePredict", "source": "DosePredictTest",
                "prescriptions": [Prescription("PTV70", 70.0, 35), Prescription("PTV56", 56.0, 35)]}
    return Case(patientId, Image(ct, grid, "CT"), structures, {}, [], metadata), body


class DosePredictTest(CaseModuleTestMixin, ScriptedLoadableModuleTest):
    """Logic tests on tiny synthetic cases built in memory; they run in Slicer and headless.

    The shared tests are :class:`TwinRTCommon.testing.CaseModuleTestMixin`'s (the attributes below
    say how to call this module's stage and what its parameter node holds). The prediction tests
    use :func:`makeTinyModel`, a model with random weights: they test the code path, not accuracy.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    logicClass = DosePredictLogic
    stageMethodName = "predictDose"
    stageArguments = ("ct", "segmentation")
    invalidStageArguments = ("ct", None)  # no structures selected
    # The stage is built (issue 5): nothing is pending.
    stageIssueText = ""
    parameterNodes = {"inputVolume": "ct", "inputSegmentation": "segmentation"}
    parameterValues = {"modelId": "tiny-random-test"}
    invalidParameterValues = {"mcSamples": -1}
    parameterDefaults = {"mcSamples": 4}

    def runTest(self):
        """Run all tests of this module (Slicer's ctest and Reload and Test call only this)."""
        self.runCaseModuleTests(self.test_RoiMapping, self.test_ModelsFolder, self.test_PredictDose,
                                self.test_PredictSamplePatient,
                                self.test_PredictBadInputLeavesSceneUnchanged, self.test_PredictCancelled,
                                self.test_WorkerErrors)

    def modelLogic(self):
        """A Logic that finds the tiny random model."""
        logic = self.logicClass()
        logic.modelsDirectory = makeTinyModel()["modelsDirectory"]
        return logic

    @staticmethod
    def sceneState(scene) -> tuple:
        """What a failed call must not change (:func:`TwinRTCommon.testing.sceneState`)."""
        from TwinRTCommon.testing import sceneState

        return sceneState(scene)

    @staticmethod
    def namedCase(names: list, prescriptions: Optional[dict] = None):
        """A 6^3 voxel case with one single-voxel structure per name (for the mapping tests)."""
        import numpy as np

        from twinrt.geometry import Grid
        from twinrt.model import Case, Image, Prescription, Structure

        grid = Grid((6, 6, 6), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
        structures = []
        for index, name in enumerate(names):
            mask = np.zeros(grid.shape, bool)
            mask.flat[index] = True
            structures.append(Structure(name, mask, grid))
        metadata = {"prescriptions": [Prescription(t, d, 35) for t, d in (prescriptions or {}).items()]}
        return Case("Names", Image(np.zeros(grid.shape, np.int16), grid), structures, {}, [], metadata)

    def test_RoiMapping(self):
        """Suggested mappings for OpenKBP names and for synonyms; the checks of an edited mapping."""
        from twinrt.errors import InvalidInputError, StructureError

        self.delayDisplay("Structure mapping")
        logic = self.logicClass()
        rois = logic.modelRois()
        self.assertEqual(rois[-3:], ["PTV56", "PTV63", "PTV70"])
        self.assertEqual(logic.targetRois(), ["PTV56", "PTV63", "PTV70"])

        # OpenKBP's own names map to themselves; the body maps to nothing.
        created = logic.caseToScene(self.namedCase(["BODY"] + rois))
        self.assertEqual(logic.suggestRoiMapping(created["segmentation"]), {roi: roi for roi in rois})

        # Synonyms, laterality forms, cGy, and a target found by its prescription (stored in the study).
        names = ["Parotid_L", "Rt Parotid", "Spinal Cord", "Brain_Stem", "Oesophagus", "larynx", "Mandible_bone",
                 "PTV_70", "PTV_5600", "Cord_PRV5mm", "GTV", "Boost"]
        created = logic.caseToScene(self.namedCase(names, {"Boost": 63.0}))
        segmentation = created["segmentation"]
        expected = {"LeftParotid": "Parotid_L", "RightParotid": "Rt Parotid", "SpinalCord": "Spinal Cord",
                    "Brainstem": "Brain_Stem", "Esophagus": "Oesophagus", "Larynx": "larynx",
                    "Mandible": "Mandible_bone", "PTV70": "PTV_70", "PTV56": "PTV_5600", "PTV63": "Boost"}
        self.assertEqual(logic.suggestRoiMapping(segmentation), expected)
        self.assertNotIn("PTV63", logic.suggestRoiMapping(segmentation, prescriptions={}))

        # An edited mapping: segment IDs become names, empty entries mean "not mapped".
        mapping, missing = logic.checkRoiMapping(segmentation, {"PTV70": created["segmentIds"]["PTV_70"],
                                                                "SpinalCord": "Spinal Cord", "Larynx": ""})
        self.assertEqual(mapping, {"PTV70": "PTV_70", "SpinalCord": "Spinal Cord"})
        self.assertEqual(missing, ["Brainstem", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible"])
        with self.assertRaises(InvalidInputError) as context:
            logic.checkRoiMapping(segmentation, {"PTV70": "PTV_70", "Heart": "GTV"})
        self.assertIn("Heart", str(context.exception))
        with self.assertRaises(StructureError) as context:
            logic.checkRoiMapping(segmentation, {"PTV70": "PTV 70"})
        self.assertIn("'PTV 70'", str(context.exception))
        with self.assertRaises(StructureError) as context:
            logic.checkRoiMapping(segmentation, {"SpinalCord": "Spinal Cord"})
        for target in ("PTV56", "PTV63", "PTV70"):
            self.assertIn(target, str(context.exception))
        self.delayDisplay("Test passed")

    def test_ModelsFolder(self):
        """Models are listed from the models folder and imported into it from files (sha256 checked)."""
        from twinrt.dosepredict.weights import WeightsIntegrityError

        self.delayDisplay("Models folder")
        model = makeTinyModel()
        logic = self.logicClass()
        with tempfile.TemporaryDirectory() as folder:
            logic.modelsDirectory = str(Path(folder) / "models")
            self.assertEqual(logic.modelsFolder(), Path(folder) / "models")
            self.assertNotIn(model["modelId"], [m["id"] for m in logic.availableModels()])
            entry = logic.importModel(model["entry"])
            self.assertEqual(entry["id"], model["modelId"])
            self.assertIn("license", entry)
            self.assertIn(model["modelId"], [m["id"] for m in logic.availableModels()])
            self.assertTrue((Path(folder) / "models" / f"{model['modelId']}.pt").is_file())
            # A weights file that does not match its entry is refused.
            broken = Path(folder) / "broken"
            broken.mkdir()
            (broken / Path(model["entry"]).name).write_text(Path(model["entry"]).read_text())
            (broken / f"{model['modelId']}.pt").write_bytes(b"not the weights")
            with self.assertRaises(WeightsIntegrityError):
                logic.importModel(broken / Path(model["entry"]).name)
        self.delayDisplay("Test passed")

    def test_PredictDose(self):
        """A prediction with the tiny random model: tagged dose on the CT grid, uncertainty, provenance."""
        import numpy as np

        from twinrt.dosepredict.weights import sha256_file

        from TwinRTCommon import mrmlio

        self.delayDisplay("Predict the dose (random test model: the code path, not accuracy)")
        logic = self.modelLogic()
        case, body = makeDosePredictPhantom()
        created = logic.caseToScene(case)
        scene = slicer.mrmlScene
        ct, segmentation = created["ct"], created["segmentation"]
        steps = []
        result = logic.predictDose(ct, segmentation, mcSamples=2, progress=lambda f, text: steps.append(f))
        self.assertEqual(steps[0], 0.0)
        self.assertEqual(steps[-1], 1.0)
        self.assertEqual(steps, sorted(steps))

        # The dose: a SlicerRT dose volume in Gy, on the CT's grid, in the CT's study.
        sh = scene.GetSubjectHierarchyNode()
        dose = result["predictedDose"]
        self.assertTrue(mrmlio.isDoseVolumeNode(dose))
        self.assertEqual(dose.GetAttribute("DicomRtImport.DoseVolume"), "1")
        self.assertEqual(sh.GetItemAttribute(result["studyItem"], "DicomRtImport.DoseUnitName"), "Gy")
        self.assertEqual(result["studyItem"], created["studyItem"])
        self.assertEqual(dose.GetDisplayNode().GetColorNode().GetName(), "Dose_ColorTable")
        self.assertTrue(mrmlio.volumeGrid(dose) == mrmlio.volumeGrid(ct))
        doseArray = slicer.util.arrayFromVolume(dose)
        self.assertEqual(doseArray.shape, case.ct.array.shape)
        self.assertGreaterEqual(float(doseArray.min()), 0.0)
        self.assertGreater(float(doseArray.max()), 0.0)
        # Zero outside the body (the BODY structure bounds the prediction).
        self.assertEqual(float(np.abs(doseArray[~body]).max()), 0.0)

        # The uncertainty: Gy, same grid, same study, not a dose volume (DVH and sceneToCase skip it).
        uncertainty = result["uncertaintyVolume"]
        self.assertIsNotNone(uncertainty)
        self.assertFalse(mrmlio.isDoseVolumeNode(uncertainty))
        self.assertEqual(uncertainty.GetAttribute("DosePredict.Unit"), "Gy")
        self.assertTrue(mrmlio.volumeGrid(uncertainty) == mrmlio.volumeGrid(ct))
        self.assertGreaterEqual(float(slicer.util.arrayFromVolume(uncertainty).min()), 0.0)
        self.assertEqual(dose.GetNodeReference("uncertaintyVolumeRef").GetID(), uncertainty.GetID())
        for node in (dose, uncertainty):
            self.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(node)), created["studyItem"], node.GetName())

        # Provenance on both nodes: model, the weights file's sha256, warnings, research use.
        model = makeTinyModel()
        for node in (dose, uncertainty):
            self.assertEqual(node.GetAttribute("DosePredict.ModelId"), model["modelId"])
            self.assertEqual(node.GetAttribute("DosePredict.ModelVersion"), "0.0.1")
            self.assertEqual(node.GetAttribute("DosePredict.WeightsSHA256"), sha256_file(model["weights"]))
            self.assertEqual(json.loads(node.GetAttribute("DosePredict.Warnings")), result["warnings"])
            self.assertEqual(node.GetAttribute("DosePredict.MCSamples"), "2")
            self.assertIn("Research use only", node.GetAttribute("DosePredict.ResearchUseOnly"))
            self.assertIn("Research use only", node.GetAttribute("TwinRT.ResearchUseOnly"))
        self.assertEqual(result["roiMap"], {"PTV70": "PTV70", "PTV56": "PTV56", "SpinalCord": "SpinalCord",
                                            "Brainstem": "Brainstem", "LeftParotid": "Parotid_L"})
        self.assertEqual(json.loads(dose.GetAttribute("DosePredict.ROIMap")), result["roiMap"])
        # Missing optional organs: named in the result and in a warning.
        self.assertEqual(result["missingROIs"], ["RightParotid", "Esophagus", "Larynx", "Mandible"])
        self.assertTrue(any("RightParotid" in warning for warning in result["warnings"]), result["warnings"])

        # sceneToCase gives the prediction back as a dose of the case, and not the uncertainty.
        back = logic.sceneToCase(scene, ct, segmentation)
        self.assertEqual(sorted(back.doses), ["predicted"])

        # Filling an existing output volume (and its uncertainty volume) adds no node.
        before = mrmlio.nodeIds(scene)
        again = logic.addPredictionToScene(result["prediction"], ct, segmentation, outputDose=dose)
        self.assertEqual(mrmlio.nodeIds(scene), before)
        self.assertIs(again["predictedDose"], dose)
        self.assertEqual(again["uncertaintyVolume"].GetID(), uncertainty.GetID())
        self.assertEqual(again["doseName"], "predicted")
        # An empty volume chosen as output becomes the dose volume; the next new prediction is "predicted 2".
        empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "My prediction")
        filled = logic.addPredictionToScene(result["prediction"], ct, segmentation, outputDose=empty)
        self.assertTrue(mrmlio.isDoseVolumeNode(empty))
        self.assertTrue(mrmlio.volumeGrid(empty) == mrmlio.volumeGrid(ct))
        self.assertEqual(filled["doseName"], "predicted 2")
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(empty), doseArray))
        # A prediction without uncertainty refills the dose and drops the stale uncertainty reference.
        before = mrmlio.nodeIds(scene)
        withoutStd = logic.addPredictionToScene({**result["prediction"], "std": None}, ct, segmentation,
                                                outputDose=dose)
        self.assertIsNone(withoutStd["uncertaintyVolume"])
        self.assertIsNone(dose.GetNodeReference("uncertaintyVolumeRef"))
        self.assertEqual(mrmlio.nodeIds(scene), before)
        self.delayDisplay("Test passed")

    def test_PredictSamplePatient(self):
        """The bundled sample patient (OpenKBP names, no body contour), without uncertainty (0 MC samples)."""
        import numpy as np

        from twinrt.dosepredict.inputs import body_mask

        from TwinRTCommon import mrmlio

        self.delayDisplay("Predict the sample patient's dose (random test model: the code path, not accuracy)")
        logic = self.modelLogic()
        loaded = logic.loadSampleCase()
        ct, segmentation = loaded["ct"], loaded["segmentation"]
        rois = logic.modelRois()
        self.assertEqual(logic.suggestRoiMapping(segmentation), {roi: roi for roi in rois})
        result = logic.predictDose(ct, segmentation, modelId=makeTinyModel()["modelId"], mcSamples=0)
        dose = result["predictedDose"]
        self.assertTrue(mrmlio.isDoseVolumeNode(dose))
        self.assertTrue(mrmlio.volumeGrid(dose) == mrmlio.volumeGrid(ct))
        self.assertIsNone(result["uncertaintyVolume"])
        self.assertEqual(dose.GetAttribute("DosePredict.MCSamples"), "0")
        self.assertEqual(result["missingROIs"], [])
        self.assertEqual(result["roiMap"], {roi: roi for roi in rois})
        # Without a body contour the body thresholded from the CT bounds the dose.
        doseArray = slicer.util.arrayFromVolume(dose)
        outside = ~body_mask(np.asarray(slicer.util.arrayFromVolume(ct), dtype=np.float32), ct.GetSpacing())
        self.assertEqual(float(doseArray[outside].max()), 0.0)
        self.assertGreaterEqual(float(doseArray.min()), 0.0)
        # The sample's study holds its reference dose: the prediction is added beside it.
        self.assertEqual(result["studyItem"], loaded["studyItem"])
        self.assertEqual(sorted(logic.sceneToCase(slicer.mrmlScene, ct, segmentation).doses),
                         sorted(list(loaded["doses"]) + ["predicted"]))
        self.delayDisplay("Test passed")

    def test_PredictBadInputLeavesSceneUnchanged(self):
        """No target, unknown segments, bad MC samples, an unknown model: typed errors, scene unchanged."""
        from twinrt.errors import InvalidInputError, MissingInputError, StructureError

        from TwinRTCommon.testing import makeSyntheticCase

        self.delayDisplay("Prediction: bad input")
        logic = self.modelLogic()
        # The synthetic case's target is PTV60: no model PTV matches it.
        created = logic.caseToScene(makeSyntheticCase())
        ct, segmentation = created["ct"], created["segmentation"]
        before = self.sceneState(slicer.mrmlScene)

        def refused(error, match, **kwargs):
            with self.assertRaises(error) as context:
                logic.predictDose(ct, segmentation, **kwargs)
            self.assertIn(match, str(context.exception))
            self.assertEqual(self.sceneState(slicer.mrmlScene), before, match)
            return context.exception

        # Missing required structures: the message names them.
        error = refused(StructureError, "PTV70")
        self.assertIn("PTV56", str(error))
        refused(StructureError, "'Nope'", roiMap={"PTV70": "Nope"})
        refused(InvalidInputError, "Heart", roiMap={"PTV70": "PTV60", "Heart": "Organ"})
        refused(InvalidInputError, "at least 2", roiMap={"PTV70": "PTV60"}, mcSamples=1)
        refused(InvalidInputError, "other than the CT", roiMap={"PTV70": "PTV60"}, outputDose=ct)
        # A model that is not installed: the worker's typed error comes back as the same type.
        refused(MissingInputError, "no-such-model", roiMap={"PTV70": "PTV60"}, modelId="no-such-model")
        self.delayDisplay("Test passed")

    def test_PredictCancelled(self):
        """A cancel before the start or while the worker runs raises CancelledError; the scene is unchanged."""
        from twinrt.progress import CancelledError, CancelToken

        self.delayDisplay("Prediction: cancel")
        logic = self.modelLogic()
        case, _body = makeDosePredictPhantom()
        created = logic.caseToScene(case)
        before = self.sceneState(slicer.mrmlScene)
        token = CancelToken()
        token.cancel()
        with self.assertRaises(CancelledError):
            logic.predictDose(created["ct"], created["segmentation"], cancel=token)
        self.assertEqual(self.sceneState(slicer.mrmlScene), before)

        # Cancelled by the user once the worker reports (what the Widget's Cancel does).
        token = CancelToken()
        seen = []

        def cancelWhileRunning(fraction: float, text: str) -> None:
            seen.append(text)
            if fraction > 0.05:
                token.cancel()

        with self.assertRaises(CancelledError) as context:
            logic.predictDose(created["ct"], created["segmentation"], progress=cancelWhileRunning, cancel=token)
        self.assertIn("Dose prediction cancelled by the user", str(context.exception))
        self.assertIn("Reading the case", seen)  # the worker's first line arrived before the cancel
        self.assertEqual(self.sceneState(slicer.mrmlScene), before)
        self.delayDisplay("Test passed")

    def test_WorkerErrors(self):
        """The worker: exit code 2 and an ERROR line on bad input; the Logic side raises the typed error."""
        import subprocess

        from twinrt.errors import InvalidInputError, MissingInputError

        from DosePredictLib import worker
        from TwinRTCommon import process, workerio

        self.delayDisplay("Worker errors")
        with tempfile.TemporaryDirectory() as folder:
            bad = Path(folder) / "bad.npz"
            bad.write_bytes(b"this is not an npz file")
            command = process.workerCommand(worker.WORKER_SCRIPT, ["--input", str(bad), "--output",
                                                                   str(Path(folder) / "out.npz")])
            run = subprocess.run(command, env=process.workerEnvironment(), capture_output=True, text=True,
                                 timeout=120)
            self.assertEqual(run.returncode, workerio.EXIT_INPUT_ERROR, run.stdout + run.stderr)
            lines = run.stdout.splitlines()
            self.assertIn("ERRORTYPE InvalidInputError", lines)
            self.assertTrue(any(line.startswith("ERROR ") and "not a readable npz" in line for line in lines), lines)
            self.assertTrue(lines[0].startswith("PROGRESS 0.0000 "), lines)
            self.assertFalse((Path(folder) / "out.npz").exists())

            # The same through the process runner: the error type survives the process boundary.
            logged = []
            with self.assertRaises(InvalidInputError) as context:
                process.runWorker(worker.WORKER_SCRIPT, ["--input", str(bad), "--output",
                                                         str(Path(folder) / "out.npz")], logCallback=logged.append)
            self.assertIn("not a readable npz", str(context.exception))
            self.assertIn("ERRORTYPE InvalidInputError", logged)
            with self.assertRaises(MissingInputError):
                process.runWorker(worker.WORKER_SCRIPT, ["--input", str(Path(folder) / "absent.npz"), "--output",
                                                         str(bad)])
        self.assertEqual(workerio.parseLine("PROGRESS 0.5 half way"), ("progress", 0.5, "half way"))
        self.assertEqual(workerio.parseLine("PROGRESS x y")[0], "log")
        self.assertEqual(workerio.parseLine("ERROR it broke"), ("error", None, "it broke"))
        self.delayDisplay("Test passed")
