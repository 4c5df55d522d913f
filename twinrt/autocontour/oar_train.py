"""Train the organ-at-risk network on OpenKBP (research use only).

Recipe: :class:`~twinrt.autocontour.oar_config.OarConfig`. Steps:

1. load every training and validation patient once: CT (HU, float16) and the organ masks as one
   bit field per voxel, plus which organs each patient has (OpenKBP lacks some organs for some
   patients, e.g. the esophagus for about 60 %: those organs are left out of that patient's loss,
   never taught as background);
2. each epoch draws ``train.slices_per_patient`` axial slices per training patient
   (``train.organ_slice_fraction`` of them among slices holding an organ), with left-right flips
   (paired organs swapped), in-plane shifts and CT value jitter; loss = binary cross-entropy +
   ``train.dice_weight`` × soft Dice (per organ over the batch, present organs only); Adam with a
   cosine learning rate;
3. every ``train.val_every`` epochs and after the last, the validation patients are segmented in 3D
   (dropout off, thresholded, largest component) and the mean Dice over organs chooses the
   checkpoint (selection on the validation split, as the issue asks: the final figures are slightly
   optimistic, and say so);
4. the best weights are saved with their manifest entry, reloaded *as saved* (sha256 checked) and
   scored on all validation patients with Dice and HD95 (:func:`~twinrt.autocontour.oar.evaluate_openkbp`);
   the figures go into the entry.

Runs are repeatable with ``train.seed`` on the same machine, torch version and thread count.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

import twinrt
from twinrt.autocontour.oar import (build_network, evaluate_openkbp, load_model, lr_flip_order, lr_flip_organs,
                                    save_model,
                                    score_openkbp_patient, summarise_scores, OarSegmenter)
from twinrt.autocontour.oar_config import OarConfig
from twinrt.io_utils import write_text_atomic
from twinrt.progress import CancelToken, ProgressCallback, report


@dataclass
class _Cache:
    ids: list[str]
    ct: list[np.ndarray]          # (K, J, I) float16 HU
    labels: list[np.ndarray]      # (K, J, I) uint8/uint16 bit field over config.organs
    present: np.ndarray           # (N, O) bool
    organ_slices: list[np.ndarray]
    spacing: list[tuple[float, float, float]]
    masks: list[dict[str, np.ndarray]]


def _load(paths: Sequence[Path], config: OarConfig, keep_masks: bool, progress: Optional[ProgressCallback],
          cancel: Optional[CancelToken], frac: tuple[float, float], what: str) -> _Cache:
    from twinrt.dosepredict.inputs import load_openkbp_arrays

    organs = list(config.organs)
    dtype = np.uint8 if len(organs) <= 8 else np.uint16
    cache = _Cache([], [], [], np.zeros((len(paths), len(organs)), bool), [], [], [])
    for n, p in enumerate(paths):
        report(progress, frac[0] + (frac[1] - frac[0]) * n / len(paths), f"loading {what} patient {p.stem}", cancel)
        a = load_openkbp_arrays(p)
        bits = np.zeros(a.ct_hu.shape, dtype)
        for o, organ in enumerate(organs):
            m = a.masks.get(organ)
            if m is not None and m.any():
                bits |= (m.astype(dtype) << o)
                cache.present[n, o] = True
        cache.ids.append(p.stem)
        cache.ct.append(a.ct_hu.astype(np.float16))
        cache.labels.append(bits)
        cache.organ_slices.append(np.nonzero(bits.reshape(bits.shape[0], -1).any(axis=1))[0])
        v = a.voxel_mm
        cache.spacing.append((float(v[1]), float(v[0]), float(v[2])))
        cache.masks.append({o: a.masks[o] for o in organs if o in a.masks} if keep_masks else {})
    return cache


def _sample(cache: _Cache, config: OarConfig, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(patient, slice) pairs of one epoch, shuffled."""
    t = config.train
    pairs = []
    for p in range(len(cache.ids)):
        nk = cache.ct[p].shape[0]
        organ_k = cache.organ_slices[p]
        for _ in range(t.slices_per_patient):
            if len(organ_k) and rng.random() < t.organ_slice_fraction:
                pairs.append((p, int(rng.choice(organ_k))))
            else:
                pairs.append((p, int(rng.integers(0, nk))))
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def make_batch(cache: _Cache, pairs: Sequence[tuple[int, int]], config: OarConfig, rng: Optional[np.random.Generator]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Network input (B, C, J, I), targets (B, O, J, I) and organ-present weights (B, O); augmented
    when ``rng`` is given (left-right flip, in-plane shift, CT value jitter)."""
    ctx = config.inputs.context_slices
    aug = config.augment
    n_org = len(config.organs)
    xs, ys, ws = [], [], []
    for p, k in pairs:
        ct = cache.ct[p]
        idx = np.clip(np.arange(k - ctx, k + ctx + 1), 0, ct.shape[0] - 1)
        hu = ct[idx].astype(np.float32)
        bits = cache.labels[p][k]
        y = np.stack([((bits >> o) & 1).astype(np.float32) for o in range(n_org)])
        w = cache.present[p].astype(np.float32)
        if rng is not None:
            if aug.hu_jitter > 0:
                hu = hu + float(rng.uniform(-aug.hu_jitter, aug.hu_jitter))
            if rng.random() < aug.lr_flip_prob:
                hu = np.ascontiguousarray(hu[..., ::-1])
                y = lr_flip_organs(y, config.organs)
                w = w[lr_flip_order(config.organs)]
            s = aug.shift_voxels
            if s > 0:
                dj, di = (int(v) for v in rng.integers(-s, s + 1, size=2))
                hu = np.roll(hu, (dj, di), axis=(1, 2))
                y = np.roll(y, (dj, di), axis=(1, 2))
        if aug.crop and rng is not None:
            hu, y = _crop(hu, y, aug.crop, rng)
        win = np.stack([np.clip((hu - lo) / (hi - lo), 0.0, 1.0) for lo, hi in config.inputs.windows_hu])
        xs.append(win.reshape(-1, *hu.shape[1:]))
        ys.append(y)
        ws.append(w)
    return np.stack(xs).astype(np.float32), np.stack(ys), np.stack(ws)


def _crop(hu: np.ndarray, y: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An in-plane ``size`` crop of (S, J, I) ``hu`` and (O, J, I) ``y``: centred on a random organ
    voxel (± size/4) when the slice has one, else anywhere; zero/air padding where it leaves the slice."""
    nj, ni = hu.shape[1:]
    on = np.argwhere(y.any(axis=0))
    if len(on):
        cj, ci = on[int(rng.integers(len(on)))] + rng.integers(-size // 4, size // 4 + 1, size=2)
    else:
        cj, ci = rng.integers(0, nj), rng.integers(0, ni)
    j0, i0 = int(cj) - size // 2, int(ci) - size // 2
    pad = size
    hu_p = np.pad(hu, ((0, 0), (pad, pad), (pad, pad)), constant_values=-1000.0)
    y_p = np.pad(y, ((0, 0), (pad, pad), (pad, pad)))
    j0 = min(max(j0, -pad), nj + pad - size) + pad
    i0 = min(max(i0, -pad), ni + pad - size) + pad
    return hu_p[:, j0:j0 + size, i0:i0 + size], y_p[:, j0:j0 + size, i0:i0 + size]


def seg_loss(logits: Any, target: Any, present: Any, dice_weight: float) -> Any:
    """BCE (present organs) + ``dice_weight`` × soft Dice per organ over the batch (organs present and
    drawn on at least one slice of the batch).

    :param logits: (B, O, J, I); ``target`` the same, 0/1; ``present`` (B, O) 0/1.
    """
    import torch
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(2, 3))
    loss = (bce * present).sum() / present.sum().clamp_min(1.0)
    if dice_weight > 0:
        p = torch.sigmoid(logits)
        inter = ((p * target).sum(dim=(2, 3)) * present).sum(0)
        denom = ((p.sum(dim=(2, 3)) + target.sum(dim=(2, 3))) * present).sum(0)
        # Only organs drawn on some slice of the batch: an organ absent from every slice would give
        # a Dice loss near 1 whatever the network does (cross-entropy handles those slices).
        has = (target.sum(dim=(2, 3)) * present).sum(0) > 0
        if bool(has.any()):
            dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
            loss = loss + dice_weight * dice[has].mean()
    return loss


def _validate(net: Any, cache: _Cache, config: OarConfig, device: str) -> float:
    seg = OarSegmenter.from_network(net, config, config.model_id, "in-training", config.version, device)
    per = {}
    for n, pid in enumerate(cache.ids):
        masks, _, _ = seg.segment_array(cache.ct[n].astype(np.float32))
        per[pid] = {o: {"dice": s["dice"], "hd95_mm": float("nan")}
                    for o, s in score_openkbp_patient(masks, cache.masks[n], config.organs, cache.spacing[n],
                                                      with_hd95=False).items()}
    net.train()
    return float(summarise_scores(per, config.organs)["mean_dice"])


def train(config: OarConfig, data_dir: str | Path | None, out_dir: str | Path,
          progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
          max_patients: Optional[int] = None, log: Optional[Callable[[str], None]] = print,
          command: Optional[str] = None) -> dict[str, Any]:
    """Train, select on validation, save weights and manifest entry (module docstring).

    :param data_dir: the OpenKBP folder (with ``train/`` and ``validation/``) or the shared data
        folder; ``None`` for :func:`twinrt.data.shared_data_dir`.
    :param out_dir: where ``<model_id>.pt``, ``<model_id>.json`` and ``<model_id>.config.json`` go.
    :param max_patients: only the first N training *and* N validation patients (smoke runs).
    :return: the manifest entry.
    """
    import torch

    from twinrt.dosepredict.train import OPENKBP_DATA, _device_text, _monai_version, openkbp_run

    say = log or (lambda s: None)
    t_start = time.perf_counter()
    config = config.validate()
    out = Path(out_dir)
    tc = config.train
    root, train_paths, val_paths, rng, device = openkbp_run(data_dir, max_patients, tc.seed, tc.num_threads,
                                                            tc.device)
    dev = str(device)
    say(f"contour train {config.model_id}: {len(train_paths)} training, {len(val_paths)} validation patients, "
        f"organs {list(config.organs)}, device {_device_text(device)}")
    t0 = time.perf_counter()
    tr = _load(train_paths, config, False, progress, cancel, (0.0, 0.08), "training")
    va = _load(val_paths, config, True, progress, cancel, (0.08, 0.1), "validation")
    say(f"loaded patients in {time.perf_counter() - t0:.1f} s; organs present in training: "
        + ", ".join(f"{o} {int(tr.present[:, i].sum())}" for i, o in enumerate(config.organs)))

    net = build_network(config).to(device)
    n_params = int(sum(p.numel() for p in net.parameters()))
    say(f"network: MONAI UNet 2D {list(config.network.channels)}, {config.inputs.n_channels} input channels, "
        f"{n_params} parameters")
    opt = torch.optim.Adam(net.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    steps_per_epoch = -(-len(train_paths) * tc.slices_per_patient // tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs

    def lr_factor(step: int) -> float:
        return 0.02 + 0.98 * 0.5 * (1.0 + np.cos(np.pi * min(step, total_steps) / total_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    best, best_epoch, best_state = -1.0, 0, None
    history: list[dict[str, Any]] = []
    epoch_seconds = []
    step = 0
    for epoch in range(1, tc.epochs + 1):
        t_ep = time.perf_counter()
        net.train()
        pairs = _sample(tr, config, rng)
        total = 0.0
        for b in range(steps_per_epoch):
            chunk = pairs[b * tc.batch_size:(b + 1) * tc.batch_size]
            if not chunk:
                break
            report(progress, 0.1 + 0.8 * step / total_steps, f"epoch {epoch}/{tc.epochs}", cancel)
            x, y, w = (torch.from_numpy(a).to(device) for a in make_batch(tr, chunk, config, rng))
            opt.zero_grad(set_to_none=True)
            loss = seg_loss(net(x), y, w, tc.dice_weight)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total += float(loss.detach())
        val = None
        if epoch % tc.val_every == 0 or epoch == tc.epochs:
            val = _validate(net, va, config, dev)
            if val > best:
                best, best_epoch = val, epoch
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
        secs = time.perf_counter() - t_ep
        epoch_seconds.append(secs)
        history.append({"epoch": epoch, "loss": total / max(steps_per_epoch, 1), "val_mean_dice": val,
                        "seconds": round(secs, 1)})
        say(f"epoch {epoch:3d}/{tc.epochs} loss {total / max(steps_per_epoch, 1):.4f} "
            + (f"val mean Dice {val:.3f} (best {best:.3f} @ {best_epoch}) " if val is not None else "")
            + f"lr {opt.param_groups[0]['lr']:.2e} {secs:.1f} s")

    assert best_state is not None
    net.load_state_dict(best_state)
    training = {"seconds": round(time.perf_counter() - t_start, 1), "epochs_run": tc.epochs, "best_epoch": best_epoch,
                "best_val_mean_dice_selection": round(best, 4),
                "seconds_per_epoch_mean": round(float(np.mean(epoch_seconds)), 2), "device": _device_text(device),
                "torch": torch.__version__, "monai": _monai_version(), "parameters": n_params, "history": history}
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / f"{config.model_id}.config.json")
    data = {**OPENKBP_DATA, "train_patients": len(train_paths), "validation_patients": len(val_paths),
            "labels": "OpenKBP organ-at-risk masks (the challenge's structures, resampled to its 128^3 grid)"}
    cmd = command or (f"twinrt contour train --config {out / (config.model_id + '.config.json')} --out {out} "
                      f"--data {root}")
    created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    entry, entry_path = save_model(net, config, out, data=data, training=training, command=cmd, created=created)
    say(f"saved best weights (epoch {best_epoch}) to {out / entry['file']}: {entry['sizeMB']:.2f} MB, "
        f"sha256 {entry['sha256']}")

    loaded = load_model(entry_path, device=dev)
    seg = OarSegmenter.from_network(loaded.net, loaded.config, loaded.model_id, loaded.sha256, config.version, dev)
    t_eval = time.perf_counter()
    res = evaluate_openkbp(root / "validation", limit=max_patients, log=say, segmenter=seg,
                           progress=lambda f, t: report(progress, 0.9 + 0.1 * f, t), cancel=cancel)
    entry["validation"] = {
        "split": "OpenKBP validation", "n_patients": res["n_patients"], "mean_dice": round(res["mean_dice"], 4),
        "dice": {k: round(v, 4) for k, v in res["dice"].items()},
        "hd95_mm": {k: round(v, 2) for k, v in res["hd95_mm"].items()},
        "n_organ_patients": res["n_organ_patients"], "seconds_per_patient": round(res["seconds_per_patient"], 2),
        "seconds": round(time.perf_counter() - t_eval, 1),
        "metrics": "Dice and 95th-percentile Hausdorff distance (mm, voxel spacing), as MONAI computes them; an organ "
                   "the network missed scores Dice 0; organs a patient lacks are not scored",
        "note": "the same split chose the checkpoint (every train.val_every epochs), so these figures are slightly "
                "optimistic; the OpenKBP test split is not in ../shared/data",
    }
    entry["training"]["seconds_total"] = round(time.perf_counter() - t_start, 1)
    write_text_atomic(entry_path, json.dumps(entry, indent=1) + "\n")
    say(f"wrote {entry_path} in {entry['training']['seconds_total']:.0f} s. {twinrt.RESEARCH_USE_ONLY}")
    report(progress, 1.0, "done", cancel)
    return entry
