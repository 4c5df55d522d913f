"""Checks shared by the five ``<Module>LogicTest.py`` files: descriptor, parameter node, .ui, icon, CMake.

The .ui checks are static (XML), because widgets cannot be built headless; Slicer's generic test
(``WITH_GENERIC_TESTS``) builds them in the Slicer build tree.
"""

from __future__ import annotations

import inspect
import re
import struct
import types
import xml.etree.ElementTree as ET

from slicer_harness import REPO_ROOT

RESEARCH_USE = "Research use only, not for clinical decisions"


def checkRunTestCoversMethods(testClass) -> None:
    """``runTest`` calls every ``test_*`` method (Slicer's ctest only runs ``runTest``)."""
    # Slicer's ctest calls runTest only; a test method it forgets would never run in Slicer.
    source = inspect.getsource(testClass.runTest)
    for name in testClass.__dict__:
        if name.startswith("test_"):
            assert f"self.{name}" in source, f"{testClass.__name__}.runTest does not run {name}"


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
    assert "Not available yet" in text("statusLabel") and issueText in text("statusLabel")
    for name in ("applyButton", "loadSampleButton", "importDicomButton"):
        assert name in widgets, f"{name} missing from {path.name}"


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
