"""The recipe of an organ-at-risk segmentation network, as one JSON file (research use only).

An :class:`OarConfig` holds everything needed to rebuild, train and run a model: organs (output
channels), the 2.5D input (CT windows and neighbouring slices), the model grid, network,
augmentation, training schedule and prediction settings. It is stored in every model's manifest
entry (``recipe``), so a weights file can always be rebuilt.

JSON layout (every section optional; missing keys take the defaults below)::

    {"model_id": "...", "version": "...", "comment": "...", "organs": [...],
     "network": {...}, "inputs": {...}, "augment": {...}, "train": {...}, "predict": {...}}

Unknown keys are refused (:class:`~twinrt.errors.InvalidInputError` naming the key): a misspelt
key would otherwise silently train with the default.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.io_utils import write_text_atomic

#: Organs at risk of the OpenKBP data (its names), the default output channels.
OPENKBP_OARS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
#: Left/right organ pairs swapped by a left-right flip.
LR_PAIRS = (("RightParotid", "LeftParotid"),)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class OarNetworkConfig:
    """MONAI ``UNet`` (2D, slices with their neighbours as channels) hyper-parameters.

    :param channels: feature channels per level.
    :param strides: down-sampling stride between levels (``len(channels) - 1`` values).
    :param num_res_units: residual units per level.
    :param dropout: dropout probability in every block; > 0 enables MC-dropout uncertainty.
    :param norm: ``"instance"`` or ``"batch"``.
    """

    channels: tuple[int, ...] = (32, 64, 128, 256, 320)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    dropout: float = 0.1
    norm: str = "instance"

    @property
    def size_divisor(self) -> int:
        """In-plane sizes must be multiples of this (product of the strides)."""
        out = 1
        for s in self.strides:
            out *= int(s)
        return out


@dataclass
class OarInputConfig:
    """The network input.

    :param windows_hu: CT windows (low, high HU), each scaled to 0..1: one channel per window and slice.
    :param context_slices: neighbouring slices on each side (2 → 5 slices per window).
    :param spacing_mm: model grid voxel size (i, j, k) in mm for CTs that are not already on an
        OpenKBP-like grid (the training data's median spacing).
    :param plane_shape: model grid in-plane size (nj, ni), centred on the body.
    """

    windows_hu: tuple[tuple[float, float], ...] = ((-1000.0, 2000.0), (-160.0, 240.0))
    context_slices: int = 2
    spacing_mm: tuple[float, float, float] = (3.906, 3.906, 2.5)
    plane_shape: tuple[int, int] = (128, 128)

    @property
    def n_channels(self) -> int:
        """Input channels: windows × (2 × context + 1) slices."""
        return len(self.windows_hu) * (2 * self.context_slices + 1)


@dataclass
class OarAugmentConfig:
    """Training augmentation: left-right flip (paired organs swapped), in-plane shift (voxels),
    CT value jitter (HU, one offset per slice stack), and training on in-plane crops of
    ``crop`` voxels (0: whole slices) centred near an organ voxel when the slice has one (the
    network is fully convolutional: prediction still sees whole slices)."""

    lr_flip_prob: float = 0.5
    shift_voxels: int = 8
    hu_jitter: float = 20.0
    crop: int = 0


@dataclass
class OarTrainConfig:
    """Optimisation schedule.

    :param slices_per_patient: slices drawn per training patient per epoch.
    :param organ_slice_fraction: share of those drawn among slices that hold an organ.
    :param dice_weight: weight of the soft-Dice term (the other term is binary cross-entropy).
    :param val_every: validate (3D Dice on the validation patients) every N epochs and after the last.
    """

    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    epochs: int = 40
    batch_size: int = 16
    slices_per_patient: int = 8
    organ_slice_fraction: float = 0.8
    dice_weight: float = 1.0
    seed: int = 0
    val_every: int = 5
    num_threads: int = 2
    device: str = "cpu"


@dataclass
class OarPredictConfig:
    """Prediction: MC-dropout passes for the uncertainty map, probability threshold, post-processing.

    ``window`` > 0 predicts each slice by overlapping in-plane windows of that size (Gaussian-weighted,
    ``window_overlap``), as MONAI's sliding-window inference does: a network trained on crops with
    instance normalisation then sees the statistics it was trained on; 0 predicts whole slices.
    """

    window: int = 0
    window_overlap: float = 0.5
    mc_samples: int = 4
    threshold: float = 0.5
    largest_component: bool = True
    batch_slices: int = 32
    weights_dtype: str = "float16"


@dataclass
class OarConfig:
    """A whole segmentation recipe (module docstring)."""

    model_id: str = "openkbp-oar-unet25d-cpu"
    version: str = "1.0.0"
    comment: str = ""
    organs: tuple[str, ...] = OPENKBP_OARS
    network: OarNetworkConfig = field(default_factory=OarNetworkConfig)
    inputs: OarInputConfig = field(default_factory=OarInputConfig)
    augment: OarAugmentConfig = field(default_factory=OarAugmentConfig)
    train: OarTrainConfig = field(default_factory=OarTrainConfig)
    predict: OarPredictConfig = field(default_factory=OarPredictConfig)

    # ------------------------------------------------------------------ checks

    def validate(self) -> "OarConfig":
        """Raise :class:`InvalidInputError` for an impossible recipe; return self."""
        if not _ID_RE.match(self.model_id):
            raise InvalidInputError(f"model_id {self.model_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if not self.organs or len(set(self.organs)) != len(self.organs):
            raise InvalidInputError(f"organs must be distinct names, got {list(self.organs)}")
        n = self.network
        if len(n.channels) < 2 or len(n.strides) != len(n.channels) - 1 or min(n.channels) < 1:
            raise InvalidInputError("network.channels needs >= 2 positive sizes and one stride fewer")
        if not 0.0 <= n.dropout < 1.0 or n.norm not in ("instance", "batch"):
            raise InvalidInputError("network.dropout must be in [0, 1) and network.norm 'instance' or 'batch'")
        i = self.inputs
        if not i.windows_hu or any(hi <= lo for lo, hi in i.windows_hu):
            raise InvalidInputError(f"inputs.windows_hu must be (low, high) pairs with high > low, got {i.windows_hu}")
        if i.context_slices < 0 or min(i.spacing_mm) <= 0:
            raise InvalidInputError("inputs.context_slices must be >= 0 and inputs.spacing_mm positive (mm)")
        if self.augment.crop < 0 or self.augment.crop % n.size_divisor:
            raise InvalidInputError(f"augment.crop must be 0 or a multiple of {n.size_divisor}")
        if any(s % n.size_divisor for s in i.plane_shape):
            raise InvalidInputError(f"inputs.plane_shape {list(i.plane_shape)} must be multiples of "
                                    f"{n.size_divisor} (the product of network.strides)")
        t = self.train
        if t.epochs < 1 or t.batch_size < 1 or t.slices_per_patient < 1 or t.val_every < 1:
            raise InvalidInputError("train.epochs, batch_size, slices_per_patient and val_every must be >= 1")
        if not 0.0 <= t.organ_slice_fraction <= 1.0 or t.learning_rate <= 0:
            raise InvalidInputError("train.organ_slice_fraction must be in [0, 1] and learning_rate > 0")
        if t.device not in ("cpu", "cuda", "auto"):
            raise InvalidInputError(f"train.device must be cpu, cuda or auto, got {t.device!r}")
        p = self.predict
        if p.window < 0 or p.window % n.size_divisor or not 0.0 <= p.window_overlap < 1.0:
            raise InvalidInputError(f"predict.window must be 0 or a multiple of {n.size_divisor}, and "
                                    "predict.window_overlap in [0, 1)")
        if p.mc_samples < 0 or not 0.0 < p.threshold < 1.0 or p.batch_slices < 1:
            raise InvalidInputError("predict.mc_samples >= 0, 0 < threshold < 1 and batch_slices >= 1 are needed")
        if p.weights_dtype not in ("float16", "float32"):
            raise InvalidInputError(f"predict.weights_dtype must be float16 or float32, got {p.weights_dtype!r}")
        return self

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> "OarConfig":
        """Build from a dict; unknown keys raise :class:`InvalidInputError` naming them."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"{source} must be a JSON object")
        sections = {"network": OarNetworkConfig, "inputs": OarInputConfig, "augment": OarAugmentConfig,
                    "train": OarTrainConfig, "predict": OarPredictConfig}
        top = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - top)
        if unknown:
            raise InvalidInputError(f"{source}: unknown key(s) {unknown}; known: {sorted(top)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in sections:
                sub = sections[key]
                if not isinstance(value, dict):
                    raise InvalidInputError(f"{source}: '{key}' must be an object")
                names = {f.name for f in dataclasses.fields(sub)}
                bad = sorted(set(value) - names)
                if bad:
                    raise InvalidInputError(f"{source}: unknown key(s) {bad} in '{key}'; known: {sorted(names)}")
                kwargs[key] = sub(**{k: _tuples(v) for k, v in value.items()})
            else:
                kwargs[key] = _tuples(value)
        return cls(**kwargs).validate()

    @classmethod
    def load(cls, path: str | Path) -> "OarConfig":
        """Read a recipe JSON file."""
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"Recipe {path} does not exist; see twinrt/autocontour/configs/", path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"{path} is not readable JSON ({exc})") from exc
        return cls.from_dict(data, str(path))

    def save(self, path: str | Path) -> Path:
        """Write the recipe as JSON (atomic)."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def configs_dir() -> Path:
    """``twinrt/autocontour/configs`` (the shipped recipes)."""
    return Path(__file__).resolve().parent / "configs"


__all__ = ["OPENKBP_OARS", "LR_PAIRS", "OarConfig", "OarNetworkConfig", "OarInputConfig", "OarAugmentConfig",
           "OarTrainConfig", "OarPredictConfig", "configs_dir"]
