"""Parameter-node and scene plumbing shared by the Widget classes of the five TwinRT modules.

Each ``<Module>Widget`` derives from :class:`CaseModuleWidgetMixin` *before*
``ScriptedLoadableModuleWidget`` (so the mixin's ``cleanup``/``enter``/``exit`` win over the base's
empty ones) and keeps only what is its own: ``setup()`` (it creates its Logic, then calls
:meth:`CaseModuleWidgetMixin.setupCaseModule`), ``onApplyButton`` and ``canApply``, the rule that
says when Apply may run. The rest is Slicer's scripted-module template (Slicer/Slicer:
``Utilities/Templates/Modules/Scripted/TemplateKey.py``) written once.

Nothing here imports Qt or ``slicer.i18n`` at module level: the headless harness
(Testing/Python/slicer_harness.py) imports every ``<Module>.py``, and with it this file, without Qt.
"""

from __future__ import annotations

import vtk

import slicer
from slicer.util import VTKObservationMixin


class CaseModuleWidgetMixin:
    """Binds ``UI/<Module>.ui`` to the module's parameter node; loads a case from the sample or DICOM.

    The module's Widget must provide ``onApplyButton()`` and set ``applyRequires`` and the tooltips, and may
    override ``preselectInputs(parameters)``. The Logic it passes to :meth:`setupCaseModule` is a
    :class:`TwinRTCommon.logic.CaseLogicMixin` with ``getParameterNode`` and ``stageStatusText``.
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        super().__init__(parent)  # ScriptedLoadableModuleWidget, next in the module Widget's bases
        # Slicer's ScriptedLoadableModuleWidget.__init__ does not chain to super(), so the observation
        # mixin (needed for parameter node observation) is initialized by name.
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setupCaseModule(self, logic) -> None:
        """Load the module's .ui, connect the shared buttons and bind the parameter node.

        Call from ``setup()`` after ``ScriptedLoadableModuleWidget.setup(self)``; it stays cheap and
        never prompts, because Slicer's generic test (``WITH_GENERIC_TESTS``) builds the widget.

        :param logic: the module's Logic, kept as ``self.logic``.
        """
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # Set scene in MRML widgets; the .ui forwards mrmlSceneChanged to every node selector.
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = logic
        self.ui.statusLabel.text = self.logic.stageStatusText()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSampleButton)
        self.ui.importDicomButton.connect("directoryChanged(QString)", self.onImportDicomFolder)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure the parameter node exists and is observed; preselect the obvious inputs."""
        self.setParameterNode(self.logic.getParameterNode())
        self.preselectInputs(self._parameterNode)

    def preselectInputs(self, parameters) -> None:
        """Fill empty inputs from the scene; by default the scene's only CT becomes ``inputVolume``.

        :param parameters: the module's parameter node (wrapper).
        """
        if not parameters.inputVolume:
            parameters.inputVolume = self.logic.findCtVolume()

    def setParameterNode(self, inputParameterNode) -> None:
        """Bind the GUI to ``inputParameterNode`` (widgets carry SlicerParameterName properties).

        :param inputParameterNode: the module's parameter node (wrapper), or None to unbind.
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    #: Parameter names that must be set before Apply can run (each module's Widget sets its own).
    applyRequires: tuple[str, ...] = ()
    #: Apply tooltips when ready and when something is missing (each module sets translated text).
    applyReadyToolTip = ""
    applyMissingToolTip = ""

    def canApply(self, parameters) -> tuple[bool, str]:
        """Whether Apply may run, and the Apply tooltip, from :attr:`applyRequires`.

        :param parameters: the module's parameter node (wrapper), never None.
        :return: ``(ready, toolTip)``; when not ready the tooltip says what to select.
        """
        ready = bool(self.applyRequires) and all(getattr(parameters, name) for name in self.applyRequires)
        return ready, self.applyReadyToolTip if ready else self.applyMissingToolTip

    def _checkCanApply(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        ready, toolTip = self.canApply(parameters) if parameters else (False, "")
        self.ui.applyButton.enabled = ready
        # Say what is missing rather than leaving a greyed-out button unexplained.
        self.ui.applyButton.toolTip = toolTip

    def onLoadSampleButton(self) -> None:
        """Load the bundled sample patient through the TwinRT case path."""
        from slicer.i18n import tr as _

        with slicer.util.tryWithErrorDisplay(_("Failed to load the TwinRT sample patient."), waitCursor=True):
            self.logic.loadSampleCase()
            self.initializeParameterNode()

    def onImportDicomFolder(self, folder: str) -> None:
        """Import a DICOM patient folder (CT, RTSTRUCT, RTDOSE) into the scene.

        :param folder: the folder the directory button selected; empty when the user cancelled.
        """
        from slicer.i18n import tr as _

        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the DICOM folder."), waitCursor=True):
            self.logic.importCase(folder)
            self.initializeParameterNode()
