"""The headless tests of the five modules: their self-tests, descriptor, parameter node, Widget plumbing,
.ui, icon and CMake lists.

Each ``<Module>/Testing/Python/<Module>LogicTest.py`` holds one ``Test<Module>(ModuleChecks)`` class
that names the module; pytest then runs every check below for it (and ctest runs that file per
module, see ``<Module>/Testing/Python/CMakeLists.txt``). The .ui checks are static (XML), because
widgets cannot be built headless; Slicer's generic test (``WITH_GENERIC_TESTS``) builds them in the
Slicer build tree.
"""

from __future__ import annotations

import re
import struct
import types
import xml.etree.ElementTree as ET

import slicer_harness
from slicer_harness import REPO_ROOT

RESEARCH_USE = "Research use only, not for clinical decisions"


class ModuleChecks:
    """Every headless check of one module; a subclass named ``Test<Module>`` sets :attr:`moduleName`.

    Not collected itself (pytest collects ``Test*`` classes only); the module is imported lazily, after
    the harness has installed its stand-ins.
    """

    #: The module folder and ``<Module>.py`` name, e.g. ``"AutoContour"``.
    moduleName = ""

    def pytest_generate_tests(self, metafunc):
        # One pytest test per self-test method (inherited ones included), so a failure names it.
        if "methodName" in metafunc.fixturenames:
            metafunc.parametrize("methodName", slicer_harness.selfTestNames(self.moduleClass("Test")))

    @property
    def module(self):
        return slicer_harness.importModule(self.moduleName)

    def moduleClass(self, suffix: str):
        """``<Module><suffix>`` from ``<Module>.py``, e.g. ``moduleClass("Logic")``."""
        return getattr(self.module, self.moduleName + suffix)

    def test_selfTest(self, slicerScene, methodName):
        """Each ``<Module>Test`` method (the ones Slicer's runner runs) passes headless."""
        slicer_harness.runSelfTest(self.moduleClass("Test"), methodName)

    def test_runTestRunsEveryMethod(self, slicerScene):
        """runTest (what ctest calls in Slicer) runs every test method."""
        checkRunTestCoversMethods(self.moduleClass("Test"))

    def test_moduleDescriptor(self, slicerScene):
        """Title, category, research-use help text and the sample-data hook."""
        checkModuleDescriptor(self.module, self.moduleName)

    def test_parameterNodeIsSceneSingleton(self, slicerScene):
        """getParameterNode returns the same scripted-module node, stored in the scene."""
        checkParameterNodeSingleton(self.moduleClass("Logic")(), self.moduleName, slicerScene)

    def test_stageErrorNamesIssue(self, slicerScene):
        """The stage error and the status text name the issue that builds the stage."""
        issueText = self.moduleClass("Test").stageIssueText
        logic = self.moduleClass("Logic")()
        if not issueText:
            # Every stage built: the status says so, with the research-use warning.
            assert "Not available yet" not in logic.stageStatusText()
            assert "Research use only" in logic.stageStatusText()
            return
        assert issueText.startswith("issue ")
        assert issueText in logic.stageStatusText()
        error = logic.stageNotAvailable()
        assert issueText in str(error)
        assert isinstance(error, RuntimeError)

    def test_widgetPlumbing(self, slicerScene, monkeypatch):
        """The Widget binds the parameter node, preselects inputs and enables Apply (no Qt needed)."""
        checkWidgetPlumbing(self.module, self.moduleName, slicerScene, monkeypatch)

    def test_uiFile(self):
        """The .ui is valid Qt Designer XML binding every parameter, with status and research labels."""
        fields = list(self.moduleClass("ParameterNode").allParameters)
        checkUiFile(self.moduleName, fields, self.moduleClass("Test").stageIssueText)

    def test_widgetUsesOnlyUiWidgets(self):
        """Every ``self.ui.<name>`` the Widget code uses is a widget of the .ui (widgets cannot run here)."""
        checkWidgetUiNames(self.moduleName)

    def test_iconAndCMakeLists(self):
        """128x128 icon; CMakeLists lists files that exist and keeps the generic tests."""
        checkIcon(self.moduleName)
        checkModuleCMakeLists(self.moduleName)


def checkRunTestCoversMethods(testClass) -> None:
    """``runTest`` runs every ``test_*`` method once, each after ``setUp`` (Slicer's ctest runs only ``runTest``).

    Checked by running ``runTest`` with the test methods replaced by recorders, so inherited methods
    count and a method that is named in ``runTest`` but never reached does not.
    """
    names = slicer_harness.selfTestNames(testClass)
    assert names, f"{testClass.__name__} has no test methods"
    testCase = testClass()
    calls = []
    testCase.setUp = lambda: calls.append("setUp")
    for name in names:
        setattr(testCase, name, lambda name=name: calls.append(name))
    testCase.runTest()
    ran = [call for call in calls if call != "setUp"]
    assert sorted(ran) == sorted(names), f"{testClass.__name__}.runTest runs {ran}, expected {names}"
    # A fresh scene before every test: setUp comes right before each method.
    assert calls == [step for name in ran for step in ("setUp", name)], calls


