"""Train a dose-prediction U-Net on OpenKBP (research use only).

Recipe: :class:`~twinrt.dosepredict.config.DosePredictConfig`. Steps:

1. load every training and validation patient once and cache its inputs at the evaluation
   resolution (average-pooled by ``inputs.downsample``) as float16, with the pooled dose
   (units of ``dose_scale_gy``) and the pooled possible-dose mask (169 patients at 64³: ~1 GB);
2. train with the loss of :class:`~twinrt.dosepredict.config.LossConfig` on windows of
   ``inputs.crop_shape`` around the possible-dose mask (randomly shifted, randomly left-right
   flipped with the parotid channels swapped), Adam/AdamW, cosine or constant learning rate;
3. every ``train.val_every`` epochs (and after the last) score the validation patients at the
   evaluation resolution (mean |pred − ref| inside the pooled mask, Gy) and keep the best
   weights (model selection on validation);
4. save the best weights ``<out>/<model_id>.pt``, reload them as saved, score all validation
   patients at the full 128³ resolution with the OpenKBP metrics (:mod:`~twinrt.dosepredict.metrics`),
   and write the manifest entry ``<out>/<model_id>.json`` and the recipe ``<out>/<model_id>.config.json``.

Runs are repeatable with ``train.seed`` on the same machine, torch version and thread count.
"""

from __future__ import annotations

import copy
import json
import platform
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

import twinrt
from twinrt.dosepredict.config import DosePredictConfig
from twinrt.dosepredict.inputs import build_input, crop_window, downsample, load_openkbp_arrays, lr_flip
from twinrt.errors import MissingInputError
from twinrt.io_utils import write_text_atomic
from twinrt.progress import CancelToken, ProgressCallback, report

OPENKBP_DATA = {
    "name": "OpenKBP (open-access knowledge-based planning grand challenge), train and validation splits",
    "citation": ("Babier A, Zhang B, Mahmood R, Moore KL, Purdie TG, McNiven AL, Chan TCY. OpenKBP: The "
                 "open-access knowledge-based planning grand challenge and data set. Medical Physics "
                 "48(9):5549-5561, 2021. doi:10.1002/mp.14845"),
    "repository": "https://github.com/ababier/open-kbp (MIT License)",
    "license": "MIT (OpenKBP data set); CT images: The Cancer Imaging Archive data usage policy (CC BY)",
    "images": "CT from The Cancer Imaging Archive (TCIA) head-and-neck collections",
}


@dataclass
class _Cache:
    """Inputs at the evaluation resolution, one row per patient."""

    ids: list[str]
    x: np.ndarray        # (N, C, D, H, W) float16
    target: np.ndarray   # (N, 1, D, H, W) float16, dose / dose_scale_gy
    weight: np.ndarray   # (N, 1, D, H, W) float16, pooled possible-dose mask


def resolve_openkbp_root(data_dir: str | Path | None) -> Path:
    """The ``openkbp`` folder (holding ``train/`` and ``validation/``) from ``data_dir`` or the shared data."""
    from twinrt.data import shared_data_dir

    if data_dir is None:
        base = shared_data_dir()
        if base is None:
            raise MissingInputError("Shared data folder not found; pass the OpenKBP folder (with train/ and "
                                    "validation/) or set TWINRT_SHARED_DATA")
        data_dir = base
    root = Path(data_dir)
    if (root / "openkbp").is_dir() and not (root / "train").is_dir():
        root = root / "openkbp"
    if not (root / "train").is_dir() or not (root / "validation").is_dir():
        raise MissingInputError(f"{root} has no train/ and validation/ folders of OpenKBP pt_N.npz files; pass the "
                                "openkbp folder of ../shared/data (see its README.md)", root)
    return root


def _cache(paths: Sequence[Path], config: DosePredictConfig, progress: Optional[ProgressCallback],
           cancel: Optional[CancelToken], frac: tuple[float, float], what: str) -> _Cache:
    cfg = config.inputs
    n, c = len(paths), len(cfg.channels)
    shape = tuple(cfg.eval_shape)
    x = np.zeros((n, c) + shape, dtype=np.float16)
    target = np.zeros((n, 1) + shape, dtype=np.float16)
    weight = np.zeros((n, 1) + shape, dtype=np.float16)
    for i, p in enumerate(paths):
        report(progress, frac[0] + (frac[1] - frac[0]) * i / n, f"loading {what} patient {p.stem}", cancel)
        a = load_openkbp_arrays(p)
        x[i] = downsample(build_input(a.ct_hu, a.masks, a.possible_dose_mask, cfg), cfg.downsample)
        target[i, 0] = downsample(a.dose_gy, cfg.downsample) / cfg.dose_scale_gy
        weight[i, 0] = downsample(a.possible_dose_mask, cfg.downsample)
    return _Cache([p.stem for p in paths], x, target, weight)


