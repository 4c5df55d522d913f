"""ToxicityMonitor model (issue 8, after COMPASS, arXiv 2602.18496): research use only.

Per-fraction organ trajectories (:class:`~twinrt.toxicity.trajectory.OrganTrajectory`) → the risk of
CTCAE grade ≥ 1 toxicity during the course, updated after every fraction.

* **Standardisation** (:class:`Standardiser`): per-feature mean and standard deviation over every
  fraction of the *training* trajectories only; after standardising, missing values (NaN) become 0
  (the training mean) and, with ``missing_indicator=True``, one 0/1 column per feature says which were
  missing. The time axis is the fraction index (row order of ``features``).
* **GRU autoencoder** (:class:`GruAutoencoder`): a unidirectional GRU encoder maps the standardised
  features of fractions 1..t to a latent state ``z_t`` (size ``latent``, default 8), so that ``z_t`` uses
  fractions ≤ t only (causal); a GRU decoder reconstructs every fraction's features from the latent
  sequence. Trained unsupervised, full batch with Adam, on a mean squared error masked to observed
  values of real (not padded) fractions.
* **Logistic regression** (L2, fitted with L-BFGS in numpy/scipy) on the standardised latent state at
  every fraction of every training trajectory. The label of *every* fraction of a trajectory is the
  patient-organ outcome "grade ≥ 1 at some time during the course" (not "grade ≥ 1 has begun by this
  fraction"): as in COMPASS, the model predicts at each fraction whether the course will become toxic,
  so that a warning can come *before* the onset; per-fraction onset labels would teach the model that
  fractions before the onset are safe, which is the opposite of an early warning. Rows are weighted so
  that every trajectory weighs the same and (by default) both classes weigh the same, which makes 0.5 a
  neutral threshold for unbalanced cohorts (the risks are therefore not calibrated incidences).
* **LKB baseline** (:func:`lkb_baseline_risk`): NTCP from the planned dose with the endpoint's
  default parameter set (:data:`twinrt.radiobiology.LKB_SET_FOR_ENDPOINT`), constant over fractions.
* **Evaluation** (:func:`leave_one_patient_out`): AUC (Mann–Whitney), sensitivity and specificity at a
  stated threshold and at the Youden threshold of the training folds, AUC at fixed early fractions and
  the early-warning lead time, for the model and for the baseline.

Every saved model is a ``.pt`` state dict (autoencoder, standardisation and logistic regression, so the
sha256 covers every number the risk depends on) and a manifest ``.json`` beside it (model id, sha256,
feature names, recipe, cohort description, metrics, research-use label); loading checks the sha256
(:class:`~twinrt.dosepredict.weights.WeightsIntegrityError` on a mismatch).
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from twinrt.dosepredict.weights import WEIGHTS_LICENSE, WeightsIntegrityError, load_weights_file, write_weights
from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.io_utils import write_text_atomic
from twinrt.progress import CancelToken, ProgressCallback, report
from twinrt.radiobiology import LKB_PARAMETERS, LKB_SET_FOR_ENDPOINT, lkb_ntcp
from twinrt.toxicity.trajectory import ENDPOINTS, Cohort, OrganTrajectory

#: Version of the model format (state-dict keys and manifest fields).
MODEL_VERSION = "1.0"
#: Default model id.
DEFAULT_MODEL_ID = "toxicity-gruae-v2"
#: Early fractions at which :func:`leave_one_patient_out` also reports the AUC.
EARLY_FRACTIONS = (10, 15)

__all__ = ["FeatureMismatchError", "WeightsIntegrityError", "Standardiser", "ToxicityRecipe",
           "ToxicityModel", "lkb_baseline_risk", "auc_mann_whitney", "sensitivity_specificity",
           "youden_threshold", "lead_time", "risk_at_fraction", "leave_one_patient_out", "MODEL_VERSION",
           "DEFAULT_MODEL_ID", "EARLY_FRACTIONS"]


class FeatureMismatchError(InvalidInputError):
    """A trajectory whose feature names (or their order) differ from the model's."""


# ----------------------------------------------------------------------------- standardisation