def checkModuleDescriptor(module, moduleName: str) -> None:
    """Title, ``Radiotherapy.AI`` category, research-use help, and the startup sample-data hook."""
    import slicer

    # Slicer passes a qSlicerScriptedLoadableModule; a namespace takes the same attributes.
    parent = types.SimpleNamespace()
    descriptor = getattr(module, moduleName)(parent)
    assert parent.title == moduleName
    assert parent.categories == ["Radiotherapy.AI"]
    assert RESEARCH_USE in parent.helpText
    assert parent.acknowledgementText.strip()
    assert "Segmentations" in parent.dependencies
    assert descriptor.resourcePath("UI/x.ui").endswith(f"{moduleName}/Resources/UI/x.ui")
    # The module hooks sample registration to startupCompleted(), as Slicer's template does.
    assert module.registerSampleData in slicer.app._connections.get("startupCompleted()", [])


def checkParameterNodeSingleton(logic, moduleName: str, scene) -> None:
    """``getParameterNode`` wraps one ``vtkMRMLScriptedModuleNode`` singleton tagged with the module."""
    first = logic.getParameterNode().parameterNode
    second = logic.getParameterNode().parameterNode
    assert first.GetID() == second.GetID()
    assert first.IsA("vtkMRMLScriptedModuleNode")
    assert first.GetSingletonTag() == moduleName
    assert first.GetAttribute("ModuleName") == moduleName
    assert scene.GetNodeByID(first.GetID()) is not None


def checkUiFile(moduleName: str, parameterNames: list[str], issueText: str) -> None:
    """Valid Designer XML; every parameter bound through ``SlicerParameterName``; labels present."""
    path = REPO_ROOT / moduleName / "Resources" / "UI" / f"{moduleName}.ui"
    root = ET.parse(path).getroot()
    assert root.tag == "ui" and root.findtext("class") == moduleName
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == moduleName
    widgets = {w.get("name"): w for w in root.iter("widget")}
    bound = {}
    for name, widget in widgets.items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                # connectGui only sees dynamic properties (stdset="0"), like Designer writes them.
                assert prop.get("stdset") == "0", f"{name}: SlicerParameterName must be a dynamic property"
                bound[prop.findtext("string")] = widget
    assert sorted(bound) == sorted(parameterNames), f"bound {sorted(bound)} != parameters {sorted(parameterNames)}"
    combos = [w for w in widgets.values() if w.get("class") == "qMRMLNodeComboBox"]
    assert combos, "expected node selectors"
    # Without this connection a selector has no scene and stays empty in Slicer.
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    for combo in combos:
        assert combo in bound.values(), f"{combo.get('name')} has no SlicerParameterName"
        assert combo.get("name") in receivers, f"{combo.get('name')} does not receive the MRML scene"

    def text(name):
        prop = [p for p in widgets[name].findall("property") if p.get("name") == "text"][0]
        return prop.findtext("string")

    assert RESEARCH_USE in text("researchUseLabel")
    if issueText:
        assert "Not available yet" in text("statusLabel") and issueText in text("statusLabel")
    else:
        assert "Not available yet" not in text("statusLabel") and "Research use only" in text("statusLabel")
    for name in ("applyButton", "loadSampleButton", "importDicomButton"):
        assert name in widgets, f"{name} missing from {path.name}"


def checkWidgetUiNames(moduleName: str) -> None:
    """Each ``self.ui.<name>`` in ``<Module>.py`` and the shared Widget mixins it uses names a widget of the .ui.

    The Widget cannot be built headless, so a misspelt or removed widget would only fail in Slicer;
    this static check catches it here.
    """
    path = REPO_ROOT / moduleName / "Resources" / "UI" / f"{moduleName}.ui"
    widgets = {w.get("name") for w in ET.parse(path).getroot().iter("widget")}
    used = set()
    module = REPO_ROOT / moduleName / f"{moduleName}.py"
    sources = [module, REPO_ROOT / "TwinRTCommon" / "widget.py"]
    if "RunningWidgetMixin" in module.read_text():
        sources.append(REPO_ROOT / "TwinRTCommon" / "runwidget.py")
    for source in sources:
        used |= set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", source.read_text()))
    assert used, f"{moduleName}.py uses no ui widget"
    missing = sorted(used - widgets)
    assert not missing, f"{moduleName}.py uses widgets that {path.name} lacks: {missing}"


