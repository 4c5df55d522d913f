"""ToxicityMonitor's outputs in the MRML scene: the risk table, the risk-over-fractions table and its chart.

Everything here writes nodes or builds rows; nothing computes a risk. The risks come from
:class:`twinrt.toxicity.model.ToxicityModel`, the features from :func:`twinrt.toxicity.features.trajectories_from_twin`,
and the node <-> table conversion and provenance tags from :mod:`TwinRTCommon.mrmlio`.

Outputs are found again by their ``TwinRT.Role`` (and ``TwinRT.CreatedBy`` = ToxicityMonitor) inside the
patient's study, the same way DigitalTwin finds its own (:mod:`DigitalTwinLib.twinScene`), so a re-run
replaces them instead of adding a second set.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import slicer

from TwinRTCommon import mrmlio

#: ``TwinRT.CreatedBy`` of every node ToxicityMonitor writes.
CREATED_BY = "ToxicityMonitor"
#: Provenance attributes, prefixed with the module name (STYLE.md section 2).
MODEL_ID_ATTRIBUTE = "ToxicityMonitor.ModelId"
WEIGHTS_SHA256_ATTRIBUTE = "ToxicityMonitor.WeightsSha256"
MODEL_VERSION_ATTRIBUTE = "ToxicityMonitor.ModelVersion"
TRAINING_DATA_ATTRIBUTE = "ToxicityMonitor.TrainingData"
CITATION_ATTRIBUTE = "ToxicityMonitor.Citation"
LKB_SETS_ATTRIBUTE = "ToxicityMonitor.LKBParameterSets"
THRESHOLD_ATTRIBUTE = "ToxicityMonitor.Threshold"
FLAGGED_ATTRIBUTE = "ToxicityMonitor.FlaggedOrgans"
FRACTIONS_ATTRIBUTE = "ToxicityMonitor.Fractions"
PATIENT_ID_ATTRIBUTE = "ToxicityMonitor.PatientID"

#: What the risk model and the baseline are, for the nodes (the model manifest has the details).
CITATION = ("Risk: GRU autoencoder + logistic regression on per-fraction dose-volume, dosiomics and radiomics "
            "features, after COMPASS (arXiv 2602.18496). Baseline: LKB NTCP of the planned dose (EQD2) with "
            "the endpoint's published parameter set.")

# Values of TwinRT.Role; stored in scenes, so never rename them.
ROLE_RISK_TABLE = "ToxicityRisk"
ROLE_TREND_TABLE = "ToxicityRiskOverFractions"
ROLE_CHART = "ToxicityRiskChart"
ROLE_SERIES = "ToxicityRiskSeries"
OUTPUT_ROLES = (ROLE_RISK_TABLE, ROLE_TREND_TABLE, ROLE_CHART, ROLE_SERIES)

#: Colour of the threshold line (RGB 0..1).
THRESHOLD_COLOR = (0.45, 0.45, 0.45)


def findOutputs(scene, studyItem: int, role: str, className: str = "vtkMRMLNode") -> list:
    """The nodes ToxicityMonitor wrote with ``role`` in ``studyItem`` (oldest first; :func:`TwinRTCommon.mrmlio.findOutputs`)."""
    return mrmlio.findOutputs(scene, studyItem, role, CREATED_BY, className)


def allOutputs(scene, studyItem: int) -> list:
    """Every ToxicityMonitor output of the study (what a new run replaces)."""
    return [node for role in OUTPUT_ROLES for node in findOutputs(scene, studyItem, role)]


def tagOutput(node, role: str, provenance: dict[str, str]) -> None:
    """Research-use, provenance and model attributes of a ToxicityMonitor output.

    :param node: the new node; :param role: its ``TwinRT.Role``.
    :param provenance: attribute name -> value (model id, weights sha256, threshold, ...), the same on
        every node of one run.
    """
    mrmlio.tagNode(node, role, provenance.get(mrmlio.SOURCE_ATTRIBUTE, ""), CREATED_BY)
    for name, value in provenance.items():
        if name != mrmlio.SOURCE_ATTRIBUTE:
            node.SetAttribute(name, value)


# ------------------------------------------------------------------------------------------- units
def featureUnit(name: str) -> str:
    """Unit label of a feature of :func:`twinrt.toxicity.features.feature_names` (``d_`` changes included).

    ``bed_`` dose-volume points and ``dosio_`` intensities are BED in Gy, ``ct_`` intensities HU, volumes
    cc, V-points %, energies unit squared, entropies bits; shape and texture ratios have no unit.
    """
    base = name[2:] if name.startswith("d_") else name
    group, _, feature = base.partition("_")
    if feature.endswith("volume_cc"):
        return "cc"
    if feature.startswith("glcm_") or feature in ("skewness", "kurtosis", "uniformity"):
        return ""
    if feature == "entropy":
        return "bits"
    intensity = {"bed": "Gy", "dosio": "Gy", "ct": "HU"}.get(group, "")
    if group == "bed" and feature.startswith("v"):
        return "%"
    if feature == "energy":
        return f"{intensity}²" if intensity else ""
    return intensity


# ------------------------------------------------------------------------------------------- rows
def riskRows(trajectories: list, risks: list, ntcps: list, threshold: float, dates: dict[int, str]) -> list[dict]:
    """One row per organ and fraction: organ, endpoint, fraction, date, risk, ntcp_lkb, above_threshold, features.

    :param trajectories: the :class:`~twinrt.toxicity.trajectory.OrganTrajectory` of each organ.
    :param risks: (T,) risk after each fraction, per trajectory; :param ntcps: LKB NTCP per trajectory.
    :param threshold: the risk threshold (a risk at or above it is flagged, as in :mod:`twinrt.toxicity.model`).
    :param dates: fraction number -> date (YYYY-MM-DD).
    """
    rows = []
    for trajectory, risk, ntcp in zip(trajectories, risks, ntcps):
        for index, fraction in enumerate(trajectory.fractions):
            row = {"organ": trajectory.organ, "endpoint": trajectory.endpoint, "fraction": int(fraction),
                   "date": dates.get(int(fraction), ""), "risk": float(risk[index]), "ntcp_lkb": float(ntcp),
                   "above_threshold": int(float(risk[index]) >= threshold)}
            # NaN features (no contour on the day's image) stay NaN: fillTable writes None/NaN as NaN.
            features = trajectory.features[index]
            row.update({name: float(value) for name, value in zip(trajectory.feature_names, features)})
            rows.append(row)
    return rows


def trendRows(trajectories: list, risks: list, ntcps: list, threshold: float) -> list[dict]:
    """One row per fraction: ``risk_<organ>`` and ``ntcp_lkb_<organ>`` of every organ, and the threshold.

    A plot series draws every row of its table, so the chart needs one row per fraction (not per organ
    and fraction, which would join the end of one organ's curve to the start of the next).
    """
    fractions = sorted({int(f) for trajectory in trajectories for f in trajectory.fractions})
    rows = []
    for fraction in fractions:
        row: dict[str, Any] = {"fraction": fraction}
        for trajectory, risk, ntcp in zip(trajectories, risks, ntcps):
            where = [i for i, f in enumerate(trajectory.fractions) if int(f) == fraction]
            row[f"risk_{trajectory.organ}"] = float(risk[where[0]]) if where else None
            row[f"ntcp_lkb_{trajectory.organ}"] = float(ntcp)
        row["threshold"] = float(threshold)
        rows.append(row)
    return rows


def flags(trajectories: list, risks: list, threshold: float) -> list[dict]:
    """The organs whose risk reached ``threshold`` (risk >= threshold) after some fraction.

    :return: one dict per flagged organ, in organ order: ``organ``, ``endpoint``, ``firstFraction`` (the
        first fraction at or above the threshold), ``riskAtFirst``, ``latestFraction`` and ``latestRisk``.
    """
    out = []
    for trajectory, risk in zip(trajectories, risks):
        above = [i for i, value in enumerate(risk) if float(value) >= threshold]
        if not above:
            continue
        out.append({"organ": trajectory.organ, "endpoint": trajectory.endpoint,
                    "firstFraction": int(trajectory.fractions[above[0]]), "riskAtFirst": float(risk[above[0]]),
                    "latestFraction": int(trajectory.fractions[-1]), "latestRisk": float(risk[-1])})
    return out


# ------------------------------------------------------------------------------------------- nodes
def addTable(scene, studyItem: int, role: str, name: str, rows: list[dict], provenance: dict[str, str],
             units: Optional[dict] = None):
    """A new table of ``role`` under the study, filled with ``rows`` (:func:`TwinRTCommon.mrmlio.fillTable`).

    :param units: column -> unit label, for columns whose name carries no unit suffix.
    """
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    tagOutput(table, role, provenance)
    mrmlio.placeInStudy(table, studyItem)
    mrmlio.fillTable(table, rows)
    for column, unit in (units or {}).items():
        if table.GetTable().GetColumnByName(column) is not None:
            table.SetColumnUnitLabel(column, unit)
    return table


def addChart(scene, studyItem: int, name: str, title: str, provenance: dict[str, str]):
    """A new risk chart under the study: fraction on x, risk 0..1 on y."""
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    tagOutput(chart, ROLE_CHART, provenance)
    mrmlio.placeInStudy(chart, studyItem)
    chart.SetTitle(title)
    chart.SetXAxisTitle("Fraction")
    chart.SetYAxisTitle("Risk / NTCP (0-1)")
    # Risks and NTCPs are probabilities: a fixed 0..1 axis keeps runs and patients comparable.
    chart.SetYAxisRangeAuto(False)
    chart.SetYAxisRange(0.0, 1.0)
    return chart


def addSeries(chart, table, name: str, yColumn: str, color: tuple, studyItem: int, provenance: dict[str, str],
              dashed: bool = False):
    """A line series of ``yColumn`` over ``fraction`` of ``table`` on ``chart``.

    :param color: RGB 0..1; :param dashed: the LKB baselines and the threshold (lines that are not the model).
    """
    series = chart.GetScene().AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
    tagOutput(series, ROLE_SERIES, provenance)
    mrmlio.placeInStudy(series, studyItem)
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetXColumnName("fraction")
    series.SetYColumnName(yColumn)
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetColor(*color)
    series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash if dashed
                        else slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
    series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone if dashed
                          else slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
    chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return series


def organColor(structure) -> tuple:
    """RGB 0..1 of a planning structure (its 0..255 colour), so the chart matches the segments."""
    color = getattr(structure, "color", None) or (0, 114, 189)
    return tuple(max(0.0, min(1.0, float(c) / 255.0)) for c in color[:3])


def flagsAttribute(flagged: list[dict]) -> str:
    """The table's ``ToxicityMonitor.FlaggedOrgans``: JSON list of {organ, endpoint, firstFraction, ...}."""
    return json.dumps([{key: (None if isinstance(value, float) and math.isnan(value) else value)
                        for key, value in flag.items()} for flag in flagged])
