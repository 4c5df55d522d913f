"""TwinRT's planner as a SlicerRT plan optimizer ("TwinRT" in External Beam Planning).

UNTESTED HERE: TwinRT's test suite runs without SlicerRT (there is no SlicerRT build outside the
Slicer application), so this adapter has only been checked against SlicerRT's source, not run.
The AIPlanner module's own panel (``AIPlannerLogic.createPlan``) is the tested path.

It follows SlicerRT's scripted plan-optimizer interface as pyRadPlanPlanOptimizer uses it
(SlicerRt/SlicerRT: ExternalBeamPlanning/Widgets/Python/PlanOptimizers/pyRadPlanPlanOptimizer.py):
a subclass of ``AbstractScriptedPlanOptimizer`` sets its ``name``, returns its objectives from
``setAvailableObjectives`` and fills the result volume in ``optimizePlanUsingOptimizer(planNode,
objectives, resultOptimizationVolumeNode)``, reporting through ``progressInfoUpdated``. The C++
adaptor (``qSlicerScriptedPlanOptimizer::setPythonSource``) looks the class up by the file's base
name with "PlanOptimizer" appended, in the module ``PlanOptimizers.<base name>``;
:func:`registerPlanOptimizer` puts this module there and names the class accordingly.

The plan node gives the CT (reference volume), the structures, the target segment, the
prescription and the beams (gantry and couch angles) and the isocentre; the objective nodes give
the objectives. The planning itself is :func:`twinrt.planning.workflow.plan_case`, as in the module.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

try:  # SlicerRT's Python package of plan optimizers; absent without SlicerRT (and headless).
    from PlanOptimizers import AbstractScriptedPlanOptimizer
except ImportError:
    AbstractScriptedPlanOptimizer = None

#: Display name of the optimizer in External Beam Planning.
OPTIMIZER_NAME = "TwinRT"

#: SlicerRT/pyRadPlan objective names -> TwinRT objective kinds and their parameter names.
#: The parameters of a ``vtkMRMLRTObjectiveNode`` are its attributes (pyRadPlanPlanOptimizer reads
#: them so); ``penalty`` is the weight.
OBJECTIVE_KINDS = {
    "Squared Deviation": ("squared_deviation", {"d_ref": "dose_gy"}),
    "Squared Overdosing": ("squared_overdose", {"d_max": "dose_gy"}),
    "Squared Underdosing": ("squared_underdose", {"d_min": "dose_gy"}),
    "Mean Dose": ("mean_dose", {"d_ref": "dose_gy"}),
    "Max DVH": ("max_dvh", {"d": "dose_gy", "v_max": "volume_percent"}),
    "Min DVH": ("min_dvh", {"d": "dose_gy", "v_min": "volume_percent"}),
}


def objectiveFromNode(objectiveName: str, segmentName: str, attributes: dict[str, str]) -> dict[str, Any]:
    """A TwinRT objective dict from a SlicerRT objective node's name, segment and attributes.

    :param objectiveName: the objective node's name (an :data:`OBJECTIVE_KINDS` key).
    :param segmentName: name of the segment the objective applies to.
    :param attributes: the node's attributes (parameter name -> text), ``penalty`` among them.
    :raises ValueError: an objective TwinRT has no equivalent for, or a parameter that is not a number.
    """
    if objectiveName not in OBJECTIVE_KINDS:
        raise ValueError(f"TwinRT has no objective '{objectiveName}'; use one of {', '.join(OBJECTIVE_KINDS)}")
    kind, parameterNames = OBJECTIVE_KINDS[objectiveName]
    objective: dict[str, Any] = {"structure": segmentName, "kind": kind,
                                 "weight": float(attributes.get("penalty") or 1.0)}
    for slicerRtName, key in parameterNames.items():
        if attributes.get(slicerRtName) not in (None, ""):
            objective[key] = float(attributes[slicerRtName])
    return objective


def _objectiveNodeAttributes(node) -> dict[str, str]:
    return {name: node.GetAttribute(name) for name in node.GetAttributeNames()}


class _TwinRTPlanOptimizerBase:
    """The optimizer without SlicerRT's base class, so that it can be imported (and read) anywhere."""

    def __init__(self, scriptedPlanOptimizer):
        scriptedPlanOptimizer.name = OPTIMIZER_NAME
        self.scriptedPlanOptimizer = scriptedPlanOptimizer

    def _progress(self, text: str) -> None:
        # progressInfoUpdated is what pyRadPlanPlanOptimizer calls; older SlicerRT builds lack it.
        if hasattr(self.scriptedPlanOptimizer, "progressInfoUpdated"):
            self.scriptedPlanOptimizer.progressInfoUpdated(text)
        logging.info("TwinRT plan optimizer: %s", text)

    def setAvailableObjectives(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The objectives offered in SlicerRT's objectives table, with default parameters."""
        defaults = {"dose_gy": 0.0, "volume_percent": 50.0}
        return {name: {**{p: {"default": defaults[key]} for p, key in parameters.items()}, "penalty": {"default": 1.0}}
                for name, (_kind, parameters) in OBJECTIVE_KINDS.items()}

    def optimizePlanUsingOptimizer(self, planNode, objectives, resultOptimizationVolumeNode) -> str:
        """Plan with TwinRT and put the planned dose (Gy) into ``resultOptimizationVolumeNode``.

        :param planNode: SlicerRT's ``vtkMRMLRTPlanNode`` (CT, segmentation, target, Rx, beams).
        :param objectives: ``[{"ObjectiveNode": vtkMRMLRTObjectiveNode}, ...]``; none: TwinRT's defaults.
        :param resultOptimizationVolumeNode: the volume SlicerRT created for the result.
        :return: "" on success, else the error message (SlicerRT's convention).
        """
        try:
            self._optimize(planNode, objectives, resultOptimizationVolumeNode)
        except Exception as exc:  # SlicerRT expects a message, not an exception, from a plugin
            logging.exception("TwinRT plan optimizer failed")
            return str(exc)
        return ""

    def _optimize(self, planNode, objectives, resultNode) -> None:
        import numpy as np
        import slicer

        from twinrt.model import Prescription
        from twinrt.planning.workflow import PlanSetup, plan_case

        from TwinRTCommon import mrmlio

        ct, segmentation = planNode.GetReferenceVolumeNode(), planNode.GetSegmentationNode()
        targetId = planNode.GetTargetSegmentID()
        if ct is None or segmentation is None or not targetId:
            raise ValueError("Select the reference volume, the segmentation and the target segment of the plan")
        self._progress("reading the case")
        case = mrmlio.sceneToCase(planNode.GetScene(), ct, segmentation)
        targetName = segmentation.GetSegmentation().GetSegment(targetId).GetName()
        # Beam numbers need not be contiguous; look numbers up until every beam is found, as
        # pyRadPlanPlanOptimizer does.
        gantry, couch, number = [], set(), 0
        while len(gantry) < planNode.GetNumberOfBeams() and number < 10000:
            beam = planNode.GetBeamByNumber(number)
            number += 1
            if beam is not None:
                gantry.append(float(beam.GetGantryAngle()))
                couch.add(float(beam.GetCouchAngle()))
        if not gantry:
            raise ValueError("The plan has no beams; add beams in External Beam Planning first")
        if len(couch) > 1:
            raise ValueError("TwinRT plans one couch angle for all beams; set the same couch angle on every beam")
        isocenterRas = [0.0, 0.0, 0.0]
        planNode.GetIsocenterPosition(isocenterRas)
        isocenterLps = (-isocenterRas[0], -isocenterRas[1], isocenterRas[2])
        setup = PlanSetup(gantry_deg=tuple(gantry), couch_deg=couch.pop(), isocenter_mm=isocenterLps)
        objectiveDicts: Optional[list] = None
        if objectives:
            objectiveDicts = []
            for item in objectives:
                node = item["ObjectiveNode"]
                segmentName = node.GetSegmentationNode().GetSegmentation().GetSegment(node.GetSegmentID()).GetName()
                objectiveDicts.append(objectiveFromNode(node.GetName(), segmentName, _objectiveNodeAttributes(node)))
        # SlicerRT's plan holds the total prescribed dose only; MU are then per whole treatment.
        prescription = Prescription(targetName, float(planNode.GetRxDose()), 1)
        self._progress("optimizing fluence")
        result = plan_case(case, objectiveDicts, setup, [prescription],
                           progress=lambda fraction, text: self._progress(f"{100 * fraction:.0f} %: {text}"))
        self._progress("writing the dose")
        dose = result.dose
        resultNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(dose.grid.ijk_to_ras()))
        slicer.util.updateVolumeFromArray(resultNode, np.asarray(dose.array, np.float32))
        resultNode.SetAttribute(mrmlio.DOSE_VOLUME_ATTRIBUTE, "1")


