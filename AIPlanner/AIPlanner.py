"""AIPlanner: inverse treatment planning in the scene (research use only).

Issue 3 built the planner: CT, structures, prescription and beam set-up from the scene go through
:func:`twinrt.planning.workflow.plan_case` (pencil-beam dij, fluence optimisation, leaf sequencing)
and come back as a dose volume, plan tables, a parameter record and a DVH. Issue 4 added the planning
agent (:func:`twinrt.planning.agent.virtual_planner`): ``createAgentPlan`` plans for a clinical goal set
and proposes the plan, ``submitFeedback``/``applyFeedback`` turn typed feedback into a new plan version,
and ``approvePlan``/``rejectPlan`` record a named person's review; every step is in the study's audit log.
This file follows Slicer's scripted-module template (Utilities/Templates/Modules/Scripted):
AIPlanner (module descriptor), AIPlannerParameterNode, AIPlannerWidget (thin: binds the .ui and calls
the Logic), AIPlannerLogic (all computation, batch-capable) and AIPlannerTest (runs headless too).
"""

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper, WithinRange

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from AIPlannerLib import agentRecord, planRecord
from TwinRTCommon.logic import CaseLogicMixin, checkCtVolume, checkSegmentation
from TwinRTCommon.testing import CaseModuleTestMixin
from TwinRTCommon.runwidget import RunningWidgetMixin
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
        # Core modules only: the plan is stored in tables, not in SlicerRT node types, so the module
        # works without SlicerRT; its plan optimizer is registered when SlicerRT is there.
        self.parent.dependencies = ["Segmentations", "SubjectHierarchy"]
        self.parent.contributors = ["TwinRT contributors"]
        self.parent.helpText = _("""
<b>Research use only, not for clinical decisions.</b><br>
Creates a deliverable step-and-shoot IMRT plan for a prescription: pencil-beam dose influence,
fluence optimization against the objectives in the table, leaf sequencing with monitor units.
<br><i>Create plan</i> adds to the CT's study the planned dose (a SlicerRT dose volume in Gy), a
beams table and a segments table (with the set-up, objectives and prescription that reproduce the
plan as <tt>AIPlanner.*</tt> attributes), and the DVH table and chart. <i>Export plan as DICOM</i>
writes RTPLAN and RTDOSE with the CT and RTSTRUCT.
<br>Where SlicerRT is installed the same optimizer is offered in External Beam Planning as "TwinRT"
(untested in TwinRT's own test suite).
<br><i>Create AI plan</i> lets the planning agent choose the objectives for a clinical goal set (goals
table: green met, red not met, grey not evaluable) and proposes the plan. Feedback ("keep the left
parotid mean under 20 Gy", "why is the cord so high?") is interpreted and, once confirmed, makes a new
plan version (plan history). Only a named reviewer can approve or reject a plan; only an approved plan's
RTPLAN says APPROVED. Every AI action and human message goes into the case's audit log.
""")
        self.parent.acknowledgementText = _("""
Part of the TwinRT extension suite. The sample patient is from the OpenKBP data set (Babier et al.,
Medical Physics 48(9), 2021) built on The Cancer Imaging Archive head-and-neck collections.
Built on 3D Slicer and SlicerRT.
""")
        # Register the sample patient after startup, when the Sample Data module exists, and the
        # plan optimizer once SlicerRT's External Beam Planning (if installed) has loaded.
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", registerSlicerRtPlanOptimizer)


#
# Register sample data sets in Sample Data module
#


def registerSampleData():
    """Add the TwinRT sample patient to Sample Data; all five modules call this, it registers once."""
    from TwinRTCommon.sampledata import registerSampleData as registerTwinRTSampleData

    registerTwinRTSampleData()


def registerSlicerRtPlanOptimizer() -> bool:
    """Offer TwinRT's optimizer in SlicerRT's External Beam Planning; nothing happens without SlicerRT.

    :return: True when registered.
    """
    from AIPlannerLib.slicerRtOptimizer import registerPlanOptimizer

    return registerPlanOptimizer()


#
# AIPlannerParameterNode
#