@dataclass
class Standardiser:
    """Per-feature standardisation fitted on training trajectories.

    :param mean: (F,) feature means over every training fraction (feature units).
    :param std: (F,) standard deviations (1 where a feature is constant or never observed).
    :param missing_indicator: append one 0/1 "was missing" column per feature.
    """

    mean: np.ndarray
    std: np.ndarray
    missing_indicator: bool = False

    @classmethod
    def fit(cls, trajectories: Sequence[OrganTrajectory], missing_indicator: bool = False) -> "Standardiser":
        """Mean and standard deviation of each feature over all fractions of ``trajectories`` (NaN ignored)."""
        rows = [t.features for t in trajectories if t.features.shape[0]]
        if not rows:
            raise InvalidInputError("No fraction in the training trajectories: nothing to standardise")
        x = np.concatenate(rows, axis=0)
        observed = ~np.isnan(x)
        count = observed.sum(axis=0)
        mean = np.where(count > 0, np.nansum(x, axis=0) / np.maximum(count, 1), 0.0)
        var = np.where(count > 0, np.nansum((x - mean) ** 2, axis=0) / np.maximum(count, 1), 1.0)
        std = np.sqrt(var)
        std = np.where(std > 1e-12, std, 1.0)
        return cls(mean.astype(np.float64), std.astype(np.float64), bool(missing_indicator))

    @property
    def n_features(self) -> int:
        """F, the number of raw features."""
        return int(self.mean.size)

    @property
    def output_dim(self) -> int:
        """Columns after :meth:`transform` (F, or 2F with the missing indicator)."""
        return self.n_features * (2 if self.missing_indicator else 1)

    def transform(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standardise (T, F) features.

        :return: ``(x, observed)``: (T, output_dim) float32 values with NaN → 0, and the (T, output_dim)
            boolean mask of observed values (indicator columns always count as observed).
        """
        f = np.asarray(features, dtype=np.float64)
        observed = ~np.isnan(f)
        x = np.where(observed, (f - self.mean) / self.std, 0.0)
        if self.missing_indicator:
            x = np.concatenate([x, (~observed).astype(np.float64)], axis=1)
            observed = np.concatenate([observed, np.ones_like(observed)], axis=1)
        return x.astype(np.float32), observed


# ----------------------------------------------------------------------------- network


def _torch():
    import torch

    return torch


@functools.lru_cache(maxsize=None)
def _classes() -> tuple[Any, Any]:
    """``(GruAutoencoder, _ToxicityNet)``, defined on first use so that importing this module does not import
    torch (the core loads heavy packages lazily)."""
    torch = _torch()

    class GruAutoencoder(torch.nn.Module):  # type: ignore[misc,name-defined]
        """GRU encoder → per-fraction latent state → GRU decoder → reconstructed features.

        Both GRUs are unidirectional, so the latent state and the reconstruction at fraction t depend on
        fractions ≤ t only.

        :param input_dim: features per fraction after standardisation.
        :param hidden: GRU hidden size.
        :param latent: latent state size.
        """

        def __init__(self, input_dim: int, hidden: int = 16, latent: int = 8) -> None:
            torch = _torch()
            super().__init__()
            self.input_dim, self.hidden, self.latent = int(input_dim), int(hidden), int(latent)
            self.encoder = torch.nn.GRU(self.input_dim, self.hidden, batch_first=True)
            self.to_latent = torch.nn.Linear(self.hidden, self.latent)
            self.decoder = torch.nn.GRU(self.latent, self.hidden, batch_first=True)
            self.to_features = torch.nn.Linear(self.hidden, self.input_dim)

        def encode(self, x: Any) -> Any:
            """(B, T, input_dim) → (B, T, latent) latent states (tanh-bounded)."""
            h, _ = self.encoder(x)
            return _torch().tanh(self.to_latent(h))

        def decode(self, z: Any) -> Any:
            """(B, T, latent) → (B, T, input_dim) reconstruction."""
            h, _ = self.decoder(z)
            return self.to_features(h)

        def forward(self, x: Any) -> tuple[Any, Any]:
            """Return ``(latent, reconstruction)``."""
            z = self.encode(x)
            return z, self.decode(z)


    class _ToxicityNet(torch.nn.Module):  # type: ignore[misc,name-defined]
        """The autoencoder plus standardisation and logistic regression as buffers (one state dict, one sha256)."""

        def __init__(self, n_features: int, missing_indicator: bool, hidden: int, latent: int,
                     extra_inputs: int = 0) -> None:
            torch = _torch()
            super().__init__()
            input_dim = n_features * (2 if missing_indicator else 1) + int(extra_inputs)
            self.autoencoder = GruAutoencoder(input_dim, hidden, latent)
            self.register_buffer("feature_mean", torch.zeros(n_features))
            self.register_buffer("feature_std", torch.ones(n_features))
            self.register_buffer("latent_mean", torch.zeros(latent))
            self.register_buffer("latent_std", torch.ones(latent))
            self.register_buffer("coef", torch.zeros(latent))
            self.register_buffer("intercept", torch.zeros(1))

    return GruAutoencoder, _ToxicityNet


def _net(*args: Any) -> Any:
    """A new ``_ToxicityNet`` (the autoencoder plus standardisation and logistic regression as buffers)."""
    return _classes()[1](*args)


def __getattr__(name: str) -> Any:
    # PEP 562: ``GruAutoencoder`` is a torch module class, made on first access.
    if name == "GruAutoencoder":
        return _classes()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- recipe


@dataclass
class ToxicityRecipe:
    """Training recipe (stored in the manifest).

    :param seed: torch / numpy seed (training is deterministic given it).
    :param epochs: full-batch Adam epochs of the autoencoder.
    :param hidden: GRU hidden size.
    :param latent: latent state size.
    :param lr: Adam learning rate.
    :param weight_decay: Adam weight decay of the autoencoder.
    :param l2: L2 penalty of the logistic regression (on standardised latents; the mean loss is penalised
        with ``l2/2 · ‖w‖²``).
    :param balanced: weight both classes equally in the logistic regression.
    :param missing_indicator: add the missing-value indicator columns.
    :param endpoint_inputs: append a one-hot of the trajectory's endpoint (the order of
        :data:`twinrt.toxicity.trajectory.ENDPOINTS`) to every fraction's inputs, so that one model
        serves several endpoints whose features mean different things. Off by default: on the development
        cohort (seed 7) it changed the LOPO AUC little (0.770 → 0.775; specificity 0.53 → 0.76) and on a
        small synthetic cohort it lowered it (0.97 → 0.80), so the reported figures use it off.
    """

    seed: int = 0
    epochs: int = 150
    hidden: int = 16
    latent: int = 8
    lr: float = 0.01
    weight_decay: float = 0.0
    l2: float = 0.01
    balanced: bool = True
    missing_indicator: bool = False
    endpoint_inputs: bool = False

    def __post_init__(self) -> None:
        if int(self.epochs) < 1 or int(self.hidden) < 1 or int(self.latent) < 1:
            raise InvalidInputError(f"epochs, hidden and latent must be positive integers, got {self}")
        if not (float(self.lr) > 0 and float(self.l2) >= 0 and float(self.weight_decay) >= 0):
            raise InvalidInputError(f"lr must be > 0 and l2, weight_decay ≥ 0, got {self}")


# ----------------------------------------------------------------------------- helpers


def _check_cohort(cohort: Cohort | Sequence[OrganTrajectory], what: str) -> list[OrganTrajectory]:
    trajectories = list(cohort.trajectories if isinstance(cohort, Cohort) else cohort)
    if not trajectories:
        raise InvalidInputError(f"{what}: the cohort is empty; it needs trajectories of toxic and non-toxic organs")
    names = trajectories[0].feature_names
    for t in trajectories:
        if not isinstance(t, OrganTrajectory):
            raise InvalidInputError(f"{what}: expected OrganTrajectory objects, got {type(t).__name__}")
        if list(t.feature_names) != list(names):
            raise FeatureMismatchError(f"{what}: {t.patient_id}/{t.organ} has other features than "
                                       f"{trajectories[0].patient_id}/{trajectories[0].organ}")
    return trajectories


def _batch(trajectories: Sequence[OrganTrajectory], standardiser: Standardiser, endpoint_inputs: bool = False
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded (B, Tmax, D) inputs, (B, Tmax, D) loss mask and (B,) lengths (+ the endpoint one-hot columns)."""
    endpoints = list(ENDPOINTS)
    extra = len(endpoints) if endpoint_inputs else 0
    lengths = np.array([t.features.shape[0] for t in trajectories], dtype=int)
    t_max = max(int(lengths.max()), 1)
    d = standardiser.output_dim
    x = np.zeros((len(trajectories), t_max, d + extra), np.float32)
    mask = np.zeros((len(trajectories), t_max, d + extra), bool)
    for i, t in enumerate(trajectories):
        if lengths[i]:
            xi, oi = standardiser.transform(t.features)
            x[i, :lengths[i], :d] = xi
            mask[i, :lengths[i], :d] = oi
            if extra:
                if t.endpoint not in endpoints:
                    raise InvalidInputError(f"{t.patient_id}/{t.organ}: unknown endpoint '{t.endpoint}'; "
                                            f"known: {', '.join(endpoints)}")
                x[i, :lengths[i], d + endpoints.index(t.endpoint)] = 1.0
                mask[i, :lengths[i], d:] = True
    return x, mask, lengths


