"""Case-loading methods shared by the Logic classes of the five TwinRT modules.

Each ``<Module>Logic`` derives from ``ScriptedLoadableModuleLogic`` *and* :class:`CaseLogicMixin`,
so a patient enters any module the same way (through :mod:`TwinRTCommon.mrmlio`) and a stage that
has not been built yet fails (:class:`twinrt.errors.StageNotAvailableError`) and reports its status
the same way.
The mixin holds no state and never touches widgets, so it works in batch mode and in tests.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import slicer

from twinrt.errors import StageNotAvailableError
from twinrt.model import Case


class CaseLogicMixin:
    """``importCase`` / ``loadSampleCase`` / ``caseToScene`` / ``sceneToCase`` for module logics."""

    #: Human-readable stage name and the issue that builds it; set by each module's Logic.
    stageName = "TwinRT stage"
    stageIssue: Optional[str] = None

    def importCase(self, folder: str | os.PathLike, scene=None) -> dict[str, Any]:
        """Import a DICOM patient folder (CT, RTSTRUCT, RTDOSE) into the scene.

        :param folder: folder holding the patient's DICOM files.
        :param scene: the MRML scene; default ``slicer.mrmlScene``.
        :return: the created nodes (see :func:`TwinRTCommon.mrmlio.caseToScene`).
        :raises twinrt.errors.MissingInputError: the folder does not exist or holds no CT.
        :raises twinrt.errors.DicomImportError: a file cannot be imported; the scene is unchanged.
        """
        from TwinRTCommon import mrmlio

        _case, created = mrmlio.importCaseFolder(folder, scene if scene is not None else slicer.mrmlScene)
        return created

    def loadSampleCase(self, scene=None) -> dict[str, Any]:
        """Load the bundled sample patient (OpenKBP pt_236) into the scene.

        :param scene: the MRML scene; default ``slicer.mrmlScene``.
        :return: the created nodes.
        :raises twinrt.errors.MissingInputError: when this TwinRT installation lacks the sample.
        """
        from twinrt.sample import sample_dicom_dir

        return self.importCase(sample_dicom_dir(), scene)

    def caseToScene(self, case: Case, scene=None, **kwargs) -> dict[str, Any]:
        """Put an in-memory case into the scene (:func:`TwinRTCommon.mrmlio.caseToScene`).

        :param case: the patient.
        :param scene: the MRML scene; default ``slicer.mrmlScene``.
        :param kwargs: ``doseName``, ``computeDvh``, ``progress``.
        :return: the created nodes; on error the scene is left as it was.
        """
        from TwinRTCommon import mrmlio

        return mrmlio.caseToScene(case, scene if scene is not None else slicer.mrmlScene, **kwargs)

    def sceneToCase(self, scene=None, ctVolumeNode=None, segmentationNode=None) -> Case:
        """Read the case back from the scene (:func:`TwinRTCommon.mrmlio.sceneToCase`).

        :param scene: the MRML scene; default ``slicer.mrmlScene``.
        :param ctVolumeNode: the CT; found automatically when omitted.
        :param segmentationNode: the structures; must reference the CT.
        """
        from TwinRTCommon import mrmlio

        return mrmlio.sceneToCase(scene if scene is not None else slicer.mrmlScene, ctVolumeNode,
                                  segmentationNode)

    def findCtVolume(self, scene=None):
        """The scene's CT for preselection in the GUI, or None when there is none or several.

        :param scene: the MRML scene; default ``slicer.mrmlScene``.
        """
        from twinrt.errors import InvalidInputError, MissingInputError

        from TwinRTCommon import mrmlio

        try:
            return mrmlio.findCtVolume(scene if scene is not None else slicer.mrmlScene)
        # MissingInputError (no CT: an empty scene, as when a module opens) is a FileNotFoundError,
        # not an InvalidInputError, so both are caught: either way there is nothing to preselect.
        except (InvalidInputError, MissingInputError):
            return None

    def findSegmentation(self, ctVolume):
        """The segmentation referencing ``ctVolume`` (for preselection), or None."""
        from twinrt.errors import InvalidInputError

        from TwinRTCommon import mrmlio

        try:
            return mrmlio.findSegmentation(ctVolume.GetScene(), ctVolume)
        except InvalidInputError:
            return None

    #: Optional ``logCallback(text)`` for the Widget's log (STYLE.md section 8).
    logCallback: Optional[Callable[[str], None]] = None

    def log(self, text: str, level: int = logging.INFO) -> None:
        """Log a line, and pass it to :attr:`logCallback` when the Widget set one."""
        logging.log(level, text)
        if self.logCallback:
            self.logCallback(text)

    def stageStatusText(self) -> str:
        """The text of the module panel's status label (the .ui carries the same text until setup)."""
        # Imported here: slicer.i18n exists only in the Slicer application (the headless harness
        # installs a stand-in before any module is imported).
        from slicer.i18n import tr as _

        return _("Not available yet: {stage} is built by issue {issue}.").format(
            stage=self.stageName, issue=self.stageIssue)

    def stageNotAvailable(self) -> StageNotAvailableError:
        """The error a module raises while its stage is not built; its text names the issue."""
        return StageNotAvailableError(
            f"{self.stageName} is not available yet: it is built by issue {self.stageIssue}. "
            "Until then this module can load and show a case but not compute its result.")


def checkCtVolume(node, what: str = "CT volume"):
    """Raise :class:`InvalidInputError` unless ``node`` is a scalar volume with voxels and not a dose.

    :param node: the node the user selected.
    :param what: how the UI calls this input, for the message.
    :return: the node.
    """
    from twinrt.errors import InvalidInputError

    from TwinRTCommon import mrmlio

    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InvalidInputError(f"Select a {what} (a scalar volume) first")
    if node.GetImageData() is None:
        raise InvalidInputError(f"The {what} '{node.GetName()}' has no voxels; load it again")
    if mrmlio.isDoseVolumeNode(node):
        raise InvalidInputError(f"'{node.GetName()}' is a dose volume; select the planning CT as {what}")
    return node


def checkDoseVolume(node):
    """Raise :class:`InvalidInputError` unless ``node`` is a dose volume (``DicomRtImport.DoseVolume``)."""
    from twinrt.errors import InvalidInputError

    from TwinRTCommon import mrmlio

    if not mrmlio.isDoseVolumeNode(node):
        name = node.GetName() if node is not None else "nothing"
        raise InvalidInputError(f"Select a dose volume (got {name}); a volume becomes a dose volume when "
                                "it is imported from RTDOSE or converted in the Data module")
    return node


def checkSegmentation(segmentationNode, ctVolumeNode=None):
    """Raise unless ``segmentationNode`` is a segmentation (referencing ``ctVolumeNode`` when given).

    :raises InvalidInputError: not a segmentation; :raises GeometryError: it does not reference the CT.
    """
    from twinrt.errors import GeometryError, InvalidInputError

    if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
        raise InvalidInputError("Select the structures (a segmentation) first")
    if ctVolumeNode is not None:
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        if segmentationNode.GetNodeReferenceID(role) != ctVolumeNode.GetID():
            raise GeometryError(f"Segmentation '{segmentationNode.GetName()}' does not reference the CT "
                                f"'{ctVolumeNode.GetName()}'; set the CT as its reference geometry in "
                                "Segment Editor")
    return segmentationNode
