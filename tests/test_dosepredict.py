"""Dose prediction (twinrt.dosepredict) on synthetic data: config, inputs, ROI matching, flips, metrics,
weights integrity, MC dropout and prediction on a non-OpenKBP grid. Every test runs in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twinrt.dosepredict.config import KNOWN_CHANNELS, DosePredictConfig, load_config
from twinrt.dosepredict.inputs import (build_input, crop_window, downsample, lr_flip, match_rois, model_grid_around,
                                       prepare_case)
from twinrt.dosepredict.metrics import (dose_score, dvh_metrics, openkbp_scores, score_patient,
                                        voxels_in_tenth_cc)
from twinrt.errors import InvalidInputError, MissingInputError, StructureError
from twinrt.geometry import Grid
from twinrt.model import Case, Image, Structure, StructureType

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(model_id: str = "tiny", dropout: float = 0.2) -> DosePredictConfig:
    """A 32³ model grid, x2 down to 16³, a two-level U-Net: builds and runs in milliseconds."""
    return DosePredictConfig.from_dict({
        "model_id": model_id,
        "network": {"channels": [4, 8], "strides": [2], "num_res_units": 0, "dropout": dropout},
        "inputs": {"model_shape": [32, 32, 32], "downsample": 2, "crop_shape": [16, 12, 16]},
        "predict": {"mc_samples": 4}})


def make_model(folder: Path, config: DosePredictConfig | None = None, seed: int = 0) -> Path:
    """An untrained model on disk (weights + manifest entry); returns the entry path."""
    torch = pytest.importorskip("torch")
    from twinrt.dosepredict.model import build_network
    from twinrt.dosepredict.weights import save_model

    config = config or tiny_config()
    torch.manual_seed(seed)
    _, entry_path = save_model(build_network(config), config, folder)
    return entry_path


def synthetic_case(shape=(40, 50, 60), spacing=(2.0, 2.0, 3.0), direction=None,
                   names=("PTV_70", "PTV56", "Parotid_L", "R Parotid", "Cord", "BrainStem")) -> Case:
    """A water cylinder with box-shaped structures (all inside the body) on an arbitrary grid."""
    grid = Grid(shape, spacing, (-50.0, -40.0, -60.0), direction if direction is not None else np.eye(3))
    k, j, i = np.indices(shape)
    body = (j - shape[1] / 2) ** 2 + (i - shape[2] / 2) ** 2 < (0.45 * min(shape[1:])) ** 2
    hu = np.where(body, 0, -1000).astype(np.int16)
    boxes = {
        "PTV_70": (slice(15, 25), slice(20, 30), slice(25, 35)),
        "PTV56": (slice(12, 28), slice(18, 32), slice(22, 38)),
        "Parotid_L": (slice(20, 26), slice(20, 26), slice(40, 45)),
        "R Parotid": (slice(20, 26), slice(20, 26), slice(15, 20)),
        "Cord": (slice(5, 35), slice(33, 36), slice(28, 31)),
        "BrainStem": (slice(30, 36), slice(28, 32), slice(27, 33)),
    }
    structures = []
    for n, name in enumerate(names):
        m = np.zeros(shape, bool)
        m[boxes[name]] = True
        structures.append(Structure(name, m, grid, (255, 0, 0), StructureType.guess(name)))
    return Case("synthetic", Image(hu, grid), structures, {}, [], {})


# ----------------------------------------------------------------------------- import and config


def test_importing_the_package_does_not_import_torch() -> None:
    code = ("import sys, twinrt.dosepredict, twinrt.dosepredict.predict, twinrt.dosepredict.train, "
            "twinrt.dosepredict.evaluate, twinrt.dosepredict.weights, twinrt.dosepredict.model; "
            "assert 'torch' not in sys.modules and 'monai' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("name", ["openkbp_unet_cpu", "openkbp_unet_gpu"])
def test_shipped_config_round_trip(name: str, tmp_path: Path) -> None:
    cfg = load_config(name)
    assert cfg.model_id == name.replace("_", "-")
    assert tuple(cfg.inputs.channels) == KNOWN_CHANNELS
    cfg.save(tmp_path / "c.json")
    again = DosePredictConfig.load(tmp_path / "c.json")
    assert again == cfg and again.to_dict() == cfg.to_dict()
    cfg.train.epochs = 7
    cfg.save(tmp_path / "c2.json")
    assert DosePredictConfig.load(tmp_path / "c2.json").train.epochs == 7


def test_cpu_recipe_matches_the_brief() -> None:
    cfg = load_config("openkbp_unet_cpu")
    assert cfg.inputs.eval_shape == (64, 64, 64) and cfg.inputs.downsample == 2
    assert tuple(cfg.network.channels) == (16, 32, 64, 128) and tuple(cfg.network.strides) == (2, 2, 2)
    gpu = load_config("openkbp_unet_gpu")
    assert gpu.inputs.eval_shape == (128, 128, 128) and gpu.train.epochs > cfg.train.epochs


def test_unknown_config_key_is_refused_naming_key_and_file(tmp_path: Path) -> None:
    data = load_config("openkbp_unet_cpu").to_dict()
    data["train"]["learning_rte"] = 0.1
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidInputError) as exc:
        DosePredictConfig.load(path)
    assert "train.learning_rte" in str(exc.value) and "typo.json" in str(exc.value)
    with pytest.raises(InvalidInputError, match="'netwrk'"):
        DosePredictConfig.from_dict({"netwrk": {}}, "x.json")


def test_bad_config_values_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="multiples of 8"):
        DosePredictConfig.from_dict({"inputs": {"crop_shape": [64, 36, 64]}})
    with pytest.raises(InvalidInputError, match="wrong type"):
        DosePredictConfig.from_dict({"train": {"epochs": "ten"}})
    with pytest.raises(InvalidInputError, match="unknown channel"):
        DosePredictConfig.from_dict({"inputs": {"channels": ["ct", "ptv", "Liver"]}})
    with pytest.raises(MissingInputError):
        load_config("no_such_recipe")


# ----------------------------------------------------------------------------- ROI matching


def test_match_rois_understands_synonyms_and_laterality() -> None:
    names = ["Parotid_L", "R Parotid", "Cord", "Brain_Stem", "PTV_70", "PTV 6300", "ptv56Gy", "Oesophagus",
             "larynx", "Mandible", "BODY"]
    mapping, unmatched = match_rois(names)
    assert mapping == {"LeftParotid": "Parotid_L", "RightParotid": "R Parotid", "SpinalCord": "Cord",
                       "Brainstem": "Brain_Stem", "PTV70": "PTV_70", "PTV63": "PTV 6300", "PTV56": "ptv56Gy",
                       "Esophagus": "Oesophagus", "Larynx": "larynx", "Mandible": "Mandible"}
    assert unmatched == []
    mapping, _ = match_rois(["L Parotid", "ParotidRight", "Spinal Cord", "BRAINSTEM"])
    assert mapping == {"LeftParotid": "L Parotid", "RightParotid": "ParotidRight", "SpinalCord": "Spinal Cord",
                       "Brainstem": "BRAINSTEM"}


def test_match_rois_ignores_derived_structures_and_uses_prescriptions() -> None:
    mapping, unmatched = match_rois(["Parotid_L_PRV", "Cord_PRV5mm", "PTV70_opt", "Parotids", "ring_PTV",
                                     "CTV70", "Brainstem+3mm"])
    assert mapping == {}
    assert unmatched[0] == "Brainstem" and "PTV70" in unmatched and len(unmatched) == 10
    mapping, unmatched = match_rois(["PTV_High", "PTV_Low", "SpinalCord", "Spinal_Cord_PRV"],
                                    {"PTV_High": 69.96, "PTV_Low": 56.0})
    assert mapping == {"PTV70": "PTV_High", "PTV56": "PTV_Low", "SpinalCord": "SpinalCord"}
    assert "PTV63" in unmatched


# ----------------------------------------------------------------------------- channels and flips


def test_build_input_channels_and_normalisation() -> None:
    cfg = DosePredictConfig().inputs
    shape = (4, 6, 8)
    ct = np.full(shape, -2000.0)
    ct[1] = 500.0
    ct[2] = 5000.0
    masks = {r: np.zeros(shape, bool) for r in ("PTV70", "PTV56", "LeftParotid")}
    masks["PTV56"][:, :3] = True
    masks["PTV70"][:, 2:4] = True     # overlaps PTV56 on row 2: PTV70 wins there
    masks["LeftParotid"][0, 0, 0] = True
    pdm = np.ones(shape, bool)
    pdm[3] = False
    x = build_input(ct, masks, pdm, cfg)
    ch = list(cfg.channels)
    assert x.shape == (len(ch),) + shape and x.dtype == np.float32
    assert np.allclose(x[ch.index("ct")][0], 0.0) and np.allclose(x[ch.index("ct")][1], 0.5)
    assert np.allclose(x[ch.index("ct")][2], 1.0)  # (clip(HU) + 1000) / 3000
    ptv = x[ch.index("ptv")]
    assert np.allclose(ptv[:, :2], 56 / 70) and np.allclose(ptv[:, 2:4], 1.0) and np.allclose(ptv[:, 4:], 0)
    assert x[ch.index("LeftParotid")].sum() == 1 and x[ch.index("RightParotid")].sum() == 0
    assert np.array_equal(x[ch.index("possible_dose_mask")], pdm.astype(np.float32))
    with pytest.raises(InvalidInputError, match="LeftParotid"):
        build_input(ct, {"LeftParotid": np.zeros((2, 2, 2), bool)}, pdm, cfg)


def test_lr_flip_mirrors_and_swaps_the_parotids() -> None:
    channels = ("ct", "ptv", "RightParotid", "LeftParotid", "possible_dose_mask")
    rng = np.random.default_rng(0)
    x = rng.random((5, 2, 3, 8)).astype(np.float32)
    y = lr_flip(x, channels)
    assert np.array_equal(y[0], x[0, ..., ::-1])
    assert np.array_equal(y[2], x[3, ..., ::-1]) and np.array_equal(y[3], x[2, ..., ::-1])
    assert np.array_equal(lr_flip(y, channels), x)
    batch = np.stack([x, x])
    assert np.array_equal(lr_flip(batch, channels)[1], y)
    dose = rng.random((1, 2, 3, 8))
    assert np.array_equal(lr_flip(dose), dose[..., ::-1])


def test_lr_flip_keeps_anatomy_consistent_with_labels() -> None:
    """After a flip the RightParotid channel must lie on the patient's right (low i) again."""
    cfg = DosePredictConfig().inputs
    shape = (4, 4, 16)
    masks = {"RightParotid": np.zeros(shape, bool), "LeftParotid": np.zeros(shape, bool),
             "PTV70": np.ones(shape, bool)}
    masks["RightParotid"][..., 2] = True     # i increases towards the patient's left
    masks["LeftParotid"][..., 13] = True
    x = build_input(np.zeros(shape), masks, np.ones(shape, bool), cfg)
    y = lr_flip(x, cfg.channels)
    right = y[list(cfg.channels).index("RightParotid")]
    assert right[..., 2].all() and right.sum() == right[..., 2].sum()


