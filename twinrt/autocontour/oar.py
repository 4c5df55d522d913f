"""Organs at risk by a MONAI network (research use only): 2.5D U-Net, MC-dropout uncertainty.

The network (:func:`build_network`) is a MONAI ``UNet`` with ``spatial_dims=2`` that sees one axial
slice with its neighbours (``inputs.context_slices`` on each side) in each CT window of
``inputs.windows_hu``, and gives one sigmoid channel per organ (organs may overlap; an organ a
training patient lacks is left out of that patient's loss). Recipe: :mod:`~twinrt.autocontour.oar_config`;
training: :mod:`~twinrt.autocontour.oar_train`.

Prediction (:class:`OarSegmenter`):

1. the CT is used on its own grid when that grid is OpenKBP-like (identity direction, in-plane
   voxels 2.5–5.5 mm, slices 1.25–3.5 mm)
   (in-plane sizes up to twice ``inputs.plane_shape``; padded to the network's divisor);
   otherwise it is resampled (trilinear, outside = −1000 HU) onto the model grid: voxel size
   ``inputs.spacing_mm``, ``inputs.plane_shape`` in plane centred on the body, every slice of the
   body's extent;
2. every slice is predicted (dropout off) → organ probabilities; with ``mc_samples`` > 0 the
   network runs that many more times with dropout on and the per-voxel standard deviation of the
   probability is the uncertainty (only on slices where the dropout-free pass gives some organ a
   probability of at least :data:`MC_MIN_PROBABILITY`; elsewhere it is 0);
3. each organ's probability is thresholded at ``predict.threshold`` and keeps its largest 3D
   connected component; on a resampled CT the probability inside that organ's box goes back to the
   CT grid (trilinear) and is thresholded there (largest component again); the uncertainty map
   (largest standard deviation over organs) is mapped back once.

Output structures are named after AAPM TG-263 (:data:`TG263_NAMES`). Every result records the model
id and the sha256 of its weights. Models: ``twinrt/autocontour/models`` (shipped) and
``<$TWINRT_MODELS_DIR or ~/.twinrt/models>/autocontour`` (trained by the user), each a ``<id>.pt``
with its manifest entry ``<id>.json`` (:func:`save_model`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

import twinrt
from twinrt.autocontour.oar_config import LR_PAIRS, OarConfig
from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.geometry import Grid, resample_array
from twinrt.io_utils import write_text_atomic
from twinrt.model import Image, Structure, StructureType
from twinrt.progress import CancelToken, ProgressCallback, report

#: Network organ (OpenKBP name) → structure name (AAPM TG-263).
TG263_NAMES = {"Brainstem": "Brainstem", "SpinalCord": "SpinalCord", "RightParotid": "Parotid_R",
               "LeftParotid": "Parotid_L", "Esophagus": "Esophagus", "Larynx": "Larynx", "Mandible": "Bone_Mandible"}
#: Display colours (RGB 0-255) per network organ.
ORGAN_COLORS = {"Brainstem": (145, 92, 109), "SpinalCord": (244, 214, 49), "RightParotid": (216, 132, 105),
                "LeftParotid": (216, 132, 105), "Esophagus": (211, 171, 143), "Larynx": (111, 184, 210),
                "Mandible": (241, 214, 145)}
#: The shipped default model.
DEFAULT_MODEL_ID = "openkbp-oar-unet25d-cpu"
#: MC-dropout passes run only on slices where the dropout-free pass gives some organ at least this
#: probability; elsewhere the standard deviation is 0 (no organ is possible there).
MC_MIN_PROBABILITY = 0.05
#: Sub-folder of the user models folder for segmentation models.
USER_SUBDIR = "autocontour"


# ----------------------------------------------------------------------------- network


def build_network(config: OarConfig) -> Any:
    """The MONAI 2D ``UNet`` of ``config`` (float32, CPU, training mode)."""
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet

    n = config.network
    return UNet(spatial_dims=2, in_channels=config.inputs.n_channels, out_channels=len(config.organs),
                channels=tuple(int(c) for c in n.channels), strides=tuple(int(s) for s in n.strides),
                num_res_units=int(n.num_res_units), dropout=float(n.dropout),
                norm=Norm.INSTANCE if n.norm == "instance" else Norm.BATCH)


def windowed(ct_hu: np.ndarray, config: OarConfig) -> np.ndarray:
    """(W, K, J, I) float32: the CT in each window of ``inputs.windows_hu`` scaled to 0..1."""
    ct = np.asarray(ct_hu, dtype=np.float32)
    return np.stack([np.clip((ct - lo) / (hi - lo), 0.0, 1.0) for lo, hi in config.inputs.windows_hu])


def slice_stack(win: np.ndarray, ks: Sequence[int], context: int) -> np.ndarray:
    """(len(ks), W·(2·context+1), J, I): each slice with its neighbours (clamped at the ends), per window."""
    nk = win.shape[1]
    offsets = np.arange(-context, context + 1)
    idx = np.clip(np.asarray(ks)[:, None] + offsets[None, :], 0, nk - 1)        # (B, S)
    out = win[:, idx]                                                            # (W, B, S, J, I)
    return np.ascontiguousarray(out.transpose(1, 0, 2, 3, 4).reshape(len(ks), -1, *win.shape[2:]))


def lr_flip_order(organs: Sequence[str]) -> list[int]:
    """Channel order after a left-right flip: channel c then holds organ ``order[c]`` (paired organs swapped)."""
    order = list(range(len(organs)))
    for a, b in LR_PAIRS:
        if a in organs and b in organs:
            ia, ib = list(organs).index(a), list(organs).index(b)
            order[ia], order[ib] = ib, ia
    return order


def lr_flip_organs(labels: np.ndarray, organs: Sequence[str]) -> np.ndarray:
    """Flip organ channels (axis 0) left-right (last axis) and swap paired organs (Right ↔ Left)."""
    return np.ascontiguousarray(labels[..., ::-1][lr_flip_order(organs)])


def _pad_to(x: np.ndarray, divisor: int) -> tuple[np.ndarray, tuple[int, int]]:
    j, i = x.shape[-2:]
    pj, pi = (-j) % divisor, (-i) % divisor
    if pj or pi:
        x = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pj), (0, pi)])
    return x, (j, i)


def _runner(net: Any, config: OarConfig) -> Callable[[Any], Any]:
    """``x -> logits`` for a batch of slices: the network on whole slices, or MONAI's sliding-window
    inference with windows of ``predict.window`` (see :class:`~twinrt.autocontour.oar_config.OarPredictConfig`)."""
    w = config.predict.window
    if not w:
        return net
    from monai.inferers import sliding_window_inference

    def run(x: Any) -> Any:
        return sliding_window_inference(x, (w, w), sw_batch_size=x.shape[0], predictor=net,
                                        overlap=config.predict.window_overlap, mode="gaussian", padding_mode="constant",
                                        cval=0.0)
    return run


def predict_probabilities(net: Any, ct_hu: np.ndarray, config: OarConfig, mc_samples: int = 0,
                          device: str = "cpu", progress: Optional[ProgressCallback] = None,
                          cancel: Optional[CancelToken] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Organ probabilities of a CT on a model-like grid.

    :param ct_hu: (K, J, I) CT in HU.
    :param mc_samples: extra passes with dropout on; 0 for no uncertainty.
    :return: ``(prob, std)``: (O, K, J, I) float32 probabilities (dropout off) and their MC-dropout
        standard deviation (same shape) or ``None``.
    """
    import torch

    win = windowed(ct_hu, config)
    win, (nj, ni) = _pad_to(win, config.network.size_divisor)
    nk = win.shape[1]
    n_org = len(config.organs)
    prob = np.zeros((n_org, nk, nj, ni), dtype=np.float32)
    std = np.zeros_like(prob) if mc_samples > 0 else None
    bs = config.predict.batch_slices
    batches = [list(range(s, min(s + bs, nk))) for s in range(0, nk, bs)]
    total = len(batches) * (1 + mc_samples)
    done = 0
    dev = torch.device(device)
    run = _runner(net, config)
    with torch.no_grad():
        for ks in batches:
            x = torch.from_numpy(slice_stack(win, ks, config.inputs.context_slices)).to(dev)
            net.eval()
            p = torch.sigmoid(run(x))[..., :nj, :ni].cpu().numpy()
            prob[:, ks[0]:ks[-1] + 1] = p.transpose(1, 0, 2, 3)
            done += 1
            report(progress, done / total, "organ network", cancel)
            # MC passes only on slices where some organ is possible: elsewhere the spread is ~0.
            busy = np.nonzero(p.reshape(len(ks), -1).max(axis=1) >= MC_MIN_PROBABILITY)[0]
            if mc_samples > 0 and len(busy):
                from twinrt.dosepredict.model import enable_mc_dropout

                enable_mc_dropout(net)
                xb = x[torch.from_numpy(busy)]
                s1 = np.zeros((len(busy),) + p.shape[1:], np.float32)
                s2 = np.zeros_like(s1)
                for _ in range(mc_samples):
                    q = torch.sigmoid(run(xb))[..., :nj, :ni].cpu().numpy()
                    s1 += q
                    s2 += q * q
                    done += 1
                    report(progress, done / total, "MC-dropout uncertainty", cancel)
                net.eval()
                m = s1 / mc_samples
                assert std is not None
                sd = np.sqrt(np.maximum(s2 / mc_samples - m * m, 0.0)).transpose(1, 0, 2, 3)
                std[:, [ks[b] for b in busy]] = sd
            elif mc_samples > 0:
                done += mc_samples
    return prob, std


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 3D (26-connected) component of a bool mask (the mask itself when empty)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def postprocess(prob: np.ndarray, config: OarConfig) -> np.ndarray:
    """(O, K, J, I) bool: threshold, then each organ's largest component (``predict.largest_component``)."""
    masks = prob >= config.predict.threshold
    if config.predict.largest_component:
        masks = np.stack([largest_component(m) for m in masks])
    return masks


