"""The digital twin's outputs in the MRML scene: fraction sequences, their browser, tables and charts.

Everything here writes nodes; nothing computes. The twin itself is :class:`twinrt.twin.twin.DigitalTwin`
and the node <-> array conversion, tables and dose volumes are :mod:`TwinRTCommon.mrmlio`'s; this file
adds what only DigitalTwin needs: sequence nodes indexed by fraction number (index name ``fraction``,
STYLE.md section 5), a sequence browser that keeps them in step, and the provenance every output carries
(model name, the response prior's citations, research use only).

Outputs are found again by their ``TwinRT.Role`` inside the patient's study, so a new Logic (after a
module reload, or another module such as ToxicityMonitor) finds the nodes an earlier one wrote.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

import slicer

from TwinRTCommon import mrmlio

#: ``TwinRT.CreatedBy`` of every node DigitalTwin writes.
CREATED_BY = "DigitalTwin"
#: Model name in :data:`MODEL_ATTRIBUTE`.
MODEL_NAME = "TwinRT digital twin"
#: Provenance attributes, prefixed with the module name (STYLE.md section 2).
MODEL_ATTRIBUTE = "DigitalTwin.Model"
RESPONSE_PRIOR_ATTRIBUTE = "DigitalTwin.ResponsePrior"
PATIENT_ID_ATTRIBUTE = "DigitalTwin.PatientID"
FRACTIONS_ATTRIBUTE = "DigitalTwin.Fractions"
GOAL_ATTRIBUTE = "DigitalTwin.Goal"
UNIT_ATTRIBUTE = "DigitalTwin.Unit"
#: A fraction image's frame of reference, when the image node was not loaded with one in its study.
FRAME_OF_REFERENCE_ATTRIBUTE = "DigitalTwin.FrameOfReferenceUID"

#: Index of every sequence: the fraction number, 1-based, unitless (STYLE.md section 5).
FRACTION_INDEX_NAME = "fraction"

# Values of TwinRT.Role; stored in scenes, so never rename them.
ROLE_IMAGES = "TwinFractionImages"
ROLE_DOSES = "TwinFractionDoses"
ROLE_BED = "TwinAccumulatedBED"
ROLE_BROWSER = "TwinCourseBrowser"
ROLE_ACCUMULATED_DOSE = "TwinAccumulatedDose"
ROLE_GOALS_TABLE = "TwinPlannedVsDelivered"
ROLE_GOAL_TREND_TABLE = "TwinGoalOverFractions"
ROLE_GOAL_CHART = "TwinGoalChart"
ROLE_TUMOUR_OBSERVED_TABLE = "TwinTumourObserved"
ROLE_TUMOUR_PREDICTED_TABLE = "TwinTumourPredicted"
ROLE_TUMOUR_CHART = "TwinTumourChart"
ROLE_REGIMENS_TABLE = "TwinRegimens"
ROLE_SERIES = "TwinPlotSeries"

#: Sequence role -> (node name after the patient ID, is it a dose).
SEQUENCES = {
    ROLE_IMAGES: ("Fraction images", False),
    ROLE_DOSES: ("Fraction doses (planning anatomy)", True),
    ROLE_BED: ("Accumulated BED", True),
}

#: Every output role; :func:`removeOutputs` clears these before a new twin writes its own.
OUTPUT_ROLES = (ROLE_IMAGES, ROLE_DOSES, ROLE_BED, ROLE_BROWSER, ROLE_ACCUMULATED_DOSE, ROLE_GOALS_TABLE,
                ROLE_GOAL_TREND_TABLE, ROLE_GOAL_CHART, ROLE_TUMOUR_OBSERVED_TABLE, ROLE_TUMOUR_PREDICTED_TABLE,
                ROLE_TUMOUR_CHART, ROLE_REGIMENS_TABLE, ROLE_SERIES)


def responsePriorCitation() -> str:
    """The citations of the tumour-response population prior, as one line."""
    from twinrt.twin.response import POPULATION_PRIOR

    return " | ".join(POPULATION_PRIOR.citations)


def tagOutput(node, role: str, patientId: str, source: str = "") -> None:
    """Research-use, provenance and model attributes of a DigitalTwin output.

    :param node: the new node; :param role: its ``TwinRT.Role``; :param patientId: the twin's patient.
    :param source: ``TwinRT.Source`` text (where the course came from).
    """
    mrmlio.tagNode(node, role, source, CREATED_BY)
    node.SetAttribute(MODEL_ATTRIBUTE, MODEL_NAME)
    node.SetAttribute(RESPONSE_PRIOR_ATTRIBUTE, responsePriorCitation())
    node.SetAttribute(PATIENT_ID_ATTRIBUTE, patientId)


def findOutputs(scene, studyItem: int, role: str, className: str = "vtkMRMLNode") -> list:
    """The nodes DigitalTwin wrote with ``role`` in ``studyItem`` (oldest first; :func:`TwinRTCommon.mrmlio.findOutputs`)."""
    return mrmlio.findOutputs(scene, studyItem, role, CREATED_BY, className)


def findOutput(scene, studyItem: int, role: str, className: str = "vtkMRMLNode"):
    """The newest node of :func:`findOutputs`, or None."""
    nodes = findOutputs(scene, studyItem, role, className)
    return nodes[-1] if nodes else None


def removeOutputs(scene, studyItem: int) -> None:
    """Remove every DigitalTwin output of the study (before a new twin of the patient writes its own)."""
    for role in OUTPUT_ROLES:
        for node in findOutputs(scene, studyItem, role):
            # A browser's proxies go with it: they carry the sequences' roles but belong to the browser.
            scene.RemoveNode(node)


# ------------------------------------------------------------------------------------------- sequences
def addSequence(scene, studyItem: int, role: str, patientId: str, source: str = ""):
    """A new, empty sequence indexed by fraction number, under the study."""
    name, _isDose = SEQUENCES[role]
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{patientId} {name}")
    sequence.SetIndexName(FRACTION_INDEX_NAME)
    sequence.SetIndexUnit("")
    sequence.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
    tagOutput(sequence, role, patientId, source)
    mrmlio.placeInStudy(sequence, studyItem)
    return sequence


def sequenceIndexValues(sequence) -> list[int]:
    """The fraction numbers a sequence holds, in its order."""
    return [int(float(sequence.GetNthIndexValue(i))) for i in range(sequence.GetNumberOfDataNodes())]


def appendVolume(sequence, number: int, array: np.ndarray, grid, patientId: str, doseName: str = "",
                 doseType: str = "PHYSICAL", source: str = "") -> None:
    """Add fraction ``number``'s volume to ``sequence``.

    The voxels go through a scratch node written by :mod:`TwinRTCommon.mrmlio` (a dose volume when
    ``doseName`` is given, otherwise a HU map), which the sequence copies; the scratch node is removed.

    :param array: (k, j, i) voxels on ``grid``; :param doseName: the dose name of a dose item (Gy).
    """
    from twinrt.model import Dose

    scene = sequence.GetScene()
    role = sequence.GetAttribute(mrmlio.ROLE_ATTRIBUTE)
    name = f"{sequence.GetName()} {number}"
    if doseName:
        dose = Dose(np.asarray(array, np.float32), grid, doseName, dose_type=doseType, summation="MULTI_FRACTION",
                    source=source)
        # Study 0: the scratch node is not placed; the sequence item keeps the dose attributes.
        scratch = mrmlio.addDoseVolume(scene, dose, 0, name, doseName, source, CREATED_BY)
    else:
        scratch = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        mrmlio.fillScalarMap(scratch, array, grid, role, source, CREATED_BY, UNIT_ATTRIBUTE, "HU")
    tagOutput(scratch, role, patientId, source)
    try:
        sequence.SetDataNodeAtValue(scratch, str(int(number)))
    finally:
        scene.RemoveNode(scratch)


def addBrowser(scene, studyItem: int, sequences: list, patientId: str, source: str = ""):
    """A browser that synchronises ``sequences`` (the first is the master) through proxy volumes."""
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{patientId} Treatment course")
    browser.SetAndObserveMasterSequenceNodeID(sequences[0].GetID())
    for sequence in sequences[1:]:
        browser.AddSynchronizedSequenceNodeID(sequence.GetID())
    # Browsing only: edits of a proxy must never write back into the recorded course.
    for sequence in sequences:
        browser.SetSaveChanges(sequence, False)
    tagOutput(browser, ROLE_BROWSER, patientId, source)
    mrmlio.placeInStudy(browser, studyItem)
    return browser


def showLastFraction(browser, sequences: list, studyItem: int, patientId: str) -> dict:
    """Select the last fraction in the browser, create or refresh the proxies of ``sequences`` (those it
    synchronises); return sequence role -> proxy.

    Proxies are tagged like the items (a dose proxy is a SlicerRT dose volume, shown with the dose
    colour table) and placed in the study, so the Data module shows them with the patient.
    """
    master = browser.GetMasterSequenceNode()
    if master is None or master.GetNumberOfDataNodes() == 0:
        return {}
    browser.SetSelectedItemNumber(master.GetNumberOfDataNodes() - 1)
    slicer.modules.sequences.logic().UpdateProxyNodesFromSequences(browser)
    proxies = {}
    for sequence in sequences:
        proxy = browser.GetProxyNode(sequence)
        if proxy is None:
            continue
        role = sequence.GetAttribute(mrmlio.ROLE_ATTRIBUTE)
        tagOutput(proxy, role, patientId, sequence.GetAttribute(mrmlio.SOURCE_ATTRIBUTE) or "")
        mrmlio.placeInStudy(proxy, studyItem)
        if SEQUENCES.get(role, ("", False))[1] and proxy.GetDisplayNode() is not None:
            colorTable = doseColorTable(proxy.GetScene())
            if colorTable is not None:
                proxy.GetDisplayNode().SetAndObserveColorNodeID(colorTable.GetID())
        proxies[role] = proxy
    return proxies


def doseColorTable(scene):
    """The scene's ``Dose_ColorTable`` (made by :func:`TwinRTCommon.mrmlio.addDoseVolume`), or None."""
    return scene.GetFirstNodeByName(mrmlio.DOSE_COLOR_TABLE_NAME)