def test_downsample_and_crop_window() -> None:
    a = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    d = downsample(a, 2)
    assert d.shape == (2, 2, 2) and d[0, 0, 0] == np.mean([0, 1, 4, 5, 16, 17, 20, 21])
    mask = np.zeros((16, 16, 16))
    mask[2:6, 9:15, 4:12] = 1
    win = crop_window(mask, (8, 4, 16), divisor=4, widen=False)
    assert win == (slice(0, 8), slice(10, 14), slice(0, 16))
    wide = crop_window(mask, (8, 4, 16), divisor=4, widen=True)
    assert wide[1] == slice(8, 16)  # bbox of 6 rows widened to 8 (a multiple of 4), kept inside the array
    assert crop_window(mask, (8, 4, 16), 4, False, shift=(0, -3, 0))[1] == slice(7, 11)


# ----------------------------------------------------------------------------- metrics


def test_dose_score_is_the_challenge_formula() -> None:
    ref = np.zeros((10, 10, 10))
    mask = np.zeros_like(ref, bool)
    mask[:5] = True
    ref[mask] = 60.0
    pred = ref.copy()
    pred[mask] += 2.0
    assert dose_score(pred, ref, mask) == pytest.approx(2.0)
    pred[~mask] = 1.0  # dose outside the mask counts in the sum, divided by the mask size
    assert dose_score(pred, ref, mask) == pytest.approx(2.0 + 500 / 500)
    with pytest.raises(InvalidInputError, match="empty"):
        dose_score(pred, ref, np.zeros_like(mask))


