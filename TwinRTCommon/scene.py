"""A headless MRML scene built from slicer-core, and stand-ins for what only Slicer's application has.

Outside Slicer (CI, the ``twinrt`` CLI scene writer, pytest) there is no ``slicer.app`` and no
``slicer.mrmlScene``, yet the MRML nodes and module logics of ``slicer-core`` are real. This module
builds a scene the way ``../shared/SLICER_CORE.md`` documents it and, on request, assigns
``slicer.mrmlScene`` / ``slicer.app`` / ``slicer.modules`` / ``slicer.i18n`` stand-ins so that
``slicer.util`` helpers (``arrayFromSegmentBinaryLabelmap``, ``getNode``...) work unchanged.

Inside Slicer nothing here is needed: :func:`isRealSlicer` tells the two apart and
:func:`installApplicationStandIns` refuses to overwrite a real application.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import types

#: Module logics registered on the headless application logic, in this order. Colors comes first
#: (added separately): the Volumes logic looks it up on registration and logs errors without it.
_LOGIC_CLASSES = [
    ("Volumes", "vtkSlicerVolumesLogic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    ("Tables", "vtkSlicerTablesLogic"),
    ("Plots", "vtkSlicerPlotsLogic"),
    ("Markups", "vtkSlicerMarkupsLogic"),
    ("Sequences", "vtkSlicerSequencesLogic"),
]

#: Keeps every headless scene's application/IO logics alive for the life of the process. The
#: logics do not own them, and a collected vtkSlicerApplicationLogic makes
#: ImportLabelmapToSegmentationNode segfault (SLICER_CORE.md, "Pitfalls").
_KEEP_ALIVE: list = []


def isRealSlicer() -> bool:
    """True inside the Slicer application (``slicer.app`` exists and is not our stand-in)."""
    import slicer

    app = getattr(slicer, "app", None)
    return app is not None and not isinstance(app, HeadlessApplication)


def makeScene():
    """Create a real slicer-core MRML scene with the module logics TwinRT uses.

    :return: ``(scene, logics)``; ``logics`` maps a module name (``"Volumes"``, ``"Segmentations"``,
        ``"SubjectHierarchy"``, ``"Tables"``, ``"Plots"``, ``"Markups"``, ``"Sequences"``,
        ``"Colors"``) to its logic, plus ``"_keepalive"`` (application, remote IO and data IO logics).
    """
    import slicer

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    logics = {"Colors": colors}
    for name, className in _LOGIC_CLASSES:
        logic = getattr(slicer, className)()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    # ReadFromMRB/WriteToMRB go through the data IO manager, which needs a cache folder.
    remoteIo = slicer.vtkMRMLRemoteIOLogic()
    remoteIo.SetMRMLScene(scene)
    remoteIo.SetMRMLApplicationLogic(app)
    remoteIo.GetCacheManager().SetRemoteCacheDirectory(tempfile.mkdtemp(prefix="twinrt-mrml-cache-"))
    dataIo = slicer.vtkDataIOManagerLogic()
    dataIo.SetMRMLScene(scene)
    dataIo.SetMRMLApplicationLogic(app)
    dataIo.SetAndObserveDataIOManager(remoteIo.GetDataIOManager())
    remoteIo.AddDataIOToScene()
    logics["_keepalive"] = (app, remoteIo, dataIo)
    _KEEP_ALIVE.append((scene, logics))
    return scene, logics


class _ModuleStandIn:
    """``slicer.modules.<name>``: only ``logic()`` (and ``name``/``path``) exist headless."""

    def __init__(self, name: str, logic, path: str = ""):
        self.name = name
        self.path = path
        self._logic = logic

    def logic(self):
        return self._logic


class HeadlessApplication:
    """The part of ``slicer.app`` that Logic code and ``slicer.util`` touch when there is no GUI.

    Signals are recorded, not emitted: :meth:`connect` stores the callback and :meth:`emit` (used by
    tests) calls them, so a module's ``startupCompleted()`` hook can be exercised.
    """

    def __init__(self, scene, logics):
        self._scene = scene
        self._logics = logics
        self._connections: dict[str, list] = {}
        self.temporaryPath = tempfile.mkdtemp(prefix="twinrt-slicer-tmp-")
        self.commandOptions = types.SimpleNamespace(noMainWindow=True, testingEnabled=True)

    def mrmlScene(self):
        return self._scene

    def applicationLogic(self):
        return self._logics["_keepalive"][0]

    def testingEnabled(self) -> bool:
        return True

    def processEvents(self, *args) -> None:
        return None

    def connect(self, signal: str, callback) -> bool:
        self._connections.setdefault(signal, []).append(callback)
        return True

    def emit(self, signal: str) -> None:
        """Call every callback connected to ``signal`` (a test helper; Slicer's app has no such method)."""
        for callback in list(self._connections.get(signal, [])):
            callback()


def installApplicationStandIns(scene=None, logics=None):
    """Assign ``slicer.mrmlScene``, ``slicer.app``, ``slicer.modules`` and ``slicer.i18n`` stand-ins.

    :param scene: the scene to expose as ``slicer.mrmlScene``; a new one from :func:`makeScene`
        when omitted (then ``logics`` is ignored).
    :param logics: the dict :func:`makeScene` returned with ``scene``.
    :return: the scene now in ``slicer.mrmlScene``.
    :raises RuntimeError: inside the real Slicer application, whose globals must not be replaced.
    """
    import slicer

    if isRealSlicer():
        raise RuntimeError("installApplicationStandIns is for headless slicer-core only; "
                           "inside Slicer use slicer.mrmlScene directly")
    if scene is None or logics is None:
        scene, logics = makeScene()
    slicer.mrmlScene = scene
    slicer.app = HeadlessApplication(scene, logics)
    modules = getattr(slicer, "modules", None)
    if not isinstance(modules, types.SimpleNamespace):
        modules = types.SimpleNamespace()
    # Lower-case attribute names, as Slicer exposes them (slicer.modules.segmentations.logic()).
    for name, logic in logics.items():
        if not name.startswith("_"):
            setattr(modules, name.lower(), _ModuleStandIn(name, logic))
    slicer.modules = modules
    installI18nStandIn()
    return scene


def installI18nStandIn() -> None:
    """Provide ``slicer.i18n.tr`` / ``translate`` (identity functions) when slicer-core lacks them.

    Slicer's real ``slicer.i18n`` looks strings up in Qt translation catalogues; headless there is no
    catalogue, so returning the English source text is exactly what Slicer does for an untranslated
    string.
    """
    import slicer

    if "slicer.i18n" in sys.modules:
        return
    i18n = types.ModuleType("slicer.i18n")

    def tr(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

    i18n.tr = tr
    i18n.translate = translate
    sys.modules["slicer.i18n"] = i18n
    slicer.i18n = i18n
    logging.debug("Installed headless slicer.i18n stand-in")
