"""TwinRT's dose prediction as a SlicerRT dose engine ("TwinRT DosePredict" in External Beam Planning).

UNTESTED HERE: TwinRT's test suite runs without SlicerRT (there is no SlicerRT build outside the
Slicer application), so this adapter has only been checked against SlicerRT's source, not run. The
DosePredict module's own panel (``DosePredictLogic.predictDose``) is the tested path; the headless
tests check only that this file stays out of the way without SlicerRT.

It follows SlicerRT's scripted dose-engine interface (SlicerRt/SlicerRT:
ExternalBeamPlanning/Widgets/Python/DoseEngines/AbstractScriptedDoseEngine.py, and the example in
SlicerRt/SlicerRTExampleDoseEngine): a subclass of ``AbstractScriptedDoseEngine`` sets its ``name``
and fills ``resultDoseVolumeNode`` in ``calculateDoseUsingEngine(beamNode, resultDoseVolumeNode)``,
returning "" on success or an error message. The C++ adaptor
(``qSlicerScriptedDoseEngine::setPythonSource``) looks the class up in the top-level module named
after the file's base name, and, as that name ends in "Engine", under the same name;
:func:`registerDoseEngine` puts this module there and names the class accordingly.

SlicerRT asks for one beam at a time and sums the beams into the plan's dose, whereas the model
predicts the dose of the whole plan from the CT and the structures (it knows nothing of beams). So
the prediction is made once per plan (cached while the plan's inputs stay the same) and every beam
gets an equal share of it: the plan's total is the prediction, a single beam's dose means nothing.
The plan's target segment and prescription decide which model PTV the target is: its prescription
must be 56, 63 or 70 Gy (within 1 Gy), the prescriptions the model was trained on.
"""

from __future__ import annotations

import logging
import sys

try:  # SlicerRT's Python package of dose engines; absent without SlicerRT (and headless).
    from DoseEngines import AbstractScriptedDoseEngine
except ImportError:
    AbstractScriptedDoseEngine = None

#: Display name of the engine in External Beam Planning.
ENGINE_NAME = "TwinRT DosePredict (AI, research use only)"