def test_dvh_metrics_on_an_analytic_dose() -> None:
    dose = np.arange(1000, dtype=float).reshape(10, 10, 10)  # every voxel dose distinct: 0..999 Gy
    roi = np.ones_like(dose, bool)
    voxel_mm = (2.0, 2.0, 2.5)  # 10 mm³ → 0.1 cc = 10 voxels
    assert voxels_in_tenth_cc(voxel_mm) == 10 and voxels_in_tenth_cc((5, 5, 5)) == 1
    m = dvh_metrics(dose, {"Brainstem": roi, "PTV70": roi}, voxel_mm)
    # numpy linear percentile of 0..999 at q is q/100·999
    assert m[("D_0.1_cc", "Brainstem")] == pytest.approx(99.0 / 100 * 999)
    assert m[("mean", "Brainstem")] == pytest.approx(499.5)
    assert m[("D_99", "PTV70")] == pytest.approx(9.99)
    assert m[("D_95", "PTV70")] == pytest.approx(49.95)
    assert m[("D_1", "PTV70")] == pytest.approx(989.01)
    assert ("mean", "PTV70") not in m and len(m) == 5
    small = np.zeros_like(roi)
    small.flat[:4] = True  # fewer voxels than 0.1 cc: the percentile is clipped to the minimum
    assert dvh_metrics(dose, {"Larynx": small}, voxel_mm)[("D_0.1_cc", "Larynx")] == 0.0
    assert dvh_metrics(dose, {"Larynx": np.zeros_like(roi)}, voxel_mm) == {}


