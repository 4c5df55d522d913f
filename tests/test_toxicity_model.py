"""ToxicityMonitor model (issue 8): GRU autoencoder + logistic regression, LKB baseline, LOPO evaluation.

Everything runs on synthetic trajectories generated here: a hidden per-organ sensitivity makes a group
of correlated features drift upward over the fractions for organs that become toxic (with noise and a
common dose trend), so the outcome is learnable from the trajectories but not from the planned dose.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from twinrt.errors import InvalidInputError  # noqa: E402
from twinrt.progress import CancelledError, CancelToken  # noqa: E402
from twinrt.radiobiology import LKB_PARAMETERS, LKB_SET_FOR_ENDPOINT, lkb_ntcp  # noqa: E402
from twinrt.toxicity.model import (FeatureMismatchError, ToxicityModel, WeightsIntegrityError,  # noqa: E402
                                   auc_mann_whitney, lead_time, leave_one_patient_out, lkb_baseline_risk,
                                   risk_at_fraction, sensitivity_specificity, youden_threshold)
from twinrt.toxicity.trajectory import ENDPOINTS, Cohort, OrganTrajectory  # noqa: E402

EPOCHS = 60


def make_cohort(n_patients: int = 14, organs=("Parotid_L", "Parotid_R"), n_fractions: int = 20,
                n_features: int = 16, n_signal: int = 4, seed: int = 0, shuffle_labels: bool = False,
                nan_share: float = 0.0) -> Cohort:
    """Synthetic cohort: toxic ⇔ hidden sensitivity > 0; the sensitivity drives a drift of the first
    ``n_signal`` features (correlated, like cumulative-dose features) over the fractions."""
    rng = np.random.default_rng(seed)
    names = [f"feature_{i}" for i in range(n_features)]
    frac = np.arange(1, n_fractions + 1)
    t = frac / n_fractions
    raw = []
    for p in range(n_patients):
        for organ in organs:
            sensitivity = rng.normal()
            x = rng.normal(size=(n_fractions, n_features))
            x[:, :n_signal] += (frac * rng.uniform(0.08, 0.12))[:, None]  # common dose trend
            x[:, :n_signal] += 3.0 * sensitivity * t[:, None] + 0.3 * rng.normal(size=(n_fractions, 1))
            if nan_share:
                x[rng.random(x.shape) < nan_share] = np.nan
            raw.append((f"P{p:02d}", organ, x, sensitivity > 0))
    toxic = np.array([r[3] for r in raw])
    if shuffle_labels:
        toxic = rng.permutation(toxic)
    out = []
    for (pid, organ, x, _), tox in zip(raw, toxic):
        onset = int(rng.integers(n_fractions // 2, n_fractions)) if tox else None
        out.append(OrganTrajectory(pid, organ, "xerostomia", frac, x, names, grade=1 if tox else 0,
                                   onset_fraction=onset, n_fractions=n_fractions,
                                   planned={"mean_gy": float(rng.uniform(20, 45))}))
    return Cohort(out, "synthetic test cohort")


@pytest.fixture(scope="module")
def cohort() -> Cohort:
    return make_cohort()


@pytest.fixture(scope="module")
def model(cohort) -> ToxicityModel:
    return ToxicityModel.fit(cohort, seed=0, epochs=EPOCHS)


# ----------------------------------------------------------------------------- LOPO


@pytest.fixture(scope="module")
def lopo(cohort):
    return leave_one_patient_out(cohort, threshold=0.5, seed=0, epochs=EPOCHS)


def test_lopo_separable_cohort_has_high_auc(lopo):
    assert lopo["auc_gru"] > 0.8
    assert lopo["n_patients"] == 14 and lopo["n_trajectories"] == 28
    gru = lopo["gru"]
    for key in ("sensitivity", "specificity", "sensitivity_youden", "specificity_youden", "auc_fraction_10",
                "auc_fraction_15", "youden_threshold_median", "share_positive_lead"):
        assert key in gru
    assert 0 <= gru["sensitivity"] <= 1 and 0 <= gru["specificity"] <= 1
    assert gru["n_cross_at_or_before_onset"] <= gru["n_toxic"] == lopo["n_toxic"]
    assert lopo["lead_time_fractions_median"] is not None and lopo["lead_time_fractions_median"] >= 0
    # the planned dose is unrelated to the outcome here: the baseline has no skill beyond chance
    assert 0.0 <= lopo["auc_lkb"] <= 1.0 and lopo["auc_lkb"] < lopo["auc_gru"]
    assert "Research use only" in lopo["research_use_only"]
    json.dumps(lopo)  # the result is JSON-serialisable (for the benchmark)


def test_lopo_shuffled_labels_near_chance():
    shuffled = make_cohort(shuffle_labels=True)
    result = leave_one_patient_out(shuffled, seed=0, epochs=EPOCHS)
    assert result["auc_gru"] < 0.75


def test_lopo_is_deterministic_given_seed(cohort, lopo):
    small = Cohort([t for t in cohort.trajectories if t.patient_id in ("P00", "P01", "P02", "P03")], "small")
    a = leave_one_patient_out(small, seed=3, epochs=10)
    b = leave_one_patient_out(small, seed=3, epochs=10)
    assert [r["risk"] for r in a["predictions"]] == [r["risk"] for r in b["predictions"]]


def test_lopo_progress_and_cancel(cohort):
    small = Cohort([t for t in cohort.trajectories if t.patient_id in ("P00", "P01", "P02", "P03")], "small")
    seen = []
    leave_one_patient_out(small, epochs=2, progress=lambda f, text: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        leave_one_patient_out(small, epochs=2, cancel=token)


# ----------------------------------------------------------------------------- model behaviour


def test_risk_is_causal(model, cohort):
    traj = cohort.trajectories[3]
    base = model.risk(traj)
    assert base.shape == (traj.fractions.size,) and np.all((base > 0) & (base < 1))
    for t in (0, 7, 15):
        changed = traj.features.copy()
        changed[t + 1:] = changed[t + 1:] * 5.0 + 10.0
        other = OrganTrajectory(traj.patient_id, traj.organ, traj.endpoint, traj.fractions, changed,
                                traj.feature_names, traj.grade, traj.onset_fraction, traj.n_fractions)
        risk = model.risk(other)
        np.testing.assert_array_equal(risk[:t + 1], base[:t + 1])
        assert not np.allclose(risk[t + 1:], base[t + 1:])
    # a shorter trajectory (the course so far) gives the same risks for its fractions
    partial = OrganTrajectory(traj.patient_id, traj.organ, traj.endpoint, traj.fractions[:6], traj.features[:6],
                              traj.feature_names)
    np.testing.assert_allclose(model.risk(partial), base[:6], rtol=0, atol=1e-6)


def test_nan_features_and_missing_indicator(cohort):
    holey = make_cohort(n_patients=6, nan_share=0.2, seed=5)
    m = ToxicityModel.fit(holey, seed=1, epochs=5, missing_indicator=True)
    r = m.risk(holey.trajectories[0])
    assert np.isfinite(r).all()
    assert m.net.autoencoder.input_dim == 2 * len(holey.feature_names)


def test_fit_is_deterministic_and_predict_has_provenance(cohort, model):
    again = ToxicityModel.fit(cohort, seed=0, epochs=EPOCHS)
    np.testing.assert_array_equal(again.risk(cohort.trajectories[0]), model.risk(cohort.trajectories[0]))
    assert again.sha256 == model.sha256 and len(model.sha256) == 64
    out = model.predict(cohort.trajectories[0])
    assert out["model_id"] == model.model_id and out["weights_sha256"] == model.sha256
    assert "Research use only" in out["research_use_only"] and len(out["risk"]) == 20


def test_save_load_round_trip_and_tamper(model, cohort, tmp_path):
    entry_path = model.save(tmp_path)
    entry = json.loads(entry_path.read_text())
    assert entry["id"] == model.model_id and entry["sha256"] == model.sha256
    assert entry["feature_names"] == cohort.feature_names and "Research use only" in entry["research_use_only"]
    assert len(entry["standardisation"]["mean"]) == len(cohort.feature_names)
    assert entry["recipe"]["epochs"] == EPOCHS and entry["data"]["description"] == "synthetic test cohort"
    loaded = ToxicityModel.load(entry_path)
    for traj in cohort.trajectories[:4]:
        np.testing.assert_array_equal(loaded.risk(traj), model.risk(traj))
    assert ToxicityModel.load(tmp_path).sha256 == model.sha256
    weights = tmp_path / entry["file"]
    data = bytearray(weights.read_bytes())
    data[-20] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError):
        ToxicityModel.load(entry_path)


# ----------------------------------------------------------------------------- metrics


def test_auc_hand_computed_with_ties():
    # positives 0.4 and 0.8 against negatives 0.1 and 0.4: pairs 1 + ½ + 1 + 1 = 3.5 of 4
    assert auc_mann_whitney([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert auc_mann_whitney([0.5, 0.5, 0.5], [0, 1, 1]) == pytest.approx(0.5)
    assert auc_mann_whitney([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == pytest.approx(0.0)
    assert auc_mann_whitney([0.3, 0.2, 0.2, 0.9, 0.1], [1, 0, 1, 1, 0]) == pytest.approx(5.5 / 6)
    assert np.isnan(auc_mann_whitney([0.1, 0.2], [1, 1]))
    with pytest.raises(InvalidInputError):
        auc_mann_whitney([0.1, 0.2], [1])


def test_thresholds_and_lead_time_on_hand_case():
    scores, labels = np.array([0.2, 0.4, 0.6, 0.8]), np.array([0, 1, 0, 1])
    assert sensitivity_specificity(scores, labels, 0.5) == (0.5, 0.5)
    assert youden_threshold(scores, labels) == pytest.approx(0.8)  # J = 0.5 at 0.8 and at 0.4: higher wins
    fractions = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    risk = np.array([0.1, 0.2, 0.55, 0.4, 0.7, 0.8, 0.9, 0.9])
    assert lead_time(fractions, risk, 7, 0.5) == 4  # first crossing at fraction 3
    assert lead_time(fractions, risk, 3, 0.5) == 0  # crosses at the onset
    assert lead_time(fractions, risk, 2, 0.5) is None  # crosses only after the onset
    assert lead_time(fractions, risk, 7, 0.95) is None  # never crosses
    assert lead_time(fractions, risk, None, 0.5) is None
    assert risk_at_fraction(fractions, risk, 5) == pytest.approx(0.7)
    assert risk_at_fraction(fractions, risk, 50) == pytest.approx(0.9)


# ----------------------------------------------------------------------------- LKB baseline


def _traj(endpoint: str, planned: dict, organ: str = "Lung") -> OrganTrajectory:
    return OrganTrajectory("P", organ, endpoint, [1, 2], np.zeros((2, 1)), ["x"], planned=planned)


def test_lkb_baseline_equals_lkb_ntcp():
    assert lkb_baseline_risk(_traj("pneumonitis", {"mean_gy": 20.0})) == pytest.approx(lkb_ntcp(20.0, 30.8, 0.37))
    assert lkb_baseline_risk(_traj("pneumonitis", {"mean_gy": 30.8})) == pytest.approx(0.5)
    assert lkb_baseline_risk(_traj("cardiac", {"geud_gy": 48.0 * 1.1, "mean_gy": 1.0})) == pytest.approx(
        0.8413447, abs=1e-6)  # gEUD preferred; one m·TD50 above TD50 → Φ(1)
    assert lkb_baseline_risk(_traj("xerostomia", {"mean_gy": 39.9})) == pytest.approx(0.5)
    assert lkb_baseline_risk(_traj("xerostomia", {"ntcp": 0.37, "mean_gy": 60.0})) == pytest.approx(0.37)
    p = LKB_PARAMETERS["spinal_cord_myelitis_burman1991"]
    assert lkb_baseline_risk(_traj("xerostomia", {"geud_gy": 50.0, "lkb_set": "spinal_cord_myelitis_burman1991"})
                             ) == pytest.approx(lkb_ntcp(50.0, p.td50_gy, p.m))
    with pytest.raises(InvalidInputError, match="planned dose"):
        lkb_baseline_risk(_traj("pneumonitis", {}))
    with pytest.raises(InvalidInputError, match="no LKB parameter set"):
        lkb_baseline_risk(_traj("mucositis", {"mean_gy": 20.0}))


def test_lkb_sets_for_endpoints():
    assert set(LKB_SET_FOR_ENDPOINT) == set(ENDPOINTS)
    for name in LKB_SET_FOR_ENDPOINT.values():
        p = LKB_PARAMETERS[name]
        assert p.n > 0 and p.m > 0 and p.td50_gy > 0 and p.source and p.verification
    lung = LKB_PARAMETERS[LKB_SET_FOR_ENDPOINT["pneumonitis"]]
    assert (lung.n, lung.m, lung.td50_gy) == (1.0, 0.37, 30.8)
    heart = LKB_PARAMETERS[LKB_SET_FOR_ENDPOINT["cardiac"]]
    assert (heart.n, heart.m, heart.td50_gy) == (0.35, 0.10, 48.0)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_typed_errors(model, cohort):
    with pytest.raises(InvalidInputError, match="empty"):
        ToxicityModel.fit(Cohort([]))
    with pytest.raises(InvalidInputError, match="empty"):
        leave_one_patient_out(Cohort([]))
    one = Cohort([t for t in cohort.trajectories if t.patient_id == "P00"])
    with pytest.raises(InvalidInputError, match="at least 2 patients"):
        leave_one_patient_out(one)
    non_toxic = Cohort([t for t in cohort.trajectories if not t.toxic])
    with pytest.raises(InvalidInputError, match="toxic"):
        ToxicityModel.fit(non_toxic, epochs=1)
    with pytest.raises(InvalidInputError, match="threshold"):
        leave_one_patient_out(cohort, threshold=1.5)
    traj = cohort.trajectories[0]
    renamed = OrganTrajectory(traj.patient_id, traj.organ, traj.endpoint, traj.fractions, traj.features,
                              [f"other_{i}" for i in range(len(traj.feature_names))])
    with pytest.raises(FeatureMismatchError):
        model.risk(renamed)
    with pytest.raises(FeatureMismatchError):
        ToxicityModel.fit([traj, renamed], epochs=1)
    with pytest.raises(InvalidInputError):
        ToxicityModel.fit(cohort, epochs=0)


def test_endpoint_inputs_option_round_trip(tmp_path):
    """With ``endpoint_inputs`` the endpoint's one-hot joins the inputs; save/load keeps it; risks differ by endpoint."""
    cohort = make_cohort(n_patients=8, n_fractions=6, n_features=4, n_signal=2, seed=4)
    m = ToxicityModel.fit(cohort, seed=0, epochs=5, endpoint_inputs=True)
    assert m.net.autoencoder.input_dim == 4 + len(ENDPOINTS)
    m.save(tmp_path)
    again = ToxicityModel.load(tmp_path / f"{m.model_id}.json")
    assert again.recipe.endpoint_inputs is True
    t = cohort.trajectories[0]
    assert np.array_equal(again.risk(t), m.risk(t))
    other = OrganTrajectory(t.patient_id, t.organ, "cardiac" if t.endpoint != "cardiac" else "xerostomia",
                            t.fractions, t.features, t.feature_names)
    assert not np.allclose(m.risk(other), m.risk(t))