@parameterNodeWrapper
class AIPlannerParameterNode:
    """The parameters of AIPlanner, saved with the scene.

    inputVolume - planning CT.
    inputSegmentation - structures, referencing the CT.
    targetSegment - the target segment(s): names or IDs, comma-separated.
    prescriptionGy - prescribed dose to the target(s) (Gy).
    fractions - number of fractions.
    numberOfBeams - coplanar beams, evenly spaced over 360 degrees.
    startAngleDeg - gantry angle of the first beam (degrees, IEC).
    bixelSizeMm - bixel (beamlet) size at the isocentre (mm).
    doseGridSpacingMm - dose grid spacing (mm).
    maxIterations - optimizer iterations.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    targetSegment: str = ""
    prescriptionGy: Annotated[float, WithinRange(0.0, 200.0)] = 70.0
    fractions: Annotated[int, WithinRange(1, 100)] = 35
    numberOfBeams: Annotated[int, WithinRange(1, 36)] = 7
    startAngleDeg: Annotated[float, WithinRange(0.0, 359.9)] = 0.0
    bixelSizeMm: Annotated[float, WithinRange(2.0, 20.0)] = 5.0
    doseGridSpacingMm: Annotated[float, WithinRange(1.0, 10.0)] = 5.0
    maxIterations: Annotated[int, WithinRange(10, 2000)] = 200


#
# AIPlannerWidget
#


class AIPlannerWidget(RunningWidgetMixin, CaseModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and calls the Logic; holds no computation.

    The parameter-node and scene plumbing and the Load sample / Import DICOM buttons come from
    :class:`TwinRTCommon.widget.CaseModuleWidgetMixin`. This class adds the objectives table, Apply
    (which turns into Cancel while planning runs), the progress bar, the results and DICOM export.
    Planning runs in-process (STYLE.md section 6): the Logic reports ``progress(fraction, text)``,
    :meth:`onProgress` pumps Qt events so the Cancel click is seen, and the click sets the CancelToken.
    Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        #: Set while planning runs; Apply then cancels it.
        self._cancelToken = None
        #: The plan shown in the AI section (beams table), its study, and feedback awaiting confirmation.
        self._agentPlanNode = None
        self._agentStudyItem = 0
        self._pendingInterpretation = None

    def setup(self) -> None:
        """Load the .ui and connect it; cheap and without prompts (the generic test builds it)."""
        ScriptedLoadableModuleWidget.setup(self)
        self.setupCaseModule(AIPlannerLogic())
        self.ui.progressBar.visible = False
        self.ui.defaultObjectivesButton.connect("clicked(bool)", self.onDefaultObjectivesButton)
        self.ui.addObjectiveButton.connect("clicked(bool)", self.onAddObjectiveButton)
        self.ui.removeObjectiveButton.connect("clicked(bool)", self.onRemoveObjectiveButton)
        self.ui.exportDicomButton.connect("directoryChanged(QString)", self.onExportDicomFolder)
        self.ui.feedbackConfirmationWidget.visible = False
        self.ui.agentPlanButton.connect("clicked(bool)", self.onAgentPlanButton)
        self.ui.sendFeedbackButton.connect("clicked(bool)", self.onSendFeedbackButton)
        self.ui.feedbackLineEdit.connect("returnPressed()", self.onSendFeedbackButton)
        self.ui.confirmFeedbackButton.connect("clicked(bool)", self.onConfirmFeedbackButton)
        self.ui.cancelFeedbackButton.connect("clicked(bool)", self.onCancelFeedbackButton)
        self.ui.approvePlanButton.connect("clicked(bool)", self.onApprovePlanButton)
        self.ui.rejectPlanButton.connect("clicked(bool)", self.onRejectPlanButton)
        self.ui.planHistoryList.connect("currentRowChanged(int)", self.onPlanHistoryRowChanged)

    # Apply needs the planning CT and its structures; a missing target is reported by the Logic,
    # whose message says what to select.
    applyRequires = ("inputVolume", "inputSegmentation")
    applyReadyToolTip = _("Create the plan.")
    applyMissingToolTip = _("Select the planning CT and its structures.")

    def preselectInputs(self, parameters) -> None:
        """The scene's only CT, its structures and their targets (segments typed or named as targets)."""
        super().preselectInputs(parameters)
        if parameters.inputVolume and not parameters.inputSegmentation:
            parameters.inputSegmentation = self.logic.findSegmentation(parameters.inputVolume)
        # Only an empty target is filled: the user's own choice survives entering the module again.
        if parameters.inputSegmentation and not parameters.targetSegment:
            parameters.targetSegment = ", ".join(self.logic.defaultTargetSegments(parameters.inputSegmentation))

    def objectivesFromTable(self) -> Optional[list]:
        """The objectives typed in the table, or None (the defaults) when it is empty."""
        table = self.ui.objectivesTable
        cells = [[table.item(row, column).text() if table.item(row, column) else ""
                  for column in range(table.columnCount)] for row in range(table.rowCount)]
        return planRecord.objectivesFromCells(cells) or None

    def setObjectivesTable(self, objectives: list) -> None:
        """Show objective dicts in the table."""
        import qt

        table = self.ui.objectivesTable
        cells = planRecord.objectivesToCells(objectives)
        table.setRowCount(len(cells))
        for row, texts in enumerate(cells):
            for column, text in enumerate(texts):
                table.setItem(row, column, qt.QTableWidgetItem(text))

    def onDefaultObjectivesButton(self) -> None:
        """Fill the table with the default objectives of the selected targets."""
        with slicer.util.tryWithErrorDisplay(_("Failed to make the default objectives."), waitCursor=True):
            parameters = self._parameterNode
            self.setObjectivesTable(self.logic.defaultObjectives(
                parameters.inputVolume, parameters.inputSegmentation, parameters.targetSegment,
                parameters.prescriptionGy, parameters.fractions))

    def onAddObjectiveButton(self) -> None:
        """Add an empty row (skipped if left empty)."""
        self.ui.objectivesTable.insertRow(self.ui.objectivesTable.rowCount)

    def onRemoveObjectiveButton(self) -> None:
        """Remove the current row."""
        row = self.ui.objectivesTable.currentRow()
        if row >= 0:
            self.ui.objectivesTable.removeRow(row)

    # onProgress and setRunning come from RunningWidgetMixin; these say what they show and lock.
    applyIdleText = _("Create plan")
    lockedWhileRunning = ("patientCollapsibleButton", "inputsCollapsibleButton", "beamsCollapsibleButton",
                          "objectivesCollapsibleButton", "agentCollapsibleButton")

    def onApplyButton(self) -> None:
        """Create the plan, or cancel the one being created."""
        from twinrt.progress import CancelledError, CancelToken

        if self._cancelToken is not None:
            self._cancelToken.cancel()
            self.ui.applyButton.text = _("Cancelling...")
            return
        parameters = self._parameterNode
        # No wait cursor: the user must see that Cancel can be clicked while planning runs.
        with slicer.util.tryWithErrorDisplay(_("Failed to create the plan."), waitCursor=False):
            # Read before the run starts, so a typo in the table is reported before any computing.
            objectives = self.objectivesFromTable()
            setup = self.logic.planSetupFromParameters(parameters)
            self._cancelToken = CancelToken()
            self.setRunning(True)
            try:
                created = self.logic.createPlan(parameters.inputVolume, parameters.inputSegmentation,
                                                parameters.targetSegment, parameters.prescriptionGy,
                                                parameters.fractions, setup, objectives, progress=self.onProgress,
                                                cancel=self._cancelToken)
            except CancelledError:
                # A cancel is the user's choice, not an error: no error pop-up.
                self.ui.resultsLabel.text = _("Planning cancelled; the scene is unchanged.")
                return
            finally:
                self._cancelToken = None
                self.setRunning(False)
            # Show the objectives actually used (the defaults when the table was empty).
            self.setObjectivesTable(created["planningResult"].objectives)
            self.ui.resultsLabel.text = created["summary"]
            slicer.util.setSliceViewerLayers(foreground=created["plannedDose"], foregroundOpacity=0.5)

    # ------------------------------------------------------------------ planning agent and review
    def updateAgentButtons(self) -> None:
        """Feedback and review need a plan shown (the AI plan button stays enabled: the Logic names what is missing)."""
        hasPlan = self._agentPlanNode is not None
        self.ui.sendFeedbackButton.enabled = hasPlan
        self.ui.approvePlanButton.enabled = hasPlan
        self.ui.rejectPlanButton.enabled = hasPlan

    def onAgentPlanButton(self) -> None:
        """Let the agent plan for the goal set; the plan is shown with its goals and proposed for review."""
        from twinrt.progress import CancelledError, CancelToken

        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to create the AI plan."), waitCursor=False):
            setup = self.logic.planSetupFromParameters(parameters)
            self._cancelToken = CancelToken()
            self.setRunning(True)
            try:
                created = self.logic.createAgentPlan(
                    parameters.inputVolume, parameters.inputSegmentation, parameters.targetSegment,
                    parameters.prescriptionGy, parameters.fractions, self.ui.goalSetLineEdit.text.strip(), setup,
                    progress=self.onProgress, cancel=self._cancelToken)
            except CancelledError:
                self.ui.resultsLabel.text = _("Planning cancelled; the scene is unchanged.")
                return
            finally:
                self._cancelToken = None
                self.setRunning(False)
            self.showAgentPlan(created["beamsTable"], created["studyItem"])
            self.ui.resultsLabel.text = created["summary"]
            slicer.util.setSliceViewerLayers(foreground=created["plannedDose"], foregroundOpacity=0.5)

    def showAgentPlan(self, planNode, studyItem: int) -> None:
        """Show a plan's goals (coloured by result) and the study's plan history, with that plan selected."""
        import qt

        from AIPlannerLib import agentRecord

        self._agentPlanNode, self._agentStudyItem = planNode, studyItem
        self.onCancelFeedbackButton()
        table = self.ui.goalsTable
        goalsNode = planNode.GetNodeReference(self.logic.GOALS_TABLE_REFERENCE_ROLE)
        rows = agentRecord.goalRows(self.logic.planEvaluation(planNode).results) if goalsNode is not None else []
        colours = {agentRecord.STATUS_PASS: qt.QColor(200, 240, 200), agentRecord.STATUS_FAIL: qt.QColor(250, 200, 200),
                   agentRecord.STATUS_NOT_EVALUABLE: qt.QColor(225, 225, 225)}
        table.setRowCount(len(rows))
        for index, row in enumerate(rows):
            texts = [row["structure"], row["metric"], f"{row['comparator']} {row['limit']:g} {row['unit']}",
                     row["priority"], "" if row["value"] is None else f"{row['value']:.2f}",
                     "" if row["margin"] is None else f"{row['margin']:+.2f}", row["passed"]]
            for column, text in enumerate(texts):
                item = qt.QTableWidgetItem(text)
                item.setBackground(qt.QBrush(colours[row["passed"]]))
                item.setToolTip(row["explanation"])
                table.setItem(index, column, item)
        history = self.logic.planHistory(studyItem)
        self.ui.planHistoryList.blockSignals(True)
        self.ui.planHistoryList.clear()
        for entry in history:
            self.ui.planHistoryList.addItem(agentRecord.historyText(entry))
        current = [i for i, entry in enumerate(history) if entry["planNodeID"] == planNode.GetID()]
        if current:
            self.ui.planHistoryList.setCurrentRow(current[0])
        self.ui.planHistoryList.blockSignals(False)
        self.updateAgentButtons()

    def onPlanHistoryRowChanged(self, row: int) -> None:
        """Show the selected version."""
        history = self.logic.planHistory(self._agentStudyItem) if self._agentStudyItem else []
        if 0 <= row < len(history):
            planNode = slicer.mrmlScene.GetNodeByID(history[row]["planNodeID"])
            if planNode is not None:
                with slicer.util.tryWithErrorDisplay(_("Failed to show the plan."), waitCursor=True):
                    self.showAgentPlan(planNode, self._agentStudyItem)

    def onSendFeedbackButton(self) -> None:
        """Interpret the feedback: answer a question, ask back, or show an edit for confirmation."""
        if self._agentPlanNode is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to interpret the feedback."), waitCursor=True):
            interpretation = self.logic.submitFeedback(self._agentPlanNode, self.ui.feedbackLineEdit.text,
                                                       self.ui.reviewerNameLineEdit.text.strip() or "User")
            self.ui.answerLabel.text = self.logic.feedbackReply(self._agentPlanNode, interpretation)
            self._pendingInterpretation = interpretation if interpretation.needs_confirmation else None
            self.ui.feedbackConfirmationWidget.visible = self._pendingInterpretation is not None
            self.ui.feedbackLineEdit.text = ""

    def onConfirmFeedbackButton(self) -> None:
        """Re-plan with the confirmed change; the new version is shown."""
        from twinrt.progress import CancelledError, CancelToken

        interpretation, self._pendingInterpretation = self._pendingInterpretation, None
        self.ui.feedbackConfirmationWidget.visible = False
        if interpretation is None or self._agentPlanNode is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to apply the feedback."), waitCursor=False):
            self._cancelToken = CancelToken()
            self.setRunning(True)
            try:
                created = self.logic.applyFeedback(self._agentPlanNode, interpretation, progress=self.onProgress,
                                                   cancel=self._cancelToken)
            except CancelledError:
                self.ui.answerLabel.text = _("Re-planning cancelled; the scene is unchanged.")
                return
            finally:
                self._cancelToken = None
                self.setRunning(False)
            self.showAgentPlan(created["beamsTable"], created["studyItem"])
            text = _("New plan version {version}.").format(version=created["version"])
            check = created.get("deliveryCheck")
            if check:
                text += " " + _("{aspect}: {value:.0f} (limit {limit:g}) - {verdict}.").format(
                    aspect=check["aspect"].upper(), value=check["value"], limit=check["limit"],
                    verdict=_("met") if check["met"] else _("not met; ask again to smooth further"))
            self.ui.answerLabel.text = text

    def onCancelFeedbackButton(self) -> None:
        """Discard the interpretation awaiting confirmation."""
        self._pendingInterpretation = None
        self.ui.feedbackConfirmationWidget.visible = False

    def onApprovePlanButton(self) -> None:
        """Approve the shown plan under the reviewer's name (the Logic refuses an empty or AI name)."""
        with slicer.util.tryWithErrorDisplay(_("Failed to approve the plan."), waitCursor=True):
            plan = self.logic.approvePlan(self._agentPlanNode, self.ui.reviewerNameLineEdit.text,
                                          self.ui.reviewCommentLineEdit.text)
            self.ui.answerLabel.text = _("Plan approved by {name}.").format(name=plan.reviewer_name)
            self.showAgentPlan(self._agentPlanNode, self._agentStudyItem)

    def onRejectPlanButton(self) -> None:
        """Reject the shown plan under the reviewer's name, with the comment as the reason."""
        with slicer.util.tryWithErrorDisplay(_("Failed to reject the plan."), waitCursor=True):
            plan = self.logic.rejectPlan(self._agentPlanNode, self.ui.reviewerNameLineEdit.text,
                                         self.ui.reviewCommentLineEdit.text)
            self.ui.answerLabel.text = _("Plan rejected by {name}.").format(name=plan.reviewer_name)
            self.showAgentPlan(self._agentPlanNode, self._agentStudyItem)

    def onExportDicomFolder(self, folder: str) -> None:
        """Export the scene's latest plan (RTPLAN, RTDOSE, CT, RTSTRUCT) into a new subfolder of ``folder``."""
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to export the plan as DICOM."), waitCursor=True):
            planNode = self.logic.latestPlanNode()
            files = self.logic.exportPlanDicom(planNode, Path(folder) / self.logic.exportFolderName(planNode))
            count = sum(len(paths) for paths in files.values())
            self.ui.resultsLabel.text = _("Exported {count} DICOM files to {folder}.").format(
                count=count, folder=Path(files["rtplan"][0]).parent if files.get("rtplan") else folder)


#
# AIPlannerLogic
#


