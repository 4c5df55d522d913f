"""Plan evaluation against clinical goal sets: goal values, pass/fail, margins, a score,
deliverability figures and plain-words explanations.

Goal sets are JSON files (schema: ``goalsets/goalset.schema.json``, JSON Schema 2020-12). The
shipped sets are ``head_and_neck_openkbp``, ``lung_conventional`` and ``prostate``; every goal
cites its source in the file's ``sources`` table. :func:`load_goal_set` validates a file by hand
(no jsonschema dependency) and names the file and the line of any goal it refuses.

**Required and optional structures.** A goal set lists in ``optional_structures`` the structures
that a patient may lack (in OpenKBP the esophagus is missing in most patients); their goals are
reported as *not evaluable*. Every other structure named by a goal is required:
:meth:`GoalSet.check_structures` raises, listing them, when a case has none of a required
structure's names (its own name or an alias; matching ignores case, spaces, ``_`` and ``-``).

**Score** (:func:`plan_score`). Each evaluable goal gets a normalised margin
``m = clip(margin / scale, -1, 1)`` with ``scale = max(|limit|, 1 unit)`` (so 1 Gy above a 45 Gy
limit is -0.022). The score is ``50 + 50 * sum(w_p * m) / sum(w_p) - 100 * (failed must goals)``
with weights must 3, should 2, nice 1: a plan that meets every must goal scores 0..100, and each
failed must goal costs 100, so it ranks below any plan with fewer must failures whatever its
other margins.

**Deliverability** (:func:`deliverability`): total MU per fraction, number of segments, the
modulation complexity score of McNiven et al. (Med Phys 37:505-515, 2010) and an estimated
delivery time per fraction under stated assumptions.

Research use only, not for clinical decisions.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from twinrt.dvh import structure_dvh
from twinrt.errors import InvalidInputError, MissingInputError, StructureError, reading
from twinrt.model import Case, Dose, Structure
from twinrt.planning.goals import (COMPARATORS, PRIORITIES, Goal, GoalResult, evaluate_goal,
                                   parse_metric)

#: Folder of the shipped goal sets.
GOALSETS_DIR = Path(__file__).resolve().parent / "goalsets"

#: Score weight of each priority (must goals also dominate through the failure penalty).
PRIORITY_WEIGHTS = {"must": 3.0, "should": 2.0, "nice": 1.0}

#: Penalty per failed must goal: larger than the 0..100 range of the margin part.
MUST_FAILURE_PENALTY = 100.0

_TOP_KEYS = {"$schema", "name", "version", "site", "description", "prescriptions", "aliases",
             "optional_structures", "sources", "goals"}
_GOAL_KEYS = {"structure", "metric", "comparator", "value", "unit", "priority", "source", "note"}
_REQUIRED_GOAL_KEYS = ("structure", "metric", "comparator", "value", "unit", "priority", "source")
_UNITS = ("Gy", "%", "cc")


def _norm(name: str) -> str:
    """Name key for matching: case, spaces, '_' and '-' do not count."""
    return re.sub(r"[\s_\-]+", "", str(name)).lower()


# ---------------------------------------------------------------------- goal sets
@dataclass
class GoalSet:
    """A site's clinical goals.

    :param name: goal-set name (the file stem for shipped sets).
    :param goals: the goals, in file order.
    :param site: treatment site.
    :param prescriptions: ``{"target", "dose_gy", "fractions"}`` dicts the goals were written for.
    :param aliases: structure name -> other names it may carry in a case.
    :param optional_structures: structures a patient may lack (their goals become not evaluable).
    :param sources: source key -> full citation.
    :param description: free text.
    :param path: file it was loaded from, if any.
    :param goal_lines: 1-based line of each goal in the file (same order as ``goals``).
    :param contradictions: plain-words contradictions found (none between must goals, or loading
        would have failed).
    """

    name: str
    goals: list[Goal]
    site: str = ""
    prescriptions: list[dict[str, Any]] = field(default_factory=list)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    optional_structures: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    description: str = ""
    path: Optional[Path] = None
    goal_lines: list[int] = field(default_factory=list)
    contradictions: list[str] = field(default_factory=list)

    @property
    def structures(self) -> list[str]:
        """Structures named by the goals, in first-use order."""
        return list(dict.fromkeys(g.structure for g in self.goals))

    @property
    def required_structures(self) -> list[str]:
        """Structures whose absence from a case is an error."""
        optional = {_norm(s) for s in self.optional_structures}
        return [s for s in self.structures if _norm(s) not in optional]

    def names_for(self, structure: str) -> list[str]:
        """The goal structure's own name followed by its aliases."""
        for key, names in self.aliases.items():
            if _norm(key) == _norm(structure):
                return [structure, *names]
        return [structure]

    def resolve(self, case: Case) -> dict[str, Optional[Structure]]:
        """Map each goal structure to the case's structure (``None`` when absent).

        An exact (normalised) name match wins over an alias, so a case holding both ``SpinalCord``
        and ``Cord`` uses ``SpinalCord``.
        """
        by_key = {}
        for s in case.structures:
            by_key.setdefault(_norm(s.name), s)
        out: dict[str, Optional[Structure]] = {}
        for name in self.structures:
            out[name] = next((by_key[_norm(n)] for n in self.names_for(name) if _norm(n) in by_key), None)
        return out

    def check_structures(self, case: Case) -> list[str]:
        """Check that the case holds every required structure.

        :return: the optional structures the case lacks (their goals are not evaluable).
        :raises StructureError: naming every required structure the case lacks, with the names
            that were tried.
        """
        resolved = self.resolve(case)
        required = set(self.required_structures)
        missing = [n for n in self.structures if resolved[n] is None and n in required]
        if missing:
            tried = "; ".join(f"{n} (tried {', '.join(self.names_for(n))})" for n in missing)
            have = ", ".join(s.name for s in case.structures) or "none"
            raise StructureError(
                f"Goal set '{self.name}' needs structures the case does not have: {tried}. The case has: "
                f"{have}. Rename the structures, add aliases to the goal file, or list them under "
                f"'optional_structures'", missing[0])
        return [n for n in self.structures if resolved[n] is None]


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _goal_positions(text: str) -> list[tuple[int, int]]:
    """(start, end) character span of each entry of the top-level ``goals`` array.

    Walks the top-level object with the JSON decoder so that a ``"goals"`` inside a string or a
    nested object is never mistaken for the array.
    """
    dec = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "{":
        return []
    i = _skip_ws(text, i + 1)
    while i < len(text) and text[i] != "}":
        key, i = dec.raw_decode(text, i)
        i = _skip_ws(text, i)
        i = _skip_ws(text, i + 1)  # past ':'
        if key == "goals" and text[i] == "[":
            spans = []
            j = _skip_ws(text, i + 1)
            while j < len(text) and text[j] != "]":
                _, end = dec.raw_decode(text, j)
                spans.append((j, end))
                j = _skip_ws(text, end)
                if text[j] == ",":
                    j = _skip_ws(text, j + 1)
            return spans
        _, i = dec.raw_decode(text, i)
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
    return []