class _DosePredictDoseEngineBase:
    """The engine without SlicerRT's base class, so that it can be imported (and read) anywhere."""

    def __init__(self, scriptedEngine):
        scriptedEngine.name = ENGINE_NAME
        self.scriptedEngine = scriptedEngine
        #: ``(key, dose array)`` of the last plan predicted; the key holds the plan's inputs.
        self._cache = None

    def defineBeamParameters(self) -> None:
        """No beam parameters: the model predicts from the CT and the structures alone."""

    def updateBeamParametersForIonPlan(self, isIonPlanActive: bool) -> None:
        """Nothing to change: the model predicts photon IMRT doses only."""

    def calculateDoseUsingEngine(self, beamNode, resultDoseVolumeNode) -> str:
        """Fill ``resultDoseVolumeNode`` with this beam's share of the predicted plan dose (Gy).

        :param beamNode: SlicerRT's ``vtkMRMLRTBeamNode``; its parent plan gives the CT, the
            structures, the target and the prescription.
        :param resultDoseVolumeNode: the volume SlicerRT created for the beam's dose.
        :return: "" on success, else the error message (SlicerRT's convention).
        """
        try:
            self._calculate(beamNode, resultDoseVolumeNode)
        except Exception as exc:  # SlicerRT expects a message, not an exception, from an engine
            logging.exception("TwinRT DosePredict dose engine failed")
            return str(exc)
        return ""

    def _planDose(self, planNode):
        """The predicted dose (Gy, (k, j, i) on the CT grid) of the plan, predicted once per set of inputs."""
        from DosePredict import DosePredictLogic

        ct, segmentation = planNode.GetReferenceVolumeNode(), planNode.GetSegmentationNode()
        targetId = planNode.GetTargetSegmentID()
        if ct is None or segmentation is None or not targetId:
            raise ValueError("Select the reference volume, the segmentation and the target segment of the plan")
        targetName = segmentation.GetSegmentation().GetSegment(targetId).GetName()
        prescriptionGy = float(planNode.GetRxDose())
        key = (ct.GetID(), ct.GetMTime(), segmentation.GetID(), segmentation.GetMTime(), targetName, prescriptionGy)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], ct
        logic = DosePredictLogic()
        roiMap = logic.suggestRoiMapping(segmentation, prescriptions={targetName: prescriptionGy})
        if targetName not in roiMap.values():
            raise ValueError(f"The target '{targetName}' with {prescriptionGy:g} Gy is not one the dose model knows: "
                             "it predicts plans of 56, 63 or 70 Gy targets; set the plan's prescription to one of them")
        prediction = logic.runPrediction(ct, segmentation, roiMap=roiMap, mcSamples=0,
                                         progress=lambda fraction, text: self._progress(fraction, text))
        self._cache = (key, prediction["dose"].array)
        return prediction["dose"].array, ct

    def _progress(self, fraction: float, text: str) -> None:
        logging.info("TwinRT DosePredict dose engine: %.0f %% %s", 100 * fraction, text)

    def _calculate(self, beamNode, resultNode) -> None:
        import numpy as np
        import slicer
        import vtk

        from TwinRTCommon import mrmlio

        planNode = beamNode.GetParentPlanNode()
        if planNode is None:
            raise ValueError("The beam belongs to no plan")
        planDose, ct = self._planDose(planNode)
        beams = max(int(planNode.GetNumberOfBeams()), 1)
        # The plan's predicted dose shared equally: SlicerRT's sum over the beams gives it back.
        matrix = vtk.vtkMatrix4x4()
        ct.GetIJKToRASMatrix(matrix)
        resultNode.SetIJKToRASMatrix(matrix)
        slicer.util.updateVolumeFromArray(resultNode, np.ascontiguousarray(planDose / beams, dtype=np.float32))
        resultNode.SetAttribute(mrmlio.DOSE_VOLUME_ATTRIBUTE, "1")


if AbstractScriptedDoseEngine is not None:
    class TwinRTDoseEngine(_DosePredictDoseEngineBase, AbstractScriptedDoseEngine):
        """TwinRT's dose prediction in SlicerRT's External Beam Planning (see the module docstring)."""

        def __init__(self, scriptedEngine):
            AbstractScriptedDoseEngine.__init__(self, scriptedEngine)
            _DosePredictDoseEngineBase.__init__(self, scriptedEngine)
else:
    TwinRTDoseEngine = _DosePredictDoseEngineBase

# qSlicerScriptedDoseEngine looks for the class named like the file (it ends in "Engine") in the
# top-level module of that name.
slicerRtDoseEngine = TwinRTDoseEngine


def registerDoseEngine() -> bool:
    """Register :class:`TwinRTDoseEngine` with SlicerRT's dose-engine handler, when SlicerRT is there.

    :return: True when registered; False (and a log line) without SlicerRT or when registration fails,
        which never stops the DosePredict module from loading.
    """
    if AbstractScriptedDoseEngine is None:
        logging.debug("SlicerRT's DoseEngines package is not available; TwinRT dose engine not registered")
        return False
    try:
        import qSlicerExternalBeamPlanningModuleWidgetsPythonQt as engines
    except ImportError:
        logging.debug("SlicerRT's External Beam Planning widgets are not available; TwinRT dose engine not registered")
        return False
    try:
        # The adaptor finds the class in the module "slicerRtDoseEngine" without loading the file again.
        sys.modules[__name__.rsplit(".", 1)[-1]] = sys.modules[__name__]
        scripted = engines.qSlicerScriptedDoseEngine(None)
        if not scripted.setPythonSource(__file__):
            logging.warning("SlicerRT did not accept the TwinRT dose engine (%s)", __file__)
            return False
        scripted.self().register()
    except Exception:  # a SlicerRT API change must not stop DosePredict from loading
        logging.exception("Registering the TwinRT dose engine with SlicerRT failed")
        return False
    return True