if AbstractScriptedPlanOptimizer is not None:
    class TwinRTPlanOptimizer(_TwinRTPlanOptimizerBase, AbstractScriptedPlanOptimizer):
        """TwinRT's planner in SlicerRT's External Beam Planning (see the module docstring)."""

        def __init__(self, scriptedPlanOptimizer):
            AbstractScriptedPlanOptimizer.__init__(self, scriptedPlanOptimizer)
            _TwinRTPlanOptimizerBase.__init__(self, scriptedPlanOptimizer)
else:
    TwinRTPlanOptimizer = _TwinRTPlanOptimizerBase

# qSlicerScriptedPlanOptimizer looks for "<file base name>PlanOptimizer" in this module.
slicerRtOptimizerPlanOptimizer = TwinRTPlanOptimizer


def registerPlanOptimizer() -> bool:
    """Register :class:`TwinRTPlanOptimizer` with SlicerRT's plan-optimizer handler, when SlicerRT is there.

    :return: True when registered; False (and a log line) without SlicerRT or when registration fails,
        which never stops the AIPlanner module from loading.
    """
    if AbstractScriptedPlanOptimizer is None:
        logging.debug("SlicerRT's PlanOptimizers package is not available; TwinRT plan optimizer not registered")
        return False
    try:
        import qSlicerExternalBeamPlanningModuleWidgetsPythonQt as planOptimizers
    except ImportError:
        logging.debug("SlicerRT's External Beam Planning widgets are not available; TwinRT optimizer not registered")
        return False
    try:
        # The adaptor finds the class in PlanOptimizers.<file base name> without loading the file again.
        sys.modules[f"PlanOptimizers.{__name__.rsplit('.', 1)[-1]}"] = sys.modules[__name__]
        scripted = planOptimizers.qSlicerScriptedPlanOptimizer(None)
        if not scripted.setPythonSource(__file__):
            logging.warning("SlicerRT did not accept the TwinRT plan optimizer (%s)", __file__)
            return False
        scripted.self().register()
    except Exception:  # a SlicerRT API change must not stop AIPlanner from loading
        logging.exception("Registering the TwinRT plan optimizer with SlicerRT failed")
        return False
    return True
