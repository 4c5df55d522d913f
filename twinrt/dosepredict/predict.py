"""Dose prediction for a case or for OpenKBP arrays (research use only).

Pipeline: inputs on the model grid (:mod:`twinrt.dosepredict.inputs`) → average-pooled by the
recipe's downsample factor → network on a window around the possible-dose mask → upsampled back
trilinearly → × ``dose_scale_gy``, clipped at 0 Gy, zero outside the possible-dose mask →
resampled onto the case's CT grid when the case was resampled.

The predicted dose is the network with dropout off (deterministic). With ``mc_samples`` ≥ 2 the
per-voxel standard deviation of that many MC-dropout passes (seeded, so repeatable) is returned
as a second dose, ``predicted_std``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

import twinrt
from twinrt.dosepredict.config import DosePredictConfig
from twinrt.dosepredict.inputs import (OpenKBPArrays, body_mask, build_input, crop_window, downsample,
                                      prepare_case, upsample)
from twinrt.errors import InvalidInputError
from twinrt.geometry import resample_array
from twinrt.model import Case, Dose
from twinrt.progress import CancelToken, ProgressCallback, report

#: Names of the outputs in ``Case.doses`` (what :mod:`twinrt.planning.kbp` reads).
PREDICTED = "predicted"
PREDICTED_STD = "predicted_std"


@dataclass
class ArrayPrediction:
    """A prediction on the model grid.

    :param dose_gy: (K, J, I) predicted dose (Gy, float32).
    :param std_gy: (K, J, I) MC-dropout standard deviation (Gy) or ``None``.
    :param seconds: wall time of the prediction (input building included).
    """

    dose_gy: np.ndarray
    std_gy: Optional[np.ndarray]
    seconds: float


@dataclass
class PredictionResult:
    """The prediction for a case.

    :param dose: predicted dose (Gy) on the case's CT grid, named ``"predicted"``; its ``source``
        names the model, the weights' sha256 and "research use only".
    :param std: per-voxel MC-dropout standard deviation (Gy) as a dose named ``"predicted_std"``,
        or ``None`` when ``mc_samples`` was 0.
    :param warnings: resampling, orientation, body-site and missing-organ notes.
    :param model_id: model used.
    :param sha256: sha256 of its weights file ("" for an in-memory network).
    :param roi_map: model ROI → case structure used.
    :param seconds: wall time.
    :param research_use_only: the label every output carries.
    """

    dose: Dose
    std: Optional[Dose]
    warnings: list[str]
    model_id: str
    sha256: str
    roi_map: dict[str, str]
    seconds: float
    research_use_only: str = twinrt.RESEARCH_USE_ONLY
    mc_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def add_to_case(self, case: Case) -> None:
        """Store the dose (and std) in ``case.doses`` under ``"predicted"`` / ``"predicted_std"``."""
        case.doses[PREDICTED] = self.dose
        if self.std is not None:
            case.doses[PREDICTED_STD] = self.std


class DosePredictor:
    """A loaded dose-prediction model.

    :param model: model id, ``.pt``/``.json`` path, or ``None`` for the default model
        (:func:`twinrt.dosepredict.weights.load_model`; the weights' sha256 is verified).
    :param device: ``"cpu"`` (default) or ``"cuda"``.
    :param num_threads: torch CPU threads to use (``None`` leaves torch's setting).
    """

    def __init__(self, model: str | Path | None = None, device: str = "cpu", num_threads: Optional[int] = None):
        from twinrt.dosepredict.weights import load_model

        loaded = load_model(model, device)
        self._init(loaded.net, loaded.config, loaded.model_id, loaded.sha256, str(loaded.entry.get("version", "")),
                   device, num_threads)

    @classmethod
    def from_network(cls, net: Any, config: DosePredictConfig, model_id: str, sha256: str = "",
                     version: str = "", device: str = "cpu", num_threads: Optional[int] = None) -> "DosePredictor":
        """Wrap an in-memory network (training, tests)."""
        self = cls.__new__(cls)
        self._init(net, config, model_id, sha256, version or config.version, device, num_threads)
        return self

    def _init(self, net: Any, config: DosePredictConfig, model_id: str, sha256: str, version: str, device: str,
              num_threads: Optional[int]) -> None:
        import torch

        self.net = net.to(torch.device(device)).eval()
        self.config = config
        self.model_id = model_id
        self.sha256 = sha256
        self.version = version
        self.device = device
        if num_threads:
            torch.set_num_threads(int(num_threads))

    @property
    def source(self) -> str:
        """Provenance text stored in every predicted :class:`Dose`."""
        sha = f"weights sha256 {self.sha256}" if self.sha256 else "in-memory weights"
        return f"TwinRT DosePredict model {self.model_id} {self.version} ({sha}); {twinrt.RESEARCH_USE_ONLY}"

    # ------------------------------------------------------------------ arrays
    def predict_arrays(self, ct_hu: np.ndarray, masks: Mapping[str, np.ndarray], possible_dose_mask: np.ndarray,
                       mc_samples: Optional[int] = None, seed: int = 0, progress: Optional[ProgressCallback] = None,
                       cancel: Optional[CancelToken] = None) -> ArrayPrediction:
        """Predict on arrays already on a model grid.

        :param ct_hu: (K, J, I) CT in HU, K, J, I = the recipe's ``model_shape`` (OpenKBP: 128³).
        :param masks: model ROI name → bool mask (absent organs left out).
        :param possible_dose_mask: bool; the prediction is zero outside it.
        :param mc_samples: MC-dropout passes for the std (0: none; default the recipe's).
        :param seed: seed of the MC-dropout passes (same seed, same std).
        """
        import torch

        from twinrt.dosepredict.model import enable_mc_dropout

        t0 = time.perf_counter()
        cfg = self.config.inputs
        if tuple(ct_hu.shape) != tuple(cfg.model_shape):
            raise InvalidInputError(f"CT shape {ct_hu.shape} is not the model grid {tuple(cfg.model_shape)}; "
                                    "use predict_case, which resamples")
        n_mc = self.config.predict.mc_samples if mc_samples is None else int(mc_samples)
        if n_mc == 1 or n_mc < 0:
            raise InvalidInputError(f"mc_samples must be 0 (no standard deviation) or >= 2, got {n_mc}")
        report(progress, 0.05, "building inputs", cancel)
        pdm = np.asarray(possible_dose_mask, dtype=bool)
        x = downsample(build_input(ct_hu, masks, pdm, cfg), cfg.downsample)
        pdm_eval = downsample(pdm, cfg.downsample)
        window = crop_window(pdm_eval, cfg.crop_shape, self.config.network.size_divisor, widen=True)
        device = torch.device(self.device)
        xt = torch.from_numpy(np.ascontiguousarray(x[(slice(None),) + window]))[None].to(device)
        report(progress, 0.3, "predicting", cancel)
        with torch.no_grad():
            self.net.eval()
            mean = self.net(xt)[0, 0]
            std = None
            if n_mc >= 2:
                report(progress, 0.5, f"{n_mc} MC-dropout passes", cancel)
                devices = [device.index or 0] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(int(seed))
                    if enable_mc_dropout(self.net) == 0:
                        raise InvalidInputError(f"Model {self.model_id} has no dropout: it cannot give an MC "
                                                "standard deviation; use mc_samples=0")
                    try:
                        samples = self.net(xt.expand(n_mc, *xt.shape[1:]))[:, 0]
                    finally:
                        self.net.eval()
                std = samples.std(dim=0, correction=1)
        report(progress, 0.85, "upsampling", cancel)
        out = []
        for arr in (mean, std):
            if arr is None:
                out.append(None)
                continue
            full = torch.zeros((1, 1) + tuple(cfg.eval_shape), dtype=torch.float32, device=device)
            full[(0, 0) + window] = arr
            full = upsample(full, cfg.downsample)
            res = full[0, 0].cpu().numpy() * np.float32(cfg.dose_scale_gy)
            np.clip(res, 0.0, None, out=res)
            res[~pdm] = 0.0
            out.append(res.astype(np.float32, copy=False))
        report(progress, 1.0, "done", cancel)
        return ArrayPrediction(out[0], out[1], time.perf_counter() - t0)

    def predict_openkbp(self, data: OpenKBPArrays, mc_samples: Optional[int] = None, seed: int = 0,
                        progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None
                        ) -> ArrayPrediction:
        """Predict one OpenKBP patient (:func:`twinrt.dosepredict.inputs.load_openkbp_arrays`)."""
        return self.predict_arrays(data.ct_hu, data.masks, data.possible_dose_mask, mc_samples, seed, progress,
                                   cancel)

    # ------------------------------------------------------------------ cases
    def predict_case(self, case: Case, roi_map: Optional[Mapping[str, str]] = None,
                     mc_samples: Optional[int] = None, progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None, seed: int = 0) -> PredictionResult:
        """Predict the dose of ``case`` on its CT grid.

        :param case: CT (HU) and structures; ``metadata["possible_dose_mask"]`` if known, else
            the body is used.
        :param roi_map: model ROI → case structure name (default: automatic matching).
        :param mc_samples: MC-dropout passes for ``std`` (0: none; default the recipe's).
        :raises StructureError: no PTV found (say which names to use).
        """
        t0 = time.perf_counter()
        report(progress, 0.0, "matching structures", cancel)
        prep = prepare_case(case, self.config.inputs, roi_map)

        def sub(fraction: float, text: str) -> None:
            if progress is not None:
                progress(0.2 + 0.7 * fraction, text)

        pred = self.predict_arrays(prep.ct_hu, prep.masks, prep.possible_dose_mask, mc_samples, seed,
                                   sub if progress else None, cancel)
        report(progress, 0.9, "resampling onto the CT grid" if prep.resampled else "storing", cancel)
        dose = Dose(pred.dose_gy, prep.grid, PREDICTED, source=self.source)
        std = Dose(pred.std_gy, prep.grid, PREDICTED_STD, source=self.source + " (MC-dropout standard deviation)") \
            if pred.std_gy is not None else None
        if prep.resampled:
            # Trilinear resampling smears the edge of the mask by one model voxel: cut the dose back
            # to the case's own possible-dose mask, or to its body (HU threshold) within the model mask.
            dose = dose.resampled(case.ct.grid)
            std = std.resampled(case.ct.grid) if std is not None else None
            given = case.metadata.get("possible_dose_mask")
            if given is not None and tuple(np.shape(given)) == case.ct.grid.shape:
                keep = np.asarray(given, dtype=bool)
            else:
                support = resample_array(prep.possible_dose_mask.astype(np.float32), prep.grid, case.ct.grid, order=1)
                keep = body_mask(np.asarray(case.ct.array), case.ct.grid.spacing_mm) & (support > 0)
            for d in (dose, std):
                if d is not None:
                    d.array[~keep] = 0.0
        n_mc = self.config.predict.mc_samples if mc_samples is None else int(mc_samples)
        report(progress, 1.0, "done", cancel)
        return PredictionResult(dose, std, list(prep.warnings), self.model_id, self.sha256, dict(prep.roi_map),
                                time.perf_counter() - t0, mc_samples=n_mc if std is not None else 0,
                                extra={"resampled": prep.resampled, "missing_rois": list(prep.missing)})


def predict_case(case: Case, model: str | Path | None = None, roi_map: Optional[Mapping[str, str]] = None,
                 mc_samples: Optional[int] = None, progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> PredictionResult:
    """One-call prediction with a model id/path (default model when ``None``)."""
    return DosePredictor(model).predict_case(case, roi_map, mc_samples, progress, cancel)
