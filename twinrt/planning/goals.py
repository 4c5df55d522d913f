"""Clinical goals: what a plan must, should or may achieve, and their evaluation on a dose.

A goal is ``<structure> <metric> <comparator> <value>`` with a priority and a cited source, e.g.
``SpinalCord D0.1cc <= 45 Gy (must, QUANTEC)``. Metric names (case-insensitive):

=================  =========================================================  ========
metric             meaning                                                    unit
=================  =========================================================  ========
``Dmean``          mean dose                                                  Gy
``Dmax``           maximum voxel dose                                         Gy
``Dmin``           minimum voxel dose                                         Gy
``D<x>%``          dose received by at least x % of the volume (D95%)         Gy
``D<x>cc``         dose received by at least x cc (D0.1cc, D2cc)              Gy
``V<x>Gy``         volume receiving at least x Gy, in % of the structure      %
``V<x>Gy_cc``      the same in cc                                             cc
=================  =========================================================  ========

Dose metrics are computed with :mod:`twinrt.dvh` (exact voxel definitions). Prescription-relative
values (``"95%Rx"``) are resolved when a goal set is loaded for a prescription.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from twinrt.errors import InvalidInputError

#: Priorities in decreasing importance (names are stored in files: never rename).
PRIORITIES = ("must", "should", "nice")
COMPARATORS = ("<=", ">=")

_METRIC_RE = re.compile(
    r"^(?:(?P<simple>dmean|dmax|dmin)"
    r"|d(?P<dnum>\d+(?:\.\d+)?)(?P<dunit>%|cc)"
    r"|v(?P<vnum>\d+(?:\.\d+)?)gy(?P<vcc>_cc)?)$", re.IGNORECASE)


@dataclass(frozen=True)
class Metric:
    """A parsed metric name.

    :param kind: ``mean``, ``max``, ``min``, ``dose_at_percent``, ``dose_at_cc``,
        ``volume_percent_at`` or ``volume_cc_at``.
    :param parameter: x of D_x% / D_xcc / V_xGy (%, cc or Gy), else ``None``.
    :param unit: unit of the metric's value: ``Gy``, ``%`` or ``cc``.
    """

    kind: str
    parameter: Optional[float]
    unit: str

    @property
    def is_dose(self) -> bool:
        """True for metrics whose value is a dose (Gy)."""
        return self.unit == "Gy"


def parse_metric(name: str) -> Metric:
    """Parse ``Dmean``, ``D95%``, ``D0.1cc``, ``V20Gy``, ``V20Gy_cc`` ... (case-insensitive).

    :raises InvalidInputError: for an unknown metric, naming the accepted forms.
    """
    m = _METRIC_RE.match(str(name).strip().replace(" ", ""))
    if not m:
        raise InvalidInputError(f"Unknown metric '{name}': use Dmean, Dmax, Dmin, D<x>%, D<x>cc, V<x>Gy or V<x>Gy_cc")
    if m.group("simple"):
        return Metric({"dmean": "mean", "dmax": "max", "dmin": "min"}[m.group("simple").lower()], None, "Gy")
    if m.group("dnum") is not None:
        x = float(m.group("dnum"))
        if m.group("dunit") == "%":
            if not 0 <= x <= 100:
                raise InvalidInputError(f"Metric '{name}': the volume must be 0-100 %")
            return Metric("dose_at_percent", x, "Gy")
        return Metric("dose_at_cc", x, "Gy")
    x = float(m.group("vnum"))
    return Metric("volume_cc_at" if m.group("vcc") else "volume_percent_at", x, "cc" if m.group("vcc") else "%")


@dataclass(frozen=True)
class Goal:
    """One clinical goal.

    :param structure: structure name (matched case-insensitively).
    :param metric: metric name (see module docstring), e.g. ``"D0.1cc"``.
    :param comparator: ``"<="`` (upper limit) or ``">="`` (lower limit).
    :param value: limit in the metric's unit (Gy, % or cc).
    :param priority: ``must``, ``should`` or ``nice``.
    :param source: citation (QUANTEC, RTOG/NRG protocol, institutional).
    :param note: free text shown with the goal.
    """

    structure: str
    metric: str
    comparator: str
    value: float
    priority: str = "should"
    source: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if not str(self.structure).strip():
            raise InvalidInputError("A goal needs a structure name")
        parse_metric(self.metric)
        if self.comparator not in COMPARATORS:
            raise InvalidInputError(f"Goal on '{self.structure}': comparator must be '<=' or '>=', "
                                    f"got '{self.comparator}'")
        if self.priority not in PRIORITIES:
            raise InvalidInputError(f"Goal on '{self.structure}': priority must be one of {', '.join(PRIORITIES)}, "
                                    f"got '{self.priority}'")
        object.__setattr__(self, "value", float(self.value))

    @property
    def parsed_metric(self) -> Metric:
        """The parsed :class:`Metric`."""
        return parse_metric(self.metric)

    @property
    def unit(self) -> str:
        """Unit of :attr:`value`."""
        return self.parsed_metric.unit

    def describe(self) -> str:
        """``"SpinalCord D0.1cc <= 45 Gy (must)"``."""
        return f"{self.structure} {self.metric} {self.comparator} {self.value:g} {self.unit} ({self.priority})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the goal-file form)."""
        return {"structure": self.structure, "metric": self.metric, "comparator": self.comparator,
                "value": self.value, "unit": self.unit, "priority": self.priority, "source": self.source,
                "note": self.note}


