"""Self-contained HTML report: metrics tables, DVH plot and dose overlays (research use only).

Pictures are rendered with matplotlib's Agg backend and embedded as base64 PNG, so the report is a
single file that opens anywhere without network access.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import twinrt
from twinrt.io_utils import write_text_atomic
from twinrt.model import Case, Dose, StructureType

#: CT display window (HU): soft tissue, wide enough to show bone.
CT_WINDOW_HU = (-400.0, 600.0)


@dataclass
class DvhCurve:
    """One cumulative DVH curve for plotting.

    :param name: structure name.
    :param color: RGB 0-255.
    :param dose_gy: dose axis (Gy).
    :param volume_percent: cumulative volume (%) receiving at least ``dose_gy``.
    :param dashed: draw dashed (e.g. the reference dose beside TwinRT's plan).
    """

    name: str
    color: tuple[int, int, int]
    dose_gy: np.ndarray
    volume_percent: np.ndarray
    dashed: bool = False


@dataclass
class ReportSection:
    """A free section: a heading and pre-escaped HTML body."""

    title: str
    html_body: str


@dataclass
class ReportContent:
    """Everything the report shows.

    :param title: page title.
    :param metrics: one dict per structure (keys with unit suffixes, e.g. ``mean_gy``).
    :param curves: DVH curves.
    :param timings: (stage, seconds, status) rows.
    :param provenance: key/value pairs (software versions, model ids and weights sha256).
    :param outputs: (label, relative path) of files written next to the report.
    """

    title: str
    metrics: list[dict[str, Any]] = field(default_factory=list)
    curves: list[DvhCurve] = field(default_factory=list)
    timings: list[tuple[str, float, str]] = field(default_factory=list)
    provenance: dict[str, str] = field(default_factory=dict)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    sections: list[ReportSection] = field(default_factory=list)


def _png_base64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def dvh_figure_png(curves: Sequence[DvhCurve], title: str = "Cumulative DVH") -> str:
    """A DVH plot (volume % against dose Gy) as a base64 PNG string."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    for c in curves:
        ax.plot(c.dose_gy, c.volume_percent, color=np.array(c.color) / 255.0, label=c.name, lw=1.6,
                ls="--" if c.dashed else "-")
    ax.set_xlabel("Dose (Gy)")
    ax.set_ylabel("Volume (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    # Outside the axes: with two doses per structure an inside legend hides the curves.
    ax.legend(fontsize=7, ncol=1 if len(curves) <= 12 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    png = _png_base64(fig)
    plt.close(fig)
    return png


def _focus_index(case: Case, dose_on_ct: np.ndarray) -> tuple[int, int, int]:
    """(k, j, i) voxel to slice through: the first target's centroid, else the dose maximum."""
    for s in case.structures:
        if s.type == StructureType.TARGET and s.mask.any() and s.grid.is_same(case.ct.grid):
            idx = np.argwhere(s.mask).mean(axis=0)
            return tuple(int(round(v)) for v in idx)  # type: ignore[return-value]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(dose_on_ct)), dose_on_ct.shape))  # type: ignore


def dose_overlay_png(case: Case, dose: Dose, title: str = "Dose overlay") -> str:
    """Axial, coronal and sagittal CT slices with dose colour wash and structure outlines (base64 PNG).

    Slices pass through the first target's centroid. Display follows the radiological convention
    (patient right on the image left, anterior up on axial, superior up on coronal and sagittal)
    for an axis-aligned, identity-direction grid; other directions are shown in index order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = case.ct.grid
    dose_ct = dose.resampled(grid).array if not dose.grid.is_same(grid) else dose.array
    k, j, i = _focus_index(case, dose_ct)
    di, dj, dk = grid.spacing_mm
    vmax = max(float(dose_ct.max()), 1e-6)
    views = [
        ("Axial", lambda a: a[k], dj / di, "upper"),
        ("Coronal", lambda a: a[:, j, :], dk / di, "lower"),
        ("Sagittal", lambda a: a[:, :, i], dk / dj, "lower"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (name, cut, aspect, origin) in zip(axes, views):
        ax.imshow(cut(case.ct.array), cmap="gray", vmin=CT_WINDOW_HU[0], vmax=CT_WINDOW_HU[1],
                  aspect=aspect, origin=origin, interpolation="nearest")
        d = cut(dose_ct)
        # Hide the colour wash below 10% of the maximum so anatomy stays readable.
        wash = np.ma.masked_less(d, 0.1 * vmax)
        im = ax.imshow(wash, cmap="jet", vmin=0, vmax=vmax, alpha=0.45, aspect=aspect, origin=origin,
                       interpolation="nearest")
        for s in case.structures:
            if not s.grid.is_same(grid):
                continue
            m = cut(s.mask)
            if m.any():
                ax.contour(m.astype(float), levels=[0.5], colors=[np.array(s.color) / 255.0], linewidths=0.8,
                           origin=origin)
        ax.set_title(name)
        ax.set_axis_off()
    fig.colorbar(im, ax=axes, shrink=0.8, label=f"{dose.name} dose (Gy)")
    fig.suptitle(title)
    png = _png_base64(fig)
    plt.close(fig)
    return png


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if not np.isfinite(v) else f"{v:.2f}"
    return html.escape(str(v))


def metrics_table_html(rows: Sequence[dict[str, Any]]) -> str:
    """An HTML table of metric rows; columns are the union of keys in first-seen order."""
    if not rows:
        return "<p>No metrics.</p>"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{margin-bottom:4px} .ruo{background:#fff3cd;border:1px solid #e0c060;padding:8px 12px;font-weight:600}
table{border-collapse:collapse;font-size:13px;margin:8px 0} td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0} td:first-child,th:first-child{text-align:left} img{max-width:100%}
.muted{color:#666;font-size:12px}
"""


def render_report(case: Case, content: ReportContent, overlay_dose: Dose | None = None) -> str:
    """The report as an HTML string.

    :param case: the patient (for identity, slices and structures).
    :param content: metrics, curves, timings, provenance and outputs.
    :param overlay_dose: dose to draw on the slices (none: no overlay figure).
    """
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(content.title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(content.title)}</h1>",
             f"<p class='ruo'>{html.escape(twinrt.RESEARCH_USE_ONLY)}</p>",
             "<p>Patient ID <b>" + html.escape(case.patient_id) + "</b> &middot; generated "
             + html.escape(_dt.datetime.now().isoformat(timespec="seconds")) + " by TwinRT "
             + html.escape(twinrt.__version__) + "</p>"]
    if content.timings:
        rows = [{"stage": s, "seconds": float(t), "status": st} for s, t, st in content.timings]
        parts += ["<h2>Stages</h2>", metrics_table_html(rows)]
    parts += ["<h2>Dose-volume metrics</h2>", metrics_table_html(content.metrics)]
    if content.curves:
        parts += ["<h2>Dose-volume histogram</h2>",
                  f"<img alt='DVH' src='data:image/png;base64,{dvh_figure_png(content.curves)}'>"]
    if overlay_dose is not None:
        png = dose_overlay_png(case, overlay_dose, f"{overlay_dose.name} dose on CT")
        parts += ["<h2>Dose overlay</h2>", f"<img alt='Dose overlay' src='data:image/png;base64,{png}'>"]
    for sec in content.sections:
        parts += [f"<h2>{html.escape(sec.title)}</h2>", sec.html_body]
    if content.outputs:
        items = "".join(f"<li>{html.escape(lbl)}: <code>{html.escape(p)}</code></li>" for lbl, p in content.outputs)
        parts += ["<h2>Files written</h2>", f"<ul>{items}</ul>"]
    if content.provenance:
        rows = [{"item": k, "value": v} for k, v in content.provenance.items()]
        parts += ["<h2>Provenance</h2>", metrics_table_html(rows)]
    parts += [f"<p class='muted'>{html.escape(twinrt.RESEARCH_USE_ONLY)}</p></body></html>"]
    return "\n".join(parts)


def write_report(path: str | Path, case: Case, content: ReportContent, overlay_dose: Dose | None = None) -> Path:
    """Render and write the report atomically; returns the path."""
    return write_text_atomic(path, render_report(case, content, overlay_dose))
