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

import twinrt
from twinrt.errors import InvalidInputError, TwinRTError
from twinrt.io_utils import json_default, write_text_atomic
from twinrt.model import Case
from twinrt.progress import CancelToken, ProgressCallback, report

#: Stages a run without ``--protocol`` skips, with the status the report shows (``--protocol
#: head-and-neck`` runs them all).
_SKIPPED = "skipped: no --protocol (run with --protocol head-and-neck)"
PENDING_STAGES_BEFORE_PLAN = [("contour (AutoContour)", _SKIPPED), ("dose prediction (DosePredict)", _SKIPPED)]
PENDING_STAGES_AFTER_PLAN = [("planning agent and goals (AIPlanner)", _SKIPPED),
                             ("digital twin (DigitalTwin)", _SKIPPED),
                             ("toxicity risk (ToxicityMonitor)", _SKIPPED)]
#: Name of the dose of TwinRT's own plan in the case and the outputs.
PLANNED_DOSE = "planned"
#: Protocols of ``twinrt run --protocol``: the goal set the virtual planner plans for, the models
#: (``None``: the shipped default model), the planner's time budget (s) and the intensity levels of
#: leaf sequencing (20, as ``bench/agent_openkbp.py`` validated: 10 levels cost 0.5 Gy of PTV D95 on
#: OpenKBP pt_202 and 1 Gy of PTV70 D95 on pt_233).
PROTOCOLS = {"head-and-neck": {"goal_set": "head_and_neck_openkbp", "oar_model": None, "dose_model": None,
                               "time_budget_s": 240.0, "levels": 20}}


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
                 log: Callable[[str], None] = lambda s: None, protocol: Optional[str] = None) -> PipelineResult:
    """Run the pipeline on one DICOM patient folder.

    With a ``protocol`` (a key of :data:`PROTOCOLS`) the AI stages run too: organs at risk are contoured
    (the user's structures kept), the dose is predicted, the virtual planner plans from the prediction
    for the protocol's goal set, the goals are evaluated, and the digital twin starts (its timeline and
    the baseline LKB NTCP of each organ with a toxicity endpoint).

    :param dicom_dir: folder with one CT series and optionally RTSTRUCT, RTDOSE, RTPLAN.
    :param out_dir: output folder; gets ``dicom/``, ``scene.mrb``, ``report.html``, ``summary.json``.
    :param write_scene: write the Slicer scene (needs slicer-core).
    :param plan: plan the case with AIPlanner's engine when it has a prescription.
    :param progress: ``progress(fraction, text)`` callback.
    :param cancel: cancel token checked between stages.
    :param protocol: e.g. ``"head-and-neck"``; ``None`` plans from the prescription only.
    :raises PipelineError: naming the stage that failed; files of finished stages are kept.
    """
    from twinrt.dicom.folder import export_case, import_case
    from twinrt.report import ReportContent, write_report

    out = Path(out_dir)
    result: PipelineResult
    timings: list[tuple[str, float, str]] = []
    if protocol is not None and protocol not in PROTOCOLS:
        raise PipelineError("protocol", InvalidInputError(f"Unknown protocol '{protocol}'; choose one of "
                                                          f"{', '.join(PROTOCOLS)}"))
    steps = 6 + (1 if write_scene else 0) + (4 if protocol else 0)
    state: dict[str, Any] = {}

    def stage(name: str, index: int, fn: Callable[[], Any]) -> Any:
        # ``index`` is kept for readability; progress counts the stages actually run.
        index = state.setdefault("done", 0)
        state["done"] = index + 1
        report(progress, min(index / steps, 0.99), name, cancel)
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

    def log_stages(case: Case) -> None:
        # Every computing stage that finished goes into the case's audit log (exported with the DICOM
        # files as AUDIT.jsonl and shown in the report); stage names and figures only, no patient data.
        from twinrt.audit import AuditLog

        audit = AuditLog.of_case(case)
        for name, seconds, status in timings:
            if status == "done":
                audit.ai_action(f"All-in-One stage '{name}' done", {
                    "stage": name, "seconds": round(seconds, 2), "pipeline": f"twinrt {twinrt.__version__}",
                    "protocol": protocol or "none",
                    **({"models": dict(models)} if models and ("AutoContour" in name or "DosePredict" in name) else {})})

    case = stage("import DICOM", 0, lambda: import_case(dicom_dir))
    result = PipelineResult(case)
    sections: list[Any] = []
    models: dict[str, str] = {}
    if protocol:
        case = _ai_stages(case, PROTOCOLS[protocol], stage, steps, sections, models, plan, cancel)
        result.case = case
    else:
        for name, status in PENDING_STAGES_BEFORE_PLAN:
            timings.append((name, 0.0, status))
    if protocol and plan:
        pass  # planned by the virtual planner above
    elif plan and case.prescriptions:
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
    if protocol:
        stage("digital twin and toxicity baseline", steps - 5 - (1 if write_scene else 0),
              lambda: _twin_stage(case, out, sections))
    else:
        for name, status in PENDING_STAGES_AFTER_PLAN:
            timings.append((name, 0.0, status))
    if not case.doses:
        raise PipelineError("evaluate dose", InvalidInputError(
            f"{dicom_dir} has no RTDOSE and no prescription to plan from; add an RTDOSE or an RTPLAN with a "
            "prescription"))
    overlay = case.doses.get(PLANNED_DOSE) or next(iter(case.doses.values()))
    metrics, curves = stage("DVH metrics", 2, lambda: _dose_curves(case))
    result.metrics = metrics
    log_stages(case)
    sections.append(_audit_section(case))
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
        out / "summary.json", json.dumps(summary, indent=1, default=json_default)))
    content = ReportContent(
        title=f"TwinRT report — {case.patient_id}", metrics=metrics, curves=curves, timings=timings,
        provenance={"TwinRT": twinrt.__version__, "input": str(dicom_dir), "doses": ", ".join(case.doses),
                    "data source": str(case.metadata.get("citation", case.metadata.get("source", ""))),
                    "dose engine": "TwinRT photon pencil beam (SVD kernels, matRad generic 6 MV machine data)",
                    "AI models": "; ".join(f"{k}: {v}" for k, v in models.items()) or "none (no --protocol)",
                    "protocol": protocol or "none (plan from the prescription)"},
        outputs=[(k, os.path.relpath(v, out)) for k, v in result.outputs.items()] + [("report", "report.html")],
        sections=sections)
    result.outputs["report"] = out / "report.html"
    stage("write report", steps - 1, lambda: write_report(out / "report.html", case, content, overlay))
    result.timings = timings
    report(progress, 1.0, "done")
    return result


