"""Plan a case end to end: beams → dij → fluence optimisation → leaf sequencing → deliverable plan.

This is the one planning entry point used by the AIPlanner module's Logic, the ``twinrt plan``
command and the benchmarks. Every step is in :mod:`twinrt.planning`; this module only chains them,
derives the defaults (isocentre, body, objectives) and records what reproduces the result.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from twinrt.errors import InvalidInputError, StructureError
from twinrt.geometry import Grid
from twinrt.model import Case, Dose, Image, Plan, Prescription, Structure, StructureType
from twinrt.planning.beams import Beam, BeamRays
from twinrt.planning.objectives import Objective, objective_from_dict
from twinrt.progress import CancelToken, ProgressCallback, report

#: HU above which a voxel counts as patient when a case has no external (body) structure.
BODY_THRESHOLD_HU = -500.0
#: Name of the body structure derived from the CT when the case has none.
AUTO_BODY_NAME = "External (auto)"
#: Reference dose rate of the MU calibration: 1 cGy per MU (see :func:`mu_per_unit_weight`).
CALIBRATION_GY_PER_MU = 0.01
#: Depth of the calibration point (mm): d_max of a 6 MV beam.
CALIBRATION_DEPTH_MM = 15.0
#: Side of the square calibration field at the isocentre (mm).
CALIBRATION_FIELD_MM = 100.0


@dataclass
class PlanSetup:
    """Everything besides the objectives that reproduces a plan.

    :param gantry_deg: gantry angles (degrees, IEC), one beam each.
    :param couch_deg: couch angle of every beam (degrees).
    :param isocenter_mm: isocentre (LPS, mm); default: centroid of the union of the targets.
    :param bixel_width_mm: bixel size in the isocentre plane (mm).
    :param dose_grid_mm: dose-grid spacing (mm); ``None`` computes dose on the CT grid itself.
    :param lateral_cutoff_mm: dij lateral cut-off (mm).
    :param max_iter: optimiser iterations.
    :param smoothness_weight: fluence smoothness penalty (0: none).
    :param max_dose_gy: optional hard maximum dose (Gy) in structures with objectives.
    :param levels: intensity levels per beam for leaf sequencing.
    :param leaf_width_mm: MLC leaf width at the isocentre (mm).
    :param min_segment_mu: least MU per fraction of any segment.
    """

    gantry_deg: tuple[float, ...] = tuple(float(g) for g in range(0, 360, 40))
    couch_deg: float = 0.0
    isocenter_mm: Optional[tuple[float, float, float]] = None
    bixel_width_mm: float = 5.0
    dose_grid_mm: Optional[float] = 5.0
    lateral_cutoff_mm: float = 50.0
    max_iter: int = 200
    smoothness_weight: float = 0.0
    max_dose_gy: Optional[float] = None
    levels: int = 10
    leaf_width_mm: float = 5.0
    min_segment_mu: float = 0.0

    @classmethod
    def equispaced(cls, n_beams: int, start_deg: float = 0.0, **kwargs: Any) -> "PlanSetup":
        """``n_beams`` coplanar beams spaced evenly over 360°, starting at ``start_deg``."""
        if not 1 <= int(n_beams) <= 36:
            raise InvalidInputError(f"Number of beams must be 1..36, got {n_beams}")
        angles = tuple(float((start_deg + i * 360.0 / n_beams) % 360.0) for i in range(int(n_beams)))
        return cls(gantry_deg=angles, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stored with plans so they can be reproduced)."""
        d = asdict(self)
        d["gantry_deg"] = list(self.gantry_deg)
        d["isocenter_mm"] = list(self.isocenter_mm) if self.isocenter_mm is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PlanSetup":
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInputError(f"Unknown plan set-up keys {sorted(unknown)}")
        d = dict(data)
        if "gantry_deg" in d:
            d["gantry_deg"] = tuple(float(g) for g in d["gantry_deg"])
        if d.get("isocenter_mm") is not None:
            d["isocenter_mm"] = tuple(float(v) for v in d["isocenter_mm"])
        return cls(**d)


