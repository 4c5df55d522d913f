"""A documented treatment-course simulator: a planning case becomes a course of daily images and doses.

Real per-fraction imaging is not available to TwinRT's tests, so this simulator makes a course from a
real planning case with *known* truth, to measure how well the twin recovers it.

For fraction ``f`` (1 … N, on weekdays from the start date; imaging precedes that day's delivery) the
anatomy moves by a known map ``φ_f`` from planning positions ``x`` to the day's positions ``y``
(patient LPS, mm), composed of, in order:

1. **tumour shrinkage** around the tumour's centroid ``c``:
   ``x ↦ c + (x − c)·g(r)``, ``g(r) = 1 − (1 − s_f)·exp(−r²/R²)``, ``r = |x − c|``,
   ``R = 1.5 ×`` the tumour's equivalent-sphere radius; invertible for every ``s_f > 0`` (the radial
   derivative ``1 − (1 − s_f)(1 − 2u)e^{−u}``, ``u = r²/R²``, is at least ``s_f``). ``s_f`` is solved so that the tumour's volume
   (the integral of the map's Jacobian over the planning tumour) equals the response model's volume
   at that day times log-normal contouring noise (:attr:`CourseSettings.observation_sd`), divided
   by the in-plane weight-loss factor;
   Optionally (``organ_changes``) organs contract likewise about their own centroids (scale
   ``ratio^(1/3)`` at the centre, radius 1.5 × the organ's equivalent radius) and their CT numbers
   shift, to simulate organ response;
2. **weight loss**: in-plane contraction towards the body's centroid by ``w_f = w_end · t_f / t_N``
   (``w_end`` = :attr:`CourseSettings.weight_loss_end`, a fraction of the radius: 0.04 ≈ 3–5 mm at
   the skin of a neck);
3. **soft-tissue deformation**: a smooth random field (white noise smoothed by a Gaussian of
   :attr:`CourseSettings.deformation_length_mm`, scaled to :attr:`CourseSettings.deformation_mm` RMS),
   new every day;
4. **set-up error**: rotation about the isocentre (σ :attr:`CourseSettings.rotation_sd_deg` per axis)
   and translation (a systematic part drawn once, σ :attr:`CourseSettings.setup_systematic_mm`, plus a
   daily random part, σ :attr:`CourseSettings.setup_random_mm`, per axis).

The day's image is the planning CT seen through the inverse map ``ψ_f = φ_f⁻¹`` (fixed-point
inversion, residual reported), ``I_f(y) = I(ψ_f(y))`` plus Gaussian noise
(:attr:`CourseSettings.image_noise_hu`); the day's structures likewise. The delivered dose of the
day is the planned dose divided by N, fixed in the room (the static dose-cloud approximation:
density changes do not alter the dose distribution); the truth the twin must recover is the
accumulated dose on the planning anatomy, ``Σ_f d(φ_f(x))``.

The tumour follows :mod:`twinrt.twin.response` with known parameters (:attr:`CourseSettings.response`).
:func:`simulate_pet` makes a PET of a day (SUVbw) from its image and structures, for courses with
interim PET/CT.

OpenKBP cases have no GTV: :func:`ensure_tumour` adds one as the highest-dose PTV eroded by 5 mm
(a documented proxy).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np

from twinrt.errors import InvalidInputError
from twinrt.geometry import sample_at_lps, voxel_centres_lps
from twinrt.model import Case, Dose, Image, Prescription, Structure, StructureType
from twinrt.twin.timeline import CaseTimeline, Fraction, parse_date

#: Name of the tumour structure the simulator and the twin follow.
TUMOUR = "GTV"
#: Erosion (mm) of the highest-dose PTV that makes the GTV proxy of a case without a GTV.
GTV_PROXY_MARGIN_MM = 5.0


def treatment_dates(start: str, n_fractions: int) -> list[str]:
    """ISO dates of ``n_fractions`` weekday fractions from ``start`` (a weekend start moves to Monday)."""
    day = parse_date(start, "course start date")
    out = []
    while len(out) < n_fractions:
        if day.weekday() < 5:
            out.append(day.isoformat())
        day += _dt.timedelta(days=1)
    return out


def ensure_tumour(case: Case, name: str = TUMOUR, margin_mm: float = GTV_PROXY_MARGIN_MM) -> Structure:
    """The case's tumour structure ``name``; when absent, add the proxy (highest-dose PTV eroded by ``margin_mm``).

    :raises InvalidInputError: no target to derive it from, or the erosion leaves nothing.
    """
    from scipy import ndimage

    for s in case.structures:
        if s.name.lower() == name.lower():
            return s
    targets = [s for s in case.structures if s.type == StructureType.TARGET and not s.is_empty]
    if not targets:
        raise InvalidInputError(f"Case {case.patient_id} has no '{name}' and no target to derive it from; "
                                f"contour the tumour as '{name}'")
    rx = {p.target.lower(): p.dose_gy for p in case.prescriptions}
    ptv = max(targets, key=lambda s: (rx.get(s.name.lower(), 0.0), s.name))
    inside = ndimage.distance_transform_edt(ptv.mask, sampling=ptv.grid.spacing_mm[::-1])
    mask = inside > margin_mm
    if not mask.any():
        raise InvalidInputError(f"{ptv.name} is thinner than {2 * margin_mm:g} mm: no tumour proxy; contour '{name}'")
    gtv = Structure(name, mask, ptv.grid, (255, 0, 255), StructureType.TARGET)
    case.add_structure(gtv)
    case.metadata["tumour_proxy"] = f"{name} = {ptv.name} eroded by {margin_mm:g} mm (the case had no {name})"
    return gtv


@dataclass(frozen=True)
class CourseSettings:
    """What the simulated course looks like (defaults: a head-and-neck course).

    :param n_fractions: fractions in the course.
    :param start_date: date of fraction 1 (ISO).
    :param setup_systematic_mm: σ (mm, per axis) of the systematic set-up error (drawn once).
    :param setup_random_mm: σ (mm, per axis) of the daily random set-up error.
    :param rotation_sd_deg: σ (degrees, per axis) of the daily rotation.
    :param weight_loss_end: in-plane contraction at the last fraction (fraction of the radius).
    :param deformation_mm: RMS (mm) of the daily smooth soft-tissue deformation.
    :param deformation_length_mm: its correlation length (Gaussian σ, mm).
    :param image_noise_hu: σ of the image noise (HU).
    :param observation_sd: σ of the log-normal contouring noise on the tumour volume (the twin's
        calibration assumes :data:`twinrt.twin.response.DEFAULT_SIGMA_OBS`, also 0.08).
    :param response: true tumour-response parameters (:class:`twinrt.twin.response.ResponseParameters`),
        ``None`` for the population median.
    :param seed: random seed; the same settings give the same course.
    """

    n_fractions: int = 30
    start_date: str = "2026-01-05"
    setup_systematic_mm: float = 1.5
    setup_random_mm: float = 2.0
    rotation_sd_deg: float = 0.5
    weight_loss_end: float = 0.04
    deformation_mm: float = 1.0
    deformation_length_mm: float = 25.0
    image_noise_hu: float = 10.0
    observation_sd: float = 0.08
    response: Any = None
    seed: int = 0


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class SimulatedFraction:
    """A simulated day: the :class:`Fraction` the twin receives and the truth it should recover.

    :param fraction: the day's image, structures and delivered dose.
    :param true_warped_dose_gy: the day's dose on the planning anatomy (Gy, planning grid).
    :param true_map: ``φ_f(x)`` for every planning voxel (nk, nj, ni, 3), LPS mm.
    :param truth: set-up translation (mm), rotation (deg), weight loss, tumour scale, volumes (cc),
        inversion residual (mm).
    """

    fraction: Fraction
    true_warped_dose_gy: np.ndarray
    true_map: np.ndarray
    truth: dict[str, Any] = field(default_factory=dict)


#: SUVbw of tissue classes by CT number for :func:`simulate_pet` (upper HU bound, SUV): air, lung/fat,
#: soft tissue, bone — typical FDG values (fat ≈ 0.3–0.5, muscle ≈ 0.7–1.0, marrow-bearing bone ≈ 1–1.5).
PET_TISSUE_SUV = ((-500.0, 0.02), (-50.0, 0.4), (300.0, 0.9), (float("inf"), 1.2))
#: Resolution of the simulated PET: Gaussian blur FWHM (mm) and in-plane voxel size multiplier.
PET_FWHM_MM = 6.0
PET_INPLANE_FACTOR = 2


def simulate_pet(image: Image, structures: list[Structure], uptake_suv: Mapping[str, float],
                 rng: np.random.Generator, noise_sd: float = 0.15, fwhm_mm: float = PET_FWHM_MM,
                 inplane_factor: int = PET_INPLANE_FACTOR) -> Image:
    """A simulated FDG PET (SUVbw) of a day, on a coarser grid in the same frame of reference.

    SUV is set per tissue class from the CT numbers (:data:`PET_TISSUE_SUV`), then to ``uptake_suv[name]``
    inside each named structure (later names win), blurred by a Gaussian of ``fwhm_mm`` (scanner
    resolution), resampled (trilinear) to a grid ``inplane_factor`` × coarser in plane covering the same
    field of view, and given multiplicative Gaussian noise of relative SD ``noise_sd`` (clipped at 0).

    :param image: the day's CT (HU); ``structures``: on its grid.
    :return: an :class:`Image` of modality ``"PT"`` (float32 SUVbw).
    """
    from scipy.ndimage import gaussian_filter

    from twinrt.geometry import Grid, resample_array

    hu = np.asarray(image.array, dtype=np.float32)
    suv = np.zeros(hu.shape, dtype=np.float32)
    lower = -np.inf
    for upper, value in PET_TISSUE_SUV:
        suv[(hu >= lower) & (hu < upper)] = value
        lower = upper
    for st in structures:
        if st.name in uptake_suv:
            if not st.grid.is_same(image.grid):
                raise InvalidInputError(f"Structure '{st.name}' is not on the image grid")
            suv[st.mask] = float(uptake_suv[st.name])
    sigma = [fwhm_mm / 2.3548 / sp for sp in image.grid.spacing_mm[::-1]]  # (k, j, i) voxels
    suv = gaussian_filter(suv, sigma, mode="nearest")
    g, f = image.grid, int(inplane_factor)
    sp = g.spacing_mm
    origin = np.asarray(g.index_to_lps(np.array([(f - 1) / 2.0, (f - 1) / 2.0, 0.0])))
    pet_grid = Grid((g.shape[0], max(g.shape[1] // f, 1), max(g.shape[2] // f, 1)), (sp[0] * f, sp[1] * f, sp[2]),
                    tuple(origin), g.direction)
    out = resample_array(suv, g, pet_grid, 1, 0.0)
    if noise_sd > 0:
        out = out * (1.0 + rng.normal(0.0, noise_sd, out.shape))
    return Image(np.clip(out, 0.0, None).astype(np.float32), pet_grid, "PT")


class CourseSimulator:
    """Makes a course from a planning case: :meth:`fraction` builds day ``f`` (deterministic per seed).

    :param case: the planning case (CT, structures, the planned dose); a GTV proxy is added when the
        case has none (:func:`ensure_tumour`), and a prescription without a plan is restated for
        :attr:`CourseSettings.n_fractions` fractions (same total dose). The case is changed in place.
    :param planned_dose: key of the planned whole-course dose in ``case.doses``.
    :param settings: :class:`CourseSettings`.
    :param organ_changes: optional ``f ↦ {organ: (volume ratio, HU shift)}``: organ ``organ`` on day ``f``
        contracts radially about its centroid to about that share of its planning volume and its CT
        numbers shift by that many HU (used by :mod:`twinrt.toxicity.cohort` for organ response).
    """

    def __init__(self, case: Case, planned_dose: str = "reference", settings: CourseSettings = CourseSettings(),
                 organ_changes: Optional[Callable[[int], Mapping[str, tuple[float, float]]]] = None):
        from scipy import ndimage

        from twinrt.twin import response

        if planned_dose not in case.doses:
            raise InvalidInputError(f"Case {case.patient_id} has no dose '{planned_dose}' to deliver; plan it first")
        if settings.n_fractions < 2:
            raise InvalidInputError("A simulated course needs at least 2 fractions")
        self.case = case
        self.planned_dose = planned_dose
        self.settings = settings
        self.organ_changes = organ_changes
        self.grid = case.ct.grid
        self.tumour = ensure_tumour(case)
        self.dates = treatment_dates(settings.start_date, settings.n_fractions)
        start = parse_date(self.dates[0])
        self.days = np.array([(parse_date(d) - start).days for d in self.dates], dtype=float)
        dose = case.doses[planned_dose]
        if case.prescriptions and any(p.fractions != settings.n_fractions for p in case.prescriptions):
            # The planned dose is delivered in this course's number of fractions (same total dose).
            restated = [Prescription(p.target, p.dose_gy, settings.n_fractions) for p in case.prescriptions]
            case.metadata["prescriptions"] = restated
            for plan in case.plans:
                plan.prescriptions = list(restated)
        self.fraction_dose = Dose(dose.array / settings.n_fractions, dose.grid, "delivered", summation="FRACTION",
                                  source=f"simulated: planned dose '{planned_dose}' / {settings.n_fractions}")
        rx = max((p.dose_gy for p in case.prescriptions), default=float(np.percentile(dose.array[dose.array > 0], 99)))
        self.dose_per_fraction_gy = rx / settings.n_fractions
        rng = np.random.default_rng(settings.seed)
        self.systematic_mm = rng.normal(0.0, settings.setup_systematic_mm, 3)
        prior = response.POPULATION_PRIOR
        self.params = settings.response if settings.response is not None else \
            response.ResponseParameters.from_array(prior.medians)
        self.schedule = response.Schedule(self.days, np.full(len(self.days), self.dose_per_fraction_gy))
        self.v0_cc = self.tumour.volume_cc
        # Model volumes at each imaging day (before that day's fraction), then contouring noise.
        vols = response.simulate_volumes(self.params, self.schedule, self.v0_cc, self.days)
        self.model_volumes_cc = np.asarray(vols.total_cc).reshape(-1)
        self.observed_volumes_cc = self.model_volumes_cc * np.exp(rng.normal(0.0, settings.observation_sd,
                                                                             len(self.days)))
        self.points = voxel_centres_lps(self.grid)
        self.tumour_centre = self.points[self.tumour.mask].mean(axis=0)
        self.tumour_radius = (3 * self.tumour.volume_cc * 1000 / (4 * np.pi)) ** (1 / 3)
        body = ndimage.binary_fill_holes(case.ct.array > -300)
        self.body_centre = self.points[body].mean(axis=0) if body.any() else self.tumour_centre
        targets = [s for s in case.structures if s.type == StructureType.TARGET and not s.is_empty]
        self.isocentre = self.points[np.logical_or.reduce([s.mask for s in targets])].mean(axis=0)

    # -------------------------------------------------------------------------------------- pieces
    def _tumour_scale(self, volume_ratio: float) -> float:
        """``s`` such that the tumour map changes the tumour's volume by ``volume_ratio`` (clamped to what the
        map can make, about 0.14-2.5; the day's mask volume, in the truth, then differs from the model's)."""
        from scipy.optimize import brentq

        d = self.points[self.tumour.mask] - self.tumour_centre
        r2 = (d * d).sum(-1)
        big_r2 = (1.5 * self.tumour_radius) ** 2
        e = np.exp(-r2 / big_r2)

        def ratio(s: float) -> float:
            g = 1 - (1 - s) * e
            det = g * g * (g + 2 * r2 * (1 - s) * e / big_r2)
            return float(det.mean()) - volume_ratio

        lo, hi = 0.05, 1.6
        if ratio(lo) > 0:  # beyond what the map can make (about 0.14 of the volume): the strongest shrinkage
            return lo
        if ratio(hi) < 0:
            return hi
        return float(brentq(ratio, lo, hi, xtol=1e-5))

    def _forward_map(self, f: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        """``φ_f`` on the planning grid: (nk, nj, ni, 3) LPS mm, and the truth parameters."""
        from scipy import ndimage

        s = self.settings
        t = self.days[f - 1] / max(self.days[-1], 1.0)
        w = s.weight_loss_end * t
        ratio = self.observed_volumes_cc[f - 1] / self.v0_cc / (1 - w) ** 2
        scale = self._tumour_scale(ratio)
        truth: dict[str, Any] = {}
        x = self.points
        d = x - self.tumour_centre
        r2 = (d * d).sum(-1, keepdims=True)
        g = 1 - (1 - scale) * np.exp(-r2 / (1.5 * self.tumour_radius) ** 2)
        y = self.tumour_centre + d * g
        changes = dict(self.organ_changes(f)) if self.organ_changes is not None else {}
        truth["organ_changes"] = {k: [float(a), float(b)] for k, (a, b) in changes.items()}
        for name, (volume_ratio, _) in changes.items():
            if volume_ratio != 1.0:
                y = self._organ_shrink(y, name, volume_ratio)
        y[..., :2] = self.body_centre[:2] + (y[..., :2] - self.body_centre[:2]) * (1 - w)
        if s.deformation_mm > 0:
            sigma = [s.deformation_length_mm / sp for sp in self.grid.spacing_mm[::-1]]
            field_ = np.stack([ndimage.gaussian_filter(rng.standard_normal(self.grid.shape).astype(np.float32), sigma,
                                                       mode="nearest") for _ in range(3)], -1)
            field_ *= s.deformation_mm / max(float(np.sqrt((field_ ** 2).sum(-1).mean())), 1e-9)
            y = y + field_
        rot = _rotation(np.radians(rng.normal(0.0, s.rotation_sd_deg, 3)))
        shift = self.systematic_mm + rng.normal(0.0, s.setup_random_mm, 3)
        y = (y - self.isocentre) @ rot.T.astype(np.float32) + self.isocentre + shift
        truth.update({"translation_mm": [float(v) for v in shift],
                      "rotation_deg": float(np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1)))),
                      "weight_loss": float(w), "tumour_scale": scale})
        return y.astype(np.float32), truth

    def _organ_shrink(self, y: np.ndarray, name: str, volume_ratio: float) -> np.ndarray:
        """Radial contraction of organ ``name`` about its centroid to about ``volume_ratio`` of its volume."""
        organ = self.case.structure(name)
        if organ.is_empty:
            return y
        if not 0.3 < volume_ratio <= 1.5:
            raise InvalidInputError(f"Organ volume ratio {volume_ratio:.3f} for '{name}' is outside 0.3-1.5")
        centre = self.points[organ.mask].mean(axis=0)
        radius = (3 * organ.volume_cc * 1000 / (4 * np.pi)) ** (1 / 3)
        d = y - centre
        r2 = (d * d).sum(-1, keepdims=True)
        s = volume_ratio ** (1 / 3)  # the centre's scale; the organ's volume changes by about ratio
        return centre + d * (1 - (1 - s) * np.exp(-r2 / (1.5 * radius) ** 2))

    def _inverse(self, phi: np.ndarray, iterations: int = 12) -> tuple[np.ndarray, float]:
        """``ψ = φ⁻¹`` on the grid by fixed-point iteration; also the residual ``max |φ(ψ(y)) − y|`` (mm)."""
        y = self.points
        wfield = phi - y  # φ(x) = x + w(x)
        comps = [np.ascontiguousarray(wfield[..., a]) for a in range(3)]

        def w_at(p: np.ndarray) -> np.ndarray:
            return np.stack([sample_at_lps(c, self.grid, p, 1, 0.0, "nearest") for c in comps], -1)

        x = y - wfield
        for _ in range(iterations):
            x = y - w_at(x)
        residual = float(np.abs(x + w_at(x) - y).max())
        return x, residual

    # ------------------------------------------------------------------------------------ the day
    def fraction(self, f: int) -> SimulatedFraction:
        """Day ``f`` (1-based): the image, structures and dose the twin receives, and the truth."""
        if not 1 <= f <= self.settings.n_fractions:
            raise InvalidInputError(f"Fraction {f} is outside the course (1-{self.settings.n_fractions})")
        rng = np.random.default_rng([self.settings.seed, f])
        phi, truth = self._forward_map(f, rng)
        psi, residual = self._inverse(phi)
        ct = self.case.ct
        img = sample_at_lps(ct.array.astype(np.float32), ct.grid, psi, 1, -1000.0)
        structures = [Structure(st.name, sample_at_lps(st.mask.astype(np.float32), st.grid, psi, 1, 0.0) >= 0.5,
                                self.grid, st.color, st.type) for st in self.case.structures]
        for name, (_, hu_shift) in truth.get("organ_changes", {}).items():
            if hu_shift:
                img[next(st.mask for st in structures if st.name.lower() == name.lower())] += hu_shift
        if self.settings.image_noise_hu > 0:
            img += rng.normal(0.0, self.settings.image_noise_hu, img.shape).astype(np.float32)
        image = Image(np.clip(np.rint(img), -1024, 3071).astype(np.int16), self.grid, "CT")
        warped = sample_at_lps(self.fraction_dose.array, self.fraction_dose.grid, phi, 1, 0.0)
        truth.update({"inverse_residual_mm": residual,
                      "model_tumour_cc": float(self.model_volumes_cc[f - 1]),
                      "observed_tumour_cc": float(self.observed_volumes_cc[f - 1]),
                      "mask_tumour_cc": next(s.volume_cc for s in structures if s.name == self.tumour.name)})
        meta = self.case.metadata
        frac = Fraction(f, self.dates[f - 1], image, structures, self.fraction_dose, self.case.patient_id,
                        str(meta.get("frame_of_reference_uid", "")), {"source": "simulated", "seed": self.settings.seed})
        return SimulatedFraction(frac, warped, phi, truth)

    def timeline(self) -> CaseTimeline:
        """An empty :class:`CaseTimeline` for this course (the planning case, the planned dose)."""
        return CaseTimeline(self.case, self.planned_dose, self.settings.n_fractions, self.dates[0], self.tumour.name,
                            metadata={"simulated": True, "seed": self.settings.seed})
