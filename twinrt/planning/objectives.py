"""Dose objectives for fluence optimisation: value and gradient with respect to voxel dose.

Every objective belongs to one structure and sees the doses ``d`` (Gy) of that structure's ``N``
voxels on the dose grid. Its contribution to the total objective is ``weight * f(d)``; ``weight``
is pyRadPlan's and matRad's *priority* (penalty). The definitions and their normalisation by the
voxel count ``N`` are pyRadPlan 0.5.0's (``pyRadPlan/optimization/objectives``), so that a plan
with the same priorities solves the same problem; two deliberate differences are marked *(TwinRT)*.

==================  ==========================================  ===========================================
kind                f(d) (Gy²)                                   notes
==================  ==========================================  ===========================================
squared_deviation   Σ (d - D)² / N                               pyRadPlan ``SquaredDeviation`` (d_ref = D)
squared_underdose   Σ min(d - D, 0)² / N                         pyRadPlan ``SquaredUnderdosing`` (d_min = D)
squared_overdose    Σ max(d - D, 0)² / N                         pyRadPlan ``SquaredOverdosing`` (d_max = D)
max_dvh             Σ_{D ≤ d ≤ q} (d - D)² / N,                  "D_V% ≤ D"; pyRadPlan ``MaxDVH``; q is the
                    q = quantile(d, 1 - V/100)                   linear quantile, held fixed in the gradient
min_dvh             Σ_{q ≤ d ≤ D} (d - D)² / N,                  "D_V% ≥ D"; pyRadPlan ``MinDVH``
                    q = quantile(d, 1 - V/100)
mean_dose           max(mean(d) - D, 0)²                         *(TwinRT)* one-sided "mean ≤ D"; equals
                                                                 pyRadPlan ``MeanDose`` (quadratic) for D = 0
geud                max(gEUD_a(d) - D, 0)²,                      *(TwinRT)* one-sided "gEUD ≤ D" with the usual
                    gEUD_a = (Σ d^a / N)^(1/a), a ≥ 1            exponent a (pyRadPlan's EUD uses k = 1/a)
dose_mimicking      Σ s_v · w(d_v - p_v)² / N                    *(TwinRT)* voxel-wise: p_v is a reference dose
                                                                 (e.g. a predicted dose) per voxel, w keeps the
                                                                 excess (``side="upper"``), the shortfall
                                                                 (``"lower"``) or both; s_v = 1/(1+(σ_v/σ₀)²)
                                                                 down-weights voxels whose reference is
                                                                 uncertain (σ_v: per-voxel std, Gy)
==================  ==========================================  ===========================================

Because of the 1/N normalisation a structure's objective does not grow with its size: a 1 Gy
uniform error costs ``weight`` Gy² whether the structure has 100 or 10⁶ voxels.

Objectives can be written as dicts or JSON, e.g.
``{"structure": "OuterTarget", "kind": "squared_deviation", "dose_gy": 50, "weight": 1000}`` or
``{"structure": "Rectum", "kind": "max_dvh", "dose_gy": 40, "volume_percent": 30, "priority": 50}``;
see :func:`objective_from_dict`. pyRadPlan's class names ("Squared Overdosing", "Max DVH", ...)
are accepted as kinds too.
"""

from __future__ import annotations

import abc

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import numpy as np

from twinrt.errors import InvalidInputError

#: Codes of the per-voxel gradient forms the optimiser's kernel evaluates (see :class:`KernelTerm`).
CODE_WINDOW = 0   # coef * (d - ref) where lo <= d <= hi
CODE_CONSTANT = 1  # coef
CODE_POWER = 2    # coef * d ** power
CODE_VOXEL = 3    # coef * s_v * (d - p_v) where lo <= d - p_v <= hi (p_v, s_v given per voxel)


@dataclass(frozen=True)
class KernelTerm:
    """An objective's per-voxel gradient at the current dose, in a form a compiled loop can evaluate.

    The gradient of ``weight * f`` with respect to a voxel dose ``d`` is, by ``code``:
    ``CODE_WINDOW``: ``coef * (d - ref)`` when ``lo <= d <= hi`` (else 0), and the voxel's value is
    ``value_scale * coef / 2 * (d - ref)**2``; ``CODE_CONSTANT``: ``coef``; ``CODE_POWER``:
    ``coef * d**power``; ``CODE_VOXEL``: ``coef * s_v * (d - p_v)`` when ``lo <= d - p_v <= hi``, with
    a reference ``p_v`` and a scale ``s_v`` per voxel (value ``value_scale * coef * s_v / 2 * (d - p_v)**2``). Terms of objectives that depend on the whole structure (DVH, mean, gEUD) are
    rebuilt from the current dose at every evaluation and have ``value_scale`` 0: their value is
    computed from the structure's dose by :meth:`Objective.value` instead.
    """

    code: int
    coef: float
    ref: float = 0.0
    lo: float = -math.inf
    hi: float = math.inf
    value_scale: float = 1.0
    power: float = 0.0


