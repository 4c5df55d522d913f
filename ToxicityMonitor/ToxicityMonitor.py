"""ToxicityMonitor: early warning of normal-tissue toxicity over the treatment course (research use only).

Issue 8. The Logic takes the digital twin's accepted fractions (the DigitalTwin module's Logic, its core
twin, or a saved timeline folder), turns them into one feature trajectory per organ with a toxicity
endpoint (:func:`twinrt.toxicity.features.trajectories_from_twin`), and scores every fraction with a
trained risk model (:class:`twinrt.toxicity.model.ToxicityModel`; by default the shipped one, trained on
a simulated development cohort) next to the LKB NTCP of the planned dose. The scene then holds, in the
patient's study, a table with one row per organ and fraction, a risk-over-fractions table and its chart
(one line per organ, the LKB baselines and the threshold), and the organs whose risk reached the
threshold with the fraction it first did. Nothing is written when an input is refused.
This file follows Slicer's scripted-module template (Utilities/Templates/Modules/Scripted):
ToxicityMonitor (module descriptor), ToxicityMonitorParameterNode, ToxicityMonitorWidget (thin: binds the .ui and calls
the Logic), ToxicityMonitorLogic (all computation, batch-capable) and ToxicityMonitorTest (runs headless too).
"""

import os
from pathlib import Path
from typing import Annotated, Any

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper, WithinRange

from slicer import vtkMRMLScalarVolumeNode

from ToxicityMonitorLib import riskScene