# ----------------------------------------------------------------------------- model files


def package_models_dir() -> Path:
    """``twinrt/autocontour/models`` (models shipped with TwinRT)."""
    return Path(__file__).resolve().parent / "models"


def user_models_dir() -> Path:
    """``<$TWINRT_MODELS_DIR or ~/.twinrt/models>/autocontour``."""
    from twinrt.dosepredict.weights import user_models_dir as base

    return base() / USER_SUBDIR


_REQUIRED = ("id", "version", "file", "sha256", "recipe", "data", "validation", "license")


def _read_entry(path: Path) -> dict[str, Any]:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path} is not readable JSON ({exc}); fix or remove it") from exc
    missing = [k for k in _REQUIRED if not isinstance(entry, dict) or k not in entry]
    if missing:
        raise InvalidInputError(f"{path} is not a segmentation model entry (missing {missing}); retrain the model")
    return entry


def list_models() -> list[dict[str, Any]]:
    """Every segmentation model entry found (user folder first), each with ``"path"`` added."""
    found: dict[str, dict[str, Any]] = {}
    for folder in (user_models_dir(), package_models_dir()):
        if not folder.is_dir():
            continue
        for p in sorted(folder.glob("*.json")):
            if p.name.endswith(".config.json"):
                continue
            entry = _read_entry(p)
            found.setdefault(str(entry["id"]), {**entry, "path": str(p)})
    return list(found.values())


