"""DosePredict headless: its DosePredictTest methods, descriptor, parameter node, Widget plumbing, .ui, icon, CMake.

The module checks are in Testing/Python/module_checks.py (ModuleChecks), written once for the five modules.
Below them: the SlicerRT dose engine's guard, the shared process runner TwinRTCommon.process (cancel kills the
process tree, heartbeat, crash, slicer.util.launchConsoleProcess headless) and the worker's npz format.
"""

import sys

import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'twinrt[slicer]')")

from module_checks import ModuleChecks  # noqa: E402  (Testing/Python, put on sys.path by conftest.py)


class TestDosePredict(ModuleChecks):
    moduleName = "DosePredict"


# The SlicerRT dose engine cannot run here (no SlicerRT outside Slicer): this checks only that it stays
# out of the way without SlicerRT.
def test_slicerRtDoseEngineIsGuardedWithoutSlicerRT(slicerScene):
    import types

    import slicer_harness

    module = slicer_harness.importModule("DosePredict")
    from DosePredictLib import slicerRtDoseEngine

    if slicerRtDoseEngine.AbstractScriptedDoseEngine is not None:
        pytest.skip("SlicerRT is importable here; registration is SlicerRT's to test")
    assert slicerRtDoseEngine.registerDoseEngine() is False
    assert module.registerSlicerRtDoseEngine() is False
    # The module descriptor hooks the registration to startupCompleted(), like the sample data.
    import slicer

    module.DosePredict(types.SimpleNamespace())
    assert module.registerSlicerRtDoseEngine in slicer.app._connections.get("startupCompleted()", [])
    # The class the C++ adaptor looks up by file name exists either way, and a plan without a
    # target gets a message back, not an exception.
    assert slicerRtDoseEngine.slicerRtDoseEngine is slicerRtDoseEngine.TwinRTDoseEngine
    engine = slicerRtDoseEngine.TwinRTDoseEngine(types.SimpleNamespace(name=""))
    assert engine.scriptedEngine.name == slicerRtDoseEngine.ENGINE_NAME
    plan = types.SimpleNamespace(GetReferenceVolumeNode=lambda: None, GetSegmentationNode=lambda: None,
                                 GetTargetSegmentID=lambda: "")
    beam = types.SimpleNamespace(GetParentPlanNode=lambda: plan)
    assert "target segment" in engine.calculateDoseUsingEngine(beam, None)


# The process runner, with small stand-in commands instead of the worker (fast, no model).
def _processModule():
    import slicer_harness

    slicer_harness.addSourcePaths()
    from TwinRTCommon import process

    return process


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        os.kill(pid, 0)
        return True


@pytest.mark.skipif(sys.platform.startswith("win"), reason="process groups are POSIX")
def test_cancelKillsTheProcessTree(tmp_path):
    """Cancel while a child and its grandchild run: both are killed (not only the started launcher)."""
    import subprocess
    import time

    from twinrt.progress import CancelledError, CancelToken

    process = _processModule()
    pidFile = tmp_path / "grandchild.pid"
    # A launcher-like child: starts a grandchild that would run for a minute, then reports progress.
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pidFile)!r}, 'w').write(str(child.pid))\n"
              "print('PROGRESS 0.1 started', flush=True)\n"
              "time.sleep(60)\n")
    worker = process.WorkerProcess([sys.executable, "-c", script], useSlicerLauncher=False)
    token = CancelToken()
    calls = []

    def progress(fraction, text):
        calls.append((fraction, text))
        if fraction > 0:
            token.cancel()

    start = time.monotonic()
    with pytest.raises(CancelledError):
        worker.run(progress, token)
    assert time.monotonic() - start < 20
    assert (0.1, "started") in calls
    assert worker.proc.poll() is not None
    grandchild = int(pidFile.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the grandchild survived the cancel"
    # Killing again (Widget clicked twice) is harmless.
    worker.kill()
    assert subprocess.call([sys.executable, "-c", "pass"]) == 0


def test_heartbeatAndCrash():
    """Progress is reported while the worker is silent; a crash is a WorkerFailedError with the output's end."""
    process = _processModule()
    calls = []
    lines = process.WorkerProcess(
        [sys.executable, "-c", "import time; print('PROGRESS 0.5 half', flush=True); time.sleep(0.6); print('bye')"],
        useSlicerLauncher=False).run(lambda fraction, text: calls.append((fraction, text)))
    assert lines == ["PROGRESS 0.5 half", "bye"]
    assert calls.count((0.5, "half")) >= 3  # the heartbeat repeats the last progress

    with pytest.raises(process.WorkerFailedError) as failure:
        process.WorkerProcess([sys.executable, "-c", "import sys; print('ERROR boom'); print('last words'); "
                                                     "sys.exit(1)"], useSlicerLauncher=False).run()
    assert "exit code 1" in str(failure.value) and "boom" in str(failure.value)
    assert "last words" in str(failure.value)


def test_slicerLauncherPathHeadless(slicerScene):
    """slicer.util.launchConsoleProcess (the path taken when psutil is present) works headless too."""
    import slicer

    process = _processModule()
    assert hasattr(slicer.util, "launchConsoleProcess")
    worker = process.WorkerProcess([sys.executable, "-c", "import os; print('PROGRESS 1 done'); "
                                                          "print(os.environ['PYTHONUNBUFFERED'])"],
                                   useSlicerLauncher=True)
    calls = []
    assert worker.run(lambda fraction, text: calls.append((fraction, text))) == ["PROGRESS 1 done", "1"]
    assert calls[-1] == (1.0, "done")
    # Without psutil the default is the process-group path, which can kill the tree.
    assert process.WorkerProcess(["x"]).useSlicerLauncher is (process.psutilModule() is not None)


def test_workerInputRoundTrip(tmp_path):
    """The npz the Logic writes is the case the worker reads: CT, oblique grid, packed masks, types, Rx."""
    import numpy as np

    import slicer_harness

    slicer_harness.addSourcePaths()
    from DosePredictLib import worker
    from TwinRTCommon.testing import makeSyntheticCase

    case = makeSyntheticCase(obliqueDirection=True)
    body = case.structure("BODY").mask
    worker.writeInput(tmp_path / "in.npz", case, body)
    back, possibleDoseMask = worker.readInput(tmp_path / "in.npz")
    assert back.patient_id == case.patient_id
    assert np.array_equal(back.ct.array, case.ct.array) and back.ct.grid == case.ct.grid
    assert [(s.name, s.type) for s in back.structures] == [(s.name, s.type) for s in case.structures]
    for original, read in zip(case.structures, back.structures):
        assert np.array_equal(original.mask, read.mask), original.name
    assert back.prescriptions == case.prescriptions
    assert np.array_equal(possibleDoseMask, body)
    assert np.array_equal(back.metadata["possible_dose_mask"], body)
    # Without a possible-dose mask the worker thresholds the body itself.
    worker.writeInput(tmp_path / "nomask.npz", case)
    assert worker.readInput(tmp_path / "nomask.npz")[1] is None


def test_workerImportsNeitherSlicerNorTheCoreAtImport():
    """The worker (run with only its own folder and --core-dir on sys.path) loads without slicer or twinrt."""
    import subprocess

    from slicer_harness import REPO_ROOT

    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import worker\n"
            "loaded = sorted(m for m in ('slicer', 'vtk', 'twinrt', 'torch') if m in sys.modules)\n"
            "print(loaded)\n")
    folder = REPO_ROOT / "DosePredict" / "DosePredictLib"
    run = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT), str(folder)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout
