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


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``twinrt demo`` (the README's first command's job): the head-and-neck protocol on the sample, once."""
    if not any(SAMPLE_DICOM_DIR.glob("*.dcm")):
        pytest.skip("bundled sample not built")
    pytest.importorskip("torch", reason="the AI stages need torch (pip install 'twinrt[ai]')")
    import contextlib
    import io
    import logging

    out = tmp_path_factory.mktemp("demo") / "out"
    with_scene = _has_slicer_core()
    # Everything the run prints or logs (DEBUG and up), to check that no patient identifier is in it.
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            code = main(["demo", "--out", str(out)] + ([] if with_scene else ["--no-scene"]))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return code, out, with_scene, buffer.getvalue()


def test_demo_logs_hold_no_patient_identifier(demo_run):
    """Every AI stage ran and logged (DEBUG and up): neither the sample's patient name nor ID is printed."""
    import pydicom

    code, out, _, logs = demo_run
    assert code == 0
    ds = pydicom.dcmread(sorted(SAMPLE_DICOM_DIR.glob("*.dcm"))[0], stop_before_pixels=True)
    logs = logs.replace(str(SAMPLE_DICOM_DIR), "<sample folder>")  # the input folder's own name is the user's
    assert "contour (AutoContour)" in logs and "Research use only" in logs
    for identifier in (str(ds.PatientID), str(ds.PatientName), str(ds.PatientName).replace("^", " ")):
        assert identifier not in logs, identifier


def test_demo_writes_dicom_scene_and_report(demo_run, capsys):
    from twinrt.dicom.validate import dciodvfy_path, validate_folder

    code, out, with_scene, _ = demo_run
    assert code == 0
    dicom = out / "dicom"
    modalities = {p.stem.split("_")[0].upper() for p in dicom.glob("*.dcm")}
    assert {"CT", "RTSTRUCT", "RTDOSE", "RTPLAN"} <= modalities
    report = (out / "report.html").read_text()
    assert "Research use only" in report
    assert report.count("data:image/png;base64,") >= 2  # DVH plot and dose overlay
    assert "PTV70" in report and "skipped: no --protocol" not in report  # every stage ran
    summary = json.loads((out / "summary.json").read_text())
    assert {"reference", "predicted", "planned"} <= set(summary["doses"])
    for dose in ("reference", "planned"):
        ptv70 = next(r for r in summary["metrics"] if r["structure"] == "PTV70" and r["dose"] == dose)
        assert 66.5 < ptv70["mean_gy"] < 73.5, (dose, ptv70["mean_gy"])  # within 5 % of 70 Gy
    assert "UNAPPROVED" in report
    if with_scene:
        assert (out / "scene.mrb").stat().st_size > 100_000
    if dciodvfy_path():
        bad = [(p.name, e) for p, e, _ in validate_folder(dicom) if e]
        assert bad == []


def test_demo_runs_every_ai_stage(demo_run):
    """The protocol: contour, predict, virtual planner from the prediction, goals, twin, NTCP, audit log."""
    from twinrt.audit import AuditLog
    from twinrt.dicom.folder import import_case
    from twinrt.model import approval_status
    from twinrt.twin.timeline import CaseTimeline

    code, out, _, _ = demo_run
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    stages = {name: status for name, _, status in summary["timings"]}
    for name in ("contour (AutoContour)", "dose prediction (DosePredict)", "plan (AIPlanner virtual planner)",
                 "evaluate goals", "digital twin and toxicity baseline", "write DICOM-RT"):
        assert stages.get(name) == "done", (name, stages)
    report = (out / "report.html").read_text()  # written last, after summary.json
    for heading in ("Contours (AutoContour)", "Dose prediction (DosePredict)", "Clinical goals",
                    "Digital twin and baseline toxicity risk", "Audit log"):
        assert heading in report, heading
    assert "openkbp-oar-unet25d-cpu" in report and "sha256" in report and "LKB NTCP" in report
    timeline = CaseTimeline.load(out / "twin")
    assert timeline.delivered == 0 and timeline.planned_dose == "planned" and timeline.n_fractions == 35
    back = import_case(out / "dicom")
    assert back.plans and approval_status(back.plans[0]) != "approved"  # UNAPPROVED: a human approves
    # The audit log: one AI entry per computing stage, hash chain intact, written beside the DICOM files,
    # its head hash in the report; no patient name or ID in it.
    log = AuditLog.load(out / "dicom" / "AUDIT.jsonl")
    log.verify()
    messages = [e["message"] for e in log.entries]
    for name in ("import DICOM", "contour (AutoContour)", "plan (AIPlanner virtual planner)", "DVH metrics"):
        assert any(f"'{name}'" in m for m in messages), (name, messages)
    assert all(e["actor"] == "TwinRT AI" for e in log.entries)
    assert log.head in report and "hash chain verified" in report
    contour = next(e for e in log.entries if "AutoContour" in e["message"])
    assert "openkbp-oar-unet25d-cpu" in json.dumps(contour["details"])
    text = (out / "dicom" / "AUDIT.jsonl").read_text()
    assert back.patient_id not in text and str(back.metadata.get("patient_name", "@@")) not in text


@needs_sample
def test_demo_without_protocol_plans_from_the_prescription(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--no-scene", "--protocol", "none"]) == 0
    assert "Research use only" in capsys.readouterr().out
    report = (out / "report.html").read_text()
    assert "Plan (AIPlanner)" in report and "skipped: no --protocol" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["doses"] == ["reference", "planned"]
    ptv70 = next(r for r in summary["metrics"] if r["structure"] == "PTV70" and r["dose"] == "planned")
    assert 66.5 < ptv70["mean_gy"] < 73.5


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


def test_unknown_protocol_is_refused_before_any_output(tmp_path):
    from twinrt.pipeline import PipelineError, run_pipeline
    from twinrt.sample import sample_dicom_dir

    with pytest.raises(PipelineError, match="Unknown protocol"):
        run_pipeline(sample_dicom_dir(), tmp_path / "out", protocol="prostate-hypo")
    assert not (tmp_path / "out").exists()
