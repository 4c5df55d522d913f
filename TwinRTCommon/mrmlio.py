"""The MRML contract of TwinRT: a :class:`twinrt.model.Case` <-> nodes of a Slicer scene.

This is the one place where all five modules (AutoContour, DosePredict, AIPlanner, DigitalTwin,
ToxicityMonitor) put a case into a scene and read it back, so that what one module writes the
others, and SlicerRT, can read. It imports ``slicer`` and therefore lives beside the modules, not in
the pure-Python core ``twinrt``.

What :func:`caseToScene` writes (attribute names are copied from SlicerRT, see the constants):

* one subject-hierarchy **patient** item (``DICOM.PatientID``, ``DICOM.PatientName``) holding one
  **study** item; every node below goes under that study;
* the **CT** as a ``vtkMRMLScalarVolumeNode`` (voxels in HU, IJK->RAS from :meth:`Grid.ijk_to_ras`);
* the **structures** as one ``vtkMRMLSegmentationNode`` whose reference geometry is the CT
  (``SetReferenceImageGeometryParameterFromVolumeNode`` plus the node reference Slicer keeps for it),
  one segment per structure with its name, colour and a ``TwinRT.StructureType`` segment tag;
* each **dose** as a ``vtkMRMLScalarVolumeNode`` in Gy tagged ``DicomRtImport.DoseVolume = "1"``,
  shown with the ``Dose_ColorTable`` colour table; the study carries ``DicomRtImport.DoseUnitName =
  "Gy"`` and ``DicomRtImport.DoseUnitValue``, which is where SlicerRT's DVH, Isodose and RTDOSE
  export look for the unit;
* the **DVH** of one dose: a metrics ``vtkMRMLTableNode`` (one row per structure, unit labels on
  the columns), one SlicerRT-style DVH table per structure (``DoseVolumeHistogram.DVH = "1"``,
  columns ``Dose`` in Gy and ``Volume`` in %) and a ``vtkMRMLPlotChartNode`` with one
  ``vtkMRMLPlotSeriesNode`` per structure;
* the case's **audit log** (``case.metadata["audit_log"]``, :mod:`twinrt.audit`) as the study item
  attribute ``TwinRT.AuditLog``, one JSON line per entry (hash chain included), and *not* inside
  ``TwinRT.CaseMetadata``: its own attribute lets a module append an entry
  (:func:`setStudyAuditLog`) without re-encoding the case metadata, and keeps it readable in the
  .mrml file. :func:`sceneToCase` puts it back in ``metadata["audit_log"]``;
* ``TwinRT.ResearchUseOnly`` and provenance attributes (``TwinRT.Version``, ``TwinRT.CreatedBy``,
  ``TwinRT.Role``...) on every node it creates.

Everything is written in one transaction: when anything fails (a dose with NaN voxels, a structure
on another grid...) every node and subject-hierarchy item created so far is removed and the typed
:mod:`twinrt.errors` exception propagates, so the scene is left as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

import slicer
import vtk
from vtk.util import numpy_support

import twinrt
from twinrt.audit import METADATA_KEY as AUDIT_METADATA_KEY
from twinrt.audit import AuditLog, AuditLogError
from twinrt.errors import (DoseError, GeometryError, InvalidInputError, MissingInputError,
                           StructureError, TwinRTError)
from twinrt.geometry import Grid
from twinrt.model import (Case, Dose, Image, Plan, Prescription, Structure, StructureType,
                          validate_dose_array)
from twinrt.progress import ProgressCallback, report

# --------------------------------------------------------------------------------------------------
# Attribute names. Copied verbatim from SlicerRT so that SlicerRT's modules recognise our nodes:
# SlicerRt/SlicerRT: SlicerRtCommon/vtkSlicerRtCommon.cxx
#: Marks a scalar volume as dose (vtkSlicerRtCommon::DICOMRTIMPORT_DOSE_VOLUME_IDENTIFIER_ATTRIBUTE_NAME).
DOSE_VOLUME_ATTRIBUTE = "DicomRtImport.DoseVolume"
#: Dose unit name, set on the *study* item (DICOMRTIMPORT_DOSE_UNIT_NAME_ATTRIBUTE_NAME).
DOSE_UNIT_NAME_ATTRIBUTE = "DicomRtImport.DoseUnitName"
#: Dose unit value (DICOMRTIMPORT_DOSE_UNIT_VALUE_ATTRIBUTE_NAME); SlicerRT's RTDOSE import stores
#: the grid scaling here and Isodose thresholds display at half of it. Our voxels already hold Gy,
#: so the scaling is 1.
DOSE_UNIT_VALUE_ATTRIBUTE = "DicomRtImport.DoseUnitValue"
#: Name of the dose colour table SlicerRT creates and reuses (vtkSlicerRtCommon::DEFAULT_DOSE_COLOR_TABLE_NAME).
DOSE_COLOR_TABLE_NAME = "Dose_ColorTable"
# SlicerRt/SlicerRT: DoseVolumeHistogram/Logic/vtkSlicerDoseVolumeHistogramModuleLogic.cxx and
# vtkMRMLDoseVolumeHistogramNode.cxx (DVH_ATTRIBUTE_PREFIX = "DoseVolumeHistogram.").
#: Identifies a per-structure DVH table (DVH_DVH_IDENTIFIER_ATTRIBUTE_NAME).
DVH_IDENTIFIER_ATTRIBUTE = "DoseVolumeHistogram.DVH"
#: Segment ID of the structure a DVH table belongs to (DVH_SEGMENT_ID_ATTRIBUTE_NAME).
DVH_SEGMENT_ID_ATTRIBUTE = "DoseVolumeHistogram.SegmentID"
#: Row of the structure in the metrics table (DVH_TABLE_ROW_ATTRIBUTE_NAME).
DVH_TABLE_ROW_ATTRIBUTE = "DoseVolumeHistogram.TableRow"
#: Structure volume in cc (DVH_ATTRIBUTE_PREFIX + DVH_METRIC_TOTAL_VOLUME_CC).
DVH_TOTAL_VOLUME_ATTRIBUTE = "DoseVolumeHistogram.Volume (cc)"
#: Node reference roles of vtkMRMLDoseVolumeHistogramNode.
DVH_DOSE_VOLUME_REFERENCE_ROLE = "doseVolumeRef"
DVH_SEGMENTATION_REFERENCE_ROLE = "segmentationRef"
DVH_METRICS_TABLE_REFERENCE_ROLE = "dvhMetricsTableRef"
#: DVH table column names, as SlicerRT's ComputeDvh writes them.
DVH_DOSE_COLUMN = "Dose"
DVH_VOLUME_COLUMN = "Volume"

# TwinRT's own attributes, prefixed like SlicerRT prefixes its own (STYLE.md section 2).
RESEARCH_USE_ATTRIBUTE = "TwinRT.ResearchUseOnly"
VERSION_ATTRIBUTE = "TwinRT.Version"
CREATED_BY_ATTRIBUTE = "TwinRT.CreatedBy"
SOURCE_ATTRIBUTE = "TwinRT.Source"
ROLE_ATTRIBUTE = "TwinRT.Role"
PATIENT_ID_ATTRIBUTE = "TwinRT.PatientID"
CASE_METADATA_ATTRIBUTE = "TwinRT.CaseMetadata"
PLANS_ATTRIBUTE = "TwinRT.Plans"
#: The case's audit log on the study item: JSON lines, one entry each (twinrt.audit.AuditLog.to_jsonl).
AUDIT_LOG_ATTRIBUTE = "TwinRT.AuditLog"
MODALITY_ATTRIBUTE = "TwinRT.Modality"
DOSE_NAME_ATTRIBUTE = "TwinRT.DoseName"
DOSE_TYPE_ATTRIBUTE = "TwinRT.DoseType"
DOSE_SUMMATION_ATTRIBUTE = "TwinRT.DoseSummation"
DOSE_SOURCE_ATTRIBUTE = "TwinRT.DoseSource"
#: Segment tag holding the StructureType *name* (enum names are stored, so never rename members).
STRUCTURE_TYPE_TAG = "TwinRT.StructureType"

#: Values of :data:`ROLE_ATTRIBUTE`.
ROLE_CT = "CT"
ROLE_STRUCTURES = "Structures"
ROLE_DOSE = "Dose"
ROLE_DVH_METRICS = "DVHMetrics"
ROLE_DVH_TABLE = "DVHTable"
ROLE_DVH_CHART = "DVHChart"
ROLE_DVH_SERIES = "DVHSeries"

#: Bin width (Gy) of the DVH curves put in the scene; metrics do not depend on it (twinrt.dvh).
DVH_CURVE_BIN_WIDTH_GY = 0.1

# --------------------------------------------------------------------------------------------------
# Standard terminology of segments (Slicer's Terminologies module; DICOM SEG export reads it).
#: Terminology context and anatomic context of the entries below: Slicer's default lists, which
#: lassoan/SlicerTotalSegmentator: TotalSegmentator/TotalSegmentator.py also writes for its organs.
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
TERMINOLOGY_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
#: Category of every organ below: SNOMED CT 123037004 "Anatomical Structure".
TERMINOLOGY_ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
#: AAPM TG-263 organ name -> (SNOMED CT type code, code meaning, laterality modifier or None).
#: This is data, kept here (not in the core's oar.py) because the entry format is Slicer's. The codes
#: and laterality qualifiers (left 7771000, right 24028007) are those of the TG-263 -> SNOMED CT
#: concept map of HL7/fhir-mCODE-ig: input/pagecontent/ConceptMap-TG263CM-intro.md; SlicerTotalSegmentator's
#: TotalSegmentator/Resources/totalsegmentator_snomed_mapping.csv gives the same esophagus and spinal
#: cord codes and puts laterality in the type modifier, as done here.
TG263_TERMINOLOGY = {
    "Brainstem": ("15926001", "Brainstem", None),
    "SpinalCord": ("2748008", "Spinal cord", None),
    "Parotid_L": ("45289007", "Parotid gland", ("SCT", "7771000", "Left")),
    "Parotid_R": ("45289007", "Parotid gland", ("SCT", "24028007", "Right")),
    "Esophagus": ("32849002", "Esophagus", None),
    "Larynx": ("4596009", "Larynx", None),
    "Bone_Mandible": ("91609006", "Mandible", None),
}

_CREATED_BY = "TwinRTCommon.mrmlio.caseToScene"

#: Dose colour ramp (low to high), stretched to 256 colours like SlicerRT stretches its isodose table.
_DOSE_RAMP = [(0.0, 0.0, 0.5), (0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (0.0, 1.0, 0.0), (1.0, 1.0, 0.0),
              (1.0, 0.5, 0.0), (1.0, 0.0, 0.0)]


# --------------------------------------------------------------------------------------------------
class _SceneTransaction:
    """Remembers the scene's nodes and subject-hierarchy items so a failed write can be undone.

    A snapshot of node IDs (rather than a list of what we added) also catches nodes that Slicer adds
    on our behalf: display nodes, storage nodes, the colour table. The attributes of the items that
    already exist are remembered too, because a write may tag an existing study (its dose unit, the
    plans it holds) and a rollback must take that back as well.
    """

    def __init__(self, scene):
        self.scene = scene
        self.nodeIds = set(nodeIds(scene))
        sh = scene.GetSubjectHierarchyNode()
        self.itemIds = set(_allItems(sh))
        self.itemAttributes = {item: {name: sh.GetItemAttribute(item, name) for name in sh.GetItemAttributeNames(item)}
                               for item in self.itemIds}

    def rollback(self) -> None:
        """Remove every node and subject-hierarchy item created since the snapshot; restore attributes."""
        added = [nid for nid in nodeIds(self.scene) if nid not in self.nodeIds]
        # Reverse creation order: data nodes go before the display/storage nodes they reference.
        for nid in reversed(added):
            node = self.scene.GetNodeByID(nid)
            if node is not None:
                self.scene.RemoveNode(node)
        # Removing a data node removes its item; what is left are the patient and study folders.
        sh = self.scene.GetSubjectHierarchyNode()
        for item in _allItems(sh):
            if item not in self.itemIds and item in _allItems(sh):
                sh.RemoveItem(item, False, True)
        for item, attributes in self.itemAttributes.items():
            if item not in _allItems(sh):
                continue
            for name in sh.GetItemAttributeNames(item):
                if name not in attributes:
                    sh.RemoveItemAttribute(item, name)
            for name, value in attributes.items():
                if sh.GetItemAttribute(item, name) != value:
                    sh.SetItemAttribute(item, name, value)


@contextlib.contextmanager
def sceneTransaction(scene):
    """All-or-nothing scene writes: on any exception, undo what the block added, then re-raise.

    Undone are the nodes and subject-hierarchy items created inside the block (display, storage and
    colour nodes included) and changes to the attributes of items that existed before it. Changes
    to existing *nodes* are not undone, so a block should only add nodes.

    :param scene: the MRML scene.
    """
    transaction = _SceneTransaction(scene)
    try:
        yield transaction
    except BaseException:
        # BaseException: a KeyboardInterrupt in the middle of a write must not leave half a result.
        transaction.rollback()
        raise


def _allItems(sh) -> list[int]:
    """Every subject-hierarchy item below the scene item, parents before children."""
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def nodeIds(scene) -> list[str]:
    """IDs of all nodes of ``scene`` in scene order (used to check that a failed call changed nothing)."""
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def tagNode(node, role: str, source: str = "", createdBy: str = _CREATED_BY) -> None:
    """Research-use and provenance attributes that every node TwinRT creates carries.

    :param node: the new node.
    :param role: ``TwinRT.Role`` (``ROLE_*`` here, or a module's own role).
    :param source: ``TwinRT.Source`` (where the case came from); left unset when empty.
    :param createdBy: ``TwinRT.CreatedBy`` (the function or module that made the node).
    """
    node.SetAttribute(RESEARCH_USE_ATTRIBUTE, twinrt.RESEARCH_USE_ONLY)
    node.SetAttribute(VERSION_ATTRIBUTE, twinrt.__version__)
    node.SetAttribute(CREATED_BY_ATTRIBUTE, createdBy)
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    if source:
        node.SetAttribute(SOURCE_ATTRIBUTE, source)


def _safeArrayForVtk(array: np.ndarray) -> np.ndarray:
    """A copy VTK can hold: Slicer rejects 64-bit integers and has no boolean voxel type."""
    array = np.ascontiguousarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype in (np.int64, np.uint64):
        if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
            raise InvalidInputError("Image values do not fit in 32-bit integers; convert the image to float")
        return array.astype(np.int32)
    return array


def _addVolume(scene, name: str, array: np.ndarray, grid: Grid):
    """Add a scalar volume holding ``array`` (k, j, i) on ``grid``; returns the node."""
    grid.check_array(array, f"volume '{name}'")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(grid.ijk_to_ras()))
    slicer.util.updateVolumeFromArray(node, _safeArrayForVtk(array))
    node.CreateDefaultDisplayNodes()
    return node


def volumeGrid(volumeNode) -> Grid:
    """The :class:`Grid` of a volume node (IJK->RAS matrix and voxel dimensions)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    image = volumeNode.GetImageData()
    if image is None:
        raise MissingInputError(f"Volume '{volumeNode.GetName()}' has no voxels; load it again")
    dims = image.GetDimensions()
    return Grid.from_ijk_to_ras(slicer.util.arrayFromVTKMatrix(matrix), (dims[2], dims[1], dims[0]))


def _jsonable(value: Any) -> tuple[bool, Any]:
    """``(True, json-ready value)`` for metadata TwinRT can store as text, else ``(False, None)``."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Prescription) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        value = dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v) for v in value]
        if all(ok for ok, _ in items):
            return True, [v for _, v in items]
        return False, None
    try:
        json.dumps(value, allow_nan=False)
        return True, value
    except (TypeError, ValueError):
        return False, None


def _encodeMetadata(metadata: dict) -> tuple[str, list[str]]:
    """JSON text of the storable metadata and the keys left out (arrays, objects)."""
    stored, skipped = {}, []
    for key, value in metadata.items():
        ok, converted = _jsonable(value)
        if ok:
            stored[str(key)] = converted
        else:
            skipped.append(str(key))
    return json.dumps(stored, sort_keys=True), skipped


def _decodeMetadata(text: str) -> dict:
    """Inverse of :func:`_encodeMetadata`; prescriptions come back as :class:`Prescription`."""
    if not text:
        return {}
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"Attribute {CASE_METADATA_ATTRIBUTE} is not valid JSON ({exc}); "
                                "the scene was edited by hand or is damaged") from exc
    if isinstance(metadata.get("prescriptions"), list):
        metadata["prescriptions"] = [Prescription(**p) for p in metadata["prescriptions"]]
    return metadata


def _createDoseColorTable(scene):
    """The ``Dose_ColorTable`` node: reused if the scene has one (as SlicerRT's Isodose logic does)."""
    existing = scene.GetNodesByName(DOSE_COLOR_TABLE_NAME)
    if existing.GetNumberOfItems() > 0:
        return existing.GetItemAsObject(0)
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", DOSE_COLOR_TABLE_NAME)
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    ramp = np.array(_DOSE_RAMP)
    positions = np.linspace(0.0, 1.0, len(ramp))
    for index in range(256):
        t = index / 255.0
        rgb = [float(np.interp(t, positions, ramp[:, c])) for c in range(3)]
        table.SetColor(index, f"{index}", rgb[0], rgb[1], rgb[2], 1.0)
    table.SetAttribute("Category", "TwinRT")
    return table


# --------------------------------------------------------------------------------------------------
def _defaultDoseName(case: Case, doseName: Optional[str]) -> Optional[str]:
    if doseName is not None:
        if doseName not in case.doses:
            raise InvalidInputError(f"Case {case.patient_id} has no dose '{doseName}'; available: "
                                    f"{', '.join(case.doses) or 'none'}")
        return doseName
    if "reference" in case.doses:
        return "reference"
    return next(iter(case.doses), None)


def caseToScene(case: Case, scene=None, doseName: Optional[str] = None, computeDvh: bool = True,
                progress: Optional[ProgressCallback] = None) -> dict[str, Any]:
    """Put a case into a scene following the TwinRT MRML contract (see the module docstring).

    :param case: the patient (CT, structures, doses, metadata).
    :param scene: the MRML scene; default ``slicer.mrmlScene``.
    :param doseName: dose whose DVH is computed; default ``"reference"`` if present, else the first.
    :param computeDvh: add the DVH metrics table, DVH tables and chart (needs a dose and structures).
    :param progress: optional ``progress(fraction, text)`` callback.
    :return: the created items: ``patientItem``, ``studyItem`` (subject-hierarchy IDs), ``ct``,
        ``segmentation`` (or ``None``), ``segmentIds`` (structure name -> segment ID), ``doses``
        (dose name -> node), ``doseColorTable`` and, when a DVH was computed, ``dvhMetricsTable``,
        ``dvhTables`` and ``dvhPlotSeries`` (structure name -> node), ``dvhChart``.
    :raises InvalidInputError: (and its subclasses ``DoseError``, ``StructureError``,
        ``GeometryError``) for unusable input; the scene is then left as it was.
    """
    if not isinstance(case, Case):
        raise InvalidInputError(f"caseToScene needs a twinrt.model.Case, got {type(case).__name__}")
    scene = scene if scene is not None else slicer.mrmlScene
    if scene is None:
        raise InvalidInputError("No MRML scene: pass scene= or run inside Slicer")
    doseName = _defaultDoseName(case, doseName)
    with sceneTransaction(scene):
        return _caseToScene(case, scene, doseName, computeDvh, progress)


def _caseToScene(case: Case, scene, doseName, computeDvh, progress) -> dict[str, Any]:
    sh = scene.GetSubjectHierarchyNode()
    constants = slicer.vtkMRMLSubjectHierarchyConstants
    source = str(case.metadata.get("source", ""))
    result: dict[str, Any] = {"doses": {}, "segmentIds": {}, "segmentation": None}

    report(progress, 0.0, "Creating patient and study")
    # Patient and study items are created explicitly: headless there is no DICOM plugin to do it,
    # and SlicerRT finds the dose unit by walking up from a dose to its study.
    patientName = str(case.metadata.get("patient_name") or case.patient_id)
    patientItem = sh.CreateSubjectItem(sh.GetSceneItemID(), patientName)
    sh.SetItemAttribute(patientItem, constants.GetDICOMPatientIDAttributeName(), case.patient_id)
    sh.SetItemAttribute(patientItem, constants.GetDICOMPatientNameAttributeName(), patientName)
    sh.SetItemUID(patientItem, constants.GetDICOMUIDName(), case.patient_id)
    studyItem = sh.CreateStudyItem(patientItem, str(case.metadata.get("study_description") or "TwinRT study"))
    studyUid = case.metadata.get("study_instance_uid")
    if studyUid:
        sh.SetItemAttribute(studyItem, constants.GetDICOMStudyInstanceUIDAttributeName(), str(studyUid))
        sh.SetItemUID(studyItem, constants.GetDICOMUIDName(), str(studyUid))
    # Case metadata rides on the study as JSON so that sceneToCase can give it back after a reload.
    # The audit log gets its own attribute (see the module docstring), so it is left out here.
    metadataText, skipped = _encodeMetadata({k: v for k, v in case.metadata.items() if k != AUDIT_METADATA_KEY})
    sh.SetItemAttribute(studyItem, CASE_METADATA_ATTRIBUTE, metadataText)
    if case.metadata.get(AUDIT_METADATA_KEY):
        sh.SetItemAttribute(studyItem, AUDIT_LOG_ATTRIBUTE, AuditLog(case.metadata[AUDIT_METADATA_KEY]).to_jsonl())
    sh.SetItemAttribute(studyItem, RESEARCH_USE_ATTRIBUTE, twinrt.RESEARCH_USE_ONLY)
    sh.SetItemAttribute(studyItem, VERSION_ATTRIBUTE, twinrt.__version__)
    if skipped:
        # Arrays such as OpenKBP's possible-dose mask have no place in an attribute; say so.
        logging.info("caseToScene: metadata not stored in the scene: %s", ", ".join(skipped))
    plansOk, plans = _jsonable(case.plans)
    if case.plans and plansOk:
        sh.SetItemAttribute(studyItem, PLANS_ATTRIBUTE, json.dumps(plans))
    result.update(patientItem=patientItem, studyItem=studyItem)

    report(progress, 0.1, "Creating CT volume")
    # Node names carry the patient ID so several patients can share a scene without confusion.
    ct = _addVolume(scene, f"{case.patient_id} {case.ct.modality}", case.ct.array, case.ct.grid)
    tagNode(ct, ROLE_CT, source)
    ct.SetAttribute(PATIENT_ID_ATTRIBUTE, case.patient_id)
    ct.SetAttribute(MODALITY_ATTRIBUTE, case.ct.modality)
    sh.CreateItem(studyItem, ct)
    result["ct"] = ct

    if case.structures:
        report(progress, 0.25, "Creating segmentation")
        segmentation, segmentIds = _addSegmentation(scene, case, ct, source)
        result.update(segmentation=segmentation, segmentIds=segmentIds)

    for index, (name, dose) in enumerate(case.doses.items()):
        report(progress, 0.4 + 0.2 * index / max(len(case.doses), 1), f"Creating dose '{name}'")
        result["doses"][name] = addDoseVolume(scene, dose, studyItem, f"{case.patient_id} Dose {name}", name,
                                              source)
    result["doseColorTable"] = scene.GetFirstNodeByName(DOSE_COLOR_TABLE_NAME) if case.doses else None

    if computeDvh and doseName is not None and result["segmentation"] is not None:
        report(progress, 0.7, f"Computing DVH of '{doseName}'")
        result.update(addDvh(scene, case, doseName, result["doses"][doseName], result["segmentation"],
                             result["segmentIds"], studyItem, source))
    report(progress, 1.0, "Scene ready")
    return result


def _addSegmentation(scene, case: Case, ct, source: str):
    """One segmentation node on the CT's geometry, one segment per structure."""
    ctGrid = case.ct.grid
    segmentation = addSegmentationNode(scene, ct, f"{case.patient_id} Structures", source)
    segmentIds = {}
    for structure in case.structures:
        if not structure.grid.is_same(ctGrid):
            raise GeometryError(f"Structure '{structure.name}' is on a grid other than the CT's; "
                                "resample it to the CT grid (Structure.on_grid) before adding it")
        segmentIds[structure.name] = addStructureSegment(segmentation, ct, structure)
    return segmentation, segmentIds


def addSegmentationNode(scene, ct, name: str, source: str = "", createdBy: str = _CREATED_BY):
    """A new, empty segmentation on the CT's geometry, tagged as structures, in the CT's study.

    :param scene: the scene; ``ct`` the CT volume node (its study item, when it has one, becomes
        the segmentation's parent in the subject hierarchy).
    :param name: node name; ``source``/``createdBy``: provenance attributes (:func:`tagNode`).
    """
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    # Sets both the reference geometry string and the node reference to the CT (the contract).
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    tagNode(segmentation, ROLE_STRUCTURES, source, createdBy)
    placeInStudy(segmentation, studyItemOf(ct))
    return segmentation


def fillScalarMap(node, array: np.ndarray, grid: Grid, role: str, source: str, createdBy: str,
                  unitAttribute: str, unit: str) -> None:
    """Fill a scalar volume with a map that is neither a CT nor a dose (e.g. an uncertainty map):
    voxels on ``grid`` ((k, j, i), RAS geometry from the grid), provenance (``TwinRT.Role`` = ``role``
    keeps it out of :func:`findCtVolume`), its unit, and a 0..max window."""
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(grid.ijk_to_ras()))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.float32))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    tagNode(node, role, source, createdBy)
    node.SetAttribute(unitAttribute, unit)
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, max(float(np.max(array)) if np.size(array) else 0.0, 1e-6))


