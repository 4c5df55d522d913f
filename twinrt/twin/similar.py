"""Similar past cases: nearest-neighbour search over a library of planned cases (issue 7; research use only).

A :class:`CaseLibrary` holds, for every past case, a vector of anatomy and geometry features
(:func:`case_features`) and the DVH metrics its plan achieved (:func:`achieved_metrics`). For a new
case, :meth:`CaseLibrary.similar` returns the ``k`` library cases whose features are closest, with
what they achieved; :func:`suggested_goals` turns that into starting values for the planning goals.
The shipped library (:func:`load_shipped_library`) holds the 169 OpenKBP training patients (Babier
et al., Medical Physics 48(9), 2021): derived numbers only, no images.

**Features** (:data:`FEATURE_NAMES`; all on the case's CT grid, distances by an exact Euclidean
distance transform with the anisotropic voxel spacing, ``scipy.ndimage.distance_transform_edt``):

* per target ``T`` of :data:`TARGETS`: ``T_volume_cc`` (cc; 0 when absent) and
  ``PTV_total_volume_cc``, the volume of the union of the targets (cc);
* per organ ``O`` of :data:`ORGANS`:

  - ``O_present``: 1 when the organ is contoured (non-empty), else 0;
  - ``O_volume_cc``: organ volume (cc);
  - ``O_overlap_pct``: % of the organ's volume inside any PTV;
  - ``O_within_5mm_PTV70_pct`` / ``O_within_10mm_PTV70_pct``: % of the organ's volume whose voxel
    centres are within 5 / 10 mm of the high-dose PTV (:data:`HIGH_DOSE_TARGET`; inside counts);
  - ``O_min_dist_mm`` / ``O_median_dist_mm``: minimum / median over the organ's voxels of the
    distance (mm) to the nearest voxel of any PTV (0 inside a PTV);
  - ``O_median_dist_PTV70_mm``: median distance (mm) to the high-dose PTV.

  Distances are capped at :data:`DISTANCE_CAP_MM`; with no target (or no PTV70) they are the cap.
  An absent organ has ``O_present = 0``, volume and percentages 0 and distances at the cap: fixed
  values that the search never compares (see below).

**Distance.** Each feature is transformed (``log1p`` for volumes, which span two decades; identity
otherwise) and standardised with the library's mean and standard deviation (organ features over
the library cases that have the organ). Features that are constant in the library get weight 0.
With ``w_i`` the weight (:data:`FEATURE_WEIGHTS`: 1 for target volumes, organ presence and the
organ-target geometry, 0.5 for organ volumes, which say more about contouring than about dose)
and ``Δz_i`` the difference of standardised values,

``d = sqrt( Σ_i w_i c_i / Σ_i w_i )``, ``c_i = Δz_i²``,

summed over the features *defined for the query*: an organ absent from the query case drops out
entirely (its presence flag too). When the query has an organ that a library case lacks, that
organ's geometry terms count ``c_i =`` :data:`MISSING_TERM` (2, the expected ``Δz²`` of two
independent cases) on top of the presence-flag difference, so a case lacking organs is never
preferred for it. ``d`` is a root-mean-square z-score difference: 0 for identical features, about
1.4 for a random pair. Each :class:`SimilarCase` carries the per-feature shares ``w_i c_i / Σ w``
of ``d²``. ``focus=<organ>`` compares only that organ's features and the target features: the
neighbours for that organ's goals. On the 33 OpenKBP validation patients (k = 5) the mean of the
neighbours' organ metrics misses the true value by less than the library's population mean does
(``bench/twin_similar_cases.py``), and the organ-focused neighbours by less again.

**Achieved metrics** are computed with :mod:`twinrt.dvh` (exact voxel DVH) for every goal of the
``head_and_neck_openkbp`` goal set plus ``Dmean`` and ``D0.1cc`` of every organ and ``D95%``,
``D99%`` of every PTV, keyed ``"<structure> <metric>"`` (e.g. ``"SpinalCord D0.1cc"``), in Gy
(``V<x>Gy`` metrics in % of the structure).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from twinrt.data import OPENKBP_CITATION, load_openkbp, openkbp_patients
from twinrt.dvh import structure_dvh
from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.io_utils import write_text_atomic
from twinrt.model import Case
from twinrt.planning.evaluation import GoalSet, load_goal_set
from twinrt.planning.goals import metric_value, parse_metric
from twinrt.progress import CancelToken, ProgressCallback, report

#: Target (PTV) names, highest dose first.
TARGETS = ("PTV70", "PTV63", "PTV56")
#: The high-dose target that the ``within`` and ``PTV70`` distance features refer to.
HIGH_DOSE_TARGET = "PTV70"
#: Organs at risk described by the features.
ORGANS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
#: Distances (mm) are capped here; also the value for an absent organ or target.
DISTANCE_CAP_MM = 100.0
#: Margins (mm) of the ``within`` features around the high-dose PTV.
NEAR_MARGINS_MM = (5.0, 10.0)
#: Goal set whose metrics the library records (so neighbours' values line up with the goals).
GOAL_SET_NAME = "head_and_neck_openkbp"
#: ``Δz²`` counted for a feature the query has and a library case lacks (expected value for two
#: independent standardised values).
MISSING_TERM = 2.0
#: File format of a saved library.
FORMAT_NAME = "twinrt-case-library"
FORMAT_VERSION = 1
#: The library shipped with TwinRT (OpenKBP training cases).
SHIPPED_LIBRARY_PATH = Path(__file__).resolve().parent / "data" / "openkbp_case_library.json"

_ORGAN_SUFFIXES = ("present", "volume_cc", "overlap_pct",
                   *(f"within_{m:g}mm_{HIGH_DOSE_TARGET}_pct" for m in NEAR_MARGINS_MM),
                   "min_dist_mm", "median_dist_mm", f"median_dist_{HIGH_DOSE_TARGET}_mm")


def _feature_names() -> tuple[str, ...]:
    names = [f"{t}_volume_cc" for t in TARGETS] + ["PTV_total_volume_cc"]
    names += [f"{o}_{s}" for o in ORGANS for s in _ORGAN_SUFFIXES]
    return tuple(names)


#: Feature names, in the order of the library's feature vectors.
FEATURE_NAMES: tuple[str, ...] = _feature_names()


def _default_weight(name: str) -> float:
    if name.startswith(tuple(f"{o}_" for o in ORGANS)) and name.endswith("_volume_cc"):
        return 0.5
    return 1.0


#: Default weight of each feature in the distance (see the module docstring).
FEATURE_WEIGHTS: dict[str, float] = {n: _default_weight(n) for n in FEATURE_NAMES}


def _organ_of(name: str) -> Optional[str]:
    """The organ a feature belongs to (``None`` for target features)."""
    for o in ORGANS:
        if name.startswith(o + "_"):
            return o
    return None


def _transform_of(name: str) -> str:
    return "log1p" if name.endswith("_volume_cc") else "identity"


# ---------------------------------------------------------------------- features
def _resolve(case: Case, goal_set: GoalSet) -> dict[str, Optional[np.ndarray]]:
    """Structure name (goal-set spelling, aliases honoured) → mask on the CT grid, ``None`` when absent."""
    grid = case.ct.grid
    out: dict[str, Optional[np.ndarray]] = {}
    resolved = goal_set.resolve(case)
    for name in (*TARGETS, *ORGANS):
        s = resolved.get(name)
        if s is None:
            # Structures the goal set does not name still match by their own name.
            s = next((x for x in case.structures if x.name.lower() == name.lower()), None)
        mask = None if s is None or s.is_empty else s.on_grid(grid)
        out[name] = mask if mask is not None and mask.any() else None
    return out


def _bbox(mask: np.ndarray, margin: int, shape: Sequence[int]) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _distance_to(target: Optional[np.ndarray], sampling: Sequence[float]) -> Optional[np.ndarray]:
    """Distance (mm) of every voxel of the (cropped) array to the nearest ``target`` voxel; 0 inside."""
    if target is None or not target.any():
        return None
    return ndimage.distance_transform_edt(~target, sampling=sampling)


def case_features(case: Case, goal_set: Union[GoalSet, str, None] = None) -> dict[str, float]:
    """Anatomy and geometry features of a case (see the module docstring for each one).

    :param case: the patient; structures are matched by the goal set's names and aliases.
    :param goal_set: goal set used to match structure names (default ``head_and_neck_openkbp``).
    :return: ``{feature name: value}`` for every name of :data:`FEATURE_NAMES` (cc, %, mm).
    :raises InvalidInputError: when the case has no CT grid to measure on.
    """
    if case is None or getattr(case, "ct", None) is None:
        raise InvalidInputError("case_features needs a Case with a CT image (its grid defines the geometry)")
    gs = _goal_set(goal_set)
    grid = case.ct.grid
    masks = _resolve(case, gs)
    cc = grid.voxel_volume_cc
    # Array axes are (k, j, i); Grid.spacing_mm is (i, j, k).
    sampling = tuple(float(s) for s in grid.spacing_mm[::-1])
    feats: dict[str, float] = {}
    ptvs = [masks[t] for t in TARGETS if masks[t] is not None]
    for t in TARGETS:
        feats[f"{t}_volume_cc"] = float(masks[t].sum()) * cc if masks[t] is not None else 0.0
    union = np.logical_or.reduce(ptvs) if ptvs else None
    feats["PTV_total_volume_cc"] = float(union.sum()) * cc if union is not None else 0.0

    present = [masks[o] for o in ORGANS if masks[o] is not None]
    dist_any = dist_high = None
    crop: tuple[slice, ...] = tuple(slice(0, n) for n in grid.shape)
    if union is not None and present:
        # Crop to the box holding every target and organ: all target voxels are inside it, so the
        # distance transform there is exact for the organ voxels, and far cheaper than the full grid.
        crop = _bbox(np.logical_or.reduce([union, *present]), 1, grid.shape)
        dist_any = _distance_to(union[crop], sampling)
        high = masks[HIGH_DOSE_TARGET]
        dist_high = _distance_to(high[crop] if high is not None else None, sampling)
    for o in ORGANS:
        m = masks[o]
        if m is None:
            feats[f"{o}_present"] = 0.0
            feats[f"{o}_volume_cc"] = 0.0
            feats[f"{o}_overlap_pct"] = 0.0
            for margin in NEAR_MARGINS_MM:
                feats[f"{o}_within_{margin:g}mm_{HIGH_DOSE_TARGET}_pct"] = 0.0
            for s in ("min_dist_mm", "median_dist_mm", f"median_dist_{HIGH_DOSE_TARGET}_mm"):
                feats[f"{o}_{s}"] = DISTANCE_CAP_MM
            continue
        mc = m[crop]
        n = int(mc.sum())
        feats[f"{o}_present"] = 1.0
        feats[f"{o}_volume_cc"] = float(m.sum()) * cc
        feats[f"{o}_overlap_pct"] = 100.0 * float((union[crop] & mc).sum()) / n if union is not None else 0.0
        d_any = dist_any[mc] if dist_any is not None else None
        d_high = dist_high[mc] if dist_high is not None else None
        for margin in NEAR_MARGINS_MM:
            key = f"{o}_within_{margin:g}mm_{HIGH_DOSE_TARGET}_pct"
            # A small tolerance so that a voxel exactly one spacing away counts at that margin.
            feats[key] = 100.0 * float(np.count_nonzero(d_high <= margin + 1e-6)) / n if d_high is not None else 0.0
        feats[f"{o}_min_dist_mm"] = min(float(d_any.min()), DISTANCE_CAP_MM) if d_any is not None else DISTANCE_CAP_MM
        feats[f"{o}_median_dist_mm"] = (min(float(np.median(d_any)), DISTANCE_CAP_MM) if d_any is not None
                                        else DISTANCE_CAP_MM)
        feats[f"{o}_median_dist_{HIGH_DOSE_TARGET}_mm"] = (min(float(np.median(d_high)), DISTANCE_CAP_MM)
                                                           if d_high is not None else DISTANCE_CAP_MM)
    return {k: feats[k] for k in FEATURE_NAMES}


# ---------------------------------------------------------------------- achieved metrics
def _goal_set(goal_set: Union[GoalSet, str, Path, None]) -> GoalSet:
    if goal_set is None:
        return load_goal_set(GOAL_SET_NAME)
    if isinstance(goal_set, GoalSet):
        return goal_set
    return load_goal_set(goal_set)


def metric_keys(goal_set: Union[GoalSet, str, None] = None) -> list[tuple[str, str]]:
    """(structure, metric) pairs recorded by :func:`achieved_metrics`: the goal set's goals, then
    ``Dmean`` and ``D0.1cc`` of every organ and ``D95%``, ``D99%`` of every PTV (no duplicates)."""
    gs = _goal_set(goal_set)
    pairs = [(g.structure, g.metric) for g in gs.goals]
    pairs += [(o, m) for o in ORGANS for m in ("Dmean", "D0.1cc")]
    pairs += [(t, m) for t in TARGETS for m in ("D95%", "D99%")]
    return list(dict.fromkeys(pairs))


def metric_unit(key: str) -> str:
    """Unit (``Gy``, ``%`` or ``cc``) of an achieved-metric key such as ``"Larynx V50Gy"``."""
    return parse_metric(key.rsplit(" ", 1)[-1]).unit


def achieved_metrics(case: Case, dose_name: str = "reference",
                     goal_set: Union[GoalSet, str, None] = None) -> dict[str, float]:
    """The DVH metrics a case's dose achieved, for the structures the case has.

    :param case: the patient.
    :param dose_name: key of the dose in ``case.doses`` (OpenKBP: ``"reference"``).
    :param goal_set: goal set whose metrics are recorded (default ``head_and_neck_openkbp``).
    :return: ``{"<structure> <metric>": value}`` (Gy; ``V<x>Gy`` in %), see :func:`metric_keys`;
        metrics of absent or empty structures are left out.
    :raises InvalidInputError: when the case has no such dose.
    """
    if dose_name not in case.doses:
        raise InvalidInputError(f"Case {case.patient_id} has no dose '{dose_name}'; available: "
                                f"{', '.join(case.doses) or 'none'}")
    gs = _goal_set(goal_set)
    dose = case.doses[dose_name]
    resolved = gs.resolve(case)
    dvhs: dict[str, Any] = {}
    out: dict[str, float] = {}
    for structure, metric in metric_keys(gs):
        s = resolved.get(structure)
        if s is None:
            s = next((x for x in case.structures if x.name.lower() == structure.lower()), None)
        if s is None or s.is_empty:
            continue
        if structure not in dvhs:
            dvhs[structure] = structure_dvh(dose, s)
        out[f"{structure} {metric}"] = float(metric_value(dvhs[structure], parse_metric(metric)))
    return out


# ---------------------------------------------------------------------- library
@dataclass
class SimilarCase:
    """One neighbour returned by :meth:`CaseLibrary.similar`.

    :param case_id: the library case's id (e.g. ``"pt_12"``).
    :param rank: 1 for the nearest.
    :param distance: RMS weighted z-score difference (dimensionless, 0 = identical features).
    :param contributions: feature → its share of ``distance²`` (features compared only).
    :param metrics: the DVH metrics the case's plan achieved (Gy; ``V<x>Gy`` in %).
    :param features: the case's features (cc, %, mm).
    """

    case_id: str
    rank: int
    distance: float
    contributions: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    features: dict[str, float] = field(default_factory=dict)

    def most_dissimilar(self, n: int = 3) -> list[tuple[str, float]]:
        """The ``n`` features that add most to the distance, as (name, share of ``distance²``)."""
        return sorted(self.contributions.items(), key=lambda kv: -kv[1])[:n]

    def most_similar(self, n: int = 3) -> list[tuple[str, float]]:
        """The ``n`` compared features that add least to the distance."""
        return sorted(self.contributions.items(), key=lambda kv: kv[1])[:n]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"case_id": self.case_id, "rank": self.rank, "distance": self.distance,
                "most_dissimilar": self.most_dissimilar(), "metrics": dict(self.metrics)}


def _check_number(value: Any, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise InvalidInputError(f"{what} must be finite, got {value!r}")
    return x


@dataclass
class CaseLibrary:
    """Past cases' features and achieved metrics, with the feature scaling used for the search.

    :param case_ids: one id per case.
    :param features: (n_cases, n_features) raw feature values, columns in ``feature_names`` order.
    :param metrics: per case, ``{"<structure> <metric>": value}`` (Gy; ``V<x>Gy`` in %).
    :param feature_names: column names (default :data:`FEATURE_NAMES`).
    :param weights: feature → weight in the distance (default :data:`FEATURE_WEIGHTS`).
    :param mean: per feature, mean of the transformed values (computed when ``None``).
    :param std: per feature, standard deviation of the transformed values; 0 marks a constant
        feature, which is not compared (computed when ``None``).
    :param metadata: source, citation, goal set, creation date.
    """

    case_ids: list[str]
    features: np.ndarray
    metrics: list[dict[str, float]]
    feature_names: tuple[str, ...] = FEATURE_NAMES
    weights: dict[str, float] = field(default_factory=lambda: dict(FEATURE_WEIGHTS))
    mean: Optional[np.ndarray] = None
    std: Optional[np.ndarray] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.case_ids = [str(c) for c in self.case_ids]
        self.feature_names = tuple(str(n) for n in self.feature_names)
        self.features = np.asarray(self.features, dtype=float)
        n, f = len(self.case_ids), len(self.feature_names)
        if n == 0:
            raise InvalidInputError("A case library needs at least one case; build it from a data set "
                                    "(build_library) or load a saved library")
        if self.features.shape != (n, f):
            raise InvalidInputError(f"Library features have shape {self.features.shape}, expected ({n}, {f}) "
                                    "(cases × feature names)")
        if len(self.metrics) != n:
            raise InvalidInputError(f"Library has {n} cases but {len(self.metrics)} metric records")
        if len(set(self.case_ids)) != n:
            raise InvalidInputError("Library case ids must be unique")
        if not np.all(np.isfinite(self.features)):
            raise InvalidInputError("Library features must be finite numbers")
        unknown = set(self.weights) - set(self.feature_names)
        if unknown:
            raise InvalidInputError(f"Weights name unknown features {sorted(unknown)}")
        self._w = np.array([_check_number(self.weights.get(nm, 1.0), f"weight of {nm}") for nm in self.feature_names])
        if np.any(self._w < 0):
            raise InvalidInputError("Feature weights must be >= 0")
        self._organ = [_organ_of(nm) for nm in self.feature_names]
        self._is_flag = np.array([nm.endswith("_present") for nm in self.feature_names])
        self._log = np.array([_transform_of(nm) == "log1p" for nm in self.feature_names])
        self._defined = self._definedness(self.features)
        if self.mean is None or self.std is None:
            self.mean, self.std = self._fit_scaling()
        self.mean = np.asarray(self.mean, dtype=float)
        self.std = np.asarray(self.std, dtype=float)
        if self.mean.shape != (f,) or self.std.shape != (f,) or not (np.all(np.isfinite(self.mean))
                                                                      and np.all(np.isfinite(self.std))):
            raise InvalidInputError("Library scaling (mean, std) must hold one finite number per feature")
        self._z = self._standardise(self.features)

    # ------------------------------------------------------------------ internals
    def _presence_index(self) -> dict[str, int]:
        return {o: self.feature_names.index(f"{o}_present") for o in ORGANS if f"{o}_present" in self.feature_names}

    def _definedness(self, values: np.ndarray) -> np.ndarray:
        """Bool array like ``values``: False for the features of organs marked absent (flags excepted)."""
        values = np.atleast_2d(values)
        defined = np.isfinite(values)
        pres = self._presence_index()
        for j, organ in enumerate(self._organ):
            if organ is not None and organ in pres and not self._is_flag[j]:
                defined[:, j] &= values[:, pres[organ]] > 0.5
        return defined

    def _transformed(self, values: np.ndarray) -> np.ndarray:
        t = np.array(values, dtype=float)
        t[..., self._log] = np.log1p(np.clip(t[..., self._log], 0.0, None))
        return t

    def _fit_scaling(self) -> tuple[np.ndarray, np.ndarray]:
        t = self._transformed(self.features)
        mean = np.zeros(t.shape[1])
        std = np.zeros(t.shape[1])
        for j in range(t.shape[1]):
            col = t[self._defined[:, j], j]
            if col.size:
                mean[j] = float(col.mean())
                sd = float(col.std())
                std[j] = sd if sd > 1e-9 * max(1.0, abs(mean[j])) else 0.0
        return mean, std

    def _standardise(self, values: np.ndarray) -> np.ndarray:
        t = self._transformed(values)
        scale = np.where(self.std > 0, self.std, 1.0)
        return np.where(self.std > 0, (t - self.mean) / scale, 0.0)

    def _query(self, case_or_features: Union[Case, Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Raw feature vector and the mask of features the query defines."""
        if isinstance(case_or_features, Case):
            feats: Mapping[str, Any] = case_features(case_or_features)
        elif isinstance(case_or_features, Mapping):
            feats = case_or_features
        else:
            raise InvalidInputError("Query must be a Case or a dict of features, got "
                                    f"{type(case_or_features).__name__}")
        unknown = sorted(set(feats) - set(self.feature_names))
        if unknown:
            raise InvalidInputError(f"Unknown features {unknown[:5]}; the library knows {len(self.feature_names)} "
                                    "features (CaseLibrary.feature_names)")
        x = np.full(len(self.feature_names), np.nan)
        for j, nm in enumerate(self.feature_names):
            if nm in feats and feats[nm] is not None:
                x[j] = _check_number(feats[nm], f"Feature '{nm}'")
        given = np.isfinite(x)
        if not given.any():
            raise InvalidInputError("The query has none of the library's features; pass a Case or case_features(case)")
        pres = self._presence_index()
        defined = given.copy()
        for j, organ in enumerate(self._organ):
            if organ is None or organ not in pres:
                continue
            flag = x[pres[organ]]
            if np.isfinite(flag) and flag <= 0.5:
                defined[j] = False  # an organ absent from the query is not compared at all
        return np.where(given, x, 0.0), defined

    def _distances(self, x: np.ndarray, qdef: np.ndarray,
                   use: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """Distances to every case and the (n_cases, n_features) contribution matrix."""
        w = self._w * (self.std > 0) * qdef
        if use is not None:
            w = w * use
        total = float(w.sum())
        if total <= 0:
            raise InvalidInputError("No feature can be compared (all weights are 0 or the query defines none "
                                    "of the library's varying features)")
        zq = self._standardise(x[None, :])[0]
        c = (self._z - zq[None, :]) ** 2
        c = np.where(self._defined, c, MISSING_TERM)
        contrib = c * w[None, :] / total
        return np.sqrt(contrib.sum(axis=1)), contrib

    # ------------------------------------------------------------------ public
    def __len__(self) -> int:
        return len(self.case_ids)

    @property
    def metric_names(self) -> list[str]:
        """Every achieved-metric key found in the library, in first-seen order."""
        return list(dict.fromkeys(k for m in self.metrics for k in m))

    def case_features_of(self, case_id: str) -> dict[str, float]:
        """The stored features of a library case."""
        try:
            i = self.case_ids.index(case_id)
        except ValueError:
            raise InvalidInputError(f"No case '{case_id}' in the library") from None
        return dict(zip(self.feature_names, (float(v) for v in self.features[i])))

    def _focus_mask(self, focus: Optional[str]) -> Optional[np.ndarray]:
        """Features compared for ``focus``: that organ's and the target features (``None``: all)."""
        if focus is None:
            return None
        organ = next((o for o in ORGANS if o.lower() == str(focus).lower()), None)
        if organ is None:
            raise InvalidInputError(f"Unknown organ '{focus}' to focus on; use one of {', '.join(ORGANS)}")
        return np.array([1.0 if o in (None, organ) else 0.0 for o in self._organ])

    def _ranked(self, case_or_features: Union[Case, Mapping[str, Any]], focus: Optional[str],
                exclude: Iterable[str]) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
        """Library indices nearest first, distances, contributions and the compared-feature mask."""
        x, qdef = self._query(case_or_features)
        use = self._focus_mask(focus)
        d, contrib = self._distances(x, qdef, use)
        skip = set(exclude)
        order = [int(i) for i in np.argsort(d, kind="stable") if self.case_ids[i] not in skip]
        compared = (self._w * (self.std > 0) * qdef * (use if use is not None else 1.0)) > 0
        return order, d, contrib, compared

    def similar(self, case_or_features: Union[Case, Mapping[str, Any]], k: int = 5,
                exclude: Iterable[str] = (), focus: Optional[str] = None) -> list[SimilarCase]:
        """The ``k`` library cases nearest to a case (see the module docstring for the distance).

        :param case_or_features: a :class:`Case` (its features are computed) or a feature dict
            (:func:`case_features`; missing keys are not compared).
        :param k: number of neighbours (>= 1; fewer when the library is smaller).
        :param exclude: case ids to leave out (e.g. the query itself, for leave-one-out).
        :param focus: an organ of :data:`ORGANS` to compare on only that organ's and the target
            features (neighbours for that organ's goals); ``None`` compares everything.
        :return: neighbours, nearest first; ties keep library order.
        :raises InvalidInputError: for k < 1, unknown or non-numeric features, an unknown organ.
        """
        k = self._check_k(k)
        order, d, contrib, compared = self._ranked(case_or_features, focus, exclude)
        out = []
        for rank, i in enumerate(order[:k], 1):
            contributions = {nm: float(contrib[i, j]) for j, nm in enumerate(self.feature_names) if compared[j]}
            out.append(SimilarCase(self.case_ids[i], rank, float(d[i]), contributions, dict(self.metrics[i]),
                                   dict(zip(self.feature_names, (float(v) for v in self.features[i])))))
        return out

    def predict_metrics(self, case_or_features: Union[Case, Mapping[str, Any]], k: int = 5,
                        exclude: Iterable[str] = (), per_organ: bool = False) -> dict[str, float]:
        """Each achieved metric predicted as the mean over the ``k`` nearest cases *that have it*.

        :param per_organ: when True, an organ's metrics come from the neighbours found with
            ``focus=<organ>`` (its own geometry and the targets); target metrics always from all features.
        :return: ``{metric key: mean value}`` (Gy; ``V<x>Gy`` in %).
        """
        k = self._check_k(k)
        if isinstance(case_or_features, Case):
            case_or_features = case_features(case_or_features)  # computed once for every ranking
        orders = {None: self._ranked(case_or_features, None, exclude)[0]}
        out: dict[str, float] = {}
        for key in self.metric_names:
            organ = key.split(" ", 1)[0] if per_organ and key.split(" ", 1)[0] in ORGANS else None
            if organ not in orders:
                orders[organ] = self._ranked(case_or_features, organ, exclude)[0]
            vals = [self.metrics[i][key] for i in orders[organ] if key in self.metrics[i]][:k]
            if vals:
                out[key] = float(np.mean(vals))
        return out

    def population_means(self) -> dict[str, float]:
        """Mean of each achieved metric over the library cases that have it (the baseline predictor)."""
        return {key: float(np.mean([m[key] for m in self.metrics if key in m])) for key in self.metric_names}

    @staticmethod
    def _check_k(k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k (number of neighbours) must be an integer >= 1, got {k!r}")
        return int(k)

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        """The JSON form written by :meth:`save`."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "description": "Similar-case library of TwinRT (issue 7): per case, anatomy/geometry features and "
                           "the DVH metrics its plan achieved. Derived numbers only; no images. See "
                           "twinrt/twin/similar.py for the feature definitions. Research use only.",
            **{k: v for k, v in self.metadata.items() if k not in ("format", "format_version")},
            "feature_names": list(self.feature_names),
            "feature_units": {nm: _unit_of_feature(nm) for nm in self.feature_names},
            "weights": {nm: float(self.weights.get(nm, 1.0)) for nm in self.feature_names},
            "scaling": {"transform": [_transform_of(nm) for nm in self.feature_names],
                        "mean": [round(float(v), 6) for v in self.mean],
                        "std": [round(float(v), 6) for v in self.std],
                        "note": "z = (transform(x) - mean) / std; std 0 marks a constant feature (not compared); "
                                "organ features' statistics are over the cases that have the organ"},
            "metric_units": {key: metric_unit(key) for key in self.metric_names},
            "cases": [{"id": cid, "features": [round(float(v), 3) for v in self.features[i]],
                       "metrics": {k: round(float(v), 3) for k, v in self.metrics[i].items()}}
                      for i, cid in enumerate(self.case_ids)],
        }

    def save(self, path: Union[str, Path]) -> Path:
        """Write the library as JSON, atomically (a failed write leaves any previous file intact).

        :return: the path written.
        """
        text = json.dumps(self.to_json(), separators=(",", ":"))
        # One case per line keeps the file diff-able without the size of full indentation.
        text = text.replace(',{"id":', ',\n{"id":').replace('"cases":[{', '"cases":[\n{')
        return write_text_atomic(path, text + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "CaseLibrary":
        """Read a library written by :meth:`save`.

        :raises MissingInputError: when the file does not exist.
        :raises InvalidInputError: when it is not valid JSON, not a case library, of another format
            version, or inconsistent.
        """
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"Case library {path} does not exist; build one with build_library(...).save()",
                                    path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"{path} is not a readable JSON case library ({exc}); rebuild it with "
                                    "build_library(...).save()") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise InvalidInputError(f"{path} is not a TwinRT case library (format must be '{FORMAT_NAME}')")
        if data.get("format_version") != FORMAT_VERSION:
            raise InvalidInputError(f"{path} has case-library format version {data.get('format_version')!r}; this "
                                    f"TwinRT reads version {FORMAT_VERSION}: rebuild the library with build_library")
        try:
            names = tuple(data["feature_names"])
            cases = data["cases"]
            scaling = data["scaling"]
            ids = [c["id"] for c in cases]
            feats = np.array([[_check_number(v, f"{path}: feature of case {c['id']}") for v in c["features"]]
                              for c in cases], dtype=float).reshape(len(cases), len(names))
            metrics = [{str(k): _check_number(v, f"{path}: metric {k}") for k, v in c["metrics"].items()}
                       for c in cases]
            meta = {k: data[k] for k in ("source", "citation", "goal_set", "created", "n_cases", "dose")
                    if k in data}
            return cls(ids, feats, metrics, names, dict(data.get("weights", {})),
                       np.array(scaling["mean"], dtype=float), np.array(scaling["std"], dtype=float), meta)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, InvalidInputError):
                raise
            raise InvalidInputError(f"{path} is a damaged case library ({type(exc).__name__}: {exc}); rebuild it "
                                    "with build_library(...).save()") from exc


def _unit_of_feature(name: str) -> str:
    if name.endswith("_cc"):
        return "cc"
    if name.endswith("_pct"):
        return "%"
    if name.endswith("_mm"):
        return "mm"
    return "1"


def load_shipped_library() -> CaseLibrary:
    """The library shipped with TwinRT: the 169 OpenKBP training cases (reference plans)."""
    return CaseLibrary.load(SHIPPED_LIBRARY_PATH)


def build_library(paths: Optional[Sequence[Union[str, Path, Case]]] = None, split: str = "train",
                  root: Union[str, Path, None] = None, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None, dose_name: str = "reference",
                  goal_set: Union[GoalSet, str, None] = None) -> CaseLibrary:
    """Build a library from past cases: their features and the metrics of their dose.

    :param paths: OpenKBP ``pt_N.npz`` files or loaded cases; default all of ``split``.
    :param split: OpenKBP split when ``paths`` is ``None`` (``"train"``).
    :param root: the ``openkbp`` folder (default from :func:`twinrt.data.shared_data_dir`).
    :param progress: optional ``progress(fraction, text)`` callback.
    :param cancel: optional cancel token.
    :param dose_name: the dose whose metrics are recorded.
    :param goal_set: goal set for metrics and structure names (default ``head_and_neck_openkbp``).
    :raises InvalidInputError: when there is no case.
    """
    if paths is None:
        paths = openkbp_patients(split, root)
    paths = list(paths)
    if not paths:
        raise InvalidInputError("No cases to build a library from; give OpenKBP .npz files or cases")
    gs = _goal_set(goal_set)
    ids, rows, metrics = [], [], []
    for n, p in enumerate(paths):
        report(progress, n / len(paths), f"Case library: {getattr(p, 'patient_id', None) or Path(p).stem}", cancel)
        case = p if isinstance(p, Case) else load_openkbp(p)
        feats = case_features(case, gs)
        ids.append(case.patient_id)
        rows.append([feats[nm] for nm in FEATURE_NAMES])
        metrics.append(achieved_metrics(case, dose_name, gs))
    report(progress, 1.0, "Case library built", cancel)
    meta = {"source": "OpenKBP grand challenge data set, reference plans (split: "
                      f"{split if all(not isinstance(p, Case) for p in paths) else 'given cases'})",
            "citation": OPENKBP_CITATION, "goal_set": gs.name, "dose": dose_name,
            "created": _dt.date.today().isoformat(), "n_cases": len(ids)}
    return CaseLibrary(ids, np.array(rows, dtype=float), metrics, FEATURE_NAMES, dict(FEATURE_WEIGHTS), metadata=meta)


# ---------------------------------------------------------------------- goals
def suggested_goals(neighbours: Sequence[SimilarCase],
                    goal_set: Union[GoalSet, str, None] = None) -> list[dict[str, Any]]:
    """Starting values for the planning goals from what similar cases achieved.

    For each goal: the neighbours' achieved values (those that have the structure), their median
    and range, and ``suggested`` = the median, but never looser than the clinical limit (for ``<=``
    goals ``min(median, limit)``, for ``>=`` goals ``max(median, limit)``); the clinical limit when
    no neighbour has the structure.

    :param neighbours: from :meth:`CaseLibrary.similar`.
    :param goal_set: the goal set (name, path or :class:`GoalSet`; default ``head_and_neck_openkbp``).
    :return: one dict per goal: ``structure``, ``metric``, ``comparator``, ``clinical_value``,
        ``unit``, ``priority``, ``n_neighbours``, ``values``, ``median``, ``min``, ``max``,
        ``suggested``, ``clinical_met_by`` (how many neighbours meet the clinical limit), ``note``.
    :raises InvalidInputError: with no neighbours.
    """
    neighbours = list(neighbours)
    if not neighbours:
        raise InvalidInputError("suggested_goals needs at least one neighbour (CaseLibrary.similar with k >= 1)")
    gs = _goal_set(goal_set)
    out = []
    for g in gs.goals:
        key = f"{g.structure} {g.metric}"
        vals = [float(nb.metrics[key]) for nb in neighbours if key in nb.metrics]
        row: dict[str, Any] = {"structure": g.structure, "metric": g.metric, "comparator": g.comparator,
                               "clinical_value": g.value, "unit": g.unit, "priority": g.priority,
                               "n_neighbours": len(vals), "values": vals}
        if not vals:
            row.update(median=None, min=None, max=None, suggested=g.value, clinical_met_by=0,
                       note="no similar case has this structure: the clinical limit is kept")
        else:
            med = float(np.median(vals))
            if g.comparator == "<=":
                suggested, met = min(med, g.value), sum(v <= g.value + 1e-9 for v in vals)
            else:
                suggested, met = max(med, g.value), sum(v >= g.value - 1e-9 for v in vals)
            tighter = abs(suggested - g.value) > 1e-9
            note = (f"similar cases achieved {med:.1f} {g.unit} (median): start from it" if tighter
                    else "similar cases did not do better than the clinical limit: the limit is kept")
            row.update(median=med, min=float(min(vals)), max=float(max(vals)), suggested=float(suggested),
                       clinical_met_by=int(met), note=note)
        out.append(row)
    return out


def describe_neighbours(neighbours: Sequence[SimilarCase], n_features: int = 2,
                        metrics: Sequence[str] = ("SpinalCord D0.1cc", "Brainstem D0.1cc", "RightParotid Dmean",
                                                  "LeftParotid Dmean", "Larynx Dmean")) -> str:
    """A short human-readable summary of neighbours (for the CLI and the Slicer module).

    :param neighbours: from :meth:`CaseLibrary.similar`.
    :param n_features: how many most-dissimilar features to name per neighbour.
    :param metrics: achieved metrics to show (Gy), when the neighbour has them.
    """
    neighbours = list(neighbours)
    if not neighbours:
        return "No similar cases."
    lines = [f"{len(neighbours)} most similar past case{'s' if len(neighbours) > 1 else ''} "
             "(distance: RMS z-score difference of the anatomy features; 0 = identical):"]
    for nb in neighbours:
        shown = ", ".join(f"{k} {nb.metrics[k]:.1f} {metric_unit(k)}" for k in metrics
                          if k in nb.metrics)
        diff = ", ".join(nm for nm, _ in nb.most_dissimilar(n_features) if _ > 0)
        lines.append(f"  {nb.rank}. {nb.case_id}  distance {nb.distance:.2f}"
                     + (f"  | achieved: {shown}" if shown else "")
                     + (f"  | differs most in: {diff}" if diff else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------- evaluation
def evaluate_library(library: CaseLibrary, validation_paths: Sequence[Union[str, Path, Case]], k: int = 5,
                     metrics: Optional[Sequence[str]] = None, progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None) -> dict[str, Any]:
    """Do neighbours carry information? Predict held-out patients' achieved metrics from the library.

    For each validation patient (none may be in the library) every organ metric in Gy (default: the
    library's metrics of :data:`ORGANS` with unit Gy) is predicted three ways and compared with the
    patient's true value on its reference dose:

    * ``knn``: the mean over the ``k`` nearest library cases that have the metric, all features
      compared (the neighbours :meth:`CaseLibrary.similar` returns);
    * ``knn_organ``: the same with the neighbours found on the organ's own geometry and the target
      features (``similar(..., focus=organ)``, :meth:`CaseLibrary.predict_metrics` ``per_organ=True``);
    * ``population``: the library's mean of the metric (the baseline).

    :param library: the case library.
    :param validation_paths: OpenKBP ``.npz`` files or loaded cases, with a ``"reference"`` dose.
    :param k: neighbours per prediction.
    :param metrics: metric keys to evaluate (default: see above).
    :param progress: optional ``progress(fraction, text)`` callback.
    :param cancel: optional cancel token.
    :return: ``k``, ``n_validation``, ``n_library``, ``n_pairs``; ``knn_mae_gy``,
        ``knn_organ_mae_gy`` and ``population_mae_gy``: mean absolute error (Gy) over every
        patient × metric pair; ``n_metrics`` and ``knn_wins_metrics`` / ``knn_organ_wins_metrics``
        (metrics whose MAE is below the population's); ``per_metric`` (``n`` and the three MAEs)
        and ``per_patient`` (patient id, the three MAEs, the neighbours' ids).
    :raises InvalidInputError: for an empty list, k < 1, or a validation patient that is in the library.
    """
    k = CaseLibrary._check_k(k)
    items = list(validation_paths)
    if not items:
        raise InvalidInputError("evaluate_library needs at least one validation patient")
    keys = list(metrics) if metrics is not None else [
        m for m in library.metric_names if m.split(" ", 1)[0] in ORGANS and metric_unit(m) == "Gy"]
    pop = library.population_means()
    methods = ("knn", "knn_organ", "population")
    errs: dict[str, dict[str, list[float]]] = {m: {x: [] for x in methods} for m in keys}
    per_patient = []
    lib_ids = set(library.case_ids)
    for n, item in enumerate(items):
        report(progress, n / len(items), f"Evaluating {getattr(item, 'patient_id', None) or Path(item).stem}",
               cancel)
        case = item if isinstance(item, Case) else load_openkbp(item)
        if case.patient_id in lib_ids:
            raise InvalidInputError(f"Validation patient {case.patient_id} is in the library; evaluate on held-out "
                                    "patients only")
        feats = case_features(case)
        truth = achieved_metrics(case, "reference")
        preds = {"knn": library.predict_metrics(feats, k),
                 "knn_organ": library.predict_metrics(feats, k, per_organ=True), "population": pop}
        mine: dict[str, list[float]] = {x: [] for x in methods}
        for m in keys:
            if m in truth and all(m in preds[x] for x in methods):
                for x in methods:
                    e = abs(preds[x][m] - truth[m])
                    errs[m][x].append(e)
                    mine[x].append(e)
        per_patient.append({"patient": case.patient_id, "n_metrics": len(mine["knn"]),
                            **{f"{x}_mae_gy": (float(np.mean(v)) if v else None) for x, v in mine.items()},
                            "neighbours": [nb.case_id for nb in library.similar(feats, k)]})
    report(progress, 1.0, "Evaluation done", cancel)
    per_metric = {m: {"n": len(e["knn"]), **{f"{x}_mae_gy": float(np.mean(e[x])) for x in methods}}
                  for m, e in errs.items() if e["knn"]}
    pooled = {x: [v for e in errs.values() for v in e[x]] for x in methods}
    out: dict[str, Any] = {"k": k, "n_validation": len(items), "n_library": len(library),
                           "n_pairs": len(pooled["knn"]), "n_metrics": len(per_metric)}
    for x in methods:
        out[f"{x}_mae_gy"] = float(np.mean(pooled[x])) if pooled[x] else float("nan")
    for x in ("knn", "knn_organ"):
        out[f"{x}_wins_metrics"] = sum(v[f"{x}_mae_gy"] < v["population_mae_gy"] for v in per_metric.values())
    out["per_metric"] = per_metric
    out["per_patient"] = per_patient
    return out