# ------------------------------------------------------------------------------------------- tables/plots
def setTableRows(scene, studyItem: int, role: str, name: str, rows: list[dict], patientId: str,
                 units: Optional[dict] = None, source: str = ""):
    """The study's table of ``role`` (created when missing) refilled with ``rows`` (:func:`mrmlio.fillTable`).

    :param units: column -> unit label, for columns whose name carries no unit suffix.
    """
    table = findOutput(scene, studyItem, role, "vtkMRMLTableNode")
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{patientId} {name}")
        tagOutput(table, role, patientId, source)
        mrmlio.placeInStudy(table, studyItem)
    table.RemoveAllColumns()
    mrmlio.fillTable(table, rows)
    for column, unit in (units or {}).items():
        if table.GetTable().GetColumnByName(column) is not None:
            table.SetColumnUnitLabel(column, unit)
    return table


def ensureChart(scene, studyItem: int, role: str, name: str, patientId: str, title: str, xTitle: str,
                yTitle: str, source: str = ""):
    """The study's chart of ``role``, created when missing."""
    chart = findOutput(scene, studyItem, role, "vtkMRMLPlotChartNode")
    if chart is None:
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{patientId} {name}")
        tagOutput(chart, role, patientId, source)
        mrmlio.placeInStudy(chart, studyItem)
    chart.SetTitle(title)
    chart.SetXAxisTitle(xTitle)
    chart.SetYAxisTitle(yTitle)
    return chart


