"""The digital twin: each fraction mapped back to the planning anatomy; accumulated dose, BED, goals, response.

:class:`DigitalTwin` wraps a :class:`~twinrt.twin.timeline.CaseTimeline` and updates it fraction by
fraction (:meth:`DigitalTwin.add_fraction`):

1. **checks**: the day's image belongs to the planning patient (PatientID) and frame of reference
   (unless :attr:`TwinSettings.allow_other_frame`), it is the next fraction of the course and not
   dated before the previous one; otherwise :class:`FractionRefusedError` and nothing changes;
2. **registration** to the planning CT, rigid then deformable (:mod:`twinrt.twin.registration`);
   a failed or folding registration refuses the fraction; quality: Jacobian range, image
   correlation, and the Dice of the day's structures propagated to the planning CT;
3. **dose mapping**: the day's delivered dose (or, when the day brings none, the planned dose per
   fraction fixed in the room) pulled back to the planning anatomy, ``d(φ(x))``;
4. **accumulation** on the planning grid: physical dose ``Σ d_f``, BED ``Σ d_f (1 + d_f/(α/β))`` with
   a per-voxel α/β (:func:`twinrt.radiobiology.alpha_beta_map`: tumour 10 Gy, late-responding organs
   3 Gy, spinal cord and brainstem 2 Gy, cited there) and EQD2 ``BED / (1 + 2/(α/β))``;
5. **planned versus delivered**: DVHs (:meth:`DigitalTwin.dvh_comparison`) and every goal of the goal set
   evaluated on the planned dose to date
   (``planned × f / N``), the delivered dose so far and the **projected end-of-course dose**
   (delivered so far + the remaining fractions as today's mapped fraction dose: today's anatomy is
   assumed to persist); a projected goal failure that the plan met gives a warning;
6. **tumour response**: the tumour volume on the day's image joins the observations and the
   response model is recalibrated (:mod:`twinrt.twin.response`).

All doses are in Gy, volumes in cc, times in days from the first fraction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from twinrt.errors import InvalidInputError
from twinrt.model import Dose
from twinrt.progress import CancelToken, ProgressCallback, report
from twinrt.radiobiology import alpha_beta_map, bed_uniform, eqd2
from twinrt.twin.registration import (RegistrationError, RegistrationSettings, propagation_dice,
                                      register)
from twinrt.twin.timeline import CaseTimeline, Fraction, FractionRecord, parse_date


class FractionRefusedError(InvalidInputError):
    """The twin refuses a fraction (another patient, a failed registration, ...); nothing stored changed."""

    def __init__(self, message: str, fraction: Optional[int] = None):
        super().__init__(message)
        self.fraction = fraction


@dataclass(frozen=True)
class TwinSettings:
    """How the twin updates.

    :param registration: :class:`RegistrationSettings`.
    :param goal_set: goal set (name or path) for planned/delivered/projected evaluation; ``None`` for none
        (no goal rows, no projected-goal warnings).
    :param alpha_beta_overrides: α/β (Gy) per structure name or ``"tumour"``, overriding the defaults.
    :param allow_other_frame: accept a fraction image in another frame of reference (the rigid stage
        then starts from the centres of mass).
    :param calibrate: recalibrate the tumour-response model at every fraction.
    :param response_samples: posterior samples kept by the calibration.
    """

    registration: RegistrationSettings = RegistrationSettings()
    goal_set: Optional[str] = "head_and_neck_openkbp"
    alpha_beta_overrides: Optional[dict[str, float]] = None
    allow_other_frame: bool = False
    calibrate: bool = True
    response_samples: int = 4000


@dataclass
class FractionUpdate:
    """What :meth:`DigitalTwin.add_fraction` found for one fraction.

    :param record: the stored :class:`FractionRecord`.
    :param goals: per goal: planned-to-date, delivered and projected end-of-course values.
    :param warnings: plain-words warnings (projected goal failures, poor registration).
    :param response: calibrated response summary (``None`` with too few tumour observations).
    """

    record: FractionRecord
    goals: list[dict[str, Any]]
    warnings: list[str]
    response: Optional[dict[str, Any]] = None


def fraction_bed(dose_gy: np.ndarray, alpha_beta_gy: np.ndarray) -> np.ndarray:
    """BED (Gy) of one fraction: ``d (1 + d / (α/β))`` voxel by voxel (the twin's float32 arithmetic)."""
    return dose_gy * (1.0 + dose_gy / alpha_beta_gy)


def posterior_summary(posterior: Any, level: float = 0.9) -> dict[str, Any]:
    """JSON-ready summary of a response :class:`~twinrt.twin.response.Posterior`: medians, credible intervals."""
    med = posterior.median()
    return {"level": level, "median": {k: float(getattr(med, k)) for k in posterior.interval(level)},
            "interval": {k: [float(a), float(b)] for k, (a, b) in posterior.interval(level).items()},
            "method": posterior.method, "acceptance_rate": float(posterior.acceptance_rate),
            "rhat": {k: float(v) for k, v in dict(posterior.rhat).items()}, "n_samples": posterior.n_samples,
            "observations": int(len(posterior.observed_days))}


def _goal_key(result: Any) -> str:
    g = result.goal
    return f"{g.structure} {g.metric} {g.comparator} {g.value:g}"


class DigitalTwin:
    """The patient's twin over the fractions (see the module docstring).

    :param timeline: the course; fractions already in it are taken as accepted (their mapped doses are
        summed again, so a reloaded timeline continues where it stopped).
    :param settings: :class:`TwinSettings`.
    """

    def __init__(self, timeline: CaseTimeline, settings: TwinSettings = TwinSettings()):
        from twinrt.autocontour.classical import body_mask
        from twinrt.planning.evaluation import load_goal_set

        self.timeline = timeline
        self.settings = settings
        case = timeline.planning
        self.grid = case.ct.grid
        planned = case.doses[timeline.planned_dose]
        self.planned_gy = planned.resampled(self.grid).array.astype(np.float32)
        on_grid = [s if s.grid.is_same(self.grid) else type(s)(s.name, s.on_grid(self.grid), self.grid, s.color, s.type)
                   for s in case.structures]
        self.alpha_beta = alpha_beta_map(self.grid.shape, on_grid, overrides=settings.alpha_beta_overrides
                                         ).astype(np.float32)
        self.body = body_mask(case.ct.array, self.grid.spacing_mm)
        self.goal_set = load_goal_set(settings.goal_set) if settings.goal_set is not None else None
        self.planned_evaluation = self._evaluate(self.planned_gy, "planned") if self.goal_set is not None else None
        self.physical_gy = np.zeros(self.grid.shape, np.float32)
        self.bed_gy = np.zeros(self.grid.shape, np.float32)
        self.posterior: Any = None
        self.last_update: Optional[FractionUpdate] = None
        for r in timeline.records:
            self._accumulate(r.warped_dose_gy)

    # ------------------------------------------------------------------------------ dose state
    @property
    def n_fractions(self) -> int:
        """Fractions in the course."""
        return self.timeline.n_fractions

    @property
    def delivered(self) -> int:
        """Fractions accepted so far."""
        return self.timeline.delivered

    def _accumulate(self, d: np.ndarray) -> None:
        self.physical_gy += d
        self.bed_gy += fraction_bed(d, self.alpha_beta)

    def bed_by_fraction(self) -> Iterator[tuple[FractionRecord, np.ndarray]]:
        """Each accepted fraction's record with the BED accumulated up to it (Gy, planning grid, float32).

        One running array is updated in place and yielded each time: copy it to keep it. After the last
        fraction it equals :attr:`bed_gy` exactly (same arithmetic as the update).
        """
        bed = np.zeros(self.grid.shape, np.float32)
        for record in self.timeline.records:
            bed += fraction_bed(record.warped_dose_gy, self.alpha_beta)
            yield record, bed

    def accumulated_dose(self) -> Dose:
        """Delivered physical dose so far on the planning grid (Gy)."""
        return Dose(self.physical_gy.copy(), self.grid, "accumulated", summation="MULTI_FRACTION",
                    source=f"TwinRT digital twin: {self.delivered} fraction(s) mapped to the planning anatomy")

    def accumulated_bed(self) -> Dose:
        """Delivered BED so far (Gy, per-voxel α/β), as an EFFECTIVE dose."""
        return Dose(self.bed_gy.copy(), self.grid, "accumulated BED", dose_type="EFFECTIVE", summation="MULTI_FRACTION",
                    source="BED = sum d (1 + d / (alpha/beta)), per-voxel alpha/beta (twinrt.radiobiology)")

    def accumulated_eqd2(self) -> Dose:
        """Delivered EQD2 so far (Gy)."""
        return Dose(eqd2(self.bed_gy, self.alpha_beta), self.grid, "accumulated EQD2", dose_type="EFFECTIVE",
                    summation="MULTI_FRACTION", source="EQD2 = BED / (1 + 2 / (alpha/beta))")

    def planned_to_date(self, fractions: Optional[int] = None) -> Dose:
        """The planned dose scaled to ``fractions`` (default: those delivered), Gy."""
        n = self.delivered if fractions is None else int(fractions)
        return Dose(self.planned_gy * (n / self.n_fractions), self.grid, f"planned to fraction {n}")

    def projected_dose(self) -> Dose:
        """Projected end-of-course physical dose: delivered + remaining fractions as today's mapped dose (Gy)."""
        if not self.timeline.records:
            return Dose(self.planned_gy.copy(), self.grid, "projected")
        last = self.timeline.records[-1].warped_dose_gy
        return Dose(self.physical_gy + (self.n_fractions - self.delivered) * last, self.grid, "projected")

    def projected_bed(self) -> Dose:
        """Projected end-of-course BED (Gy), same assumption as :meth:`projected_dose`."""
        if not self.timeline.records:
            return Dose(bed_uniform(self.planned_gy, self.n_fractions, self.alpha_beta), self.grid, "projected BED",
                        "EFFECTIVE")
        last = self.timeline.records[-1].warped_dose_gy
        rest = (self.n_fractions - self.delivered) * last * (1 + last / self.alpha_beta)
        return Dose(self.bed_gy + rest, self.grid, "projected BED", "EFFECTIVE")

    def _evaluate(self, dose_gy: np.ndarray, name: str) -> Any:
        from twinrt.planning.evaluation import evaluate_plan

        return evaluate_plan(self.timeline.planning, Dose(dose_gy, self.grid, name), self.goal_set)

    # ------------------------------------------------------------------------------ checks
    def check_fraction(self, fraction: Fraction) -> None:
        """Refuse (:class:`FractionRefusedError`) a fraction the twin cannot take; changes nothing."""
        tl = self.timeline
        n = fraction.number
        if fraction.patient_id and fraction.patient_id != tl.patient_id:
            raise FractionRefusedError(f"Fraction {n} is of patient '{fraction.patient_id}', the twin of patient "
                                       f"'{tl.patient_id}': refused; load this patient's image", n)
        frame = tl.frame_of_reference_uid
        if (fraction.frame_of_reference_uid and frame and fraction.frame_of_reference_uid != frame
                and not self.settings.allow_other_frame):
            raise FractionRefusedError(f"Fraction {n}'s image is in frame of reference {fraction.frame_of_reference_uid}, "
                                       f"the plan in {frame}: refused. If it is this patient's image, allow other "
                                       "frames of reference (the registration then starts from the centres of mass)", n)
        if n != self.delivered + 1:
            raise FractionRefusedError(f"The twin expects fraction {self.delivered + 1} next, got fraction {n}", n)
        if n > self.n_fractions:
            raise FractionRefusedError(f"The course has {self.n_fractions} fractions; fraction {n} is beyond it", n)
        if tl.records and parse_date(fraction.date) < parse_date(tl.records[-1].date):
            raise FractionRefusedError(f"Fraction {n} is dated {fraction.date}, before fraction "
                                       f"{tl.records[-1].number} ({tl.records[-1].date}); check the date", n)
        if parse_date(fraction.date) < parse_date(tl.start_date):
            raise FractionRefusedError(f"Fraction {n} is dated {fraction.date}, before the course start "
                                       f"{tl.start_date}; check the date", n)

    # ------------------------------------------------------------------------------ update
    def add_fraction(self, fraction: Fraction, progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None) -> FractionUpdate:
        """Take today's fraction: register, map the dose back, accumulate, evaluate, recalibrate.

        :raises FractionRefusedError: the fraction is refused (reason in the message); the twin and its
            timeline are unchanged.
        """
        t0 = time.perf_counter()
        self.check_fraction(fraction)
        report(progress, 0.05, f"Fraction {fraction.number}: registration")
        try:
            reg = register(self.timeline.planning.ct, fraction.image, self.settings.registration, self.body,
                           same_frame=(fraction.frame_of_reference_uid or self.timeline.frame_of_reference_uid)
                           == self.timeline.frame_of_reference_uid)
        except RegistrationError as exc:
            raise FractionRefusedError(f"Fraction {fraction.number} refused: {exc}", fraction.number) from exc
        if cancel is not None:
            cancel.check()
        report(progress, 0.6, f"Fraction {fraction.number}: dose mapping")
        points = reg.mapped_points()
        dose = fraction.dose
        if dose is None:
            dose = Dose(self.planned_gy / self.n_fractions, self.grid, "planned fraction",
                        source="no delivered dose given: planned dose per fraction, fixed in the room")
        warped = reg.pull_back(dose.array, dose.grid, points=points)
        dice = propagation_dice(reg, self.timeline.planning.structures, fraction.structures, points)
        tumour = fraction.structure(self.timeline.tumour)
        quality = dict(reg.quality)
        quality["dose_source"] = dose.source or dose.name
        record = FractionRecord(fraction.number, fraction.date, quality, dice,
                                None if tumour is None else round(tumour.volume_cc, 4), warped)
        if cancel is not None:
            cancel.check()
        # Commit: from here on nothing can refuse the fraction.
        self.timeline.fractions.append(fraction)
        self.timeline.records.append(record)
        self._accumulate(warped)
        report(progress, 0.8, f"Fraction {fraction.number}: goals")
        goals, warnings = self.goal_table()
        if dice and min(dice.values()) < 0.7:
            worst = min(dice, key=dice.get)
            warnings.append(f"Fraction {fraction.number}: {worst} propagated to the planning CT overlaps its planning "
                            f"contour poorly (Dice {dice[worst]:.2f}); review the registration")
        response_summary = None
        if self.settings.calibrate:
            report(progress, 0.9, f"Fraction {fraction.number}: tumour response")
            response_summary = self.calibrate_response()
        record.seconds = time.perf_counter() - t0
        record.registration["seconds_update"] = round(record.seconds, 3)
        update = FractionUpdate(record, goals, warnings, response_summary)
        record.goals = {g["goal"]: {k: g[k] for k in ("planned_to_date", "delivered", "projected")} for g in goals}
        self.last_update = update
        report(progress, 1.0, f"Fraction {fraction.number} done")
        return update

    def goal_table(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Every goal on the planned dose to date, the delivered dose and the projected end of course.

        :return: rows (goal, priority, unit, planned (whole course), planned_to_date, delivered,
            projected, projected_passed) and warnings for projected failures of goals the plan met.
        """
        plan = self.planned_evaluation
        if plan is None:
            return [], []
        to_date = self._evaluate(self.planned_to_date().array, "planned to date")
        delivered = self._evaluate(self.physical_gy, "delivered")
        projected = self._evaluate(self.projected_dose().array, "projected")
        rows, warnings = [], []
        for rp, rt, rd, rj in zip(plan.results, to_date.results, delivered.results, projected.results):
            g = rp.goal
            rows.append({"goal": _goal_key(rp), "structure": g.structure, "metric": g.metric, "priority": g.priority,
                         "unit": g.unit, "planned": rp.value, "planned_to_date": rt.value, "delivered": rd.value,
                         "projected": rj.value, "plan_passed": rp.passed, "projected_passed": rj.passed})
            if rp.passed and rj.passed is False:
                warnings.append(f"Projected end of course breaks a goal the plan met: {g.structure} {g.metric} "
                                f"{rj.value:.2f} {g.unit} (plan {rp.value:.2f}) against {g.comparator} {g.value:g} "
                                f"{g.unit} ({g.priority})")
        return rows, warnings

    def dvh_comparison(self, structures: Optional[Sequence[str]] = None, bin_width_gy: float = 0.1
                       ) -> dict[str, dict[str, Any]]:
        """Cumulative DVHs of the planned dose to date, the delivered dose and the projected end of course.

        :param structures: structure names (default: every non-empty structure of the planning case).
        :return: name → ``{"planned_to_date": DVH, "delivered": DVH, "projected": DVH}``
            (:class:`twinrt.dvh.DVH`, Gy and cc).
        """
        from twinrt.dvh import structure_dvh

        doses = {"planned_to_date": self.planned_to_date(), "delivered": self.accumulated_dose(),
                 "projected": self.projected_dose()}
        out: dict[str, dict[str, Any]] = {}
        for s in self.timeline.planning.structures:
            if s.is_empty or (structures is not None and s.name not in structures):
                continue
            out[s.name] = {k: structure_dvh(d, s, bin_width_gy=bin_width_gy) for k, d in doses.items()}
        return out

    # ------------------------------------------------------------------------------ response
    def tumour_observations(self) -> tuple[np.ndarray, np.ndarray]:
        """Days (from the first fraction; planning = day 0) and tumour volumes (cc) observed so far."""
        start = parse_date(self.timeline.start_date)
        days, vols = [0.0], []
        try:
            vols.append(self.timeline.planning.structure(self.timeline.tumour).volume_cc)
        except InvalidInputError:
            return np.zeros(0), np.zeros(0)
        for r in self.timeline.records:
            if r.tumour_volume_cc is not None:
                days.append(float((parse_date(r.date) - start).days))
                vols.append(float(r.tumour_volume_cc))
        return np.asarray(days[:len(vols)]), np.asarray(vols)

    def schedule(self) -> Any:
        """The course's :class:`twinrt.twin.response.Schedule` (weekday fractions; the tumour's dose per fraction)."""
        from twinrt.twin import response
        from twinrt.twin.simulator import treatment_dates

        start = parse_date(self.timeline.start_date)
        delivered_dates = [r.date for r in self.timeline.records]
        planned_dates = treatment_dates(self.timeline.start_date, self.n_fractions)
        dates = delivered_dates + planned_dates[len(delivered_dates):]
        days = np.array([(parse_date(d) - start).days for d in dates], dtype=float)
        return response.Schedule(days, np.full(len(days), self.tumour_dose_per_fraction_gy()), days)

    def tumour_dose_per_fraction_gy(self) -> float:
        """The prescribed dose per fraction of the highest-dose target (Gy), else the tumour's planned mean / N."""
        rx = self.timeline.planning.prescriptions
        if rx:
            return max(p.dose_gy for p in rx) / self.n_fractions
        tumour = self.timeline.planning.structure(self.timeline.tumour)
        return float(self.planned_gy[tumour.on_grid(self.grid)].mean()) / self.n_fractions

    def calibrate_response(self, seed: int = 0) -> Optional[dict[str, Any]]:
        """Calibrate the tumour-response model on the volumes so far; ``None`` with fewer than 3 observations."""
        from twinrt.twin import response

        days, vols = self.tumour_observations()
        if len(vols) < 3:
            return None
        self.posterior = response.calibrate(days, vols, self.schedule(), seed=seed,
                                            n_samples=self.settings.response_samples)
        return posterior_summary(self.posterior)

    def predict_tumour(self, level: float = 0.9) -> Any:
        """Predicted tumour volume over the whole course (median and credible band), from the last calibration."""
        if self.posterior is None and self.calibrate_response() is None:
            raise InvalidInputError("Too few tumour observations to predict (need the planning volume and two "
                                    "fractions with the tumour contoured)")
        return self.posterior.predict(self.schedule(), level=level)

    def compare_regimens(self, organs: Optional[Sequence[str]] = None, seed: int = 0) -> Any:
        """Regimens keep / boost / de-escalate for the remaining fractions: TCP versus LKB NTCP per organ.

        :param organs: organs at risk to score (default: those with an LKB parameter set).
        """
        from twinrt.radiobiology import lkb_parameter_set_for
        from twinrt.twin import response

        if self.posterior is None and self.calibrate_response() is None:
            raise InvalidInputError("Calibrate the tumour response first (need the planning volume and two fractions "
                                    "with the tumour contoured)")
        if self.delivered >= self.n_fractions:
            raise InvalidInputError("The course is complete: no remaining fractions to compare regimens for")
        sched = self.schedule()
        # The fractions given so far are those before "today" (half a day after the last one given).
        today = float(sched.fraction_days[self.delivered - 1]) + 0.5 if self.delivered else 0.0
        last = self.timeline.records[-1].warped_dose_gy if self.timeline.records else self.planned_gy / self.n_fractions
        oars = []
        for s in self.timeline.planning.structures:
            if s.type.value != "ORGAN" or s.is_empty or (organs is not None and s.name not in organs):
                continue
            try:
                lkb_parameter_set_for(s.name)
            except InvalidInputError:
                continue  # no LKB parameter set for this organ
            m = s.on_grid(self.grid)
            oars.append(response.OarDoses(s.name, self.bed_gy[m], last[m], float(np.median(self.alpha_beta[m]))))
        regimens = response.standard_regimens(sched, today)
        return response.compare_regimens(self.posterior, regimens, today, oars=oars, seed=seed)

    # ------------------------------------------------------------------------------ summary
    def summary(self) -> dict[str, Any]:
        """JSON-ready state of the twin (no arrays)."""
        days, vols = self.tumour_observations()
        return {"patient_id": self.timeline.patient_id, "n_fractions": self.n_fractions, "delivered": self.delivered,
                "fractions": [r.summary() for r in self.timeline.records],
                "tumour": {"name": self.timeline.tumour, "days": days.tolist(), "volumes_cc": vols.tolist()},
                "response": None if self.posterior is None else posterior_summary(self.posterior),
                "research_use_only": True}