def resolve_model(model: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """The manifest entry and weights path of a model id, an entry/weights path, or the default."""
    if model is not None and (Path(model).suffix in (".json", ".pt") or Path(model).exists()):
        entry_path = Path(model).with_suffix(".json")
        if not entry_path.is_file():
            raise MissingInputError(f"Model {model} needs its manifest entry {entry_path.name} beside it "
                                    "(training writes both)", entry_path)
        entry = _read_entry(entry_path)
        return entry, entry_path.parent / entry["file"]
    wanted = str(model) if model is not None else DEFAULT_MODEL_ID
    models = list_models()
    for entry in models:
        if entry["id"] == wanted:
            path = Path(entry.pop("path"))
            return entry, path.parent / entry["file"]
    raise MissingInputError(f"No organ-segmentation model '{wanted}' in {user_models_dir()} or "
                            f"{package_models_dir()}; installed: {', '.join(m['id'] for m in models) or 'none'}. "
                            "Train one with 'twinrt contour train --config "
                            "twinrt/autocontour/configs/openkbp_oar_unet25d_cpu.json --out DIR'", None)


def save_model(net: Any, config: OarConfig, out_dir: str | Path, **fields: Any) -> tuple[dict[str, Any], Path]:
    """Write ``<out_dir>/<model_id>.pt`` (``predict.weights_dtype``) and its entry ``<model_id>.json``.

    :param fields: further entry fields (``data``, ``validation``, ``training``, ``command``, ...).
    """
    from twinrt.dosepredict.weights import WEIGHTS_LICENSE, write_weights

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{config.model_id}.pt"
    sha, size_mb = write_weights(net, weights, config.predict.weights_dtype)
    entry: dict[str, Any] = {"id": config.model_id, "version": config.version, "task": "segmentation",
                             "file": weights.name, "sha256": sha, "sizeMB": round(size_mb, 3),
                             "license": WEIGHTS_LICENSE, "data": {"name": "none (untrained network)"},
                             "validation": {"mean_dice": None, "n_patients": 0}, "recipe": config.to_dict(),
                             "research_use_only": twinrt.RESEARCH_USE_ONLY}
    entry.update(fields)
    path = out / f"{config.model_id}.json"
    write_text_atomic(path, json.dumps(entry, indent=1) + "\n")
    return entry, path


@dataclass
class LoadedOarModel:
    """A network with verified weights (sha256 checked against its entry)."""

    net: Any
    config: OarConfig
    entry: dict[str, Any]
    sha256: str

    @property
    def model_id(self) -> str:
        """The model's id."""
        return str(self.entry["id"])


def load_model(model: str | Path | None = None, device: str = "cpu") -> LoadedOarModel:
    """Build a model's network and load its weights after the sha256 check.

    :raises WeightsIntegrityError: the weights differ from the manifest entry.
    :raises MissingInputError: no such model.
    """
    import torch

    from twinrt.dosepredict.weights import load_weights_file

    entry, weights = resolve_model(model)
    config = OarConfig.from_dict(entry["recipe"], f"recipe of model {entry['id']}")
    state = load_weights_file(weights, entry["sha256"])
    net = build_network(config)
    try:
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        raise InvalidInputError(f"Weights {weights} do not fit the recipe of model {entry['id']} ({exc})") from exc
    net.to(torch.device(device)).eval()
    return LoadedOarModel(net, config, entry, str(entry["sha256"]))


# ----------------------------------------------------------------------------- prediction


@dataclass
class OarResult:
    """Organs predicted on a CT.

    :param structures: one structure per organ found (TG-263 names, CT grid).
    :param uncertainty: per-voxel MC-dropout standard deviation of the organ probability (largest
        over organs, CT grid), or ``None`` without MC samples.
    :param organ_uncertainty: organ → mean standard deviation on the organ's boundary voxels.
    :param missing: organs the network did not find on this CT.
    """

    structures: list[Structure]
    uncertainty: Optional[Image]
    organ_uncertainty: dict[str, float]
    missing: list[str]
    model_id: str
    sha256: str
    version: str
    seconds: float
    mc_samples: int
    notes: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        """Provenance text stored with every output."""
        return (f"{self.model_id} {self.version} sha256 {self.sha256}; MC-dropout samples {self.mc_samples}; "
                f"{twinrt.RESEARCH_USE_ONLY}")


def is_model_like(grid: Grid, config: OarConfig) -> bool:
    """True when ``grid`` can be fed to the network as it is (module docstring, step 1)."""
    from twinrt.dosepredict.inputs import OPENKBP_SPACING_RANGE_MM

    (lo_xy, hi_xy), (lo_z, hi_z) = OPENKBP_SPACING_RANGE_MM
    di, dj, dk = grid.spacing_mm
    return (np.allclose(grid.direction, np.eye(3), atol=1e-4) and lo_xy <= di <= hi_xy and lo_xy <= dj <= hi_xy
            and lo_z <= dk <= hi_z and grid.shape[1] <= 2 * config.inputs.plane_shape[0] and grid.shape[2] <= 2 * config.inputs.plane_shape[1])


def model_grid_for(ct: Image, config: OarConfig) -> Grid:
    """The model grid of a CT: ``inputs.spacing_mm``, ``plane_shape`` centred on the body in plane,
    identity direction, every slice of the body's extent along z (LPS)."""
    from twinrt.autocontour.classical import body_mask

    body = body_mask(np.maximum(np.asarray(ct.array, np.float32), -1024.0), ct.grid.spacing_mm)
    if not body.any():
        raise InvalidInputError("No patient found in the CT (nothing above -500 HU); check that it is a CT in HU")
    kji = np.argwhere(body)
    lps = ct.grid.index_to_lps(kji[:, ::-1].astype(float))
    center = lps.mean(axis=0)
    sp = np.asarray(config.inputs.spacing_mm, float)
    z0, z1 = float(lps[:, 2].min()), float(lps[:, 2].max())
    nk = int(np.ceil((z1 - z0) / sp[2])) + 1
    nj, ni = config.inputs.plane_shape
    origin = (center[0] - (ni - 1) / 2.0 * sp[0], center[1] - (nj - 1) / 2.0 * sp[1], z0)
    return Grid((nk, nj, ni), tuple(sp), origin)


class OarSegmenter:
    """Segments organs at risk on CTs with one loaded model (module docstring).

    :param model: model id, entry/weights path, or ``None`` for :data:`DEFAULT_MODEL_ID`.
    :param device: torch device.
    """

    def __init__(self, model: str | Path | None = None, device: str = "cpu") -> None:
        loaded = load_model(model, device)
        self._init(loaded.net, loaded.config, loaded.model_id, loaded.sha256, str(loaded.entry["version"]), device)

    def _init(self, net: Any, config: OarConfig, model_id: str, sha256: str, version: str, device: str) -> None:
        self.net, self.config, self.model_id, self.sha256, self.version, self.device = (
            net, config, model_id, sha256, version, device)

    @classmethod
    def from_network(cls, net: Any, config: OarConfig, model_id: str, sha256: str, version: str = "0",
                     device: str = "cpu") -> "OarSegmenter":
        """Wrap an in-memory network (training scores its checkpoint this way)."""
        self = cls.__new__(cls)
        self._init(net, config, model_id, sha256, version, device)
        return self

    @property
    def organs(self) -> tuple[str, ...]:
        """The network organs (OpenKBP names), in channel order."""
        return tuple(self.config.organs)

    def segment_array(self, ct_hu: np.ndarray, mc_samples: int = 0, progress: Optional[ProgressCallback] = None,
                      cancel: Optional[CancelToken] = None) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """Masks, probabilities and MC std of a CT already on a model-like grid ((K, J, I) HU)."""
        prob, std = predict_probabilities(self.net, ct_hu, self.config, mc_samples, self.device, progress, cancel)
        return postprocess(prob, self.config), prob, std

    def segment_ct(self, ct: Image, organs: Optional[Sequence[str]] = None, mc_samples: Optional[int] = None,
                   progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> OarResult:
        """Organs on a CT (any grid), as structures on the CT grid.

        :param organs: network organs (OpenKBP or TG-263 names) to return; default all.
        :param mc_samples: MC-dropout passes (default the recipe's; 0 = no uncertainty map).
        :raises InvalidInputError: a CT the classical checks refuse, or an unknown organ name.
        """
        from twinrt.autocontour.classical import check_ct

        t0 = time.perf_counter()
        check_ct(ct)
        wanted = self._organ_indices(organs)
        n_mc = self.config.predict.mc_samples if mc_samples is None else int(mc_samples)
        grid = ct.grid
        notes: list[str] = []
        if is_model_like(grid, self.config):
            mgrid, hu = grid, np.asarray(ct.array, np.float32)
        else:
            mgrid = model_grid_for(ct, self.config)
            hu = resample_array(np.asarray(ct.array, np.float32), grid, mgrid, order=1, fill_value=-1000.0)
            notes.append(f"CT resampled to the model grid ({mgrid.spacing_mm[0]:.2f} x {mgrid.spacing_mm[1]:.2f} x "
                         f"{mgrid.spacing_mm[2]:.2f} mm, {mgrid.shape[2]}x{mgrid.shape[1]}x{mgrid.shape[0]})")
        prob, std = predict_probabilities(self.net, hu, self.config, n_mc, self.device,
                                          lambda f, t: report(progress, 0.9 * f, t), cancel)
        from twinrt.autocontour.metrics import surface

        structures: list[Structure] = []
        missing: list[str] = []
        organ_unc: dict[str, float] = {}
        unc_model = np.zeros(mgrid.shape, np.float32) if std is not None else None
        for n, idx in enumerate(wanted):
            organ = self.config.organs[idx]
            name = TG263_NAMES.get(organ, organ)
            report(progress, 0.9 + 0.09 * n / len(wanted), f"post-processing {name}", cancel)
            # Threshold and largest component on the model grid, then map back only the organ's box.
            mask_m = prob[idx] >= self.config.predict.threshold
            if self.config.predict.largest_component:
                mask_m = largest_component(mask_m)
            mask = mask_m if mgrid is grid else self._to_ct_grid(prob[idx], mask_m, mgrid, grid)
            if not mask.any():
                missing.append(name)
                continue
            structures.append(Structure(name, mask, grid, ORGAN_COLORS.get(organ, (255, 0, 0)), StructureType.ORGAN))
            if std is not None and unc_model is not None:
                np.maximum(unc_model, std[idx], out=unc_model)
                edge = surface(mask_m)  # a non-empty CT-grid mask comes from a non-empty model-grid one
                organ_unc[name] = float(std[idx][edge].mean()) if edge.any() else 0.0
        unc = None
        if unc_model is not None:
            report(progress, 0.99, "uncertainty map", cancel)
            unc = unc_model if mgrid is grid else resample_array(unc_model, mgrid, grid, order=1)
        report(progress, 1.0, "done", cancel)
        return OarResult(structures, Image(unc, grid, "UNCERTAINTY") if unc is not None else None, organ_unc, missing,
                         self.model_id, self.sha256, self.version, time.perf_counter() - t0, n_mc, notes)

    def _to_ct_grid(self, prob: np.ndarray, mask_m: np.ndarray, mgrid: Grid, grid: Grid) -> np.ndarray:
        """An organ's mask on the CT grid: its probability resampled (trilinear) in the CT box around
        the model-grid organ (2 voxels wider), thresholded, largest component."""
        out = np.zeros(grid.shape, bool)
        if not mask_m.any():
            return out
        kji = np.argwhere(mask_m)
        lo = np.maximum(kji.min(axis=0) - 2, 0)
        hi = np.minimum(kji.max(axis=0) + 2, np.array(mask_m.shape) - 1)
        corners = np.array([[i, j, k] for i in (lo[2], hi[2]) for j in (lo[1], hi[1]) for k in (lo[0], hi[0])], float)
        ijk = grid.lps_to_index(mgrid.index_to_lps(corners))
        a = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, np.array(grid.shape[::-1]) - 1)
        b = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 1, 1, np.array(grid.shape[::-1]))
        sub = grid.subgrid(a[2], b[2], a[1], b[1], a[0], b[0])
        m = resample_array(prob, mgrid, sub, order=1) >= self.config.predict.threshold
        if self.config.predict.largest_component:
            m = largest_component(m)
        out[a[2]:b[2], a[1]:b[1], a[0]:b[0]] = m
        return out

    def _organ_indices(self, organs: Optional[Sequence[str]]) -> list[int]:
        if organs is None:
            return list(range(len(self.config.organs)))
        back = {v.lower(): k for k, v in TG263_NAMES.items()}
        out = []
        for name in organs:
            key = back.get(str(name).lower(), str(name))
            matches = [i for i, o in enumerate(self.config.organs) if o.lower() == key.lower()]
            if not matches:
                known = ", ".join(TG263_NAMES.get(o, o) for o in self.config.organs)
                raise InvalidInputError(f"The model {self.model_id} does not know the organ '{name}'; it knows {known}")
            out.append(matches[0])
        return out