class AIPlannerLogic(ScriptedLoadableModuleLogic, CaseLogicMixin):
    """All computation of AIPlanner; usable without the GUI (batch mode, tests).

    Loading a case (``importCase``, ``loadSampleCase``, ``caseToScene``, ``sceneToCase``) comes from
    :class:`TwinRTCommon.logic.CaseLogicMixin`, so every module shares the one MRML contract. The
    planning itself is :func:`twinrt.planning.workflow.plan_case`; this class reads its inputs from
    the scene and writes its result back, all or nothing.
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    # Every stage of AIPlanner is built: planning (issue 3) and the planning agent (issue 4).
    stageName = "the planning agent (objectives chosen by AI)"
    stageIssue = None

    #: ``TwinRT.CreatedBy`` of every node this Logic writes.
    createdBy = "AIPlanner"
    #: Node reference roles from the beams table (the plan's main node) to the rest of the plan.
    PLANNED_DOSE_REFERENCE_ROLE = "plannedDoseRef"
    SEGMENTS_TABLE_REFERENCE_ROLE = "segmentsTableRef"
    BEAMS_TABLE_REFERENCE_ROLE = "beamsTableRef"
    REFERENCE_VOLUME_REFERENCE_ROLE = "referenceVolumeRef"
    SEGMENTATION_REFERENCE_ROLE = "segmentationRef"
    DVH_METRICS_REFERENCE_ROLE = "dvhMetricsTableRef"
    DVH_CHART_REFERENCE_ROLE = "dvhChartRef"
    GOALS_TABLE_REFERENCE_ROLE = "goalsTableRef"

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        #: Plan node ID -> its goal evaluation, so feedback on a plan just made needs no DVH pass.
        self._evaluations = {}

    def getParameterNode(self):
        return AIPlannerParameterNode(super().getParameterNode())

    def stageStatusText(self) -> str:
        """The panel's status: the planning agent is available, for research use only."""
        return _("Planning agent available: plans for clinical goals, feedback and human review. Research use "
                 "only, not for clinical decisions.")


    # ------------------------------------------------------------------------------------- inputs
    @staticmethod
    def defaultTargetSegments(segmentation) -> list[str]:
        """Names of the segments that are targets: tagged so by TwinRT, or named like one (PTV, CTV, GTV).

        :param segmentation: a ``vtkMRMLSegmentationNode``.
        """
        import vtk

        from twinrt.model import StructureType

        from TwinRTCommon import mrmlio

        names = []
        segments = segmentation.GetSegmentation()
        for index in range(segments.GetNumberOfSegments()):
            segment = segments.GetNthSegment(index)
            tag = vtk.reference("")
            if segment.GetTag(mrmlio.STRUCTURE_TYPE_TAG, tag) and str(tag) in StructureType.__members__:
                structureType = StructureType[str(tag)]
            else:
                structureType = StructureType.guess(segment.GetName())
            if structureType == StructureType.TARGET:
                names.append(segment.GetName())
        return names

    @staticmethod
    def resolveTargetSegments(segmentation, targetSegments) -> tuple[list[str], list[str]]:
        """Segment IDs and names of the selected targets.

        :param segmentation: the structures.
        :param targetSegments: segment IDs or names: a list, or one text with commas between them.
        :return: ``(ids, names)``, duplicates removed, in the given order.
        :raises InvalidInputError: nothing selected; :raises StructureError: a target not in the segmentation.
        """
        from twinrt.errors import InvalidInputError, StructureError

        if isinstance(targetSegments, str):
            targetSegments = targetSegments.split(",")
        wanted = [str(t).strip() for t in (targetSegments or []) if str(t).strip()]
        if not wanted:
            raise InvalidInputError(_("No target selected: give the target segment(s) to plan for (names or IDs, "
                                      "separated by commas)"))
        segments = segmentation.GetSegmentation()
        ids, names = [], []
        for target in wanted:
            # An ID first (what scripts pass), then a name (what users type); the core plans by name.
            segmentId = target if segments.GetSegment(target) else segments.GetSegmentIdBySegmentName(target)
            if not segmentId:
                available = ", ".join(segments.GetNthSegment(i).GetName()
                                      for i in range(segments.GetNumberOfSegments()))
                raise StructureError(_("Target '{target}' is not a segment of '{segmentation}' (segments: "
                                       "{available}); select one of its segments").format(
                    target=target, segmentation=segmentation.GetName(), available=available or _("none")), target)
            if segmentId not in ids:
                ids.append(segmentId)
                names.append(segments.GetSegment(segmentId).GetName())
        return ids, names

    @staticmethod
    def planSetupFromParameters(parameters):
        """The :class:`twinrt.planning.workflow.PlanSetup` of the parameter node's beam set-up.

        :param parameters: an :class:`AIPlannerParameterNode`.
        """
        from twinrt.planning.workflow import PlanSetup

        return PlanSetup.equispaced(parameters.numberOfBeams, parameters.startAngleDeg,
                                    bixel_width_mm=parameters.bixelSizeMm,
                                    dose_grid_mm=parameters.doseGridSpacingMm, max_iter=parameters.maxIterations)

    @staticmethod
    def _planSetup(setup):
        from twinrt.errors import InvalidInputError
        from twinrt.planning.workflow import PlanSetup

        if setup is None:
            return PlanSetup()
        if isinstance(setup, dict):
            return PlanSetup.from_dict(setup)
        if isinstance(setup, PlanSetup):
            return setup
        raise InvalidInputError(_("The beam set-up must be a PlanSetup or its dict, got {type}").format(
            type=type(setup).__name__))

    @staticmethod
    def _coreProgress(progress):
        """The core's progress (0..1) mapped onto 0.05..0.85 of a Logic call (reading the case comes
        before, writing the scene after), or None without a callback."""
        from twinrt.progress import report

        if progress is None:
            return None

        def mapped(fraction: float, text: str) -> None:
            # Clamped: 0.05 + 0.8 * 1.0 can round above 0.85, and a progress bar must never go back.
            report(progress, min(0.05 + 0.8 * fraction, 0.85), text)

        return mapped

    @staticmethod
    def _checkIsocenter(setup, ctVolume) -> None:
        """Refuse an isocentre outside the CT: every beam through it would miss the target."""
        import numpy as np

        from twinrt.errors import GeometryError

        from TwinRTCommon import mrmlio

        if setup.isocenter_mm is None:
            return  # the target's centroid, inside the CT by construction
        grid = mrmlio.volumeGrid(ctVolume)
        index = grid.lps_to_index(np.asarray(setup.isocenter_mm, float))
        if np.any(index < -0.5) or np.any(index > np.asarray(grid.shape[::-1]) - 0.5):
            raise GeometryError(_("The isocentre {point} (LPS, mm) lies outside the CT '{ct}', so the beams would "
                                  "miss the target; leave it empty (the target's centre) or give a point inside "
                                  "the target").format(point=tuple(setup.isocenter_mm), ct=ctVolume.GetName()))

    def _checkPlanInputs(self, inputVolume, inputSegmentation, targetSegments, prescriptionGy, fractions):
        from twinrt.errors import InvalidInputError

        checkCtVolume(inputVolume, _("planning CT"))
        checkSegmentation(inputSegmentation, inputVolume)
        if not prescriptionGy > 0 or int(fractions) < 1:
            raise InvalidInputError(_("The prescription needs a dose above 0 Gy and at least one fraction"))
        return self.resolveTargetSegments(inputSegmentation, targetSegments)

    def defaultObjectives(self, inputVolume, inputSegmentation, targetSegments, prescriptionGy: float,
                          fractions: int) -> list[dict]:
        """The starting objectives for these targets (:func:`twinrt.planning.workflow.default_objectives`).

        :param inputVolume: the planning CT; :param inputSegmentation: its structures.
        :param targetSegments: target segment IDs or names.
        :param prescriptionGy: prescribed dose (Gy); :param fractions: number of fractions.
        :return: objective dicts.
        """
        from twinrt.model import Prescription
        from twinrt.planning.workflow import default_objectives

        _ids, names = self._checkPlanInputs(inputVolume, inputSegmentation, targetSegments, prescriptionGy, fractions)
        case = self.sceneToCase(inputVolume.GetScene(), inputVolume, inputSegmentation)
        return default_objectives(case, [Prescription(name, float(prescriptionGy), int(fractions)) for name in names])

    # ----------------------------------------------------------------------------------- planning
    def createPlan(self, inputVolume, inputSegmentation, targetSegments, prescriptionGy: float, fractions: int,
                   setup=None, objectives: Optional[list] = None, planLabel: str = "TwinRT AI", progress=None,
                   cancel=None) -> dict[str, Any]:
        """Plan the case in the scene and add the plan to the CT's study, all or nothing.

        :param inputVolume: the planning CT (``vtkMRMLScalarVolumeNode``, HU).
        :param inputSegmentation: the structures; must reference ``inputVolume``. A structure of
            type external (or named BODY/External) is the body; without one it is thresholded from the CT.
        :param targetSegments: target segment IDs or names (a list, or one comma-separated text).
        :param prescriptionGy: prescribed dose to every target (Gy), > 0.
        :param fractions: number of fractions, >= 1.
        :param setup: beams and parameters: a :class:`twinrt.planning.workflow.PlanSetup`, its
            ``to_dict()`` dict, or None (9 equispaced beams, 5 mm bixels and dose grid).
        :param objectives: objective dicts (:func:`twinrt.planning.objectives.objective_from_dict`);
            None: :meth:`defaultObjectives`.
        :param planLabel: RT plan label (16 characters reach DICOM).
        :param progress: ``progress(fraction, text)``, called often (the Widget pumps events in it).
        :param cancel: a :class:`twinrt.progress.CancelToken`.
        :return: the created nodes: ``plannedDose``, ``beamsTable``, ``segmentsTable``, ``dvhMetricsTable``,
            ``dvhChart``, ``dvhTables`` and ``dvhPlotSeries`` (structure name -> node); also
            ``studyItem``, ``doseName``, ``summary`` (text) and ``planningResult`` (the core's result).
        :raises InvalidInputError: no target selected, an impossible prescription or set-up, beams
            that miss the target, a dose grid too large for memory (its subclasses
            ``StructureError``: a target missing, empty or outside the body; ``GeometryError``).
        :raises twinrt.progress.CancelledError: cancelled. In every error case the scene is unchanged.
        """
        from twinrt.model import Prescription
        from twinrt.planning.workflow import plan_case
        from twinrt.progress import report

        targetIds, targetNames = self._checkPlanInputs(inputVolume, inputSegmentation, targetSegments,
                                                       prescriptionGy, fractions)
        setup = self._planSetup(setup)
        # Cheap checks before reading the case: the user hears about a wrong selection at once.
        self._checkIsocenter(setup, inputVolume)
        report(progress, 0.0, "Reading the case from the scene", cancel)
        case = self.sceneToCase(inputVolume.GetScene(), inputVolume, inputSegmentation)
        prescriptions = [Prescription(name, float(prescriptionGy), int(fractions)) for name in targetNames]

        # Nothing is written until the core has finished, so its errors and a cancel leave the
        # scene untouched without a rollback; the write itself is one transaction.
        result = plan_case(case, objectives, setup, prescriptions, planLabel,
                           progress=self._coreProgress(progress), cancel=cancel)
        report(progress, 0.85, "Writing the plan into the scene", cancel)
        created = self.addPlanToScene(result, case, inputVolume, inputSegmentation, targetIds, prescriptions)
        self.log(f"AIPlanner: {created['summary']}")
        report(progress, 1.0, "Plan ready")
        return created

    def createPlanFromPrediction(self, inputVolume, inputSegmentation, targetSegments, prescriptionGy: float,
                                 fractions: int, predictedDose, uncertaintyVolume=None, setup=None,
                                 planLabel: str = "TwinRT KBP", progress=None, cancel=None) -> dict[str, Any]:
        """Knowledge-based planning: a deliverable plan that follows a predicted dose (e.g. DosePredict's).

        The prediction becomes voxel-wise dose-mimicking objectives (:mod:`twinrt.planning.kbp`):
        targets not below it (coverage first), organs and body not above it; with an uncertainty
        volume (Gy, per-voxel standard deviation) uncertain voxels pull less. The plan is written
        like :meth:`createPlan`'s (same nodes; the objectives attribute holds the mimicking objectives).

        :param predictedDose: the predicted dose volume (Gy; tagged as a dose or not).
        :param uncertaintyVolume: its standard-deviation volume (Gy), or None.
        :param setup, planLabel, progress, cancel: as :meth:`createPlan`; the other parameters too.
        :return: what :meth:`createPlan` returns.
        :raises InvalidInputError: no prediction, a prediction zero in a target or under a transform,
            and what :meth:`createPlan` raises. The scene is unchanged on every error.
        """
        from twinrt.errors import InvalidInputError
        from twinrt.model import Prescription
        from twinrt.planning.kbp import plan_from_prediction
        from twinrt.progress import report

        from TwinRTCommon import mrmlio

        targetIds, targetNames = self._checkPlanInputs(inputVolume, inputSegmentation, targetSegments,
                                                       prescriptionGy, fractions)
        if predictedDose is None or not predictedDose.IsA("vtkMRMLScalarVolumeNode"):
            raise InvalidInputError(_("Select the predicted dose volume (run DosePredict first)"))
        setup = self._planSetup(setup)
        self._checkIsocenter(setup, inputVolume)

        predicted = mrmlio.doseFromVolume(predictedDose, "predicted")
        std = mrmlio.doseFromVolume(uncertaintyVolume, "predicted_std") if uncertaintyVolume is not None else None
        report(progress, 0.0, "Reading the case from the scene", cancel)
        case = self.sceneToCase(inputVolume.GetScene(), inputVolume, inputSegmentation)
        prescriptions = [Prescription(name, float(prescriptionGy), int(fractions)) for name in targetNames]

        result = plan_from_prediction(case, predicted, std, setup, prescriptions, label=planLabel,
                                      progress=self._coreProgress(progress), cancel=cancel)
        report(progress, 0.85, "Writing the plan into the scene", cancel)
        created = self.addPlanToScene(result, case, inputVolume, inputSegmentation, targetIds, prescriptions)
        self.log(f"AIPlanner: plan from prediction '{predictedDose.GetName()}': {created['summary']}")
        report(progress, 1.0, "Plan ready")
        return created

    # ----------------------------------------------------------------------------- planning agent
    def createAgentPlan(self, inputVolume, inputSegmentation, targetSegments, prescriptionGy: float, fractions: int,
                        goalSet="head_and_neck_openkbp", setup=None, maxRounds: int = 4,
                        roundIterations: Optional[int] = None, planLabel: str = "TwinRT AI", progress=None,
                        cancel=None) -> dict[str, Any]:
        """Let the planning agent choose the objectives for clinical goals, plan, and propose the plan for review.

        The agent (:func:`twinrt.planning.agent.virtual_planner`) optimises, checks the goals and
        adjusts the objectives for up to ``maxRounds`` rounds. The plan is written like
        :meth:`createPlan`'s (same nodes), plus a goals table, the agent's trace on the beams table and
        a new version in the study's plan history. It is *proposed*, never approved: only
        :meth:`approvePlan` with a person's name approves it. Both steps go into the study's audit log.

        :param inputVolume: the planning CT; :param inputSegmentation: its structures.
        :param targetSegments: target segment IDs or names (a list, or one comma-separated text).
        :param prescriptionGy: prescribed dose to every target (Gy); :param fractions: number of fractions.
        :param goalSet: a shipped goal set's name (``twinrt.planning.evaluation.shipped_goal_sets()``) or a
            goal-file path.
        :param setup: beams and parameters (see :meth:`createPlan`); ``max_iter`` is the first round's iterations.
        :param maxRounds: most optimisation rounds (>= 1).
        :param roundIterations: iterations of each later round; default half of ``max_iter`` (at least 20).
        :param planLabel: RT plan label.
        :param progress: ``progress(fraction, text)``; :param cancel: a :class:`twinrt.progress.CancelToken`.
        :return: what :meth:`createPlan` returns, plus ``goalsTable``, ``agentResult``, ``evaluation``
            (:class:`twinrt.planning.evaluation.PlanEvaluation`) and ``version`` (its number in the history).
        :raises InvalidInputError: invalid inputs, an unknown goal set, structures the goal set requires
            missing from the case (``StructureError``). :raises CancelledError: cancelled. The scene is
            unchanged on every error.
        """
        from twinrt.model import Prescription

        targetIds, targetNames = self._checkPlanInputs(inputVolume, inputSegmentation, targetSegments,
                                                       prescriptionGy, fractions)
        goalSetName, goals = self._loadGoalSet(goalSet)
        prescriptions = [Prescription(name, float(prescriptionGy), int(fractions)) for name in targetNames]
        settings = {"goalSet": goalSetName, "maxRounds": int(maxRounds),
                    "roundIterations": int(roundIterations) if roundIterations else None}
        return self._runAgent(inputVolume, inputSegmentation, targetIds, prescriptions, goals, settings,
                              self._planSetup(setup), None, planLabel, None, "", progress, cancel)

    @staticmethod
    def _loadGoalSet(goalSet):
        """``(name or path text, GoalSet)`` of a goal-set name, path or GoalSet."""
        from twinrt.planning.evaluation import GoalSet, load_goal_set

        if isinstance(goalSet, GoalSet):
            return str(goalSet.path or goalSet.name), goalSet
        return str(goalSet), load_goal_set(goalSet)

    def _runAgent(self, inputVolume, inputSegmentation, targetIds, prescriptions, goals, settings, setup, objectives,
                  planLabel, parentVersion, feedback, progress, cancel) -> dict[str, Any]:
        """Run the agent and write its plan, goals, trace, history entry and audit entries in one transaction."""
        from twinrt.planning import approval
        from twinrt.planning.agent import virtual_planner
        from twinrt.planning.evaluation import PlanEvaluation, deliverability
        from twinrt.progress import report

        from TwinRTCommon import mrmlio

        self._checkIsocenter(setup, inputVolume)
        report(progress, 0.0, "Reading the case from the scene", cancel)
        scene = inputVolume.GetScene()
        case = self.sceneToCase(scene, inputVolume, inputSegmentation)
        # A goal set naming a structure the case lacks is refused here, before any computing.
        goals.check_structures(case)

        agent = virtual_planner(case, goals, setup, objectives, prescriptions, max_rounds=settings["maxRounds"],
                                round_iter=settings["roundIterations"], label=planLabel,
                                progress=self._coreProgress(progress), cancel=cancel)
        report(progress, 0.85, "Writing the plan into the scene", cancel)
        plan = agent.planning.plan
        # Evaluation of the delivered plan, kept for feedback questions ("why is the cord so high?").
        evaluation = PlanEvaluation(goals.name, agent.results, agent.score, agent.must_passed,
                                    [r.explanation for r in agent.results if r.passed is False],
                                    [r.goal.describe() for r in agent.results if r.passed is None],
                                    deliverability(plan), dose_name="planned")
        with mrmlio.sceneTransaction(scene):
            created = self.addPlanToScene(agent.planning, case, inputVolume, inputSegmentation, targetIds,
                                          prescriptions)
            beams, studyItem = created["beamsTable"], created["studyItem"]
            goalsTable = self._addTable(scene, f"{case.patient_id} Plan goals ({created['doseName']})",
                                        agentRecord.goalRows(agent.results), {}, agentRecord.ROLE_GOALS,
                                        str(case.metadata.get("source", "")), studyItem)
            goalsTable.SetAttribute(agentRecord.GOAL_SET_ATTRIBUTE, settings["goalSet"])
            goalsTable.SetAttribute(agentRecord.GOALS_ATTRIBUTE, agentRecord.goalsToJson(agent.goals))
            goalsTable.SetNodeReferenceID(self.BEAMS_TABLE_REFERENCE_ROLE, beams.GetID())
            for node in (created["plannedDose"], beams, created["segmentsTable"]):
                node.SetAttribute(planRecord.ENGINE_ID_ATTRIBUTE, agentRecord.AGENT_ENGINE_ID)
                node.SetNodeReferenceID(self.GOALS_TABLE_REFERENCE_ROLE, goalsTable.GetID())
            beams.SetAttribute(agentRecord.AGENT_TRACE_ATTRIBUTE, json.dumps(agent.to_dict(), allow_nan=False))
            beams.SetAttribute(agentRecord.AGENT_SETTINGS_ATTRIBUTE, json.dumps(settings))

            # The audit trail: what the AI did, then the proposal (draft -> proposed) itself.
            log = mrmlio.studyAuditLog(studyItem, scene)
            failed = [r.goal.describe() for r in agent.results if r.passed is False]
            log.ai_action(f"Planning agent made plan '{plan.label}' ({beams.GetName()}): {agent.rounds} round(s), "
                          f"{agent.stop_reason}; score {agent.score:.1f}, must-goals "
                          f"{'met' if agent.must_passed else 'NOT all met'}",
                          {"plan_node": beams.GetName(), "goal_set": settings["goalSet"], "rounds": agent.rounds,
                           "score": round(float(agent.score), 3), "must_passed": bool(agent.must_passed),
                           "failed_goals": failed, "conflicts": [c["text"] for c in agent.conflicts],
                           "parent_version": parentVersion, "feedback": feedback})
            fingerprint = approval.plan_fingerprint(plan)
            approval.propose(plan, log)
            self._storePlan(beams, studyItem, plan, fingerprint)
            history = self.planHistory(studyItem, scene)
            version = len(history) + 1
            history.append(agentRecord.historyEntry(version, beams.GetID(), beams.GetName(), plan.label, plan.state,
                                                    agent.score, agent.must_passed, log.entries[-1]["timestamp"],
                                                    parentVersion, feedback, agent.seconds))
            self._setHistory(studyItem, history, scene)
            mrmlio.setStudyAuditLog(studyItem, log, scene)
        self._evaluations[beams.GetID()] = evaluation
        self._refreshHistoryTable(studyItem, scene)
        self.log(f"AIPlanner: agent plan v{version}: {created['summary']}")
        report(progress, 1.0, "Plan ready for review")
        return {**created, "goalsTable": goalsTable, "agentResult": agent, "planningResult": agent.planning,
                "evaluation": evaluation, "version": version}

    # ------------------------------------------------------------------------- plan state storage
    @staticmethod
    def storedPlan(planNode):
        """The :class:`twinrt.model.Plan` stored on a plan's beams table (its review state included).

        :raises InvalidInputError: not an AIPlanner plan.
        """
        from twinrt.errors import InvalidInputError

        from TwinRTCommon import mrmlio

        planText = planNode.GetAttribute(planRecord.PLAN_ATTRIBUTE) if planNode is not None else None
        if not planText:
            raise InvalidInputError(_("Select a plan made by AIPlanner (its beams table)"))
        return mrmlio.planFromDict(json.loads(planText))

    @staticmethod
    def _storePlan(planNode, studyItem: int, plan, fingerprint: str) -> None:
        """Write ``plan`` onto its beams table and over its entry in the study's plan list (found by fingerprint)."""
        from twinrt.planning.approval import plan_fingerprint

        from TwinRTCommon import mrmlio

        data = mrmlio.planToDict(plan)
        sh = planNode.GetScene().GetSubjectHierarchyNode()
        plans = json.loads(sh.GetItemAttribute(studyItem, mrmlio.PLANS_ATTRIBUTE) or "[]")
        # The fingerprint leaves out the review fields, so it finds the entry whatever its state.
        for index, stored in enumerate(plans):
            if plan_fingerprint(mrmlio.planFromDict(stored)) == fingerprint:
                plans[index] = data
        sh.SetItemAttribute(studyItem, mrmlio.PLANS_ATTRIBUTE, json.dumps(plans))
        planNode.SetAttribute(planRecord.PLAN_ATTRIBUTE, json.dumps(data))

    def planHistory(self, studyItem: int, scene=None) -> list[dict[str, Any]]:
        """The study's plan versions, oldest first (:func:`AIPlannerLib.agentRecord.historyEntry` dicts).

        :param studyItem: the subject-hierarchy study item (``createAgentPlan(...)["studyItem"]``).
        :param scene: the MRML scene; default ``slicer.mrmlScene``.
        """
        sh = (scene if scene is not None else slicer.mrmlScene).GetSubjectHierarchyNode()
        return json.loads(sh.GetItemAttribute(studyItem, agentRecord.PLAN_HISTORY_ATTRIBUTE) or "[]")

    def _setHistory(self, studyItem: int, history: list, scene) -> None:
        scene.GetSubjectHierarchyNode().SetItemAttribute(studyItem, agentRecord.PLAN_HISTORY_ATTRIBUTE,
                                                         json.dumps(history))

    def historyTable(self, studyItem: int, scene=None):
        """The study's plan-history table node (``TwinRT.Role`` = PlanHistory), or None before the first agent plan."""
        from TwinRTCommon import mrmlio

        scene = scene if scene is not None else slicer.mrmlScene
        tables = scene.GetNodesByClass("vtkMRMLTableNode")
        for node in (tables.GetItemAsObject(i) for i in range(tables.GetNumberOfItems())):
            if node.GetAttribute(mrmlio.ROLE_ATTRIBUTE) == agentRecord.ROLE_HISTORY and \
                    mrmlio.studyItemOf(node) == studyItem:
                return node
        return None

    def _refreshHistoryTable(self, studyItem: int, scene) -> None:
        """Show the history (the study attribute, which is authoritative) in a table node, made once per study."""
        from TwinRTCommon import mrmlio

        rows = agentRecord.historyRows(self.planHistory(studyItem, scene))
        table = self.historyTable(studyItem, scene)
        if table is None:
            table = self._addTable(scene, "AIPlanner plan history", rows, {}, agentRecord.ROLE_HISTORY, "", studyItem)
            return
        table.GetTable().Initialize()
        mrmlio.fillTable(table, rows)
        table.Modified()

    def _planContext(self, planNode) -> dict[str, Any]:
        """Study, CT, structures and the stored plan of a plan node; raises when something was removed."""
        from twinrt.errors import InvalidInputError

        from TwinRTCommon import mrmlio

        plan = self.storedPlan(planNode)
        ct = planNode.GetNodeReference(self.REFERENCE_VOLUME_REFERENCE_ROLE)
        segmentation = planNode.GetNodeReference(self.SEGMENTATION_REFERENCE_ROLE)
        doseNode = planNode.GetNodeReference(self.PLANNED_DOSE_REFERENCE_ROLE)
        studyItem = mrmlio.studyItemOf(planNode)
        if ct is None or segmentation is None or doseNode is None or not studyItem:
            raise InvalidInputError(_("The CT, structures or planned dose of '{plan}' are no longer in the scene; "
                                      "create the plan again").format(plan=planNode.GetName()))
        return {"plan": plan, "ct": ct, "segmentation": segmentation, "dose": doseNode, "studyItem": studyItem,
                "goalsTable": planNode.GetNodeReference(self.GOALS_TABLE_REFERENCE_ROLE)}

    def planEvaluation(self, planNode):
        """The goal evaluation of an agent plan (kept since it was made, or computed again from the scene).

        :param planNode: the plan's beams table.
        :return: a :class:`twinrt.planning.evaluation.PlanEvaluation`.
        :raises InvalidInputError: not an agent plan (it has no goals table), or its inputs were removed.
        """
        from twinrt.errors import InvalidInputError
        from twinrt.planning.evaluation import evaluate_plan

        from TwinRTCommon import mrmlio

        if planNode is not None and planNode.GetID() in self._evaluations:
            return self._evaluations[planNode.GetID()]
        context = self._planContext(planNode)
        goalsTable = context["goalsTable"]
        if goalsTable is None:
            raise InvalidInputError(_("'{plan}' was planned from fixed objectives, not for clinical goals; create "
                                      "an agent plan to give feedback on it").format(plan=planNode.GetName()))
        _name, goalSet = self._loadGoalSet(goalsTable.GetAttribute(agentRecord.GOAL_SET_ATTRIBUTE))
        goals = agentRecord.goalsFromJson(goalsTable.GetAttribute(agentRecord.GOALS_ATTRIBUTE))
        goalSet = self._withGoals(goalSet, goals)
        case = self.sceneToCase(planNode.GetScene(), context["ct"], context["segmentation"])
        doseName = context["dose"].GetAttribute(mrmlio.DOSE_NAME_ATTRIBUTE) or context["dose"].GetName()
        evaluation = evaluate_plan(case, case.doses[doseName], goalSet, context["plan"])
        self._evaluations[planNode.GetID()] = evaluation
        return evaluation

    @staticmethod
    def _withGoals(goalSet, goals):
        """``goalSet`` (its aliases and optional structures kept) with its goals replaced by ``goals``."""
        import dataclasses

        return dataclasses.replace(goalSet, goals=list(goals), goal_lines=[], contradictions=[])

    # ----------------------------------------------------------------------------------- feedback
    def submitFeedback(self, planNode, text: str, author: str = "User"):
        """Interpret typed feedback on a plan; nothing is re-planned until :meth:`applyFeedback`.

        The message and its interpretation go into the study's audit log.

        :param planNode: the plan's beams table (an agent plan).
        :param text: the feedback as typed ("keep the left parotid mean under 30 Gy", "why is the cord so high?").
        :param author: who typed it (the audit log names them).
        :return: a :mod:`twinrt.planning.conversation` Interpretation: an edit (``needs_confirmation``: show
            ``confirmation_text()`` and ask), a ``Question`` (see :meth:`feedbackReply`) or a
            ``Clarification`` (its ``question`` asks the user back).
        :raises InvalidInputError: not an agent plan, or empty text.
        """
        from twinrt.errors import InvalidInputError
        from twinrt.planning.conversation import parse_feedback

        from TwinRTCommon import mrmlio

        if not str(text or "").strip():
            raise InvalidInputError(_("Type the feedback first, e.g. 'keep the left parotid mean under 20 Gy'"))
        context = self._planContext(planNode)
        evaluation = self.planEvaluation(planNode)
        segments = context["segmentation"].GetSegmentation()
        names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
        interpretation = parse_feedback(text, names, evaluation)
        scene, studyItem = planNode.GetScene(), context["studyItem"]
        log = mrmlio.studyAuditLog(studyItem, scene)
        log.human_message(str(author or "").strip() or "User", str(text).strip(), {"plan_node": planNode.GetName()})
        log.ai_action(f"Feedback interpreted as {interpretation.kind}: {self.feedbackReply(planNode, interpretation)}",
                      {"plan_node": planNode.GetName(), "interpretation": interpretation.to_dict()})
        mrmlio.setStudyAuditLog(studyItem, log, scene)
        return interpretation

    def feedbackReply(self, planNode, interpretation) -> str:
        """What the panel shows: a question's answer, else the text to confirm, or the question back."""
        from twinrt.planning.conversation import Question, answer

        if isinstance(interpretation, Question):
            return answer(interpretation, self.planEvaluation(planNode))
        return interpretation.confirmation_text()

    def applyFeedback(self, planNode, interpretation, progress=None, cancel=None) -> dict[str, Any]:
        """Re-plan after the user confirmed an interpretation; the new plan is a new version in the history.

        The interpretation becomes edits (:func:`twinrt.planning.conversation.to_edits`): goal edits
        change the goals planned for, objective edits the starting objectives, set-up edits ("fewer
        MU", "fewer segments") the plan's smoothing and sequencing; then the agent plans again from the
        edited objectives with the plan's (edited) set-up, prescriptions and settings. A delivery
        request with a limit ("keep MU under 800") is checked on the new plan: the result's
        ``deliveryCheck`` says whether it holds, and so does the audit log. The earlier version is
        kept (it can still be approved or rejected).

        :param planNode: the plan the feedback was given on (beams table of an agent plan).
        :param interpretation: what :meth:`submitFeedback` returned, confirmed by the user.
        :param progress: ``progress(fraction, text)``; :param cancel: a CancelToken.
        :return: what :meth:`createAgentPlan` returns for the new version, plus ``deliveryCheck``
            (``None``, or ``{"aspect", "limit", "value", "met"}`` for a delivery request with a limit).
        :raises InvalidInputError: a question or clarification (nothing to apply), or edits that match
            nothing. The scene is unchanged.
        """
        from twinrt.errors import InvalidInputError
        from twinrt.model import Prescription
        from twinrt.planning.agent import apply_edits, apply_goal_edits, apply_setup_edits
        from twinrt.planning.conversation import DeliveryRequest, to_edits

        from TwinRTCommon import mrmlio

        if not interpretation.needs_confirmation:
            raise InvalidInputError(_("There is nothing to apply: '{text}' is a question or needs an answer "
                                      "first").format(text=interpretation.text))
        setup = self._planSetup(json.loads(planNode.GetAttribute(planRecord.PLAN_SETUP_ATTRIBUTE)))
        edits = to_edits(interpretation, setup)
        if not edits:
            raise InvalidInputError(_("'{text}' does not change the goals, objectives or plan set-up").format(
                text=interpretation.text))
        context = self._planContext(planNode)
        goalsTable = context["goalsTable"]
        if goalsTable is None:
            raise InvalidInputError(_("'{plan}' is not an agent plan; feedback applies to agent plans").format(
                plan=planNode.GetName()))
        _name, goalSet = self._loadGoalSet(goalsTable.GetAttribute(agentRecord.GOAL_SET_ATTRIBUTE))
        goals = apply_goal_edits(agentRecord.goalsFromJson(goalsTable.GetAttribute(agentRecord.GOALS_ATTRIBUTE)),
                                 edits)
        objectives = apply_edits(json.loads(planNode.GetAttribute(planRecord.OBJECTIVES_ATTRIBUTE)), edits)
        prescriptions = [Prescription(p["target"], float(p["dose_gy"]), int(p["fractions"]))
                         for p in json.loads(planNode.GetAttribute(planRecord.PRESCRIPTION_ATTRIBUTE))]
        settings = json.loads(planNode.GetAttribute(agentRecord.AGENT_SETTINGS_ATTRIBUTE))
        parent = next((h["version"] for h in self.planHistory(context["studyItem"], planNode.GetScene())
                       if h["planNodeID"] == planNode.GetID()), None)
        result = self._runAgent(context["ct"], context["segmentation"],
                                json.loads(planNode.GetAttribute(planRecord.TARGET_SEGMENTS_ATTRIBUTE)),
                                prescriptions, self._withGoals(goalSet, goals), settings,
                                apply_setup_edits(setup, edits), objectives, context["plan"].label, parent,
                                interpretation.text, progress, cancel)
        check = None
        if isinstance(interpretation, DeliveryRequest) and interpretation.limit is not None:
            key = {"mu": "total_mu", "segments": "n_segments"}.get(interpretation.aspect)
            value = result["evaluation"].deliverability.get(key) if key else None
            if value is not None:
                check = {"aspect": interpretation.aspect, "limit": float(interpretation.limit),
                         "value": float(value), "met": bool(value <= interpretation.limit)}
                scene, studyItem = planNode.GetScene(), result["studyItem"]
                log = mrmlio.studyAuditLog(studyItem, scene)
                log.ai_action(f"Delivery limit {interpretation.aspect} <= {interpretation.limit:g}: the new plan has "
                              f"{value:.0f}, {'met' if check['met'] else 'NOT met: ask again to smooth further'}",
                              {"plan_node": result["beamsTable"].GetName(), **check})
                mrmlio.setStudyAuditLog(studyItem, log, scene)
        return {**result, "deliveryCheck": check}

    # ------------------------------------------------------------------------------------- review
    def approvePlan(self, planNode, reviewerName: str, comment: str = ""):
        """Approve a proposed plan: an explicit human action with a name (the RTPLAN then says APPROVED).

        :param planNode: the plan's beams table.
        :param reviewerName: the approving person's name; empty or the AI's name is refused.
        :param comment: optional review comment.
        :return: the approved :class:`twinrt.model.Plan`.
        :raises HumanReviewRequiredError: no human name. :raises InvalidTransitionError: not proposed.
            In both cases the scene is unchanged.
        """
        from twinrt.planning import approval

        return self._review(planNode, lambda plan, log: approval.approve(plan, log, reviewerName, comment),
                            comment)

    def rejectPlan(self, planNode, reviewerName: str, reason: str):
        """Reject a proposed plan, by a named person with a reason.

        :param planNode: the plan's beams table.
        :param reviewerName: the rejecting person's name; empty or the AI's name is refused.
        :param reason: why (required).
        :return: the rejected :class:`twinrt.model.Plan`.
        :raises HumanReviewRequiredError: no human name. :raises InvalidInputError: no reason.
        :raises InvalidTransitionError: not proposed. The scene is unchanged on every error.
        """
        from twinrt.planning import approval

        return self._review(planNode, lambda plan, log: approval.reject(plan, log, reviewerName, reason), reason)

    def _review(self, planNode, action, comment: str):
        """Run an approval action on the stored plan and a copy of the log, then store both (nothing on error)."""
        from twinrt.planning.approval import plan_fingerprint

        from TwinRTCommon import mrmlio

        context = self._planContext(planNode)
        plan, studyItem, scene = context["plan"], context["studyItem"], planNode.GetScene()
        log = mrmlio.studyAuditLog(studyItem, scene)
        fingerprint = plan_fingerprint(plan)
        # The action checks the reviewer and the state before it touches the plan or the log.
        action(plan, log)
        history = self.planHistory(studyItem, scene)
        for entry in history:
            if entry["planNodeID"] == planNode.GetID():
                entry.update(state=plan.state, reviewer=plan.reviewer_name, review_comment=comment)
        with mrmlio.sceneTransaction(scene):
            mrmlio.setStudyAuditLog(studyItem, log, scene)
            self._setHistory(studyItem, history, scene)
            self._storePlan(planNode, studyItem, plan, fingerprint)
        self._refreshHistoryTable(studyItem, scene)
        self.log(f"AIPlanner: plan '{planNode.GetName()}' {plan.state} by {plan.reviewer_name}")
        return plan

    def _planStudyItem(self, scene, ctVolume, case) -> int:
        """The CT's study; a CT outside any study (loaded from a file) gets a new one for the plan."""
        from TwinRTCommon import mrmlio

        study = mrmlio.studyItemOf(ctVolume)
        if study:
            return study
        # SlicerRT reads the dose unit from the study of a dose, so the plan needs one.
        sh = scene.GetSubjectHierarchyNode()
        ctItem = sh.GetItemByDataNode(ctVolume)
        levels = slicer.vtkMRMLSubjectHierarchyConstants
        patient = sh.GetItemAncestorAtLevel(ctItem, levels.GetDICOMLevelPatient()) if ctItem else 0
        if not patient:
            patient = sh.CreateSubjectItem(sh.GetSceneItemID(), case.patient_id)
        return sh.CreateStudyItem(patient, "TwinRT plan")

    def addPlanToScene(self, result, case, inputVolume, inputSegmentation, targetSegmentIds: list[str],
                       prescriptions: list) -> dict[str, Any]:
        """Write a planning result into the scene in one transaction (see :meth:`createPlan`).

        :param result: the :class:`twinrt.planning.workflow.PlanningResult`.
        :param case: the case it was planned on (read from ``inputVolume`` and ``inputSegmentation``).
        :param inputVolume: the planning CT; :param inputSegmentation: its structures.
        :param targetSegmentIds: segment IDs of the targets; :param prescriptions: the prescriptions used.
        :return: the created nodes (see :meth:`createPlan`).
        :raises TwinRTError: when a node cannot be written; everything added is removed again.
        """
        import twinrt
        from twinrt.model import Case

        from TwinRTCommon import mrmlio

        scene = inputVolume.GetScene()
        sh = scene.GetSubjectHierarchyNode()
        plan = result.plan
        source = str(case.metadata.get("source", ""))
        record = planRecord.parameterRecord(result, prescriptions, targetSegmentIds, plan.label, twinrt.__version__,
                                            twinrt.RESEARCH_USE_ONLY)
        with mrmlio.sceneTransaction(scene):
            studyItem = self._planStudyItem(scene, inputVolume, case)
            doseName = mrmlio.uniqueDoseName(scene, studyItem, "planned")
            doseNode = mrmlio.addDoseVolume(scene, result.dose, studyItem, f"{case.patient_id} Dose {doseName}",
                                            doseName, source, self.createdBy)

            beams = self._addTable(scene, f"{case.patient_id} Plan beams ({doseName})", planRecord.beamRows(plan),
                                   planRecord.BEAM_COLUMN_UNITS, planRecord.ROLE_BEAMS, source, studyItem)
            beams.SetAttribute(planRecord.PLAN_ATTRIBUTE, json.dumps(mrmlio.planToDict(plan)))
            beams.SetAttribute(planRecord.ISOCENTER_FRAME_ATTRIBUTE, "RAS")
            segments = self._addTable(scene, f"{case.patient_id} Plan segments ({doseName})",
                                      planRecord.segmentRows(plan), planRecord.SEGMENT_COLUMN_UNITS,
                                      planRecord.ROLE_SEGMENTS, source, studyItem)

            # The DVH of the planned dose over every structure, with the plan's prescriptions so
            # that the target rows get coverage and conformity figures.
            dvhCase = Case(case.patient_id, case.ct, case.structures, {doseName: result.dose}, [],
                           {**case.metadata, "prescriptions": list(prescriptions)})
            segmentation = inputSegmentation.GetSegmentation()
            segmentIds = {}
            for index in range(segmentation.GetNumberOfSegments()):
                segmentIds.setdefault(segmentation.GetNthSegment(index).GetName(), segmentation.GetNthSegmentID(index))
            dvhNodes = mrmlio.addDvh(scene, dvhCase, doseName, doseNode, inputSegmentation, segmentIds, studyItem,
                                     source, self.createdBy)

            for node in (doseNode, beams, segments):
                for name, value in record.items():
                    node.SetAttribute(name, value)
            # Every plan node points at the others and at its inputs, so that any of them leads to the plan.
            references = {self.PLANNED_DOSE_REFERENCE_ROLE: doseNode, self.BEAMS_TABLE_REFERENCE_ROLE: beams,
                          self.SEGMENTS_TABLE_REFERENCE_ROLE: segments,
                          self.REFERENCE_VOLUME_REFERENCE_ROLE: inputVolume,
                          self.SEGMENTATION_REFERENCE_ROLE: inputSegmentation,
                          self.DVH_METRICS_REFERENCE_ROLE: dvhNodes["dvhMetricsTable"],
                          self.DVH_CHART_REFERENCE_ROLE: dvhNodes["dvhChart"]}
            for node in (doseNode, beams, segments):
                for role, target in references.items():
                    if target is not node:
                        node.SetNodeReferenceID(role, target.GetID())

            # The study's plan list is what sceneToCase gives back as case.plans (the MRML contract).
            plans = json.loads(sh.GetItemAttribute(studyItem, mrmlio.PLANS_ATTRIBUTE) or "[]")
            plans.append(mrmlio.planToDict(plan))
            sh.SetItemAttribute(studyItem, mrmlio.PLANS_ATTRIBUTE, json.dumps(plans))

        targetNames = {p.target for p in prescriptions}
        targetRows = [row for row in mrmlio.tableToRows(dvhNodes["dvhMetricsTable"]) if row["structure"] in targetNames]
        return {"plannedDose": doseNode, "beamsTable": beams, "segmentsTable": segments, **dvhNodes,
                "studyItem": studyItem, "doseName": doseName, "planningResult": result,
                "summary": planRecord.planSummaryText(result, targetRows, prescriptions[0].dose_gy)}

    def _addTable(self, scene, name: str, rows: list[dict], units: dict[str, str], role: str, source: str,
                  studyItem: int):
        """A table node filled with ``rows``, its column units set, tagged and under the study."""
        from TwinRTCommon import mrmlio

        table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        mrmlio.tagNode(table, role, source, self.createdBy)
        mrmlio.fillTable(table, rows)
        for column, unit in units.items():
            if table.GetTable().GetColumnByName(column) is not None:
                table.SetColumnUnitLabel(column, unit)
        scene.GetSubjectHierarchyNode().CreateItem(studyItem, table)
        return table

    # ------------------------------------------------------------------------------------- export
    def latestPlanNode(self, scene=None):
        """The beams table of the most recent AIPlanner plan in the scene, or None."""
        scene = scene if scene is not None else slicer.mrmlScene
        tables = scene.GetNodesByClass("vtkMRMLTableNode")
        plans = [tables.GetItemAsObject(i) for i in range(tables.GetNumberOfItems())
                 if tables.GetItemAsObject(i).GetAttribute(planRecord.PLAN_ATTRIBUTE)]
        return plans[-1] if plans else None

    @staticmethod
    def exportFolderName(planNode) -> str:
        """A folder name for a plan's DICOM export: patient and plan, safe on every file system."""
        import re

        name = planNode.GetName() if planNode is not None else "plan"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "plan"

    def exportPlanDicom(self, planNode, folder, include=("ct", "rtstruct", "rtplan", "rtdose")) -> dict:
        """Export a plan made by :meth:`createPlan` as DICOM (RTPLAN, RTDOSE and, by default, CT and RTSTRUCT).

        :param planNode: the plan's beams table (``createPlan(...)["beamsTable"]``).
        :param folder: output folder; created, or replaced when it holds an earlier TwinRT export.
        :param include: DICOM objects to write (:func:`twinrt.dicom.folder.export_case`).
        :return: the written files per object kind.
        :raises InvalidInputError: not an AIPlanner plan, or its CT, structures or dose were removed.
        """
        from twinrt.dicom.folder import export_case
        from twinrt.errors import InvalidInputError
        from twinrt.model import Case

        from TwinRTCommon import mrmlio

        planText = planNode.GetAttribute(planRecord.PLAN_ATTRIBUTE) if planNode is not None else None
        if not planText:
            raise InvalidInputError(_("Select a plan made by AIPlanner (its beams table) to export"))
        plan = mrmlio.planFromDict(json.loads(planText))
        ct = planNode.GetNodeReference(self.REFERENCE_VOLUME_REFERENCE_ROLE)
        segmentation = planNode.GetNodeReference(self.SEGMENTATION_REFERENCE_ROLE)
        doseNode = planNode.GetNodeReference(self.PLANNED_DOSE_REFERENCE_ROLE)
        if ct is None or segmentation is None or doseNode is None:
            raise InvalidInputError(_("The CT, structures or planned dose of '{plan}' are no longer in the scene; "
                                      "create the plan again").format(plan=planNode.GetName()))
        case = self.sceneToCase(planNode.GetScene(), ct, segmentation)
        doseName = doseNode.GetAttribute(mrmlio.DOSE_NAME_ATTRIBUTE) or doseNode.GetName()
        if doseName not in case.doses:
            raise InvalidInputError(_("The planned dose '{dose}' is not in the CT's study; create the plan "
                                      "again").format(dose=doseName))
        # Empty segments have no contour to write; the plan and dose do not depend on them.
        structures = [s for s in case.structures if not s.is_empty]
        export = Case(case.patient_id, case.ct, structures, {doseName: case.doses[doseName]}, [plan],
                      dict(case.metadata))
        return export_case(export, Path(folder), include)