def placeInStudy(node, study: int) -> None:
    """Put ``node`` under the subject-hierarchy ``study`` item (nothing when ``study`` is 0)."""
    if not study:
        return
    sh = node.GetScene().GetSubjectHierarchyNode()
    # Subject-hierarchy items are created by Qt plugins in Slicer, not headless: handle both.
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, study)
    else:
        sh.CreateItem(study, node)


def referenceVolumeId(segmentation) -> str:
    """ID of the volume whose geometry a segmentation references ("" when none)."""
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    return segmentation.GetNodeReferenceID(role) or ""


def addStructureSegment(segmentation, ct, structure: Structure, segmentId: str = "") -> str:
    """Add ``structure`` (its mask on the CT grid) to ``segmentation`` as a binary-labelmap segment.

    :param segmentation: the ``vtkMRMLSegmentationNode``.
    :param ct: the CT volume node whose geometry the mask is on.
    :param structure: name, mask (k, j, i), colour (0..255) and type (stored as segment tag
        :data:`STRUCTURE_TYPE_TAG`).
    :param segmentId: the segment ID to use (to replace a segment removed just before, so that
        references to it survive); empty: Slicer chooses one.
    :return: the segment ID.
    :raises StructureError: when Slicer refuses the segment.
    """
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    # Building the labelmap in memory (not as a temporary labelmap node) keeps the scene clean
    # even if Slicer rejects a segment halfway.
    image = logic.CreateOrientedImageDataFromVolumeNode(ct)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    voxels[:] = np.ascontiguousarray(structure.mask, dtype=np.uint8).reshape(-1)
    color = [c / 255.0 for c in structure.color]
    newId = segmentation.AddSegmentFromBinaryLabelmapRepresentation(image, structure.name, color, segmentId)
    if not newId:
        raise StructureError(f"Slicer refused structure '{structure.name}'", structure.name)
    segmentation.GetSegmentation().GetSegment(newId).SetTag(STRUCTURE_TYPE_TAG, structure.type.name)
    return newId