from TwinRTCommon.logic import CaseLogicMixin, checkCtVolume
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
        # The fractions come from the DigitalTwin module (its Logic holds the twin).
        self.parent.dependencies = ["Segmentations", "SubjectHierarchy", "Plots", "DigitalTwin"]
        self.parent.contributors = ["TwinRT contributors"]
        self.parent.helpText = _("""
<b>Research use only, not for clinical decisions.</b><br>
Follows the risk of toxicity (CTCAE grade 1 or more during the course) of each organ with a toxicity
endpoint (parotids: xerostomia, esophagus: esophagitis, lungs: pneumonitis, heart: cardiac) after every
fraction the DigitalTwin module accepted. A recurrent model scores the organ's accumulated BED dose-volume,
dosiomics and radiomics features (the day's CT, and its PET when the fraction has one); the LKB NTCP of the planned dose is shown as a baseline. The results are
a table (one row per organ and fraction) and a chart; organs whose risk reached the threshold are listed
with the fraction where it first did.
<br>The shipped model was trained on a <i>simulated</i> development cohort: its risks are not calibrated
incidences. The model id and the SHA-256 of its weights are stored on every output.
""")
        self.parent.acknowledgementText = _("""
Part of the TwinRT extension suite. The risk model follows COMPASS (arXiv 2602.18496); the baseline is the
Lyman-Kutcher-Burman NTCP model with published parameter sets. Built on 3D Slicer and SlicerRT.
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

    inputVolume - planning CT of the patient whose twin is monitored (the DigitalTwin module's twin must
        be of this patient).
    modelPath - trained model (.pt with its .json beside it); empty: the shipped model.
    threshold - risk at or above which an organ is flagged (0..1).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: Path
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


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

    # Apply needs the patient; the twin itself is the DigitalTwin module's.
    applyRequires = ("inputVolume",)
    applyReadyToolTip = _("Estimate the toxicity risk of each organ after every fraction of the digital twin.")
    applyMissingToolTip = _("Select the planning CT of the patient followed in DigitalTwin.")

    def onApplyButton(self) -> None:
        """Score the DigitalTwin module's fractions and show the chart and the flagged organs."""
        with slicer.util.tryWithErrorDisplay(_("Failed to estimate the toxicity risks."), waitCursor=True):
            parameters = self._parameterNode
            twinWidget = slicer.util.getModuleWidget("DigitalTwin")
            modelPath = parameters.modelPath
            # An empty path line edit reads back as "" or "."; both mean the shipped model.
            modelPath = modelPath if modelPath and str(modelPath) not in ("", ".") else None
            result = self.logic.monitor(twinWidget.logic if twinWidget else None, modelPath, parameters.threshold,
                                        planningVolume=parameters.inputVolume)
            self.ui.flagsLabel.text = self.logic.flagsText(result)
            slicer.modules.plots.logic().ShowChartInLayout(result["chart"])


#
# ToxicityMonitorLogic
#


class ToxicityMonitorLogic(ScriptedLoadableModuleLogic, CaseLogicMixin):
    """All computation of ToxicityMonitor; usable without the GUI (batch mode, tests).

    Loading a case (``importCase``, ``loadSampleCase``, ``caseToScene``, ``sceneToCase``) comes from
    :class:`TwinRTCommon.logic.CaseLogicMixin`, so every module shares the one MRML contract. The risk
    model, the features and the LKB baseline are :mod:`twinrt.toxicity`'s; this class finds the twin and
    its study, runs them and writes the outputs (:mod:`ToxicityMonitorLib.riskScene`).
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    # The toxicity monitor (issue 8) is built: nothing of this module is pending.
    stageName = "toxicity risk estimation"
    stageIssue = None

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return ToxicityMonitorParameterNode(super().getParameterNode())

    def stageStatusText(self) -> str:
        """The panel's status: the monitor is available, for research use only."""
        return _("Toxicity monitor available: risk per organ after every fraction of the digital twin, with the "
                 "LKB baseline. Research use only, not for clinical decisions.")

    # ------------------------------------------------------------------------------------- model
    @staticmethod
    def defaultModelPath() -> Path:
        """The shipped model's weights (``twinrt/toxicity/models/toxicity-gruae-v2.pt``)."""
        from twinrt.toxicity.cli import shipped_model_path

        return shipped_model_path()

    def loadModel(self, modelPath=None):
        """Load a trained risk model, its weights checked against the SHA-256 of its manifest.

        :param modelPath: the model's ``.pt`` or ``.json`` (each beside the other), or a folder holding one
            model; None: :meth:`defaultModelPath`.
        :return: the :class:`twinrt.toxicity.model.ToxicityModel`.
        :raises MissingInputError: no model there (the message says how to train one).
        :raises WeightsIntegrityError: the weights differ from their manifest (corrupt or replaced file).
        :raises InvalidInputError: not a ToxicityMonitor model.
        """
        from twinrt.errors import MissingInputError
        from twinrt.toxicity.model import ToxicityModel

        path = Path(modelPath) if modelPath else self.defaultModelPath()
        # The manifest is what load() reads first; checking it here gives the "how to train one" message
        # for the shipped model too, which is not in every installation.
        if not (path.is_dir() or path.with_suffix(".json").is_file()):
            raise MissingInputError(
                f"No toxicity model at {path}. Train one on a cohort and select its .pt file: "
                "'twinrt toxicity simulate-cohort --seed 1 --out cohort' (or your own cohort CSVs, see the README), "
                "then 'twinrt toxicity train cohort --out models'", path)
        return ToxicityModel.load(path)

    # ------------------------------------------------------------------------------------- twin
    def _twinAndStudy(self, twinSource, scene) -> tuple[Any, int, Any]:
        """``(core twin, its study item or 0, scene)`` from a DigitalTwin Logic, a core twin or a timeline folder."""
        from twinrt.errors import InvalidInputError
        from twinrt.twin.timeline import CaseTimeline
        from twinrt.twin.twin import DigitalTwin, TwinSettings

        if isinstance(twinSource, (str, os.PathLike)):
            timeline = CaseTimeline.load(twinSource)
            # No goal set: the features need the doses and structures only, not the goal evaluation.
            twin = DigitalTwin(timeline, TwinSettings(goal_set=None))
            scene = scene if scene is not None else slicer.mrmlScene
            return twin, self.findTwinStudy(scene, twin.timeline.patient_id), scene
        if isinstance(twinSource, DigitalTwin):
            scene = scene if scene is not None else slicer.mrmlScene
            return twinSource, self.findTwinStudy(scene, twinSource.timeline.patient_id), scene
        if twinSource is not None and hasattr(twinSource, "twin") and hasattr(twinSource, "studyItem"):
            # The DigitalTwin module's Logic: its twin and the study it writes into.
            if twinSource.twin is None:
                raise InvalidInputError(_("The DigitalTwin module has no twin yet: simulate a course, add fractions "
                                          "or load a timeline there first"))
            scene = scene if scene is not None else (twinSource.scene or slicer.mrmlScene)
            return twinSource.twin, twinSource.studyItem, scene
        kind = twinSource.GetClassName() if hasattr(twinSource, "GetClassName") else type(twinSource).__name__
        raise InvalidInputError(_("The toxicity monitor needs the digital twin: the DigitalTwin module's Logic, its "
                                  "twin or a saved timeline folder (got {kind})").format(kind=kind))

    @staticmethod
    def findTwinStudy(scene, patientId: str) -> int:
        """The study of ``patientId``'s twin in ``scene``: where DigitalTwin wrote its fraction images, else
        the first study of the patient item with that DICOM PatientID; 0 when the patient is not in the scene.
        """
        from DigitalTwinLib import twinScene

        from TwinRTCommon import mrmlio

        for node in mrmlio.nodesByClass(scene, "vtkMRMLSequenceNode"):
            if (node.GetAttribute(mrmlio.ROLE_ATTRIBUTE) == twinScene.ROLE_IMAGES
                    and node.GetAttribute(mrmlio.CREATED_BY_ATTRIBUTE) == twinScene.CREATED_BY
                    and node.GetAttribute(twinScene.PATIENT_ID_ATTRIBUTE) == patientId and mrmlio.studyItemOf(node)):
                return mrmlio.studyItemOf(node)
        import vtk

        sh = scene.GetSubjectHierarchyNode()
        constants = slicer.vtkMRMLSubjectHierarchyConstants
        ids = vtk.vtkIdList()
        sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
        items = [ids.GetId(i) for i in range(ids.GetNumberOfIds())]

        def holdsData(study):
            # A study item can outlive its nodes (e.g. after a scene clear headless): only a live one counts.
            children = vtk.vtkIdList()
            sh.GetItemChildren(study, children, True)
            nodes = [sh.GetItemDataNode(children.GetId(i)) for i in range(children.GetNumberOfIds())]
            return any(node is not None and scene.IsNodePresent(node) for node in nodes)

        for item in items:
            if (sh.GetItemLevel(item) == constants.GetDICOMLevelStudy()
                    and sh.GetItemAttribute(sh.GetItemParent(item),
                                            constants.GetDICOMPatientIDAttributeName()) == patientId
                    and holdsData(item)):
                return item
        return 0

    # ------------------------------------------------------------------------------------- monitor
    def monitor(self, twinSource, modelPath=None, threshold: float = 0.5, organs=None, planningVolume=None,
                scene=None) -> dict[str, Any]:
        """Toxicity risk of each organ after every fraction of the digital twin, written to the patient's study.

        Everything is computed before the scene is touched, and written in one scene transaction, so a
        refused input (or any failure) leaves the scene as it was. A new run replaces the outputs of the
        previous one in the study.

        :param twinSource: the DigitalTwin module's Logic (its twin and study), a core
            :class:`twinrt.twin.twin.DigitalTwin`, or a timeline folder saved by DigitalTwin. For a core twin
            or a folder the outputs go into the study of the twin's patient in the scene; a patient not in
            the scene is added (its planning case).
        :param modelPath: trained model (``.pt`` / ``.json`` / folder); None: the shipped model.
        :param threshold: risk (0..1) at or above which an organ is flagged.
        :param organs: planning structures to score (default: every organ with a toxicity endpoint).
        :param planningVolume: optional planning CT; when given, the twin must follow this CT's patient.
        :param scene: the MRML scene (default: the Logic's, else ``slicer.mrmlScene``).
        :return: ``table`` (organ x fraction), ``trendTable`` (one row per fraction), ``chart``, ``series``
            (name -> node), ``flags`` (organs whose risk reached the threshold, see
            :func:`ToxicityMonitorLib.riskScene.flags`), ``risks`` and ``ntcp`` (organ -> values),
            ``trajectories``, ``modelId``, ``weightsSha256``, ``studyItem``.
        :raises InvalidInputError: no twin, no fraction yet, no organ with a toxicity endpoint, a bad
            threshold, or a twin of another patient than ``planningVolume``'s.
        :raises FeatureMismatchError: the model was trained on other features than the twin's.
        :raises WeightsIntegrityError: the model's weights differ from their manifest.
        :raises MissingInputError: no model at ``modelPath`` (or the shipped model is not installed).
        """
        import math

        from twinrt.errors import InvalidInputError
        from twinrt.toxicity.features import trajectories_from_twin
        from twinrt.toxicity.model import lkb_baseline_risk

        from TwinRTCommon import mrmlio

        # The threshold is compared as "risk >= threshold", the convention of twinrt.toxicity.model.
        threshold = float(threshold)
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise InvalidInputError(_("The risk threshold must be between 0 and 1, got {value}").format(
                value=threshold))
        # Inputs are checked and every number computed before the first scene write (all or nothing).
        twin, study, scene = self._twinAndStudy(twinSource, scene)
        patientId = twin.timeline.patient_id
        if planningVolume is not None:
            checkCtVolume(planningVolume, _("planning CT"))
            if study and mrmlio.studyItemOf(planningVolume) != study:
                raise InvalidInputError(_("The digital twin follows patient {patient}, whose study does not hold the "
                                          "CT '{ct}'; select that patient's planning CT").format(
                                              patient=patientId, ct=planningVolume.GetName()))
        if not twin.timeline.records:
            raise InvalidInputError(_("The digital twin of {patient} has no fraction yet: add or simulate fractions "
                                      "in DigitalTwin first").format(patient=patientId))
        trajectories = trajectories_from_twin(twin, organs=organs)
        if not trajectories:
            raise InvalidInputError(_("The planning structures of {patient} have no organ with a toxicity endpoint "
                                      "(parotid, esophagus, lung, heart); name them as in TG-263").format(
                                          patient=patientId))
        # Loaded on every run (milliseconds): a model file replaced on disk is never scored with stale weights.
        model = self.loadModel(modelPath)
        # risk() checks the feature names first (FeatureMismatchError); the LKB baseline is per organ.
        risks = [model.risk(trajectory) for trajectory in trajectories]
        ntcps = [lkb_baseline_risk(trajectory) for trajectory in trajectories]
        flagged = riskScene.flags(trajectories, risks, threshold)
        result = self._writeOutputs(scene, study, twin, model, trajectories, risks, ntcps, threshold, flagged)
        for flag in flagged:
            self.log(f"ToxicityMonitor: {flag['organ']} ({flag['endpoint']}) risk {flag['riskAtFirst']:.2f} reached "
                     f"the threshold {threshold:g} at fraction {flag['firstFraction']}")
        return {**result, "flags": flagged, "trajectories": trajectories,
                "risks": {t.organ: r for t, r in zip(trajectories, risks)},
                "ntcp": {t.organ: n for t, n in zip(trajectories, ntcps)},
                "modelId": model.model_id, "weightsSha256": model.sha256}

    def _writeOutputs(self, scene, study: int, twin, model, trajectories, risks, ntcps, threshold: float,
                      flagged: list) -> dict[str, Any]:
        """Tables, chart and series (new nodes), then the previous run's outputs removed; all or nothing."""
        import json

        import twinrt
        from twinrt.toxicity.model import MODEL_VERSION

        from TwinRTCommon import mrmlio

        timeline = twin.timeline
        patientId = timeline.patient_id
        source = str(timeline.metadata.get("source", "") or ("simulated" if timeline.metadata.get("simulated") else ""))
        provenance = {
            riskScene.MODEL_ID_ATTRIBUTE: model.model_id, riskScene.WEIGHTS_SHA256_ATTRIBUTE: model.sha256,
            riskScene.MODEL_VERSION_ATTRIBUTE: MODEL_VERSION,
            riskScene.TRAINING_DATA_ATTRIBUTE: model.cohort_description or "not described in the model manifest",
            riskScene.CITATION_ATTRIBUTE: riskScene.CITATION,
            riskScene.LKB_SETS_ATTRIBUTE: json.dumps({t.organ: t.planned.get("lkb_set") for t in trajectories}),
            riskScene.THRESHOLD_ATTRIBUTE: repr(float(threshold)),
            riskScene.FRACTIONS_ATTRIBUTE: str(len(timeline.records)),
            riskScene.PATIENT_ID_ATTRIBUTE: patientId, mrmlio.SOURCE_ATTRIBUTE: source,
        }
        dates = {int(record.number): str(record.date) for record in timeline.records}
        units = {"fraction": "", "risk": "0-1", "ntcp_lkb": "0-1", "above_threshold": "",
                 **{name: riskScene.featureUnit(name) for name in trajectories[0].feature_names}}
        with mrmlio.sceneTransaction(scene):
            old = riskScene.allOutputs(scene, study) if study else []
            if not study:
                # The twin's patient is not in the scene: its planning case gives the outputs a study.
                created = self.caseToScene(timeline.planning, scene, doseName=timeline.planned_dose, computeDvh=False)
                study = created["studyItem"]
            rows = riskScene.riskRows(trajectories, risks, ntcps, threshold, dates)
            table = riskScene.addTable(scene, study, riskScene.ROLE_RISK_TABLE, f"{patientId} Toxicity risk", rows,
                                       provenance, units)
            table.SetAttribute(riskScene.FLAGGED_ATTRIBUTE, riskScene.flagsAttribute(flagged))
            trendRows = riskScene.trendRows(trajectories, risks, ntcps, threshold)
            trend = riskScene.addTable(scene, study, riskScene.ROLE_TREND_TABLE,
                                       f"{patientId} Toxicity risk over fractions", trendRows, provenance,
                                       {key: ("" if key == "fraction" else "0-1") for key in trendRows[0]})
            chart = riskScene.addChart(scene, study, f"{patientId} Toxicity risk chart",
                                       f"{patientId}: toxicity risk after each fraction ({model.model_id}; "
                                       f"{twinrt.RESEARCH_USE_ONLY})", provenance)
            chart.SetAttribute(riskScene.FLAGGED_ATTRIBUTE, table.GetAttribute(riskScene.FLAGGED_ATTRIBUTE))
            structures = {s.name: s for s in timeline.planning.structures}
            series = {}
            for trajectory in trajectories:
                color = riskScene.organColor(structures.get(trajectory.organ))
                name = f"{patientId} {trajectory.organ} risk"
                series[name] = riskScene.addSeries(chart, trend, name, f"risk_{trajectory.organ}", color, study,
                                                   provenance)
                name = f"{patientId} {trajectory.organ} LKB NTCP (plan)"
                series[name] = riskScene.addSeries(chart, trend, name, f"ntcp_lkb_{trajectory.organ}", color, study,
                                                   provenance, dashed=True)
            name = f"{patientId} threshold"
            series[name] = riskScene.addSeries(chart, trend, name, "threshold", riskScene.THRESHOLD_COLOR, study,
                                               provenance, dashed=True)
            # Last: the new outputs are complete, so the previous run's can go (a re-run never duplicates).
            for node in old:
                scene.RemoveNode(node)
        return {"table": table, "trendTable": trend, "chart": chart, "series": series, "studyItem": study}

    @staticmethod
    def flagsText(result: dict) -> str:
        """The panel's summary of a :meth:`monitor` result: flagged organs, model id and research-use line."""
        import twinrt

        lines = [_("{organ} ({endpoint}): risk {risk:.2f} reached the threshold at fraction {fraction}").format(
            organ=flag["organ"], endpoint=flag["endpoint"], risk=flag["riskAtFirst"], fraction=flag["firstFraction"])
            for flag in result["flags"]] or [_("No organ reached the threshold.")]
        lines.append(_("Model {model} (SHA-256 {sha}...). {researchUse}").format(
            model=result["modelId"], sha=result["weightsSha256"][:12], researchUse=twinrt.RESEARCH_USE_ONLY))
        return "\n".join(lines)


#
# ToxicityMonitorTest
#


class ToxicityMonitorTest(CaseModuleTestMixin, ScriptedLoadableModuleTest):
    """Logic tests on a small textured phantom with a parotid and an esophagus; they run in Slicer and headless.

    The shared tests are :class:`TwinRTCommon.testing.CaseModuleTestMixin`'s (the attributes below say how
    to call this module's stage and what its parameter node holds). The twin course comes from the
    DigitalTwin Logic on DigitalTwin's test phantom. The risk models of these tests are trained in the
    test for a few epochs on the twin's own trajectories with random outcomes: they are untrained and
    meaningless as predictors and only check the plumbing (features in, risks out, provenance, errors).
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    logicClass = ToxicityMonitorLogic
    stageMethodName = "monitor"
    stageArguments = ()
    invalidStageArguments = ("ct",)  # a CT where the twin belongs
    # Every stage is built (issue 8): nothing is pending.
    stageIssueText = ""
    parameterNodes = {"inputVolume": "ct"}
    parameterValues = {"threshold": 0.3, "modelPath": Path("models") / "toxicity-test.pt"}
    invalidParameterValues = {"threshold": 1.5}

    #: Course start of the tests: a Monday, so fractions fall on consecutive days.
    startDate = "2026-01-05"

    def runTest(self):
        """Run all tests of this module (Slicer's ctest and Reload and Test call only this)."""
        self.runCaseModuleTests(self.test_MonitorPhantom, self.test_BadInputsLeaveSceneUnchanged,
                                self.test_ShippedModel)

    @staticmethod
    def makeToxicityPhantom(patientId: str = "ToxicityPhantom"):
        """DigitalTwin's phantom plus a left parotid beside the target and an esophagus through it."""
        import numpy as np

        from twinrt.model import Structure, StructureType

        from DigitalTwin import DigitalTwinTest

        case = DigitalTwinTest.makeTwinPhantom(patientId)
        grid = case.ct.grid
        body = case.structure("BODY").mask
        parotid = np.zeros(grid.shape, bool)
        parotid[8:12, 10:14, 18:21] = True
        esophagus = np.zeros(grid.shape, bool)
        esophagus[6:14, 16:19, 12:15] = True
        case.structures += [Structure("Parotid_L", parotid & body, grid, (230, 180, 0), StructureType.ORGAN),
                            Structure("Esophagus", esophagus & body, grid, (190, 90, 60), StructureType.ORGAN)]
        return case

    def simulateCourse(self, upTo: int = 3, fractions: int = 5):
        """The phantom in the scene and ``upTo`` simulated fractions through the DigitalTwin Logic."""
        from DigitalTwin import DigitalTwinLogic

        twinLogic = DigitalTwinLogic()
        created = twinLogic.caseToScene(self.makeToxicityPhantom(), computeDvh=False)
        twinLogic.simulateCourse(created["ct"], created["doses"]["reference"], fractions,
                                 segmentation=created["segmentation"], upTo=upTo, startDate=self.startDate)
        return twinLogic, created

    @staticmethod
    def trainPlumbingModel(trajectories, folder, modelId: str = "toxicity-test-untrained", features=None):
        """A tiny risk model on copies of ``trajectories`` with noise and random outcomes, saved in ``folder``.

        UNTRAINED AND MEANINGLESS as a predictor (a few epochs, made-up outcomes): it only has the twin's
        feature layout (or the first ``features`` of it), so the plumbing can be checked.
        :return: the ``.pt`` path.
        """
        import numpy as np
        import torch

        from twinrt.toxicity.model import ToxicityModel
        from twinrt.toxicity.trajectory import OrganTrajectory

        # One thread: test machines are shared and a tiny GRU gains nothing from more; restored below so
        # that a test run inside Slicer leaves torch as it found it.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        rng = np.random.default_rng(7)
        cohort = []
        for patient in range(4):
            for trajectory in trajectories:
                # Alternate outcomes so that fit() sees both classes; they are made up.
                grade = patient % 2
                names = trajectory.feature_names[:features] if features else trajectory.feature_names
                noise = rng.normal(0.0, 1.0, (trajectory.fractions.size, len(names)))
                values = trajectory.features[:, :len(names)] + noise
                cohort.append(OrganTrajectory(f"P{patient}", trajectory.organ, trajectory.endpoint,
                                              trajectory.fractions, values, list(names), grade, 2 if grade else None,
                                              trajectory.n_fractions, dict(trajectory.planned)))
        try:
            # Three epochs: enough for a model with real weights and a sha256, far too few to mean anything.
            model = ToxicityModel.fit(cohort, seed=0, epochs=3, model_id=modelId)
        finally:
            torch.set_num_threads(threads)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model.save(folder / f"{modelId}.pt")
        return folder / f"{modelId}.pt"

    def assertMonitorOutputs(self, logic, twinLogic, result, modelPath, threshold) -> None:
        """Rows, risks, NTCPs, chart, flags and provenance agree with the core for ``threshold``."""
        import json

        import numpy as np

        from twinrt.toxicity.features import trajectories_from_twin
        from twinrt.toxicity.model import ToxicityModel, lkb_baseline_risk

        from TwinRTCommon import mrmlio

        trajectories = trajectories_from_twin(twinLogic.twin)
        self.assertEqual([t.organ for t in trajectories], ["Parotid_L", "Esophagus"])
        model = ToxicityModel.load(modelPath)
        records = twinLogic.twin.timeline.records
        numbers = [r.number for r in records]
        rows = mrmlio.tableToRows(result["table"])
        self.assertEqual(len(rows), len(trajectories) * len(records))
        self.assertEqual([(r["organ"], r["fraction"]) for r in rows],
                         [(t.organ, n) for t in trajectories for n in numbers])
        columns = [result["table"].GetTable().GetColumnName(i)
                   for i in range(result["table"].GetTable().GetNumberOfColumns())]
        self.assertEqual(columns[:7], ["organ", "endpoint", "fraction", "date", "risk", "ntcp_lkb", "above_threshold"])
        self.assertEqual(columns[7:], trajectories[0].feature_names)
        self.assertEqual(result["table"].GetColumnUnitLabel("bed_mean"), "Gy")
        for trajectory in trajectories:
            own = [r for r in rows if r["organ"] == trajectory.organ]
            risk = model.risk(trajectory)
            self.assertTrue(np.allclose([r["risk"] for r in own], risk, atol=1e-12))
            self.assertTrue(np.allclose(result["risks"][trajectory.organ], risk, atol=1e-12))
            self.assertAlmostEqual(own[0]["ntcp_lkb"], lkb_baseline_risk(trajectory), places=12)
            self.assertEqual([r["above_threshold"] for r in own], [float(v >= threshold) for v in risk])
            self.assertEqual(own[0]["endpoint"], trajectory.endpoint)
            self.assertAlmostEqual(own[-1]["bed_mean"], trajectory.features[-1][0], places=9)
        # Chart: one risk and one LKB line per organ, and the threshold.
        chart = result["chart"]
        self.assertEqual(chart.GetNumberOfPlotSeriesNodes(), 2 * len(trajectories) + 1)
        trend = mrmlio.tableToRows(result["trendTable"])
        self.assertEqual([r["fraction"] for r in trend], numbers)
        self.assertTrue(all(r["threshold"] == threshold for r in trend))
        # Flags: exactly the organs with a risk at or above the threshold, with the first such fraction.
        expected = {}
        for trajectory in trajectories:
            above = [n for n, v in zip(numbers, model.risk(trajectory)) if v >= threshold]
            if above:
                expected[trajectory.organ] = above[0]
        self.assertEqual({f["organ"]: f["firstFraction"] for f in result["flags"]}, expected)
        stored = json.loads(result["table"].GetAttribute(riskScene.FLAGGED_ATTRIBUTE))
        self.assertEqual({f["organ"]: f["firstFraction"] for f in stored}, expected)
        # Provenance on every output: model id, weights sha256, research use, the patient's study.
        study = twinLogic.studyItem
        for node in [result["table"], result["trendTable"], chart, *result["series"].values()]:
            self.assertEqual(node.GetAttribute(riskScene.MODEL_ID_ATTRIBUTE), model.model_id)
            self.assertEqual(node.GetAttribute(riskScene.WEIGHTS_SHA256_ATTRIBUTE), model.sha256)
            self.assertIn("Research use only", node.GetAttribute(mrmlio.RESEARCH_USE_ATTRIBUTE))
            self.assertEqual(node.GetAttribute(riskScene.THRESHOLD_ATTRIBUTE), repr(float(threshold)))
            self.assertEqual(mrmlio.studyItemOf(node), study, node.GetName())
        self.assertEqual(result["weightsSha256"], model.sha256)

    def outputCounts(self, study: int) -> dict:
        """Number of ToxicityMonitor outputs of each role in the study."""
        return {role: len(riskScene.findOutputs(slicer.mrmlScene, study, role)) for role in riskScene.OUTPUT_ROLES}

    def test_MonitorPhantom(self):
        """Risks, NTCP, chart, flags at thresholds 0 and 1, provenance; re-runs (also from a timeline) replace."""
        import tempfile

        from TwinRTCommon import mrmlio

        self.delayDisplay("Toxicity monitor on a simulated course")
        twinLogic, created = self.simulateCourse(upTo=3)
        logic = ToxicityMonitorLogic()
        with tempfile.TemporaryDirectory() as folder:
            from twinrt.toxicity.features import trajectories_from_twin

            modelPath = self.trainPlumbingModel(trajectories_from_twin(twinLogic.twin), folder)
            # Threshold 0: every organ is flagged at its first fraction.
            result = logic.monitor(twinLogic, modelPath, 0.0, planningVolume=created["ct"])
            self.assertMonitorOutputs(logic, twinLogic, result, modelPath, 0.0)
            self.assertEqual(sorted(f["organ"] for f in result["flags"]), ["Esophagus", "Parotid_L"])
            self.assertTrue(all(f["firstFraction"] == 1 for f in result["flags"]))
            counts = self.outputCounts(twinLogic.studyItem)
            self.assertEqual(counts, {riskScene.ROLE_RISK_TABLE: 1, riskScene.ROLE_TREND_TABLE: 1,
                                      riskScene.ROLE_CHART: 1, riskScene.ROLE_SERIES: 5})
            # Threshold 1 (a sigmoid never reaches it): nothing flagged; the re-run replaced the outputs.
            nodeCount = slicer.mrmlScene.GetNumberOfNodes()
            result = logic.monitor(twinLogic, modelPath, 1.0)
            self.assertMonitorOutputs(logic, twinLogic, result, modelPath, 1.0)
            self.assertEqual(result["flags"], [])
            self.assertEqual(self.outputCounts(twinLogic.studyItem), counts)
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
            self.assertIn("No organ reached", logic.flagsText(result))
            # A saved timeline of the same patient: the outputs go to the same study, replacing these.
            twinLogic.saveTimeline(Path(folder) / "timeline")
            again = logic.monitor(str(Path(folder) / "timeline"), modelPath, 0.5)
            self.assertEqual(again["studyItem"], twinLogic.studyItem)
            self.assertEqual(self.outputCounts(twinLogic.studyItem), counts)
            for organ, risk in result["risks"].items():
                self.assertTrue((abs(again["risks"][organ] - risk) < 1e-9).all(), organ)
            # The same folder in an empty scene: the planning case comes in and gets the outputs.
            slicer.mrmlScene.Clear()
            fromFile = logic.monitor(str(Path(folder) / "timeline"), modelPath, 0.5)
            self.assertTrue(fromFile["studyItem"])
            self.assertEqual(self.outputCounts(fromFile["studyItem"]), counts)
            ct = logic.findCtVolume()
            self.assertIsNotNone(ct)
            self.assertEqual(mrmlio.studyItemOf(ct), fromFile["studyItem"])
        self.delayDisplay("Test passed")

    def test_BadInputsLeaveSceneUnchanged(self):
        """No fraction yet, another patient, a missing, tampered or mismatched model: typed errors, no change."""
        import shutil
        import tempfile

        from twinrt.errors import InvalidInputError, MissingInputError
        from twinrt.toxicity.features import trajectories_from_twin
        from twinrt.toxicity.model import FeatureMismatchError, WeightsIntegrityError

        from DigitalTwin import DigitalTwinLogic

        from TwinRTCommon.testing import makeSyntheticCase, sceneState

        self.delayDisplay("Bad inputs")
        logic = ToxicityMonitorLogic()
        twinLogic, created = self.simulateCourse(upTo=2)
        with tempfile.TemporaryDirectory() as folder:
            modelPath = self.trainPlumbingModel(trajectories_from_twin(twinLogic.twin), Path(folder) / "good")
            logic.monitor(twinLogic, modelPath, 0.5)  # earlier outputs, which must survive every refusal
            before = sceneState(slicer.mrmlScene)

            # Tampered weights: one byte changed after the manifest was written.
            tampered = Path(folder) / "tampered"
            shutil.copytree(modelPath.parent, tampered)
            weights = tampered / modelPath.name
            data = bytearray(weights.read_bytes())
            data[len(data) // 2] ^= 0xFF
            weights.write_bytes(bytes(data))
            with self.assertRaises(WeightsIntegrityError):
                logic.monitor(twinLogic, weights, 0.5)
            # A model trained on other features (the first ten only).
            other = self.trainPlumbingModel(trajectories_from_twin(twinLogic.twin), Path(folder) / "other",
                                            "toxicity-test-other-features", features=10)
            with self.assertRaises(FeatureMismatchError):
                logic.monitor(twinLogic, other, 0.5)
            # No model there: the message says how to train one.
            with self.assertRaises(MissingInputError) as context:
                logic.monitor(twinLogic, Path(folder) / "nowhere" / "model.pt", 0.5)
            self.assertIn("twinrt toxicity train", str(context.exception))
            # No twin, a bad threshold, a CT of another patient.
            with self.assertRaises(InvalidInputError):
                logic.monitor(DigitalTwinLogic(), modelPath, 0.5)
            with self.assertRaises(InvalidInputError):
                logic.monitor(twinLogic, modelPath, 1.5)
            self.assertEqual(sceneState(slicer.mrmlScene), before)
            stranger = logic.caseToScene(makeSyntheticCase("Stranger"), computeDvh=False)["ct"]
            strangerState = sceneState(slicer.mrmlScene)
            with self.assertRaises(InvalidInputError):
                logic.monitor(twinLogic, modelPath, 0.5, planningVolume=stranger)
            self.assertEqual(sceneState(slicer.mrmlScene), strangerState)
            slicer.mrmlScene.RemoveNode(stranger)
            # A twin without fractions yet (DigitalTwin's buildTwin, another patient in the same scene).
            empty = DigitalTwinLogic()
            fresh = empty.caseToScene(self.makeToxicityPhantom("ToxicityPhantomEmpty"), computeDvh=False)
            empty.buildTwin(fresh["ct"], fresh["segmentation"], fresh["doses"]["reference"], 5, self.startDate)
            emptyState = sceneState(slicer.mrmlScene)
            with self.assertRaises(InvalidInputError) as context:
                logic.monitor(empty, modelPath, 0.5)
            self.assertIn("no fraction", str(context.exception))
            self.assertEqual(sceneState(slicer.mrmlScene), emptyState)
        self.delayDisplay("Test passed")

    def test_ShippedModel(self):
        """Opt-in (TWINRT_TEST_REAL_MODELS=1): the shipped model takes the twin's features and gives risks in 0..1."""
        import numpy as np

        if not os.environ.get("TWINRT_TEST_REAL_MODELS"):
            self.delayDisplay("Shipped model test skipped: set TWINRT_TEST_REAL_MODELS=1 to run it")
            return
        self.delayDisplay("Shipped toxicity model")
        logic = ToxicityMonitorLogic()
        self.assertTrue(logic.defaultModelPath().is_file(), logic.defaultModelPath())
        twinLogic, created = self.simulateCourse(upTo=2)
        result = logic.monitor(twinLogic, None, 0.5, planningVolume=created["ct"])
        self.assertEqual(result["modelId"], "toxicity-gruae-v2")
        for risk in result["risks"].values():
            self.assertTrue(np.all((risk >= 0.0) & (risk <= 1.0)))
        self.delayDisplay("Test passed")
