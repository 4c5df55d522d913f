"""Physician preferences learned from pairwise plan choices (Bradley-Terry model).

A plan is described by its goals' normalised margins (:func:`plan_features`: one feature per goal,
``margin / max(|limit|, 1 unit)`` clipped to -1..1, 0 when not evaluable) plus the plan score's
must-failure count. A physician who preferred plan A to plan B is modelled as

    P(A preferred to B) = sigmoid(w . (f_A - f_B))

(Bradley-Terry with a linear utility ``w . f``; no intercept, so the model is symmetric in A and
B). ``w`` is fitted by L2-regularised logistic regression on the feature differences (Newton's
method, numpy only); a larger weight means the physician trades more of the other goals for that
goal's margin. Models are stored as one JSON file per physician.

:func:`cross_validate` is the honest check: accuracy on choices held out of the fit (k folds).
On random choices it stays near 50 %; see tests/test_preferences.py.

Research use only, not for clinical decisions.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.io_utils import write_text_atomic
from twinrt.planning.evaluation import PlanEvaluation, normalised_margin

#: Feature counting failed must goals (scaled by 1/10 so that it sits in the margins' range).
MUST_FAILURES_FEATURE = "must_failures/10"

FeatureVector = Mapping[str, float]


def goal_key(goal: Any) -> str:
    """Stable feature name of a goal: ``"SpinalCord D0.1cc <= 45"``."""
    return f"{goal.structure} {goal.metric} {goal.comparator} {goal.value:g}"


def plan_features(evaluation: PlanEvaluation) -> dict[str, float]:
    """Feature vector of an evaluated plan (see the module docstring).

    :param evaluation: a :class:`PlanEvaluation`.
    :return: goal key -> normalised margin (dimensionless, -1..1), plus :data:`MUST_FAILURES_FEATURE`.
    """
    feats = {}
    for r in evaluation.results:
        m = normalised_margin(r)
        # Not evaluable: 0 = "at the limit", so it neither helps nor hurts the plan.
        feats[goal_key(r.goal)] = 0.0 if m is None else m
    feats[MUST_FAILURES_FEATURE] = sum(1 for r in evaluation.results
                                       if r.goal.priority == "must" and r.passed is False) / 10.0
    return feats


def _features(x: Union[PlanEvaluation, FeatureVector]) -> dict[str, float]:
    return plan_features(x) if isinstance(x, PlanEvaluation) else {str(k): float(v) for k, v in x.items()}


@dataclass
class PairwiseChoice:
    """One decision: the physician preferred ``preferred`` to ``rejected`` (same patient).

    :param preferred: features (or the evaluation) of the chosen plan.
    :param rejected: features (or the evaluation) of the other plan.
    :param case_id: patient/case the two plans are for (for grouping; optional).
    """

    preferred: dict[str, float]
    rejected: dict[str, float]
    case_id: str = ""

    def __post_init__(self) -> None:
        self.preferred = _features(self.preferred)
        self.rejected = _features(self.rejected)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"preferred": self.preferred, "rejected": self.rejected, "case_id": self.case_id}


def choices_from_history(history: Iterable[tuple[str, Union[PlanEvaluation, FeatureVector], bool]]
                         ) -> list[PairwiseChoice]:
    """Pairwise choices from a history of approved/rejected plans.

    :param history: ``(case_id, plan, approved)`` records; within each case, every approved plan
        counts as preferred to every rejected plan.
    """
    by_case: dict[str, tuple[list, list]] = {}
    for case_id, plan, approved in history:
        by_case.setdefault(str(case_id), ([], []))[0 if approved else 1].append(_features(plan))
    return [PairwiseChoice(a, r, cid) for cid, (acc, rej) in by_case.items() for a in acc for r in rej]


def _safe_name(physician: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(physician)).strip("._")
    if not name:
        raise InvalidInputError(f"Physician id {physician!r} has no usable characters for a file name")
    return name


@dataclass
class PreferenceModel:
    """A physician's trade-off weights.

    :param physician: physician id (the file name under the preferences folder).
    :param weights: feature name -> weight (utility per unit of normalised margin).
    :param l2: L2 regularisation strength used in the fit.
    :param n_choices: number of choices fitted.
    :param training_accuracy: fraction of the fitted choices the model reproduces.
    """

    physician: str = "default"
    weights: dict[str, float] = field(default_factory=dict)
    l2: float = 1.0
    n_choices: int = 0
    training_accuracy: Optional[float] = None

    # ------------------------------------------------------------------ fit/use
    def fit(self, choices: Sequence[PairwiseChoice], l2: Optional[float] = None,
            max_iter: int = 50) -> "PreferenceModel":
        """Fit the weights to pairwise choices (L2-regularised logistic regression, Newton steps).

        :param choices: at least one choice.
        :param l2: regularisation strength (default: the model's); shrinks weights towards 0,
            which is what an unseen trade-off should get.
        :return: self.
        """
        if not choices:
            raise InvalidInputError("No choices to learn from; record at least one approved/rejected pair")
        if l2 is not None:
            self.l2 = float(l2)
        names = sorted({k for c in choices for k in (*c.preferred, *c.rejected)})
        x = _diff_matrix(choices, names)
        w = np.zeros(len(names))
        for _ in range(max_iter):
            p = _sigmoid(x @ w)
            # All rows are "preferred minus rejected", so every label is 1.
            grad = x.T @ (p - 1.0) + self.l2 * w
            hess = (x.T * (p * (1.0 - p))) @ x + self.l2 * np.eye(len(names))
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.max(np.abs(step)) < 1e-8:
                break
        self.weights = {n: float(v) for n, v in zip(names, w)}
        self.n_choices = len(choices)
        self.training_accuracy = self.accuracy(choices)
        return self

    def score(self, plan: Union[PlanEvaluation, FeatureVector]) -> float:
        """Utility ``w . f`` of a plan (higher is preferred); unknown features count 0."""
        f = _features(plan)
        return float(sum(self.weights.get(k, 0.0) * v for k, v in f.items()))

    def probability(self, a: Union[PlanEvaluation, FeatureVector], b: Union[PlanEvaluation, FeatureVector]) -> float:
        """Modelled probability that the physician prefers ``a`` to ``b``."""
        return float(_sigmoid(np.array(self.score(a) - self.score(b))))

    def rank(self, plans: Sequence[Union[PlanEvaluation, FeatureVector]]) -> list[int]:
        """Indices of ``plans`` from most to least preferred (stable for ties)."""
        scores = [self.score(p) for p in plans]
        return sorted(range(len(plans)), key=lambda i: -scores[i])

    def accuracy(self, choices: Sequence[PairwiseChoice]) -> float:
        """Fraction of ``choices`` whose preferred plan scores higher (ties count half)."""
        if not choices:
            return float("nan")
        hits = 0.0
        for c in choices:
            d = self.score(c.preferred) - self.score(c.rejected)
            hits += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
        return hits / len(choices)

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"format": "twinrt-preferences", "version": 1, "physician": self.physician,
                "model": "bradley-terry on normalised goal margins", "weights": self.weights, "l2": self.l2,
                "n_choices": self.n_choices, "training_accuracy": self.training_accuracy}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreferenceModel":
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != "twinrt-preferences":
            raise InvalidInputError("Not a TwinRT preference file (format 'twinrt-preferences' expected)")
        weights = data.get("weights", {})
        if not isinstance(weights, dict) or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                                    for v in weights.values()):
            raise InvalidInputError("Preference file: 'weights' must map feature names to finite numbers")
        return cls(str(data.get("physician", "default")), {str(k): float(v) for k, v in weights.items()},
                   float(data.get("l2", 1.0)), int(data.get("n_choices", 0)), data.get("training_accuracy"))

    def save(self, folder: Union[str, Path]) -> Path:
        """Write ``<folder>/<physician>.json`` atomically (a crash leaves the old file)."""
        path = Path(folder) / f"{_safe_name(self.physician)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: Union[str, Path], physician: str) -> "PreferenceModel":
        """Read the physician's model from ``<folder>/<physician>.json``.

        :raises MissingInputError: no model stored for this physician.
        """
        path = Path(folder) / f"{_safe_name(physician)}.json"
        if not path.is_file():
            raise MissingInputError(f"No preference model for physician '{physician}' in {folder}; fit one "
                                    "from their approved/rejected plans first", path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path.name}, line {exc.lineno}: not valid JSON ({exc.msg})") from exc
        return cls.from_dict(data)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form of 1 / (1 + exp(-z))


def _diff_matrix(choices: Sequence[PairwiseChoice], names: Sequence[str]) -> np.ndarray:
    idx = {n: i for i, n in enumerate(names)}
    x = np.zeros((len(choices), len(names)))
    for r, c in enumerate(choices):
        for k, v in c.preferred.items():
            x[r, idx[k]] += v
        for k, v in c.rejected.items():
            x[r, idx[k]] -= v
    return x


def cross_validate(choices: Sequence[PairwiseChoice], k: int = 5, l2: float = 1.0,
                   seed: int = 0) -> dict[str, Any]:
    """Held-out accuracy of the preference model: k-fold cross-validation over the choices.

    Each fold is predicted by a model fitted on the other folds only. Choices are shuffled with
    ``seed`` before splitting; when ``case_id`` is set, folds are split by case so that two
    choices about the same patient never sit on both sides of the split.

    :param choices: the physician's choices (at least ``k``).
    :param k: number of folds (>= 2).
    :param l2: regularisation strength.
    :param seed: shuffling seed.
    :return: ``accuracy`` (held-out, 0..1), ``fold_accuracies``, ``n_choices``, ``k``, and
        ``chance`` (0.5).
    """
    n = len(choices)
    if k < 2 or n < k:
        raise InvalidInputError(f"Cross-validation needs k >= 2 and at least k choices; got k={k}, {n} choices")
    rng = np.random.default_rng(seed)
    groups = [c.case_id or f"#{i}" for i, c in enumerate(choices)]
    unique = list(dict.fromkeys(groups))
    if len(unique) < k:
        unique = [f"#{i}" for i in range(n)]
        groups = unique
    order = rng.permutation(len(unique))
    fold_of = {unique[j]: pos % k for pos, j in enumerate(order)}
    hits = 0.0
    tested = 0
    folds = []
    for f in range(k):
        test = [c for c, g in zip(choices, groups) if fold_of[g] == f]
        train = [c for c, g in zip(choices, groups) if fold_of[g] != f]
        if not test or not train:
            continue
        model = PreferenceModel(l2=l2).fit(train)
        acc = model.accuracy(test)
        folds.append(acc)
        hits += acc * len(test)
        tested += len(test)
    return {"accuracy": hits / tested, "fold_accuracies": folds, "n_choices": n, "k": k, "chance": 0.5}
