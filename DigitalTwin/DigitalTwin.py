"""DigitalTwin: a per-fraction digital twin of the treatment course (research use only).

Issue 7 built the twin. The Logic reads the planning CT, structures and planned dose from the scene,
builds :class:`twinrt.twin.twin.DigitalTwin` and feeds it fractions: simulated ones
(:class:`twinrt.twin.simulator.CourseSimulator`), today's image from the scene, or a course folder of
DICOM studies. Each accepted fraction is registered to the planning anatomy, its dose mapped back and
accumulated; the scene then shows the fractions as sequences (image, dose on the planning anatomy,
accumulated BED) in one sequence browser, the accumulated physical dose as a dose volume, planned
versus delivered goal tables and charts, the tumour-volume trajectory with its credible band, and, on
request, the comparison of the remaining regimens. A fraction the twin refuses (another patient, a
failed or folding registration) raises ``FractionRefusedError`` and changes nothing.
This file follows Slicer's scripted-module template (Utilities/Templates/Modules/Scripted):
DigitalTwin (module descriptor), DigitalTwinParameterNode, DigitalTwinWidget (thin: binds the .ui and calls
the Logic), DigitalTwinLogic (all computation, batch-capable) and DigitalTwinTest (runs headless too).
"""

import datetime
from typing import Annotated, Any, Optional

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper, WithinRange

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from DigitalTwinLib import twinScene