def to_existing_names(existing_names: Sequence[str], structures: Sequence[Structure]
                      ) -> tuple[list[Structure], dict[str, str]]:
    """The network's structures renamed to the patient's spelling of the same organ.

    An organ the patient already has under another name (RightParotid, Parotid R, "L Parotid"...:
    :func:`twinrt.dosepredict.inputs.match_rois`) is that structure, so merging keeps it, or replaces
    it under the user's name, instead of adding a duplicate.

    :return: ``(renamed structures, new name -> network (TG-263) name)``.
    """
    import dataclasses

    from twinrt.dosepredict.inputs import match_rois

    existing = match_rois(list(existing_names))[0] if existing_names else {}
    openkbp = {v: k for k, v in TG263_NAMES.items()}
    renamed, network_names = [], {}
    for s in structures:
        name = existing.get(openkbp.get(s.name, s.name), s.name)
        renamed.append(dataclasses.replace(s, name=name))
        network_names[name] = s.name
    return renamed, network_names


def audit_entry(model_id: str, version: str, sha256: str, mc_samples: int, found: Sequence[str],
                actions: dict[str, str], missing: Sequence[str], seconds: float) -> tuple[str, dict[str, Any]]:
    """The audit-log message and details of one network run (for ``AuditLog.ai_action``)."""
    message = f"Organ-at-risk network contoured {', '.join(found) or 'nothing'} (research use only)"
    return message, {"model": "autocontour-oar", "model_id": model_id, "version": version, "sha256": sha256,
                     "mc_samples": int(mc_samples), "actions": dict(actions), "missing": list(missing),
                     "seconds": round(float(seconds), 2)}


