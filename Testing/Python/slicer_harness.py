"""Headless harness: run TwinRT module Logic and self-tests against a real slicer-core scene.

WIDGETS ARE NOT EXERCISED HERE. There is no Qt, PythonQt or CTK outside Slicer, so this harness
gives the modules exactly what ``../shared/SLICER_CORE.md`` says cannot exist headless, and nothing
more:

* a real MRML scene with real module logics (:func:`TwinRTCommon.scene.makeScene`), exposed as
  ``slicer.mrmlScene`` with ``slicer.app`` / ``slicer.modules`` / ``slicer.i18n`` stand-ins
  (:func:`TwinRTCommon.scene.installApplicationStandIns`), so ``slicer.util`` works unchanged;
* ``slicer.ScriptedLoadableModule``: the base classes with Slicer's parameter-node semantics
  (``getParameterNode`` stores one ``vtkMRMLScriptedModuleNode`` per module as a scene singleton,
  tagged ``ModuleName``), and ``ScriptedLoadableModuleTest`` with ``delayDisplay``;
* ``slicer.parameterNodeWrapper``: typed attribute access backed by the scripted module node's
  parameters and node references, enough for Logic and Test code (``connectGui`` is a no-op), and
  observable like the real wrapper (``AddObserver`` forwards to the node);
* ``qt`` and ``ctk``: inert modules, only so that ``<Module>.py`` can be imported.

Widget behaviour (the .ui binding, buttons) is checked inside Slicer by ``WITH_GENERIC_TESTS`` and
``slicer_add_python_unittest`` (``ctest``); here the tests check the .ui files statically, and the
Widgets' parameter-node plumbing (no ``setup()``, no Qt) against a plain-object stand-in for ``ui``.

Nothing imports slicer at module import time: a plain-Python run of the core tests never pays for
(or needs) slicer-core.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
import types
import typing
import unittest
from pathlib import Path

#: Repository root (this file is Testing/Python/slicer_harness.py).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The five module folders; each holds <Module>.py.
MODULE_NAMES = ("AutoContour", "DosePredict", "AIPlanner", "DigitalTwin", "ToxicityMonitor")


def addSourcePaths() -> None:
    """Make ``twinrt``, ``TwinRTCommon`` and every ``<Module>.py`` importable, as Slicer does."""
    for path in [REPO_ROOT] + [REPO_ROOT / name for name in MODULE_NAMES]:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


# ------------------------------------------------------------------------------------------ qt/ctk
class _Inert:
    """Accepts any construction, call or attribute access and does nothing (qt/ctk placeholders)."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __getattr__(self, name):
        return _Inert()

    def __bool__(self):
        # Falsy, so code that tests for a widget ("if self.ui:") takes the headless path.
        return False


class _InertModule(types.ModuleType):
    """A module whose every attribute is an inert class: enough for ``import qt`` to succeed."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Inert,), {})


# ------------------------------------------------------------------ slicer.ScriptedLoadableModule
def _makeScriptedLoadableModule() -> types.ModuleType:
    import slicer

    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        """Stand-in for Slicer's base class: fills the ``parent`` descriptor and finds resources."""

        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__
            for attribute, default in (("title", ""), ("categories", []), ("dependencies", []),
                                       ("contributors", []), ("helpText", ""), ("acknowledgementText", "")):
                if not hasattr(parent, attribute):
                    setattr(parent, attribute, default)

        def getDefaultModuleDocumentationLink(self, docPage=None):
            return ""

        def resourcePath(self, filename):
            moduleDir = os.path.dirname(sys.modules[self.__class__.__module__].__file__)
            return os.path.join(moduleDir, "Resources", filename)

        def runTest(self, msec=100, **kwargs):
            testCase = getattr(sys.modules[self.__class__.__module__], self.moduleName + "Test")()
            testCase.messageDelay = msec
            testCase.runTest(**kwargs)

    class ScriptedLoadableModuleWidget:
        """Importable only: widgets need Qt and are never built headless."""

        def __init__(self, parent=None):
            self.parent = parent
            self.moduleName = self.__class__.__name__[:-len("Widget")]

        def setup(self):
            raise NotImplementedError("Widgets are not exercised by the headless harness; use Slicer's ctest")

        def resourcePath(self, filename):
            moduleDir = os.path.dirname(sys.modules[self.__class__.__module__].__file__)
            return os.path.join(moduleDir, "Resources", filename)

    class ScriptedLoadableModuleLogic:
        """Slicer's parameter-node semantics: one scripted-module node per module, a scene singleton."""

        def __init__(self, parent=None):
            self.parent = parent
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[:-len("Logic")]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            # As in Slicer: the singleton tag is the module name, so a reloaded scene finds its node.
            if self.isSingletonParameterNode:
                node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
                if node:
                    return node
            node = self.createParameterNode()
            if self.isSingletonParameterNode:
                node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            return slicer.mrmlScene.AddNode(node)

        def createParameterNode(self):
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetHideFromEditors(True)
            self.setDefaultParameters(node)
            return node

        def setDefaultParameters(self, parameterNode):
            pass

        def getAllParameterNodes(self):
            nodes = slicer.mrmlScene.GetNodesByClass("vtkMRMLScriptedModuleNode")
            return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())
                    if nodes.GetItemAsObject(i).GetAttribute("ModuleName") == self.moduleName]

    class ScriptedLoadableModuleTest(unittest.TestCase):
        """``delayDisplay`` logs instead of showing a message box."""

        messageDelay = 0

        def delayDisplay(self, message, requestedDelay=None, msec=None):
            logging.info(message)

        def takeScreenshot(self, name, description, type=-1):
            logging.info("Screenshot skipped (headless): %s", name)

        def runTest(self):
            pass

    module.ScriptedLoadableModule = ScriptedLoadableModule
    module.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    module.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    module.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    module.__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                      "ScriptedLoadableModuleTest"]
    return module