def _fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Weighted L2 logistic regression (intercept not penalised); returns ``(coef, intercept)``."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    w = w / w.sum()
    n_coef = x.shape[1]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        coef, b = theta[:n_coef], theta[n_coef]
        s = x @ coef + b
        nll = -(w * (y * log_expit(s) + (1 - y) * log_expit(-s))).sum()
        r = w * (expit(s) - y)
        grad = np.concatenate([x.T @ r + l2 * coef, [r.sum()]])
        return float(nll + 0.5 * l2 * coef @ coef), grad

    res = minimize(loss, np.zeros(n_coef + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return res.x[:n_coef], float(res.x[n_coef])


# ----------------------------------------------------------------------------- model


@dataclass
class ToxicityModel:
    """GRU autoencoder + logistic regression: risk of grade ≥ 1 toxicity after every fraction.

    Build one with :meth:`fit` or :meth:`load`; use :meth:`risk` (the (T,) risks) or :meth:`predict`
    (risks with model id, weights sha256 and the research-use label).
    """

    feature_names: list[str]
    recipe: ToxicityRecipe
    net: Any
    model_id: str = DEFAULT_MODEL_ID
    sha256: str = ""
    cohort_description: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ training

    @classmethod
    def fit(cls, cohort: Cohort | Sequence[OrganTrajectory], seed: int = 0, epochs: int = 150,
            recipe: Optional[ToxicityRecipe] = None, model_id: str = DEFAULT_MODEL_ID,
            progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
            **recipe_fields: Any) -> "ToxicityModel":
        """Train on a cohort: the autoencoder unsupervised, then the logistic regression on its latents.

        :param cohort: training trajectories (one feature layout; both outcomes present).
        :param seed: random seed (deterministic given it, on one machine and torch version).
        :param epochs: autoencoder epochs (ignored when ``recipe`` is given).
        :param recipe: the full recipe; otherwise built from ``seed``, ``epochs`` and ``recipe_fields``.
        :raises InvalidInputError: empty cohort, no fraction, only one outcome class.
        :raises FeatureMismatchError: trajectories with different features.
        """
        torch = _torch()
        trajectories = _check_cohort(cohort, "ToxicityModel.fit")
        rec = recipe if recipe is not None else ToxicityRecipe(seed=int(seed), epochs=int(epochs), **recipe_fields)
        labels = np.array([t.toxic for t in trajectories], dtype=float)
        if labels.min() == labels.max():
            raise InvalidInputError("ToxicityModel.fit needs toxic (grade ≥ 1) and non-toxic trajectories; "
                                    f"all {len(trajectories)} are {'toxic' if labels[0] else 'non-toxic'}")
        started = time.perf_counter()
        standardiser = Standardiser.fit(trajectories, rec.missing_indicator)
        x_np, mask_np, lengths = _batch(trajectories, standardiser, rec.endpoint_inputs)
        if lengths.sum() == 0:
            raise InvalidInputError("ToxicityModel.fit: the trajectories have no fraction")

        torch.manual_seed(int(rec.seed))
        net = _net(len(trajectories[0].feature_names), rec.missing_indicator, rec.hidden, rec.latent,
                           len(ENDPOINTS) if rec.endpoint_inputs else 0)
        net.feature_mean.copy_(torch.as_tensor(standardiser.mean, dtype=torch.float32))
        net.feature_std.copy_(torch.as_tensor(standardiser.std, dtype=torch.float32))
        ae = net.autoencoder
        x = torch.as_tensor(x_np)
        mask = torch.as_tensor(mask_np, dtype=torch.float32)
        denom = mask.sum().clamp_min(1.0)
        opt = torch.optim.Adam(ae.parameters(), lr=rec.lr, weight_decay=rec.weight_decay)
        ae.train()
        loss_value = float("nan")
        for epoch in range(int(rec.epochs)):
            if epoch % 10 == 0:
                report(progress, 0.9 * epoch / rec.epochs, f"autoencoder epoch {epoch + 1}/{rec.epochs}", cancel)
            opt.zero_grad()
            _, recon = ae(x)
            loss = (((recon - x) ** 2) * mask).sum() / denom
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
        ae.eval()

        # Logistic regression on the latent state of every real fraction.
        with torch.no_grad():
            z = ae.encode(x).numpy().astype(np.float64)
        rows, ys, ws = [], [], []
        n_pos, n_neg = labels.sum(), (1 - labels).sum()
        for i, n in enumerate(lengths):
            if n == 0:
                continue
            rows.append(z[i, :n])
            ys.append(np.full(n, labels[i]))
            class_w = (0.5 / n_pos if labels[i] else 0.5 / n_neg) if rec.balanced else 1.0 / len(trajectories)
            ws.append(np.full(n, class_w / n))
        zr, yr, wr = np.concatenate(rows), np.concatenate(ys), np.concatenate(ws)
        lat_mean = zr.mean(axis=0)
        lat_std = zr.std(axis=0)
        lat_std = np.where(lat_std > 1e-8, lat_std, 1.0)
        coef, intercept = _fit_logistic((zr - lat_mean) / lat_std, yr, wr, float(rec.l2))
        net.latent_mean.copy_(torch.as_tensor(lat_mean, dtype=torch.float32))
        net.latent_std.copy_(torch.as_tensor(lat_std, dtype=torch.float32))
        net.coef.copy_(torch.as_tensor(coef, dtype=torch.float32))
        net.intercept.copy_(torch.as_tensor([intercept], dtype=torch.float32))
        net.eval()
        description = cohort.description if isinstance(cohort, Cohort) else ""
        patients = list(dict.fromkeys(t.patient_id for t in trajectories))
        training = {"n_patients": len(patients), "n_trajectories": len(trajectories),
                    "n_toxic_trajectories": int(n_pos), "n_fractions": int(lengths.sum()),
                    "endpoints": sorted({t.endpoint for t in trajectories}),
                    "final_reconstruction_mse": loss_value, "seconds": round(time.perf_counter() - started, 3),
                    "label": "grade >= 1 during the course (patient-organ outcome) at every fraction"}
        model = cls(list(trajectories[0].feature_names), rec, net, model_id, "", description, training, {})
        model.sha256 = model._weights_sha256()
        report(progress, 1.0, "trained", cancel)
        return model

    def _weights_sha256(self) -> str:
        """sha256 of the weights file this model would save (via ``write_weights``)."""
        with tempfile.TemporaryDirectory() as tmp:
            sha, _ = write_weights(self.net, Path(tmp) / "weights.pt")
        return sha

    # ------------------------------------------------------------------ prediction

    def _check_features(self, trajectory: OrganTrajectory) -> None:
        if list(trajectory.feature_names) != list(self.feature_names):
            extra = sorted(set(trajectory.feature_names) - set(self.feature_names))[:5]
            missing = sorted(set(self.feature_names) - set(trajectory.feature_names))[:5]
            raise FeatureMismatchError(
                f"{trajectory.patient_id}/{trajectory.organ} has other features than model {self.model_id} "
                f"({len(trajectory.feature_names)} vs {len(self.feature_names)}; not in the model: {extra}, "
                f"missing: {missing}{', or another order' if not extra and not missing else ''}); compute the "
                "model's features or retrain on this layout")

    def _risk_batch(self, trajectories: Sequence[OrganTrajectory]) -> list[np.ndarray]:
        torch = _torch()
        for t in trajectories:
            self._check_features(t)
        if not trajectories:
            return []
        net = self.net
        std = Standardiser(net.feature_mean.numpy().astype(np.float64), net.feature_std.numpy().astype(np.float64),
                           self.recipe.missing_indicator)
        x, _, lengths = _batch(trajectories, std, self.recipe.endpoint_inputs)
        with torch.no_grad():
            z = net.autoencoder.encode(torch.as_tensor(x))
            s = ((z - net.latent_mean) / net.latent_std) @ net.coef + net.intercept
            r = torch.sigmoid(s).numpy().astype(np.float64)
        return [r[i, :n].copy() for i, n in enumerate(lengths)]

    def risk(self, trajectory: OrganTrajectory) -> np.ndarray:
        """(T,) risk (0–1) of grade ≥ 1 toxicity during the course, after each fraction of ``trajectory``.

        The risk after fraction t uses fractions ≤ t only.

        :raises FeatureMismatchError: the trajectory's features differ from the model's.
        """
        return self._risk_batch([trajectory])[0]

    def predict(self, trajectory: OrganTrajectory) -> dict[str, Any]:
        """:meth:`risk` with provenance: fractions, risks, model id, weights sha256, research-use label."""
        import twinrt

        r = self.risk(trajectory)
        return {"patient_id": trajectory.patient_id, "organ": trajectory.organ, "endpoint": trajectory.endpoint,
                "fractions": trajectory.fractions.tolist(), "risk": r.tolist(), "model_id": self.model_id,
                "weights_sha256": self.sha256, "research_use_only": twinrt.RESEARCH_USE_ONLY}

    # ------------------------------------------------------------------ persistence

    def manifest(self, file_name: str, sha256: str, size_mb: float) -> dict[str, Any]:
        """The manifest entry of this model (written beside the weights by :meth:`save`)."""
        import twinrt

        return {"id": self.model_id, "version": MODEL_VERSION, "task": "toxicity-risk", "file": file_name,
                "sha256": sha256, "sizeMB": round(size_mb, 4), "license": WEIGHTS_LICENSE,
                "feature_names": list(self.feature_names),
                "standardisation": {"mean": self.net.feature_mean.tolist(), "std": self.net.feature_std.tolist(),
                                    "missing_indicator": self.recipe.missing_indicator, "nan_after_standardising": 0.0},
                "recipe": asdict(self.recipe), "training": self.training,
                "data": {"description": self.cohort_description}, "validation": self.metrics,
                "label": "risk of CTCAE grade >= 1 toxicity during the course, after each fraction",
                "research_use_only": twinrt.RESEARCH_USE_ONLY}

    def save(self, path: str | Path) -> Path:
        """Write the weights (``.pt``) and the manifest (``.json`` beside it); return the manifest path.

        :param path: a ``.pt`` path, or a folder (``<folder>/<model_id>.pt``).
        """
        p = Path(path)
        weights = p if p.suffix == ".pt" else p / f"{self.model_id}.pt"
        sha, size_mb = write_weights(self.net, weights)
        self.sha256 = sha
        entry_path = weights.with_suffix(".json")
        write_text_atomic(entry_path, json.dumps(self.manifest(weights.name, sha, size_mb), indent=1) + "\n")
        return entry_path

    @classmethod
    def load(cls, path: str | Path) -> "ToxicityModel":
        """Load a model saved by :meth:`save` from its ``.json`` or ``.pt`` path (or a folder with one model).

        :raises WeightsIntegrityError: the weights' sha256 differs from the manifest.
        :raises MissingInputError: no such file.
        """
        p = Path(path)
        if p.is_dir():
            entries = sorted(p.glob("*.json"))
            if len(entries) != 1:
                raise MissingInputError(f"{p} must hold exactly one model manifest (.json), found {len(entries)}", p)
            p = entries[0]
        entry_path = p.with_suffix(".json")
        if not entry_path.is_file():
            raise MissingInputError(f"Model manifest {entry_path} does not exist (save() writes it beside the "
                                    "weights)", entry_path)
        try:
            entry = json.loads(entry_path.read_text(encoding="utf-8"))
            recipe = ToxicityRecipe(**{"endpoint_inputs": False, **entry["recipe"]})
            names = list(entry["feature_names"])
            sha = str(entry["sha256"])
            weights = entry_path.parent / entry["file"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{entry_path} is not a ToxicityMonitor manifest ({exc})") from exc
        state = load_weights_file(weights, sha)
        net = _net(len(names), recipe.missing_indicator, recipe.hidden, recipe.latent,
                           len(ENDPOINTS) if recipe.endpoint_inputs else 0)
        try:
            net.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as exc:
            raise InvalidInputError(f"Weights {weights} do not fit the manifest {entry_path} ({exc})") from exc
        net.eval()
        return cls(names, recipe, net, str(entry["id"]), sha, entry.get("data", {}).get("description", ""),
                   entry.get("training", {}), entry.get("validation", {}))


# ----------------------------------------------------------------------------- LKB baseline


def lkb_baseline_risk(trajectory: OrganTrajectory) -> float:
    """LKB NTCP (0–1) from the planned dose of a trajectory, the same at every fraction.

    ``trajectory.planned["ntcp"]`` when present; otherwise LKB with ``planned["lkb_set"]`` (or the
    endpoint's default, :data:`~twinrt.radiobiology.LKB_SET_FOR_ENDPOINT`) on ``planned["geud_gy"]``
    (Gy, EQD2, with the set's n), else on ``planned["mean_gy"]`` (exact for n = 1 sets, an approximation
    otherwise).

    :raises InvalidInputError: no NTCP, no dose, or an unknown endpoint / parameter set.
    """
    planned = trajectory.planned or {}
    where = f"{trajectory.patient_id}/{trajectory.organ}"
    if planned.get("ntcp") is not None:
        ntcp = float(planned["ntcp"])
        if not 0.0 <= ntcp <= 1.0:
            raise InvalidInputError(f"{where}: planned NTCP must be in 0..1, got {ntcp}")
        return ntcp
    set_name = planned.get("lkb_set") or LKB_SET_FOR_ENDPOINT.get(trajectory.endpoint)
    if set_name is None or set_name not in LKB_PARAMETERS:
        raise InvalidInputError(f"{where}: no LKB parameter set for endpoint '{trajectory.endpoint}' "
                                f"(set {set_name!r}); known endpoints: {', '.join(LKB_SET_FOR_ENDPOINT)}")
    p = LKB_PARAMETERS[set_name]
    dose = planned.get("geud_gy")
    if dose is None:
        dose = planned.get("mean_gy")
    if dose is None:
        raise InvalidInputError(f"{where}: the planned dose (planned['geud_gy'] or ['mean_gy'], Gy) or "
                                "planned['ntcp'] is needed for the LKB baseline")
    return float(lkb_ntcp(float(dose), p.td50_gy, p.m))


# ----------------------------------------------------------------------------- metrics


def auc_mann_whitney(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """ROC AUC as the Mann–Whitney probability that a positive scores above a negative (ties count ½).

    :return: NaN when either class is empty.
    """
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise InvalidInputError(f"AUC needs one label per score: {s.size} scores, {y.size} labels")
    if np.isnan(s).any():
        raise InvalidInputError("AUC scores contain NaN")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def sensitivity_specificity(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity of "score ≥ threshold" (NaN for an empty class)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    pred = s >= threshold
    sens = float(pred[y].mean()) if y.any() else float("nan")
    spec = float((~pred[~y]).mean()) if (~y).any() else float("nan")
    return sens, spec


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold (one of the scores) maximising sensitivity + specificity − 1 of "score ≥ threshold";
    ties go to the higher threshold. 0.5 when a class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if not y.any() or y.all():
        return 0.5
    best_t, best_j = 0.5, -np.inf
    for t in np.unique(s)[::-1]:
        sens, spec = sensitivity_specificity(s, y, float(t))
        if sens + spec - 1.0 > best_j + 1e-12:
            best_t, best_j = float(t), sens + spec - 1.0
    return best_t


def lead_time(fractions: np.ndarray, risk: np.ndarray, onset_fraction: Optional[int], threshold: float
              ) -> Optional[int]:
    """Early-warning lead time (fractions): ``onset − first fraction with risk ≥ threshold``.

    :return: the lead time (≥ 0) when the risk crosses the threshold at or before the onset; ``None`` when
        there is no onset, the risk never crosses, or it crosses only after the onset.
    """
    if onset_fraction is None:
        return None
    f = np.asarray(fractions, dtype=int)
    r = np.asarray(risk, dtype=np.float64)
    above = np.flatnonzero(r >= threshold)
    if above.size == 0:
        return None
    first = int(f[above[0]])
    return int(onset_fraction) - first if first <= int(onset_fraction) else None


def risk_at_fraction(fractions: np.ndarray, risk: np.ndarray, fraction: int) -> float:
    """The risk after ``fraction`` (the latest fraction ≤ it; the first risk if none; NaN if no fraction)."""
    f = np.asarray(fractions, dtype=int)
    r = np.asarray(risk, dtype=np.float64)
    if r.size == 0:
        return float("nan")
    idx = np.flatnonzero(f <= fraction)
    return float(r[idx[-1]] if idx.size else r[0])


def _lead_summary(leads: list[Optional[int]], n_toxic: int) -> dict[str, Any]:
    known = [v for v in leads if v is not None]
    return {"n_toxic": n_toxic, "n_cross_at_or_before_onset": len(known),
            "n_cross_before_onset": int(sum(v > 0 for v in known)),
            "lead_time_fractions_median": float(np.median(known)) if known else None,
            "lead_time_fractions": known,
            "share_positive_lead": (sum(v > 0 for v in known) / n_toxic) if n_toxic else None}


def _classification(scores: np.ndarray, labels: np.ndarray, threshold: float, youden: np.ndarray
                    ) -> dict[str, Any]:
    sens, spec = sensitivity_specificity(scores, labels, threshold)
    pred_y = scores >= youden
    y = labels.astype(bool)
    return {"auc": auc_mann_whitney(scores, labels), "threshold": threshold, "sensitivity": sens,
            "specificity": spec,
            "youden_threshold_median": float(np.median(youden)),
            "sensitivity_youden": float(pred_y[y].mean()) if y.any() else float("nan"),
            "specificity_youden": float((~pred_y[~y]).mean()) if (~y).any() else float("nan")}


# ----------------------------------------------------------------------------- LOPO


def leave_one_patient_out(cohort: Cohort, threshold: float = 0.5, seed: int = 0, epochs: int = 150,
                          progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                          early_fractions: Sequence[int] = EARLY_FRACTIONS, **recipe_fields: Any
                          ) -> dict[str, Any]:
    """Leave-one-patient-out evaluation of the GRU model and the LKB baseline.

    For each patient: train :class:`ToxicityModel` on all other patients (seed ``seed``), predict that
    patient's trajectories. The patient-organ score is the risk after the *last* fraction (the course's
    final prediction); AUCs of the risk after the fractions in ``early_fractions`` are reported as well.
    Sensitivity and specificity are given at ``threshold`` and at the Youden threshold of each fold's
    training scores (in-sample last-fraction risks of the training trajectories; per held-out
    trajectory, its fold's threshold is used). The lead time of a toxic trajectory is
    ``onset − first fraction with risk ≥ threshold`` when that is at or before the onset. The baseline's
    risk is its planned NTCP at every fraction (so its lead time is ``onset − first fraction`` when
    NTCP ≥ threshold); its Youden threshold comes from the training patients' NTCPs. Deterministic
    given ``seed``.

    :return: a dict with ``auc_gru``, ``auc_lkb``, ``lead_time_fractions_median`` (GRU), the detailed
        ``gru`` and ``lkb`` figures, per-trajectory ``predictions``, timings and the recipe.
    :raises InvalidInputError: an empty cohort, one patient only, a bad threshold, or a training fold
        with a single outcome class.
    """
    import twinrt

    trajectories = _check_cohort(cohort, "leave_one_patient_out")
    patients = list(dict.fromkeys(t.patient_id for t in trajectories))
    if len(patients) < 2:
        raise InvalidInputError(f"Leave-one-patient-out needs at least 2 patients, got {len(patients)}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise InvalidInputError(f"The risk threshold must be in 0..1, got {threshold}")
    started = time.perf_counter()
    lkb = {id(t): lkb_baseline_risk(t) for t in trajectories}
    rows: list[dict[str, Any]] = []
    for k, patient in enumerate(patients):
        report(progress, k / len(patients), f"fold {k + 1}/{len(patients)}: patient {patient} held out", cancel)
        train = [t for t in trajectories if t.patient_id != patient]
        test = [t for t in trajectories if t.patient_id == patient]
        if len({t.toxic for t in train}) < 2:
            raise InvalidInputError(f"Leaving out patient {patient} leaves training data with one outcome "
                                    "class only; the cohort needs toxic and non-toxic organs in several patients")
        model = ToxicityModel.fit(train, seed=seed, epochs=epochs, **recipe_fields)
        train_scores = np.array([r[-1] if r.size else np.nan for r in model._risk_batch(train)])
        train_labels = np.array([t.toxic for t in train])
        ok = ~np.isnan(train_scores)
        youden_gru = youden_threshold(train_scores[ok], train_labels[ok])
        youden_lkb = youden_threshold(np.array([lkb[id(t)] for t in train]), train_labels)
        for t, r in zip(test, model._risk_batch(test)):
            rows.append({"patient_id": t.patient_id, "organ": t.organ, "endpoint": t.endpoint, "toxic": t.toxic,
                         "grade": t.grade, "onset_fraction": t.onset_fraction, "fractions": t.fractions.tolist(),
                         "risk": r.tolist(), "score_gru": float(r[-1]) if r.size else float("nan"),
                         "score_lkb": lkb[id(t)], "youden_gru": youden_gru, "youden_lkb": youden_lkb})
    report(progress, 1.0, "leave-one-patient-out done", cancel)

    scored = [r for r in rows if not np.isnan(r["score_gru"])]
    labels = np.array([r["toxic"] for r in scored], dtype=int)
    gru_scores = np.array([r["score_gru"] for r in scored])
    lkb_scores = np.array([r["score_lkb"] for r in scored])
    gru = _classification(gru_scores, labels, float(threshold), np.array([r["youden_gru"] for r in scored]))
    base = _classification(lkb_scores, labels, float(threshold), np.array([r["youden_lkb"] for r in scored]))
    for frac in early_fractions:
        early = np.array([risk_at_fraction(np.array(r["fractions"]), np.array(r["risk"]), int(frac)) for r in scored])
        gru[f"auc_fraction_{int(frac)}"] = auc_mann_whitney(early, labels)
        base[f"auc_fraction_{int(frac)}"] = base["auc"]
    toxic_rows = [r for r in scored if r["toxic"]]
    gru_leads = [lead_time(np.array(r["fractions"]), np.array(r["risk"]), r["onset_fraction"], threshold)
                 for r in toxic_rows]
    lkb_leads = [lead_time(np.array(r["fractions"]), np.full(len(r["fractions"]), r["score_lkb"]),
                           r["onset_fraction"], threshold) for r in toxic_rows]
    gru.update(_lead_summary(gru_leads, len(toxic_rows)))
    base.update(_lead_summary(lkb_leads, len(toxic_rows)))
    seconds = time.perf_counter() - started
    recipe = asdict(ToxicityRecipe(seed=int(seed), epochs=int(epochs), **recipe_fields))
    return {"auc_gru": gru["auc"], "auc_lkb": base["auc"],
            "lead_time_fractions_median": gru["lead_time_fractions_median"],
            "threshold": float(threshold), "score": "risk after the last fraction (patient-organ level)",
            "label": "grade >= 1 during the course", "gru": gru, "lkb": base,
            "n_patients": len(patients), "n_trajectories": len(scored), "n_toxic": int(labels.sum()),
            "predictions": rows, "recipe": recipe, "seconds": round(seconds, 2),
            "lkb_sets": dict(LKB_SET_FOR_ENDPOINT), "model_version": MODEL_VERSION,
            "research_use_only": twinrt.RESEARCH_USE_ONLY}
