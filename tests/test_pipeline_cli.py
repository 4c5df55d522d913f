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


@needs_sample
def test_protocol_head_and_neck_runs_the_ai_stages(tmp_path):
    """``--protocol head-and-neck``: contour, predict, virtual planner from the prediction, goals, twin, NTCP."""
    from twinrt.pipeline import run_pipeline
    from twinrt.sample import sample_dicom_dir
    from twinrt.twin.timeline import CaseTimeline

    out = tmp_path / "out"
    res = run_pipeline(sample_dicom_dir(), out, write_scene=False, protocol="head-and-neck")
    stages = {name: status for name, _, status in res.timings}
    for name in ("contour (AutoContour)", "dose prediction (DosePredict)", "plan (AIPlanner virtual planner)",
                 "evaluate goals", "digital twin and toxicity baseline", "write DICOM-RT", "write report"):
        assert stages.get(name) == "done", (name, stages)
    assert {"reference", "predicted", "planned"} <= set(res.case.doses)
    from twinrt.model import approval_status

    assert approval_status(res.case.plans[0]) != "approved"  # written as UNAPPROVED: a human approves
    report = (out / "report.html").read_text()
    for heading in ("Contours (AutoContour)", "Dose prediction (DosePredict)", "Clinical goals",
                    "Digital twin and baseline toxicity risk"):
        assert heading in report, heading
    assert "openkbp-oar-unet25d-cpu" in report and "sha256" in report and "LKB NTCP" in report
    assert "Research use only" in report
    timeline = CaseTimeline.load(out / "twin")
    assert timeline.delivered == 0 and timeline.planned_dose == "planned" and timeline.n_fractions == 35
    rtplans = list((out / "dicom").glob("RTPLAN*.dcm"))
    assert rtplans


def test_unknown_protocol_is_refused_before_any_output(tmp_path):
    from twinrt.pipeline import PipelineError, run_pipeline
    from twinrt.sample import sample_dicom_dir

    with pytest.raises(PipelineError, match="Unknown protocol"):
        run_pipeline(sample_dicom_dir(), tmp_path / "out", protocol="prostate-hypo")
    assert not (tmp_path / "out").exists()
