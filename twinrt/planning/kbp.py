"""Knowledge-based planning: a predicted dose becomes voxel-wise dose-mimicking objectives.

A dose prediction (e.g. :mod:`twinrt.dosepredict`, with its per-voxel standard deviation) is what a
good plan for this anatomy looks like. :func:`mimicking_objectives` turns it into objectives for the
fluence optimiser (:class:`twinrt.planning.objectives.DoseMimicking`):

* every target: coverage first, as in :func:`~twinrt.planning.workflow.default_objectives`
  (squared underdose below 95 % of its prescription, weight :data:`TARGET_UNDERDOSE_WEIGHT`), then
  "not below the prediction" (``side="lower"``, :data:`TARGET_WEIGHT`) and a hot-spot limit at
  107 % of the prescription (:data:`TARGET_HOT_WEIGHT`);
* every organ at risk: "not above the prediction" (``side="upper"``, :data:`ORGAN_WEIGHT`);
* the body: "not above the prediction" (:data:`BODY_WEIGHT`).

With an uncertainty dose each voxel pulls ``1 / (1 + (σ/σ₀)²)`` as much (σ₀ = :data:`SIGMA0_GY`):
where the model is unsure, the plan is freer. :func:`plan_from_prediction` runs the whole chain
(dij, optimisation against the prediction, leaf sequencing) and returns an ordinary
:class:`~twinrt.planning.workflow.PlanningResult` whose plan is UNAPPROVED like every other.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twinrt.errors import InvalidInputError
from twinrt.model import Case, Dose, Prescription, StructureType
from twinrt.planning.workflow import (PlanningResult, PlanSetup, _prescriptions, _sub_progress, body_structure,
                                      optimize_and_sequence, prepare_problem)
from twinrt.progress import CancelToken, ProgressCallback, report

#: Objective weights (the optimiser's priorities; see :mod:`twinrt.planning.objectives`).
TARGET_UNDERDOSE_WEIGHT = 3000.0
TARGET_WEIGHT = 1000.0
TARGET_HOT_WEIGHT = 300.0
ORGAN_WEIGHT = 100.0
BODY_WEIGHT = 30.0
#: σ₀ (Gy) of the uncertainty weighting.
SIGMA0_GY = 2.0
#: Names under which the prediction and its standard deviation reach the optimiser.
PREDICTED = "predicted"
PREDICTED_STD = "predicted_std"


def mimicking_objectives(case: Case, prescriptions: Optional[Sequence[Prescription]] = None,
                         with_uncertainty: bool = False, reference: str = PREDICTED,
                         uncertainty: str = PREDICTED_STD) -> list[dict[str, Any]]:
    """Objective dicts that make a plan follow the reference dose ``reference`` (rules: module docstring).

    :param case: the case (its non-empty organs and the body get objectives).
    :param prescriptions: default the case's prescriptions.
    :param with_uncertainty: weight voxels by the standard-deviation dose named ``uncertainty``.
    :param reference: name of the reference (predicted) dose.
    :param uncertainty: name of its standard-deviation dose.
    """
    pres = _prescriptions(case, prescriptions)
    extra = {"uncertainty": uncertainty, "sigma0_gy": SIGMA0_GY} if with_uncertainty else {}
    objs: list[dict[str, Any]] = []
    for p in pres:
        objs.append({"structure": p.target, "kind": "squared_underdose", "dose_gy": 0.95 * p.dose_gy,
                     "weight": TARGET_UNDERDOSE_WEIGHT})
        objs.append({"structure": p.target, "kind": "dose_mimicking", "reference": reference, "side": "lower",
                     "weight": TARGET_WEIGHT, **extra})
        objs.append({"structure": p.target, "kind": "squared_overdose", "dose_gy": 1.07 * p.dose_gy,
                     "weight": TARGET_HOT_WEIGHT})
    targets = {p.target.lower() for p in pres}
    for s in case.structures:
        if s.is_empty or s.name.lower() in targets or s.type != StructureType.ORGAN:
            continue
        objs.append({"structure": s.name, "kind": "dose_mimicking", "reference": reference, "side": "upper",
                     "weight": ORGAN_WEIGHT, **extra})
    objs.append({"structure": body_structure(case).name, "kind": "dose_mimicking", "reference": reference,
                 "side": "upper", "weight": BODY_WEIGHT, **extra})
    return objs


def plan_from_prediction(case: Case, predicted: Dose, predicted_std: Optional[Dose] = None,
                         setup: Optional[PlanSetup] = None, prescriptions: Optional[Sequence[Prescription]] = None,
                         objectives: Optional[Sequence[dict[str, Any]]] = None, label: str = "TwinRT KBP",
                         progress: Optional[ProgressCallback] = None,
                         cancel: Optional[CancelToken] = None) -> PlanningResult:
    """A deliverable plan that approximates a predicted dose (knowledge-based planning).

    :param case: CT (HU) with structures and prescriptions.
    :param predicted: the predicted dose (Gy, any grid; resampled onto the dose grid).
    :param predicted_std: its per-voxel standard deviation (Gy), or ``None``.
    :param setup: beams and parameters (default :class:`~twinrt.planning.workflow.PlanSetup`).
    :param prescriptions: default the case's prescriptions.
    :param objectives: default :func:`mimicking_objectives` (with the uncertainty when given).
    :param label: RT plan label.
    :param progress: ``progress(fraction, text)``; :param cancel: cancel token.
    :return: the plan, its sequenced dose and the optimisation record (objectives included).
    :raises InvalidInputError: a prediction that is not a Dose or is zero in every target; what
        :func:`~twinrt.planning.workflow.plan_case` raises.
    """
    if not isinstance(predicted, Dose) or (predicted_std is not None and not isinstance(predicted_std, Dose)):
        raise InvalidInputError("The prediction and its uncertainty must be Dose objects (Gy)")
    pres = _prescriptions(case, prescriptions)
    for p in pres:
        mask = case.structure(p.target).on_grid(predicted.grid)
        if not mask.any() or float(predicted.array[mask].max()) <= 0.0:
            raise InvalidInputError(f"The predicted dose is zero in target '{p.target}': check that the prediction "
                                    "belongs to this case (same patient and frame of reference)")
    objs = list(objectives) if objectives is not None else mimicking_objectives(
        case, pres, with_uncertainty=predicted_std is not None)
    report(progress, 0.0, "Preparing the dose-influence matrix", cancel)
    problem = prepare_problem(case, setup, pres, _sub_progress(progress, 0.0, 0.45), cancel)
    doses = {PREDICTED: predicted}
    if predicted_std is not None:
        doses[PREDICTED_STD] = predicted_std
    problem.set_reference_doses(doses)
    return optimize_and_sequence(problem, objs, label=label, progress=_sub_progress(progress, 0.45, 1.0),
                                 cancel=cancel)