@dataclass
class PlanningResult:
    """What :func:`plan_case` produced.

    :param plan: the deliverable plan (sequenced beams, MU per fraction, UNAPPROVED).
    :param dose: dose of the sequenced plan (Gy) on the dose grid, name ``"planned"``.
    :param optimized_dose: dose of the ideal (unsequenced) fluence (Gy), name ``"optimized"``.
    :param weights: optimised bixel weights; ``delivered_weights``: those the segments deliver.
    :param sequencing: the sequencing report (segments, MU, fluence and dose loss).
    :param dij_stats: non-zeros, bytes and timings of the dose-influence matrix.
    :param optimization: solver figures (iterations, objective history, time).
    :param timings_s: seconds per step.
    :param setup: the set-up used; ``objectives``: the objectives used (as dicts).
    """

    plan: Plan
    dose: Dose
    optimized_dose: Dose
    weights: np.ndarray
    delivered_weights: np.ndarray
    sequencing: dict[str, Any]
    dij_stats: dict[str, Any]
    optimization: dict[str, Any]
    timings_s: dict[str, float]
    setup: PlanSetup
    objectives: list[dict[str, Any]] = field(default_factory=list)
    beams: list[BeamRays] = field(default_factory=list)


def body_structure(case: Case) -> Structure:
    """The case's external structure, or one made from the CT when it has none.

    The made one is every voxel above -500 HU plus every voxel of every structure: targets are
    often drawn a few millimetres into the air at the skin (PTV margins), and dose is computed only
    inside the body, so leaving them out would leave those target voxels without dose.
    """
    for s in case.structures:
        if s.type == StructureType.EXTERNAL and not s.is_empty:
            return s
    mask = case.ct.array > BODY_THRESHOLD_HU
    for s in case.structures:
        mask |= s.on_grid(case.ct.grid)
    if not mask.any():
        raise StructureError("The CT has no voxel above -500 HU, so no patient outline can be found; "
                             "check the CT's rescale (HU) or add an external structure", AUTO_BODY_NAME)
    return Structure(AUTO_BODY_NAME, mask, case.ct.grid, (180, 180, 180), StructureType.EXTERNAL)


def _prescriptions(case: Case, prescriptions: Optional[Sequence[Prescription]]) -> list[Prescription]:
    pres = list(prescriptions) if prescriptions else list(case.prescriptions)
    if not pres:
        raise InvalidInputError(f"Case {case.patient_id} has no prescription: select the target(s) and give "
                                "the prescribed dose and number of fractions")
    for p in pres:
        s = case.structure(p.target)  # StructureError naming it when absent
        if s.is_empty:
            raise StructureError(f"Target '{p.target}' is empty; contour it or choose another target", p.target)
    return pres


def optimization_structures(case: Case, prescriptions: Sequence[Prescription]) -> list[Structure]:
    """The structures the optimiser sees: nested targets made disjoint, higher dose first.

    With a simultaneous integrated boost (PTV70 inside PTV56, say) a voxel in both would be pulled
    to two doses. As planners do with "optimisation structures", each target keeps only the voxels
    not in a target with a higher prescription; names are unchanged so objectives still refer to
    them. Other structures are returned as they are (the optimiser resolves target/organ overlap).
    """
    order = sorted(prescriptions, key=lambda p: -p.dose_gy)
    taken = np.zeros(case.ct.grid.shape, bool)
    replaced: dict[str, Structure] = {}
    for p in order:
        s = case.structure(p.target)
        mask = s.on_grid(case.ct.grid) & ~taken
        taken |= s.on_grid(case.ct.grid)
        if not mask.any():
            raise StructureError(f"Target '{s.name}' lies entirely inside a target with a higher prescription; "
                                 "remove one of the prescriptions", s.name)
        replaced[s.name] = Structure(s.name, mask, case.ct.grid, s.color, s.type)
    return [replaced.get(s.name, s) for s in case.structures]