def contour_case(case: Any, model: str | Path | None = None, organs: Optional[Sequence[str]] = None,
                 replace: bool = False, mc_samples: Optional[int] = None, segmenter: Optional[OarSegmenter] = None,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None
                 ) -> tuple[Any, OarResult, dict[str, str]]:
    """Organs at risk added to a case, the user's structures kept (research use only).

    New organs are added; an organ the case already has, under any usual spelling
    (:func:`to_existing_names`), is kept as the user drew it unless ``replace``
    (:func:`~twinrt.autocontour.classical.merge_actions`). The AI action, with the model id and weights
    sha256, goes to the case's audit log. The input case is not modified.

    :return: ``(new case, result, actions)``: actions maps each organ found to add/replace/keep.
    """
    import dataclasses

    from twinrt.audit import AuditLog
    from twinrt.autocontour.classical import merge_structures

    seg = segmenter or OarSegmenter(model)
    result = seg.segment_ct(case.ct, organs, mc_samples, progress, cancel)
    new, _ = to_existing_names([s.name for s in case.structures], result.structures)
    structures, actions = merge_structures(case.structures, new, replace)
    out = dataclasses.replace(case, structures=structures, metadata=dict(case.metadata))
    AuditLog.of_case(out).ai_action(*audit_entry(result.model_id, result.version, result.sha256, result.mc_samples,
                                                 [s.name for s in result.structures], actions, result.missing,
                                                 result.seconds))
    return out, result, actions