def tg263TerminologyEntry(name: str) -> str:
    """The Slicer terminology entry of an organ of :data:`TG263_TERMINOLOGY`, "" for any other name.

    The entry is what Slicer stores under the segment tag ``vtkSegment.GetTerminologyEntryTagName()``:
    seven ``~``-separated parts (context, category, type, type modifier, anatomic context, anatomic
    region, its modifier), each code as ``scheme^value^meaning``, the format of
    ``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``
    (Slicer/Slicer: Modules/Loadable/Terminologies/Logic/vtkSlicerTerminologiesModuleLogic.cxx).

    :param name: the structure's AAPM TG-263 name, e.g. ``Parotid_L`` (exact spelling).
    """
    if name not in TG263_TERMINOLOGY:
        return ""
    code, meaning, modifier = TG263_TERMINOLOGY[name]
    parts = [TERMINOLOGY_CONTEXT, "^".join(TERMINOLOGY_ANATOMICAL_STRUCTURE), f"SCT^{code}^{meaning}",
             "^".join(modifier) if modifier else "^^", TERMINOLOGY_ANATOMIC_CONTEXT, "^^", "^^"]
    return "~".join(parts)


def addDoseVolume(scene, dose: Dose, studyItem: int, nodeName: str, doseName: Optional[str] = None,
                  source: str = "", createdBy: str = _CREATED_BY):
    """Add a dose as a SlicerRT dose volume under a subject-hierarchy study (the MRML contract).

    The volume is tagged ``DicomRtImport.DoseVolume = "1"``, shown with ``Dose_ColorTable``
    (windowed to the dose range, lowest 5 % hidden, like ``qSlicerAbstractDoseEngine``) and put
    under ``studyItem``. A study without a dose unit gets ``DicomRtImport.DoseUnitName = "Gy"``
    (where SlicerRT looks for it); in a study that already has a unit (cGy from an RTDOSE import)
    the voxels are written in that unit, so the study's doses stay comparable.

    :param scene: the MRML scene.
    :param dose: the dose (Gy); its grid may differ from the CT's.
    :param studyItem: subject-hierarchy study the volume goes under.
    :param nodeName: the node name.
    :param doseName: ``TwinRT.DoseName`` (the key :func:`sceneToCase` gives it back under); default ``dose.name``.
    :param source: ``TwinRT.Source`` text.
    :param createdBy: ``TwinRT.CreatedBy`` text (the function or module writing the dose).
    :return: the ``vtkMRMLScalarVolumeNode``.
    :raises DoseError: NaN, infinite or negative voxels, or a study dose unit TwinRT cannot convert to.
    """
    doseName = doseName or dose.name
    # Checked here, not only when the Dose was made: its array can be changed afterwards, and a
    # caller's rollback must then see the error before anything is written.
    validate_dose_array(np.asarray(dose.array), doseName)
    sh = scene.GetSubjectHierarchyNode()
    unit = sh.GetItemAttribute(studyItem, DOSE_UNIT_NAME_ATTRIBUTE) if studyItem else ""
    scale = _doseScale(unit)  # DoseError for a unit TwinRT cannot write
    voxels = np.asarray(dose.array, np.float32) / np.float32(scale)
    doseNode = _addVolume(scene, nodeName, voxels, dose.grid)
    tagNode(doseNode, ROLE_DOSE, source, createdBy)
    doseNode.SetAttribute(DOSE_VOLUME_ATTRIBUTE, "1")
    doseNode.SetAttribute(DOSE_NAME_ATTRIBUTE, doseName)
    doseNode.SetAttribute(DOSE_TYPE_ATTRIBUTE, dose.dose_type)
    doseNode.SetAttribute(DOSE_SUMMATION_ATTRIBUTE, dose.summation)
    doseNode.SetAttribute(DOSE_SOURCE_ATTRIBUTE, dose.source)
    display = doseNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(_createDoseColorTable(scene).GetID())
    # Window to the dose range and hide the lowest 5 %, like qSlicerAbstractDoseEngine does.
    maxValue = max(float(voxels.max()) if voxels.size else 0.0, 1e-6)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, maxValue * 1.1)
    display.SetLowerThreshold(0.05 * maxValue)
    display.ApplyThresholdOn()
    if studyItem:
        sh.CreateItem(studyItem, doseNode)
        if not unit:
            # Where qSlicerAbstractDoseEngine::addResultDose puts the unit: on the study, not the volume.
            sh.SetItemAttribute(studyItem, DOSE_UNIT_NAME_ATTRIBUTE, "Gy")
            sh.SetItemAttribute(studyItem, DOSE_UNIT_VALUE_ATTRIBUTE, "1.0")
    return doseNode