def _check_dose(value: float, what: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise InvalidInputError(f"{what} must be a finite dose >= 0 Gy, got {value!r}")
    return v


@dataclass
class Objective(abc.ABC):
    """Base class: one objective on one structure (subclasses define :meth:`value` and :meth:`kernel_term`).

    :param structure: name of the structure the objective applies to.
    :param dose_gy: reference dose D in Gy (see the table in the module docstring).
    :param weight: priority (penalty) >= 0 multiplying ``f``; pyRadPlan's ``priority``.
    """

    structure: str
    dose_gy: float
    weight: float = 1.0

    #: Name used in dicts and JSON; set by each subclass.
    kind: ClassVar[str] = ""
    #: True when the gradient of one voxel depends on the doses of the others (quantile, mean).
    needs_structure_dose: ClassVar[bool] = False
    #: True when voxels below ``dose_gy`` contribute neither value nor gradient, so that the optimiser
    #: may leave far-below-threshold voxels out of the sum (its exact active set).
    upper_only: ClassVar[bool] = False
    #: True when the objective asks for at least some dose (used to find the prescription).
    raises_dose: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.structure, str) or not self.structure.strip():
            raise InvalidInputError(f"A {self.kind} objective needs a structure name")
        self.dose_gy = _check_dose(self.dose_gy, f"The dose of the {self.kind} objective on '{self.structure}'")
        w = float(self.weight)
        if not (math.isfinite(w) and w >= 0):
            raise InvalidInputError(f"The weight of the {self.kind} objective on '{self.structure}' must be "
                                    f"a finite number >= 0, got {self.weight!r}")
        self.weight = w

    # ------------------------------------------------------------------ evaluation
    @abc.abstractmethod
    def value(self, dose_gy: np.ndarray) -> float:
        """``weight * f(d)`` for the structure's voxel doses (Gy, 1-D)."""

    def gradient(self, dose_gy: np.ndarray) -> np.ndarray:
        """Gradient of :meth:`value` with respect to each voxel dose (Gy⁻¹ · objective units), 1-D."""
        d = _as_doses(dose_gy, self.structure)
        return _term_gradient(self.kernel_term(d.size, d), d)

    @abc.abstractmethod
    def kernel_term(self, n_voxels: int, dose_gy: np.ndarray | None = None) -> KernelTerm:
        """The gradient of this objective in kernel form for a structure of ``n_voxels`` voxels;
        ``dose_gy`` (its voxel doses, Gy) is needed only when :attr:`needs_structure_dose` is true."""

    def _n(self, dose_gy: np.ndarray) -> int:
        return int(np.asarray(dose_gy).size)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :func:`objective_from_dict` reads back."""
        return {"structure": self.structure, "kind": self.kind, "dose_gy": self.dose_gy, "weight": self.weight}

    def describe(self) -> str:
        """Short human-readable form, e.g. ``"OuterTarget squared_deviation 50 Gy (w 1000)"``."""
        return f"{self.structure} {self.kind} {self.dose_gy:g} Gy (w {self.weight:g})"


def _as_doses(dose_gy: np.ndarray, name: str) -> np.ndarray:
    d = np.asarray(dose_gy, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise InvalidInputError(f"No voxel doses given for structure '{name}'")
    return d


def _term_gradient(term: KernelTerm, d: np.ndarray) -> np.ndarray:
    """Per-voxel gradient of one kernel term, in numpy (the reference for the compiled kernel)."""
    if term.code == CODE_WINDOW:
        inside = (d >= term.lo) & (d <= term.hi)
        return np.where(inside, term.coef * (d - term.ref), 0.0)
    if term.code == CODE_CONSTANT:
        return np.full(d.shape, term.coef)
    return term.coef * np.where(d > 0, d, 0.0) ** term.power


# ---------------------------------------------------------------------- voxel-wise objectives
@dataclass
class SquaredDeviation(Objective):
    """``weight * Σ (d - D)² / N``: pulls every voxel to D (targets)."""

    kind: ClassVar[str] = "squared_deviation"
    raises_dose: ClassVar[bool] = True

    def value(self, dose_gy: np.ndarray) -> float:
        d = _as_doses(dose_gy, self.structure)
        dev = d - self.dose_gy
        return self.weight * float(dev @ dev) / d.size

    def kernel_term(self, n_voxels: int, dose_gy: np.ndarray | None = None) -> KernelTerm:
        return KernelTerm(CODE_WINDOW, 2.0 * self.weight / n_voxels, ref=self.dose_gy)


@dataclass
class SquaredUnderdose(SquaredDeviation):
    """``weight * Σ min(d - D, 0)² / N``: penalises voxels below D (target coverage)."""

    kind: ClassVar[str] = "squared_underdose"

    def value(self, dose_gy: np.ndarray) -> float:
        d = _as_doses(dose_gy, self.structure)
        dev = np.minimum(d - self.dose_gy, 0.0)
        return self.weight * float(dev @ dev) / d.size

    def kernel_term(self, n_voxels: int, dose_gy: np.ndarray | None = None) -> KernelTerm:
        return KernelTerm(CODE_WINDOW, 2.0 * self.weight / n_voxels, ref=self.dose_gy, hi=self.dose_gy)


@dataclass
class SquaredOverdose(SquaredDeviation):
    """``weight * Σ max(d - D, 0)² / N``: penalises voxels above D (organs, body, hot spots)."""

    kind: ClassVar[str] = "squared_overdose"
    upper_only: ClassVar[bool] = True
    raises_dose: ClassVar[bool] = False

    def value(self, dose_gy: np.ndarray) -> float:
        d = _as_doses(dose_gy, self.structure)
        dev = np.maximum(d - self.dose_gy, 0.0)
        return self.weight * float(dev @ dev) / d.size

    def kernel_term(self, n_voxels: int, dose_gy: np.ndarray | None = None) -> KernelTerm:
        return KernelTerm(CODE_WINDOW, 2.0 * self.weight / n_voxels, ref=self.dose_gy, lo=self.dose_gy)


# ---------------------------------------------------------------------- structure-wide objectives
@dataclass
class MaxDVH(Objective):
    """"D_V% ≤ D" (pyRadPlan ``MaxDVH``): voxels between D and the dose of the hottest V % are pulled
    down to D. ``weight * Σ_{D ≤ d ≤ q} (d - D)² / N`` with ``q = quantile(d, 1 - V/100)``.

    :param volume_percent: V, the largest volume (% of the structure) allowed above D.
    """

    volume_percent: float = 50.0

    kind: ClassVar[str] = "max_dvh"
    needs_structure_dose: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        v = float(self.volume_percent)
        if not (0.0 <= v <= 100.0):
            raise InvalidInputError(f"The volume of the {self.kind} objective on '{self.structure}' must be "
                                    f"within 0..100 %, got {self.volume_percent!r}")
        self.volume_percent = v

    def _window(self, d: np.ndarray) -> tuple[float, float]:
        # The linear quantile is what pyRadPlan uses; it is held fixed in the gradient (a sub-gradient
        # where a voxel crosses it), as in pyRadPlan and matRad.
        q = float(np.quantile(d, 1.0 - self.volume_percent / 100.0, method="linear"))
        return self.dose_gy, q

    def value(self, dose_gy: np.ndarray) -> float:
        d = _as_doses(dose_gy, self.structure)
        lo, hi = self._window(d)
        dev = np.where((d >= lo) & (d <= hi), d - self.dose_gy, 0.0)
        return self.weight * float(dev @ dev) / d.size

    def kernel_term(self, n_voxels: int, dose_gy: np.ndarray | None = None) -> KernelTerm:
        d = _as_doses(dose_gy, self.structure)
        lo, hi = self._window(d)
        return KernelTerm(CODE_WINDOW, 2.0 * self.weight / d.size, ref=self.dose_gy, lo=lo, hi=hi, value_scale=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "volume_percent": self.volume_percent}

    def describe(self) -> str:
        return f"{self.structure} {self.kind} D{self.volume_percent:g}% {self.dose_gy:g} Gy (w {self.weight:g})"


@dataclass
class MinDVH(MaxDVH):
    """"D_V% ≥ D" (pyRadPlan ``MinDVH``): voxels between the dose of the hottest V % and D are pushed
    up to D. ``weight * Σ_{q ≤ d ≤ D} (d - D)² / N`` with ``q = quantile(d, 1 - V/100)``.

    :param volume_percent: V, the smallest volume (% of the structure) that must receive D.
    """

    volume_percent: float = 95.0

    kind: ClassVar[str] = "min_dvh"
    raises_dose: ClassVar[bool] = True

    def _window(self, d: np.ndarray) -> tuple[float, float]:
        q = float(np.quantile(d, 1.0 - self.volume_percent / 100.0, method="linear"))
        return q, self.dose_gy


@dataclass
class MeanDose(Objective):
    """"mean ≤ D": ``weight * max(mean(d) - D, 0)²`` (pyRadPlan's quadratic ``MeanDose`` for D = 0)."""

    dose_gy: float = 0.0

    kind: ClassVar[str] = "mean_dose"
    needs_structure_dose: ClassVar[bool] = True

    def value(self, dose_gy: np.ndarray) -> float:
        d = _as_doses(dose_gy, self.structure)
        excess = max(float(d.mean()) - self.dose_gy, 0.0)
        return self.weight * excess * excess

    def kernel_term(self, n_voxels: int, dose_gy: np.ndarray | None = None) -> KernelTerm:
        d = _as_doses(dose_gy, self.structure)
        excess = max(float(d.mean()) - self.dose_gy, 0.0)
        return KernelTerm(CODE_CONSTANT, 2.0 * self.weight * excess / d.size, value_scale=0.0)


@dataclass
class GEUD(Objective):
    """"gEUD ≤ D": ``weight * max(gEUD_a(d) - D, 0)²`` with ``gEUD_a = (Σ d^a / N)^(1/a)``.

    :param a: volume-effect exponent, >= 1: 1 is the mean dose (parallel organs), large values
        approach the maximum dose (serial organs, e.g. 8-20 for the spinal cord).
    """

    dose_gy: float = 0.0
    a: float = 1.0

    kind: ClassVar[str] = "geud"
    needs_structure_dose: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        a = float(self.a)
        # a < 1 (target-style gEUD) has an infinite gradient at zero dose; not supported here.
        if not (math.isfinite(a) and a >= 1.0):
            raise InvalidInputError(f"The gEUD exponent a of the objective on '{self.structure}' must be a "
                                    f"finite number >= 1 (an upper gEUD limit for an organ), got {self.a!r}")
        self.a = a

    def _moment(self, d: np.ndarray) -> float:
        return float(np.mean(np.maximum(d, 0.0) ** self.a))

    def geud_gy(self, dose_gy: np.ndarray) -> float:
        """gEUD_a of the voxel doses (Gy)."""
        return self._moment(_as_doses(dose_gy, self.structure)) ** (1.0 / self.a)

    def value(self, dose_gy: np.ndarray) -> float:
        excess = max(self.geud_gy(dose_gy) - self.dose_gy, 0.0)
        return self.weight * excess * excess

    def kernel_term(self, n_voxels: int, dose_gy: np.ndarray | None = None) -> KernelTerm:
        d = _as_doses(dose_gy, self.structure)
        m = self._moment(d)
        excess = max(m ** (1.0 / self.a) - self.dose_gy, 0.0)
        if m <= 0.0 or excess == 0.0:
            return KernelTerm(CODE_POWER, 0.0, power=self.a - 1.0, value_scale=0.0)
        # d gEUD / d d_i = m^(1/a - 1) d_i^(a-1) / N
        coef = 2.0 * self.weight * excess * m ** (1.0 / self.a - 1.0) / d.size
        return KernelTerm(CODE_POWER, coef, power=self.a - 1.0, value_scale=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "a": self.a}


# ---------------------------------------------------------------------- reference-dose objectives
#: Sides of :class:`DoseMimicking`: which deviations from the reference cost.
MIMIC_SIDES = ("upper", "lower", "both")


@dataclass
class DoseMimicking(Objective):
    """Voxel-wise dose mimicking: ``weight * Σ s_v · w(d_v - p_v)² / N`` towards a reference dose p.

    Used for knowledge-based planning: the reference is a predicted dose (Gy) given to the optimiser
    by name (``reference_doses`` of :func:`twinrt.planning.optimizer.optimize_fluence`), so that the
    objective itself stays a small JSON dict. ``side="upper"`` penalises only dose above the
    reference (organs: "no more than predicted"), ``"lower"`` only dose below it (targets), ``"both"``
    any deviation. With ``uncertainty`` (the name of a per-voxel standard-deviation dose, Gy) each
    voxel counts ``s_v = 1 / (1 + (σ_v / sigma0_gy)²)``: an uncertain prediction pulls less.

    ``dose_gy`` is not used (0). :meth:`bind` gives the per-voxel reference and scale (in the order of
    the structure's voxels) before :meth:`value` or :meth:`gradient` is called.

    :param reference: name of the reference dose.
    :param side: ``upper``, ``lower`` or ``both``.
    :param uncertainty: name of the standard-deviation dose, or ``""`` (every voxel counts 1).
    :param sigma0_gy: σ₀ (Gy) of the uncertainty weighting, > 0.
    """

    dose_gy: float = 0.0
    reference: str = "predicted"
    side: str = "upper"
    uncertainty: str = ""
    sigma0_gy: float = 2.0

    kind: ClassVar[str] = "dose_mimicking"
    #: The optimiser must bind per-voxel references (:meth:`bind`) before use.
    needs_reference: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.reference, str) or not self.reference.strip():
            raise InvalidInputError(f"The dose_mimicking objective on '{self.structure}' needs the name of its "
                                    "reference dose (e.g. 'predicted')")
        if self.side not in MIMIC_SIDES:
            raise InvalidInputError(f"The side of the dose_mimicking objective on '{self.structure}' must be one "
                                    f"of {', '.join(MIMIC_SIDES)}, got {self.side!r}")
        sigma0 = float(self.sigma0_gy)
        if not (math.isfinite(sigma0) and sigma0 > 0):
            raise InvalidInputError(f"sigma0_gy of the dose_mimicking objective on '{self.structure}' must be "
                                    f"> 0 Gy, got {self.sigma0_gy!r}")
        self.sigma0_gy = sigma0
        self.uncertainty = str(self.uncertainty or "")
        self._ref: np.ndarray | None = None
        self._scale: np.ndarray | None = None

    def bind(self, reference_gy: np.ndarray, std_gy: np.ndarray | None = None) -> None:
        """Give the reference dose (Gy) and optionally its standard deviation (Gy) of the structure's voxels."""
        ref = np.asarray(reference_gy, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(ref)):
            raise InvalidInputError(f"The reference dose '{self.reference}' has non-finite values in "
                                    f"'{self.structure}'")
        if std_gy is None:
            scale = np.ones_like(ref)
        else:
            std = np.asarray(std_gy, dtype=np.float64).reshape(-1)
            if std.shape != ref.shape or not np.all(np.isfinite(std)) or np.any(std < 0):
                raise InvalidInputError(f"The uncertainty dose '{self.uncertainty}' must be finite doses >= 0 Gy, "
                                        f"one per voxel of '{self.structure}'")
            scale = 1.0 / (1.0 + (std / self.sigma0_gy) ** 2)
        self._ref, self._scale = ref, scale

    @property
    def voxel_reference(self) -> tuple[np.ndarray, np.ndarray]:
        """(reference Gy, scale) per voxel, as bound."""
        if self._ref is None or self._scale is None:
            raise InvalidInputError(f"The dose_mimicking objective on '{self.structure}' has no reference dose "
                                    f"'{self.reference}' bound: give it to the optimiser in reference_doses")
        return self._ref, self._scale

    def _window(self) -> tuple[float, float]:
        return {"upper": (0.0, math.inf), "lower": (-math.inf, 0.0), "both": (-math.inf, math.inf)}[self.side]

    def _deviation(self, dose_gy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = _as_doses(dose_gy, self.structure)
        ref, scale = self.voxel_reference
        if ref.shape != d.shape:
            raise InvalidInputError(f"The reference of '{self.structure}' has {ref.size} voxels, the dose {d.size}")
        lo, hi = self._window()
        dev = d - ref
        return np.where((dev >= lo) & (dev <= hi), dev, 0.0), scale

    def value(self, dose_gy: np.ndarray) -> float:
        dev, scale = self._deviation(dose_gy)
        return self.weight * float(np.sum(scale * dev * dev)) / dev.size

    def gradient(self, dose_gy: np.ndarray) -> np.ndarray:
        dev, scale = self._deviation(dose_gy)
        return 2.0 * self.weight / dev.size * scale * dev

    def kernel_term(self, n_voxels: int, dose_gy: np.ndarray | None = None) -> KernelTerm:
        lo, hi = self._window()
        return KernelTerm(CODE_VOXEL, 2.0 * self.weight / n_voxels, lo=lo, hi=hi)

    def to_dict(self) -> dict[str, Any]:
        d = {"structure": self.structure, "kind": self.kind, "reference": self.reference, "side": self.side,
             "weight": self.weight}
        if self.uncertainty:
            d.update(uncertainty=self.uncertainty, sigma0_gy=self.sigma0_gy)
        return d

    def describe(self) -> str:
        return f"{self.structure} {self.kind} '{self.reference}' ({self.side}) (w {self.weight:g})"


# ---------------------------------------------------------------------- spec reading
#: Objective classes by kind.
OBJECTIVE_KINDS: dict[str, type[Objective]] = {
    cls.kind: cls for cls in (SquaredDeviation, SquaredUnderdose, SquaredOverdose, MaxDVH, MinDVH, MeanDose, GEUD,
                              DoseMimicking)
}

#: Other spellings accepted for ``kind`` (pyRadPlan/matRad class names, normalised like the input).
_KIND_ALIASES = {
    "squared_underdosing": "squared_underdose", "squared_overdosing": "squared_overdose",
    "mean": "mean_dose", "eud": "geud", "maxdvh": "max_dvh", "mindvh": "min_dvh",
    "max_dose_volume": "max_dvh", "min_dose_volume": "min_dvh",
}


def _normalise_kind(kind: str) -> str:
    key = str(kind).strip().lower().replace(" ", "_").replace("-", "_")
    return _KIND_ALIASES.get(key, key)


def objective_from_dict(spec: dict[str, Any]) -> Objective:
    """Build an objective from a dict (e.g. one entry of a JSON list).

    Keys: ``structure`` (name), ``kind`` (see :data:`OBJECTIVE_KINDS`; pyRadPlan names such as
    ``"Squared Overdosing"`` work too), ``dose_gy`` (Gy), ``volume_percent`` (%, DVH kinds),
    ``a`` (gEUD), ``reference``/``side``/``uncertainty``/``sigma0_gy`` (dose mimicking), and
    ``weight`` (or its synonyms ``priority`` / ``penalty``; default 1).

    :raises InvalidInputError: unknown kind, missing or unknown keys, or invalid values.
    """
    if not isinstance(spec, dict):
        raise InvalidInputError(f"An objective must be a dict, got {type(spec).__name__}")
    data = dict(spec)
    kind = _normalise_kind(data.pop("kind", ""))
    cls = OBJECTIVE_KINDS.get(kind)
    if cls is None:
        raise InvalidInputError(f"Unknown objective kind {spec.get('kind')!r}; use one of {', '.join(OBJECTIVE_KINDS)}")
    for synonym in ("priority", "penalty"):
        if synonym in data:
            if "weight" in data:
                raise InvalidInputError(f"Objective {spec!r} gives both 'weight' and '{synonym}'; give one")
            data["weight"] = data.pop(synonym)
    allowed = {"structure", "dose_gy", "weight"} | ({"volume_percent"} if issubclass(cls, MaxDVH) else set()) | (
        {"a"} if cls is GEUD else set()) | (
        {"reference", "side", "uncertainty", "sigma0_gy"} if cls is DoseMimicking else set())
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidInputError(f"Objective {spec!r} has unknown key(s) {unknown}; a {kind} objective takes "
                                f"{sorted(allowed)}")
    if "structure" not in data:
        raise InvalidInputError(f"Objective {spec!r} needs a 'structure' name")
    if "dose_gy" not in data and cls not in (MeanDose, GEUD, DoseMimicking):
        raise InvalidInputError(f"Objective {spec!r} needs a 'dose_gy' (Gy)")
    try:
        return cls(**data)
    except TypeError as exc:  # wrong value types reaching float()
        raise InvalidInputError(f"Objective {spec!r} is invalid: {exc}") from exc


def objectives_from_json(text_or_list: str | Iterable[dict[str, Any]]) -> list[Objective]:
    """Objectives from a JSON string (a list of objective dicts) or an already parsed list."""
    data = json.loads(text_or_list) if isinstance(text_or_list, str) else list(text_or_list)
    if not isinstance(data, list):
        raise InvalidInputError("Objectives JSON must be a list of objective objects")
    return [objective_from_dict(d) for d in data]


def objectives_to_json(objectives: Iterable[Objective]) -> str:
    """The JSON list that :func:`objectives_from_json` reads back."""
    return json.dumps([o.to_dict() for o in objectives], indent=1)
