"""Physician preference model: learns a hidden trade-off from noisy pairwise choices (held out),
does not beat chance on random choices, ranks evaluated plans, and is stored per physician."""

from __future__ import annotations

import numpy as np
import pytest

from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.planning.preferences import (PairwiseChoice, PreferenceModel, choices_from_history, cross_validate,
                                         plan_features)

NAMES = ["PTV70 D95% >= 70", "SpinalCord D0.1cc <= 45", "RightParotid Dmean <= 26", "LeftParotid Dmean <= 26",
         "Larynx Dmean <= 44", "Mandible D0.1cc <= 70"]
TRUE_W = np.array([6.0, 4.0, 2.5, 2.5, 1.0, -1.5])


def _plans(rng, n):
    return [dict(zip(NAMES, rng.uniform(-0.5, 0.5, len(NAMES)))) for _ in range(n)]


def _choices(rng, n, random=False):
    out = []
    for i in range(n):
        a, b = _plans(rng, 2)
        if random:
            prefer_a = rng.random() < 0.5
        else:
            # Noisy Bradley-Terry physician: P(a) = sigmoid(w . (fa - fb)).
            d = TRUE_W @ (np.array(list(a.values())) - np.array(list(b.values())))
            prefer_a = rng.random() < 1 / (1 + np.exp(-d))
        out.append(PairwiseChoice(a, b, f"case{i}") if prefer_a else PairwiseChoice(b, a, f"case{i}"))
    return out


def test_learns_hidden_weights_on_held_out_choices():
    choices = _choices(np.random.default_rng(1), 300)
    cv = cross_validate(choices, k=5, l2=1.0)
    # Chance is 50 %; the noise (a logistic physician) keeps even the true weights below 100 %.
    assert cv["accuracy"] > 0.75 and len(cv["fold_accuracies"]) == 5
    w = PreferenceModel("dr_a").fit(choices).weights
    learned = np.array([w[n] for n in NAMES])
    assert np.corrcoef(learned, TRUE_W)[0, 1] > 0.9
    print(f"\nheld-out accuracy {cv['accuracy']:.3f}; corr(learned, true) {np.corrcoef(learned, TRUE_W)[0, 1]:.3f}")


def test_random_choices_do_not_beat_chance():
    accs = [cross_validate(_choices(np.random.default_rng(s), 200, random=True), k=5)["accuracy"] for s in range(3)]
    assert abs(np.mean(accs) - 0.5) < 0.07, accs


def test_rank_score_and_history():
    model = PreferenceModel("dr_b", weights={NAMES[0]: 5.0, NAMES[1]: 1.0})
    plans = [{NAMES[0]: -0.1, NAMES[1]: 0.4}, {NAMES[0]: 0.1, NAMES[1]: 0.0}, {NAMES[0]: 0.0, NAMES[1]: 0.0}]
    assert model.rank(plans) == [1, 2, 0]
    assert model.probability(plans[1], plans[0]) > 0.5
    hist = [("p1", plans[0], True), ("p1", plans[1], False), ("p1", plans[2], False), ("p2", plans[2], True)]
    choices = choices_from_history(hist)
    assert len(choices) == 2 and all(c.preferred == plans[0] and c.case_id == "p1" for c in choices)


def test_features_from_an_evaluation():
    from tests.test_evaluation import _case, _goal_set
    from twinrt.planning.evaluation import evaluate_plan

    case, dose = _case(cord_dose=47.2)
    ev = evaluate_plan(case, dose, _goal_set())
    f = plan_features(ev)
    assert f["SpinalCord D0.1cc <= 45"] == pytest.approx(-2.2 / 45, abs=1e-6)
    assert f["Esophagus Dmean <= 34"] == 0.0 and f["must_failures/10"] == pytest.approx(0.1)
    good = evaluate_plan(case, _case(cord_dose=40.0)[1], _goal_set())
    model = PreferenceModel("dr_c").fit([PairwiseChoice(good, ev)] * 5)
    assert model.rank([ev, good]) == [1, 0]


def test_save_load_per_physician(tmp_path):
    model = PreferenceModel("Dr. O'Neil / H&N").fit(_choices(np.random.default_rng(2), 40))
    path = model.save(tmp_path / "prefs")
    assert path.parent == tmp_path / "prefs" and path.suffix == ".json"
    back = PreferenceModel.load(tmp_path / "prefs", "Dr. O'Neil / H&N")
    assert back.weights == pytest.approx(model.weights) and back.n_choices == 40
    with pytest.raises(MissingInputError, match="dr_x"):
        PreferenceModel.load(tmp_path / "prefs", "dr_x")
    path.write_text('{"format": "other"}')
    with pytest.raises(InvalidInputError):
        PreferenceModel.load(tmp_path / "prefs", "Dr. O'Neil / H&N")


def test_bad_input():
    with pytest.raises(InvalidInputError):
        PreferenceModel().fit([])
    with pytest.raises(InvalidInputError):
        cross_validate(_choices(np.random.default_rng(0), 3), k=5)
