"""The All-in-One pipeline: from a DICOM patient folder to DICOM-RT, a Slicer scene and a report.

At this stage (foundation) the pipeline imports the patient, computes DVH metrics of its dose,
writes DICOM-RT, the Slicer scene ``.mrb`` and an HTML report. The AI stages (contouring, dose
prediction, planning, digital twin, toxicity) are listed in the report as not available until
their issues land; they are added here as they do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import twinrt
from twinrt.errors import InvalidInputError, TwinRTError
from twinrt.io_utils import write_text_atomic
from twinrt.model import Case
from twinrt.progress import CancelToken, ProgressCallback, report

#: Stages that later issues add, in pipeline order, with the issue that builds each.
PENDING_STAGES = [("contour (AutoContour)", 6), ("dose prediction (DosePredict)", 5),
                  ("planning (AIPlanner)", 3), ("digital twin (DigitalTwin)", 7),
                  ("toxicity risk (ToxicityMonitor)", 8)]


class PipelineError(TwinRTError):
    """A stage failed; ``stage`` names it and the message gives the cause. Outputs of the stages
    that finished are kept."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"Stage '{stage}' failed: {cause}")
        self.stage = stage
        self.cause = cause


@dataclass
class PipelineResult:
    """What a pipeline run produced.

    :param case: the imported case.
    :param outputs: label → path of every file or folder written.
    :param timings: (stage, seconds, status) rows.
    :param metrics: DVH metric rows of the evaluated dose.
    """

    case: Case
    outputs: dict[str, Path] = field(default_factory=dict)
    timings: list[tuple[str, float, str]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)


def repo_root() -> Path:
    """The folder holding ``twinrt/`` (and, in a checkout, ``TwinRTCommon/``)."""
    return Path(__file__).resolve().parent.parent


def write_scene_mrb(dicom_dir: Path, mrb_path: Path, timeout_s: float = 600) -> Path:
    """Write the Slicer scene of a DICOM patient folder as ``.mrb``.

    The core never imports Slicer, so the scene is built in a child process by
    ``TwinRTCommon.writescene`` (which needs ``slicer-core``, or runs inside Slicer's Python).

    :raises InvalidInputError: when the scene writer is unavailable or fails; its message is kept.
    """
    env = dict(os.environ)
    root = str(repo_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "TwinRTCommon.writescene", "--dicom", str(dicom_dir), "--mrb", str(mrb_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise InvalidInputError("Could not write the Slicer scene (.mrb): " + " | ".join(tail)
                                + ". Install slicer-core (pip install 'twinrt[slicer]') or run inside Slicer.")
    return mrb_path


def _dose_curves(case: Case, dose_name: str) -> tuple[list[dict[str, Any]], list[Any]]:
    from twinrt import dvh
    from twinrt.report import DvhCurve

    metrics = dvh.dvh_metrics(case, dose_name)
    dose = case.doses[dose_name]
    curves = []
    for s in case.structures:
        if s.is_empty:
            continue
        h = dvh.structure_dvh(dose, s)
        curves.append(DvhCurve(s.name, s.color, h.bin_edges_gy, h.cumulative_percent))
    return metrics, curves


def run_pipeline(dicom_dir: str | Path, out_dir: str | Path, write_scene: bool = True,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                 log: Callable[[str], None] = lambda s: None) -> PipelineResult:
    """Run the pipeline on one DICOM patient folder.

    :param dicom_dir: folder with one CT series and optionally RTSTRUCT, RTDOSE, RTPLAN.
    :param out_dir: output folder; gets ``dicom/``, ``scene.mrb``, ``report.html``, ``summary.json``.
    :param write_scene: write the Slicer scene (needs slicer-core).
    :param progress: ``progress(fraction, text)`` callback.
    :param cancel: cancel token checked between stages.
    :raises PipelineError: naming the stage that failed; files of finished stages are kept.
    """
    from twinrt.dicom.folder import export_case, import_case
    from twinrt.report import ReportContent, write_report

    out = Path(out_dir)
    result: PipelineResult
    timings: list[tuple[str, float, str]] = []
    steps = 5 + (1 if write_scene else 0)
    state: dict[str, Any] = {}

    def stage(name: str, index: int, fn: Callable[[], Any]) -> Any:
        report(progress, index / steps, name, cancel)
        log(f"[{index + 1}/{steps}] {name}")
        t0 = time.perf_counter()
        try:
            value = fn()
        except TwinRTError as exc:
            raise PipelineError(name, exc) from exc
        except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as exc:
            raise PipelineError(name, exc) from exc
        timings.append((name, time.perf_counter() - t0, "done"))
        return value

    case = stage("import DICOM", 0, lambda: import_case(dicom_dir))
    if not case.doses:
        raise PipelineError("evaluate dose", InvalidInputError(
            f"{dicom_dir} has no RTDOSE; this stage needs a dose until DosePredict (issue 5) lands"))
    dose_name = next(iter(case.doses))
    result = PipelineResult(case)
    for name, issue in PENDING_STAGES:
        timings.append((name, 0.0, f"not available yet (issue {issue})"))
    metrics, curves = stage("DVH metrics", 1, lambda: _dose_curves(case, dose_name))
    result.metrics = metrics
    dicom_out = out / "dicom"
    result.outputs["dicom"] = dicom_out
    state["files"] = stage("write DICOM-RT", 2, lambda: export_case(case, dicom_out))
    if write_scene:
        result.outputs["scene"] = stage("write Slicer scene", 3,
                                        lambda: write_scene_mrb(dicom_out, out / "scene.mrb"))
    summary = {"patient_id": case.patient_id, "dose": dose_name, "metrics": metrics,
               "twinrt_version": twinrt.__version__, "research_use_only": twinrt.RESEARCH_USE_ONLY}
    result.outputs["summary"] = stage("write summary", steps - 2, lambda: write_text_atomic(
        out / "summary.json", json.dumps(summary, indent=1, default=_json_default)))
    content = ReportContent(
        title=f"TwinRT report — {case.patient_id}", metrics=metrics, curves=curves, timings=timings,
        provenance={"TwinRT": twinrt.__version__, "input": str(dicom_dir), "evaluated dose": dose_name,
                    "data source": str(case.metadata.get("citation", case.metadata.get("source", ""))),
                    "AI models": "none at this stage (AI stages not available yet)"},
        outputs=[(k, os.path.relpath(v, out)) for k, v in result.outputs.items()] + [("report", "report.html")])
    result.outputs["report"] = out / "report.html"
    stage("write report", steps - 1, lambda: write_report(out / "report.html", case, content, case.doses[dose_name]))
    result.timings = timings
    report(progress, 1.0, "done")
    return result


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
