"""A documented cohort simulator for ToxicityMonitor, built on the DigitalTwin course simulator.

No public per-fraction toxicity data exist, so ToxicityMonitor's method is checked on simulated
cohorts whose generating model is stated here and was fixed (:data:`TRUTH`) before any model was
fitted. **Figures obtained on these cohorts show that the method works as built, not clinical
performance.**

For every simulated patient ``p``:

1. **Anatomy and plan**: a real planning case (the bundled sample patient, or OpenKBP training
   patients when ``../shared/data`` is present), cropped to the organs and targets with a margin and
   coarsened in plane (:func:`prepare_case`), with its clinical plan's dose.
2. **Hidden radiosensitivity** ``s_p ~ LogNormal(0, σ_s)`` (:attr:`ToxicityTruth.sensitivity_log_sd`),
   shared by the patient's organs.
3. **Course**: :class:`~twinrt.twin.simulator.CourseSimulator` (set-up errors, weight loss, deformation,
   tumour shrinkage) with organ response: before fraction ``f`` each followed organ has received the
   true cumulative BED ``B_{f−1}`` (α/β 3 Gy; its mean ``b̄``); the organ contracts to
   ``1 − k_vol · s_p · b̄/100 Gy`` of its volume and its CT numbers rise by ``k_HU · s_p · b̄/100 Gy``
   (plus the day's image noise): an imperfect image signal of the organ's response. On the days
   listed in ``pet_fractions`` (none by default) the day also has an FDG PET
   (:func:`~twinrt.twin.simulator.simulate_pet`): each followed organ's SUV is its baseline
   (:attr:`ToxicityTruth.organ_suv`) plus ``k_SUV · s_p · b̄/100 Gy`` (inflammatory uptake), blurred,
   on a coarser grid, with 15 % multiplicative noise — a second, independent imperfect signal.
4. **Toxicity** (per organ; ``endpoint`` from :data:`ORGAN_ENDPOINTS`): the damage index after
   fraction ``f`` is ``Z_f = s_p · gEUD_n(B_f) / B_ref · (1 + w · H_f)``, with ``H_f`` the share of the
   organ whose cumulative BED exceeds 1.2 × its mean (the map's spatial texture), ``n`` and ``B_ref``
   per endpoint (:class:`EndpointTruth`). The patient's threshold is ``T · exp(ε)``,
   ``ε ~ N(0, σ_T)`` (noise). Onset of grade ≥ 1 is the first fraction with ``Z_f ≥ threshold``;
   the grade is 1, 2 when ``Z_N ≥ 1.4 ×`` threshold, 3 when ``Z_N ≥ 2 ×`` threshold; 0 without onset.
5. **The twin** takes every fraction (registration, dose mapping, BED; a day whose deformable
   registration is refused is registered rigidly, and listed in the trajectory's metadata): the
   features ToxicityMonitor sees come from the twin (:func:`twinrt.toxicity.features.trajectories_from_twin`), not from the
   truth; the toxicity comes from the truth.

The parameters of :data:`TRUTH` were set once, before any model was fitted, from a pilot on the
planned doses of the cohort cases (development seed 0): ``B_ref`` 50 Gy for xerostomia (mean BED,
incidence between 0 and 0.97 across the OpenKBP plans, about 0.5 on average) and 100 Gy for
esophagitis (a near-maximum gEUD, n = 0.25; with 50 Gy nearly every patient was toxic).

Seeds: cohorts for development used seeds 0–99; reported results use seeds ≥ 1000
(:data:`EVALUATION_SEEDS`), never run during development.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Sequence

import numpy as np

from twinrt.errors import InvalidInputError
from twinrt.model import Case, Dose, Image, Structure, StructureType
from twinrt.progress import CancelToken, ProgressCallback, report
from twinrt.radiobiology import ALPHA_BETA_GY
from twinrt.toxicity.trajectory import Cohort, OrganTrajectory

#: Organs followed and their endpoints (OpenKBP / TG-263 spellings are both recognised).
ORGAN_ENDPOINTS = {"LeftParotid": "xerostomia", "RightParotid": "xerostomia", "Parotid_L": "xerostomia",
                   "Parotid_R": "xerostomia", "Esophagus": "esophagitis"}
#: Seeds of the cohorts the README reports (never used while developing).
EVALUATION_SEEDS = (1001, 1002, 1003)


@dataclass(frozen=True)
class EndpointTruth:
    """The simulated toxicity model of one endpoint.

    :param n_eud: volume parameter of the gEUD of cumulative BED (1 = mean: parallel organ).
    :param bed_ref_gy: BED normalising the damage index (Gy).
    :param threshold: damage index at which grade ≥ 1 begins (before the patient's noise).
    :param texture_weight: weight ``w`` of the hot-spot share ``H_f``.
    """

    n_eud: float
    bed_ref_gy: float
    threshold: float
    texture_weight: float


@dataclass(frozen=True)
class ToxicityTruth:
    """The generating model's parameters (fixed before fitting; see the module docstring).

    :param sensitivity_log_sd: σ of log ``s_p``.
    :param threshold_log_sd: σ of the patient's threshold noise ``ε``.
    :param hu_per_100gy: CT-number rise (HU) per 100 Gy mean BED for ``s_p = 1``.
    :param volume_loss_per_100gy: organ volume loss (share) per 100 Gy mean BED for ``s_p = 1``.
    :param suv_per_100gy: FDG SUV rise in an organ per 100 Gy mean BED for ``s_p = 1`` (on PET days);
        set with the PET option, before any model was fitted on PET features.
    :param organ_suv: baseline SUVbw of each followed organ (parotid ≈ 1.6, oesophagus ≈ 1.4) and of the
        tumour (``GTV``).
    :param pet_noise_sd: relative SD of the PET's voxel noise.
    :param endpoints: :class:`EndpointTruth` per endpoint.
    """

    sensitivity_log_sd: float = 0.4
    threshold_log_sd: float = 0.15
    hu_per_100gy: float = 40.0
    volume_loss_per_100gy: float = 0.3
    suv_per_100gy: float = 1.0
    organ_suv: Mapping[str, float] = field(default_factory=lambda: {
        "LeftParotid": 1.6, "RightParotid": 1.6, "Parotid_L": 1.6, "Parotid_R": 1.6, "Esophagus": 1.4, "GTV": 6.0})
    pet_noise_sd: float = 0.15
    endpoints: Mapping[str, EndpointTruth] = field(default_factory=lambda: {
        "xerostomia": EndpointTruth(n_eud=1.0, bed_ref_gy=50.0, threshold=1.0, texture_weight=0.5),
        "esophagitis": EndpointTruth(n_eud=0.25, bed_ref_gy=100.0, threshold=1.0, texture_weight=0.5),
    })


#: The model used for every reported cohort.
TRUTH = ToxicityTruth()


def prepare_case(case: Case, organs: Sequence[str], margin_mm: float = 25.0, inplane_factor: int = 2,
                 planned_dose: str = "reference") -> Case:
    """The case cropped to its targets and ``organs`` (+ ``margin_mm``) and coarsened in plane.

    :param inplane_factor: in-plane voxel size multiplier (2: 3.9 mm → 7.8 mm on OpenKBP grids); the
        CT is averaged, masks take the majority, the dose is averaged.
    :return: a new case on the smaller grid (CT, structures, the planned dose, prescriptions).
    """
    grid = case.ct.grid
    keep = [s for s in case.structures if not s.is_empty and (s.type == StructureType.TARGET or s.name in organs)]
    if not keep:
        raise InvalidInputError(f"Case {case.patient_id} has none of the organs {list(organs)} and no target")
    union = np.logical_or.reduce([s.on_grid(grid) for s in keep])
    idx = np.nonzero(union)
    pad = [int(np.ceil(margin_mm / sp)) for sp in grid.spacing_mm[::-1]]
    lo = [max(int(i.min()) - p, 0) for i, p in zip(idx, pad)]
    hi = [min(int(i.max()) + p + 1, n) for i, p, n in zip(idx, pad, grid.shape)]
    f = int(inplane_factor)
    # Whole blocks of f x f in plane.
    hi[1] = lo[1] + (hi[1] - lo[1]) // f * f
    hi[2] = lo[2] + (hi[2] - lo[2]) // f * f
    box = tuple(slice(a, b) for a, b in zip(lo, hi))

    def pool(a: np.ndarray) -> np.ndarray:
        a = a[box].astype(np.float32)
        k, j, i = a.shape
        return a.reshape(k, j // f, f, i // f, f).mean(axis=(2, 4))

    sub = grid.subgrid(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
    sp = sub.spacing_mm
    origin = np.asarray(sub.index_to_lps(np.array([(f - 1) / 2.0, (f - 1) / 2.0, 0.0])))
    coarse = type(grid)((sub.shape[0], sub.shape[1] // f, sub.shape[2] // f), (sp[0] * f, sp[1] * f, sp[2]),
                        tuple(origin), grid.direction)
    ct = Image(np.rint(pool(case.ct.array)).astype(np.int16), coarse)
    structures = [Structure(s.name, pool(s.on_grid(grid)) >= 0.5, coarse, s.color, s.type) for s in keep]
    dose = case.doses[planned_dose].resampled(grid)
    doses = {planned_dose: Dose(pool(dose.array), coarse, dose.name)}
    meta = {k: v for k, v in case.metadata.items() if k in ("patient_name", "frame_of_reference_uid",
                                                             "study_instance_uid", "prescriptions")}
    meta["cropped_for_cohort"] = f"cropped to targets and {list(organs)} + {margin_mm:g} mm, in-plane x{f}"
    return Case(case.patient_id, ct, [s for s in structures if not s.is_empty], doses, [], meta)


def _hot_share(bed: np.ndarray) -> float:
    m = float(bed.mean())
    return float((bed > 1.2 * m).mean()) if m > 0 else 0.0


def _geud(bed: np.ndarray, n: float) -> float:
    from twinrt.radiobiology import geud

    return float(geud(bed, np.full(bed.size, 1.0 / bed.size), n))


@dataclass
class SimulatedPatient:
    """Hidden truth of one simulated patient (kept in each trajectory's metadata too)."""

    patient_id: str
    sensitivity: float
    thresholds: dict[str, float]
    damage: dict[str, list[float]]
    seconds: float


def simulate_patient(case: Case, patient_id: str, seed: int, n_fractions: int = 30,
                     truth: ToxicityTruth = TRUTH, organs: Optional[Sequence[str]] = None,
                     planned_dose: str = "reference", pet_fractions: Sequence[int] = ()
                     ) -> tuple[list[OrganTrajectory], SimulatedPatient]:
    """One simulated patient: a course through the twin, its organ trajectories and hidden truth.

    :param case: a prepared planning case (:func:`prepare_case`); not changed.
    :param pet_fractions: fraction numbers that also have a PET (SUVbw; see the module docstring).
    """
    import copy

    from twinrt.toxicity.features import trajectories_from_twin
    from twinrt.twin.simulator import CourseSettings, CourseSimulator, simulate_pet
    from twinrt.twin.twin import DigitalTwin, FractionRefusedError, TwinSettings

    t0 = time.perf_counter()
    rng = np.random.default_rng([int(seed), 7])
    case = copy.deepcopy(case)
    case.patient_id = patient_id
    followed = [s for s in case.structures if s.name in (organs or ORGAN_ENDPOINTS) and s.name in ORGAN_ENDPOINTS]
    if not followed:
        raise InvalidInputError(f"Case {patient_id} has none of the followed organs {sorted(ORGAN_ENDPOINTS)}")
    sensitivity = float(np.exp(rng.normal(0.0, truth.sensitivity_log_sd)))
    thresholds = {s.name: truth.endpoints[ORGAN_ENDPOINTS[s.name]].threshold
                  * float(np.exp(rng.normal(0.0, truth.threshold_log_sd))) for s in followed}
    masks = {s.name: s.mask for s in followed}
    bed_truth = {s.name: np.zeros(int(s.mask.sum())) for s in followed}
    ab = ALPHA_BETA_GY["late"]  # late-responding normal tissue

    def organ_changes(f: int) -> dict[str, tuple[float, float]]:
        out = {}
        for name, bed in bed_truth.items():
            mean = float(bed.mean()) if bed.size else 0.0
            ratio = max(1.0 - truth.volume_loss_per_100gy * sensitivity * mean / 100.0, 0.5)
            out[name] = (ratio, truth.hu_per_100gy * sensitivity * mean / 100.0)
        return out

    sim = CourseSimulator(case, planned_dose, CourseSettings(n_fractions=n_fractions, seed=int(seed)), organ_changes)
    twin = DigitalTwin(sim.timeline(), TwinSettings(goal_set=None, calibrate=False))
    damage: dict[str, list[float]] = {name: [] for name in masks}
    rigid_days: list[int] = []
    pet_days = {int(f) for f in pet_fractions}
    if any(not 1 <= f <= n_fractions for f in pet_days):
        raise InvalidInputError(f"PET fractions {sorted(pet_days)} must lie in 1-{n_fractions}")
    pet_rng = np.random.default_rng([int(seed), 11])  # its own stream: cohorts without PET are unchanged
    for f in range(1, n_fractions + 1):
        day = sim.fraction(f)
        if f in pet_days:
            uptake = {name: suv + (truth.suv_per_100gy * sensitivity * float(bed_truth[name].mean()) / 100.0
                                   if name in bed_truth else 0.0)
                      for name, suv in truth.organ_suv.items()}
            day.fraction.pet = simulate_pet(day.fraction.image, day.fraction.structures, uptake, pet_rng,
                                            truth.pet_noise_sd)
        for name, m in masks.items():
            d = day.true_warped_dose_gy[m]
            bed_truth[name] += d * (1 + d / ab)
            et = truth.endpoints[ORGAN_ENDPOINTS[name]]
            z = sensitivity * _geud(bed_truth[name], et.n_eud) / et.bed_ref_gy * \
                (1 + et.texture_weight * _hot_share(bed_truth[name]))
            damage[name].append(z)
        try:
            twin.add_fraction(day.fraction)
        except FractionRefusedError:
            # As a physicist would: register that day rigidly only (recorded in the metadata).
            deformable = twin.settings
            twin.settings = replace(deformable, registration=replace(deformable.registration, deformable=False))
            try:
                twin.add_fraction(day.fraction)
            finally:
                twin.settings = deformable
            rigid_days.append(f)
    outcomes = {}
    for name, z in damage.items():
        thr = thresholds[name]
        above = np.nonzero(np.asarray(z) >= thr)[0]
        if above.size:
            grade = 1 + int(z[-1] >= 1.4 * thr) + int(z[-1] >= 2.0 * thr)
            outcomes[name] = (grade, int(above[0]) + 1)
        else:
            outcomes[name] = (0, None)
    trajectories = trajectories_from_twin(twin, list(masks), {n: ORGAN_ENDPOINTS[n] for n in masks}, outcomes=outcomes)
    hidden = SimulatedPatient(patient_id, sensitivity, thresholds, damage, time.perf_counter() - t0)
    for t in trajectories:
        t.metadata.update({"source": "simulated cohort (twinrt.toxicity.cohort)", "seed": int(seed),
                           "hidden_sensitivity": sensitivity, "hidden_threshold": thresholds[t.organ],
                           "hidden_damage": [round(v, 5) for v in damage[t.organ]],
                           "rigid_only_fractions": rigid_days, "pet_fractions": sorted(pet_days)})
    return trajectories, hidden


def simulate_cohort(cases: Sequence[Case], n_patients: int, seed: int, n_fractions: int = 30,
                    truth: ToxicityTruth = TRUTH, progress: Optional[ProgressCallback] = None,
                    cancel: Optional[CancelToken] = None, pet_fractions: Sequence[int] = ()
                    ) -> tuple[Cohort, list[SimulatedPatient]]:
    """``n_patients`` simulated patients over the prepared ``cases`` (in turn), reproducible from ``seed``.

    :param cases: prepared planning cases (:func:`prepare_case`), each with the planned dose ``reference``.
    :param pet_fractions: fractions with a PET for every patient (none by default).
    """
    if not cases:
        raise InvalidInputError("A cohort needs at least one planning case")
    if int(n_patients) < 2:
        raise InvalidInputError("A cohort needs at least 2 patients")
    trajectories: list[OrganTrajectory] = []
    hidden = []
    for p in range(int(n_patients)):
        report(progress, p / n_patients, f"Simulated patient {p + 1}/{n_patients}", cancel)
        case = cases[p % len(cases)]
        tr, h = simulate_patient(case, f"sim{seed}_{p:03d}_{case.patient_id}", seed * 1000 + p, n_fractions, truth,
                                 pet_fractions=pet_fractions)
        trajectories.extend(tr)
        hidden.append(h)
    report(progress, 1.0, "Cohort simulated", cancel)
    pet = f", PET at fractions {', '.join(map(str, sorted(set(pet_fractions))))}" if pet_fractions else ""
    return Cohort(trajectories, f"simulated cohort seed {seed}: {n_patients} patients, {n_fractions} fractions{pet} "
                                f"(twinrt.toxicity.cohort, TRUTH fixed before fitting)"), hidden


def cohort_cases(max_cases: int = 12, organs: Sequence[str] = tuple(ORGAN_ENDPOINTS)) -> list[Case]:
    """Prepared planning cases: OpenKBP training patients with both parotids (when ../shared/data is
    present, the first ``max_cases`` by name), else the bundled sample patient."""
    from twinrt.data import load_openkbp, openkbp_patients, shared_data_dir

    out = []
    if shared_data_dir() is not None:
        for path in openkbp_patients("train"):
            case = load_openkbp(path)
            names = {s.name for s in case.structures if not s.is_empty}
            if {"LeftParotid", "RightParotid"} <= names:
                out.append(prepare_case(case, organs))
            if len(out) >= max_cases:
                break
    if not out:
        from twinrt.sample import load_sample_case

        out.append(prepare_case(load_sample_case(), organs))
    return out


__all__ = ["ORGAN_ENDPOINTS", "EVALUATION_SEEDS", "EndpointTruth", "ToxicityTruth", "TRUTH", "prepare_case",
           "simulate_patient", "simulate_cohort", "cohort_cases", "SimulatedPatient"]
