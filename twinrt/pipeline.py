"""The All-in-One pipeline: from a DICOM patient folder to DICOM-RT, a Slicer scene and a report.

The pipeline imports the patient, plans it with AIPlanner's engine when it has a prescription
(beams, dij, fluence optimisation, leaf sequencing), computes DVH metrics of every dose, and writes
DICOM-RT, the Slicer scene ``.mrb`` and an HTML report. The other stages (contouring, dose
prediction, the planning agent, digital twin, toxicity) exist in their modules and commands; the report
lists them as not in this run until issue 9 wires them in.
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
#: Stages the All-in-One run does not do yet, with the status the report shows: modules still to
#: be built name their issue; built ones wait for issue 9 (All-in-One) to be wired in.
PENDING_STAGES_BEFORE_PLAN = [("contour (AutoContour)", "in the AutoContour module and `twinrt contour`; not in this "
                                                         "run yet (issue 9)"),
                              ("dose prediction (DosePredict)", "in the DosePredict module and `twinrt dose-predict`; "
                                                                "not in this run yet (issue 9)")]
PENDING_STAGES_AFTER_PLAN = [("planning agent and goals (AIPlanner)", "in the AIPlanner module; not in this run yet "
                                                                      "(issue 9)"),
                             ("digital twin (DigitalTwin)", "in the DigitalTwin module and `twinrt twin`; not in this "
                                                            "run yet (issue 9)"),
                             ("toxicity risk (ToxicityMonitor)", "in the ToxicityMonitor module and `twinrt toxicity`; "
                                                                 "not in this run yet (issue 9)")]
#: Name of the dose of TwinRT's own plan in the case and the outputs.
PLANNED_DOSE = "planned"


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


def _dose_curves(case: Case) -> tuple[list[dict[str, Any]], list[Any]]:
    """DVH metric rows (with a ``dose`` column) and curves of every dose of the case.

    TwinRT's plan is drawn solid and other doses (the reference) dashed.
    """
    from twinrt import dvh
    from twinrt.report import DvhCurve

    metrics: list[dict[str, Any]] = []
    curves = []
    for name, dose in case.doses.items():
        metrics += [{"dose": name, **row} for row in dvh.dvh_metrics(case, name)]
        for s in case.structures:
            if s.is_empty:
                continue
            h = dvh.structure_dvh(dose, s)
            label = s.name if len(case.doses) == 1 else f"{s.name} ({name})"
            curves.append(DvhCurve(label, s.color, h.bin_edges_gy, h.cumulative_percent,
                                   dashed=len(case.doses) > 1 and name != PLANNED_DOSE))
    return metrics, curves


def _plan_section(result: Any) -> str:
    """HTML summary of a TwinRT plan: beams, segments, MU, sequencing loss and timings."""
    import html as _html

    from twinrt.report import metrics_table_html

    beams = [{"beam": b.name, "gantry_deg": float(b.beam.gantry_deg), "couch_deg": float(b.beam.couch_deg),
              "segments": len(b.segments), "MU per fraction": float(b.meterset_mu)} for b in result.plan.beams]
    seq = result.sequencing
    figures = [{"item": "segments", "value": int(seq["n_segments"])},
               {"item": "total MU per fraction", "value": float(seq["total_mu"])},
               {"item": "relative fluence error after sequencing", "value": float(seq["relative_fluence_error"])},
               {"item": "relative dose error after sequencing", "value": float(seq.get("relative_dose_error", 0.0))},
               {"item": "dij non-zeros (M)", "value": result.dij_stats.get("nnz", 0) / 1e6},
               {"item": "optimiser iterations", "value": int(result.optimization["iterations"])}]
    figures += [{"item": k.replace("_s", " (s)"), "value": float(v)} for k, v in result.timings_s.items()]
    return ("<p>Plan " + _html.escape(result.plan.label) + ", approval status <b>"
            + _html.escape(result.plan.approval) + "</b>: a physician must review and approve it.</p>"
            + metrics_table_html(beams) + metrics_table_html(figures))


def run_pipeline(dicom_dir: str | Path, out_dir: str | Path, write_scene: bool = True, plan: bool = True,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                 log: Callable[[str], None] = lambda s: None) -> PipelineResult:
    """Run the pipeline on one DICOM patient folder.

    :param dicom_dir: folder with one CT series and optionally RTSTRUCT, RTDOSE, RTPLAN.
    :param out_dir: output folder; gets ``dicom/``, ``scene.mrb``, ``report.html``, ``summary.json``.
    :param write_scene: write the Slicer scene (needs slicer-core).
    :param plan: plan the case with AIPlanner's engine when it has a prescription.
    :param progress: ``progress(fraction, text)`` callback.
    :param cancel: cancel token checked between stages.
    :raises PipelineError: naming the stage that failed; files of finished stages are kept.
    """
    from twinrt.dicom.folder import export_case, import_case
    from twinrt.report import ReportContent, write_report

    out = Path(out_dir)
    result: PipelineResult
    timings: list[tuple[str, float, str]] = []
    steps = 6 + (1 if write_scene else 0)
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
    result = PipelineResult(case)
    for name, status in PENDING_STAGES_BEFORE_PLAN:
        timings.append((name, 0.0, status))
    sections: list[Any] = []
    if plan and case.prescriptions:
        from twinrt.planning.workflow import PlanSetup, plan_case
        from twinrt.report import ReportSection

        # Dose on the CT grid, so that the plan is evaluated like a dose imported with the CT.
        planning = stage("plan (AIPlanner)", 1, lambda: plan_case(case, setup=PlanSetup(dose_grid_mm=None),
                                                                  progress=None, cancel=cancel))
        case.doses[PLANNED_DOSE] = planning.dose
        case.plans = [planning.plan]
        sections.append(ReportSection("Plan (AIPlanner)", _plan_section(planning)))
    else:
        why = "skipped (--no-plan)" if not plan else "skipped: no prescription in the input"
        timings.append(("plan (AIPlanner)", 0.0, why))
    for name, status in PENDING_STAGES_AFTER_PLAN:
        timings.append((name, 0.0, status))
    if not case.doses:
        raise PipelineError("evaluate dose", InvalidInputError(
            f"{dicom_dir} has no RTDOSE and no prescription to plan from; add an RTDOSE or an RTPLAN with a "
            "prescription"))
    overlay = case.doses.get(PLANNED_DOSE) or next(iter(case.doses.values()))
    metrics, curves = stage("DVH metrics", 2, lambda: _dose_curves(case))
    result.metrics = metrics
    dicom_out = out / "dicom"
    result.outputs["dicom"] = dicom_out
    state["files"] = stage("write DICOM-RT", 3, lambda: export_case(case, dicom_out))
    if write_scene:
        result.outputs["scene"] = stage("write Slicer scene", 4,
                                        lambda: write_scene_mrb(dicom_out, out / "scene.mrb"))
    summary = {"patient_id": case.patient_id, "doses": list(case.doses), "metrics": metrics,
               "timings": timings, "twinrt_version": twinrt.__version__,
               "research_use_only": twinrt.RESEARCH_USE_ONLY}
    result.outputs["summary"] = stage("write summary", steps - 2, lambda: write_text_atomic(
        out / "summary.json", json.dumps(summary, indent=1, default=_json_default)))
    content = ReportContent(
        title=f"TwinRT report — {case.patient_id}", metrics=metrics, curves=curves, timings=timings,
        provenance={"TwinRT": twinrt.__version__, "input": str(dicom_dir), "doses": ", ".join(case.doses),
                    "data source": str(case.metadata.get("citation", case.metadata.get("source", ""))),
                    "dose engine": "TwinRT photon pencil beam (SVD kernels, matRad generic 6 MV machine data)",
                    "AI models": "none at this stage (AI stages not available yet)"},
        outputs=[(k, os.path.relpath(v, out)) for k, v in result.outputs.items()] + [("report", "report.html")],
        sections=sections)
    result.outputs["report"] = out / "report.html"
    stage("write report", steps - 1, lambda: write_report(out / "report.html", case, content, overlay))
    result.timings = timings
    report(progress, 1.0, "done")
    return result


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