def ensureSeries(chart, table, name: str, xColumn: str, yColumn: str, color: tuple, studyItem: int,
                 patientId: str, markersOnly: bool = False, dashed: bool = False):
    """The chart's series called ``name`` (created when missing), plotting ``yColumn`` over ``xColumn``.

    :param color: RGB 0..1; :param markersOnly: observations (no line); :param dashed: band limits.
    """
    scene = chart.GetScene()
    series = None
    for index in range(chart.GetNumberOfPlotSeriesNodes()):
        candidate = chart.GetNthPlotSeriesNode(index)
        if candidate is not None and candidate.GetName() == name:
            series = candidate
    if series is None:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
        tagOutput(series, ROLE_SERIES, patientId)
        mrmlio.placeInStudy(series, studyItem)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetXColumnName(xColumn)
    series.SetYColumnName(yColumn)
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetColor(*color)
    if markersOnly:
        series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleNone)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
    else:
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash if dashed
                            else slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
    return series


# ------------------------------------------------------------------------------------------- rows
def goalRows(records: list, goals: list[dict]) -> list[dict]:
    """Planned versus delivered rows: one per fraction and goal.

    :param records: the timeline's :class:`~twinrt.twin.timeline.FractionRecord` list; each holds, in
        ``goals``, the planned-to-date, delivered and projected values the twin
        computed when it took that fraction.
    :param goals: the twin's current goal rows (:meth:`DigitalTwin.goal_table`), for each goal's
        structure, metric, unit, priority and whole-course planned value.
    """
    rows = []
    for record in records:
        metrics = record.goals
        for goal in goals:
            values = metrics.get(goal["goal"])
            if values is None:
                continue
            rows.append({"fraction": record.number, "date": record.date, "goal": goal["goal"],
                         "structure": goal["structure"], "metric": goal["metric"], "priority": goal["priority"],
                         "unit": goal["unit"], "planned": goal["planned"],
                         "planned_to_date": values["planned_to_date"], "delivered": values["delivered"],
                         "projected": values["projected"]})
    return rows


def goalTrendRows(records: list, goal: str) -> list[dict]:
    """One row per fraction of one goal's planned-to-date, delivered and projected values (the chart's table)."""
    rows = []
    for record in records:
        values = record.goals.get(goal)
        if values is not None:
            rows.append({"fraction": record.number, "planned_to_date": values["planned_to_date"],
                         "delivered": values["delivered"], "projected": values["projected"]})
    return rows


def regimenRows(comparison) -> list[dict]:
    """:meth:`RegimenComparison.to_rows` with the TCP credible interval split into lower/upper columns
    (a table cell holds one number)."""
    rows = []
    for row in comparison.to_rows():
        flat = {}
        for key, value in row.items():
            if isinstance(value, (tuple, list)):
                flat[f"{key} lower"], flat[f"{key} upper"] = float(value[0]), float(value[1])
            else:
                flat[key] = value
        rows.append(flat)
    return rows