def _key_line(text: str, span: tuple[int, int], key: str) -> int:
    """Line of ``"key"`` inside a goal's text span (the entry's first line if not found)."""
    pos = text.find(f'"{key}"', span[0], span[1])
    return _line_of(text, pos if pos >= 0 else span[0])


def _resolve_path(name_or_path: Union[str, Path]) -> Path:
    p = Path(name_or_path)
    if p.suffix.lower() == ".json" or p.exists() or len(p.parts) > 1:
        if not p.is_file():
            raise MissingInputError(f"Goal file {p} does not exist", p)
        return p
    shipped = GOALSETS_DIR / f"{p.name}.json"
    if not shipped.is_file():
        names = ", ".join(shipped_goal_sets())
        raise MissingInputError(f"No goal set named '{name_or_path}'; shipped sets: {names}, or give a path "
                                "to a .json goal file", shipped)
    return shipped


def shipped_goal_sets() -> list[str]:
    """Names of the goal sets shipped with TwinRT."""
    return sorted(p.stem for p in GOALSETS_DIR.glob("*.json") if not p.name.endswith(".schema.json"))


@reading("goal file (JSON)")
def load_goal_set(name_or_path: Union[str, Path]) -> GoalSet:
    """Load and validate a goal set.

    :param name_or_path: a shipped set's name (``"head_and_neck_openkbp"``) or a ``.json`` path.
    :raises MissingInputError: no such file or shipped set.
    :raises InvalidInputError: invalid JSON, a malformed entry, an unknown metric, unit, comparator,
        priority or source key (the message names the file and the goal's line), or contradictory
        must goals.
    """
    path = _resolve_path(name_or_path)
    text = path.read_text(encoding="utf-8")
    where = path.name
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{where}, line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise InvalidInputError(f"{where}, line 1: a goal file is a JSON object with 'name' and 'goals'")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise InvalidInputError(f"{where}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                                f"allowed: {', '.join(sorted(_TOP_KEYS))}")
    for key in ("name", "goals", "sources"):
        if key not in data:
            raise InvalidInputError(f"{where}: missing '{key}'")
    goals_raw = data["goals"]
    if not isinstance(goals_raw, list) or not goals_raw:
        raise InvalidInputError(f"{where}: 'goals' must be a non-empty list")
    sources = data["sources"]
    if not isinstance(sources, dict) or not all(isinstance(v, str) and v for v in sources.values()):
        raise InvalidInputError(f"{where}: 'sources' must map each source key to its citation text")
    aliases = data.get("aliases", {}) or {}
    if not isinstance(aliases, dict) or not all(isinstance(v, list) and all(isinstance(n, str) for n in v)
                                                for v in aliases.values()):
        raise InvalidInputError(f"{where}: 'aliases' must map a structure name to a list of names")
    optional = data.get("optional_structures", []) or []
    if not isinstance(optional, list) or not all(isinstance(n, str) for n in optional):
        raise InvalidInputError(f"{where}: 'optional_structures' must be a list of names")
    prescriptions = data.get("prescriptions", []) or []
    for rx in prescriptions:
        if not (isinstance(rx, dict) and isinstance(rx.get("target"), str)
                and isinstance(rx.get("dose_gy"), (int, float)) and rx["dose_gy"] > 0
                and isinstance(rx.get("fractions"), int) and rx["fractions"] >= 1):
            raise InvalidInputError(f"{where}: each prescription needs 'target', 'dose_gy' > 0 and 'fractions' >= 1")

    spans = _goal_positions(text)
    if len(spans) != len(goals_raw):  # cannot happen for valid JSON; keep line numbers honest
        spans = [(0, len(text))] * len(goals_raw)
    goals: list[Goal] = []
    lines: list[int] = []
    for entry, span in zip(goals_raw, spans):
        line = _line_of(text, span[0])
        goals.append(_parse_goal(entry, text, span, where, sources))
        lines.append(line)

    gs = GoalSet(name=str(data["name"]), goals=goals, site=str(data.get("site", "")),
                 prescriptions=[dict(rx) for rx in prescriptions],
                 aliases={k: list(v) for k, v in aliases.items()}, optional_structures=list(optional),
                 sources=dict(sources), description=str(data.get("description", "")), path=path,
                 goal_lines=lines)
    contradictions = _contradictions(gs, lines)
    gs.contradictions = [msg for msg, _ in contradictions]
    fatal = [msg for msg, both_must in contradictions if both_must]
    if fatal:
        raise InvalidInputError(f"{where}: contradictory must goals: " + " ".join(fatal))
    return gs


def _parse_goal(entry: Any, text: str, span: tuple[int, int], where: str, sources: dict[str, str]) -> Goal:
    line = _line_of(text, span[0])
    if not isinstance(entry, dict):
        raise InvalidInputError(f"{where}, line {line}: a goal must be an object with "
                                f"{', '.join(_REQUIRED_GOAL_KEYS)}")

    def fail(key: str, message: str) -> InvalidInputError:
        return InvalidInputError(f"{where}, line {_key_line(text, span, key)}: {message}")

    missing = [k for k in _REQUIRED_GOAL_KEYS if k not in entry]
    if missing:
        raise InvalidInputError(f"{where}, line {line}: goal is missing {', '.join(missing)}")
    extra = set(entry) - _GOAL_KEYS
    if extra:
        key = sorted(extra)[0]
        raise fail(key, f"unknown goal field(s) {', '.join(sorted(extra))}; allowed: {', '.join(sorted(_GOAL_KEYS))}")
    if not isinstance(entry["structure"], str) or not entry["structure"].strip():
        raise fail("structure", "'structure' must be a structure name")
    try:
        metric = parse_metric(entry["metric"])
    except InvalidInputError as exc:
        raise fail("metric", str(exc)) from None
    if entry["comparator"] not in COMPARATORS:
        raise fail("comparator", f"unknown comparator '{entry['comparator']}': use '<=' or '>='")
    if entry["priority"] not in PRIORITIES:
        raise fail("priority", f"unknown priority '{entry['priority']}': use {', '.join(PRIORITIES)}")
    value = entry["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise fail("value", f"'value' must be a number >= 0, got {value!r}")
    if entry["unit"] not in _UNITS:
        raise fail("unit", f"unknown unit '{entry['unit']}': use {', '.join(_UNITS)}")
    if entry["unit"] != metric.unit:
        raise fail("unit", f"metric {entry['metric']} is in {metric.unit}, but the goal says '{entry['unit']}'")
    if metric.unit == "%" and value > 100:
        raise fail("value", f"{entry['metric']} is a percentage of the structure; {value} % is impossible")
    if entry["source"] not in sources:
        raise fail("source", f"source '{entry['source']}' is not cited in the file's 'sources' table")
    return Goal(entry["structure"].strip(), str(entry["metric"]), entry["comparator"], float(value),
                entry["priority"], str(entry["source"]), str(entry.get("note", "")))


# ---------------------------------------------------------------------- contradictions
@dataclass(frozen=True)
class _Bound:
    """A goal as a bound on the cumulative DVH V(d) (volume in ``space``: '%' or 'cc').

    ``lower``: V(dose) >= volume; else V(dose) <= volume, where ``strict_dose`` means the bound
    holds just *above* ``dose`` (D_x <= d allows exactly x at d).
    """

    goal_index: int
    lower: bool
    dose: float
    volume: float
    space: str
    strict_dose: bool = False


def _bounds(index: int, g: Goal) -> list[_Bound]:
    m = g.parsed_metric
    low = g.comparator == ">="
    tiny = 1e-9  # "some volume": Dmax >= d means V(d) > 0
    if m.kind in ("dose_at_percent", "dose_at_cc"):
        space = "%" if m.kind == "dose_at_percent" else "cc"
        vol = max(m.parameter, tiny)
        return [_Bound(index, low, g.value, vol, space, strict_dose=not low)]
    if m.kind in ("volume_percent_at", "volume_cc_at"):
        return [_Bound(index, low, m.parameter, g.value, "%" if m.kind == "volume_percent_at" else "cc")]
    if m.kind == "max":
        # Dmax bounds the curve in both spaces (zero volume is zero in % and in cc).
        return [_Bound(index, low, g.value, tiny if low else 0.0, s, strict_dose=not low) for s in ("%", "cc")]
    if m.kind == "min":
        return [_Bound(index, low, g.value, 100.0 if low else 100.0 - tiny, "%", strict_dose=not low)]
    return []


def _phrase(b: _Bound) -> str:
    unit = " %" if b.space == "%" else " cc"
    if b.lower:
        return f"needs at least {b.volume:g}{unit} of it at {b.dose:g} Gy or more" if b.volume > 1e-6 \
            else f"needs some of it at {b.dose:g} Gy or more"
    if b.volume <= 1e-6:
        return f"allows none of it above {b.dose:g} Gy"
    return f"allows at most {b.volume:g}{unit} at {'above ' if b.strict_dose else ''}{b.dose:g} Gy" \
           f"{'' if b.strict_dose else ' or more'}"


def _contradictions(gs: GoalSet, lines: Sequence[int]) -> list[tuple[str, bool]]:
    """Pairs of goals on one structure that no dose can meet together: (message, both must)."""
    out: list[tuple[str, bool]] = []
    seen: set[tuple[int, int]] = set()

    def add(i: int, j: int, why: str) -> None:
        key = (min(i, j), max(i, j))
        if key in seen:
            return
        seen.add(key)
        a, b = gs.goals[key[0]], gs.goals[key[1]]
        at = f" (lines {lines[key[0]]} and {lines[key[1]]})" if lines else ""
        out.append((f"{a.structure}: '{a.metric} {a.comparator} {a.value:g} {a.unit}' ({a.priority}) and "
                    f"'{b.metric} {b.comparator} {b.value:g} {b.unit}' ({b.priority}) cannot both be met{at}: "
                    f"{why}.", a.priority == "must" and b.priority == "must"))

    by_structure: dict[str, list[int]] = {}
    for i, g in enumerate(gs.goals):
        by_structure.setdefault(_norm(g.structure), []).append(i)
    for idx in by_structure.values():
        bounds = [b for i in idx for b in _bounds(i, gs.goals[i])]
        for lo in (b for b in bounds if b.lower):
            for up in (b for b in bounds if not b.lower and b.space == lo.space and b.goal_index != lo.goal_index):
                # V is non-increasing: V(lo.dose) <= V(up.dose) <= up.volume when lo.dose is at or
                # beyond up.dose, so lo.volume > up.volume is impossible.
                beyond = lo.dose > up.dose if up.strict_dose else lo.dose >= up.dose
                if beyond and lo.volume > up.volume + 1e-9:
                    add(lo.goal_index, up.goal_index, f"one {_phrase(lo)}, the other {_phrase(up)}")
        # Mean dose: mean >= d * V(d) / 100 (doses are >= 0); mean <= Dmax.
        for i in idx:
            g = gs.goals[i]
            if g.parsed_metric.kind != "mean":
                continue
            for j in idx:
                h = gs.goals[j]
                if i == j:
                    continue
                if h.parsed_metric.kind == "mean" and g.comparator == "<=" and h.comparator == ">=" \
                        and h.value > g.value + 1e-9:
                    add(i, j, f"the mean dose cannot be both at most {g.value:g} Gy and at least {h.value:g} Gy")
                if g.comparator == "<=":
                    for b in _bounds(j, h):
                        if b.lower and b.space == "%" and b.dose * min(b.volume, 100.0) / 100.0 > g.value + 1e-9:
                            add(i, j, f"the other {_phrase(b)}, which alone gives a mean above {g.value:g} Gy")
                if g.comparator == ">=" and h.parsed_metric.kind == "max" and h.comparator == "<=" \
                        and h.value < g.value - 1e-9:
                    add(i, j, f"a mean of at least {g.value:g} Gy needs a maximum of at least {g.value:g} Gy")
    return out


def find_contradictions(goal_set: GoalSet) -> list[str]:
    """Plain-words messages for goals on one structure that no dose distribution can meet together.

    Checked: a lower and an upper bound on the same DVH region (same metric, D_x vs V_d, Dmax, Dmin,
    in % or in cc), mean limits against each other, against Dmax, and against coverage goals
    (``mean >= d * x / 100`` when x % receives d Gy). D_x% is not compared with cc metrics (that
    needs the structure's volume).
    """
    return [msg for msg, _ in _contradictions(goal_set, goal_set.goal_lines)]


# ---------------------------------------------------------------------- deliverability
@dataclass
class DeliveryAssumptions:
    """Assumptions of the delivery-time estimate (step-and-shoot on a C-arm linac).

    :param dose_rate_mu_per_min: dose rate when a beam does not state its own (MU/min).
    :param segment_overhead_s: per segment: MLC travel, beam hold-off and restart (s); 2 s is a
        typical step-and-shoot figure, not a measured one.
    :param beam_overhead_s: per beam: mode-up and beam-on checks (s).
    :param gantry_speed_deg_per_s: gantry rotation speed (deg/s); 6 deg/s is one turn a minute.
    """

    dose_rate_mu_per_min: float = 600.0
    segment_overhead_s: float = 2.0
    beam_overhead_s: float = 10.0
    gantry_speed_deg_per_s: float = 6.0


def _plan_beams(plan: Any) -> list[Any]:
    from twinrt.planning.plan import PlanBeam, is_plan_beam_dict

    beams = getattr(plan, "beams", plan)
    out = []
    for b in beams or []:
        if isinstance(b, PlanBeam):
            out.append(b)
        elif is_plan_beam_dict(b):
            out.append(PlanBeam.from_dict(b))
    return out


def _bank_lsv(pos: np.ndarray) -> float:
    """Leaf-sequence variability of one bank over its open pairs (McNiven 2010, eq. 1)."""
    if pos.size < 2:
        return 1.0
    span = float(pos.max() - pos.min())
    if span <= 0:
        return 1.0
    return float(np.sum(span - np.abs(np.diff(pos))) / ((pos.size - 1) * span))


def beam_mcs(beam: Any) -> Optional[float]:
    """Modulation complexity score of one step-and-shoot beam (McNiven et al., Med Phys 37:505, 2010).

    Per segment: LSV = LSV(left bank) * LSV(right bank) over the open leaf pairs, where
    ``LSV(bank) = sum(span - |x_n - x_n+1|) / ((N - 1) * span)`` with ``span`` the bank's range of
    positions; AAV = segment open area / area of the beam's maximal aperture (each pair's largest
    opening over all segments). ``MCS = sum(AAV * LSV * MU_segment) / MU_beam``: 1 for an open
    field, towards 0 for highly modulated beams.

    :param beam: a :class:`twinrt.planning.plan.PlanBeam`.
    :return: the MCS, or ``None`` for a beam without MU.
    """
    segs = [s for s in beam.segments if s.mu > 0]
    total_mu = sum(s.mu for s in segs)
    if not segs or total_mu <= 0:
        return None
    widths = np.diff(np.asarray(segs[0].leaf_boundaries_mm))
    gaps = np.array([np.asarray(s.right_mm) - np.asarray(s.left_mm) for s in segs])
    max_area = float(np.sum(gaps.max(axis=0) * widths))
    mcs = 0.0
    for s, gap in zip(segs, gaps):
        open_ = gap > 0
        if not open_.any() or max_area <= 0:
            continue
        left = np.asarray(s.left_mm)[open_]
        right = np.asarray(s.right_mm)[open_]
        lsv = _bank_lsv(left) * _bank_lsv(right)
        aav = float(np.sum(gap * widths)) / max_area
        mcs += aav * lsv * s.mu
    return mcs / total_mu


def _gantry_travel_deg(a: float, b: float) -> float:
    # C-arm gantries cannot pass through 180 deg: measure the path along 180 -> 360/0 -> 180.
    return abs(((a - 180.0) % 360.0) - ((b - 180.0) % 360.0))


def deliverability(plan: Any, assumptions: Optional[DeliveryAssumptions] = None) -> dict[str, Any]:
    """Deliverability figures of a step-and-shoot plan, per fraction.

    Delivery time = sum over beams of (MU / dose rate + segments * segment overhead + beam
    overhead) + gantry travel between consecutive beams at the gantry speed, beams in plan order.
    Couch rotations, imaging and patient set-up are not included.

    :param plan: a :class:`twinrt.model.Plan` (or a list of beams) with
        :class:`twinrt.planning.plan.PlanBeam` beams or their dicts; other beams are ignored.
    :param assumptions: delivery assumptions (defaults: 600 MU/min, 2 s per segment, 10 s per beam,
        6 deg/s).
    :return: ``total_mu`` (MU per fraction), ``n_beams``, ``n_segments``, ``mcs`` (MU-weighted plan
        MCS, ``None`` without MU), ``beams`` (per beam: name, gantry_deg, mu, segments, mcs),
        ``delivery_time_s`` and ``assumptions``.
    """
    a = assumptions or DeliveryAssumptions()
    beams = _plan_beams(plan)
    rows = []
    time_s = 0.0
    previous = None
    for b in beams:
        mu = b.meterset_mu
        rate = b.dose_rate_mu_per_min or a.dose_rate_mu_per_min
        n_seg = sum(1 for s in b.segments if s.mu > 0)
        time_s += 60.0 * mu / rate + n_seg * a.segment_overhead_s + a.beam_overhead_s
        if previous is not None:
            time_s += _gantry_travel_deg(previous, b.beam.gantry_deg) / a.gantry_speed_deg_per_s
        previous = b.beam.gantry_deg
        rows.append({"name": b.name, "gantry_deg": b.beam.gantry_deg, "mu": mu, "segments": n_seg,
                     "mcs": beam_mcs(b)})
    total_mu = float(sum(r["mu"] for r in rows))
    weighted = [(r["mcs"], r["mu"]) for r in rows if r["mcs"] is not None]
    mcs = sum(m * w for m, w in weighted) / sum(w for _, w in weighted) if weighted else None
    return {"total_mu": total_mu, "n_beams": len(rows), "n_segments": int(sum(r["segments"] for r in rows)),
            "mcs": mcs, "beams": rows, "delivery_time_s": time_s,
            "assumptions": {"dose_rate_mu_per_min": a.dose_rate_mu_per_min,
                            "segment_overhead_s": a.segment_overhead_s, "beam_overhead_s": a.beam_overhead_s,
                            "gantry_speed_deg_per_s": a.gantry_speed_deg_per_s,
                            "not_included": "couch rotation, imaging, patient set-up"}}


# ---------------------------------------------------------------------- evaluation
_FRIENDLY = {"spinalcord": "the spinal cord", "brainstem": "the brainstem", "rightparotid": "the right parotid",
             "leftparotid": "the left parotid", "esophagus": "the esophagus", "larynx": "the larynx",
             "mandible": "the mandible", "lungs": "the lungs", "heart": "the heart", "rectum": "the rectum",
             "bladder": "the bladder", "brachialplexus": "the brachial plexus", "penilebulb": "the penile bulb",
             "femoralheadl": "the left femoral head", "femoralheadr": "the right femoral head"}


def _label(structure: str) -> str:
    return _FRIENDLY.get(_norm(structure), structure)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def explain(result: GoalResult) -> str:
    """One plain-words sentence for a goal result, e.g. "The spinal cord's hottest 0.1 cc receives
    47.2 Gy, 2.2 Gy above its must limit of 45 Gy (RTOG 0225)."."""
    g = result.goal
    who = _label(g.structure)
    if result.value is None:
        return f"{_cap(who)} is not contoured in this case, so '{g.describe()}' could not be checked."
    m = g.parsed_metric
    v = result.value
    if m.kind == "mean":
        what = f"The mean dose to {who} is {v:.1f} Gy"
    elif m.kind == "max":
        what = f"The maximum dose in {who} is {v:.1f} Gy"
    elif m.kind == "min":
        what = f"The minimum dose in {who} is {v:.1f} Gy"
    elif m.kind == "dose_at_cc":
        what = f"{_cap(who)}'s hottest {m.parameter:g} cc receives {v:.1f} Gy"
    elif m.kind == "dose_at_percent":
        what = f"{m.parameter:g} % of {who} receives at least {v:.1f} Gy (D{m.parameter:g}%)"
    elif m.kind == "volume_percent_at":
        what = f"{v:.1f} % of {who} receives {m.parameter:g} Gy or more"
    else:
        what = f"{v:.1f} cc of {who} receives {m.parameter:g} Gy or more"
    src = f" ({g.source})" if g.source else ""
    unit = "" if g.unit == "%" else f" {g.unit}"
    if result.passed:
        return f"{what}, within its {g.priority} limit of {g.value:g}{' %' if g.unit == '%' else unit}{src} " \
               f"by {abs(result.margin):.1f}{' %' if g.unit == '%' else unit}."
    word = "above" if g.comparator == "<=" else "below"
    pct = " %" if g.unit == "%" else unit
    return f"{what}, {abs(result.margin):.1f}{pct} {word} its {g.priority} limit of {g.value:g}{pct}{src}."


def normalised_margin(result: GoalResult) -> Optional[float]:
    """Margin divided by ``max(|limit|, 1 unit)``, clipped to -1..1 (``None`` if not evaluable)."""
    if result.margin is None:
        return None
    scale = max(abs(result.goal.value), 1.0)
    return float(np.clip(result.margin / scale, -1.0, 1.0))


def plan_score(results: Iterable[GoalResult]) -> float:
    """Plan score (see the module docstring): 0..100 when every must goal is met, minus 100 per
    failed must goal; goals that are not evaluable do not count."""
    results = [r for r in results if r.passed is not None]
    if not results:
        return float("nan")
    w = np.array([PRIORITY_WEIGHTS[r.goal.priority] for r in results])
    m = np.array([normalised_margin(r) for r in results])
    failed_must = sum(1 for r in results if r.goal.priority == "must" and not r.passed)
    return float(50.0 + 50.0 * np.sum(w * m) / np.sum(w) - MUST_FAILURE_PENALTY * failed_must)


@dataclass
class PlanEvaluation:
    """A plan (dose) evaluated against a goal set.

    :param goal_set: name of the goal set.
    :param results: one :class:`GoalResult` per goal, in goal-set order (``passed`` is ``None``
        when the structure is absent); ``extra["case_structure"]`` names the structure used.
    :param score: :func:`plan_score`.
    :param must_passed: every evaluable must goal is met.
    :param explanations: one plain-words sentence per failed goal (must first).
    :param not_evaluable: goals whose structure the case lacks (descriptions).
    :param deliverability: :func:`deliverability` figures, or ``None`` without a plan.
    :param warnings: e.g. a prescription that differs from the goal set's.
    :param dose_name: name of the evaluated dose.
    """

    goal_set: str
    results: list[GoalResult]
    score: float
    must_passed: bool
    explanations: list[str]
    not_evaluable: list[str] = field(default_factory=list)
    deliverability: Optional[dict[str, Any]] = None
    warnings: list[str] = field(default_factory=list)
    dose_name: str = ""

    @property
    def failed(self) -> list[GoalResult]:
        """Goals evaluated and not met."""
        return [r for r in self.results if r.passed is False]

    def table(self) -> str:
        """A fixed-width text table of the goals (for logs and reports)."""
        head = f"{'structure':<14} {'goal':<22} {'prio':<6} {'value':>9} {'margin':>8}  result"
        rows = [head, "-" * len(head)]
        for r in self.results:
            g = r.goal
            goal = f"{g.metric} {g.comparator} {g.value:g} {g.unit}"
            if r.passed is None:
                rows.append(f"{g.structure:<14} {goal:<22} {g.priority:<6} {'-':>9} {'-':>8}  not evaluable")
            else:
                rows.append(f"{g.structure:<14} {goal:<22} {g.priority:<6} {r.value:>9.2f} {r.margin:>8.2f}  "
                            f"{'pass' if r.passed else 'FAIL'}")
        rows.append(f"score {self.score:.1f}; must goals {'all met' if self.must_passed else 'NOT all met'}")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for reports."""
        return {"goal_set": self.goal_set, "dose": self.dose_name, "score": self.score,
                "must_passed": self.must_passed,
                "goals": [{**r.goal.to_dict(), "case_structure": r.extra.get("case_structure"),
                           "achieved": r.value, "passed": r.passed, "margin": r.margin,
                           "normalised_margin": normalised_margin(r), "explanation": explain(r)}
                          for r in self.results],
                "explanations": list(self.explanations), "not_evaluable": list(self.not_evaluable),
                "deliverability": self.deliverability, "warnings": list(self.warnings),
                "research_use_only": True}


def _prescription_warnings(case: Case, goal_set: GoalSet, plan: Any) -> list[str]:
    rx_case = list(getattr(plan, "prescriptions", None) or case.prescriptions)
    out = []
    for rx in goal_set.prescriptions:
        match = [p for p in rx_case if _norm(p.target) in {_norm(n) for n in goal_set.names_for(rx["target"])}]
        for p in match:
            if abs(p.dose_gy - rx["dose_gy"]) > 1e-6 or p.fractions != rx["fractions"]:
                out.append(f"Goal set '{goal_set.name}' is written for {rx['target']} {rx['dose_gy']:g} Gy in "
                           f"{rx['fractions']} fractions, but the prescription is {p.dose_gy:g} Gy in "
                           f"{p.fractions} fractions; its limits may not apply.")
    return out


def evaluate_plan(case: Case, dose: Dose, goal_set: Union[GoalSet, str, Path], plan: Any = None,
                  assumptions: Optional[DeliveryAssumptions] = None) -> PlanEvaluation:
    """Evaluate a dose (and optionally its plan's deliverability) against a goal set.

    :param case: the case with the structures.
    :param dose: the plan's dose (Gy, whole treatment).
    :param goal_set: a :class:`GoalSet`, a shipped set's name or a goal-file path.
    :param plan: optional :class:`twinrt.model.Plan` with :class:`PlanBeam` beams, for deliverability.
    :param assumptions: delivery-time assumptions.
    :raises StructureError: the case lacks a required structure (see :meth:`GoalSet.check_structures`).
    """
    gs = goal_set if isinstance(goal_set, GoalSet) else load_goal_set(goal_set)
    gs.check_structures(case)
    resolved = gs.resolve(case)
    dvhs = {}
    for name, struct in resolved.items():
        if struct is None:
            continue
        try:
            # One DVH per structure, however many goals use it.
            dvhs[name] = structure_dvh(dose, struct)
        except StructureError:
            dvhs[name] = None  # empty on this grid: not evaluable, like an absent structure
    results = []
    for g in gs.goals:
        r = evaluate_goal(g, dvhs.get(g.structure))
        r.extra["case_structure"] = resolved[g.structure].name if resolved[g.structure] is not None else None
        r.explanation = explain(r)
        results.append(r)
    order = {p: i for i, p in enumerate(PRIORITIES)}
    failed = sorted((r for r in results if r.passed is False), key=lambda r: order[r.goal.priority])
    must_passed = not any(r.goal.priority == "must" for r in failed)
    warnings = _prescription_warnings(case, gs, plan)
    unevaluable_must = [r for r in results if r.passed is None and r.goal.priority == "must"]
    if unevaluable_must:
        warnings.append("Must goals not evaluable (structure absent): "
                        + "; ".join(r.goal.describe() for r in unevaluable_must))
    return PlanEvaluation(goal_set=gs.name, results=results, score=plan_score(results), must_passed=must_passed,
                          explanations=[r.explanation for r in failed],
                          not_evaluable=[r.goal.describe() for r in results if r.passed is None],
                          deliverability=deliverability(plan, assumptions) if plan is not None else None,
                          warnings=warnings, dose_name=getattr(dose, "name", ""))