_UNIT_SUFFIXES = (("_gy", "Gy"), ("_cc", "cc"), ("_percent", "%"))


def metricUnit(key: str) -> str:
    """Unit label of a :func:`twinrt.dvh.dvh_metrics` key (its suffix): Gy, cc, % or ''."""
    for suffix, unit in _UNIT_SUFFIXES:
        if key.endswith(suffix):
            return unit
    return ""


def addDvh(scene, case: Case, doseName: str, doseNode, segmentationNode, segmentIds: dict[str, str],
           studyItem: int, source: str = "", createdBy: str = _CREATED_BY) -> dict[str, Any]:
    """Metrics table, per-structure DVH tables (SlicerRT layout) and the DVH chart of one dose.

    :param scene: the MRML scene.
    :param case: the case holding the structures and ``case.doses[doseName]``.
    :param doseName: the dose whose DVH is computed.
    :param doseNode: that dose's volume node (referenced by the tables).
    :param segmentationNode: the structures' segmentation node (referenced by the tables).
    :param segmentIds: structure name -> segment ID in ``segmentationNode``.
    :param studyItem: subject-hierarchy study the nodes go under.
    :param source: ``TwinRT.Source`` text; :param createdBy: ``TwinRT.CreatedBy`` text.
    :return: ``dvhMetricsTable``, ``dvhChart``, and ``dvhTables`` / ``dvhPlotSeries`` (structure name -> node).
    """
    from twinrt import dvh  # imported here: only needed when a DVH is requested

    sh = scene.GetSubjectHierarchyNode()
    # Metrics come from the core (exact on voxels), not from SlicerRT's DVH logic, which is not
    # available headless; the tables follow SlicerRT's layout so its DVH module can show them.
    rows = dvh.dvh_metrics(case, doseName)

    metrics = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{case.patient_id} DVH metrics ({doseName})")
    tagNode(metrics, ROLE_DVH_METRICS, source, createdBy)
    metrics.SetAttribute(DOSE_NAME_ATTRIBUTE, doseName)
    metrics.SetNodeReferenceID(DVH_DOSE_VOLUME_REFERENCE_ROLE, doseNode.GetID())
    metrics.SetNodeReferenceID(DVH_SEGMENTATION_REFERENCE_ROLE, segmentationNode.GetID())
    fillTable(metrics, rows)
    sh.CreateItem(studyItem, metrics)

    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{case.patient_id} DVH ({doseName})")
    tagNode(chart, ROLE_DVH_CHART, source, createdBy)
    chart.SetTitle(f"Dose volume histogram: {doseName}")
    chart.SetXAxisTitle("Dose (Gy)")
    chart.SetYAxisTitle("Fractional volume (%)")
    sh.CreateItem(studyItem, chart)

    dose = case.doses[doseName]
    rowOf = {row["structure"]: index for index, row in enumerate(rows)}
    tables, series = {}, {}
    for structure in case.structures:
        if structure.name not in rowOf:
            continue  # empty structures have no DVH (twinrt.dvh skips them too)
        # The dose is resampled onto the structure's grid, never the mask onto the dose grid, so
        # small organs keep their volume (see twinrt.dvh).
        curve = dvh.structure_dvh(dose, structure, bin_width_gy=DVH_CURVE_BIN_WIDTH_GY)
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{structure.name}_DvhTable")
        tagNode(table, ROLE_DVH_TABLE, source, createdBy)
        table.SetAttribute(DVH_IDENTIFIER_ATTRIBUTE, "1")
        table.SetAttribute(DVH_SEGMENT_ID_ATTRIBUTE, segmentIds[structure.name])
        table.SetAttribute(DVH_TABLE_ROW_ATTRIBUTE, str(rowOf[structure.name]))
        table.SetAttribute(DVH_TOTAL_VOLUME_ATTRIBUTE, repr(float(curve.total_volume_cc)))
        table.SetAttribute(DOSE_NAME_ATTRIBUTE, doseName)
        table.SetNodeReferenceID(DVH_DOSE_VOLUME_REFERENCE_ROLE, doseNode.GetID())
        table.SetNodeReferenceID(DVH_SEGMENTATION_REFERENCE_ROLE, segmentationNode.GetID())
        table.SetNodeReferenceID(DVH_METRICS_TABLE_REFERENCE_ROLE, metrics.GetID())
        _fillCurveTable(table, np.asarray(curve.bin_edges_gy), np.asarray(curve.cumulative_percent))
        sh.CreateItem(studyItem, table)

        plot = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{structure.name} ({doseName})")
        tagNode(plot, ROLE_DVH_SERIES, source, createdBy)
        plot.SetAndObserveTableNodeID(table.GetID())
        plot.SetXColumnName(DVH_DOSE_COLUMN)
        plot.SetYColumnName(DVH_VOLUME_COLUMN)
        plot.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        plot.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        plot.SetColor(*[c / 255.0 for c in structure.color])
        chart.AddAndObservePlotSeriesNodeID(plot.GetID())
        sh.CreateItem(studyItem, plot)
        tables[structure.name], series[structure.name] = table, plot
    return {"dvhMetricsTable": metrics, "dvhChart": chart, "dvhTables": tables, "dvhPlotSeries": series}