def checkIcon(moduleName: str) -> None:
    """A 128x128 PNG icon."""
    data = (REPO_ROOT / moduleName / "Resources" / "Icons" / f"{moduleName}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


def checkModuleCMakeLists(moduleName: str) -> None:
    """The module CMakeLists lists existing files, keeps WITH_GENERIC_TESTS and the unittest."""
    folder = REPO_ROOT / moduleName
    text = (folder / "CMakeLists.txt").read_text()
    assert f"set(MODULE_NAME {moduleName})" in text
    assert "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    listed = re.findall(r"^\s+(\$\{MODULE_NAME\}\S*|Resources/\S+)$", text, re.MULTILINE)
    assert len(listed) >= 4
    for entry in listed:
        path = folder / entry.replace("${MODULE_NAME}", moduleName)
        assert path.is_file(), f"{moduleName}/CMakeLists.txt lists missing {path}"
    top = (REPO_ROOT / "CMakeLists.txt").read_text()
    assert f"add_subdirectory({moduleName})" in top


class _FakeQtObject:
    """A Qt widget stand-in for :func:`checkWidgetPlumbing`: records ``connect`` calls, takes any attribute."""

    def __init__(self):
        self.connections = {}
        self.scene = None

    def connect(self, signal, slot):
        self.connections[signal] = slot

    def setMRMLScene(self, scene):
        self.scene = scene


def checkWidgetPlumbing(module, moduleName: str, scene, monkeypatch) -> None:
    """``<Module>Widget``'s parameter-node plumbing (:mod:`TwinRTCommon.widget`) against a fake ``ui``.

    ``setupCaseModule`` runs with ``slicer.util.loadUI`` and ``childWidgetVariables`` replaced by
    recorders, so the .ui path, the signal connections, the preselection, Apply's enabled state and
    tooltip, and observer clean-up are all checked without Qt.
    """
    import slicer
    import vtk

    from TwinRTCommon.testing import makeSyntheticCase

    uiWidget = _FakeQtObject()
    ui = types.SimpleNamespace(applyButton=_FakeQtObject(), loadSampleButton=_FakeQtObject(),
                               importDicomButton=_FakeQtObject(), statusLabel=_FakeQtObject())
    loaded = []
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: loaded.append(path) or uiWidget, raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui if widget is uiWidget else None,
                        raising=False)

    widget = getattr(module, moduleName + "Widget")(types.SimpleNamespace(isEntered=True))
    widget.layout = types.SimpleNamespace(widgets=[])
    widget.layout.addWidget = widget.layout.widgets.append
    logic = getattr(module, moduleName + "Logic")()
    widget.setupCaseModule(logic)

    assert loaded == [widget.resourcePath(f"UI/{moduleName}.ui")]
    assert loaded[0].endswith(f"{moduleName}/Resources/UI/{moduleName}.ui")
    assert widget.layout.widgets == [uiWidget] and uiWidget.scene is slicer.mrmlScene
    assert widget.logic is logic and widget.ui is ui
    assert ui.statusLabel.text == logic.stageStatusText()
    assert ui.applyButton.connections == {"clicked(bool)": widget.onApplyButton}
    assert ui.loadSampleButton.connections == {"clicked(bool)": widget.onLoadSampleButton}
    assert ui.importDicomButton.connections == {"directoryChanged(QString)": widget.onImportDicomFolder}
    # Empty scene: nothing to preselect, so Apply is off and its tooltip says what to select.
    assert ui.applyButton.enabled is False
    missingTip = ui.applyButton.toolTip
    assert missingTip.startswith("Select ")

    widget.onImportDicomFolder("")  # the user cancelled the folder dialog: nothing happens
    created = logic.caseToScene(makeSyntheticCase())
    widget.enter()
    parameters = widget._parameterNode
    fields = type(parameters).allParameters
    caseNodes = {"inputVolume": created["ct"], "inputSegmentation": created["segmentation"],
                 "inputDose": created["doses"]["reference"]}
    inputs = [name for name in fields if name.startswith("input")]
    assert inputs and set(inputs) <= set(caseNodes), inputs
    # enter() preselects the obvious input: the CT, or (no CT input) the organs at risk.
    preselected = "inputVolume" if "inputVolume" in fields else "inputSegmentation"
    assert getattr(parameters, preselected).GetID() == caseNodes[preselected].GetID()

    for name in inputs:  # each write fires ModifiedEvent, which the Widget observes
        setattr(parameters, name, caseNodes[name])
    assert ui.applyButton.enabled is True
    assert ui.applyButton.toolTip and ui.applyButton.toolTip != missingTip
    setattr(parameters, inputs[-1], None)
    assert ui.applyButton.enabled is False and ui.applyButton.toolTip == missingTip

    # Closing the scene unbinds the node; reopening (the module is entered) binds a node again.
    widget.onSceneStartClose(None, None)
    assert widget._parameterNode is None
    assert not widget.hasObserver(parameters, vtk.vtkCommand.ModifiedEvent, widget._checkCanApply)
    setattr(parameters, inputs[-1], caseNodes[inputs[-1]])
    assert ui.applyButton.enabled is False, "an unbound parameter node still drives Apply"
    widget.onSceneEndClose(None, None)
    assert widget._parameterNode is not None
    assert ui.applyButton.enabled is True

    widget.exit()
    assert not widget.hasObserver(widget._parameterNode, vtk.vtkCommand.ModifiedEvent, widget._checkCanApply)
    widget.cleanup()
    assert widget.Observations == []
