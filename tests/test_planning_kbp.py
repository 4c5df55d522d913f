"""Knowledge-based planning: a (predicted) dose as voxel-wise dose-mimicking objectives, on the phantom."""

import numpy as np
import pytest

from test_planning_workflow import phantom_case
from twinrt import dvh
from twinrt.errors import InvalidInputError
from twinrt.model import Dose
from twinrt.planning.kbp import mimicking_objectives, plan_from_prediction
from twinrt.planning.workflow import PlanSetup, plan_case

SETUP = PlanSetup.equispaced(5, dose_grid_mm=4.0, max_iter=80, levels=8)


@pytest.fixture(scope="module")
def reference():
    """A plan made with the default objectives: its dose plays the role of a prediction."""
    case = phantom_case()
    return case, plan_case(case, setup=SETUP).optimized_dose


def _organ_mean(case, dose):
    return dvh.structure_dvh(dose, case.structure("Organ"), sampling="dose").mean_gy


def _ptv_d95(case, dose):
    return dvh.structure_dvh(dose, case.structure("PTV"), sampling="dose").dose_at_volume_percent(95)


def test_objectives_cover_targets_organs_and_body(reference):
    case, _ = reference
    objs = mimicking_objectives(case)
    kinds = {(o["structure"], o["kind"], o.get("side")) for o in objs}
    assert ("PTV", "dose_mimicking", "lower") in kinds and ("Organ", "dose_mimicking", "upper") in kinds
    assert ("Body", "dose_mimicking", "upper") in kinds and ("PTV", "squared_underdose", None) in kinds
    assert all("uncertainty" not in o for o in objs)
    assert all(o.get("uncertainty") == "predicted_std" for o in mimicking_objectives(case, with_uncertainty=True)
               if o["kind"] == "dose_mimicking")


def test_plan_follows_the_prediction(reference):
    """Mimicking an achievable dose reproduces it; a prediction with a cooler organ gives a cooler organ."""
    case, ref = reference
    same = plan_from_prediction(case, ref, setup=SETUP)
    # Organs: "not above the prediction" (it may go below).
    assert _organ_mean(case, same.optimized_dose) < _organ_mean(case, ref) + 1.0
    assert _ptv_d95(case, same.optimized_dose) > 0.9 * 60.0
    assert same.plan.approval == "UNAPPROVED"
    assert any(o["kind"] == "dose_mimicking" for o in same.objectives)
    # The same prediction with the organ 40 % cooler: the organ follows down.
    organ = case.structure("Organ").on_grid(ref.grid)
    cooler = Dose(np.where(organ, 0.6 * ref.array, ref.array), ref.grid, name="predicted")
    cool = plan_from_prediction(case, cooler, setup=SETUP)
    assert _organ_mean(case, cool.optimized_dose) < _organ_mean(case, same.optimized_dose) - 1.0


def test_uncertain_voxels_pull_less(reference):
    case, ref = reference
    organ = case.structure("Organ").on_grid(ref.grid)
    cooler = Dose(np.where(organ, 0.3 * ref.array, ref.array), ref.grid, name="predicted")
    sure = plan_from_prediction(case, cooler, Dose(np.zeros_like(ref.array), ref.grid), setup=SETUP)
    unsure = plan_from_prediction(case, cooler, Dose(np.where(organ, 20.0, 0.0), ref.grid), setup=SETUP)
    # A 20 Gy standard deviation in the organ (σ0 = 2 Gy) nearly frees it: it ends up hotter.
    assert _organ_mean(case, unsure.optimized_dose) > _organ_mean(case, sure.optimized_dose) + 0.5


def test_prediction_of_another_case_is_refused(reference):
    case, ref = reference
    with pytest.raises(InvalidInputError, match="zero in target 'PTV'"):
        plan_from_prediction(case, Dose(np.zeros_like(ref.array), ref.grid), setup=SETUP)
    with pytest.raises(InvalidInputError, match="Dose objects"):
        plan_from_prediction(case, ref.array, setup=SETUP)