def default_objectives(case: Case, prescriptions: Optional[Sequence[Prescription]] = None) -> list[dict[str, Any]]:
    """A starting objective set: each target at its prescription, organs and body kept low.

    Targets: squared deviation from the prescription (weight 1000, the TG-119 example's priority)
    and squared underdose below 95 % of it (weight 3000), since coverage comes first. Organs at
    risk: squared overdose above 50 % of the highest prescription (weight 30) and a mean-dose
    objective at 40 % (weight 3). Body: squared overdose above 105 % of the highest prescription
    (weight 100), which limits hot spots outside the targets. Issue 4's virtual planner adjusts
    these against clinical goals; they are a starting point, not a protocol.
    """
    pres = _prescriptions(case, prescriptions)
    rx_max = max(p.dose_gy for p in pres)
    objs: list[dict[str, Any]] = []
    for p in pres:
        objs.append({"structure": p.target, "kind": "squared_deviation", "dose_gy": p.dose_gy, "weight": 1000.0})
        objs.append({"structure": p.target, "kind": "squared_underdose", "dose_gy": 0.95 * p.dose_gy,
                     "weight": 3000.0})
    targets = {p.target.lower() for p in pres}
    for s in case.structures:
        if s.is_empty or s.name.lower() in targets or s.type != StructureType.ORGAN:
            continue
        objs.append({"structure": s.name, "kind": "squared_overdose", "dose_gy": 0.5 * rx_max, "weight": 30.0})
        objs.append({"structure": s.name, "kind": "mean_dose", "dose_gy": 0.4 * rx_max, "weight": 3.0})
    objs.append({"structure": body_structure(case).name, "kind": "squared_overdose", "dose_gy": 1.05 * rx_max,
                 "weight": 100.0})
    return objs


def normalise_result(result: "PlanningResult", factor: float) -> "PlanningResult":
    """The plan with every segment's MU (and so its dose) multiplied by ``factor``: plan normalisation.

    Dose is linear in MU, so the sequenced dose, the delivered weights and the MU figures of the
    sequencing report scale exactly; the ideal fluence (``weights``, ``optimized_dose``) is kept.
    The report records ``normalisation_factor`` (cumulative).

    :param result: a sequenced plan.
    :param factor: the multiplier, > 0 (e.g. 1.01 raises every dose by 1 %).
    :raises InvalidInputError: a factor that is not a finite number > 0.
    """
    from dataclasses import replace

    f = float(factor)
    if not (np.isfinite(f) and f > 0):
        raise InvalidInputError(f"The normalisation factor must be a finite number > 0, got {factor!r}")
    beams = [replace(b, segments=[replace(s, mu=s.mu * f) for s in b.segments]) if hasattr(b, "segments") else b
             for b in result.plan.beams]
    report = dict(result.sequencing)
    report["total_mu"] = float(report.get("total_mu", 0.0)) * f
    report["beams"] = [{**r, "total_mu": float(r.get("total_mu", 0.0)) * f} for r in report.get("beams", [])]
    report["normalisation_factor"] = float(report.get("normalisation_factor", 1.0)) * f
    d = result.dose
    dose = Dose(d.array * np.float32(f), d.grid, d.name, d.dose_type, d.summation, d.source)
    return replace(result, plan=replace(result.plan, beams=beams), dose=dose,
                   delivered_weights=np.asarray(result.delivered_weights) * f, sequencing=report)