def write_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """An *untrained*, randomly initialised tiny model (``<folder>/tiny-oar-test.json`` + ``.pt``) for
    tests of the code path (loading, sha256 check, prediction, post-processing, scene writing); its
    masks mean nothing. Returns the entry path."""
    import torch

    config = OarConfig(model_id="tiny-oar-test", comment="untrained test network")
    config.network.channels = (4, 8, 8)
    config.network.strides = (2, 2)
    config.predict.mc_samples = 2
    config.predict.weights_dtype = "float32"
    config.validate()
    torch.manual_seed(seed)
    _, path = save_model(build_network(config), config, folder,
                         data={"name": "none (untrained test network)"})
    return path


# ----------------------------------------------------------------------------- evaluation


def score_openkbp_patient(masks: np.ndarray, reference: dict[str, np.ndarray], organs: Sequence[str],
                          spacing_mm: Sequence[float], with_hd95: bool = True) -> dict[str, dict[str, float]]:
    """Dice and HD95 (mm) of predicted ``masks`` (O, K, J, I) per organ present in ``reference``.

    An organ the network missed scores Dice 0 and no HD95 (``nan``); ``with_hd95=False`` skips HD95.
    """
    from twinrt.autocontour.metrics import dice, hd95

    out: dict[str, dict[str, float]] = {}
    for i, organ in enumerate(organs):
        ref = reference.get(organ)
        if ref is None or not ref.any():
            continue
        pred = masks[i]
        out[organ] = {"dice": dice(pred, ref),
                      "hd95_mm": hd95(pred, ref, spacing_mm) if pred.any() and with_hd95 else float("nan")}
    return out