def test_dvh_score_is_the_mean_over_all_metrics_of_all_patients() -> None:
    ref = np.zeros((10, 10, 10))
    ref[:] = 50.0
    masks_a = {"PTV70": np.ones_like(ref, bool)}                                       # 3 metrics
    masks_b = {"PTV70": np.ones_like(ref, bool), "Brainstem": np.ones_like(ref, bool)}  # 5 metrics
    pdm = np.ones_like(ref, bool)
    a = score_patient("a", ref + 1.0, ref, masks_a, pdm, (3, 3, 3))
    b = score_patient("b", ref + 4.0, ref, masks_b, pdm, (3, 3, 3))
    assert a.dvh_errors and all(v == pytest.approx(1.0) for v in a.dvh_errors.values())
    dose, dvh = openkbp_scores([a, b])
    assert dose == pytest.approx(2.5)
    assert dvh == pytest.approx((3 * 1.0 + 5 * 4.0) / 8)  # flat mean, not (1 + 4) / 2
    with pytest.raises(InvalidInputError):
        openkbp_scores([])


# ----------------------------------------------------------------------------- weights


def test_weights_are_verified_and_a_tampered_file_is_refused(tmp_path: Path) -> None:
    from twinrt.dosepredict.weights import WeightsIntegrityError, load_model, sha256_file, validate_entry

    entry_path = make_model(tmp_path)
    entry = json.loads(entry_path.read_text())
    validate_entry(entry)
    weights = tmp_path / entry["file"]
    assert sha256_file(weights) == entry["sha256"]
    loaded = load_model(weights)
    assert loaded.model_id == "tiny" and loaded.sha256 == entry["sha256"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        load_model(weights)
    with pytest.raises(WeightsIntegrityError):
        load_model(entry_path)
    lonely = tmp_path / "lonely.pt"
    lonely.write_bytes(b"x")
    with pytest.raises(MissingInputError, match="lonely.json"):
        load_model(lonely)


def test_models_are_found_by_id_in_the_user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from twinrt.dosepredict.weights import (list_models, load_model, package_models_dir, register_model,
                                            validate_manifest)

    validate_manifest(json.loads((package_models_dir() / "models.json").read_text()))
    user = tmp_path / "user"
    monkeypatch.setenv("TWINRT_MODELS_DIR", str(user))
    shipped = {m["id"] for m in list_models()}
    if not shipped:
        with pytest.raises(MissingInputError, match="No dose-prediction model"):
            load_model(None)
    entry_path = make_model(tmp_path / "trained", tiny_config("tiny-a"))
    manifest = register_model(entry_path)
    assert manifest == user / "models.json" and (user / "tiny-a.pt").is_file()
    assert "tiny-a" in {m["id"] for m in list_models()}
    assert load_model("tiny-a").model_id == "tiny-a"
    assert json.loads(manifest.read_text())["default"] == "tiny-a"
    if not shipped:
        assert load_model(None).model_id == "tiny-a"
    with pytest.raises(MissingInputError, match="no-such-model"):
        load_model("no-such-model")
    bad = json.loads(manifest.read_text())
    bad["models"][0]["sha256"] = "xyz"
    (user / "models.json").write_text(json.dumps(bad))
    with pytest.raises(InvalidInputError, match="sha256"):
        load_model("tiny-a")


# ----------------------------------------------------------------------------- prediction


def _predictor(tmp_path: Path, dropout: float = 0.2):
    from twinrt.dosepredict.predict import DosePredictor

    return DosePredictor(make_model(tmp_path, tiny_config(dropout=dropout)))


def test_mc_dropout_std_is_positive_and_repeatable_with_a_seed(tmp_path: Path) -> None:
    pred = _predictor(tmp_path)
    shape = (32, 32, 32)
    rng = np.random.default_rng(1)
    ct = rng.normal(0, 200, shape)
    pdm = np.zeros(shape, bool)
    pdm[4:28, 6:26, 4:28] = True
    ptv = np.zeros(shape, bool)
    ptv[12:20, 12:20, 12:20] = True
    masks = {"PTV70": ptv}
    a = pred.predict_arrays(ct, masks, pdm, mc_samples=4, seed=3)
    b = pred.predict_arrays(ct, masks, pdm, mc_samples=4, seed=3)
    c = pred.predict_arrays(ct, masks, pdm, mc_samples=4, seed=4)
    d = pred.predict_arrays(ct, masks, pdm, mc_samples=0)
    assert a.std_gy is not None and a.std_gy.shape == shape
    assert float(a.std_gy[pdm].max()) > 0 and float(np.abs(a.std_gy[~pdm]).max()) == 0.0
    assert np.array_equal(a.std_gy, b.std_gy) and not np.array_equal(a.std_gy, c.std_gy)
    assert d.std_gy is None and np.array_equal(a.dose_gy, d.dose_gy)  # the dose is the dropout-free pass
    assert float(a.dose_gy.min()) >= 0 and float(np.abs(a.dose_gy[~pdm]).max()) == 0.0
    with pytest.raises(InvalidInputError, match="mc_samples"):
        pred.predict_arrays(ct, masks, pdm, mc_samples=1)
    with pytest.raises(InvalidInputError, match="model grid"):
        pred.predict_arrays(ct[:16], masks, pdm, mc_samples=0)


def test_predict_case_on_a_non_openkbp_grid(tmp_path: Path) -> None:
    import twinrt

    pred = _predictor(tmp_path)
    case = synthetic_case()
    res = pred.predict_case(case, mc_samples=2)
    assert res.dose.grid.is_same(case.ct.grid) and res.dose.array.shape == case.ct.array.shape
    assert res.dose.name == "predicted" and res.std is not None and res.std.name == "predicted_std"
    assert res.std.grid.is_same(case.ct.grid)
    assert "tiny" in res.dose.source and res.sha256 in res.dose.source and "Research use only" in res.dose.source
    assert res.research_use_only == twinrt.RESEARCH_USE_ONLY
    assert any("resampled" in w for w in res.warnings)
    assert any("Esophagus" in w and "Larynx" in w for w in res.warnings)  # missing optional organs: warned
    assert any("body" in w.lower() for w in res.warnings)  # no possible-dose mask given
    assert res.roi_map == {"Brainstem": "BrainStem", "SpinalCord": "Cord", "RightParotid": "R Parotid",
                           "LeftParotid": "Parotid_L", "PTV56": "PTV56", "PTV70": "PTV_70"}
    outside = case.ct.array <= -500
    assert res.dose.max_gy > 0 and float(res.dose.array[outside].max()) == 0.0  # nothing outside the body
    assert float(res.std.array[outside].max()) == 0.0
    res.add_to_case(case)
    assert set(case.doses) == {"predicted", "predicted_std"}


def test_predict_case_needs_a_target_and_warns_about_orientation(tmp_path: Path) -> None:
    pred = _predictor(tmp_path)
    with pytest.raises(StructureError, match="PTV") as exc:
        pred.predict_case(synthetic_case(names=("Parotid_L", "Cord")))
    assert "Parotid_L" in str(exc.value)  # names the structures it saw
    with pytest.raises(StructureError, match="Nope"):
        pred.predict_case(synthetic_case(), roi_map={"PTV70": "Nope"})
    with pytest.raises(InvalidInputError, match="not model ROIs"):
        pred.predict_case(synthetic_case(), roi_map={"Liver": "PTV_70"})
    ffs = np.diag([-1.0, 1.0, -1.0])  # feet-first supine
    res = pred.predict_case(synthetic_case(direction=ffs), mc_samples=0)
    assert res.std is None
    assert any("FFS" in w for w in res.warnings)
    only_ptv = pred.predict_case(synthetic_case(names=("PTV_70",)), mc_samples=0)
    assert any("head-and-neck" in w for w in only_ptv.warnings)
    mapped = pred.predict_case(synthetic_case(names=("PTV56", "Cord")), roi_map={"PTV63": "PTV56"}, mc_samples=0)
    assert mapped.roi_map == {"PTV63": "PTV56"}


def test_only_openkbp_like_grids_are_used_without_resampling() -> None:
    from twinrt.dosepredict.inputs import is_model_grid

    assert is_model_grid(Grid((128, 128, 128), (3.906, 3.906, 2.5)), (128, 128, 128))
    assert not is_model_grid(Grid((128, 128, 128), (1.0, 1.0, 1.0)), (128, 128, 128))  # 128 mm field of view
    assert not is_model_grid(Grid((128, 128, 128), (3.9, 3.9, 2.5), direction=np.diag([-1.0, 1, -1])),
                             (128, 128, 128))
    assert not is_model_grid(Grid((100, 128, 128), (3.9, 3.9, 2.5)), (128, 128, 128))


def test_model_grid_is_centred_on_the_point() -> None:
    g = model_grid_around(np.array([10.0, -20.0, 30.0]), (128, 128, 128))
    centre = g.index_to_lps(np.array([63.5, 63.5, 63.5]))
    assert np.allclose(centre, [10.0, -20.0, 30.0]) and g.spacing_mm == (3.906, 3.906, 2.5)


def test_prepare_case_uses_the_given_possible_dose_mask(tmp_path: Path) -> None:
    case = synthetic_case(shape=(32, 32, 32), spacing=(3.906, 3.906, 2.5))
    pdm = np.zeros((32, 32, 32), bool)
    pdm[10:30, 10:30, 10:30] = True
    case.metadata["possible_dose_mask"] = pdm
    prep = prepare_case(case, tiny_config().inputs)
    assert not prep.resampled and prep.grid.is_same(case.ct.grid)
    assert np.array_equal(prep.possible_dose_mask, pdm)
    assert not any("resampled" in w for w in prep.warnings)


# ----------------------------------------------------------------------------- loss and CLI


def test_masked_loss_ignores_voxels_outside_the_mask() -> None:
    torch = pytest.importorskip("torch")
    from twinrt.dosepredict.train import masked_loss

    cfg = tiny_config()
    x = torch.zeros(1, len(cfg.inputs.channels), 4, 4, 4)
    x[:, 1, 1:3, 1:3, 1:3] = 1.0  # PTV
    t = torch.rand(1, 1, 4, 4, 4)
    w = torch.zeros(1, 1, 4, 4, 4)
    w[..., :2] = 1.0
    pred = t.clone()
    pred[..., 2:] += 5.0  # wrong only outside the mask (and in the PTV's outer half)
    cfg.loss.roi_mean_weight = 0.0
    assert float(masked_loss(pred, t, w, x, cfg)) == 0.0
    pred[..., 0] += 1.0
    assert float(masked_loss(pred, t, w, x, cfg)) == pytest.approx(0.5)
    cfg.loss.roi_mean_weight = 1.0
    assert float(masked_loss(pred, t, w, x, cfg)) > 0.5  # the PTV mean is off too


def test_cli_evaluate_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from twinrt.cli import main

    assert main(["dose-predict", "evaluate-openkbp", str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["dose-predict", "evaluate-openkbp", str(empty)]) == 2
    assert "no pt_N.npz" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pt_1.npz").write_bytes(b"not a zip file")
    entry = make_model(tmp_path / "m", DosePredictConfig.from_dict({
        "model_id": "tiny128", "network": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
        "inputs": {"downsample": 4, "crop_shape": [32, 24, 32]}}))
    assert main(["dose-predict", "evaluate-openkbp", str(bad), "--model", str(entry)]) == 2
    assert "pt_1.npz" in capsys.readouterr().err
