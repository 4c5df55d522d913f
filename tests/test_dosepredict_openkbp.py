"""Dose prediction on real OpenKBP patients (../shared/data): smoke training, CLI evaluation, prediction of
an OpenKBP case and the challenge metrics in the challenge's own array layout. Skipped without the data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from twinrt.data import shared_data_dir

DATA = shared_data_dir()
pytestmark = pytest.mark.skipif(DATA is None or not (DATA / "openkbp" / "validation").is_dir(),
                                reason="needs ../shared/data/openkbp (not in a fresh clone)")
torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from twinrt.dosepredict.config import DosePredictConfig  # noqa: E402


def smoke_config(model_id: str = "smoke") -> DosePredictConfig:
    """Tiny U-Net at 32³ (the 128³ grid pooled x4), one epoch."""
    return DosePredictConfig.from_dict({
        "model_id": model_id,
        "network": {"channels": [4, 8], "strides": [2], "num_res_units": 0, "dropout": 0.2},
        "inputs": {"downsample": 4, "crop_shape": [32, 24, 32]},
        "train": {"epochs": 1, "batch_size": 2, "val_every": 1, "seed": 7, "num_threads": 1, "device": "cpu"},
        "predict": {"mc_samples": 2}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    from twinrt.dosepredict.train import train

    out = tmp_path_factory.mktemp("smoke")
    lines: list[str] = []
    entry = train(smoke_config(), DATA, out, max_patients=2, log=lines.append)
    return entry, out, lines


def test_smoke_training_writes_weights_and_a_matching_manifest(trained) -> None:
    from twinrt.dosepredict.weights import sha256_file, validate_entry

    entry, out, lines = trained
    weights = out / "smoke.pt"
    on_disk = json.loads((out / "smoke.json").read_text())
    assert on_disk == entry
    validate_entry(on_disk)
    assert weights.is_file() and sha256_file(weights) == entry["sha256"]
    assert entry["sizeMB"] < 30 and entry["training"]["epochs_run"] == 1 and entry["training"]["best_epoch"] == 1
    assert entry["recipe"] == smoke_config().to_dict()
    assert entry["validation"]["n_patients"] == 2 and entry["validation"]["resolution"] == "128x128x128"
    assert 0 < entry["validation"]["dose_score"] < 80 and entry["validation"]["dvh_score"] > 0
    assert "Babier" in entry["data"]["citation"] and "open-kbp" in entry["data"]["repository"]
    assert "TCIA" in entry["data"]["images"] or "Cancer Imaging Archive" in entry["data"]["images"]
    assert entry["research_use_only"].lower().startswith("research use only")
    assert "twinrt dose-predict train" in entry["command"]
    assert (out / "smoke.config.json").is_file()
    epoch_lines = [ln for ln in lines if ln.startswith("epoch")]
    assert len(epoch_lines) == 1 and "loss" in epoch_lines[0] and "val dose score" in epoch_lines[0]
    assert epoch_lines[0].rstrip().endswith(" s")


def test_training_is_repeatable_with_the_seed(trained, tmp_path: Path) -> None:
    from twinrt.dosepredict.train import train

    entry, _, _ = trained
    again = train(smoke_config(), DATA, tmp_path, max_patients=2, log=None)
    assert again["sha256"] == entry["sha256"]
    assert again["validation"]["dose_score"] == entry["validation"]["dose_score"]


def test_cli_evaluate_prints_a_parseable_result_line(trained, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from twinrt.cli import main

    entry, out, _ = trained
    report = tmp_path / "eval.json"
    rc = main(["dose-predict", "evaluate-openkbp", str(DATA / "openkbp" / "validation"), "--model",
               str(out / "smoke.pt"), "--limit", "2", "--json", str(report)])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("RESULT ") and sum(ln.startswith("RESULT") for ln in lines) == 1
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["n_patients"] == 2 and result["model_id"] == "smoke" and result["sha256"] == entry["sha256"]
    # the same two validation patients the training scored at the end
    assert result["dose_score"] == pytest.approx(entry["validation"]["dose_score"], abs=1e-3)
    assert result["dvh_score"] == pytest.approx(entry["validation"]["dvh_score"], abs=1e-3)
    assert 0 < result["seconds_per_patient"] < 30
    assert any(ln.strip().startswith("pt_") and "dose error" in ln for ln in lines)
    full = json.loads(report.read_text())
    assert set(full["per_patient"]) == {"pt_201", "pt_202"} or len(full["per_patient"]) == 2


def test_predict_an_openkbp_case_on_its_own_grid(trained) -> None:
    from twinrt.data import load_openkbp, openkbp_patients
    from twinrt.dosepredict.predict import DosePredictor

    _, out, _ = trained
    case = load_openkbp(openkbp_patients("validation")[0])
    res = DosePredictor(out / "smoke.pt").predict_case(case)
    assert res.dose.grid.is_same(case.ct.grid) and not res.extra["resampled"]
    assert not any("resampled" in w for w in res.warnings)
    assert set(res.roi_map) == {s.name for s in case.structures} and all(k == v for k, v in res.roi_map.items())
    pdm = case.metadata["possible_dose_mask"]
    assert float(res.dose.array[~pdm].max()) == 0.0 and res.dose.max_gy > 0
    assert res.std is not None and float(res.std.array[pdm].max()) > 0


def test_metrics_do_not_depend_on_the_array_layout() -> None:
    """The challenge scores flat (row, column, slice) arrays; TwinRT scores (k, j, i) ones: same figures."""
    from twinrt.data import openkbp_patients
    from twinrt.dosepredict.inputs import load_openkbp_arrays
    from twinrt.dosepredict.metrics import score_patient

    path = openkbp_patients("validation")[0]
    raw = dict(np.load(path))
    ref_raw = raw["dose_cgy"].astype(np.float64) / 100
    pdm_raw = ((raw["labels"] >> 15) & 1).astype(bool)
    masks_raw = {str(r): ((raw["labels"] >> b) & 1).astype(bool) for b, r in enumerate(raw["rois"])}
    masks_raw = {k: m for k, m in masks_raw.items() if m.any()}
    rng = np.random.default_rng(0)
    noise_raw = np.where(pdm_raw, rng.normal(0, 3, ref_raw.shape), 0)
    pred_raw = np.clip(ref_raw + noise_raw, 0, None)
    flat = score_patient("raw", pred_raw, ref_raw, masks_raw, pdm_raw, raw["voxel_mm"])
    a = load_openkbp_arrays(path)
    from twinrt.data import openkbp_to_kji

    pred_kji = openkbp_to_kji(pred_raw)
    kji = score_patient("kji", pred_kji, a.dose_gy, a.masks, a.possible_dose_mask, a.voxel_mm)
    assert kji.dose_score == pytest.approx(flat.dose_score, rel=1e-6)
    assert kji.dvh_errors.keys() == flat.dvh_errors.keys() and len(flat.dvh_errors) >= 10
    for k in flat.dvh_errors:
        assert kji.dvh_errors[k] == pytest.approx(flat.dvh_errors[k], abs=1e-4)
    # ~N(0, 3 Gy) noise: mean |error| is 3·sqrt(2/pi) ≈ 2.39 Gy, less where the clip at 0 Gy bites
    assert 1.5 < flat.dose_score < 2.4


def test_cli_train_and_register(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from twinrt.cli import main
    from twinrt.dosepredict.weights import list_models

    cfg = smoke_config("cli-smoke")
    cfg.train.epochs = 3
    cfg.save(tmp_path / "recipe.json")
    out = tmp_path / "out"
    rc = main(["dose-predict", "train", "--config", str(tmp_path / "recipe.json"), "--out", str(out),
               "--data", str(DATA / "openkbp"), "--epochs", "1", "--max-patients", "2"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1][len("RESULT "):])
    entry = json.loads((out / "cli-smoke.json").read_text())
    assert result["sha256"] == entry["sha256"] and entry["training"]["epochs_run"] == 1
    assert "--epochs 1" in entry["command"] and "--max-patients 2" in entry["command"]
    monkeypatch.setenv("TWINRT_MODELS_DIR", str(tmp_path / "models"))
    assert main(["dose-predict", "register", str(out / "cli-smoke.json")]) == 0
    assert "cli-smoke" in {m["id"] for m in list_models()}
    assert main(["dose-predict", "models"]) == 0
    assert "cli-smoke" in capsys.readouterr().out


def test_cancelled_training_writes_nothing(tmp_path: Path) -> None:
    from twinrt.dosepredict.train import train
    from twinrt.progress import CancelledError, CancelToken

    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        train(smoke_config(), DATA, tmp_path / "out", max_patients=2, cancel=token, log=None)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