# ------------------------------------------------------------------------- slicer.parameterNodeWrapper
class WithinRange:
    """``Annotated[float, WithinRange(low, high)]``: values outside raise ``ValueError``."""

    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value {value} is outside [{self.minimum}, {self.maximum}]")


class Choice:
    """``Annotated[str, Choice([...])]``: values not in the list raise ``ValueError``."""

    def __init__(self, choices):
        self.choices = list(choices)

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"Value {value!r} is not one of {self.choices}")


class Default:
    """``Annotated[T, Default(value)]``: the default when the class body gives none."""

    def __init__(self, value):
        self.value = value


_MISSING = object()


def _splitHint(hint):
    """(base type, annotations, optional) of a type hint such as ``Annotated[Optional[T], ...]``."""
    annotations = []
    if typing.get_origin(hint) is typing.Annotated:
        hint, *annotations = typing.get_args(hint)
    optional = False
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    return hint, annotations, optional


def _isNodeType(base) -> bool:
    import slicer

    return isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode)


def parameterNodeWrapper(cls):
    """Stand-in for ``slicer.parameterNodeWrapper.parameterNodeWrapper``.

    Each annotated class attribute becomes a property: nodes are stored as node references named
    after the attribute, everything else as text parameters (enums by member *name*, as Slicer does).
    """
    # include_extras keeps Annotated[...] so WithinRange and Default survive, as in Slicer.
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {}
    for name, hint in hints.items():
        base, annotations, optional = _splitHint(hint)
        default = cls.__dict__.get(name, _MISSING)
        for annotation in annotations:
            if isinstance(annotation, Default):
                default = annotation.value
        if default is _MISSING:
            default = None if (optional or _isNodeType(base)) else (base() if base in (int, float, str, bool) else None)
        fields[name] = (base, [a for a in annotations if hasattr(a, "validate")], default)

    def _read(self, name):
        base, _validators, _default = fields[name]
        node = self.parameterNode
        if _isNodeType(base):
            # Node references (not IDs in parameters) so that scene import renames them correctly.
            return node.GetNodeReference(name)
        text = node.GetParameter(name)
        if base is bool:
            return text == "True"
        if isinstance(base, type) and issubclass(base, enum.Enum):
            return base[text] if text else None
        if base is Path:
            return Path(text) if text else None
        return base(text) if text != "" or base is str else None

    def _write(self, name, value):
        base, validators, _default = fields[name]
        node = self.parameterNode
        if _isNodeType(base):
            if value is not None and not value.IsA(base.__name__):
                raise TypeError(f"{name} must be a {base.__name__}, got {value.GetClassName()}")
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            return
        if value is not None:
            for validator in validators:
                validator.validate(value)
        if isinstance(value, enum.Enum):
            text = value.name
        elif isinstance(value, float):
            text = repr(value)
        else:
            text = "" if value is None else str(value)
        node.SetParameter(name, text)

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        # Defaults are written once, the first time a node is wrapped, like the real wrapper does.
        for name, (base, _validators, default) in fields.items():
            if not _isNodeType(base) and not parameterNode.GetParameterNames().count(name) and default is not None:
                _write(self, name, default)

    def connectGui(self, gui):
        return object()  # the tag disconnectGui expects; there is no GUI to bind headless

    def disconnectGui(self, tag):
        return None

    namespace = {"__init__": __init__, "connectGui": connectGui, "disconnectGui": disconnectGui,
                 "allParameters": dict(fields), "isParameterNodeWrapper": True,
                 # Forwarded to the node as the real wrapper does, so VTKObservationMixin can observe it.
                 "AddObserver": lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
                     event, callback, priority),
                 "RemoveObserver": lambda self, tag: self.parameterNode.RemoveObserver(tag),
                 "Modified": lambda self: self.parameterNode.Modified(),
                 "StartModify": lambda self: self.parameterNode.StartModify(),
                 "EndModify": lambda self, wasModified: self.parameterNode.EndModify(wasModified)}
    for name in fields:
        namespace[name] = property(lambda self, n=name: _read(self, n), lambda self, v, n=name: _write(self, n, v))
    kept = {k: v for k, v in cls.__dict__.items() if k not in fields and k not in ("__dict__", "__weakref__")}
    return type(cls.__name__, (), {**kept, **namespace})