def _roi_channels(config: DosePredictConfig) -> list[int]:
    from twinrt.dosepredict.config import OAR_ROIS

    return [i for i, c in enumerate(config.inputs.channels) if c in OAR_ROIS]


def masked_loss(pred: Any, target: Any, weight: Any, inputs: Any, config: DosePredictConfig) -> Any:
    """The training loss (:class:`~twinrt.dosepredict.config.LossConfig`) of one batch (torch tensors).

    :param pred: (N, 1, D, H, W) network output; ``target`` the same in dose units.
    :param weight: (N, 1, D, H, W) possible-dose mask (fractions after pooling).
    :param inputs: (N, C, D, H, W) the network input (its ROI channels give the ROI means).
    """
    import torch

    diff = (pred - target).abs()
    loss = (diff * weight).sum() / weight.sum().clamp_min(1e-6)
    w = config.loss.roi_mean_weight
    if w > 0:
        chans = _roi_channels(config)
        rois = [inputs[:, i:i + 1] for i in chans]
        ptv = config.inputs.channels.index("ptv")
        rois.append((inputs[:, ptv:ptv + 1] > 0).to(pred.dtype))
        terms = []
        for m in rois:
            vol = m.sum(dim=(1, 2, 3, 4))
            present = vol > 0.5
            if bool(present.any()):
                mp = (pred * m).sum(dim=(1, 2, 3, 4)) / vol.clamp_min(1e-6)
                mt = (target * m).sum(dim=(1, 2, 3, 4)) / vol.clamp_min(1e-6)
                terms.append((mp - mt).abs()[present])
        if terms:
            loss = loss + w * torch.cat(terms).mean()
    return loss