def _fillCurveTable(table, doseGy: np.ndarray, volumePercent: np.ndarray) -> None:
    for name, values, unit in ((DVH_DOSE_COLUMN, doseGy, "Gy"), (DVH_VOLUME_COLUMN, volumePercent, "%")):
        column = numpy_support.numpy_to_vtk(np.asarray(values, dtype=np.float64), deep=True)
        column.SetName(name)
        table.AddColumn(column)
        table.SetColumnUnitLabel(name, unit)


def fillTable(tableNode, rows: list[dict]) -> None:
    """Write rows (dicts) into a table node: text columns for strings, double columns otherwise.

    Columns follow the keys' first appearance; a missing numeric value is NaN (e.g. organ columns
    of a target row). Units come from the key suffix (:func:`metricUnit`).

    :param tableNode: an empty ``vtkMRMLTableNode``.
    :param rows: one dict per row.
    """
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    table = tableNode.GetTable()
    for key in keys:
        # Typed columns (not all text) so plots and the table view sort numbers as numbers.
        isText = any(isinstance(row.get(key), str) for row in rows)
        column = vtk.vtkStringArray() if isText else vtk.vtkDoubleArray()
        column.SetName(key)
        column.SetNumberOfValues(len(rows))
        for index, row in enumerate(rows):
            value = row.get(key)
            if isText:
                column.SetValue(index, "" if value is None else str(value))
            else:
                column.SetValue(index, float("nan") if value is None else float(value))
        table.AddColumn(column)
        unit = metricUnit(key)
        if unit:
            tableNode.SetColumnUnitLabel(key, unit)
    tableNode.Modified()


