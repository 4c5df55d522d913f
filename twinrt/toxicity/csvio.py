"""A clinic's own cohort as two CSV files (ToxicityMonitor, issue 8; research use only).

Layout (UTF-8, comma-separated, first line = column names, any column order, a byte-order mark
from spreadsheet programs is accepted; names and cells are trimmed of surrounding spaces):

``trajectories.csv`` — one row per patient × organ × fraction:

=================  =======================================================================================
column             content
=================  =======================================================================================
``patient_id``     patient identifier (text, not empty)
``organ``          organ name as contoured (text, e.g. ``Parotid_L``, ``LeftParotid``, ``Esophagus``)
``endpoint``       toxicity endpoint: ``xerostomia``, ``esophagitis``, ``pneumonitis`` or ``cardiac``
``fraction``       fraction number (whole number ≥ 1); rows of one organ may come in any order
*any other*        one column per feature (any names, e.g. those of :mod:`twinrt.toxicity.features`:
                   ``bed_mean``, ``dosio_glcm_contrast``, ``ct_mean``, ``d_ct_mean``, ``pet_mean`` (SUVbw,
                   empty on days without a PET) …); numbers with a
                   ``.`` decimal point; an empty cell (or ``NA`` / ``NaN``) is a missing value (NaN)
=================  =======================================================================================

``outcomes.csv`` — one row per patient × organ (every trajectory needs exactly one, and vice versa):

===================  =====================================================================================
column               content
===================  =====================================================================================
``patient_id``       as in ``trajectories.csv``
``organ``            as in ``trajectories.csv``
``endpoint``         as in ``trajectories.csv`` (must agree)
``grade``            highest CTCAE v5 grade during the course, whole number 0–5 (0 = none)
``onset_fraction``   first fraction with grade ≥ 1; empty when the grade is 0, required otherwise
``n_fractions``      optional: fractions prescribed (default: the organ's last fraction number)
``planned_mean_gy``  optional: planned mean dose of the organ (Gy EQD2: LKB sets assume 2 Gy fractions)
``planned_geud_gy``  optional: planned gEUD of the organ (Gy EQD2, with the LKB set's ``n``)
``planned_ntcp``     optional: planned NTCP (0–1) if already computed
``lkb_set``          optional: name of the LKB parameter set (``twinrt.radiobiology.LKB_PARAMETERS``)
===================  =====================================================================================

Empty optional cells are left out of :attr:`OrganTrajectory.planned`. Other columns of
``outcomes.csv`` are ignored. Every problem is reported as a :class:`CohortCsvError` naming the file
and the line (line 1 is the header) — missing columns, non-numeric values, a duplicated
patient/organ/fraction, a trajectory without an outcome row or an outcome row without a trajectory,
a grade outside 0–5, an onset given with grade 0 or missing with grade ≥ 1, an unknown endpoint —
before any trajectory is returned. :func:`write_cohort_csv` writes this layout (atomically: both files
are complete or untouched); trajectory metadata are not written.

Example (two features; one parotid followed over two fractions, grade 2 from fraction 14)::

    # trajectories.csv
    patient_id,organ,endpoint,fraction,bed_mean,ct_mean
    P001,Parotid_L,xerostomia,1,1.9,31.5
    P001,Parotid_L,xerostomia,2,3.8,

    # outcomes.csv
    patient_id,organ,endpoint,grade,onset_fraction,n_fractions
    P001,Parotid_L,xerostomia,2,14,35
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from twinrt.errors import InvalidInputError, MissingInputError, reading
from twinrt.io_utils import atomic_path
from twinrt.toxicity.trajectory import ENDPOINTS, Cohort, OrganTrajectory

#: Key columns of ``trajectories.csv`` (every other column is a feature).
TRAJECTORY_KEYS = ("patient_id", "organ", "endpoint", "fraction")
#: Required and optional columns of ``outcomes.csv``.
OUTCOME_REQUIRED = ("patient_id", "organ", "endpoint", "grade", "onset_fraction")
OUTCOME_OPTIONAL = ("n_fractions", "planned_mean_gy", "planned_geud_gy", "planned_ntcp", "lkb_set")
#: Optional outcome column → key of :attr:`OrganTrajectory.planned`.
_PLANNED_KEYS = {"planned_mean_gy": "mean_gy", "planned_geud_gy": "geud_gy", "planned_ntcp": "ntcp",
                 "lkb_set": "lkb_set"}
_MISSING = {"", "na", "nan", "n/a"}


class CohortCsvError(InvalidInputError):
    """A cohort CSV file that cannot be read; ``path`` and ``line`` (1 = header) locate the problem."""

    def __init__(self, message: str, path: str | Path, line: Optional[int] = None):
        where = f"{Path(path).name}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {message}")
        self.path = Path(path)
        self.line = line


# ------------------------------------------------------------------------------------------ reading
@reading("cohort CSV file")
def _rows(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) of a CSV file, checking the columns."""
    if not path.is_file():
        raise MissingInputError(f"Cohort file {path} does not exist", path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise CohortCsvError(f"the file is empty; the first line must name the columns "
                                 f"({', '.join(required)}, ...)", path, 1) from None
        except csv.Error as exc:
            raise CohortCsvError(f"not a readable CSV file ({exc})", path, 1) from None
        if len(header) == 1 and ";" in header[0]:
            raise CohortCsvError("the columns are separated by ';': save the file with commas", path, 1)
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise CohortCsvError(f"column(s) {', '.join(dup)} appear more than once", path, 1)
        if "" in header:
            raise CohortCsvError(f"column {header.index('') + 1} has no name", path, 1)
        missing = [c for c in required if c not in header]
        if missing:
            raise CohortCsvError(f"missing column(s) {', '.join(missing)} (the header has: {', '.join(header)})",
                                 path, 1)
        rows = []
        try:
            for cells in reader:
                line = reader.line_num
                if not cells or all(not c.strip() for c in cells):
                    continue  # blank line
                if len(cells) != len(header):
                    raise CohortCsvError(f"{len(cells)} cells but the header has {len(header)} columns", path, line)
                rows.append((line, {h: c.strip() for h, c in zip(header, cells)}))
        except csv.Error as exc:
            raise CohortCsvError(f"not a readable CSV line ({exc})", path, reader.line_num) from None
    return header, rows


def _text(row: dict[str, str], col: str, path: Path, line: int) -> str:
    v = row[col]
    if not v:
        raise CohortCsvError(f"'{col}' is empty", path, line)
    return v


def _int(value: str, col: str, path: Path, line: int, lo: int, hi: Optional[int] = None) -> int:
    try:
        f = float(value)
    except ValueError:
        f = math.nan
    if not math.isfinite(f) or f != int(f) or f < lo or (hi is not None and f > hi):
        rng = f"{lo}–{hi}" if hi is not None else f"≥ {lo}"
        raise CohortCsvError(f"'{col}' must be a whole number {rng}, got '{value}'", path, line)
    return int(f)


def _float(value: str, col: str, path: Path, line: int) -> float:
    if value.lower() in _MISSING:
        return math.nan
    try:
        f = float(value)
    except ValueError:
        raise CohortCsvError(f"'{col}' is not a number: '{value}' (use a '.' decimal point; leave the cell "
                             "empty for a missing value)", path, line) from None
    if math.isinf(f):
        raise CohortCsvError(f"'{col}' is infinite ('{value}'); leave the cell empty for a missing value",
                             path, line)
    return f


def _endpoint(value: str, path: Path, line: int) -> str:
    if value not in ENDPOINTS:
        lower = value.lower()
        if lower in ENDPOINTS:
            return lower
        raise CohortCsvError(f"unknown endpoint '{value}': use one of {', '.join(ENDPOINTS)}", path, line)
    return value


def read_cohort_csv(trajectories_csv: str | Path, outcomes_csv: str | Path, description: str = "") -> Cohort:
    """Read a cohort from the two files of the layout in the module docstring.

    :return: a :class:`Cohort`, trajectories in first-appearance order in ``trajectories_csv``, each
        with its fractions in increasing order; ``metadata["source"]`` names the files.
    :raises CohortCsvError: a problem in either file (message names the file and the line).
    :raises MissingInputError: a file does not exist.
    """
    tpath, opath = Path(trajectories_csv), Path(outcomes_csv)
    header, rows = _rows(tpath, TRAJECTORY_KEYS)
    feature_names = [h for h in header if h not in TRAJECTORY_KEYS]
    if not feature_names:
        raise CohortCsvError("no feature column: add one column per feature after "
                             f"{', '.join(TRAJECTORY_KEYS)}", tpath, 1)
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for line, row in rows:
        key = (_text(row, "patient_id", tpath, line), _text(row, "organ", tpath, line))
        endpoint = _endpoint(_text(row, "endpoint", tpath, line), tpath, line)
        fraction = _int(row["fraction"], "fraction", tpath, line, 1)
        values = [_float(row[c], c, tpath, line) for c in feature_names]
        g = groups.setdefault(key, {"endpoint": endpoint, "line": line, "rows": {}})
        if g["endpoint"] != endpoint:
            raise CohortCsvError(f"endpoint '{endpoint}' for {key[0]}/{key[1]}, but line {g['line']} says "
                                 f"'{g['endpoint']}'", tpath, line)
        if fraction in g["rows"]:
            raise CohortCsvError(f"{key[0]}/{key[1]} fraction {fraction} appears twice (also on line "
                                 f"{g['rows'][fraction][0]})", tpath, line)
        g["rows"][fraction] = (line, values)

    oheader, orows = _rows(opath, OUTCOME_REQUIRED)
    outcomes: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
    for line, row in orows:
        key = (_text(row, "patient_id", opath, line), _text(row, "organ", opath, line))
        if key in outcomes:
            raise CohortCsvError(f"{key[0]}/{key[1]} has a second outcome row (first on line {outcomes[key][0]})",
                                 opath, line)
        endpoint = _endpoint(_text(row, "endpoint", opath, line), opath, line)
        grade = _int(row["grade"], "grade", opath, line, 0, 5)
        onset_text = row["onset_fraction"]
        if grade == 0 and onset_text.lower() not in _MISSING:
            raise CohortCsvError(f"onset_fraction '{onset_text}' is given with grade 0; leave it empty when no "
                                 "toxicity occurred", opath, line)
        if grade >= 1 and onset_text.lower() in _MISSING:
            raise CohortCsvError(f"grade {grade} needs an onset_fraction (the first fraction with grade ≥ 1)",
                                 opath, line)
        onset = _int(onset_text, "onset_fraction", opath, line, 1) if grade >= 1 else None
        planned: dict[str, Any] = {}
        n_fractions = None
        for col in OUTCOME_OPTIONAL:
            value = row.get(col, "")
            if value.lower() in _MISSING:
                continue
            if col == "n_fractions":
                n_fractions = _int(value, col, opath, line, 1)
            elif col == "lkb_set":
                planned["lkb_set"] = value
            else:
                planned[_PLANNED_KEYS[col]] = _float(value, col, opath, line)
        if "ntcp" in planned and not 0.0 <= planned["ntcp"] <= 1.0:
            raise CohortCsvError(f"planned_ntcp must be within 0–1, got {planned['ntcp']}", opath, line)
        if key not in groups:
            raise CohortCsvError(f"outcome for {key[0]}/{key[1]} but {tpath.name} has no row of this patient and "
                                 "organ", opath, line)
        g = groups[key]
        if g["endpoint"] != endpoint:
            raise CohortCsvError(f"endpoint '{endpoint}' for {key[0]}/{key[1]}, but {tpath.name} line {g['line']} "
                                 f"says '{g['endpoint']}'", opath, line)
        outcomes[key] = (line, {"grade": grade, "onset": onset, "n_fractions": n_fractions, "planned": planned})

    trajectories = []
    for key, g in groups.items():
        if key not in outcomes:
            raise CohortCsvError(f"{key[0]}/{key[1]} has no row in {opath.name} (every patient and organ needs "
                                 "its grade and onset)", tpath, g["line"])
        oline, o = outcomes[key]
        fractions = sorted(g["rows"])
        if o["n_fractions"] is not None and fractions[-1] > o["n_fractions"]:
            raise CohortCsvError(f"{key[0]}/{key[1]} has fraction {fractions[-1]} in {tpath.name} but "
                                 f"n_fractions {o['n_fractions']}", opath, oline)
        features = np.array([g["rows"][f][1] for f in fractions], dtype=np.float64).reshape(len(fractions), -1)
        try:
            trajectories.append(OrganTrajectory(
                key[0], key[1], g["endpoint"], np.array(fractions, dtype=int), features, list(feature_names),
                o["grade"], o["onset"], o["n_fractions"] if o["n_fractions"] is not None else int(fractions[-1]),
                dict(o["planned"]), {"source": f"{tpath.name} + {opath.name}"}))
        except InvalidInputError as exc:
            raise CohortCsvError(str(exc), opath, oline) from exc
    return Cohort(trajectories, description or f"cohort read from {tpath.name} and {opath.name}")


# ------------------------------------------------------------------------------------------ writing
def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else repr(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


def write_cohort_csv(cohort: Cohort, trajectories_csv: str | Path, outcomes_csv: str | Path) -> tuple[Path, Path]:
    """Write ``cohort`` in the layout of the module docstring (NaN → empty cell; floats written exactly).

    Both files are written atomically, and only after the whole cohort has been checked.

    :raises InvalidInputError: an unknown endpoint, a feature named like a key column, an empty
        patient id or organ, a duplicated patient/organ.
    """
    names = cohort.feature_names
    clash = [n for n in names if n in TRAJECTORY_KEYS]
    if clash:
        raise InvalidInputError(f"Feature name(s) {', '.join(clash)} clash with the key columns of trajectories.csv; "
                                "rename the features")
    seen = set()
    t_rows = [list(TRAJECTORY_KEYS) + names]
    o_rows = [list(OUTCOME_REQUIRED) + list(OUTCOME_OPTIONAL)]
    for t in cohort.trajectories:
        if t.endpoint not in ENDPOINTS:
            raise InvalidInputError(f"{t.patient_id}/{t.organ}: unknown endpoint '{t.endpoint}' (use one of "
                                    f"{', '.join(ENDPOINTS)})")
        if not str(t.patient_id).strip() or not str(t.organ).strip():
            raise InvalidInputError("Every trajectory needs a patient id and an organ name to be written")
        if str(t.patient_id) != str(t.patient_id).strip() or str(t.organ) != str(t.organ).strip():
            raise InvalidInputError(f"'{t.patient_id}'/'{t.organ}': patient ids and organ names with leading or "
                                    "trailing spaces would not read back the same; strip them")
        key = (str(t.patient_id), str(t.organ))
        if key in seen:
            raise InvalidInputError(f"{key[0]}/{key[1]} appears twice in the cohort")
        seen.add(key)
        for f, row in zip(t.fractions, t.features):
            t_rows.append([key[0], key[1], t.endpoint, str(int(f))] + [_cell(v) for v in row])
        p = t.planned
        o_rows.append([key[0], key[1], t.endpoint, str(t.grade), _cell(t.onset_fraction),
                       _cell(t.n_fractions) if t.n_fractions else "", _cell(p.get("mean_gy")),
                       _cell(p.get("geud_gy")), _cell(p.get("ntcp")), _cell(p.get("lkb_set"))])
    tpath, opath = Path(trajectories_csv), Path(outcomes_csv)
    with atomic_path(tpath) as ttmp, atomic_path(opath) as otmp:
        for path, rows in ((ttmp, t_rows), (otmp, o_rows)):
            with open(path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f, lineterminator="\n").writerows(rows)
    return tpath, opath


__all__ = ["CohortCsvError", "TRAJECTORY_KEYS", "OUTCOME_REQUIRED", "OUTCOME_OPTIONAL", "read_cohort_csv",
           "write_cohort_csv"]