@functools.lru_cache(maxsize=8)
def mu_per_unit_weight(bixel_width_mm: float = 5.0, lateral_cutoff_mm: float = 50.0) -> float:
    """Monitor units (whole treatment) per unit bixel weight: the engine's dose calibration.

    Reference conditions (SAD calibration): water, a 100 mm × 100 mm field of unit-weight bixels
    at the isocentre, the isocentre at 15 mm depth (d_max of 6 MV): 1 MU gives 1 cGy there. The
    result is ``100 × (dose in Gy at the reference point per unit weight)``. Deterministic; cached
    per set-up.
    """
    from twinrt.planning.engine import compute_dij

    spacing = 2.5
    n = 81  # 200 mm water cube around the isocentre, 2.5 mm voxels
    grid = Grid((n, n, n), (spacing,) * 3, tuple(-(n - 1) / 2 * spacing for _ in range(3)))
    hu = np.full(grid.shape, -1000, np.int16)
    # Water from 15 mm in front of the isocentre (gantry 0 enters from -y) onwards.
    y = grid.axis_positions("j")
    hu[:, y >= -CALIBRATION_DEPTH_MM - spacing / 2, :] = 0
    body = hu == 0
    half = CALIBRATION_FIELD_MM / 2
    xs = np.arange(-half + bixel_width_mm / 2, half, bixel_width_mm)
    xx, zz = np.meshgrid(xs, xs, indexing="ij")
    rays = BeamRays(Beam(0.0, bixel_width_mm=bixel_width_mm),
                    np.stack([xx.ravel(), np.zeros(xx.size), zz.ravel()], axis=1))
    # The engine traces depths on the dose grid, so the dose grid spans the phantom; dose is
    # computed only in the isocentre voxel (the grid is centred on it).
    calc = np.zeros(grid.shape, bool)
    calc[n // 2, n // 2, n // 2] = True
    dij = compute_dij(Image(hu, grid), grid, [rays], calc_mask=calc, lateral_cutoff_mm=lateral_cutoff_mm,
                      body_mask=body, rel_threshold=0.0)
    d_ref = float(dij.dose(np.ones(dij.n_bixels))[n // 2, n // 2, n // 2])
    if d_ref <= 0:
        raise RuntimeError("MU calibration failed: no dose at the reference point")
    # A weight w gives d_ref * w Gy at the reference point, i.e. d_ref * w / 0.01 MU.
    return d_ref / CALIBRATION_GY_PER_MU


@dataclass
class PlanningProblem:
    """A case made ready for optimisation: everything that does not depend on the objectives.

    Computing the dose-influence matrix is the expensive, objective-independent part of planning;
    keeping it here lets the virtual planner (:mod:`twinrt.planning.agent`) optimise many times
    against one dij.

    :param case: the case.
    :param setup: the set-up used.
    :param prescriptions: the prescriptions planned for.
    :param body: body (external) structure; made from the CT when the case has none.
    :param structures: the structures the optimiser sees (:func:`optimization_structures`, plus the
        made body).
    :param beams: rays of every beam.
    :param dose_grid: the dose grid.
    :param dij: the dose-influence matrix on ``dose_grid``.
    :param dij_stats: non-zeros, bytes and seconds of the dij.
    :param isocenter_mm: the isocentre used (LPS, mm).
    :param timings_s: seconds of ``rays_s`` and ``dij_s``.
    :param reference_doses: named doses (Gy, resampled onto ``dose_grid``) that ``dose_mimicking``
        objectives refer to; set with :meth:`set_reference_doses`.
    """

    case: Case
    setup: PlanSetup
    prescriptions: list[Prescription]
    body: Structure
    structures: list[Structure]
    beams: list[BeamRays]
    dose_grid: Grid
    dij: Any
    dij_stats: dict[str, Any]
    isocenter_mm: tuple[float, float, float]
    timings_s: dict[str, float] = field(default_factory=dict)
    reference_doses: dict[str, Dose] = field(default_factory=dict)

    def set_reference_doses(self, doses: dict[str, Dose]) -> None:
        """Store named reference doses (e.g. ``{"predicted": ..., "predicted_std": ...}``) on the dose grid.

        Each is resampled trilinearly onto :attr:`dose_grid` (zero outside its own grid).
        :raises InvalidInputError: a value that is not a :class:`~twinrt.model.Dose`.
        """
        for name, dose in doses.items():
            if not isinstance(dose, Dose):
                raise InvalidInputError(f"Reference dose '{name}' must be a Dose, got {type(dose).__name__}")
        self.reference_doses.update({name: dose if dose.grid == self.dose_grid else dose.resampled(self.dose_grid)
                                     for name, dose in doses.items()})


def _sub_progress(progress: Optional[ProgressCallback], lo: float, hi: float) -> Optional[ProgressCallback]:
    """``progress`` mapped onto the part ``lo..hi`` of the whole task."""
    return None if progress is None else (lambda f, text: progress(lo + (hi - lo) * f, text))


def prepare_problem(case: Case, setup: Optional[PlanSetup] = None,
                    prescriptions: Optional[Sequence[Prescription]] = None,
                    progress: Optional[ProgressCallback] = None,
                    cancel: Optional[CancelToken] = None) -> PlanningProblem:
    """Checks, rays, dose grid and dose-influence matrix: the objective-independent half of :func:`plan_case`.

    :param case: CT (HU) with structures; targets must be among them.
    :param setup: beams and parameters; default :class:`PlanSetup`.
    :param prescriptions: default the case's prescriptions.
    :param progress: ``progress(fraction, text)``, 0..1 over this step.
    :param cancel: cancel token (raises :class:`twinrt.progress.CancelledError`).
    :raises InvalidInputError: no prescription, beams missing the target, a dose grid too large.
    :raises StructureError: a missing or empty target, or a target outside the body.
    """
    from twinrt.planning.engine import compute_dij, dose_grid_for
    from twinrt.planning.rays import generate_rays

    setup = setup or PlanSetup()
    pres = _prescriptions(case, prescriptions)
    body = body_structure(case)
    structures = optimization_structures(case, pres) + ([body] if body.name == AUTO_BODY_NAME else [])
    grid = case.ct.grid
    target_mask = np.zeros(grid.shape, bool)
    for p in pres:
        target_mask |= case.structure(p.target).on_grid(grid)
    if not (target_mask & body.on_grid(grid)).any():
        raise StructureError("The target lies outside the body outline; check the structures' frame of reference",
                             pres[0].target)
    iso = setup.isocenter_mm or tuple(grid.index_to_lps(np.argwhere(target_mask).mean(axis=0)[::-1]))
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    report(progress, 0.0, "Generating rays", cancel)
    beams = [generate_rays(Beam(g, setup.couch_deg, iso, bixel_width_mm=setup.bixel_width_mm), target_mask, grid,
                           body.on_grid(grid)) for g in setup.gantry_deg]
    dose_grid = grid if setup.dose_grid_mm is None else dose_grid_for(grid, setup.dose_grid_mm)
    timings["rays_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stats: dict[str, Any] = {}
    # 0.02/0.45 .. 1: the sub-range plan_case has always given the dij (its progress is unchanged).
    dij = compute_dij(case.ct, dose_grid, beams, lateral_cutoff_mm=setup.lateral_cutoff_mm,
                      progress=_sub_progress(progress, 0.02 / 0.45, 1.0), cancel=cancel,
                      body_mask=body.on_grid(grid),
                      target_mask=(Structure("target", target_mask, grid).on_grid(dose_grid)), stats=stats)
    timings["dij_s"] = time.perf_counter() - t0
    return PlanningProblem(case, setup, pres, body, structures, beams, dose_grid, dij,
                           {k: v for k, v in stats.items() if k in ("nnz", "bytes", "seconds")},
                           tuple(float(v) for v in iso), timings)


def _objective_dicts(objectives: Sequence[Objective | dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(o) if isinstance(o, dict) else o.to_dict() for o in objectives]


def optimize_problem(problem: PlanningProblem, objectives: Sequence[Objective | dict[str, Any]],
                     initial_weights: Optional[np.ndarray] = None, max_iter: Optional[int] = None,
                     progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> Any:
    """Optimise the fluence of a prepared problem (no sequencing).

    :param problem: from :func:`prepare_problem`.
    :param objectives: objectives (or their dicts).
    :param initial_weights: warm start (one weight per bixel), default the optimiser's uniform start.
    :param max_iter: iterations; default ``problem.setup.max_iter``.
    :param progress: ``progress(fraction, text)``, 0..1 over this step.
    :param cancel: cancel token.
    :return: :class:`twinrt.planning.optimizer.OptimizationResult`.
    """
    from twinrt.planning.optimizer import optimize_fluence

    setup = problem.setup
    objs = [objective_from_dict(o) for o in _objective_dicts(objectives)]
    return optimize_fluence(problem.dij, problem.structures, objs,
                            max_iter=setup.max_iter if max_iter is None else int(max_iter),
                            initial_weights=initial_weights, smoothness_weight=setup.smoothness_weight,
                            max_dose_gy=setup.max_dose_gy, progress=progress, cancel=cancel,
                            reference_doses={n: d.array for n, d in problem.reference_doses.items()})


def sequence_result(problem: PlanningProblem, opt: Any, objectives: Sequence[Objective | dict[str, Any]],
                    label: str = "TwinRT AI", timings_s: Optional[dict[str, float]] = None,
                    progress: Optional[ProgressCallback] = None,
                    cancel: Optional[CancelToken] = None) -> PlanningResult:
    """Leaf-sequence an optimised fluence and build the :class:`PlanningResult`.

    :param problem: from :func:`prepare_problem`.
    :param opt: the :class:`~twinrt.planning.optimizer.OptimizationResult` to deliver.
    :param objectives: the objectives ``opt`` was optimised for (recorded with the result).
    :param label: RT plan label.
    :param timings_s: timings so far (copied; ``sequencing_s`` is added).
    :param progress: ``progress(fraction, text)`` at the start and end of sequencing.
    :param cancel: cancel token.
    """
    from twinrt.planning.plan import sequence_plan

    setup = problem.setup
    timings = dict(timings_s or {})
    t0 = time.perf_counter()
    report(progress, 0.0, "Leaf sequencing", cancel)
    mu_w = mu_per_unit_weight(setup.bixel_width_mm, setup.lateral_cutoff_mm)
    seq = sequence_plan(problem.beams, opt.weights, problem.prescriptions, mu_per_unit_weight=mu_w, label=label,
                        levels=setup.levels, leaf_width_mm=setup.leaf_width_mm, min_segment_mu=setup.min_segment_mu,
                        dij=problem.dij)
    timings["sequencing_s"] = time.perf_counter() - t0
    report(progress, 1.0, "Plan ready", cancel)

    source = "TwinRT photon pencil-beam (SVD kernels, matRad generic 6 MV machine); " \
             "fluence optimisation and Bortfeld 1994 step-and-shoot sequencing"
    dose = Dose(seq.delivered_dose_gy, problem.dose_grid, name="planned", source=source)
    optimized = Dose(opt.dose_gy, problem.dose_grid, name="optimized", source=source + " (ideal fluence)")
    optimization = {"iterations": opt.iterations, "time_s": opt.time_s, "total_objective": opt.total_objective,
                    "objective_values": list(opt.objective_values), "message": opt.message,
                    "evaluations": opt.evaluations}
    return PlanningResult(seq.plan, dose, optimized, opt.weights, seq.delivered_weights, seq.report,
                          dict(problem.dij_stats), optimization, timings, setup, _objective_dicts(objectives),
                          problem.beams)


def optimize_and_sequence(problem: PlanningProblem, objectives: Optional[Sequence[Objective | dict[str, Any]]] = None,
                          initial_weights: Optional[np.ndarray] = None, label: str = "TwinRT AI",
                          progress: Optional[ProgressCallback] = None,
                          cancel: Optional[CancelToken] = None) -> PlanningResult:
    """Optimise and sequence a prepared problem: the objective-dependent half of :func:`plan_case`.

    :param problem: from :func:`prepare_problem`.
    :param objectives: objectives (or their dicts); default :func:`default_objectives`.
    :param initial_weights: warm start (one weight per bixel).
    :param label: RT plan label.
    :param progress: ``progress(fraction, text)``, 0..1 over this step.
    :param cancel: cancel token.
    """
    objective_dicts = _objective_dicts(objectives or default_objectives(problem.case, problem.prescriptions))
    # Checked before optimising so that a bad objective fails fast (as plan_case always did).
    for o in objective_dicts:
        objective_from_dict(o)
    timings = dict(problem.timings_s)
    t0 = time.perf_counter()
    # 0.45..0.9 and 0.9..1 of plan_case's progress, re-based onto this step's 0..1.
    opt = optimize_problem(problem, objective_dicts, initial_weights, progress=_sub_progress(progress, 0.0, 0.45 / 0.55),
                           cancel=cancel)
    timings["optimization_s"] = time.perf_counter() - t0
    return sequence_result(problem, opt, objective_dicts, label, timings, _sub_progress(progress, 0.45 / 0.55, 1.0),
                           cancel)


def plan_case(case: Case, objectives: Optional[Sequence[Objective | dict[str, Any]]] = None,
              setup: Optional[PlanSetup] = None, prescriptions: Optional[Sequence[Prescription]] = None,
              label: str = "TwinRT AI", progress: Optional[ProgressCallback] = None,
              cancel: Optional[CancelToken] = None) -> PlanningResult:
    """Plan ``case``: rays, dij, fluence optimisation, leaf sequencing and the sequenced dose.

    :func:`prepare_problem` followed by :func:`optimize_and_sequence`.

    :param case: CT (HU) with structures; targets must be among them.
    :param objectives: objectives (or their dicts); default :func:`default_objectives`.
    :param setup: beams and parameters; default 9 equispaced beams, 5 mm bixels and dose grid.
    :param prescriptions: default the case's prescriptions.
    :param label: RT plan label.
    :param progress: ``progress(fraction, text)``.
    :param cancel: cancel token (raises :class:`twinrt.progress.CancelledError`).
    :raises InvalidInputError: no prescription/target, beams missing the target, a dose grid too
        large for memory (with the estimate); nothing is returned half-made.
    :raises StructureError: a target or objective structure that is missing or empty.
    """
    pres = _prescriptions(case, prescriptions)
    # Objectives are parsed before the (slow) dij so that a typo fails at once, as before.
    objective_dicts = _objective_dicts(objectives or default_objectives(case, pres))
    for o in objective_dicts:
        objective_from_dict(o)
    problem = prepare_problem(case, setup, pres, _sub_progress(progress, 0.0, 0.45), cancel)
    return optimize_and_sequence(problem, objective_dicts, label=label, progress=_sub_progress(progress, 0.45, 1.0),
                                 cancel=cancel)