def tableToRows(tableNode) -> list[dict]:
    """Rows of a table node as dicts (NaN cells are left out): the inverse of :func:`fillTable`."""
    table = tableNode.GetTable()
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c in range(table.GetNumberOfColumns()):
            column = table.GetColumn(c)
            if isinstance(column, vtk.vtkStringArray):
                row[column.GetName()] = column.GetValue(r)
            else:
                value = float(column.GetTuple1(r))
                if not math.isnan(value):
                    row[column.GetName()] = value
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
def nodesByClass(scene, className: str) -> list:
    """Every node of ``className`` (or a subclass) in ``scene``."""
    collection = scene.GetNodesByClass(className)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]



def findOutputs(scene, studyItem: int, role: str, createdBy: str, className: str = "vtkMRMLNode") -> list:
    """The nodes a module (``createdBy``) wrote with ``role`` (``TwinRT.Role``) in ``studyItem``, oldest first."""
    return [node for node in nodesByClass(scene, className)
            if node.GetAttribute(ROLE_ATTRIBUTE) == role
            and node.GetAttribute(CREATED_BY_ATTRIBUTE) == createdBy
            and studyItemOf(node) == studyItem]


def isDoseVolumeNode(node) -> bool:
    """SlicerRT's test (vtkSlicerRtCommon::IsDoseVolumeNode): a scalar volume with the dose attribute."""
    return (node is not None and node.IsA("vtkMRMLScalarVolumeNode")
            and node.GetAttribute(DOSE_VOLUME_ATTRIBUTE) is not None)


def findCtVolume(scene):
    """The CT of a scene: the volume tagged ``TwinRT.Role = CT``, else the only non-dose volume without a role.

    :raises MissingInputError: when the scene has no CT volume.
    :raises InvalidInputError: when several volumes qualify (pass the CT explicitly).
    """
    volumes = [n for n in nodesByClass(scene, "vtkMRMLScalarVolumeNode")
               if not n.IsA("vtkMRMLLabelMapVolumeNode") and not isDoseVolumeNode(n)]
    # Scenes written by caseToScene say which volume is the CT; scenes loaded by SlicerRT's DICOM
    # import do not, and then the only non-dose volume is the CT.
    tagged = [n for n in volumes if n.GetAttribute(ROLE_ATTRIBUTE) == ROLE_CT]
    # Volumes TwinRT made with another role (e.g. a dose uncertainty) are never CT candidates.
    candidates = tagged or [n for n in volumes if not n.GetAttribute(ROLE_ATTRIBUTE)]
    if not candidates:
        raise MissingInputError("The scene has no CT volume; load a CT (or a TwinRT scene) first")
    if len(candidates) > 1:
        names = ", ".join(n.GetName() for n in candidates)
        raise InvalidInputError(f"The scene has several CT candidates ({names}); select the CT volume")
    return candidates[0]


def checkNoTransform(node) -> None:
    if node.GetParentTransformNode() is not None:
        raise GeometryError(f"'{node.GetName()}' is under a transform; harden the transform "
                            "(Data module, right-click > Harden transform) before using it")


def _segmentationReferencesVolume(segmentation, volume) -> bool:
    return referenceVolumeId(segmentation) == volume.GetID()


def findSegmentation(scene, ctVolumeNode):
    """The segmentation of the CT: the one referencing it (``TwinRT.Role = Structures`` first).

    :return: the node, or ``None`` when the scene has no segmentation at all.
    :raises GeometryError: when segmentations exist but none references the CT.
    """
    segmentations = nodesByClass(scene, "vtkMRMLSegmentationNode")
    if not segmentations:
        return None
    # A segmentation that references another volume may be on another grid; guessing would
    # silently shift structures, so it is an error instead.
    referencing = [s for s in segmentations if _segmentationReferencesVolume(s, ctVolumeNode)]
    if not referencing:
        names = ", ".join(s.GetName() for s in segmentations)
        raise GeometryError(f"No segmentation references the CT '{ctVolumeNode.GetName()}' ({names} do not); "
                            "set the CT as the segmentation's reference geometry in Segment Editor")
    tagged = [s for s in referencing if s.GetAttribute(ROLE_ATTRIBUTE) == ROLE_STRUCTURES]
    return (tagged or referencing)[0]


def segmentMask(segmentationNode, segmentId: str, ctVolumeNode) -> np.ndarray:
    """A segment as a boolean (k, j, i) mask on the CT's voxel grid.

    Uses the segment's binary labelmap resampled to the CT geometry, which also undoes the extent
    cropping that .seg.nrrd files apply, and keeps only the segment's label value, so masks survive
    a save and reload unchanged.
    """
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    labelmap = slicer.vtkOrientedImageData()
    if not logic.GetSegmentBinaryLabelmapRepresentation(segmentationNode, segmentId, labelmap, False):
        raise StructureError(f"Segment '{segmentId}' of '{segmentationNode.GetName()}' has no binary "
                             "labelmap; convert it in the Segmentations module", segmentId)
    reference = logic.CreateOrientedImageDataFromVolumeNode(ctVolumeNode)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled):
        raise GeometryError(f"Could not resample segment '{segmentId}' to the CT grid")
    dims = resampled.GetDimensions()
    voxels = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    # After a .seg.nrrd reload, segments that do not overlap share one layer and differ by label
    # value, and the representation returned above is that whole shared layer.
    labelValue = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
    return voxels.reshape(dims[::-1]) == labelValue


