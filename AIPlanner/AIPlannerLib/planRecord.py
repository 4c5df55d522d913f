"""What AIPlanner writes about a plan, as plain Python: table rows, the parameter record, the summary.

No ``slicer`` import (STYLE.md section 3): the Logic turns these rows and dicts into MRML tables and
node attributes, and the tests check them without a scene. Row keys are table column names.

Frames: the core (:mod:`twinrt.planning`) and DICOM give the isocentre in patient LPS; the beams
table gives it in Slicer's RAS (``R = -L``, ``A = -P``, ``S = S``), the frame Slicer shows
coordinates in, and says so in its column names and in ``AIPlanner.IsocenterFrame``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional, Sequence

import numpy as np

#: Node attributes AIPlanner writes, prefixed with the module name as SlicerRT prefixes its own
#: (``DicomRtImport.*``; STYLE.md section 2). Never rename them: saved scenes hold these names.
PLAN_SETUP_ATTRIBUTE = "AIPlanner.PlanSetup"
OBJECTIVES_ATTRIBUTE = "AIPlanner.Objectives"
PRESCRIPTION_ATTRIBUTE = "AIPlanner.Prescription"
TARGET_SEGMENTS_ATTRIBUTE = "AIPlanner.TargetSegmentIDs"
PLAN_LABEL_ATTRIBUTE = "AIPlanner.PlanLabel"
ENGINE_ID_ATTRIBUTE = "AIPlanner.EngineId"
ENGINE_DESCRIPTION_ATTRIBUTE = "AIPlanner.EngineDescription"
TWINRT_VERSION_ATTRIBUTE = "AIPlanner.TwinRTVersion"
RESEARCH_USE_ATTRIBUTE = "AIPlanner.ResearchUseOnly"
RESULTS_ATTRIBUTE = "AIPlanner.Results"
#: Only on the beams table: the whole plan (beams, segments, leaf positions, MU) as JSON, and the
#: frame of its isocentre columns.
PLAN_ATTRIBUTE = "AIPlanner.Plan"
ISOCENTER_FRAME_ATTRIBUTE = "AIPlanner.IsocenterFrame"
#: ``TwinRT.Role`` values of the plan tables.
ROLE_BEAMS = "PlanBeams"
ROLE_SEGMENTS = "PlanSegments"

#: Which planning code made the plan; the engine's own description (machine data, kernels) is stored
#: beside it in ``AIPlanner.EngineDescription``.
ENGINE_ID = "twinrt.planning.workflow.plan_case"

#: Column units of the plan tables (``vtkMRMLTableNode.SetColumnUnitLabel``).
BEAM_COLUMN_UNITS = {"gantry_deg": "deg", "couch_deg": "deg", "collimator_deg": "deg", "isocenter_R_mm": "mm",
                     "isocenter_A_mm": "mm", "isocenter_S_mm": "mm", "sad_mm": "mm", "energy_mv": "MV",
                     "mu_per_fraction": "MU"}
SEGMENT_COLUMN_UNITS = {"mu_per_fraction": "MU", "x1_mm": "mm", "x2_mm": "mm", "y1_mm": "mm", "y2_mm": "mm",
                        "area_cm2": "cm2"}

#: Columns of the Widget's objectives table, in order: (objective dict key, header text).
OBJECTIVE_COLUMNS = (("structure", "Structure"), ("kind", "Kind"), ("dose_gy", "Dose (Gy)"),
                     ("volume_percent", "Volume (%)"), ("weight", "Weight"))


def lpsToRas(point: Sequence[float]) -> tuple[float, float, float]:
    """Patient LPS (DICOM, twinrt) to Slicer RAS: the first two axes change sign.

    :param point: (x, y, z) in LPS (mm).
    """
    return (-float(point[0]), -float(point[1]), float(point[2]))


def beamRows(plan) -> list[dict[str, Any]]:
    """One row per beam of a sequenced plan (``PlanBeam`` beams).

    :param plan: a :class:`twinrt.model.Plan` made by :func:`twinrt.planning.workflow.plan_case`.
    :return: rows with ``beam`` (name), angles (deg), the isocentre in RAS (mm), SAD, energy,
        number of segments and MU per fraction.
    """
    rows = []
    for beam in plan.beams:
        r, a, s = lpsToRas(beam.beam.isocenter_mm)
        rows.append({"beam": beam.name, "gantry_deg": float(beam.beam.gantry_deg),
                     "couch_deg": float(beam.beam.couch_deg), "collimator_deg": 0.0,
                     "isocenter_R_mm": r, "isocenter_A_mm": a, "isocenter_S_mm": s,
                     "sad_mm": float(beam.beam.sad_mm), "energy_mv": float(beam.beam.energy_mv),
                     "segments": float(len(beam.segments)), "mu_per_fraction": float(beam.meterset_mu)})
    return rows


def segmentRows(plan) -> list[dict[str, Any]]:
    """One row per segment: its beam, its number (from 1, delivery order), MU and a leaf summary.

    The summary is what a reviewer checks at a glance: open leaf pairs, the aperture's extent (the
    smallest X1 and largest X2 leaf position of the open pairs, the Y extent of the open pairs, all
    in mm at the isocentre) and its area. The leaf positions themselves are in ``AIPlanner.Plan``.

    :param plan: a plan with ``PlanBeam`` beams.
    """
    rows = []
    for beam in plan.beams:
        for number, segment in enumerate(beam.segments, start=1):
            left, right = np.asarray(segment.left_mm), np.asarray(segment.right_mm)
            bounds = np.asarray(segment.leaf_boundaries_mm)
            opened = right > left
            row = {"beam": beam.name, "segment": float(number), "mu_per_fraction": float(segment.mu),
                   "open_leaf_pairs": float(opened.sum())}
            if opened.any():
                pairs = np.flatnonzero(opened)
                widths = np.diff(bounds)
                row.update(x1_mm=float(left[opened].min()), x2_mm=float(right[opened].max()),
                           y1_mm=float(bounds[pairs[0]]), y2_mm=float(bounds[pairs[-1] + 1]),
                           area_cm2=float(((right - left)[opened] * widths[opened]).sum() / 100.0))
            rows.append(row)
    return rows


def parameterRecord(result, prescriptions, targetSegmentIds: Sequence[str], label: str,
                    version: str, researchUse: str) -> dict[str, str]:
    """The attributes that reproduce a plan, as text (JSON where structured).

    Re-running :func:`twinrt.planning.workflow.plan_case` on the same CT and structures with
    ``PlanSetup.from_dict(json.loads(record[PLAN_SETUP_ATTRIBUTE]))``, the objectives and the
    prescriptions gives the same plan.

    :param result: the :class:`twinrt.planning.workflow.PlanningResult`.
    :param prescriptions: the :class:`twinrt.model.Prescription` list used.
    :param targetSegmentIds: segment IDs of the targets in the segmentation.
    :param label: the plan label.
    :param version: TwinRT's version; :param researchUse: the research-use label.
    :return: attribute name -> value.
    """
    return {PLAN_SETUP_ATTRIBUTE: json.dumps(result.setup.to_dict()),
            OBJECTIVES_ATTRIBUTE: json.dumps(list(result.objectives)),
            PRESCRIPTION_ATTRIBUTE: json.dumps([{"target": p.target, "dose_gy": float(p.dose_gy),
                                                 "fractions": int(p.fractions)} for p in prescriptions]),
            TARGET_SEGMENTS_ATTRIBUTE: json.dumps(list(targetSegmentIds)),
            PLAN_LABEL_ATTRIBUTE: label,
            ENGINE_ID_ATTRIBUTE: ENGINE_ID,
            ENGINE_DESCRIPTION_ATTRIBUTE: result.dose.source,
            TWINRT_VERSION_ATTRIBUTE: version,
            RESEARCH_USE_ATTRIBUTE: researchUse,
            RESULTS_ATTRIBUTE: json.dumps(resultsSummary(result), allow_nan=False)}


def _finite(value: Any) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def resultsSummary(result) -> dict[str, Any]:
    """Figures worth keeping with a plan: sequencing loss, optimiser outcome, dij size, timings.

    :param result: the :class:`twinrt.planning.workflow.PlanningResult`.
    """
    sequencing = result.sequencing
    summary = {"beams": len(result.plan.beams), "segments": int(sequencing.get("n_segments", 0)),
               "total_mu_per_fraction": _finite(sequencing.get("total_mu", 0.0)),
               "optimizer_iterations": int(result.optimization.get("iterations", 0)),
               "optimizer_message": str(result.optimization.get("message", "")),
               "timings_s": {k: _finite(v) for k, v in result.timings_s.items()},
               "dij_nonzeros": int(result.dij_stats.get("nnz", 0))}
    if "relative_dose_error" in sequencing:
        summary["sequencing_relative_dose_error"] = _finite(sequencing["relative_dose_error"])
    return summary


def planSummaryText(result, targetRows: Sequence[dict], prescriptionGy: float) -> str:
    """One paragraph for the Widget's results label (not translated: numbers and names).

    :param result: the :class:`twinrt.planning.workflow.PlanningResult`.
    :param targetRows: the DVH metrics rows of the targets (``structure``, ``mean_gy``, ``d95_gy``).
    :param prescriptionGy: the prescribed dose (Gy).
    """
    summary = resultsSummary(result)
    parts = [f"{summary['beams']} beams, {summary['segments']} segments, "
             f"{summary['total_mu_per_fraction'] or 0.0:.0f} MU per fraction"]
    for row in targetRows:
        text = f"{row['structure']}: mean {row['mean_gy']:.1f} Gy"
        if "d95_gy" in row:
            text += f", D95 {row['d95_gy']:.1f} Gy"
        parts.append(text + f" (prescription {prescriptionGy:g} Gy)")
    if summary.get("sequencing_relative_dose_error") is not None:
        parts.append(f"sequencing dose loss {100.0 * summary['sequencing_relative_dose_error']:.1f} %")
    parts.append(f"{sum(v or 0.0 for v in summary['timings_s'].values()):.1f} s")
    return "; ".join(parts) + "."


def objectivesToCells(objectives: Sequence[dict]) -> list[list[str]]:
    """Objective dicts as table cells (:data:`OBJECTIVE_COLUMNS` order; empty text for absent keys).

    :param objectives: objective dicts (:func:`twinrt.planning.objectives.objective_from_dict` keys).
    """
    cells = []
    for objective in objectives:
        row = []
        for key, _header in OBJECTIVE_COLUMNS:
            value = objective.get(key, objective.get("priority") if key == "weight" else None)
            row.append("" if value is None else (f"{value:g}" if isinstance(value, (int, float)) else str(value)))
        cells.append(row)
    return cells


def objectivesFromCells(cells: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """The inverse of :func:`objectivesToCells`, checked: every row must make a valid objective.

    Fully empty rows are skipped (a row the user added and left blank).

    :param cells: rows of cell texts in :data:`OBJECTIVE_COLUMNS` order.
    :return: objective dicts.
    :raises twinrt.errors.InvalidInputError: naming the row (from 1) and what is wrong.
    """
    from twinrt.errors import InvalidInputError
    from twinrt.planning.objectives import objective_from_dict

    objectives = []
    for number, row in enumerate(cells, start=1):
        texts = [str(text or "").strip() for text in row]
        if not any(texts):
            continue
        objective: dict[str, Any] = {}
        for (key, header), text in zip(OBJECTIVE_COLUMNS, texts):
            if not text:
                continue
            if key in ("structure", "kind"):
                objective[key] = text
                continue
            try:
                objective[key] = float(text)
            except ValueError:
                raise InvalidInputError(f"Objective row {number}: '{header}' must be a number, got '{text}'") from None
        try:
            objective_from_dict(objective)
        except InvalidInputError as exc:
            raise InvalidInputError(f"Objective row {number}: {exc}") from exc
        objectives.append(objective)
    return objectives