def _audit_section(case: Case) -> Any:
    """The report's "Audit log" section: every entry of the case's log and whether its hash chain holds."""
    import html as _html

    from twinrt.audit import AuditLog, AuditLogError
    from twinrt.report import ReportSection, metrics_table_html

    audit = AuditLog.of_case(case)
    try:
        audit.verify()
        status = f"hash chain verified ({len(audit)} entries); head sha256 <code>{audit.head}</code>"
    except AuditLogError as exc:
        status = f"<b>hash chain broken</b>: {_html.escape(str(exc))}"
    rows = [{"#": e.get("seq"), "time (UTC)": e.get("timestamp"), "actor": e.get("actor"), "kind": e.get("kind"),
             "message": e.get("message")} for e in audit.entries]
    return ReportSection("Audit log", f"<p>{status}. The log is written beside the DICOM files "
                                      f"(<code>dicom/AUDIT.jsonl</code>).</p>" + metrics_table_html(rows))


def _ai_stages(case: Case, protocol: dict[str, Any], stage: Callable[[str, int, Callable[[], Any]], Any], steps: int,
               sections: list[Any], models: dict[str, str], plan: bool, cancel: Optional[CancelToken]) -> Case:
    """Contour, predict, plan with the virtual planner from the prediction, evaluate the goals."""
    import html as _html

    from twinrt.report import ReportSection, metrics_table_html

    def contour() -> Case:
        from twinrt.autocontour.oar import contour_case

        new, res, actions = contour_case(case, model=protocol["oar_model"], mc_samples=0, cancel=cancel)
        models["organs at risk"] = f"{res.model_id} (sha256 {res.sha256[:12]}…)"
        rows = [{"organ": k, "action": v} for k, v in actions.items()]
        sections.append(ReportSection("Contours (AutoContour)", "<p>Model " + _html.escape(models["organs at risk"])
                                      + "; the patient's own structures are kept. Research use only: review every "
                                        "AI contour.</p>" + metrics_table_html(rows)))
        return new

    case = stage("contour (AutoContour)", 1, contour)

    def predict() -> Any:
        from twinrt.dosepredict.predict import predict_case

        res = predict_case(case, protocol["dose_model"], cancel=cancel)
        res.add_to_case(case)
        models["dose prediction"] = f"{res.model_id} (sha256 {res.sha256[:12]}…)"
        note = "".join(f"<li>{_html.escape(w)}</li>" for w in res.warnings)
        std = case.doses.get("predicted_std")
        unc = (f"<p>Prediction uncertainty (MC dropout, {res.mc_samples} passes): mean standard deviation "
               f"{float(std.array[case.doses['predicted'].array > 1].mean()):.2f} Gy where the prediction "
               "exceeds 1 Gy.</p>") if std is not None else ""
        sections.append(ReportSection("Dose prediction (DosePredict)", "<p>Model "
                                      + _html.escape(models["dose prediction"]) + ".</p>" + unc
                                      + (f"<ul>{note}</ul>" if note else "")))
        return res

    prediction = stage("dose prediction (DosePredict)", 2, predict)
    if not plan:
        return case
    if not case.prescriptions:
        raise PipelineError("plan (AIPlanner virtual planner)", InvalidInputError(
            "The patient has no prescription (RTPLAN); the protocol needs one to plan"))

    def agent() -> Any:
        from twinrt.planning.agent import virtual_planner
        from twinrt.planning.evaluation import load_goal_set
        from twinrt.planning.kbp import mimicking_objectives
        from twinrt.planning.workflow import PlanSetup

        goal_set = load_goal_set(protocol["goal_set"])
        objectives = mimicking_objectives(case, with_uncertainty=prediction.std is not None)
        refs = {k: case.doses[k] for k in ("predicted", "predicted_std") if k in case.doses}
        setup = PlanSetup(dose_grid_mm=None, levels=protocol["levels"])
        return virtual_planner(case, goal_set, setup=setup, objectives=objectives,
                               time_budget_s=protocol["time_budget_s"], cancel=cancel, reference_doses=refs)

    result = stage("plan (AIPlanner virtual planner)", 3, agent)
    case.doses[PLANNED_DOSE] = result.planning.dose
    case.plans = [result.planning.plan]
    sections.append(ReportSection("Plan (AIPlanner virtual planner)", _plan_section(result.planning)
                                  + f"<p>{result.rounds} round(s), delivered round {result.best_round} "
                                    f"({_html.escape(result.stop_reason)}), {result.seconds:.0f} s.</p>"))

    def goals() -> Any:
        from twinrt.planning.evaluation import evaluate_plan

        ev = evaluate_plan(case, case.doses[PLANNED_DOSE], protocol["goal_set"], result.planning.plan)
        rows = [{"structure": r.goal.structure, "goal": f"{r.goal.metric} {r.goal.comparator} {r.goal.value:g} "
                 f"{r.goal.unit}", "priority": r.goal.priority,
                 "value": None if r.value is None else round(r.value, 2),
                 "result": "not evaluable" if r.passed is None else ("pass" if r.passed else "FAIL")}
                for r in ev.results]
        deliver = ev.deliverability or {}
        body = (f"<p>Goal set {_html.escape(ev.goal_set)}: must goals "
                f"<b>{'all met' if ev.must_passed else 'NOT all met'}</b>, score {ev.score:.1f}.</p>"
                + metrics_table_html(rows)
                + ("<h3>Deliverability</h3>" + metrics_table_html(
                    [{"item": k, "value": v} for k, v in deliver.items() if isinstance(v, (int, float))])
                   if deliver else ""))
        sections.append(ReportSection("Clinical goals", body))
        return ev

    stage("evaluate goals", 4, goals)
    del steps
    return case