def summarise_scores(per_patient: dict[str, dict[str, dict[str, float]]], organs: Sequence[str]) -> dict[str, Any]:
    """Per-organ mean Dice and mean HD95 (mm; organs the network missed left out) over patients, and the
    mean Dice over organs."""
    dice_by: dict[str, float] = {}
    hd_by: dict[str, float] = {}
    n_by: dict[str, int] = {}
    for organ in organs:
        d = [s[organ]["dice"] for s in per_patient.values() if organ in s]
        h = [s[organ]["hd95_mm"] for s in per_patient.values() if organ in s and np.isfinite(s[organ]["hd95_mm"])]
        if d:
            dice_by[organ] = float(np.mean(d))
            hd_by[organ] = float(np.mean(h)) if h else float("nan")
            n_by[organ] = len(d)
    mean = float(np.mean(list(dice_by.values()))) if dice_by else float("nan")
    return {"mean_dice": mean, "dice": dice_by, "hd95_mm": hd_by, "n_organ_patients": n_by}


def evaluate_openkbp(folder: str | Path, model: str | Path | None = None, limit: Optional[int] = None,
                     mc_samples: int = 0, log: Optional[Callable[[str], None]] = print,
                     progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                     segmenter: Optional[OarSegmenter] = None) -> dict[str, Any]:
    """Segment every OpenKBP patient of ``folder`` and score it against its reference contours.

    :param mc_samples: MC-dropout passes per patient (they cost time; the scored masks are the
        dropout-free prediction).
    :return: ``mean_dice``, ``dice`` and ``hd95_mm`` per organ (TG-263 names), ``n_patients``,
        ``seconds_per_patient`` (network and post-processing, not file reading), ``model_id``, ``sha256``,
        ``per_patient``.
    """
    from twinrt.dosepredict.evaluate import openkbp_files
    from twinrt.dosepredict.inputs import load_openkbp_arrays

    say = log or (lambda s: None)
    files = openkbp_files(folder, limit)
    seg = segmenter or OarSegmenter(model)
    organs = seg.organs
    say(f"model {seg.model_id} {seg.version} (sha256 {seg.sha256}), {len(files)} patient(s), "
        f"{mc_samples} MC-dropout samples")
    per_patient: dict[str, dict[str, dict[str, float]]] = {}
    seconds = []
    for n, path in enumerate(files):
        report(progress, n / len(files), f"patient {path.stem}", cancel)
        a = load_openkbp_arrays(path)
        v = a.voxel_mm
        spacing = (float(v[1]), float(v[0]), float(v[2]))
        t0 = time.perf_counter()
        masks, _, _ = seg.segment_array(a.ct_hu, mc_samples=mc_samples, cancel=cancel)
        seconds.append(time.perf_counter() - t0)
        scores = score_openkbp_patient(masks, a.masks, organs, spacing)
        per_patient[path.stem] = scores
        say(f"{path.stem:>8}: " + "  ".join(f"{TG263_NAMES.get(o, o)} {s['dice']:.2f}" for o, s in scores.items())
            + f"  ({seconds[-1]:.1f} s)")
    summary = summarise_scores(per_patient, organs)
    rename = lambda d: {TG263_NAMES.get(k, k): v for k, v in d.items()}  # noqa: E731
    result = {"mean_dice": summary["mean_dice"], "dice": rename(summary["dice"]), "hd95_mm": rename(summary["hd95_mm"]),
              "n_patients": len(files), "seconds_per_patient": float(np.mean(seconds)),
              "n_organ_patients": rename(summary["n_organ_patients"]), "model_id": seg.model_id,
              "sha256": seg.sha256, "mc_samples": mc_samples,
              "per_patient": {p: rename(s) for p, s in per_patient.items()}}
    for organ, d in result["dice"].items():
        say(f"  {organ:>14}: Dice {d:.3f}  HD95 {result['hd95_mm'][organ]:6.2f} mm  "
            f"({result['n_organ_patients'][organ]} patients)")
    say(f"  mean Dice {result['mean_dice']:.3f} over {len(result['dice'])} organs, {len(files)} patients; "
        f"{result['seconds_per_patient']:.2f} s per patient. {twinrt.RESEARCH_USE_ONLY}")
    report(progress, 1.0, "done", cancel)
    return result


__all__ = ["TG263_NAMES", "ORGAN_COLORS", "DEFAULT_MODEL_ID", "build_network", "windowed", "slice_stack",
           "lr_flip_order", "lr_flip_organs", "predict_probabilities", "postprocess", "largest_component", "save_model", "load_model",
           "list_models", "resolve_model", "OarSegmenter", "OarResult", "model_grid_for", "is_model_like",
           "score_openkbp_patient", "summarise_scores", "evaluate_openkbp", "to_existing_names", "audit_entry", "contour_case",
           "write_tiny_model"]