def studyItemOf(node) -> int:
    """The subject-hierarchy study item ``node`` belongs to, or 0 when it is in no study.

    :param node: a data node in a scene.
    """
    return _studyItemOf(node.GetScene().GetSubjectHierarchyNode(), node)


def _studyItemOf(sh, node) -> int:
    item = sh.GetItemByDataNode(node)
    if not item:
        return 0
    return sh.GetItemAncestorAtLevel(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy())


def uniqueDoseName(scene, studyItem: int, base: str, exclude=None) -> str:
    """``base``, or ``base 2``, ``base 3``... when the study already has a dose of that name
    (:func:`sceneToCase` keys doses by name).

    :param exclude: a dose node whose own name does not count (one that is being refilled).
    """
    taken = {node.GetAttribute(DOSE_NAME_ATTRIBUTE) or node.GetName()
             for node in nodesByClass(scene, "vtkMRMLScalarVolumeNode")
             if node is not exclude and isDoseVolumeNode(node) and studyItemOf(node) == studyItem}
    name, number = base, 1
    while name in taken:
        number += 1
        name = f"{base} {number}"
    return name


def doseFromVolume(node, name: Optional[str] = None, scale: float = 1.0) -> Dose:
    """A scalar volume (Gy × ``scale``) as a :class:`twinrt.model.Dose` on the volume's grid.

    :param name: the dose name; default the node's ``TwinRT.DoseName`` attribute or its name.
    :raises GeometryError: the node is under a transform; :raises DoseError: NaN or negative voxels.
    """
    checkNoTransform(node)
    name = name or node.GetAttribute(DOSE_NAME_ATTRIBUTE) or node.GetName()
    array = np.array(slicer.util.arrayFromVolume(node), dtype=np.float32) * np.float32(scale)
    validate_dose_array(array, name)
    return Dose(array, volumeGrid(node), name, node.GetAttribute(DOSE_TYPE_ATTRIBUTE) or "PHYSICAL",
                node.GetAttribute(DOSE_SUMMATION_ATTRIBUTE) or "PLAN", node.GetAttribute(DOSE_SOURCE_ATTRIBUTE) or "")


def imageFromVolume(volumeNode) -> Image:
    """The volume as an :class:`Image` (a copy of its voxels, its grid in LPS, its modality tag; default CT).

    :raises GeometryError: the volume is under a transform.
    """
    checkNoTransform(volumeNode)
    # arrayFromVolume is a view on VTK memory; copy so the image outlives the node.
    return Image(np.array(slicer.util.arrayFromVolume(volumeNode), copy=True), volumeGrid(volumeNode),
                 volumeNode.GetAttribute(MODALITY_ATTRIBUTE) or "CT")


def structuresFromSegmentation(segmentationNode, referenceVolume) -> list[Structure]:
    """Every segment as a :class:`Structure` on ``referenceVolume``'s grid (type from the segment's tag,
    else guessed from its name; colour from the segment).

    :raises GeometryError: the segmentation is under a transform.
    """
    checkNoTransform(segmentationNode)
    grid = volumeGrid(referenceVolume)
    segmentation = segmentationNode.GetSegmentation()
    structures = []
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        name = segment.GetName()
        # The tag holds the enum name; segments made in Segment Editor have none, so guess.
        typeName = vtk.reference("")
        if segment.GetTag(STRUCTURE_TYPE_TAG, typeName) and str(typeName) in StructureType.__members__:
            stype = StructureType[str(typeName)]
        else:
            stype = StructureType.guess(name)
        color = tuple(int(round(c * 255)) for c in segment.GetColor())
        structures.append(Structure(name, segmentMask(segmentationNode, segmentId, referenceVolume), grid, color,
                                    stype))
    return structures


def sceneToCase(scene=None, ctVolumeNode=None, segmentationNode=None) -> Case:
    """Read a case back from a scene written by :func:`caseToScene` (or loaded by SlicerRT).

    :param scene: the MRML scene; default ``slicer.mrmlScene``.
    :param ctVolumeNode: the CT; found with :func:`findCtVolume` when omitted.
    :param segmentationNode: the structures; found with :func:`findSegmentation` when omitted. It
        must reference the CT (its reference image geometry).
    :return: the :class:`Case`: CT, structures on the CT grid, every dose volume of the CT's study
        (``DicomRtImport.DoseVolume``) in Gy, patient ID/name and metadata from subject hierarchy.
    :raises MissingInputError: no CT; :raises GeometryError: segmentation not referencing the CT,
        or nodes under a transform; :raises DoseError: dose with NaN/negative voxels or unknown unit.
    """
    scene = scene if scene is not None else slicer.mrmlScene
    if scene is None:
        raise InvalidInputError("No MRML scene: pass scene= or run inside Slicer")
    ct = ctVolumeNode if ctVolumeNode is not None else findCtVolume(scene)
    if not ct.IsA("vtkMRMLScalarVolumeNode") or isDoseVolumeNode(ct):
        raise InvalidInputError(f"'{ct.GetName()}' is not a CT volume; select the planning CT")
    image = imageFromVolume(ct)

    if segmentationNode is None:
        segmentationNode = findSegmentation(scene, ct)
    elif not _segmentationReferencesVolume(segmentationNode, ct):
        raise GeometryError(f"Segmentation '{segmentationNode.GetName()}' does not reference the CT "
                            f"'{ct.GetName()}'; set the CT as its reference geometry in Segment Editor")
    structures = structuresFromSegmentation(segmentationNode, ct) if segmentationNode is not None else []

    sh = scene.GetSubjectHierarchyNode()
    studyItem = _studyItemOf(sh, ct)
    unit = sh.GetItemAttribute(studyItem, DOSE_UNIT_NAME_ATTRIBUTE) if studyItem else ""
    scale = _doseScale(unit)
    doses = {}
    for node in nodesByClass(scene, "vtkMRMLScalarVolumeNode"):
        # Doses of other studies belong to other patients; unparented doses are accepted.
        if not isDoseVolumeNode(node) or (studyItem and _studyItemOf(sh, node) not in (studyItem, 0)):
            continue
        dose = doseFromVolume(node, scale=scale)
        doses[dose.name] = dose

    metadata, patientId, plans = {}, "", []
    if studyItem:
        metadata = _decodeMetadata(sh.GetItemAttribute(studyItem, CASE_METADATA_ATTRIBUTE))
        auditLog = _readAuditLog(sh, studyItem)
        if len(auditLog):
            metadata[AUDIT_METADATA_KEY] = auditLog.entries
        plansText = sh.GetItemAttribute(studyItem, PLANS_ATTRIBUTE)
        if plansText:
            plans = [planFromDict(p) for p in json.loads(plansText)]
        patientItem = sh.GetItemParent(studyItem)
        if patientItem:
            constants = slicer.vtkMRMLSubjectHierarchyConstants
            patientId = sh.GetItemAttribute(patientItem, constants.GetDICOMPatientIDAttributeName())
            patientName = sh.GetItemAttribute(patientItem, constants.GetDICOMPatientNameAttributeName())
            if patientName:
                metadata.setdefault("patient_name", patientName)
            patientId = patientId or sh.GetItemName(patientItem)
    patientId = patientId or ct.GetAttribute(PATIENT_ID_ATTRIBUTE) or "anonymous"
    return Case(patientId, image, structures, doses, plans, metadata)