def _twin_stage(case: Case, out: Path, sections: list[Any]) -> None:
    """Start the digital twin (timeline saved in ``out/twin``) and report the baseline LKB NTCP per organ."""
    import datetime as _dt

    import numpy as np_

    from twinrt.radiobiology import (LKB_PARAMETERS, LKB_SET_FOR_ENDPOINT, alpha_beta_map, bed_uniform, eqd2, geud,
                                     lkb_ntcp_from_voxels)
    from twinrt.report import ReportSection, metrics_table_html
    from twinrt.toxicity.features import endpoint_for
    from twinrt.twin.timeline import CaseTimeline

    n = max((p.fractions for p in case.prescriptions), default=0)
    if PLANNED_DOSE not in case.doses or n < 1:
        sections.append(ReportSection("Digital twin", "<p>Not started: no plan with a prescription.</p>"))
        return
    timeline = CaseTimeline(case, PLANNED_DOSE, n, _dt.date.today().isoformat())
    timeline.save(out / "twin")
    grid = case.ct.grid
    dose = case.doses[PLANNED_DOSE].resampled(grid).array.astype(np_.float64)
    ab = alpha_beta_map(grid.shape, [s for s in case.structures if s.grid.is_same(grid)])
    rows = []
    for s in case.structures:
        endpoint = endpoint_for(s.name) if s.type.value == "ORGAN" else None
        if not endpoint or s.is_empty:
            continue
        m = s.on_grid(grid)
        planned_eqd2 = eqd2(bed_uniform(dose[m], n, ab[m]), ab[m])
        set_name = LKB_SET_FOR_ENDPOINT[endpoint]
        g = geud(planned_eqd2, np_.ones(planned_eqd2.size), LKB_PARAMETERS[set_name].n)
        rows.append({"organ": s.name, "endpoint": endpoint, "gEUD EQD2 (Gy)": round(float(g), 2),
                     "LKB NTCP": round(lkb_ntcp_from_voxels(planned_eqd2, set_name), 3), "parameter set": set_name})
    sections.append(ReportSection("Digital twin and baseline toxicity risk",
                                  f"<p>Twin started for {n} fractions (timeline in <code>twin/</code>; feed it the "
                                  "daily images with <code>twinrt twin run</code>). Baseline risk: LKB NTCP of the "
                                  "planned dose as EQD2.</p>" + metrics_table_html(rows)))
