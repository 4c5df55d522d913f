"""The training and inference recipe of a dose-prediction model, as one JSON file.

A :class:`DosePredictConfig` holds everything needed to rebuild, train and run a model: network,
input channels and their normalisation, resolution (downsample factor and crop), augmentation,
loss, optimiser and schedule, seed and the number of MC-dropout samples. It is saved inside every
model's manifest entry (``recipe``), so that a weights file can always be rebuilt.

JSON layout (every section optional; missing keys take the defaults below)::

    {"model_id": "...", "version": "...", "comment": "...",
     "network": {...}, "inputs": {...}, "augment": {...}, "loss": {...}, "train": {...},
     "predict": {...}}

Unknown keys are refused (:class:`~twinrt.errors.InvalidInputError` naming the key and the file):
a misspelt ``"learning_rte"`` would otherwise silently train with the default.
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

#: Organs at risk the model knows, in channel order (OpenKBP names).
OAR_ROIS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
#: Targets the model knows and their prescription (Gy, 35 fractions as in OpenKBP).
PTV_ROIS = {"PTV56": 56.0, "PTV63": 63.0, "PTV70": 70.0}
#: Every model ROI, in OpenKBP bit order.
MODEL_ROIS = OAR_ROIS + tuple(PTV_ROIS)
#: Input channels a recipe may use: CT, PTV prescription map, one per OAR, possible-dose mask.
KNOWN_CHANNELS = ("ct", "ptv") + OAR_ROIS + ("possible_dose_mask",)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class NetworkConfig:
    """MONAI ``UNet`` (3D) hyper-parameters.

    :param channels: feature channels per level, e.g. ``(16, 32, 64, 128)``.
    :param strides: down-sampling stride between levels (``len(channels) - 1`` values).
    :param num_res_units: residual units per level (0 = plain convolutions).
    :param dropout: dropout probability in every convolution block; > 0 enables MC dropout.
    :param norm: ``"instance"`` or ``"batch"`` (instance keeps MC dropout independent of the batch).
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    dropout: float = 0.1
    norm: str = "instance"

    def validate(self) -> None:
        if len(self.channels) < 2 or any(int(c) < 1 for c in self.channels):
            raise InvalidInputError(f"network.channels must be >= 2 positive sizes, got {list(self.channels)}")
        if len(self.strides) != len(self.channels) - 1 or any(int(s) < 1 for s in self.strides):
            raise InvalidInputError(f"network.strides needs {len(self.channels) - 1} positive values "
                                    f"(one fewer than channels), got {list(self.strides)}")
        if self.num_res_units < 0:
            raise InvalidInputError("network.num_res_units must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidInputError(f"network.dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in ("instance", "batch"):
            raise InvalidInputError(f"network.norm must be 'instance' or 'batch', got {self.norm!r}")

    @property
    def size_divisor(self) -> int:
        """Input sizes must be multiples of this (the product of the strides)."""
        out = 1
        for s in self.strides:
            out *= int(s)
        return out


@dataclass
class InputConfig:
    """Input channels, normalisation and resolution.

    CT: ``(clip(HU, lo, hi) - lo) / (hi - lo)`` with ``(lo, hi) = ct_clip_hu``, so 0..1. PTV
    channel: prescription (Gy) of each PTV / ``ptv_scale_gy``, highest wins in overlaps. Masks:
    0/1. Dose target: Gy / ``dose_scale_gy``.

    :param channels: channel names, a subset of :data:`KNOWN_CHANNELS`, in network order.
    :param ct_clip_hu: HU window (lo, hi).
    :param ptv_scale_gy: prescription that maps to 1.0 in the PTV channel (Gy).
    :param dose_scale_gy: dose that maps to 1.0 in the network output (Gy).
    :param model_shape: the full-resolution model grid (k, j, i) voxels (OpenKBP: 128³).
    :param downsample: integer factor from the model grid to the evaluation (network) resolution;
        inputs are average-pooled, the prediction is upsampled back trilinearly.
    :param crop_shape: network window (k, j, i) at the evaluation resolution, centred on the
        possible-dose mask; widened at inference when the mask is larger. A size equal to the
        full axis means no crop on that axis.
    """

    channels: tuple[str, ...] = KNOWN_CHANNELS
    ct_clip_hu: tuple[float, float] = (-1000.0, 2000.0)
    ptv_scale_gy: float = 70.0
    dose_scale_gy: float = 70.0
    model_shape: tuple[int, int, int] = (128, 128, 128)
    downsample: int = 2
    crop_shape: tuple[int, int, int] = (64, 40, 64)

    def validate(self) -> None:
        unknown = [c for c in self.channels if c not in KNOWN_CHANNELS]
        if unknown or not self.channels:
            raise InvalidInputError(f"inputs.channels has unknown channel(s) {unknown}; "
                                    f"use names from {list(KNOWN_CHANNELS)}")
        if len(set(self.channels)) != len(self.channels):
            raise InvalidInputError(f"inputs.channels lists a channel twice: {list(self.channels)}")
        if "ptv" not in self.channels:
            raise InvalidInputError("inputs.channels must include 'ptv' (the prescription map)")
        lo, hi = self.ct_clip_hu
        if not hi > lo:
            raise InvalidInputError(f"inputs.ct_clip_hu must be (lo, hi) with hi > lo, got {list(self.ct_clip_hu)}")
        if self.ptv_scale_gy <= 0 or self.dose_scale_gy <= 0:
            raise InvalidInputError("inputs.ptv_scale_gy and inputs.dose_scale_gy must be > 0 Gy")
        if self.downsample < 1 or any(int(n) % self.downsample for n in self.model_shape):
            raise InvalidInputError(f"inputs.downsample {self.downsample} must be >= 1 and divide "
                                    f"model_shape {list(self.model_shape)}")
        if len(self.model_shape) != 3 or len(self.crop_shape) != 3:
            raise InvalidInputError("inputs.model_shape and inputs.crop_shape need three sizes (k, j, i)")
        for c, n in zip(self.crop_shape, self.eval_shape):
            if not 1 <= int(c) <= n:
                raise InvalidInputError(f"inputs.crop_shape {list(self.crop_shape)} must fit the evaluation "
                                        f"grid {list(self.eval_shape)} (model_shape / downsample)")

    @property
    def eval_shape(self) -> tuple[int, int, int]:
        """The network (evaluation) resolution grid (k, j, i)."""
        return tuple(int(n) // self.downsample for n in self.model_shape)  # type: ignore[return-value]


@dataclass
class AugmentConfig:
    """Training augmentation.

    Only left-right flips are used: patients are all supine and head-first, so an
    anterior-posterior or superior-inferior flip makes anatomy that never occurs. A left-right
    flip swaps the RightParotid and LeftParotid channels so that labels keep their sides.

    :param lr_flip_prob: probability of a left-right flip per sample.
    :param shift_voxels: random shift (± voxels, evaluation resolution) of the crop window.
    """

    lr_flip_prob: float = 0.5
    shift_voxels: int = 4

    def validate(self) -> None:
        if not 0.0 <= self.lr_flip_prob <= 1.0:
            raise InvalidInputError(f"augment.lr_flip_prob must be in [0, 1], got {self.lr_flip_prob}")
        if self.shift_voxels < 0:
            raise InvalidInputError("augment.shift_voxels must be >= 0")


@dataclass
class LossConfig:
    """Loss: L1 inside the possible-dose mask, plus an optional ROI mean-dose term.

    ``loss = Σ w·|p − t| / Σ w + roi_mean_weight · mean_ROI |mean_ROI(p) − mean_ROI(t)|`` with ``w``
    the (pooled) possible-dose mask and ROIs the OAR channels and the PTV union; doses in units
    of ``dose_scale_gy``. The mean dose is one of the OpenKBP DVH metrics.

    :param roi_mean_weight: weight of the ROI mean-dose term (0 disables it).
    """

    roi_mean_weight: float = 0.1

    def validate(self) -> None:
        if self.roi_mean_weight < 0:
            raise InvalidInputError("loss.roi_mean_weight must be >= 0")


@dataclass
class TrainConfig:
    """Optimiser, schedule and run settings.

    :param optimizer: ``"adam"`` or ``"adamw"``.
    :param learning_rate: initial learning rate.
    :param weight_decay: L2 / decoupled weight decay.
    :param lr_schedule: ``"cosine"`` (to 2 % of the initial rate) or ``"constant"``.
    :param epochs: passes over the training patients.
    :param batch_size: patients per step.
    :param seed: seeds Python, numpy and torch: the run is repeatable on the same machine.
    :param val_every: validate (evaluation resolution) every this many epochs, and at the end.
    :param num_threads: torch CPU threads (0 = torch's default).
    :param device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    lr_schedule: str = "cosine"
    epochs: int = 100
    batch_size: int = 2
    seed: int = 0
    val_every: int = 5
    num_threads: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if self.optimizer not in ("adam", "adamw"):
            raise InvalidInputError(f"train.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise InvalidInputError(f"train.lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise InvalidInputError("train.learning_rate must be > 0 and train.weight_decay >= 0")
        if self.epochs < 1 or self.batch_size < 1 or self.val_every < 1 or self.num_threads < 0:
            raise InvalidInputError("train.epochs, batch_size and val_every must be >= 1, num_threads >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidInputError(f"train.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


@dataclass
class PredictConfig:
    """Inference settings.

    :param mc_samples: MC-dropout passes for the per-voxel standard deviation (0 = no std).
    :param weights_dtype: how the weights file stores tensors: ``"float32"`` or ``"float16"``.
    """

    mc_samples: int = 4
    weights_dtype: str = "float32"

    def validate(self) -> None:
        if self.mc_samples < 0:
            raise InvalidInputError("predict.mc_samples must be >= 0")
        if self.weights_dtype not in ("float32", "float16"):
            raise InvalidInputError("predict.weights_dtype must be 'float32' or 'float16'")


_SECTIONS = {"network": NetworkConfig, "inputs": InputConfig, "augment": AugmentConfig, "loss": LossConfig,
             "train": TrainConfig, "predict": PredictConfig}


@dataclass
class DosePredictConfig:
    """The whole recipe of one dose-prediction model (see the module docstring).

    :param model_id: id of the trained model (file stem of its weights and manifest entry).
    :param version: version of the model (semantic version string).
    :param comment: free text: what the recipe is for and how it was sized.
    """

    model_id: str = "openkbp-unet"
    version: str = "1.0.0"
    comment: str = ""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    inputs: InputConfig = field(default_factory=InputConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def validate(self) -> "DosePredictConfig":
        """Check every value; raise :class:`InvalidInputError` saying which one to fix."""
        if not _ID_RE.match(self.model_id or ""):
            raise InvalidInputError(f"model_id {self.model_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
        for name in _SECTIONS:
            getattr(self, name).validate()
        crop = self.inputs.crop_shape
        div = self.network.size_divisor
        if any(int(c) % div for c in crop):
            raise InvalidInputError(f"inputs.crop_shape {list(crop)} must be multiples of {div} "
                                    f"(the product of network.strides)")
        if any(int(n) % div for n in self.inputs.eval_shape):
            raise InvalidInputError(f"inputs.model_shape / inputs.downsample = {list(self.inputs.eval_shape)} must be "
                                    f"multiples of {div} (the product of network.strides)")
        return self

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        def conv(v: Any) -> Any:
            if isinstance(v, tuple):
                return [conv(x) for x in v]
            return v
        out: dict[str, Any] = {"model_id": self.model_id, "version": self.version, "comment": self.comment}
        for name in _SECTIONS:
            out[name] = {k: conv(v) for k, v in dataclasses.asdict(getattr(self, name)).items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "DosePredictConfig":
        """Build and validate from a dict; unknown keys raise :class:`InvalidInputError`.

        :param source: where the dict came from (a file name), quoted in errors.
        """
        if not isinstance(data, dict):
            raise InvalidInputError(f"{source}: a dose-prediction config must be a JSON object")
        top = {f.name for f in dataclasses.fields(cls)}
        _refuse_unknown(data, top, "", source)
        kwargs: dict[str, Any] = {k: data[k] for k in ("model_id", "version", "comment") if k in data}
        for name, klass in _SECTIONS.items():
            section = data.get(name, {})
            if not isinstance(section, dict):
                raise InvalidInputError(f"{source}: '{name}' must be a JSON object")
            fields = {f.name: f for f in dataclasses.fields(klass)}
            _refuse_unknown(section, set(fields), f"{name}.", source)
            values = {}
            for k, v in section.items():
                default = getattr(klass(), k)
                values[k] = _coerce(v, default, f"{name}.{k}", source)
            kwargs[name] = klass(**values)
        try:
            return cls(**kwargs).validate()
        except InvalidInputError as exc:
            raise InvalidInputError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "DosePredictConfig":
        """Read a JSON config file."""
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"Dose-prediction config {path} does not exist; see "
                                    f"{config_dir()} for the shipped recipes", path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"{path} is not valid JSON ({exc}); fix the file") from exc
        return cls.from_dict(data, str(path))

    def save(self, path: str | Path) -> Path:
        """Write as indented JSON (atomically)."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _refuse_unknown(data: dict[str, Any], allowed: set[str], prefix: str, source: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidInputError(f"{source}: unknown key '{prefix}{unknown[0]}'"
                                + (f" (and {', '.join(prefix + u for u in unknown[1:])})" if len(unknown) > 1 else "")
                                + f"; allowed keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
                                + ", ".join(sorted(allowed)))


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Convert a JSON value to the type of the field's default; explain a mismatch."""
    try:
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            elem = type(default[0]) if default else str
            return tuple(elem(v) if elem is not str else str(v) for v in value)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, int):
            if isinstance(value, bool) or float(value) != int(value):
                raise TypeError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if isinstance(default, str):
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        example = list(default) if isinstance(default, tuple) else default
        raise InvalidInputError(f"{source}: '{key}' = {value!r} has the wrong type; expected "
                                f"{type(default).__name__} like {example!r}") from None
    return value


def config_dir() -> Path:
    """The folder of the shipped recipes (``twinrt/dosepredict/configs``)."""
    return Path(__file__).resolve().parent / "configs"


def load_config(name_or_path: str | Path) -> DosePredictConfig:
    """A shipped recipe by name (``"openkbp_unet_cpu"``) or any JSON file by path."""
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        p = config_dir() / f"{name_or_path}.json"
    return DosePredictConfig.load(p)


def default_config() -> DosePredictConfig:
    """The defaults (the CPU recipe's values), validated."""
    return DosePredictConfig().validate()

