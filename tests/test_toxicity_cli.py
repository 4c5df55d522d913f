"""``twinrt toxicity`` on a clinic-style CSV cohort: evaluate (RESULT line), train, predict, bad input."""

from __future__ import annotations

import json

import numpy as np

from twinrt.toxicity.csvio import write_cohort_csv
from twinrt.toxicity.trajectory import Cohort, OrganTrajectory


def _synthetic_cohort(n_patients: int = 8, n_fractions: int = 10, seed: int = 0) -> Cohort:
    """Toxic organs drift upward in feature 0 (noise elsewhere); half the organs are toxic."""
    rng = np.random.default_rng(seed)
    names = ["bed_mean", "ct_mean", "d_ct_mean", "noise"]
    out = []
    for p in range(n_patients):
        for o, organ in enumerate(("LeftParotid", "Esophagus")):
            toxic = (p + o) % 2 == 0
            f = np.arange(1, n_fractions + 1)
            x = np.stack([2.0 * f, rng.normal(0, 5, f.size) + (1.5 * f if toxic else 0.0), np.zeros(f.size),
                          rng.normal(0, 1, f.size)], -1)
            x[:, 2] = x[:, 1] - x[0, 1]
            out.append(OrganTrajectory(f"P{p}", organ, "xerostomia" if o == 0 else "esophagitis", f, x, names,
                                       grade=1 if toxic else 0, onset_fraction=6 if toxic else None,
                                       n_fractions=n_fractions, planned={"mean_gy": 30.0 + p, "geud_gy": 30.0 + p}))
    return Cohort(out, "synthetic test cohort")


def test_cli_evaluate_train_predict(tmp_path, capsys):
    from twinrt.cli import main

    write_cohort_csv(_synthetic_cohort(), tmp_path / "trajectories.csv", tmp_path / "outcomes.csv")
    assert main(["toxicity", "evaluate", str(tmp_path), "--epochs", "30"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1].removeprefix("RESULT "))
    assert {"auc_gru", "auc_lkb", "lead_time_fractions_median"} <= set(result)
    assert result["n_patients"] == 8 and result["n_trajectories"] == 16
    assert result["auc_gru"] > 0.8  # the drift is learnable
    assert main(["toxicity", "train", str(tmp_path), "--out", str(tmp_path / "model"), "--epochs", "30"]) == 0
    weights = tmp_path / "model" / "toxicity-gruae-v2.pt"
    assert weights.is_file() and (tmp_path / "model" / "toxicity-gruae-v2.json").is_file()
    capsys.readouterr()
    assert main(["toxicity", "predict", str(tmp_path), "--model", str(weights)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 17 and "sha256" in lines[-1] and "Research use only" in lines[-1]


def test_cli_bad_csv_is_a_typed_error(tmp_path, capsys):
    from twinrt.cli import main

    (tmp_path / "trajectories.csv").write_text("patient_id,organ,endpoint,fraction,x\nP1,Esophagus,esophagitis,1,abc\n")
    (tmp_path / "outcomes.csv").write_text("patient_id,organ,endpoint,grade,onset_fraction\nP1,Esophagus,esophagitis,0,\n")
    assert main(["toxicity", "evaluate", str(tmp_path)]) == 2
    assert "line 2" in capsys.readouterr().err


def test_shipped_model_matches_the_twin_features():
    """The shipped model (trained on a simulated development cohort) reads exactly the twin's features."""
    from twinrt.toxicity.cli import shipped_model_path
    from twinrt.toxicity.features import feature_names
    from twinrt.toxicity.model import ToxicityModel

    model = ToxicityModel.load(shipped_model_path())  # sha256 checked
    names = feature_names()
    assert model.feature_names == names + [f"d_{n}" for n in names]
    assert model.model_id == "toxicity-gruae-v2" and len(model.sha256) == 64