def _makeParameterNodeWrapperModule() -> types.ModuleType:
    module = types.ModuleType("slicer.parameterNodeWrapper")
    module.parameterNodeWrapper = parameterNodeWrapper
    module.WithinRange = WithinRange
    module.Choice = Choice
    module.Default = Default
    module.__all__ = ["parameterNodeWrapper", "WithinRange", "Choice", "Default"]
    return module


# --------------------------------------------------------------------------------------- install
def installStandIns() -> None:
    """Install the stand-in modules (idempotent). Refuses to run inside the Slicer application."""
    import slicer

    from TwinRTCommon.scene import installI18nStandIn, isRealSlicer

    if isRealSlicer():
        raise RuntimeError("slicer_harness is for headless slicer-core; inside Slicer run the module tests")
    # setdefault-style: never shadow a real qt/ctk if some environment does provide them.
    for name in ("qt", "ctk"):
        if name not in sys.modules:
            sys.modules[name] = _InertModule(name)
    if not isinstance(getattr(slicer, "ScriptedLoadableModule", None), types.ModuleType):
        module = _makeScriptedLoadableModule()
        sys.modules[module.__name__] = module
        slicer.ScriptedLoadableModule = module
    if not isinstance(getattr(slicer, "parameterNodeWrapper", None), types.ModuleType):
        module = _makeParameterNodeWrapperModule()
        sys.modules[module.__name__] = module
        slicer.parameterNodeWrapper = module
    installI18nStandIn()


def newScene():
    """A fresh real scene, installed as ``slicer.mrmlScene`` (with app/modules stand-ins).

    :return: the scene.
    """
    addSourcePaths()
    installStandIns()
    from TwinRTCommon.scene import installApplicationStandIns, makeScene

    # A new scene per test: Clear() would keep singletons (parameter nodes) between tests.
    scene, logics = makeScene()
    return installApplicationStandIns(scene, logics)


def importModule(moduleName: str):
    """Import ``<moduleName>.py`` (after the stand-ins are in place) and return the module."""
    import importlib

    addSourcePaths()
    installStandIns()
    return importlib.import_module(moduleName)


def selfTestNames(testClass) -> list[str]:
    """Names of the ``test_*`` methods of a ScriptedLoadableModuleTest class, inherited ones included.

    Base classes first, each in definition order: the shared tests of
    ``TwinRTCommon.testing.CaseModuleTestMixin`` come before a module's own, as ``runTest`` runs them.
    """
    names = []
    for cls in reversed(testClass.__mro__):
        for name, value in cls.__dict__.items():
            if name.startswith("test") and callable(value) and name not in names:
                names.append(name)
    return names


try:
    import pytest
except ImportError:  # the harness also works without pytest (e.g. from a plain script)
    pytest = None

if pytest is not None:
    @pytest.fixture
    def slicerScene():
        """A fresh real slicer-core scene, installed as ``slicer.mrmlScene`` (widgets not exercised)."""
        pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'twinrt[slicer]')")
        return newScene()


def runSelfTest(testClass, methodName: str) -> None:
    """Run one self-test method the way Slicer's runner does (setUp, method, tearDown); failures raise."""
    testClass(methodName).debug()
