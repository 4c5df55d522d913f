"""AutoContour headless: its AutoContourTest methods, descriptor, parameter node, Widget plumbing, .ui, icon, CMake.

Every check is in Testing/Python/module_checks.py (ModuleChecks), written once for the five modules.
"""

import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'twinrt[slicer]')")

from module_checks import ModuleChecks  # noqa: E402  (Testing/Python, put on sys.path by conftest.py)


class TestAutoContour(ModuleChecks):
    moduleName = "AutoContour"


# The organ-at-risk worker's files and imports, without a network (fast, no torch).
def _worker():
    import slicer_harness

    slicer_harness.addSourcePaths()
    from AutoContourLib import worker

    return worker


def test_workerImportsNeitherSlicerNorTheCoreAtImport():
    """The worker and TwinRTCommon.workerio load with numpy alone: no slicer, no twinrt until they run."""
    import subprocess
    import sys

    from slicer_harness import REPO_ROOT

    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import worker\n"
            "loaded = sorted(m for m in ('slicer', 'vtk', 'twinrt', 'torch') if m in sys.modules)\n"
            "print(loaded)\n")
    folder = REPO_ROOT / "AutoContour" / "AutoContourLib"
    run = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT), str(folder)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout


def test_workerFilesRoundTrip(tmp_path):
    """The CT the Logic writes is the one the worker reads; the organs it writes come back on the CT grid."""
    import numpy as np

    from TwinRTCommon.testing import makeSyntheticCase
    from twinrt.autocontour.oar import OarResult
    from twinrt.errors import GeometryError, InvalidInputError
    from twinrt.geometry import Grid
    from twinrt.model import Image, Structure, StructureType

    worker = _worker()
    case = makeSyntheticCase(obliqueDirection=True)
    worker.writeInput(tmp_path / "in.npz", case.ct)
    ct = worker.readInput(tmp_path / "in.npz")
    assert np.array_equal(ct.array, case.ct.array) and ct.grid == case.ct.grid

    grid = case.ct.grid
    masks = [case.structure("PTV60").mask, case.structure("Organ").mask]
    spread = np.linspace(0.0, 0.5, int(np.prod(grid.shape)), dtype=np.float32).reshape(grid.shape)
    result = OarResult([Structure("Parotid_R", masks[0], grid, (216, 132, 105), StructureType.ORGAN),
                        Structure("Brainstem", masks[1], grid, (145, 92, 109), StructureType.ORGAN)],
                       Image(spread, grid, "UNCERTAINTY"), {"Parotid_R": 0.1, "Brainstem": 0.2}, ["Larynx"],
                       "tiny-oar-test", "ab" * 32, "0.1", 1.5, 2, ["a note"])
    worker.writeOutput(tmp_path / "out.npz", result, grid)
    back = worker.readOutput(tmp_path / "out.npz", grid)
    assert [(s.name, s.color, s.type) for s in back["structures"]] == [
        ("Parotid_R", (216, 132, 105), StructureType.ORGAN), ("Brainstem", (145, 92, 109), StructureType.ORGAN)]
    for structure, mask in zip(back["structures"], masks):
        assert np.array_equal(structure.mask, mask) and structure.grid == grid
    assert np.array_equal(back["uncertainty"], spread) and back["uncertainty"].dtype == np.float32
    assert (back["model_id"], back["sha256"], back["version"], back["mc_samples"]) == ("tiny-oar-test", "ab" * 32,
                                                                                    "0.1", 2)
    assert back["organ_uncertainty"] == {"Parotid_R": 0.1, "Brainstem": 0.2}
    assert (back["missing"], back["notes"]) == (["Larynx"], ["a note"])
    assert "Research use only" in back["research_use_only"] and "tiny-oar-test" in back["source"]

    # Nothing found and no uncertainty is a valid, empty result.
    empty = OarResult([], None, {}, ["Brainstem"], "tiny-oar-test", "ab" * 32, "0.1", 0.5, 0)
    worker.writeOutput(tmp_path / "empty.npz", empty, grid)
    back = worker.readOutput(tmp_path / "empty.npz", grid)
    assert back["structures"] == [] and back["uncertainty"] is None and back["missing"] == ["Brainstem"]

    # A result on another grid (not the CT's) or a damaged file is refused with a typed error.
    other = Grid(grid.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    try:
        worker.readOutput(tmp_path / "out.npz", other)
    except GeometryError as exc:
        assert "grid" in str(exc)
    else:
        raise AssertionError("an output on another grid was accepted")
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    try:
        worker.readOutput(tmp_path / "bad.npz", grid)
    except InvalidInputError as exc:
        assert "not a readable npz" in str(exc)
    else:
        raise AssertionError("a damaged output was accepted")


def test_organParametersAreTheNetworksOrgans(slicerScene):
    """One parameter-node check box per organ of the network (TG-263 names); all checked means all organs."""
    import slicer_harness
    from twinrt.autocontour.oar import TG263_NAMES

    module = slicer_harness.importModule("AutoContour")
    assert sorted(module.ORGAN_PARAMETERS.values()) == sorted(TG263_NAMES.values())
    logic = module.AutoContourLogic()
    parameters = logic.getParameterNode()
    assert logic.selectedOrgans(parameters) is None  # all organs by default
    parameters.organLarynx = False
    parameters.organBrainstem = False
    assert logic.selectedOrgans(parameters) == ["SpinalCord", "Parotid_R", "Parotid_L", "Esophagus", "Bone_Mandible"]


def test_organTerminologyIsSlicersFormat(slicerScene):
    """Every organ of the network has a terminology entry that Slicer's own Terminologies logic reads back
    exactly: SNOMED CT category and type, laterality as the type modifier of the parotids."""
    import slicer
    import slicer_harness
    from TwinRTCommon import mrmlio
    from twinrt.autocontour.oar import TG263_NAMES

    slicer_harness.importModule("AutoContour")  # puts the module folders on sys.path
    assert sorted(mrmlio.TG263_TERMINOLOGY) == sorted(TG263_NAMES.values())
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    for name, (code, meaning, modifier) in mrmlio.TG263_TERMINOLOGY.items():
        text = mrmlio.tg263TerminologyEntry(name)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminologies.DeserializeTerminologyEntry(text, entry), name
        assert entry.GetTerminologyContextName() == mrmlio.TERMINOLOGY_CONTEXT
        category, organ = entry.GetCategoryObject(), entry.GetTypeObject()
        assert (category.GetCodingSchemeDesignator(), category.GetCodeValue(), category.GetCodeMeaning()) == \
            mrmlio.TERMINOLOGY_ANATOMICAL_STRUCTURE
        assert (organ.GetCodingSchemeDesignator(), organ.GetCodeValue(), organ.GetCodeMeaning()) == \
            ("SCT", code, meaning)
        side = entry.GetTypeModifierObject()
        assert (side.GetCodingSchemeDesignator() or "", side.GetCodeValue() or "", side.GetCodeMeaning() or "") == \
            (modifier or ("", "", ""))
        # What Slicer itself writes for that entry is the same text.
        assert terminologies.SerializeTerminologyEntry(entry) == text, name
    lateral = {name: modifier[1] for name, (_code, _meaning, modifier) in mrmlio.TG263_TERMINOLOGY.items() if modifier}
    assert lateral == {"Parotid_L": "7771000", "Parotid_R": "24028007"}
    assert mrmlio.tg263TerminologyEntry("PTV60") == "" and mrmlio.tg263TerminologyEntry("parotid_l") == ""
