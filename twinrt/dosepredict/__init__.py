"""Dose prediction (issue 5): a 3D U-Net predicts the dose (Gy) from CT and structures; research use only.

Inputs are the CT, a PTV prescription map, one mask per organ at risk and the possible-dose mask
(:mod:`~twinrt.dosepredict.inputs`); the network is a MONAI U-Net with dropout, so that Monte-Carlo
dropout gives a per-voxel standard deviation (:mod:`~twinrt.dosepredict.model`). Models are trained
on OpenKBP (Babier et al., Medical Physics 48(9), 2021; :mod:`~twinrt.dosepredict.train`), scored
with the challenge's metrics (:mod:`~twinrt.dosepredict.metrics`, :mod:`~twinrt.dosepredict.evaluate`)
and shipped with a sha256-checked manifest (:mod:`~twinrt.dosepredict.weights`).

Importing this package does not import torch or MONAI; they load when a model is built or run.

Typical use::

    from twinrt.dosepredict import DosePredictor
    result = DosePredictor().predict_case(case)     # default model
    result.add_to_case(case)                       # case.doses["predicted"], ["predicted_std"]
"""

from __future__ import annotations

from typing import Any

from twinrt.dosepredict.config import (KNOWN_CHANNELS, MODEL_ROIS, OAR_ROIS, PTV_ROIS, DosePredictConfig,
                                       load_config)
from twinrt.dosepredict.inputs import match_rois

_LAZY = {
    "DosePredictor": "twinrt.dosepredict.predict",
    "PredictionResult": "twinrt.dosepredict.predict",
    "predict_case": "twinrt.dosepredict.predict",
    "train": "twinrt.dosepredict.train",
    "evaluate_openkbp": "twinrt.dosepredict.evaluate",
    "load_model": "twinrt.dosepredict.weights",
    "build_network": "twinrt.dosepredict.model",
    "enable_mc_dropout": "twinrt.dosepredict.model",
}


def __getattr__(name: str) -> Any:
    """Lazy access to the torch-dependent parts (kept out of ``import twinrt.dosepredict``)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'twinrt.dosepredict' has no attribute {name!r}")


__all__ = ["DosePredictConfig", "load_config", "match_rois", "MODEL_ROIS", "OAR_ROIS", "PTV_ROIS", "KNOWN_CHANNELS",
           *_LAZY]