#
# AIPlannerTest
#


class AIPlannerTest(CaseModuleTestMixin, ScriptedLoadableModuleTest):
    """Logic tests on tiny synthetic cases built in memory; they run in Slicer and headless.

    The shared tests are :class:`TwinRTCommon.testing.CaseModuleTestMixin`'s (the attributes below
    say how to call this module's stage and what its parameter node holds); the planning tests
    below use a 28 x 28 x 20 voxel water phantom that plans in about a second.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    logicClass = AIPlannerLogic
    stageMethodName = "createPlan"
    stageArguments = ("ct", "segmentation", ["PTV60"], 60.0, 30)
    invalidStageArguments = ("ct", "segmentation", ["PTV60"], 0.0, 30)  # a 0 Gy prescription
    # Every stage is built (planning: issue 3, the planning agent: issue 4): nothing is pending.
    stageIssueText = ""
    parameterNodes = {"inputVolume": "ct", "inputSegmentation": "segmentation"}
    parameterValues = {"prescriptionGy": 60.0, "fractions": 30, "targetSegment": "PTV60", "numberOfBeams": 5,
                       "startAngleDeg": 20.0, "bixelSizeMm": 4.0, "doseGridSpacingMm": 3.0, "maxIterations": 100}
    invalidParameterValues = {"fractions": 0, "numberOfBeams": 0, "doseGridSpacingMm": 0.1}

    def runTest(self):
        """Run all tests of this module (Slicer's ctest and Reload and Test call only this)."""
        self.runCaseModuleTests(self.test_PlanInputs, self.test_PlanPhantom,
                                self.test_PlanBadInputLeavesSceneUnchanged, self.test_PlanCancelled,
                                self.test_AgentReviewPhantom, self.test_AgentLoopSamplePatient,
                                self.test_PlanFromPredictionPhantom)

    def planSetup(self):
        """The beam set-up of the planning tests: five beams, coarse enough to plan in about a second."""
        from twinrt.planning.workflow import PlanSetup

        return PlanSetup.equispaced(5, 10.0, dose_grid_mm=5.0, max_iter=60, levels=8)

    def loadPlanningPhantom(self, badTargets: bool = False) -> dict:
        """Put the planning phantom (:func:`TwinRTCommon.testing.makePlanningPhantom`) into the scene."""
        from TwinRTCommon.testing import makePlanningPhantom

        return self.logicClass().caseToScene(makePlanningPhantom(badTargets=badTargets))

    @staticmethod
    def sceneState(scene) -> tuple:
        """What a failed call must not change (:func:`TwinRTCommon.testing.sceneState`)."""
        from TwinRTCommon.testing import sceneState

        return sceneState(scene)

    def test_PlanInputs(self):
        """What the Widget hands the Logic: targets, beam set-up from the parameter node, objectives table."""
        from twinrt.errors import InvalidInputError

        from AIPlannerLib import planRecord

        self.delayDisplay("Planning inputs")
        logic = self.logicClass()
        created = self.loadPlanningPhantom(badTargets=True)
        segmentation = created["segmentation"]
        self.assertEqual(logic.defaultTargetSegments(segmentation), ["PTV", "EmptyTarget", "AirTarget"])
        self.assertEqual(logic.findSegmentation(created["ct"]).GetID(), segmentation.GetID())
        ids, names = logic.resolveTargetSegments(segmentation, f"PTV, {created['segmentIds']['PTV']}, AirTarget")
        self.assertEqual(names, ["PTV", "AirTarget"])
        self.assertEqual(ids, [created["segmentIds"]["PTV"], created["segmentIds"]["AirTarget"]])

        parameters = logic.getParameterNode()
        parameters.numberOfBeams, parameters.startAngleDeg, parameters.bixelSizeMm = 4, 45.0, 4.0
        parameters.doseGridSpacingMm, parameters.maxIterations = 3.0, 50
        setup = logic.planSetupFromParameters(parameters)
        self.assertEqual(setup.gantry_deg, (45.0, 135.0, 225.0, 315.0))
        self.assertEqual((setup.bixel_width_mm, setup.dose_grid_mm, setup.max_iter), (4.0, 3.0, 50))

        # The objectives table round trip, and its errors naming the row.
        objectives = logic.defaultObjectives(created["ct"], segmentation, ["PTV"], 60.0, 30)
        self.assertEqual(objectives[0]["structure"], "PTV")
        cells = planRecord.objectivesToCells(objectives) + [["", "", "", "", ""]]
        self.assertEqual(planRecord.objectivesFromCells(cells), objectives)
        with self.assertRaises(InvalidInputError) as context:
            planRecord.objectivesFromCells([["PTV", "squared_deviation", "sixty", "", "1"]])
        self.assertIn("row 1", str(context.exception))
        with self.assertRaises(InvalidInputError) as context:
            planRecord.objectivesFromCells(cells[:1] + [["Organ", "hottest", "30", "", "1"]])
        self.assertIn("row 2", str(context.exception))
        self.delayDisplay("Test passed")

    def test_PlanFromPredictionPhantom(self):
        """Knowledge-based planning: a dose volume in the scene (here a plan's, standing in for a prediction)."""
        from twinrt.errors import InvalidInputError

        from AIPlannerLib import planRecord
        from TwinRTCommon import mrmlio

        self.delayDisplay("Plan from a predicted dose")
        logic = self.logicClass()
        created = self.loadPlanningPhantom()
        ct, segmentation, scene = created["ct"], created["segmentation"], slicer.mrmlScene
        first = logic.createPlan(ct, segmentation, "PTV", 60.0, 30, self.planSetup())
        predicted = first["plannedDose"]
        before = self.sceneState(scene)
        with self.assertRaises(InvalidInputError):
            logic.createPlanFromPrediction(ct, segmentation, "PTV", 60.0, 30, None, setup=self.planSetup())
        self.assertEqual(self.sceneState(scene), before)

        kbp = logic.createPlanFromPrediction(ct, segmentation, "PTV", 60.0, 30, predicted, setup=self.planSetup())
        self.assertNotEqual(kbp["plannedDose"].GetID(), predicted.GetID())
        self.assertTrue(mrmlio.isDoseVolumeNode(kbp["plannedDose"]))
        objectives = json.loads(kbp["beamsTable"].GetAttribute(planRecord.OBJECTIVES_ATTRIBUTE))
        self.assertIn(("Organ", "dose_mimicking", "upper"),
                      [(o["structure"], o["kind"], o.get("side")) for o in objectives])
        from twinrt import dvh

        case = logic.sceneToCase(scene, ct, segmentation)
        # Organs follow the prediction "not above": the organ mean stays within 1 Gy of the predicted one.
        mean = {key: dvh.structure_dvh(case.doses[plan["doseName"]], case.structure("Organ")).mean_gy
                for key, plan in (("predicted", first), ("kbp", kbp))}
        self.assertLess(mean["kbp"], mean["predicted"] + 1.0)
        self.assertEqual(kbp["planningResult"].plan.approval, "UNAPPROVED")
        self.delayDisplay("Test passed")

    def test_PlanPhantom(self):
        """A plan of the phantom: dose volume in Gy, plan tables, reproducible parameters, DVH, DICOM export."""
        import tempfile
        from unittest import mock

        from twinrt.dicom.folder import import_case
        from twinrt.planning.workflow import PlanSetup

        from TwinRTCommon import mrmlio

        self.delayDisplay("Plan the phantom")
        logic = self.logicClass()
        created = self.loadPlanningPhantom()
        scene = slicer.mrmlScene
        setup = self.planSetup()
        steps = []
        plan = logic.createPlan(created["ct"], created["segmentation"], "PTV", 60.0, 30, setup.to_dict(),
                                progress=lambda fraction, text: steps.append(fraction))
        result = plan["planningResult"]
        self.assertEqual(steps[0], 0.0)
        self.assertEqual(steps[-1], 1.0)
        self.assertEqual(steps, sorted(steps))

        # The planned dose is a SlicerRT dose volume in Gy under the case's study.
        sh = scene.GetSubjectHierarchyNode()
        dose = plan["plannedDose"]
        self.assertTrue(mrmlio.isDoseVolumeNode(dose))
        self.assertEqual(dose.GetAttribute("DicomRtImport.DoseVolume"), "1")
        self.assertEqual(plan["studyItem"], created["studyItem"])
        self.assertEqual(sh.GetItemAttribute(plan["studyItem"], "DicomRtImport.DoseUnitName"), "Gy")
        self.assertEqual(dose.GetDisplayNode().GetColorNode().GetName(), "Dose_ColorTable")
        self.assertAlmostEqual(float(slicer.util.arrayFromVolume(dose).max()), result.dose.max_gy, places=3)
        for node in [dose, plan["beamsTable"], plan["segmentsTable"], plan["dvhMetricsTable"], plan["dvhChart"],
                     *plan["dvhTables"].values()]:
            self.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(node)), created["studyItem"], node.GetName())

        # One row per beam, one per segment; MU per fraction as in the plan.
        beams = mrmlio.tableToRows(plan["beamsTable"])
        self.assertEqual(len(beams), len(result.plan.beams))
        self.assertEqual(len(beams), len(setup.gantry_deg))
        self.assertEqual([row["gantry_deg"] for row in beams], [b.beam.gantry_deg for b in result.plan.beams])
        self.assertEqual(sum(row["segments"] for row in beams), len(mrmlio.tableToRows(plan["segmentsTable"])))
        self.assertAlmostEqual(sum(row["mu_per_fraction"] for row in beams),
                               sum(b.meterset_mu for b in result.plan.beams), places=6)
        self.assertEqual(plan["beamsTable"].GetColumnUnitLabel("mu_per_fraction"), "MU")
        self.assertEqual(plan["beamsTable"].GetAttribute("AIPlanner.IsocenterFrame"), "RAS")
        isocenter = result.plan.beams[0].beam.isocenter_mm
        self.assertAlmostEqual(beams[0]["isocenter_R_mm"], -isocenter[0], places=6)

        # The target's mean dose in the DVH table is within 5 % of the prescription.
        rows = {row["structure"]: row for row in mrmlio.tableToRows(plan["dvhMetricsTable"])}
        self.assertLess(abs(rows["PTV"]["mean_gy"] - 60.0), 0.05 * 60.0, rows["PTV"])
        self.assertIn("PTV", plan["dvhTables"])

        # The parameter record reproduces the plan's inputs, on the dose and both tables.
        for node in (dose, plan["beamsTable"], plan["segmentsTable"]):
            self.assertEqual(PlanSetup.from_dict(json.loads(node.GetAttribute("AIPlanner.PlanSetup"))), setup)
            self.assertEqual(json.loads(node.GetAttribute("AIPlanner.Objectives")), result.objectives)
            self.assertEqual(json.loads(node.GetAttribute("AIPlanner.Prescription")),
                             [{"target": "PTV", "dose_gy": 60.0, "fractions": 30}])
            self.assertEqual(node.GetAttribute("AIPlanner.EngineId"), "twinrt.planning.workflow.plan_case")
            self.assertTrue(node.GetAttribute("AIPlanner.TwinRTVersion"))
            self.assertIn("Research use only", node.GetAttribute("AIPlanner.ResearchUseOnly"))
        # The plan itself rides on the beams table and on the study (sceneToCase gives it back).
        stored = mrmlio.planFromDict(json.loads(plan["beamsTable"].GetAttribute("AIPlanner.Plan")))
        self.assertEqual([len(b.segments) for b in stored.beams], [len(b.segments) for b in result.plan.beams])
        back = logic.sceneToCase(scene, created["ct"], created["segmentation"])
        self.assertEqual(len(back.plans), 1)
        self.assertIn(plan["doseName"], back.doses)

        # A failure while writing removes everything written so far and restores the study.
        before = self.sceneState(scene)
        with mock.patch.object(mrmlio, "addDvh", side_effect=RuntimeError("simulated failure")):
            with self.assertRaises(RuntimeError):
                logic.addPlanToScene(result, back, created["ct"], created["segmentation"], ["x"],
                                     result.plan.prescriptions)
        self.assertEqual(self.sceneState(scene), before)

        # DICOM export: RTPLAN and RTDOSE that import back with the same beams.
        with tempfile.TemporaryDirectory() as folder:
            files = logic.exportPlanDicom(plan["beamsTable"], Path(folder) / "plan")
            self.assertEqual(len(files["rtplan"]), 1)
            self.assertEqual(len(files["rtdose"]), 1)
            imported = import_case(Path(folder) / "plan")
            self.assertEqual([b.beam.gantry_deg for b in imported.plans[0].beams],
                             [b.beam.gantry_deg for b in result.plan.beams])
        self.delayDisplay("Test passed")

    def test_PlanBadInputLeavesSceneUnchanged(self):
        """No target, unknown, empty or outside targets, beams missing the target, a dose grid too large."""
        from unittest import mock

        from twinrt.errors import GeometryError, InvalidInputError, StructureError
        from twinrt.planning import engine

        self.delayDisplay("Planning: bad input")
        logic = self.logicClass()
        created = self.loadPlanningPhantom(badTargets=True)
        ct, segmentation = created["ct"], created["segmentation"]
        before = self.sceneState(slicer.mrmlScene)
        setup = self.planSetup()

        def refused(error, targets, match, **kwargs):
            with self.assertRaises(error) as context:
                logic.createPlan(ct, segmentation, targets, 60.0, 30, kwargs.pop("setup", setup), **kwargs)
            self.assertIn(match, str(context.exception))
            self.assertEqual(self.sceneState(slicer.mrmlScene), before, match)

        refused(InvalidInputError, [], "No target selected")
        refused(InvalidInputError, " , ", "No target selected")
        refused(StructureError, ["Nope"], "'Nope' is not a segment")
        refused(StructureError, ["EmptyTarget"], "empty")
        refused(StructureError, ["AirTarget"], "outside the body")
        # An isocentre 2 m away: every beam through it misses the target.
        farAway = self.planSetup()
        farAway.isocenter_mm = (0.0, 0.0, 2000.0)
        refused(GeometryError, ["PTV"], "miss the target", setup=farAway)
        refused(InvalidInputError, ["PTV"], "Unknown plan set-up keys", setup={"beams": 5})
        refused(StructureError, ["PTV"], "Lung", objectives=[{"structure": "Lung", "kind": "mean_dose",
                                                              "dose_gy": 10.0, "weight": 1.0}])
        # Pretend the machine has 1 MiB free: the dose-influence matrix is refused before it is computed.
        with mock.patch.object(engine, "_available_bytes", return_value=2**20):
            refused(InvalidInputError, ["PTV"], "would not fit in memory")
        self.delayDisplay("Test passed")

    def test_PlanCancelled(self):
        """A cancelled token (before or during planning) raises CancelledError and leaves the scene unchanged."""
        from twinrt.progress import CancelledError, CancelToken

        self.delayDisplay("Planning: cancel")
        logic = self.logicClass()
        created = self.loadPlanningPhantom()
        before = self.sceneState(slicer.mrmlScene)
        token = CancelToken()
        token.cancel()
        with self.assertRaises(CancelledError):
            logic.createPlan(created["ct"], created["segmentation"], ["PTV"], 60.0, 30, self.planSetup(),
                             cancel=token)
        self.assertEqual(self.sceneState(slicer.mrmlScene), before)

        # Cancelled by the user while the dose-influence matrix is computed (what the Widget's Cancel does).
        token = CancelToken()

        def cancelDuringDij(fraction: float, text: str) -> None:
            if fraction > 0.1:
                token.cancel()

        with self.assertRaises(CancelledError):
            logic.createPlan(created["ct"], created["segmentation"], ["PTV"], 60.0, 30, self.planSetup(),
                             progress=cancelDuringDij, cancel=token)
        self.assertEqual(self.sceneState(slicer.mrmlScene), before)
        self.delayDisplay("Test passed")

    # A goal file for the phantom (the shipped sets name head-and-neck organs it lacks).
    PHANTOM_GOALS = {"name": "phantom", "version": 1, "site": "phantom", "sources": {"test": "TwinRT test"},
                     "prescriptions": [{"target": "PTV", "dose_gy": 60.0, "fractions": 30}],
                     "goals": [{"structure": "PTV", "metric": "D95%", "comparator": ">=", "value": 57.0, "unit": "Gy",
                                "priority": "must", "source": "test"},
                               {"structure": "Organ", "metric": "Dmean", "comparator": "<=", "value": 30.0,
                                "unit": "Gy",
                                "priority": "should", "source": "test"}]}

    def assertAuditLog(self, studyItem, minimumEntries: int):
        """The study's audit log verifies and holds at least ``minimumEntries`` entries; returns it."""
        from TwinRTCommon import mrmlio

        log = mrmlio.studyAuditLog(studyItem, slicer.mrmlScene)
        log.verify()
        self.assertGreaterEqual(len(log), minimumEntries)
        return log

    def assertExportedApproval(self, logic, planNode, status: str, reviewer: str):
        """Export the plan as RTPLAN and check its ApprovalStatus and ReviewerName."""
        import tempfile

        import pydicom

        with tempfile.TemporaryDirectory() as folder:
            files = logic.exportPlanDicom(planNode, Path(folder) / "plan", include=("rtplan",))
            dataset = pydicom.dcmread(files["rtplan"][0])
            self.assertEqual(dataset.ApprovalStatus, status)
            if reviewer:
                self.assertEqual(str(dataset.ReviewerName), reviewer)
            else:
                self.assertNotIn("ReviewerName", dataset)

    def test_AgentReviewPhantom(self):
        """Agent plan on the phantom: goals table, proposed state, feedback, review refused without a name, reject."""
        import tempfile

        from twinrt.errors import InvalidInputError
        from twinrt.planning.approval import HumanReviewRequiredError, InvalidTransitionError
        from twinrt.planning.conversation import Clarification

        from AIPlannerLib import agentRecord
        from TwinRTCommon import mrmlio

        self.delayDisplay("Planning agent: phantom")
        logic = self.logicClass()
        created = self.loadPlanningPhantom()
        with tempfile.TemporaryDirectory() as folder:
            goalFile = Path(folder) / "phantom.json"
            goalFile.write_text(json.dumps(self.PHANTOM_GOALS))
            plan = logic.createAgentPlan(created["ct"], created["segmentation"], "PTV", 60.0, 30, str(goalFile),
                                         self.planSetup(), maxRounds=2)
            beams, study = plan["beamsTable"], plan["studyItem"]
            rows = mrmlio.tableToRows(plan["goalsTable"])
            self.assertEqual([(r["structure"], r["metric"]) for r in rows], [("PTV", "D95%"), ("Organ", "Dmean")])
            self.assertTrue(all(r["passed"] in ("pass", "fail") for r in rows))
            self.assertEqual(plan["goalsTable"].GetAttribute(agentRecord.GOAL_SET_ATTRIBUTE), str(goalFile))
            trace = json.loads(beams.GetAttribute(agentRecord.AGENT_TRACE_ATTRIBUTE))
            self.assertEqual(trace["rounds"], plan["agentResult"].rounds)
            self.assertEqual(beams.GetAttribute(planRecord.ENGINE_ID_ATTRIBUTE), agentRecord.AGENT_ENGINE_ID)
            self.assertEqual(logic.storedPlan(beams).state, "proposed")
            self.assertEqual([h["state"] for h in logic.planHistory(study)], ["proposed"])
            log = self.assertAuditLog(study, 2)
            self.assertEqual([e["kind"] for e in log.entries][-2:], ["ai_action", "proposal"])

            # Unknown structure: a question back, logged, nothing to apply.
            interpretation = logic.submitFeedback(beams, "spare the kidney", author="Dr^Test")
            self.assertIsInstance(interpretation, Clarification)
            self.assertIn("kidney", logic.feedbackReply(beams, interpretation))
            with self.assertRaises(InvalidInputError):
                logic.applyFeedback(beams, interpretation)
            self.assertEqual(self.assertAuditLog(study, 4).entries[-2]["actor"], "Dr^Test")

            # Feedback applied: version 2, from version 1.
            interpretation = logic.submitFeedback(beams, "keep the organ mean under 25 Gy")
            self.assertTrue(interpretation.needs_confirmation)
            second = logic.applyFeedback(beams, interpretation)
            history = logic.planHistory(study)
            self.assertEqual([h["version"] for h in history], [1, 2])
            self.assertEqual(history[1]["parent"], 1)
            goals = json.loads(second["goalsTable"].GetAttribute(agentRecord.GOALS_ATTRIBUTE))
            self.assertIn(("Organ", "Dmean", 25.0), [(g["structure"], g["metric"], g["value"]) for g in goals])
            self.assertEqual(len(mrmlio.tableToRows(logic.historyTable(study))), 2)

            # A delivery request with a limit: smoother fluence in the set-up, fewer MU, the limit checked.
            from twinrt.planning.evaluation import deliverability

            muBefore = deliverability(second["planningResult"].plan)["total_mu"]
            interpretation = logic.submitFeedback(second["beamsTable"], f"keep MU under {muBefore - 1:.0f}")
            self.assertIn("monitor units", logic.feedbackReply(second["beamsTable"], interpretation))
            third = logic.applyFeedback(second["beamsTable"], interpretation)
            newSetup = json.loads(third["beamsTable"].GetAttribute(planRecord.PLAN_SETUP_ATTRIBUTE))
            self.assertGreater(newSetup["smoothness_weight"], 0.0)
            check = third["deliveryCheck"]
            self.assertEqual((check["aspect"], check["limit"]), ("mu", float(f"{muBefore - 1:.0f}")))
            self.assertLess(check["value"], muBefore)
            self.assertEqual(check["met"], check["value"] <= check["limit"])
            self.assertIn("Delivery limit", self.assertAuditLog(study, 1).entries[-1]["message"])
            self.assertEqual([h["version"] for h in logic.planHistory(study)], [1, 2, 3])

        # No reviewer, or the AI as reviewer: refused, nothing changes.
        before = self.sceneState(slicer.mrmlScene)
        for name in ("", "  ", "TwinRT AI"):
            with self.assertRaises(HumanReviewRequiredError):
                logic.approvePlan(beams, name)
            with self.assertRaises(HumanReviewRequiredError):
                logic.rejectPlan(beams, name, "too hot")
        with self.assertRaises(InvalidInputError):
            logic.rejectPlan(beams, "Dr^Test", "")
        self.assertEqual(self.sceneState(slicer.mrmlScene), before)
        self.assertExportedApproval(logic, beams, "UNAPPROVED", "")

        rejected = logic.rejectPlan(beams, "Dr^Test", "organ too hot")
        self.assertEqual((rejected.state, rejected.approval), ("rejected", "REJECTED"))
        with self.assertRaises(InvalidTransitionError):
            logic.approvePlan(beams, "Dr^Test")
        self.assertEqual([h["state"] for h in logic.planHistory(study)], ["rejected", "proposed", "proposed"])
        self.assertExportedApproval(logic, beams, "REJECTED", "Dr^Test")
        self.assertEqual(self.assertAuditLog(study, 1).entries[-1]["kind"], "rejection")
        self.delayDisplay("Test passed")

    def test_AgentLoopSamplePatient(self):
        """The full loop on the sample patient: agent plan, feedback, a question, a new version, approve and reject."""
        from twinrt.planning.approval import HumanReviewRequiredError
        from twinrt.planning.conversation import GoalEdit, Question
        from twinrt.planning.evaluation import load_goal_set
        from twinrt.planning.workflow import PlanSetup

        from TwinRTCommon import mrmlio

        self.delayDisplay("Planning agent: sample patient")
        logic = self.logicClass()
        loaded = logic.loadSampleCase()
        # Coarse on purpose (5 beams, 10 mm bixels, 5 mm dose grid, few iterations): the loop, not
        # the plan quality, is tested here; the bench measures quality.
        setup = PlanSetup.equispaced(5, 0.0, bixel_width_mm=10.0, dose_grid_mm=5.0, max_iter=20)
        plan = logic.createAgentPlan(loaded["ct"], loaded["segmentation"], "PTV70, PTV63, PTV56", 70.0, 35,
                                     "head_and_neck_openkbp", setup, maxRounds=2, roundIterations=10)
        beams, study = plan["beamsTable"], plan["studyItem"]
        self.assertEqual(len(mrmlio.tableToRows(plan["goalsTable"])), len(load_goal_set("head_and_neck_openkbp").goals))
        self.assertEqual(logic.storedPlan(beams).state, "proposed")
        entries = len(self.assertAuditLog(study, 2))
        self.assertIn("ai_action", [e["kind"] for e in mrmlio.studyAuditLog(study).entries])

        interpretation = logic.submitFeedback(beams, "keep the left parotid mean under 30 Gy")
        self.assertIsInstance(interpretation, GoalEdit)
        self.assertIn("LeftParotid", interpretation.confirmation_text())
        self.assertIn("30", interpretation.confirmation_text())
        question = logic.submitFeedback(beams, "why is the cord so high?")
        self.assertIsInstance(question, Question)
        self.assertIn("SpinalCord", logic.feedbackReply(beams, question))
        second = logic.applyFeedback(beams, interpretation)
        self.assertEqual([h["version"] for h in logic.planHistory(study)], [1, 2])
        self.assertGreater(len(self.assertAuditLog(study, entries + 4)), entries + 4)

        # Approval needs a person's name; without one nothing changes.
        before = self.sceneState(slicer.mrmlScene)
        with self.assertRaises(HumanReviewRequiredError):
            logic.approvePlan(second["beamsTable"], "")
        self.assertEqual(self.sceneState(slicer.mrmlScene), before)
        approved = logic.approvePlan(second["beamsTable"], "Dr^Test", "ok for research")
        self.assertEqual((approved.state, approved.approval, approved.reviewer_name),
                         ("approved", "APPROVED", "Dr^Test"))
        self.assertExportedApproval(logic, second["beamsTable"], "APPROVED", "Dr^Test")
        logic.rejectPlan(beams, "Dr^Test", "superseded by version 2")
        self.assertExportedApproval(logic, beams, "REJECTED", "Dr^Test")
        self.assertEqual([h["state"] for h in logic.planHistory(study)], ["rejected", "approved"])
        self.assertEqual([e["kind"] for e in self.assertAuditLog(study, 1).entries][-2:], ["approval", "rejection"])
        self.delayDisplay("Test passed")