def _readAuditLog(sh, studyItem: int) -> AuditLog:
    """The study's audit log, unverified; a broken hash chain is logged, not raised, so that the
    case (and the evidence of tampering) still loads; appending to it is then refused."""
    text = sh.GetItemAttribute(studyItem, AUDIT_LOG_ATTRIBUTE) or ""
    auditLog = AuditLog.from_jsonl(text, verify=False)
    try:
        auditLog.verify()
    except AuditLogError as exc:
        logging.warning("The audit log of study '%s' fails verification: %s", sh.GetItemName(studyItem), exc)
    return auditLog


def studyAuditLog(studyItem: int, scene=None) -> AuditLog:
    """The audit log stored on a study item (empty when none); append to it, then :func:`setStudyAuditLog`.

    :param studyItem: subject-hierarchy study item (e.g. :func:`studyItemOf` of a node).
    :param scene: the MRML scene; default ``slicer.mrmlScene``.
    """
    sh = (scene or slicer.mrmlScene).GetSubjectHierarchyNode()
    return _readAuditLog(sh, studyItem)


def setStudyAuditLog(studyItem: int, auditLog: AuditLog, scene=None) -> None:
    """Store ``auditLog`` on the study item; it must extend what is stored (append-only).

    :param studyItem: subject-hierarchy study item.
    :param auditLog: the log (verified here).
    :param scene: the MRML scene; default ``slicer.mrmlScene``.
    :raises AuditLogError: the log is damaged or would drop entries already in the scene.
    """
    sh = (scene or slicer.mrmlScene).GetSubjectHierarchyNode()
    auditLog.verify()
    if not auditLog.extends(_readAuditLog(sh, studyItem)):
        raise AuditLogError("The scene's audit log has entries this log does not; read it with studyAuditLog, "
                            "append, and store it again")
    sh.SetItemAttribute(studyItem, AUDIT_LOG_ATTRIBUTE, auditLog.to_jsonl())


def _doseScale(unit: str) -> float:
    """Factor from the study's dose unit to Gy; an absent unit is taken as Gy (TwinRT's default)."""
    normalized = (unit or "").strip().upper()
    if normalized in ("", "GY"):
        if not normalized:
            logging.debug("sceneToCase: no %s on the study; assuming Gy", DOSE_UNIT_NAME_ATTRIBUTE)
        return 1.0
    if normalized == "CGY":
        return 0.01
    raise DoseError(f"Dose unit '{unit}' is not supported; TwinRT needs physical dose in Gy or cGy")


def planToDict(plan: Plan) -> dict[str, Any]:
    """A JSON-ready dict of a plan (what :func:`caseToScene` stores in ``TwinRT.Plans``).

    :param plan: the plan; :class:`twinrt.planning.plan.PlanBeam` beams and open-field dicts are both kept.
    """
    ok, data = _jsonable(plan)
    if not ok:
        raise InvalidInputError(f"Plan '{plan.label}' holds values that cannot be stored as JSON")
    return data


def planFromDict(data: dict) -> Plan:
    """The plan of a :func:`planToDict` dict (e.g. from ``TwinRT.Plans`` or ``AIPlanner.Plan``).

    :param data: the dict.
    """
    from twinrt.planning.plan import PlanBeam

    prescriptions = [Prescription(**p) for p in data.get("prescriptions", [])]
    # Sequenced beams (a "beam" geometry plus "segments") come back as PlanBeam; open-field dicts stay dicts.
    beams = [PlanBeam.from_dict(b) if isinstance(b, dict) and "segments" in b and "beam" in b else b
             for b in data.get("beams", [])]
    # ``approval`` is derived from the review fields (twinrt.model.approval_status); dicts written
    # before review fields existed come back as drafts.
    return Plan(data.get("label", "TwinRT"), prescriptions, beams, data.get("approval", "UNAPPROVED"),
                data.get("radiation_type", "PHOTON"), data.get("state", "draft"), data.get("reviewer_name", ""),
                data.get("review_datetime", ""), data.get("review_comment", ""))


# --------------------------------------------------------------------------------------------------
def saveSceneMrb(scene, path: str | os.PathLike) -> Path:
    """Save a scene as a Medical Reality Bundle (.mrb), atomically.

    The bundle is written to a temporary file beside ``path`` and renamed onto it only when
    complete, so a failure never leaves a truncated .mrb (or destroys an older one).

    :param scene: the MRML scene.
    :param path: the .mrb file to write.
    :return: ``path``.
    :raises InvalidInputError: when the extension is not .mrb or Slicer cannot write the bundle.
    """
    import shutil
    import tempfile

    path = Path(path)
    if path.suffix.lower() != ".mrb":
        raise InvalidInputError(f"Scene bundle must end in .mrb, got '{path.name}'")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The bundle's inner folder and .mrml file are named after the file, so the temporary copy
    # keeps the final name and lives in a hidden folder beside it (same disk: os.replace is atomic).
    tmpDir = Path(tempfile.mkdtemp(prefix=".twinrt-mrb-", dir=path.parent))
    try:
        tmpMrb = tmpDir / path.name
        if not scene.WriteToMRB(str(tmpMrb)) or not tmpMrb.is_file():
            raise InvalidInputError(f"Slicer could not write the scene bundle {path}; check the disk "
                                    "space and that the folder is writable")
        os.replace(tmpMrb, path)
    finally:
        shutil.rmtree(tmpDir, ignore_errors=True)
    return path


def loadSceneMrb(path: str | os.PathLike, scene=None):
    """Load a .mrb bundle.

    :param path: the .mrb file.
    :param scene: scene to load into (its content is replaced); default: ``slicer.mrmlScene`` inside
        Slicer, a new headless scene (:func:`TwinRTCommon.scene.makeScene`) outside it.
    :return: the scene.
    :raises MissingInputError: when the file does not exist; :raises InvalidInputError: when it
        cannot be read as a scene bundle.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"Scene bundle {path} does not exist", path)
    if scene is None:
        from TwinRTCommon import scene as sceneFactory

        scene = slicer.mrmlScene if sceneFactory.isRealSlicer() else sceneFactory.makeScene()[0]
    # clear=True: a bundle is a whole scene; merging two would duplicate singletons and IDs.
    if not scene.ReadFromMRB(str(path), True):
        raise InvalidInputError(f"{path} is not a readable Slicer scene bundle; re-save it from Slicer")
    return scene


def importCaseFolder(folder: str | os.PathLike, scene=None, **kwargs) -> tuple[Case, dict[str, Any]]:
    """Import a DICOM patient folder (CT, RTSTRUCT, RTDOSE) and put it in the scene.

    :param folder: folder with the patient's DICOM files.
    :param scene: the MRML scene; default ``slicer.mrmlScene``.
    :param kwargs: passed to :func:`caseToScene`.
    :return: ``(case, created nodes)``.
    """
    from twinrt.dicom.folder import import_case

    # Import first: a DICOM error then leaves the scene untouched without needing a rollback.
    case = import_case(Path(folder))
    return case, caseToScene(case, scene, **kwargs)


__all__ = ["caseToScene", "sceneToCase", "saveSceneMrb", "loadSceneMrb", "importCaseFolder", "fillTable",
           "tableToRows", "nodeIds", "volumeGrid", "segmentMask", "findCtVolume", "findSegmentation",
           "isDoseVolumeNode", "metricUnit", "sceneTransaction", "addDoseVolume", "addDvh", "studyItemOf",
           "planToDict", "planFromDict", "tagNode", "studyAuditLog", "setStudyAuditLog", "TwinRTError"]