from TwinRTCommon.logic import CaseLogicMixin, checkCtVolume, checkDoseVolume, checkSegmentation
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
        # Core modules only: the sequences and their browser are Slicer's Sequences module.
        self.parent.dependencies = ["Segmentations", "SubjectHierarchy", "Sequences"]
        self.parent.contributors = ["TwinRT contributors"]
        self.parent.helpText = _("""
<b>Research use only, not for clinical decisions.</b><br>
Follows the treatment course fraction by fraction: each fraction's image is registered to the planning
CT, its dose is mapped back to the planning anatomy and accumulated (physical dose, BED, EQD2). The
fractions are kept as sequences indexed by fraction (image, dose, accumulated BED) for review and for
ToxicityMonitor; tables and charts compare the planned and delivered goals, follow the tumour volume
with its 90 % credible band, and compare what-if regimens for the remaining fractions.
<br><i>Simulate course</i> makes a documented simulated course from the plan; <i>Add fraction</i>
takes today's image. A fraction of another patient, or whose registration fails or folds, is refused
with the reason and nothing already stored changes.
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
    inputSegmentation - the planning structures (referencing the CT).
    inputDose - planned dose (a dose volume, Gy).
    fractions - number of fractions in the course.
    startDate - date of the first fraction (YYYY-MM-DD); empty: today.
    fractionVolume - today's fraction image (CT or CBCT of the same patient).
    fractionNumber - its fraction number (0: the next one).
    fractionDate - its date (YYYY-MM-DD); empty: today.
    fractionPetVolume - optional PET of that day (SUVbw, same frame of reference).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    inputDose: vtkMRMLScalarVolumeNode
    fractions: Annotated[int, WithinRange(1, 100)] = 35
    startDate: str = ""
    fractionVolume: vtkMRMLScalarVolumeNode
    fractionNumber: Annotated[int, WithinRange(0, 100)] = 0
    fractionDate: str = ""
    fractionPetVolume: vtkMRMLScalarVolumeNode


#
# DigitalTwinWidget
#


class DigitalTwinWidget(CaseModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui to the parameter node and calls the Logic; holds no computation.

    The parameter-node and scene plumbing and the Load sample / Import DICOM buttons come from
    :class:`TwinRTCommon.widget.CaseModuleWidgetMixin`; this class adds the course (Apply simulates
    it), today's fraction, the what-if regimens and the timeline list.
    Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setup(self) -> None:
        """Load the .ui and connect it; cheap and without prompts (the generic test builds it)."""
        ScriptedLoadableModuleWidget.setup(self)
        self.setupCaseModule(DigitalTwinLogic())
        self.ui.addFractionButton.connect("clicked(bool)", self.onAddFractionButton)
        self.ui.regimensButton.connect("clicked(bool)", self.onRegimensButton)

    # Apply (simulate the course) needs the plan: CT, structures and planned dose.
    applyRequires = ("inputVolume", "inputSegmentation", "inputDose")
    applyReadyToolTip = _("Simulate the treatment course from the plan and follow it with the digital twin.")
    applyMissingToolTip = _("Select the planning CT, its structures and the planned dose.")

    def preselectInputs(self, parameters) -> None:
        """The scene's CT, the structures referencing it and, when there is only one, its dose."""
        super().preselectInputs(parameters)
        if parameters.inputVolume and not parameters.inputSegmentation:
            parameters.inputSegmentation = self.logic.findSegmentation(parameters.inputVolume)

    def onApplyButton(self) -> None:
        """Simulate the course and show it."""
        with slicer.util.tryWithErrorDisplay(_("Failed to simulate the treatment course."), waitCursor=True):
            parameters = self._parameterNode
            result = self.logic.simulateCourse(parameters.inputVolume, parameters.inputDose, parameters.fractions,
                                               segmentation=parameters.inputSegmentation,
                                               startDate=parameters.startDate or None)
            self.showResult(result)

    def onAddFractionButton(self) -> None:
        """Give today's fraction image to the twin; a refusal is shown with its reason."""
        with slicer.util.tryWithErrorDisplay(_("The digital twin did not take the fraction."), waitCursor=True):
            parameters = self._parameterNode
            result = self.logic.addFraction(parameters.fractionVolume, parameters.fractionNumber or None,
                                            parameters.fractionDate or None, petVolume=parameters.fractionPetVolume)
            self.showResult(result)

    def onRegimensButton(self) -> None:
        """Compare the what-if regimens for the remaining fractions."""
        with slicer.util.tryWithErrorDisplay(_("Failed to compare regimens."), waitCursor=True):
            result = self.logic.compareRegimens()
            self.ui.timelineLabel.text = self.logic.timelineText() + "\n" + _("Best regimen (P+): {name}").format(
                name=result["best"])

    def showResult(self, result: dict) -> None:
        """Timeline and warnings in the panel; the tumour chart in the plot view."""
        self.ui.timelineLabel.text = self.logic.timelineText()
        self.ui.warningsLabel.text = "\n".join(result["warnings"]) or _("No warnings.")
        chart = result.get("tumourChart")
        if chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(chart)


#
# DigitalTwinLogic
#


class DigitalTwinLogic(ScriptedLoadableModuleLogic, CaseLogicMixin):
    """All computation of DigitalTwin; usable without the GUI (batch mode, tests).

    Loading a case (``importCase``, ``loadSampleCase``, ``caseToScene``, ``sceneToCase``) comes from
    :class:`TwinRTCommon.logic.CaseLogicMixin`, so every module shares the one MRML contract. The twin
    is :class:`twinrt.twin.twin.DigitalTwin` (kept in :attr:`twin`); this class builds it from the
    scene, gives it fractions and writes what it found back (:mod:`DigitalTwinLib.twinScene`).
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    # The digital twin (issue 7) is built: nothing of this module is pending.
    stageName = "the digital twin"
    stageIssue = None

    #: Goal set the twin evaluates planned versus delivered against (a shipped name or a .json path).
    defaultGoalSet = "head_and_neck_openkbp"
    #: Credible level of the tumour-volume band.
    credibleLevel = 0.9

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        #: The core twin (:class:`twinrt.twin.twin.DigitalTwin`), None until one is built or loaded.
        self.twin = None
        #: The course simulator of :meth:`simulateCourse` (its truth is there for tests and benchmarks).
        self.simulator = None
        #: The patient's study item, where every output goes.
        self.studyItem = 0
        #: The scene the outputs are in.
        self.scene = None
        #: The goal plotted over the fractions ("" : the first goal of the goal set).
        self.plottedGoal = ""
        #: Warnings of the last update.
        self.warnings: list[str] = []
        self._goals: list[dict] = []

    def getParameterNode(self):
        return DigitalTwinParameterNode(super().getParameterNode())

    def stageStatusText(self) -> str:
        """The panel's status: the twin is available, for research use only."""
        return _("Digital twin available: simulated or real fractions, accumulated dose and BED, tumour response "
                 "and what-if regimens. Research use only, not for clinical decisions.")

    # ------------------------------------------------------------------------------------- building
    @staticmethod
    def _today() -> str:
        return datetime.date.today().isoformat()

    def _planningCase(self, ctVolume, segmentation, doseVolume):
        """The planning case from the scene and the key of the planned dose in it."""
        from TwinRTCommon import mrmlio

        checkCtVolume(ctVolume, _("planning CT"))
        checkDoseVolume(doseVolume)
        if segmentation is None:
            segmentation = self.findSegmentation(ctVolume)
        checkSegmentation(segmentation, ctVolume)
        case = self.sceneToCase(ctVolume.GetScene(), ctVolume, segmentation)
        key = doseVolume.GetAttribute(mrmlio.DOSE_NAME_ATTRIBUTE) or doseVolume.GetName()
        if key not in case.doses:
            # A dose of another study (or one sceneToCase did not pick up): read it as it is, in Gy.
            case.doses[key] = mrmlio.doseFromVolume(doseVolume, key)
        return case, key

    def _studyFor(self, ctVolume, patientId: str) -> int:
        """The CT's study; a CT outside any study (loaded from a file) gets one for the twin's outputs."""
        from TwinRTCommon import mrmlio

        study = mrmlio.studyItemOf(ctVolume)
        if study:
            return study
        sh = ctVolume.GetScene().GetSubjectHierarchyNode()
        patient = sh.CreateSubjectItem(sh.GetSceneItemID(), patientId)
        study = sh.CreateStudyItem(patient, "TwinRT digital twin")
        mrmlio.placeInStudy(ctVolume, study)
        return study

    def _ensureTumour(self, case, tumourName: str) -> list[str]:
        """Add the documented GTV proxy when the case has no tumour; a warning when that is impossible."""
        from twinrt.errors import InvalidInputError
        from twinrt.twin.simulator import ensure_tumour

        try:
            ensure_tumour(case, tumourName)
        except InvalidInputError as exc:
            return [_("No tumour volume is followed: {reason}").format(reason=exc)]
        proxy = case.metadata.get("tumour_proxy")
        return [str(proxy)] if proxy else []

    def buildTwin(self, ctVolume, segmentation, doseVolume, nFractions: int, startDate: Optional[str] = None,
                  tumourName: str = "GTV", goalSet: Optional[str] = None) -> Any:
        """Build the twin of the plan in the scene; it then takes fractions (:meth:`addFraction`).

        Outputs of an earlier twin of the same study are replaced by the new, empty, course.

        :param ctVolume: the planning CT (``vtkMRMLScalarVolumeNode``, HU).
        :param segmentation: its structures (``vtkMRMLSegmentationNode`` referencing the CT); None: the
            one referencing the CT.
        :param doseVolume: the planned whole-course dose (``DicomRtImport.DoseVolume``), Gy.
        :param nFractions: fractions in the course, >= 1.
        :param startDate: date of the first fraction (YYYY-MM-DD); default today.
        :param tumourName: the structure whose volume is followed; a case without it gets the documented
            proxy (the highest-dose PTV eroded by 5 mm, :func:`twinrt.twin.simulator.ensure_tumour`).
        :param goalSet: goal set for planned versus delivered (default :attr:`defaultGoalSet`).
        :return: the core :class:`twinrt.twin.twin.DigitalTwin`.
        :raises InvalidInputError: wrong inputs (no dose volume, no structures, fewer than 1 fraction,
            a bad date, structures the goal set needs are missing); the scene is then unchanged.
        """
        from twinrt.errors import InvalidInputError
        from twinrt.twin.timeline import CaseTimeline

        if int(nFractions) < 1:
            raise InvalidInputError(_("A treatment course needs at least one fraction"))
        case, key = self._planningCase(ctVolume, segmentation, doseVolume)
        warnings = self._ensureTumour(case, tumourName)
        goalSet = goalSet or self.defaultGoalSet
        timeline = CaseTimeline(case, key, int(nFractions), startDate or self._today(), tumourName,
                                metadata={"source": "scene", "goal_set": goalSet})
        self._setTwin(self._newTwin(timeline), self._studyFor(ctVolume, case.patient_id), ctVolume.GetScene())
        result = self._updateScene([])
        self.warnings = warnings + result["warnings"]
        return self.twin

    def _newTwin(self, timeline):
        from twinrt.twin.twin import DigitalTwin, TwinSettings

        return DigitalTwin(timeline, TwinSettings(goal_set=timeline.metadata.get("goal_set") or self.defaultGoalSet))

    def _setTwin(self, twin, studyItem: int, scene) -> None:
        """Make ``twin`` this Logic's twin, writing into ``studyItem`` of ``scene``; outputs of an earlier
        twin of the study are removed."""
        twinScene.removeOutputs(scene, studyItem)
        self.twin, self.studyItem, self.scene = twin, studyItem, scene
        self.plottedGoal = ""
        self._goals = []

    def _requireTwin(self):
        from twinrt.errors import InvalidInputError

        if self.twin is None:
            raise InvalidInputError(_("There is no digital twin yet: simulate a course, build the twin from the "
                                      "plan, import a course or load a timeline first"))
        return self.twin

    # ------------------------------------------------------------------------------------- fractions
    def simulateCourse(self, ctVolume, doseVolume, fractions: int, segmentation=None, seed: int = 0,
                       upTo: Optional[int] = None, startDate: Optional[str] = None, tumourName: str = "GTV",
                       goalSet: Optional[str] = None, progress=None) -> dict[str, Any]:
        """Simulate a treatment course from the plan in the scene and feed its fractions to a new twin.

        The simulator (:class:`twinrt.twin.simulator.CourseSimulator`, documented there) moves the
        planning anatomy day by day (set-up error, weight loss, soft-tissue deformation, tumour response
        with known parameters) and delivers the planned dose per fraction; the twin then has to recover
        the accumulated dose and the tumour response. It is kept in :attr:`simulator`.

        :param ctVolume: the planning CT; :param doseVolume: the planned dose (a dose volume, Gy).
        :param fractions: fractions in the course (the simulator needs at least 2).
        :param segmentation: the planning structures; None: the segmentation referencing the CT.
        :param seed: random seed of the simulated course (same seed, same course).
        :param upTo: simulate only the first ``upTo`` fractions (default: the whole course).
        :param startDate: date of fraction 1 (YYYY-MM-DD); default today.
        :param tumourName: the tumour followed (a proxy is added when the case has none).
        :param goalSet: goal set for planned versus delivered.
        :param progress: optional ``progress(fraction, text)``.
        :return: the outputs (see :meth:`_updateScene`), with ``updates`` (one
            :class:`~twinrt.twin.twin.FractionUpdate` per fraction) and ``warnings``.
        :raises InvalidInputError: missing or wrong inputs; the scene is then unchanged.
        :raises FractionRefusedError: a simulated fraction was refused (e.g. a failed registration); the
            fractions accepted before it are in the scene.
        """
        from twinrt.errors import InvalidInputError
        from twinrt.progress import report
        from twinrt.twin.simulator import CourseSettings, CourseSimulator
        from twinrt.twin.twin import FractionRefusedError

        checkCtVolume(ctVolume, _("planning CT"))
        checkDoseVolume(doseVolume)
        if int(fractions) < 1:
            raise InvalidInputError(_("A treatment course needs at least one fraction"))
        case, key = self._planningCase(ctVolume, segmentation, doseVolume)
        settings = CourseSettings(n_fractions=int(fractions), start_date=startDate or self._today(), seed=int(seed))
        report(progress, 0.0, "Preparing the simulated course")
        simulator = CourseSimulator(case, key, settings)  # adds the GTV proxy when the case has none
        timeline = simulator.timeline()
        timeline.metadata["goal_set"] = goalSet or self.defaultGoalSet
        twin = self._newTwin(timeline)
        count = int(fractions) if upTo is None else max(0, min(int(upTo), int(fractions)))
        updates, refused = [], None
        for number in range(1, count + 1):
            report(progress, 0.05 + 0.85 * (number - 1) / max(count, 1), f"Fraction {number} of {count}")
            try:
                updates.append(twin.add_fraction(simulator.fraction(number).fraction))
            except FractionRefusedError as exc:
                refused = exc
                break
        self.simulator = simulator
        self._setTwin(twin, self._studyFor(ctVolume, case.patient_id), ctVolume.GetScene())
        report(progress, 0.9, "Writing the course to the scene")
        result = self._updateScene(updates, [str(case.metadata["tumour_proxy"])]
                                   if case.metadata.get("tumour_proxy") else [])
        report(progress, 1.0, "Course simulated")
        if refused is not None:
            raise refused
        return result

    def addFraction(self, imageVolume, number: Optional[int] = None, date: Optional[str] = None,
                    segmentation=None, doseVolume=None, progress=None, petVolume=None) -> dict[str, Any]:
        """Give today's fraction to the twin: register, map the dose back, accumulate, update the outputs.

        :param imageVolume: the day's CT or CBCT (HU); its patient is read from the subject hierarchy
            (``DICOM.PatientID`` of its patient item) or its ``TwinRT.PatientID`` attribute, its frame of
            reference from ``DigitalTwin.FrameOfReferenceUID`` or its study's case metadata.
        :param number: fraction number (default: the next one).
        :param date: its date, YYYY-MM-DD (default today).
        :param segmentation: structures drawn on the day's image (default: one referencing it, if any);
            the tumour's volume feeds the response model.
        :param doseVolume: the dose delivered that day (a dose volume, Gy); default: the planned dose per
            fraction, fixed in the room.
        :param progress: optional ``progress(fraction, text)``.
        :param petVolume: a PET of that day in SUVbw (as Slicer's PET-DICOM extension loads it), in the
            day's image's frame of reference (a PET/CT); ToxicityMonitor computes ``pet_`` features from it.
        :return: the outputs (see :meth:`_updateScene`), with ``updates`` and ``warnings``.
        :raises FractionRefusedError: the twin refuses the fraction (another patient or frame of
            reference, out of order, a failed or folding registration); the reason is the message and
            neither the twin nor the scene changed.
        :raises InvalidInputError: no twin yet, or an input that is not a volume.
        """
        from twinrt.twin.twin import FractionRefusedError

        twin = self._requireTwin()
        fraction = self.fractionFromScene(imageVolume, number, date, segmentation, doseVolume, petVolume)
        try:
            update = twin.add_fraction(fraction, progress)
        except FractionRefusedError as exc:
            # Re-raised as is: it is typed, carries the fraction number, and nothing was stored.
            self.log(f"DigitalTwin: fraction refused: {exc}")
            raise
        return self._updateScene([update])

    def patientOfVolume(self, volumeNode) -> tuple[str, str]:
        """``(patient ID, frame of reference UID)`` of a volume from the subject hierarchy and its attributes."""
        import json

        from TwinRTCommon import mrmlio

        scene = volumeNode.GetScene()
        sh = scene.GetSubjectHierarchyNode()
        constants = slicer.vtkMRMLSubjectHierarchyConstants
        patientId, frame = "", volumeNode.GetAttribute(twinScene.FRAME_OF_REFERENCE_ATTRIBUTE) or ""
        item = sh.GetItemByDataNode(volumeNode)
        patient = sh.GetItemAncestorAtLevel(item, constants.GetDICOMLevelPatient()) if item else 0
        if patient:
            patientId = sh.GetItemAttribute(patient, constants.GetDICOMPatientIDAttributeName()) or \
                sh.GetItemName(patient)
        patientId = patientId or volumeNode.GetAttribute(mrmlio.PATIENT_ID_ATTRIBUTE) or ""
        study = mrmlio.studyItemOf(volumeNode)
        if not frame and study:
            try:
                metadata = json.loads(sh.GetItemAttribute(study, mrmlio.CASE_METADATA_ATTRIBUTE) or "{}")
            except json.JSONDecodeError:
                metadata = {}
            frame = str(metadata.get("frame_of_reference_uid", "") or "")
        return patientId, frame

    def fractionFromScene(self, imageVolume, number: Optional[int] = None, date: Optional[str] = None,
                          segmentation=None, doseVolume=None, petVolume=None):
        """Today's :class:`twinrt.twin.timeline.Fraction` read from scene nodes (see :meth:`addFraction`)."""
        from twinrt.errors import InvalidInputError
        from twinrt.model import Image
        from twinrt.twin.timeline import Fraction, pet_mismatch

        from TwinRTCommon import mrmlio

        twin = self._requireTwin()
        checkCtVolume(imageVolume, _("fraction image"))
        image = mrmlio.imageFromVolume(imageVolume)
        if segmentation is None:
            segmentation = self.findSegmentation(imageVolume)
        structures = []
        if segmentation is not None:
            checkSegmentation(segmentation, imageVolume)
            structures = mrmlio.structuresFromSegmentation(segmentation, imageVolume)
        dose = None
        if doseVolume is not None:
            checkDoseVolume(doseVolume)
            dose = mrmlio.doseFromVolume(doseVolume)
        patientId, frame = self.patientOfVolume(imageVolume)
        pet = None
        if petVolume is not None:
            checkCtVolume(petVolume, _("PET volume"))
            problem = pet_mismatch(*self.patientOfVolume(petVolume), patientId, frame)
            if problem:
                raise InvalidInputError(f"The PET '{petVolume.GetName()}' does not go with this fraction: {problem}; "
                                        "select the PET of that day's PET/CT")
            petImage = mrmlio.imageFromVolume(petVolume)
            pet = Image(petImage.array.astype("float32"), petImage.grid, "PT")
        return Fraction(int(number) if number else twin.delivered + 1, date or self._today(), image, structures,
                        dose, patientId, frame, {"source": "scene", "image": imageVolume.GetName(),
                                                 **({"pet": petVolume.GetName()} if petVolume is not None else {})},
                        pet)

    # ------------------------------------------------------------------------------------- files
    def saveTimeline(self, folder) -> str:
        """Save the twin's course (planning case, fractions, what the twin derived) into ``folder``.

        :param folder: a new or empty folder, or a timeline folder saved before (replaced atomically).
        :return: the folder.
        """
        return str(self._requireTwin().timeline.save(folder))

    def loadTimeline(self, folder, scene=None) -> dict[str, Any]:
        """Load a saved course: its planning case goes into the scene, the twin continues where it stopped.

        :param folder: a folder written by :meth:`saveTimeline`.
        :param scene: the MRML scene; default ``slicer.mrmlScene``.
        :return: the outputs (see :meth:`_updateScene`).
        :raises MissingInputError: not a timeline folder; :raises InvalidInputError: damaged or another format.
        """
        from twinrt.twin.timeline import CaseTimeline

        timeline = CaseTimeline.load(folder)
        twin = self._newTwin(timeline)
        # The reloaded twin has no posterior yet: calibrate on the stored tumour volumes.
        twin.calibrate_response()
        created = self.caseToScene(timeline.planning, scene, doseName=timeline.planned_dose, computeDvh=False)
        self._setTwin(twin, created["studyItem"], created["ct"].GetScene())
        return {**self._updateScene([]), "planning": created}

    def importCourse(self, folder, nFractions: Optional[int] = None, plannedDose: Optional[str] = None,
                     tumourName: str = "GTV", startDate: Optional[str] = None, goalSet: Optional[str] = None,
                     scene=None, progress=None) -> dict[str, Any]:
        """Import a course folder of DICOM studies (plan + one study per fraction) and run the twin over it.

        The layout is :mod:`twinrt.twin.course_dicom`'s. Fractions are given in order; the first one the
        twin refuses (another patient, a failed registration) stops the import, and its reason is the
        first warning. What was accepted before it stays.

        :param folder: the course folder.
        :param nFractions: fractions in the course (default: the plan's prescription).
        :param plannedDose: the plan folder's dose to use (default: its only dose).
        :param tumourName: the tumour followed; :param startDate: course start (default: first fraction).
        :param goalSet: goal set; :param scene: the scene; :param progress: ``progress(fraction, text)``.
        :return: the outputs (see :meth:`_updateScene`) with ``planning`` (the created case nodes) and
            ``refused`` (the refusal message, or "").
        """
        from twinrt.progress import report
        from twinrt.twin.course_dicom import import_course
        from twinrt.twin.twin import FractionRefusedError

        timeline, fractions = import_course(folder, nFractions, plannedDose, tumourName, startDate)
        warnings = self._ensureTumour(timeline.planning, tumourName)
        timeline.metadata["goal_set"] = goalSet or self.defaultGoalSet
        twin = self._newTwin(timeline)
        updates, refused = [], ""
        for index, fraction in enumerate(fractions):
            report(progress, 0.9 * index / max(len(fractions), 1), f"Fraction {fraction.number}")
            try:
                updates.append(twin.add_fraction(fraction))
            except FractionRefusedError as exc:
                refused = str(exc)
                break
        created = self.caseToScene(timeline.planning, scene, doseName=timeline.planned_dose, computeDvh=False)
        self._setTwin(twin, created["studyItem"], created["ct"].GetScene())
        result = self._updateScene(updates, ([refused] if refused else []) + warnings)
        report(progress, 1.0, "Course imported")
        return {**result, "planning": created, "refused": refused}

    # ------------------------------------------------------------------------------------- what-if
    def compareRegimens(self, organs=None, seed: int = 0) -> dict[str, Any]:
        """Compare keep / boost / de-escalate for the remaining fractions (TCP against NTCP per organ).

        :param organs: organs at risk to score (default: every organ with an LKB parameter set).
        :param seed: random seed of the posterior draws.
        :return: ``table`` (the regimen table: regimen, fractions and dose left, TCP with its credible
            interval, NTCP per organ, P+), ``comparison`` (the core's ``RegimenComparison``) and ``best``
            (the regimen with the highest P+).
        :raises InvalidInputError: no twin, too few tumour observations, or the course is complete.
        """
        from TwinRTCommon import mrmlio

        twin = self._requireTwin()
        comparison = twin.compare_regimens(organs, seed)
        patientId = twin.timeline.patient_id
        with mrmlio.sceneTransaction(self.scene):
            table = twinScene.setTableRows(self.scene, self.studyItem, twinScene.ROLE_REGIMENS_TABLE, "Regimens",
                                           twinScene.regimenRows(comparison), patientId, {"fractions_left": ""})
            table.SetAttribute(twinScene.FRACTIONS_ATTRIBUTE, str(twin.delivered))
        best = comparison.best().name
        self.log(f"DigitalTwin: regimens compared after fraction {twin.delivered}; best P+: {best}")
        return {"table": table, "comparison": comparison, "best": best}

    def setPlottedGoal(self, goal: str) -> None:
        """Plot ``goal`` (a goal key of the planned versus delivered table) over the fractions.

        :raises InvalidInputError: no such goal.
        """
        from twinrt.errors import InvalidInputError

        self._requireTwin()
        keys = [row["goal"] for row in self._goals]
        if goal not in keys:
            raise InvalidInputError(_("No goal '{goal}'; choose one of: {goals}").format(goal=goal,
                                                                                      goals=", ".join(keys)))
        self.plottedGoal = goal
        self._updateGoalChart()

    def timelineText(self) -> str:
        """One line per fraction taken (date, registration quality, tumour volume), for the panel."""
        if self.twin is None:
            return _("No course yet.")
        lines = [_("Course: {delivered} of {total} fractions, started {start}").format(
            delivered=self.twin.delivered, total=self.twin.n_fractions, start=self.twin.timeline.start_date)]
        for record in self.twin.timeline.records:
            quality = record.registration
            tumour = "" if record.tumour_volume_cc is None else f", tumour {record.tumour_volume_cc:.1f} cc"
            lines.append(f"{record.number}: {record.date}, correlation {quality.get('correlation_final', float('nan')):.2f}, "
                         f"Jacobian {quality.get('jacobian_min', float('nan')):.2f}-"
                         f"{quality.get('jacobian_max', float('nan')):.2f}{tumour}")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------- scene
    def _updateScene(self, updates: list, extraWarnings: Optional[list] = None) -> dict[str, Any]:
        """Write the twin's state into the scene, all or nothing; fractions already in the sequences stay.

        :param updates: the :class:`~twinrt.twin.twin.FractionUpdate` of the fractions just taken.
        :param extraWarnings: warnings to put first (refusals, the tumour proxy).
        :return: ``browser``, ``imageSequence``, ``doseSequence``, ``bedSequence``, ``proxies`` (sequence
            role -> proxy volume), ``accumulatedDose`` (None before the first fraction), ``goalsTable``,
            ``goalTrendTable``, ``goalChart``, ``tumourObservedTable``, ``tumourPredictedTable``,
            ``tumourChart``, ``studyItem``, ``updates`` and ``warnings``.
        """
        from TwinRTCommon import mrmlio

        twin, scene, study = self.twin, self.scene, self.studyItem
        timeline = twin.timeline
        patientId = timeline.patient_id
        source = str(timeline.metadata.get("source", "") or ("simulated" if timeline.metadata.get("simulated") else ""))
        self._goals = updates[-1].goals if updates else twin.goal_table()[0]
        with mrmlio.sceneTransaction(scene):
            sequences = {}
            for role in twinScene.SEQUENCES:
                sequences[role] = (twinScene.findOutput(scene, study, role, "vtkMRMLSequenceNode")
                                   or twinScene.addSequence(scene, study, role, patientId, source))
            present = set(twinScene.sequenceIndexValues(sequences[twinScene.ROLE_IMAGES]))
            # The item of fraction n holds the BED accumulated up to n (the core's running sum), also when
            # earlier items were written by an earlier update.
            for fraction, (record, bed) in zip(timeline.fractions, twin.bed_by_fraction()):
                if record.number in present:
                    continue
                twinScene.appendVolume(sequences[twinScene.ROLE_IMAGES], record.number, fraction.image.array,
                                       fraction.image.grid, patientId, source=source)
                twinScene.appendVolume(sequences[twinScene.ROLE_DOSES], record.number, record.warped_dose_gy,
                                       twin.grid, patientId, "fraction dose (planning anatomy)", source=source)
                twinScene.appendVolume(sequences[twinScene.ROLE_BED], record.number, bed, twin.grid, patientId,
                                       "accumulated BED", "EFFECTIVE", source)
            browser = (twinScene.findOutput(scene, study, twinScene.ROLE_BROWSER, "vtkMRMLSequenceBrowserNode")
                       or twinScene.addBrowser(scene, study, list(sequences.values()), patientId, source))
            proxies = twinScene.showLastFraction(browser, list(sequences.values()), study, patientId)
            accumulated = self._writeAccumulatedDose(source)
            goalsTable = twinScene.setTableRows(scene, study, twinScene.ROLE_GOALS_TABLE, "Planned vs delivered",
                                                twinScene.goalRows(timeline.records, self._goals), patientId,
                                                {"fraction": ""}, source)
            goalTrend, goalChart = self._updateGoalChart(source)
            tumourNodes = self._writeTumour(source)
        warnings = list(extraWarnings or [])
        for update in updates:
            # Registration warnings of every fraction; goal warnings only of the latest (they are current).
            warnings += [w for w in update.warnings if w.startswith("Fraction ")]
        if updates:
            warnings += [w for w in updates[-1].warnings if not w.startswith("Fraction ")]
        self.warnings = list(dict.fromkeys(warnings))
        for warning in self.warnings:
            self.log(f"DigitalTwin: {warning}")
        return {"browser": browser, "imageSequence": sequences[twinScene.ROLE_IMAGES],
                "doseSequence": sequences[twinScene.ROLE_DOSES], "bedSequence": sequences[twinScene.ROLE_BED],
                "proxies": proxies, "accumulatedDose": accumulated, "goalsTable": goalsTable,
                "goalTrendTable": goalTrend, "goalChart": goalChart, **tumourNodes, "studyItem": study,
                "updates": updates, "warnings": self.warnings}

    def _writeAccumulatedDose(self, source: str):
        """The accumulated physical dose as a dose volume of the study (replacing the previous one)."""
        from TwinRTCommon import mrmlio

        twin, scene, study = self.twin, self.scene, self.studyItem
        old = twinScene.findOutput(scene, study, twinScene.ROLE_ACCUMULATED_DOSE, "vtkMRMLScalarVolumeNode")
        if not twin.delivered:
            return old
        name = mrmlio.uniqueDoseName(scene, study, "accumulated", exclude=old)
        patientId = twin.timeline.patient_id
        node = mrmlio.addDoseVolume(scene, twin.accumulated_dose(), study, f"{patientId} Dose {name}", name, source,
                                    twinScene.CREATED_BY)
        twinScene.tagOutput(node, twinScene.ROLE_ACCUMULATED_DOSE, patientId, source)
        node.SetAttribute(twinScene.FRACTIONS_ATTRIBUTE, str(twin.delivered))
        if old is not None:
            scene.RemoveNode(old)
        return node

    def _updateGoalChart(self, source: str = ""):
        """The chosen goal's planned-to-date, delivered and projected values over the fractions."""
        twin, scene, study = self.twin, self.scene, self.studyItem
        patientId = twin.timeline.patient_id
        goals = {row["goal"]: row for row in self._goals}
        goal = self.plottedGoal if self.plottedGoal in goals else next(iter(goals), "")
        unit = goals[goal]["unit"] if goal else ""
        table = twinScene.setTableRows(scene, study, twinScene.ROLE_GOAL_TREND_TABLE, "Planned vs delivered, one goal",
                                       twinScene.goalTrendRows(twin.timeline.records, goal), patientId,
                                       {"fraction": "", "planned_to_date": unit, "delivered": unit, "projected": unit},
                                       source)
        table.SetAttribute(twinScene.GOAL_ATTRIBUTE, goal)
        chart = twinScene.ensureChart(scene, study, twinScene.ROLE_GOAL_CHART, "Planned vs delivered chart", patientId,
                                      f"{goal}: planned vs delivered", "Fraction", unit, source)
        chart.SetAttribute(twinScene.GOAL_ATTRIBUTE, goal)
        for column, color, dashed in (("planned_to_date", (0.4, 0.4, 0.4), True), ("delivered", (0.0, 0.45, 0.8), False),
                                      ("projected", (0.85, 0.33, 0.1), True)):
            twinScene.ensureSeries(chart, table, f"{patientId} {column.replace('_', ' ')}", "fraction", column, color,
                                   study, patientId, dashed=dashed)
        return table, chart

    def _writeTumour(self, source: str) -> dict[str, Any]:
        """Observed tumour volumes and, once calibrated, the predicted median with its credible band."""
        twin, scene, study = self.twin, self.scene, self.studyItem
        patientId = twin.timeline.patient_id
        days, volumes = twin.tumour_observations()
        observed = twinScene.setTableRows(scene, study, twinScene.ROLE_TUMOUR_OBSERVED_TABLE, "Tumour volume observed",
                                          [{"day": float(d), "volume_cc": float(v)} for d, v in zip(days, volumes)],
                                          patientId, {"day": "d"}, source)
        rows = []
        if twin.posterior is not None:
            prediction = twin.predict_tumour(self.credibleLevel)
            rows = [{"day": float(d), "median_cc": float(m), "lower_cc": float(lo), "upper_cc": float(hi)}
                    for d, m, lo, hi in zip(prediction.days, prediction.median_cc, prediction.lower_cc,
                                            prediction.upper_cc)]
        predicted = twinScene.setTableRows(scene, study, twinScene.ROLE_TUMOUR_PREDICTED_TABLE,
                                           "Tumour volume predicted", rows, patientId, {"day": "d"}, source)
        level = f"{int(round(self.credibleLevel * 100))} %"
        predicted.SetAttribute("DigitalTwin.CredibleLevel", str(self.credibleLevel))
        chart = twinScene.ensureChart(scene, study, twinScene.ROLE_TUMOUR_CHART, "Tumour volume chart", patientId,
                                      f"Tumour ({twin.timeline.tumour}) volume: observed, predicted median and {level} band",
                                      "Days from the first fraction", "Volume (cc)", source)
        twinScene.ensureSeries(chart, observed, f"{patientId} tumour observed", "day", "volume_cc", (0.0, 0.0, 0.0),
                               study, patientId, markersOnly=True)
        if rows:
            for column, name, dashed in (("median_cc", "median", False), ("lower_cc", f"{level} lower", True),
                                         ("upper_cc", f"{level} upper", True)):
                twinScene.ensureSeries(chart, predicted, f"{patientId} tumour {name}", "day", column, (0.8, 0.1, 0.4),
                                       study, patientId, dashed=dashed)
        return {"tumourObservedTable": observed, "tumourPredictedTable": predicted, "tumourChart": chart}


#
# DigitalTwinTest
#


class DigitalTwinTest(CaseModuleTestMixin, ScriptedLoadableModuleTest):
    """Logic tests on a small textured phantom built in memory (and one on the sample patient); they run
    in Slicer and headless.

    The shared tests are :class:`TwinRTCommon.testing.CaseModuleTestMixin`'s (the attributes below say how
    to call this module's stage and what its parameter node holds). The phantom is TwinRT's planning
    phantom with texture in the water (registration needs structure to align) and its organs named like
    the head-and-neck goal set's required structures; a simulated fraction takes about 0.3 s on it.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    logicClass = DigitalTwinLogic
    stageMethodName = "simulateCourse"
    stageArguments = ("ct", "dose", 30)
    invalidStageArguments = ("ct", "ct", 30)  # a CT where the dose belongs
    # Every stage is built (issue 7): nothing is pending.
    stageIssueText = ""
    parameterNodes = {"inputVolume": "ct", "inputSegmentation": "segmentation", "inputDose": "dose"}
    parameterValues = {"fractions": 5, "startDate": "2026-01-05", "fractionNumber": 2, "fractionDate": "2026-01-06"}
    invalidParameterValues = {"fractions": 0, "fractionNumber": -1}
    parameterDefaults = {"fractionVolume": None}

    #: Course start of the tests: a Monday, so fractions fall on consecutive days.
    startDate = "2026-01-05"

    def runTest(self):
        """Run all tests of this module (Slicer's ctest and Reload and Test call only this)."""
        self.runCaseModuleTests(self.test_CoursePhantom, self.test_RefusedFractionLeavesSceneUnchanged,
                                self.test_TimelineRoundTrip, self.test_TwinSamplePatient)

    @staticmethod
    def makeTwinPhantom(patientId: str = "TwinPhantom"):
        """The planning phantom with textured water, PTV70 / SpinalCord / Brainstem and a 70 Gy dose."""
        import numpy as np
        from scipy import ndimage

        from twinrt.model import Dose, Prescription, Structure, StructureType

        from TwinRTCommon.testing import makePlanningPhantom

        case = makePlanningPhantom(patientId)
        grid = case.ct.grid
        body = case.structure("BODY").mask
        renamed = {"PTV": "PTV70", "Organ": "SpinalCord"}
        for structure in case.structures:
            structure.name = renamed.get(structure.name, structure.name)
        brainstem = np.zeros(grid.shape, bool)
        brainstem[8:12, 12:16, 4:7] = True
        case.structures.append(Structure("Brainstem", brainstem & body, grid, (0, 200, 0), StructureType.ORGAN))
        # Smooth texture (about 150 HU) so that registration has something to align.
        texture = ndimage.gaussian_filter(np.random.default_rng(1).standard_normal(grid.shape), 1.5)
        case.ct.array[...] = np.where(body, np.rint(150.0 * texture / texture.std()), -1000).astype(np.int16)
        target = case.structure("PTV70").mask.astype(float)
        dose = np.where(body, 70.0 * ndimage.gaussian_filter(target, 1.0), 0.0).astype(np.float32)
        case.doses["reference"] = Dose(dose, grid, "reference")
        case.metadata["prescriptions"] = [Prescription("PTV70", 70.0, 35)]
        return case

    def simulatePhantom(self, upTo: int, fractions: int = 4):
        """The phantom in the scene and a simulated course of ``fractions`` fractions, ``upTo`` taken."""
        logic = DigitalTwinLogic()
        created = logic.caseToScene(self.makeTwinPhantom(), computeDvh=False)
        result = logic.simulateCourse(created["ct"], created["doses"]["reference"], fractions,
                                      segmentation=created["segmentation"], upTo=upTo, startDate=self.startDate)
        return logic, created, result

    @staticmethod
    def volumeToScene(logic, patientId: str, image):
        """A volume of ``patientId`` in the scene (as an image of that patient loaded on a treatment day)."""
        from twinrt.model import Case

        return logic.caseToScene(Case(patientId, image, [], {}, [], {"patient_name": patientId}),
                                 computeDvh=False)["ct"]

    def assertTwinOutputs(self, logic, result) -> None:
        """Sequences, browser, dose volume, tables and charts agree with the core twin."""
        import numpy as np

        from TwinRTCommon import mrmlio

        twin = logic.twin
        records = twin.timeline.records
        numbers = [r.number for r in records]
        for key in ("imageSequence", "doseSequence", "bedSequence"):
            sequence = result[key]
            self.assertEqual(sequence.GetIndexName(), "fraction")
            self.assertEqual(sequence.GetIndexUnit(), "")
            self.assertEqual(twinScene.sequenceIndexValues(sequence), numbers, key)
            self.assertIn("Research use only", sequence.GetAttribute(mrmlio.RESEARCH_USE_ATTRIBUTE))
            self.assertEqual(sequence.GetAttribute(twinScene.MODEL_ATTRIBUTE), "TwinRT digital twin")
            self.assertIn("Qi XS", sequence.GetAttribute(twinScene.RESPONSE_PRIOR_ATTRIBUTE))
            self.assertEqual(mrmlio.studyItemOf(sequence), result["studyItem"])
        bed = None
        for index, (fraction, record) in enumerate(zip(twin.timeline.fractions, records)):
            image = result["imageSequence"].GetNthDataNode(index)
            self.assertTrue(mrmlio.volumeGrid(image) == fraction.image.grid)
            self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(image), fraction.image.array))
            dose = result["doseSequence"].GetNthDataNode(index)
            self.assertTrue(mrmlio.volumeGrid(dose) == twin.grid)
            self.assertTrue(mrmlio.isDoseVolumeNode(dose))
            self.assertTrue(np.allclose(slicer.util.arrayFromVolume(dose), record.warped_dose_gy, atol=1e-5))
            bed = result["bedSequence"].GetNthDataNode(index)
        if records:
            self.assertTrue(np.allclose(slicer.util.arrayFromVolume(bed), twin.accumulated_bed().array,
                                        rtol=1e-4, atol=1e-4))
            browser = result["browser"]
            self.assertEqual(browser.GetMasterSequenceNode().GetID(), result["imageSequence"].GetID())
            self.assertTrue(browser.IsSynchronizedSequenceNodeID(result["bedSequence"].GetID()))
            self.assertEqual(browser.GetSelectedItemNumber(), len(records) - 1)
            self.assertTrue(mrmlio.isDoseVolumeNode(result["proxies"][twinScene.ROLE_BED]))
            accumulated = result["accumulatedDose"]
            self.assertTrue(mrmlio.isDoseVolumeNode(accumulated))
            self.assertEqual(accumulated.GetAttribute("DicomRtImport.DoseVolume"), "1")
            self.assertEqual(mrmlio.studyItemOf(accumulated), result["studyItem"])
            self.assertEqual(accumulated.GetAttribute(twinScene.FRACTIONS_ATTRIBUTE), str(len(records)))
            self.assertTrue(np.allclose(slicer.util.arrayFromVolume(accumulated), twin.accumulated_dose().array,
                                        atol=1e-5))

        # Planned versus delivered: one row per fraction and goal, the values the core computed.
        goals, _warnings = twin.goal_table()
        rows = mrmlio.tableToRows(result["goalsTable"])
        self.assertEqual(len(rows), len(records) * len(goals))
        last = {row["goal"]: row for row in rows if row["fraction"] == len(records)}
        for goal in goals:
            if records:
                for column in ("planned", "planned_to_date", "delivered", "projected"):
                    if goal[column] is not None:
                        self.assertAlmostEqual(last[goal["goal"]][column], goal[column], places=4)
        trend = mrmlio.tableToRows(result["goalTrendTable"])
        self.assertEqual([row["fraction"] for row in trend], numbers)
        self.assertEqual(result["goalChart"].GetNumberOfPlotSeriesNodes(), 3)

        # Tumour: the observed volumes and the posterior band, as the core gives them.
        days, volumes = twin.tumour_observations()
        observed = mrmlio.tableToRows(result["tumourObservedTable"])
        self.assertTrue(np.allclose([row["day"] for row in observed], days))
        self.assertTrue(np.allclose([row["volume_cc"] for row in observed], volumes))
        predicted = mrmlio.tableToRows(result["tumourPredictedTable"])
        if twin.posterior is not None:
            prediction = twin.predict_tumour(0.9)
            self.assertTrue(np.allclose([row["median_cc"] for row in predicted], prediction.median_cc))
            self.assertTrue(np.allclose([row["lower_cc"] for row in predicted], prediction.lower_cc))
            self.assertTrue(np.allclose([row["upper_cc"] for row in predicted], prediction.upper_cc))
            self.assertTrue(all(r["lower_cc"] <= r["median_cc"] <= r["upper_cc"] for r in predicted))
            self.assertEqual(result["tumourChart"].GetNumberOfPlotSeriesNodes(), 4)

    def test_CoursePhantom(self):
        """A simulated course: sequences per fraction, dose volume, tables equal to the core's, regimens, today's fraction."""
        import numpy as np

        from TwinRTCommon import mrmlio

        self.delayDisplay("Simulated course on the phantom")
        logic, created, result = self.simulatePhantom(upTo=3)
        self.assertEqual(logic.twin.delivered, 3)
        self.assertEqual(len(result["updates"]), 3)
        self.assertIsInstance(result["warnings"], list)
        self.assertIsNotNone(logic.twin.posterior)
        self.assertTrue(any("GTV" in w for w in result["warnings"]), result["warnings"])  # the tumour proxy
        self.assertTwinOutputs(logic, result)
        # The accumulated dose is a dose of the study: other modules read it back with the case.
        back = logic.sceneToCase(slicer.mrmlScene, created["ct"], created["segmentation"])
        self.assertIn("accumulated", back.doses)
        self.assertTrue(np.allclose(back.doses["accumulated"].array, logic.twin.accumulated_dose().array, atol=1e-5))

        # Another goal on the chart.
        goal = mrmlio.tableToRows(result["goalsTable"])[-1]["goal"]
        logic.setPlottedGoal(goal)
        self.assertEqual(result["goalTrendTable"].GetAttribute(twinScene.GOAL_ATTRIBUTE), goal)
        with self.assertRaises(ValueError):
            logic.setPlottedGoal("no such goal")

        # What-if regimens for the remaining fraction.
        regimens = logic.compareRegimens()
        rows = mrmlio.tableToRows(regimens["table"])
        expected = regimens["comparison"].to_rows()
        self.assertEqual([r["regimen"] for r in rows], [r["regimen"] for r in expected])
        for row, core in zip(rows, expected):
            self.assertAlmostEqual(row["TCP"], core["TCP"])
            self.assertAlmostEqual(row["P+"], core["P+"])
            self.assertAlmostEqual(row["TCP 90% CI lower"], core["TCP 90% CI"][0])
            self.assertIn("NTCP SpinalCord", row)
        self.assertIn(regimens["best"], [r["regimen"] for r in rows])

        # Today's fraction from the scene: the simulator's fourth day as an image of this patient.
        day = logic.simulator.fraction(4).fraction
        image = self.volumeToScene(logic, logic.twin.timeline.patient_id, day.image)
        # That day also had a PET/CT: the PET (SUVbw, its own coarser grid) goes with the fraction.
        from twinrt.errors import InvalidInputError
        from twinrt.twin.simulator import simulate_pet

        petImage = simulate_pet(day.image, day.structures, {"LeftParotid": 2.0}, np.random.default_rng(0))
        pet = self.volumeToScene(logic, logic.twin.timeline.patient_id, petImage)
        otherPet = self.volumeToScene(logic, "SomeoneElse", petImage)
        with self.assertRaises(InvalidInputError):
            logic.addFraction(image, 4, day.date, petVolume=otherPet)
        self.assertEqual(logic.twin.delivered, 3)
        result = logic.addFraction(image, 4, day.date, petVolume=pet)
        self.assertEqual(logic.twin.delivered, 4)
        taken = logic.twin.timeline.fractions[-1].pet
        self.assertIsNotNone(taken)
        self.assertTrue(taken.grid.is_same(petImage.grid))
        self.assertTrue(np.allclose(taken.array, petImage.array, atol=1e-5))
        self.assertTwinOutputs(logic, result)
        self.assertIn("4:", logic.timelineText())
        self.delayDisplay("Test passed")

    def test_RefusedFractionLeavesSceneUnchanged(self):
        """Another patient's image and an image that does not register are refused; nothing changes."""
        import numpy as np

        from twinrt.model import Image
        from twinrt.twin.twin import FractionRefusedError

        from TwinRTCommon import mrmlio

        self.delayDisplay("Refused fractions")
        logic, created, result = self.simulatePhantom(upTo=1)
        other = self.volumeToScene(logic, "SomeoneElse", self.makeTwinPhantom("SomeoneElse").ct)
        grid = mrmlio.volumeGrid(created["ct"])
        noise = Image(np.random.default_rng(3).normal(0, 300, grid.shape).astype(np.int16), grid, "CT")
        unrelated = self.volumeToScene(logic, logic.twin.timeline.patient_id, noise)

        def state():
            tables = [mrmlio.tableToRows(result[key]) for key in ("goalsTable", "tumourObservedTable", "goalTrendTable")]
            counts = [result[key].GetNumberOfDataNodes() for key in ("imageSequence", "doseSequence", "bedSequence")]
            dose = np.array(slicer.util.arrayFromVolume(result["accumulatedDose"]))
            return mrmlio.nodeIds(slicer.mrmlScene), tables, counts, dose, logic.twin.delivered

        before = state()
        with self.assertRaises(FractionRefusedError) as context:
            logic.addFraction(other, 2, "2026-01-06")
        self.assertIn("SomeoneElse", str(context.exception))
        with self.assertRaises(FractionRefusedError) as context:
            logic.addFraction(unrelated, 2, "2026-01-06")
        self.assertIn("refused", str(context.exception))
        with self.assertRaises(FractionRefusedError):
            logic.addFraction(created["ct"], 5, "2026-01-06")  # out of order
        after = state()
        self.assertEqual(after[0], before[0])
        self.assertEqual(after[1], before[1])
        self.assertEqual(after[2], before[2])
        self.assertTrue(np.array_equal(after[3], before[3]))
        self.assertEqual(after[4], before[4])
        self.delayDisplay("Test passed")

    def test_TimelineRoundTrip(self):
        """A saved timeline loads into an empty scene with the same sequences and tables; a DICOM course imports."""
        import os
        import tempfile

        import numpy as np

        from twinrt.twin.course_dicom import export_course

        from TwinRTCommon import mrmlio

        self.delayDisplay("Timeline round trip")
        logic, created, result = self.simulatePhantom(upTo=2)
        goalsBefore = mrmlio.tableToRows(result["goalsTable"])
        tumourBefore = mrmlio.tableToRows(result["tumourObservedTable"])
        doseBefore = np.array(slicer.util.arrayFromVolume(result["accumulatedDose"]))
        with tempfile.TemporaryDirectory() as folder:
            logic.saveTimeline(os.path.join(folder, "timeline"))
            export_course(logic.twin.timeline, os.path.join(folder, "course"))
            slicer.mrmlScene.Clear()
            loaded = DigitalTwinLogic()
            again = loaded.loadTimeline(os.path.join(folder, "timeline"))
            self.assertEqual(loaded.twin.delivered, 2)
            self.assertTwinOutputs(loaded, again)
            self.assertEqual(mrmlio.tableToRows(again["goalsTable"]), goalsBefore)
            self.assertEqual(mrmlio.tableToRows(again["tumourObservedTable"]), tumourBefore)
            self.assertTrue(np.allclose(slicer.util.arrayFromVolume(again["accumulatedDose"]), doseBefore, atol=1e-5))

            slicer.mrmlScene.Clear()
            imported = DigitalTwinLogic()
            course = imported.importCourse(os.path.join(folder, "course"), nFractions=4)
            self.assertEqual(course["refused"], "")
            self.assertEqual(imported.twin.delivered, 2)
            self.assertTwinOutputs(imported, course)
        self.delayDisplay("Test passed")

    def test_TwinSamplePatient(self):
        """The sample patient: the twin built from the scene, then a short simulated course."""
        from TwinRTCommon import mrmlio

        self.delayDisplay("Digital twin of the sample patient")
        logic = DigitalTwinLogic()
        created = logic.loadSampleCase()
        ct, segmentation, dose = created["ct"], created["segmentation"], created["doses"]["reference"]
        twin = logic.buildTwin(ct, segmentation, dose, 35, self.startDate)
        self.assertEqual(twin.delivered, 0)
        self.assertTrue(any("GTV" in w for w in logic.warnings), logic.warnings)
        rows = mrmlio.tableToRows(twinScene.findOutput(slicer.mrmlScene, logic.studyItem,
                                                       twinScene.ROLE_TUMOUR_OBSERVED_TABLE))
        self.assertEqual(len(rows), 1)  # the planning volume of the tumour proxy, day 0
        result = logic.simulateCourse(ct, dose, 3, segmentation=segmentation, upTo=2, startDate=self.startDate)
        self.assertEqual(logic.twin.delivered, 2)
        self.assertTwinOutputs(logic, result)
        # The new course replaced the outputs of the first twin: one of each in the study.
        self.assertEqual(len(twinScene.findOutputs(slicer.mrmlScene, logic.studyItem, twinScene.ROLE_GOALS_TABLE)), 1)
        self.delayDisplay("Test passed")
