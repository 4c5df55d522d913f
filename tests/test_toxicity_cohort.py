"""ToxicityMonitor's cohort simulator (issue 8): prepared cases, hidden truth, outcomes, twin features.

Small cohorts (2 patients, 4 fractions) on the bundled sample patient; the reported cohorts are
made by ``bench/toxicity_cohort.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from twinrt.errors import InvalidInputError
from twinrt.toxicity.cohort import (ORGAN_ENDPOINTS, TRUTH, ToxicityTruth, EndpointTruth, prepare_case,
                                    simulate_cohort, simulate_patient)


@pytest.fixture(scope="module")
def prepared():
    from twinrt.sample import load_sample_case

    return prepare_case(load_sample_case(), list(ORGAN_ENDPOINTS))


def test_prepare_case_crops_and_coarsens(prepared):
    from twinrt.sample import load_sample_case

    full = load_sample_case()
    g, f = prepared.ct.grid, full.ct.grid
    assert g.spacing_mm[0] == pytest.approx(2 * f.spacing_mm[0]) and g.spacing_mm[2] == pytest.approx(f.spacing_mm[2])
    assert np.prod(g.shape) < np.prod(f.shape) / 8
    names = {s.name for s in prepared.structures}
    assert {"LeftParotid", "RightParotid", "Esophagus", "PTV70"} <= names
    # Volumes survive the coarsening within 15 %; the dose keeps its level.
    for name in ("LeftParotid", "PTV70"):
        assert prepared.structure(name).volume_cc == pytest.approx(full.structure(name).volume_cc, rel=0.15)
    assert prepared.doses["reference"].max_gy == pytest.approx(full.doses["reference"].max_gy, rel=0.1)
    with pytest.raises(InvalidInputError):
        prepare_case(type(full)("X", full.ct, [], dict(full.doses)), ["LeftParotid"])


def test_simulated_patient_truth_and_trajectories(prepared):
    trajs, hidden = simulate_patient(prepared, "p0", seed=11, n_fractions=4)
    organs = {t.organ for t in trajs}
    assert organs == {"LeftParotid", "RightParotid", "Esophagus"}
    for t in trajs:
        assert t.endpoint == ORGAN_ENDPOINTS[t.organ]
        assert list(t.fractions) == [1, 2, 3, 4] and t.features.shape[0] == 4
        z = hidden.damage[t.organ]
        assert len(z) == 4 and all(b >= a for a, b in zip(z, z[1:]))  # cumulative damage never falls
        thr = hidden.thresholds[t.organ]
        crossed = [i + 1 for i, v in enumerate(z) if v >= thr]
        assert t.onset_fraction == (crossed[0] if crossed else None)
        assert (t.grade >= 1) == bool(crossed)
        assert t.metadata["hidden_sensitivity"] == pytest.approx(hidden.sensitivity)
    # Same seed, same patient.
    again, _ = simulate_patient(prepared, "p0", seed=11, n_fractions=4)
    assert all(np.allclose(a.features, b.features, equal_nan=True) for a, b in zip(trajs, again))


def test_sensitivity_drives_toxicity_and_image_signal(prepared):
    """A very sensitive patient is toxic early; an insensitive one is not; the image signal follows."""
    sure = ToxicityTruth(sensitivity_log_sd=1e-6, threshold_log_sd=1e-6, hu_per_100gy=200.0,
                         endpoints={"xerostomia": EndpointTruth(1.0, 1.0, 1.0, 0.0),
                                    "esophagitis": EndpointTruth(1.0, 1.0, 1.0, 0.0)})
    never = ToxicityTruth(sensitivity_log_sd=1e-6, threshold_log_sd=1e-6, hu_per_100gy=0.0,
                          endpoints={"xerostomia": EndpointTruth(1.0, 1e6, 1.0, 0.0),
                                     "esophagitis": EndpointTruth(1.0, 1e6, 1.0, 0.0)})
    hot, _ = simulate_patient(prepared, "hot", seed=3, n_fractions=3, truth=sure, organs=["LeftParotid"])
    cold, _ = simulate_patient(prepared, "cold", seed=3, n_fractions=3, truth=never, organs=["LeftParotid"])
    assert hot[0].grade >= 1 and hot[0].onset_fraction == 1
    assert cold[0].grade == 0 and cold[0].onset_fraction is None
    names = hot[0].feature_names
    ct_mean = next(i for i, n in enumerate(names) if n.startswith("ct_") and "mean" in n)
    # CT numbers in the gland rise with the response (200 HU per 100 Gy BED here); not without it.
    assert hot[0].features[-1, ct_mean] - cold[0].features[-1, ct_mean] > 3.0


def test_cohort_is_reproducible_and_checked(prepared):
    cohort, hidden = simulate_cohort([prepared], 2, seed=5, n_fractions=3)
    assert cohort.patients == [h.patient_id for h in hidden] and len(cohort.trajectories) == 6
    assert "seed 5" in cohort.description
    with pytest.raises(InvalidInputError):
        simulate_cohort([], 2, seed=5)
    with pytest.raises(InvalidInputError):
        simulate_cohort([prepared], 1, seed=5)
    assert TRUTH.endpoints["esophagitis"].bed_ref_gy == 100.0  # fixed before fitting (docstring)