@dataclass
class GoalResult:
    """A goal evaluated on a dose.

    :param goal: the goal.
    :param value: the metric's value on the dose (Gy, % or cc), ``None`` when the structure is absent.
    :param passed: whether the goal is met (``None`` when it cannot be evaluated).
    :param margin: distance to the limit in the goal's unit, positive when met
        (``limit - value`` for ``<=``, ``value - limit`` for ``>=``).
    :param explanation: one sentence in plain words.
    """

    goal: Goal
    value: Optional[float]
    passed: Optional[bool]
    margin: Optional[float]
    explanation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def metric_value(dvh: Any, metric: Metric) -> float:
    """Value of ``metric`` on a :class:`twinrt.dvh.DVH` (Gy, % or cc)."""
    if metric.kind == "mean":
        return float(dvh.mean_gy)
    if metric.kind == "max":
        return float(dvh.max_gy)
    if metric.kind == "min":
        return float(dvh.min_gy)
    if metric.kind == "dose_at_percent":
        return float(dvh.dose_at_volume_percent(metric.parameter))
    if metric.kind == "dose_at_cc":
        return float(dvh.dose_at_volume_cc(metric.parameter))
    if metric.kind == "volume_percent_at":
        return float(dvh.volume_at_dose_percent(metric.parameter))
    return float(dvh.volume_at_dose_cc(metric.parameter))


def evaluate_goal(goal: Goal, dvh: Any) -> GoalResult:
    """Evaluate one goal on the DVH of its structure (``None``: structure absent or empty)."""
    if dvh is None:
        return GoalResult(goal, None, None, None,
                          f"{goal.structure} is not contoured (or empty), so '{goal.describe()}' cannot be checked.")
    value = metric_value(dvh, goal.parsed_metric)
    margin = goal.value - value if goal.comparator == "<=" else value - goal.value
    passed = margin >= -1e-9
    unit = goal.unit
    if passed:
        text = f"{goal.structure} {goal.metric} is {value:.2f} {unit}, within the limit {goal.comparator} " \
               f"{goal.value:g} {unit} by {margin:.2f} {unit}."
    else:
        word = "above" if goal.comparator == "<=" else "below"
        text = f"{goal.structure} {goal.metric} is {value:.2f} {unit}, {abs(margin):.2f} {unit} {word} the " \
               f"{goal.priority} limit of {goal.value:g} {unit}."
    return GoalResult(goal, value, passed, margin, text)