def _batch(cache: _Cache, idx: Sequence[int], config: DosePredictConfig, rng: np.random.Generator,
           augment: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cfg, aug = config.inputs, config.augment
    xs, ts, ws = [], [], []
    for i in idx:
        s = aug.shift_voxels if augment else 0
        shift = rng.integers(-s, s + 1, size=3) if s else (0, 0, 0)
        win = (slice(None),) + crop_window(cache.weight[i, 0], cfg.crop_shape, config.network.size_divisor,
                                           widen=False, shift=shift)
        x, t, w = cache.x[i][win], cache.target[i][win], cache.weight[i][win]
        if augment and rng.random() < aug.lr_flip_prob:
            x, t, w = lr_flip(x, cfg.channels), lr_flip(t), lr_flip(w)
        xs.append(x)
        ts.append(t)
        ws.append(w)
    return (np.stack(xs).astype(np.float32), np.stack(ts).astype(np.float32), np.stack(ws).astype(np.float32))


def validate_eval_resolution(net: Any, cache: _Cache, config: DosePredictConfig, device: Any) -> float:
    """Mean over patients of ``Σ w·|pred − ref| / Σ w`` (Gy) at the evaluation resolution (dropout off)."""
    import torch

    cfg = config.inputs
    scores = []
    net.eval()
    with torch.no_grad():
        for i in range(len(cache.ids)):
            w_full = cache.weight[i, 0].astype(np.float32)
            win = crop_window(w_full, cfg.crop_shape, config.network.size_divisor, widen=True)
            x = torch.from_numpy(cache.x[i][(slice(None),) + win].astype(np.float32))[None].to(device)
            pred = np.zeros(w_full.shape, dtype=np.float32)
            pred[win] = net(x)[0, 0].cpu().numpy()
            pred = np.clip(pred, 0, None)
            t = cache.target[i, 0].astype(np.float32)
            scores.append(float((np.abs(pred - t) * w_full).sum() / max(w_full.sum(), 1e-6)) * cfg.dose_scale_gy)
    return float(np.mean(scores))


def _monai_version() -> str:
    import monai

    return str(monai.__version__)


def openkbp_run(data_dir: str | Path | None, max_patients: Optional[int], seed: int, num_threads: int,
                device: str) -> tuple[Path, list[Path], list[Path], np.random.Generator, Any]:
    """What every OpenKBP training starts with: the data folder, the training and validation
    patients (the first ``max_patients`` of each), seeded random generators (python, numpy, torch;
    returns numpy's ``default_rng(seed)``), torch's thread count and the torch device."""
    import torch

    from twinrt.data import openkbp_patients

    root = resolve_openkbp_root(data_dir)
    train_paths = openkbp_patients("train", root)[:max_patients]
    val_paths = openkbp_patients("validation", root)[:max_patients]
    if not train_paths or not val_paths:
        raise MissingInputError(f"{root} has no pt_N.npz in train/ or validation/", root)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    return root, train_paths, val_paths, np.random.default_rng(seed), _device(device)


def _device(want: str) -> Any:
    import torch

    if want == "cuda" and not torch.cuda.is_available():
        raise MissingInputError("train.device is 'cuda' but torch sees no GPU; use 'auto' or 'cpu'")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def _device_text(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"


def train(config: DosePredictConfig, data_dir: str | Path | None, out_dir: str | Path,
          progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
          max_patients: Optional[int] = None, log: Optional[Callable[[str], None]] = print,
          command: Optional[str] = None) -> dict[str, Any]:
    """Train, select on validation, save weights and manifest entry (module docstring).

    :param config: the recipe.
    :param data_dir: the OpenKBP folder (with ``train/`` and ``validation/``) or the shared data
        folder; ``None`` for :func:`twinrt.data.shared_data_dir`.
    :param out_dir: where ``<model_id>.pt``, ``<model_id>.json`` and ``<model_id>.config.json`` go.
    :param max_patients: use only the first N training *and* N validation patients (smoke runs).
    :param log: receives one line per epoch (loss, validation score, seconds) and the summary.
    :param command: the command line that re-runs this training (stored in the manifest).
    :return: the manifest entry (also written as ``<model_id>.json``).
    """
    import torch

    from twinrt.dosepredict.metrics import openkbp_scores, score_patient
    from twinrt.dosepredict.model import build_network, count_parameters
    from twinrt.dosepredict.predict import DosePredictor
    from twinrt.dosepredict.weights import load_model, save_model, validate_entry

    say = log or (lambda s: None)
    t_start = time.perf_counter()
    config = config.validate()
    out = Path(out_dir)
    tc = config.train
    root, train_paths, val_paths, rng, device = openkbp_run(data_dir, max_patients, tc.seed, tc.num_threads,
                                                            tc.device)

    say(f"dose-predict train {config.model_id}: {len(train_paths)} training, {len(val_paths)} validation patients, "
        f"grid {list(config.inputs.eval_shape)} (x{config.inputs.downsample} down), crop "
        f"{list(config.inputs.crop_shape)}, device {_device_text(device)}")
    t0 = time.perf_counter()
    train_cache = _cache(train_paths, config, progress, cancel, (0.0, 0.08), "training")
    val_cache = _cache(val_paths, config, progress, cancel, (0.08, 0.1), "validation")
    say(f"cached inputs in {time.perf_counter() - t0:.1f} s "
        f"({(train_cache.x.nbytes + val_cache.x.nbytes) / 1e9:.2f} GB)")

    net = build_network(config).to(device)
    say(f"network: MONAI UNet {list(config.network.channels)}, {count_parameters(net)} parameters")
    opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(net.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    n = len(train_paths)
    steps_per_epoch = -(-n // tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs

    def lr_factor(step: int) -> float:
        if tc.lr_schedule == "constant":
            return 1.0
        return 0.02 + 0.98 * 0.5 * (1.0 + np.cos(np.pi * min(step, total_steps) / total_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    best_score, best_epoch, best_state = float("inf"), 0, None
    epoch_seconds: list[float] = []
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(1, tc.epochs + 1):
        t_ep = time.perf_counter()
        net.train()
        order = rng.permutation(n)
        total, count = 0.0, 0
        for b in range(steps_per_epoch):
            idx = order[b * tc.batch_size:(b + 1) * tc.batch_size]
            report(progress, 0.1 + 0.8 * step / total_steps, f"epoch {epoch}/{tc.epochs}", cancel)
            x, t, w = (torch.from_numpy(a).to(device) for a in _batch(train_cache, idx, config, rng, True))
            opt.zero_grad(set_to_none=True)
            loss = masked_loss(net(x), t, w, x, config)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        val = None
        if epoch % tc.val_every == 0 or epoch == tc.epochs:
            val = validate_eval_resolution(net, val_cache, config, device)
            if val < best_score:
                best_score, best_epoch = val, epoch
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
        secs = time.perf_counter() - t_ep
        epoch_seconds.append(secs)
        history.append({"epoch": epoch, "loss": total / max(count, 1), "val_dose_score_eval_res": val,
                        "seconds": round(secs, 2)})
        val_text = f"val dose score {val:.3f} Gy (eval res; best {best_score:.3f} @ {best_epoch})" if val is not None \
            else "val -"
        say(f"epoch {epoch:3d}/{tc.epochs} loss {total / max(count, 1):.5f} {val_text} "
            f"lr {opt.param_groups[0]['lr']:.2e} {secs:.1f} s")

    assert best_state is not None  # the last epoch always validates
    net.load_state_dict(best_state)
    train_seconds = time.perf_counter() - t_start
    training = {
        "seconds": round(train_seconds, 1),
        "epochs_run": tc.epochs,
        "best_epoch": best_epoch,
        "best_val_dose_score_eval_res_gy": round(best_score, 4),
        "seconds_per_epoch_mean": round(float(np.mean(epoch_seconds)), 2),
        "device": _device_text(device),
        "torch": torch.__version__,
        "monai": _monai_version(),
        "parameters": count_parameters(net),
        "history": history,
    }
    config.save(out / f"{config.model_id}.config.json")
    entry, entry_path = save_model(
        net, config, out,
        data={**OPENKBP_DATA, "train_patients": len(train_paths), "validation_patients": len(val_paths)},
        training=training,
        command=command or (f"twinrt dose-predict train --config {out / (config.model_id + '.config.json')} "
                            f"--out {out} --data {root}"),
        created=datetime.now(timezone.utc).replace(microsecond=0).isoformat())
    sha = entry["sha256"]
    weights_path = out / entry["file"]
    say(f"saved best weights (epoch {best_epoch}) to {weights_path}: {entry['sizeMB']:.2f} MB, sha256 {sha}")

    # Final figures with the weights exactly as saved, at full resolution, with the challenge metrics.
    loaded = load_model(entry_path, device="cpu" if device.type == "cpu" else str(device))
    predictor = DosePredictor.from_network(loaded.net, loaded.config, config.model_id, sha, config.version,
                                           device=str(device))
    scores = []
    t_eval = time.perf_counter()
    for i, p in enumerate(val_paths):
        report(progress, 0.9 + 0.1 * i / len(val_paths), f"scoring validation patient {p.stem}", cancel)
        a = load_openkbp_arrays(p)
        pred = predictor.predict_openkbp(a, mc_samples=0)
        scores.append(score_patient(p.stem, pred.dose_gy, a.dose_gy, a.masks, a.possible_dose_mask, a.voxel_mm))
    dose_score, dvh_score = openkbp_scores(scores)
    entry["validation"] = {
        "dose_score": round(dose_score, 4), "dvh_score": round(dvh_score, 4), "n_patients": len(scores),
        "split": "OpenKBP validation", "resolution": "x".join(str(s) for s in config.inputs.model_shape),
        "metrics": "OpenKBP challenge (ababier/open-kbp provided_code/dose_evaluation_class.py); "
                   "dose score = mean |pred - ref| in the possible-dose mask, DVH score = mean |difference| of "
                   "D_0.1cc and mean (OARs), D99, D95, D1 (PTVs)",
        "per_patient": {s.patient_id: {"dose_score": round(s.dose_score, 4), "dvh_score": round(s.dvh_score, 4)}
                        for s in scores},
        "seconds": round(time.perf_counter() - t_eval, 1),
        "note": "the same split chose the checkpoint (every train.val_every epochs), so these figures are slightly "
                "optimistic; the OpenKBP test split is not in ../shared/data",
    }
    entry["training"]["seconds_total"] = round(time.perf_counter() - t_start, 1)
    validate_entry(entry, str(entry_path))
    write_text_atomic(entry_path, json.dumps(entry, indent=1) + "\n")
    report(progress, 1.0, "done", cancel)
    say(f"validation ({len(scores)} patients, {entry['validation']['resolution']}): dose score {dose_score:.3f} Gy, "
        f"DVH score {dvh_score:.3f} Gy")
    say(f"wrote {entry_path} and {weights_path} in {entry['training']['seconds_total']:.0f} s. "
        f"{twinrt.RESEARCH_USE_ONLY}")
    return entry
