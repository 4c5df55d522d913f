"""The All-in-One pipeline and the ``twinrt`` command on the bundled sample patient."""

import json
import subprocess
import sys

import pytest

from twinrt.cli import main
from twinrt.sample import SAMPLE_DICOM_DIR

needs_sample = pytest.mark.skipif(not any(SAMPLE_DICOM_DIR.glob("*.dcm")), reason="bundled sample not built")


def _has_slicer_core() -> bool:
    return subprocess.run([sys.executable, "-c", "import slicer"], capture_output=True).returncode == 0


@needs_sample
def test_demo_writes_dicom_scene_and_report(tmp_path, capsys):
    from twinrt.dicom.validate import dciodvfy_path, validate_folder

    out = tmp_path / "out"
    with_scene = _has_slicer_core()
    argv = ["demo", "--out", str(out)] + ([] if with_scene else ["--no-scene"])
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Research use only" in text
    dicom = out / "dicom"
    modalities = sorted(p.name.split("_")[0] for p in dicom.glob("*.dcm"))
    assert {"CT", "RTSTRUCT", "RTDOSE", "RTPLAN"} <= {m.upper() for m in modalities} or len(modalities) > 100
    report = (out / "report.html").read_text()
    assert "Research use only" in report
    assert report.count("data:image/png;base64,") >= 2  # DVH plot and dose overlay
    assert "PTV70" in report and "not in this run yet (issue 9)" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["doses"] == ["reference", "planned"]
    for dose in summary["doses"]:
        ptv70 = next(r for r in summary["metrics"] if r["structure"] == "PTV70" and r["dose"] == dose)
        assert 66.5 < ptv70["mean_gy"] < 73.5, (dose, ptv70["mean_gy"])  # within 5 % of 70 Gy
    assert "Plan (AIPlanner)" in report and "UNAPPROVED" in report
    if with_scene:
        assert (out / "scene.mrb").stat().st_size > 100_000
    if dciodvfy_path():
        bad = [(p.name, e) for p, e, _ in validate_folder(dicom) if e]
        assert bad == []


def test_run_on_missing_folder_fails_cleanly(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "nope"), "--out", str(out), "--no-scene"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "nope" in err
    assert not out.exists()


def test_run_on_folder_without_ct_fails_cleanly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no DICOM here")
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "empty"), "--out", str(out), "--no-scene"]) == 2
    assert "import DICOM" in capsys.readouterr().err
    assert not out.exists()
