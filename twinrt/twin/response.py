"""Tumour response model of the digital twin: calibration on observed volumes, prediction, regimen choice.

Research use only. Issue 7 ("DigitalTwin"), the biological level, in the spirit of Chaudhuri et al. 2023's
predictive digital twin (a tumour model calibrated per patient by Bayesian inference; candidate regimens
compared by tumour control against complication probability).

Model
=====
Two compartments (volumes in cc): viable tumour ``V`` and lethally damaged, not yet cleared tumour ``D``;
the gross tumour volume seen on imaging is ``V + D``. Time ``t`` in days; day 0 is the first fraction.

* **Fraction** of dose ``d`` (Gy) at time ``t_f`` (linear-quadratic cell kill)::

      S = exp(−α d − β d²),   β = α / (α/β),   α/β = ALPHA_BETA_GY["tumour"] = 10 Gy
      V ← S · V,              D ← D + (1 − S) · V

* **Between fractions** (logistic repopulation limited by the space the whole tumour takes, and
  first-order clearance of the dead compartment)::

      dV/dt = λ V (1 − (V + D) / K)
      dD/dt = −(ln 2 / T_clear) · D

  with the carrying capacity ``K = CARRYING_CAPACITY_RATIO · V0 = 2 V0`` (a fixed model constant, an
  assumption: the untreated tumour at V0 is still growing, at half its low-density rate λ). ``D``
  decays exactly, ``D(t) = D0 e^(−kt)``, ``k = ln 2 / T_clear``; ``V`` then obeys a Bernoulli equation
  solved exactly up to one quadrature::

      V(h) = V0 e^{G(h)} / (1 + (λ/K) V0 ∫₀ʰ e^{G(s)} ds),   G(s) = λ s − (λ D0 / (K k)) (1 − e^{−ks})

  where the integral is taken by Simpson's rule over steps of at most :data:`MAX_STEP_DAYS` (relative
  error < 1e-6 for the prior's parameters). Everything is vectorised over parameter samples.

* **Scale invariance**: with ``K ∝ V0`` the whole trajectory is proportional to ``V0``; the simulator
  works with ``V0 = 1`` and multiplies.

* **Timing convention**: an observation at day ``t`` is the volume *before* any fraction given at ``t``
  (daily CBCT precedes the fraction), so the observation on day 0 is the pre-treatment volume.

* **Observation model**: ``log y_j = log(V0 f(t_j; θ)) + ε_j``, ``ε_j ~ N(0, σ_obs²)`` independent
  (log-normal measurement error, contouring variability); :data:`DEFAULT_SIGMA_OBS` = 0.08 (an
  assumption within the 5–10 % usually quoted for repeated GTV delineation; pass ``sigma_obs`` to
  change it).

Parameters calibrated per patient: ``θ = (α [Gy⁻¹], λ [day⁻¹], T_clear [days])``, in log space.
``V0`` is not taken as exact: by default it is a nuisance parameter with a flat prior on ``log V0``,
which is integrated out analytically (the likelihood of θ is then that of the residuals about their
mean); the day-0 observation anchors it. Passing ``v0_cc`` fixes it instead.

Population prior (:data:`POPULATION_PRIOR`)
===========================================
Independent log-normal priors; what was checked in this session is said for each:

* ``α``: median 0.22 Gy⁻¹ — Qi XS et al., Cancers 2012;4:566-580 (two head-and-neck cancer cell lines:
  α = 0.22 ± 0.08 Gy⁻¹, α/β = 8.1 ± 4.1 Gy, doubling time 4.0 ± 1.8 days; *verified* in the published
  abstract); consistent with Pedicini P et al. 2015 (clinical HNC fit α = 0.24 Gy⁻¹, *verified* in the
  abstract). The log-sd 0.35 (≈ 0.08 / 0.22) for between-patient spread is an assumption.
* ``λ = ln 2 / T_pot``: median T_pot 4.5 days — "the majority of studies suggest … a median T_pot of
  between 4 and 5 days" for head-and-neck cancer (review "T_pot and head and neck cancer: where are we
  now?"; *verified* in its abstract; Begg AC et al., Radiother Oncol 1999;50:13-23, the large
  multicentre T_pot study, reports a median of the same order but was *not* checked here). The log-sd
  0.5 is an assumption.
* ``T_clear`` (half-time of the removal of lethally damaged cells): median 22 days, log-sd 0.5. *Not*
  from a measurement: chosen so that the prior's median GTV loss at the end of 35 × 2 Gy is about 65 %,
  close to the median 69.5 % (1.8 % per treatment day) measured by Barker JL et al., Int J Radiat Oncol
  Biol Phys 2004;59:960-970 (*verified* in the abstract), with 10–90 % prior quantiles of about
  35–85 % loss. Chvetsov AV et al. (Int J Radiat Oncol Biol Phys 2009;75:595) model the same process for
  head-and-neck tumours; their fitted values were not checked here.

Inference
=========
MAP by BFGS in log-parameter space (three starts: the best of 256 prior draws), a Laplace covariance
from a central-difference Hessian, then Metropolis–Hastings with :data:`DEFAULT_CHAINS` parallel chains
(over-dispersed starts around the MAP) alternating a Gaussian random-walk step (Laplace covariance ×
2.38²/3) and an independence step from a heavy-tailed Student-t around the MAP; both proposals are
re-estimated from the pooled chains halfway through burn-in (200 iterations, discarded). Diagnostics:
acceptance rate and the split-R̂ of Gelman et al. (BDA3) per parameter. ``method="laplace"`` samples
the Gaussian approximation instead. Measured (2 CPU cores, 16 observations): ~0.3 s per patient with
MCMC, ~0.03 s with Laplace; :func:`coverage_study` on 50 simulated patients gives 90 % credible
interval coverage 0.92 (MCMC) and 0.91 (Laplace).

Tumour control: Poisson TCP ``exp(−ρ V_end)`` from the viable volume just after the last fraction with a
clonogen density ``ρ`` = 1e7 cc⁻¹ (Webb S, Nahum AE. Phys Med Biol 1993;38:653-666, whose TCP model
uses a clonogen density of 10⁷ cm⁻³; the number is the customary one and was *not* checked here).
Complications: LKB NTCP of the course's EQD2 per organ (:mod:`twinrt.radiobiology`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from scipy import optimize

from twinrt.errors import InvalidInputError
from twinrt.radiobiology import (ALPHA_BETA_GY, LKB_PARAMETERS, LkbParameters, geud, lkb_ntcp,
                                 lkb_parameter_set_for, poisson_tcp)

#: α/β of the tumour (Gy), from :data:`twinrt.radiobiology.ALPHA_BETA_GY`.
TUMOUR_ALPHA_BETA_GY = ALPHA_BETA_GY["tumour"]
#: Carrying capacity K = ratio · V0 (model constant).
CARRYING_CAPACITY_RATIO = 2.0
#: Default log-normal observation error (standard deviation of log volume).
DEFAULT_SIGMA_OBS = 0.08
#: Longest integration step between events (days).
MAX_STEP_DAYS = 1.0
#: Default clonogen density (cc⁻¹) for the Poisson TCP (Webb & Nahum 1993).
DEFAULT_CLONOGEN_DENSITY_PER_CC = 1e7
#: Default number of parallel Metropolis chains.
DEFAULT_CHAINS = 32
#: Parameter names, in the column order of every parameter array.
PARAMETER_NAMES = ("alpha_per_gy", "lambda_per_day", "t_clear_days")

# Hard bounds of the log parameters (outside them the posterior is zero): far outside the prior.
_Z_LOW = np.log([1e-3, 1e-3, 0.5])
_Z_HIGH = np.log([5.0, 5.0, 2000.0])


# ------------------------------------------------------------------------------------------ data types
@dataclass(frozen=True)
class ResponseParameters:
    """Patient-specific response parameters: ``alpha_per_gy`` (Gy⁻¹), ``lambda_per_day`` (day⁻¹),
    ``t_clear_days`` (days, clearance half-time of lethally damaged cells)."""

    alpha_per_gy: float
    lambda_per_day: float
    t_clear_days: float

    def __post_init__(self) -> None:
        for name in PARAMETER_NAMES:
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.floating, np.integer)) and np.isfinite(value) and value > 0):
                raise InvalidInputError(f"Response parameter {name} must be a positive number, got {value!r}")

    def as_array(self) -> np.ndarray:
        """The parameters as an array ``[α, λ, T_clear]``."""
        return np.array([self.alpha_per_gy, self.lambda_per_day, self.t_clear_days], dtype=np.float64)

    @classmethod
    def from_array(cls, values: Sequence[float]) -> "ResponseParameters":
        """From ``[α, λ, T_clear]``."""
        a = np.asarray(values, dtype=np.float64).ravel()
        if a.size != 3:
            raise InvalidInputError(f"Response parameters need 3 values (α, λ, T_clear), got {a.size}")
        return cls(float(a[0]), float(a[1]), float(a[2]))


@dataclass(frozen=True)
class Schedule:
    """A fractionation schedule: fraction days (days from the first fraction) and tumour dose per fraction
    (Gy), with optional planned observation (imaging) days.

    Fractions must be in time order (several on one day are applied one after the other).
    """

    fraction_days: np.ndarray
    doses_gy: np.ndarray
    observation_days: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        days = np.asarray(self.fraction_days, dtype=np.float64).ravel()
        doses = np.asarray(self.doses_gy, dtype=np.float64).ravel()
        obs = np.asarray(self.observation_days, dtype=np.float64).ravel()
        if days.shape != doses.shape:
            raise InvalidInputError(f"A schedule needs one dose per fraction day: {days.size} days, {doses.size} doses")
        if not (np.isfinite(days).all() and np.isfinite(doses).all() and np.isfinite(obs).all()):
            raise InvalidInputError("Schedule days and doses must be finite numbers (no NaN)")
        if (days < 0).any() or (obs < 0).any():
            raise InvalidInputError("Schedule days must be ≥ 0 (day 0 is the first fraction)")
        if (np.diff(days) < 0).any():
            raise InvalidInputError("Fraction days must be in time order: sort the fractions by day")
        if (doses < 0).any():
            raise InvalidInputError("Fraction doses must be ≥ 0 Gy")
        object.__setattr__(self, "fraction_days", days)
        object.__setattr__(self, "doses_gy", doses)
        object.__setattr__(self, "observation_days", np.unique(obs))

    @classmethod
    def standard(cls, n_fractions: int = 35, dose_per_fraction_gy: float = 2.0, start_weekday: int = 0,
                 fractions_per_week: int = 5) -> "Schedule":
        """One fraction a day on weekdays from day 0 (a Monday when ``start_weekday`` = 0; 0–6 =
        Monday–Sunday, a weekend start moves to the next Monday), with daily imaging before each
        fraction as the observation days."""
        if int(n_fractions) != n_fractions or n_fractions < 1:
            raise InvalidInputError(f"n_fractions must be a positive integer, got {n_fractions!r}")
        if int(start_weekday) != start_weekday or not 0 <= start_weekday <= 6:
            raise InvalidInputError(f"start_weekday must be 0 (Monday) … 6 (Sunday), got {start_weekday!r}")
        if int(fractions_per_week) != fractions_per_week or not 1 <= fractions_per_week <= 7:
            raise InvalidInputError(f"fractions_per_week must be 1 … 7, got {fractions_per_week!r}")
        if not (np.isfinite(dose_per_fraction_gy) and dose_per_fraction_gy >= 0):
            raise InvalidInputError(f"dose_per_fraction_gy must be ≥ 0 Gy, got {dose_per_fraction_gy!r}")
        days: list[float] = []
        day, weekday = 0, int(start_weekday)
        while weekday >= fractions_per_week:  # a start on a day without treatment: wait for the next week
            day, weekday = day + 1, (weekday + 1) % 7
        while len(days) < n_fractions:
            if weekday < fractions_per_week:
                days.append(float(day))
            day, weekday = day + 1, (weekday + 1) % 7
        d = np.array(days)
        return cls(d, np.full(d.size, float(dose_per_fraction_gy)), d.copy())

    @property
    def n_fractions(self) -> int:
        """Number of fractions."""
        return int(self.fraction_days.size)

    @property
    def horizon_day(self) -> float:
        """Day of the last fraction (0 for an empty schedule)."""
        return float(self.fraction_days[-1]) if self.fraction_days.size else 0.0

    @property
    def total_dose_gy(self) -> float:
        """Total tumour dose (Gy)."""
        return float(self.doses_gy.sum())

    def delivered(self, today_day: float) -> "Schedule":
        """The fractions given before ``today_day`` (today's fraction is not yet given)."""
        keep = self.fraction_days < today_day
        return Schedule(self.fraction_days[keep], self.doses_gy[keep], self.observation_days)

    def remaining(self, today_day: float) -> "Schedule":
        """The fractions on or after ``today_day``."""
        keep = self.fraction_days >= today_day
        return Schedule(self.fraction_days[keep], self.doses_gy[keep], self.observation_days)

    def then(self, other: "Schedule") -> "Schedule":
        """This schedule followed by ``other`` (whose fractions must not come earlier)."""
        return Schedule(np.concatenate([self.fraction_days, other.fraction_days]),
                        np.concatenate([self.doses_gy, other.doses_gy]),
                        np.concatenate([self.observation_days, other.observation_days]))


@dataclass(frozen=True)
class SimulatedVolumes:
    """Simulated volumes (cc), each ``(N samples, len(days))``: viable ``V``, dead ``D``, total ``V + D``."""

    days: np.ndarray
    viable_cc: np.ndarray
    dead_cc: np.ndarray

    @property
    def total_cc(self) -> np.ndarray:
        """Total (gross tumour) volume, cc."""
        return self.viable_cc + self.dead_cc


@dataclass(frozen=True)
class LogNormalPrior:
    """Independent log-normal priors: ``log θ_i ~ N(log median_i, log_sd_i²)``, with citations."""

    medians: tuple[float, float, float]
    log_sds: tuple[float, float, float]
    citations: tuple[str, str, str]

    def __post_init__(self) -> None:
        m, s = np.asarray(self.medians, float), np.asarray(self.log_sds, float)
        if m.shape != (3,) or s.shape != (3,) or not (np.isfinite(m).all() and np.isfinite(s).all()) \
                or (m <= 0).any() or (s <= 0).any():
            raise InvalidInputError("A prior needs 3 positive medians and 3 positive log-sds (α, λ, T_clear)")

    @property
    def mean_z(self) -> np.ndarray:
        """Prior mean of the log parameters."""
        return np.log(np.asarray(self.medians, dtype=np.float64))

    @property
    def sd_z(self) -> np.ndarray:
        """Prior standard deviation of the log parameters."""
        return np.asarray(self.log_sds, dtype=np.float64)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` parameter draws ``(n, 3)`` in natural units, inside the hard bounds."""
        z = self.mean_z + self.sd_z * rng.standard_normal((int(n), 3))
        return np.exp(np.clip(z, _Z_LOW, _Z_HIGH))

    def log_density_z(self, z: np.ndarray) -> np.ndarray:
        """Log prior density of log parameters ``z`` ``(N, 3)`` (up to a constant)."""
        return -0.5 * (((z - self.mean_z) / self.sd_z) ** 2).sum(axis=-1)


#: Population prior for head-and-neck squamous-cell carcinoma (see the module docstring for sources).
POPULATION_PRIOR = LogNormalPrior(
    medians=(0.22, math.log(2.0) / 4.5, 22.0),
    log_sds=(0.35, 0.5, 0.5),
    citations=(
        "alpha: Qi XS et al. Cancers 2012;4:566 (0.22 +/- 0.08 /Gy, HNC cell lines; verified in abstract); "
        "spread assumed",
        "lambda = ln2/Tpot, Tpot median 4.5 d (HNC median Tpot 4-5 d, review abstract verified; Begg AC et al. "
        "Radiother Oncol 1999;50:13 not checked); spread assumed",
        "T_clear: assumption tuned to the median 69.5 % GTV loss by the end of RT (Barker JL et al. IJROBP "
        "2004;59:960, verified in abstract); spread assumed",
    ),
)


# ------------------------------------------------------------------------------------------ simulator
def _as_parameter_array(params: "ResponseParameters | Sequence[ResponseParameters] | np.ndarray") -> np.ndarray:
    if isinstance(params, ResponseParameters):
        return params.as_array()[None, :]
    if isinstance(params, (list, tuple)) and params and isinstance(params[0], ResponseParameters):
        return np.stack([p.as_array() for p in params])
    a = np.asarray(params, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != 3:
        raise InvalidInputError(f"Parameter arrays must be (N, 3) [α, λ, T_clear], got shape {a.shape}")
    if not np.isfinite(a).all() or (a <= 0).any():
        raise InvalidInputError("Response parameters must be positive finite numbers")
    return a


class _Plan:
    """A precompiled event sequence: steps between events, fractions and output indices."""

    def __init__(self, fraction_days: np.ndarray, doses_gy: np.ndarray, output_days: np.ndarray):
        out = np.asarray(output_days, dtype=np.float64).ravel()
        if not np.isfinite(out).all() or (out < 0).any():
            raise InvalidInputError("Output days must be finite and ≥ 0 (day 0 is the first fraction)")
        events = np.unique(np.concatenate([[0.0], fraction_days, out]))
        # Each entry: (step length h, output indices recorded at the event, doses applied after recording).
        self.steps: list[tuple[float, np.ndarray, np.ndarray]] = []
        t = 0.0
        for e in events:
            gap = e - t
            n_sub = max(1, int(math.ceil(gap / MAX_STEP_DAYS - 1e-9))) if gap > 0 else 0
            for _ in range(n_sub):
                self.steps.append((gap / n_sub, np.zeros(0, int), np.zeros(0)))
            self.steps.append((0.0, np.flatnonzero(out == e), doses_gy[fraction_days == e]))
            t = e
        self.n_out = out.size
        # Only the steps that do something.
        self.steps = [s for s in self.steps if s[0] > 0 or s[1].size or s[2].size]


def _run(plan: _Plan, theta: np.ndarray, want_viable: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (V0 = 1) viable and dead volumes at the plan's output days, ``(N, n_out)`` each."""
    n = theta.shape[0]
    alpha, lam, t_clear = theta[:, 0], theta[:, 1], theta[:, 2]
    beta = alpha / TUMOUR_ALPHA_BETA_GY
    k = math.log(2.0) / t_clear
    cap = CARRYING_CAPACITY_RATIO
    lam_cap = lam / cap
    v = np.ones(n)
    d = np.zeros(n)
    out_v = np.empty((n, plan.n_out))
    out_d = np.empty((n, plan.n_out))
    cache: dict[float, tuple] = {}
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for h, idx, doses in plan.steps:
            if h > 0:
                c = cache.get(h)
                if c is None:
                    c = (np.exp(-k * h), -np.expm1(-k * h) / k, -np.expm1(-k * h / 2) / k, lam * h, lam * h / 2)
                    cache[h] = c
                ekh, one_m_full, one_m_half, lh, lh2 = c
                q = lam_cap * d  # λ D0 / K
                g_full = lh - q * one_m_full
                g_half = lh2 - q * one_m_half
                e_full = np.exp(g_full)
                integral = (h / 6.0) * (1.0 + 4.0 * np.exp(g_half) + e_full)
                v = v * e_full / (1.0 + lam_cap * v * integral)
                d = d * ekh
            if idx.size:
                out_v[:, idx] = v[:, None]
                out_d[:, idx] = d[:, None]
            for dose in doses:
                s = np.exp(-alpha * dose - beta * dose * dose)
                d = d + (1.0 - s) * v
                v = s * v
    return out_v, out_d


def simulate_volumes(params: "ResponseParameters | Sequence[ResponseParameters] | np.ndarray", schedule: Schedule,
                     v0_cc: float | np.ndarray, days: Sequence[float] | np.ndarray) -> SimulatedVolumes:
    """Viable, dead and total tumour volumes (cc) at ``days`` for N parameter samples.

    :param params: one :class:`ResponseParameters`, a sequence of them, or an ``(N, 3)`` array
        ``[α (Gy⁻¹), λ (day⁻¹), T_clear (days)]``.
    :param schedule: the fractions (days, Gy).
    :param v0_cc: pre-treatment volume (cc): a number or one per sample.
    :param days: output days (≥ 0); a day with a fraction gives the volume before it.
    :return: :class:`SimulatedVolumes` with ``(N, len(days))`` arrays.
    """
    theta = _as_parameter_array(params)
    v0 = np.asarray(v0_cc, dtype=np.float64)
    if not np.isfinite(v0).all() or (v0 <= 0).any():
        raise InvalidInputError(f"v0_cc must be positive volumes (cc), got {v0_cc!r}")
    if v0.ndim > 1 or (v0.ndim == 1 and v0.size not in (1, theta.shape[0])):
        raise InvalidInputError(f"v0_cc must be a number or one value per sample ({theta.shape[0]})")
    out_days = np.asarray(days, dtype=np.float64).ravel()
    plan = _Plan(schedule.fraction_days, schedule.doses_gy, out_days)
    v, d = _run(plan, theta)
    scale = v0.reshape(-1, 1) if v0.ndim == 1 else v0
    return SimulatedVolumes(out_days, v * scale, d * scale)


# ------------------------------------------------------------------------------------------ posterior
def _split_rhat(chains: np.ndarray) -> np.ndarray:
    """Split-R̂ (Gelman et al., BDA3) per parameter of ``chains`` ``(n_iter, n_chains, n_par)``."""
    n = chains.shape[0] // 2
    if n < 2:
        return np.full(chains.shape[-1], np.nan)
    halves = np.concatenate([chains[:n], chains[n:2 * n]], axis=1)  # (n, 2C, P)
    means = halves.mean(axis=0)
    w = halves.var(axis=0, ddof=1).mean(axis=0)
    b = n * means.var(axis=0, ddof=1)
    var_plus = (n - 1) / n * w + b / n
    return np.sqrt(var_plus / w)


@dataclass(frozen=True)
class Prediction:
    """Predicted total tumour volume (cc) at ``days``: posterior median and equal-tailed band."""

    days: np.ndarray
    median_cc: np.ndarray
    lower_cc: np.ndarray
    upper_cc: np.ndarray
    level: float


@dataclass(frozen=True)
class Posterior:
    """Posterior of the response parameters of one patient.

    :param samples: ``(n, 3)`` draws of ``[α, λ, T_clear]`` (natural units).
    :param v0_samples_cc: one pre-treatment volume (cc) per draw (constant when V0 was fixed).
    :param map_parameters: the maximum a posteriori parameters; ``map_v0_cc`` its V0.
    :param laplace_covariance: covariance of the log parameters at the MAP (Laplace approximation).
    :param acceptance_rate: mean Metropolis acceptance rate (NaN for the Laplace method).
    :param rhat: split-R̂ per parameter name (NaN for the Laplace method).
    """

    samples: np.ndarray
    v0_samples_cc: np.ndarray
    map_parameters: ResponseParameters
    map_v0_cc: float
    laplace_covariance: np.ndarray
    method: str
    acceptance_rate: float
    rhat: Mapping[str, float]
    n_chains: int
    sigma_obs: float
    schedule: Schedule
    observed_days: np.ndarray
    observed_volumes_cc: np.ndarray
    prior: LogNormalPrior
    seed: int

    @property
    def n_samples(self) -> int:
        """Number of posterior draws."""
        return int(self.samples.shape[0])

    def mean(self) -> ResponseParameters:
        """Posterior mean of each parameter."""
        return ResponseParameters.from_array(self.samples.mean(axis=0))

    def median(self) -> ResponseParameters:
        """Posterior median of each parameter."""
        return ResponseParameters.from_array(np.median(self.samples, axis=0))

    def interval(self, level: float = 0.9) -> dict[str, tuple[float, float]]:
        """Equal-tailed credible interval of each parameter: name → (lower, upper)."""
        lo, hi = _quantiles(self.samples, level)
        return {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(PARAMETER_NAMES)}

    def _draws(self, max_samples: Optional[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
        if max_samples is None or self.n_samples <= max_samples:
            return self.samples, self.v0_samples_cc
        pick = np.random.default_rng(seed).choice(self.n_samples, size=int(max_samples), replace=False)
        return self.samples[pick], self.v0_samples_cc[pick]

    def predict(self, schedule: Optional[Schedule] = None, days: Optional[Sequence[float]] = None,
                level: float = 0.9, max_samples: Optional[int] = 4000) -> Prediction:
        """Posterior prediction of the total tumour volume (cc, the true volume without measurement error)
        for ``schedule`` (default: the calibration schedule) at ``days`` (default: every day from 0 to one
        week after the last fraction)."""
        schedule = self.schedule if schedule is None else schedule
        if days is None:
            days = np.arange(0.0, schedule.horizon_day + 8.0)
        theta, v0 = self._draws(max_samples, self.seed)
        sim = simulate_volumes(theta, schedule, v0, days)
        lo, hi = _quantiles(sim.total_cc, level)
        return Prediction(sim.days, np.median(sim.total_cc, axis=0), lo, hi, float(level))


def _quantiles(x: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    if not (0.0 < float(level) < 1.0):
        raise InvalidInputError(f"The credible level must be between 0 and 1 (e.g. 0.9), got {level!r}")
    tail = (1.0 - float(level)) / 2.0
    return np.quantile(x, tail, axis=0), np.quantile(x, 1.0 - tail, axis=0)


# ------------------------------------------------------------------------------------------ calibration
def _check_observations(observed_days, observed_volumes_cc, schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(schedule, Schedule):
        raise InvalidInputError("schedule must be a twinrt.twin.response.Schedule (e.g. Schedule.standard())")
    t = np.asarray(observed_days, dtype=np.float64).ravel()
    y = np.asarray(observed_volumes_cc, dtype=np.float64).ravel()
    if t.shape != y.shape:
        raise InvalidInputError(f"One volume per observation day is needed: {t.size} days, {y.size} volumes")
    if t.size < 2:
        raise InvalidInputError(f"Calibration needs at least 2 observed volumes (day 0 and one later), got {t.size}")
    if not (np.isfinite(t).all() and np.isfinite(y).all()):
        raise InvalidInputError("Observed days and volumes must be finite numbers: remove NaN or missing scans")
    if (y <= 0).any():
        raise InvalidInputError(f"Observed volumes must be positive (cc); got minimum {float(y.min()):.3g}: "
                                "drop scans where the tumour was not contoured")
    if (t < 0).any():
        raise InvalidInputError("Observation days must be ≥ 0 (day 0 is the first fraction)")
    if (t > schedule.horizon_day).any():
        raise InvalidInputError(f"An observation (day {float(t.max()):g}) is after the schedule's last fraction "
                                f"(day {schedule.horizon_day:g}): pass the full schedule or drop later scans")
    if np.unique(t).size < 2:
        raise InvalidInputError("Observations on at least 2 different days are needed")
    order = np.argsort(t, kind="stable")
    return t[order], y[order]


def _log_posterior_factory(t: np.ndarray, y: np.ndarray, schedule: Schedule, prior: LogNormalPrior,
                           sigma: float, v0_cc: Optional[float]) -> tuple[Callable[[np.ndarray], np.ndarray],
                                                                           Callable[[np.ndarray], np.ndarray]]:
    """``log posterior(z)`` for batches of log parameters, and ``residual mean(z)`` (log V0 | θ)."""
    given = schedule.fraction_days <= t.max()  # later fractions cannot change the observations
    plan = _Plan(schedule.fraction_days[given], schedule.doses_gy[given], t)
    log_y = np.log(y)
    inv2s2 = 0.5 / sigma ** 2

    def residuals(z: np.ndarray) -> np.ndarray:
        v, d = _run(plan, np.exp(z))
        with np.errstate(divide="ignore", invalid="ignore"):
            return log_y - np.log(v + d)

    def log_post(z: np.ndarray) -> np.ndarray:
        z = np.atleast_2d(z)
        inside = ((z >= _Z_LOW) & (z <= _Z_HIGH)).all(axis=1)
        out = np.full(z.shape[0], -np.inf)
        if not inside.any():
            return out
        r = residuals(z[inside])
        if v0_cc is None:
            r = r - r.mean(axis=1, keepdims=True)
        else:
            r = r - math.log(v0_cc)
        ll = -inv2s2 * (r * r).sum(axis=1)
        lp = ll + prior.log_density_z(z[inside])
        out[inside] = np.where(np.isfinite(lp), lp, -np.inf)
        return out

    def log_v0_mean(z: np.ndarray) -> np.ndarray:
        return residuals(np.atleast_2d(z)).mean(axis=1)

    return log_post, log_v0_mean


def _find_map(log_post, prior: LogNormalPrior, rng: np.random.Generator, n_starts: int = 3) -> np.ndarray:
    cand = np.vstack([prior.mean_z, prior.mean_z + prior.sd_z * rng.standard_normal((255, 3))])
    cand = np.clip(cand, _Z_LOW + 1e-6, _Z_HIGH - 1e-6)
    lp = log_post(cand)
    starts = cand[np.argsort(-lp)[:n_starts]]
    eps = 1e-5
    offsets = np.vstack([np.zeros(3), eps * np.eye(3), -eps * np.eye(3)])

    def fun(z):
        vals = log_post(z[None, :] + offsets)
        if not np.isfinite(vals[0]):
            return 1e300, np.zeros(3)
        grad = (vals[1:4] - vals[4:7]) / (2 * eps)
        grad = np.where(np.isfinite(grad), grad, 0.0)
        return -vals[0], -grad

    low, high = _Z_LOW + 1e-6, _Z_HIGH - 1e-6

    def penalised(z):
        # BFGS without bounds: outside the box, the value at the nearest inside point plus a steep
        # quadratic wall (the box is far outside the prior, so the MAP is never on it).
        zc = np.clip(z, low, high)
        f, g = fun(zc)
        excess = z - zc
        return f + 1e4 * float(excess @ excess), g + 2e4 * excess

    best_z, best_f = starts[0], np.inf
    for z0 in starts:
        res = optimize.minimize(penalised, z0, jac=True, method="BFGS", options={"maxiter": 200, "gtol": 1e-5})
        if res.fun < best_f:
            best_z, best_f = np.clip(res.x, low, high), res.fun
    return np.asarray(best_z, dtype=np.float64)


def _laplace_covariance(log_post, z_map: np.ndarray, prior: LogNormalPrior, h: float = 1e-3) -> np.ndarray:
    pts = [z_map]
    e = np.eye(3) * h
    for i in range(3):
        pts += [z_map + e[i], z_map - e[i]]
    pairs = [(0, 1), (0, 2), (1, 2)]
    for i, j in pairs:
        pts += [z_map + e[i] + e[j], z_map + e[i] - e[j], z_map - e[i] + e[j], z_map - e[i] - e[j]]
    f = log_post(np.array(pts))
    hess = np.zeros((3, 3))
    for i in range(3):
        hess[i, i] = (f[1 + 2 * i] - 2 * f[0] + f[2 + 2 * i]) / h ** 2
    for p, (i, j) in enumerate(pairs):
        a, b, c, d = f[7 + 4 * p: 11 + 4 * p]
        hess[i, j] = hess[j, i] = (a - b - c + d) / (4 * h ** 2)
    precision = -hess
    if not np.isfinite(precision).all():
        return np.diag(prior.sd_z ** 2)
    w, u = np.linalg.eigh(0.5 * (precision + precision.T))
    w = np.maximum(w, 0.25 / np.max(prior.sd_z ** 2))  # never wider than twice the prior's widest sd
    return (u / w) @ u.T


def calibrate(observed_days: Sequence[float] | np.ndarray, observed_volumes_cc: Sequence[float] | np.ndarray,
              schedule: Schedule, prior: LogNormalPrior = POPULATION_PRIOR, v0_cc: Optional[float] = None,
              method: str = "mcmc", n_samples: int = 8000, seed: int = 0, sigma_obs: float = DEFAULT_SIGMA_OBS,
              n_chains: int = DEFAULT_CHAINS, n_burn: int = 200) -> Posterior:
    """Calibrate the response parameters of one patient on observed tumour volumes (Bayesian).

    :param observed_days: imaging days (≥ 0, up to the schedule's last fraction; day 0 = pre-treatment).
    :param observed_volumes_cc: gross tumour volume on each day (cc, > 0).
    :param schedule: the fractions given and planned (only those before the last observation matter).
    :param prior: population prior (default :data:`POPULATION_PRIOR`).
    :param v0_cc: pre-treatment volume (cc) taken as exact; ``None`` (default) integrates it out with a
        flat prior on log V0, the day-0 observation anchoring it (see the module docstring).
    :param method: ``"mcmc"`` (random-walk Metropolis, parallel chains) or ``"laplace"``.
    :param n_samples: number of posterior draws returned (approximately, for MCMC: a multiple of
        ``n_chains``).
    :param seed: random seed; the result is deterministic given it.
    :param sigma_obs: log-normal observation error (sd of log volume).
    :raises InvalidInputError: fewer than 2 observations, non-positive or NaN volumes, observations after
        the schedule, a bad method or setting.
    """
    t, y = _check_observations(observed_days, observed_volumes_cc, schedule)
    if method not in ("mcmc", "laplace"):
        raise InvalidInputError(f"method must be 'mcmc' or 'laplace', got {method!r}")
    if not (np.isfinite(sigma_obs) and sigma_obs > 0):
        raise InvalidInputError(f"sigma_obs must be a positive number (sd of log volume), got {sigma_obs!r}")
    if v0_cc is not None and not (np.isfinite(v0_cc) and v0_cc > 0):
        raise InvalidInputError(f"v0_cc must be a positive volume (cc) or None, got {v0_cc!r}")
    if int(n_samples) < 10 or int(n_chains) < 2 or int(n_burn) < 10:
        raise InvalidInputError("Use n_samples ≥ 10, n_chains ≥ 2 and n_burn ≥ 10")
    rng = np.random.default_rng(seed)
    log_post, log_v0_mean = _log_posterior_factory(t, y, schedule, prior, float(sigma_obs), v0_cc)
    z_map = _find_map(log_post, prior, rng)
    cov = _laplace_covariance(log_post, z_map, prior)

    if method == "laplace":
        z = rng.multivariate_normal(z_map, cov, size=int(n_samples))
        z = z[((z >= _Z_LOW) & (z <= _Z_HIGH)).all(axis=1)]
        acceptance, rhat, chains_used = float("nan"), {p: float("nan") for p in PARAMETER_NAMES}, 0
    else:
        z, acceptance, rhat_arr = _metropolis(log_post, z_map, cov, int(n_chains), int(n_burn),
                                              max(2, int(math.ceil(int(n_samples) / int(n_chains)))), rng)
        rhat = {p: float(rhat_arr[i]) for i, p in enumerate(PARAMETER_NAMES)}
        chains_used = int(n_chains)

    theta = np.exp(z)
    if v0_cc is None:
        m = t.size
        log_v0 = log_v0_mean(z) + float(sigma_obs) / math.sqrt(m) * rng.standard_normal(z.shape[0])
        v0_samples = np.exp(log_v0)
        map_v0 = float(np.exp(log_v0_mean(z_map)[0]))
    else:
        v0_samples = np.full(z.shape[0], float(v0_cc))
        map_v0 = float(v0_cc)
    return Posterior(samples=theta, v0_samples_cc=v0_samples,
                     map_parameters=ResponseParameters.from_array(np.exp(z_map)),
                     map_v0_cc=map_v0, laplace_covariance=cov, method=method, acceptance_rate=acceptance,
                     rhat=rhat, n_chains=chains_used, sigma_obs=float(sigma_obs), schedule=schedule,
                     observed_days=t, observed_volumes_cc=y, prior=prior, seed=int(seed))


def _metropolis(log_post, z_map: np.ndarray, cov: np.ndarray, n_chains: int, n_burn: int, n_keep: int,
                rng: np.random.Generator, t_df: float = 5.0) -> tuple[np.ndarray, float, np.ndarray]:
    """Vectorised Metropolis–Hastings over parallel chains; returns the kept draws ``(n_keep·C, 3)``,
    the acceptance rate and the split-R̂ per parameter.

    Iterations alternate two kernels that each leave the posterior invariant: a random-walk step
    (Gaussian, covariance ``(2.38²/3)·Σ``) and an independence step from a multivariate Student-t
    (``t_df`` degrees of freedom, location and scale ``1.5²·Σ`` from the Laplace approximation, both
    re-estimated from the pooled chains halfway through burn-in). The heavy-tailed independence
    proposal lets the chains jump across the posterior, which keeps R̂ near 1 with short chains.
    """
    scale = 2.38 / math.sqrt(3.0)
    chol = np.linalg.cholesky(cov)
    z = z_map + 1.5 * rng.standard_normal((n_chains, 3)) @ chol.T  # over-dispersed starts
    z = np.clip(z, _Z_LOW + 1e-6, _Z_HIGH - 1e-6)
    lp = log_post(z)
    bad = ~np.isfinite(lp)
    if bad.any():
        z[bad], lp[bad] = z_map, log_post(z_map[None, :])[0]
    rw_chol = scale * chol
    mu, ind_chol = z_map.copy(), 1.5 * chol

    def log_q(x: np.ndarray) -> np.ndarray:
        u = np.linalg.solve(ind_chol, (x - mu).T)
        return -0.5 * (t_df + 3.0) * np.log1p((u * u).sum(axis=0) / t_df)

    lq = log_q(z)
    adapt_at = n_burn // 2
    history = np.empty((n_burn, n_chains, 3))
    kept = np.empty((n_keep, n_chains, 3))
    accepted = 0
    for it in range(n_burn + n_keep):
        if it == adapt_at:
            pooled = history[adapt_at // 2: adapt_at].reshape(-1, 3)
            c = np.cov(pooled, rowvar=False) + 1e-9 * np.eye(3)
            try:
                new_chol = np.linalg.cholesky(c)
                rw_chol, mu, ind_chol = scale * new_chol, pooled.mean(axis=0), 1.5 * new_chol
                lq = log_q(z)
            except np.linalg.LinAlgError:
                pass
        if it % 2 == 0:
            proposal = z + rng.standard_normal((n_chains, 3)) @ rw_chol.T
            lp_new = log_post(proposal)
            log_ratio = lp_new - lp  # symmetric proposal: no correction
            lq_new = log_q(proposal)  # kept up to date for the independence steps
        else:
            g = rng.standard_normal((n_chains, 3)) @ ind_chol.T
            w = np.sqrt(t_df / rng.chisquare(t_df, size=n_chains))
            proposal = mu + g * w[:, None]
            lp_new = log_post(proposal)
            lq_new = log_q(proposal)
            log_ratio = (lp_new - lp) - (lq_new - lq)
        accept = np.log(rng.random(n_chains)) < log_ratio
        z = np.where(accept[:, None], proposal, z)
        lp = np.where(accept, lp_new, lp)
        lq = np.where(accept, lq_new, lq)
        if it < n_burn:
            history[it] = z
        else:
            kept[it - n_burn] = z
            accepted += int(accept.sum())
    acceptance = accepted / float(n_keep * n_chains)
    return kept.reshape(-1, 3), acceptance, _split_rhat(np.exp(kept))


# ------------------------------------------------------------------------------------------ regimens
@dataclass(frozen=True)
class Regimen:
    """A candidate remaining course: fraction days, tumour dose per fraction (Gy), and per fraction the
    ratio of this dose to the planned one (``oar_dose_scale``), by which the organs' planned per-voxel
    fraction doses are scaled (1 = as planned)."""

    name: str
    fraction_days: np.ndarray
    doses_gy: np.ndarray
    oar_dose_scale: np.ndarray

    def __post_init__(self) -> None:
        days = np.asarray(self.fraction_days, dtype=np.float64).ravel()
        doses = np.asarray(self.doses_gy, dtype=np.float64).ravel()
        scale = np.broadcast_to(np.asarray(self.oar_dose_scale, dtype=np.float64), doses.shape).copy()
        if days.shape != doses.shape:
            raise InvalidInputError(f"Regimen '{self.name}' needs one dose per fraction day")
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise InvalidInputError(f"Regimen '{self.name}': oar_dose_scale must be ≥ 0")
        Schedule(days, doses)  # validates order and values
        object.__setattr__(self, "fraction_days", days)
        object.__setattr__(self, "doses_gy", doses)
        object.__setattr__(self, "oar_dose_scale", scale)

    @property
    def schedule(self) -> Schedule:
        """The regimen's fractions as a :class:`Schedule`."""
        return Schedule(self.fraction_days, self.doses_gy)


def standard_regimens(schedule: Schedule, today_day: float, boost: float = 0.10,
                      de_escalation: float = 0.10) -> list[Regimen]:
    """``keep`` (the remaining plan), ``boost`` (+``boost`` per remaining fraction) and ``de-escalate``
    (−``de_escalation``) for the fractions of ``schedule`` on or after ``today_day``."""
    rest = schedule.remaining(today_day)
    if rest.n_fractions == 0:
        raise InvalidInputError(f"No fraction left on or after day {today_day:g}: nothing to compare")
    if not (0 <= boost < 5 and 0 <= de_escalation < 1):
        raise InvalidInputError("boost must be in [0, 5) and de_escalation in [0, 1) (fractions, e.g. 0.1)")
    out = []
    for name, f in (("keep", 1.0), ("boost", 1.0 + boost), ("de-escalate", 1.0 - de_escalation)):
        out.append(Regimen(name, rest.fraction_days, rest.doses_gy * f, np.full(rest.n_fractions, f)))
    return out


@dataclass(frozen=True)
class OarDoses:
    """An organ at risk for regimen comparison.

    :param name: organ name (TG-263 / OpenKBP, e.g. ``Parotid_L``).
    :param delivered_bed_gy: per-voxel BED (Gy, with ``alpha_beta_gy``) of the fractions given so far.
    :param planned_fraction_dose_gy: per-voxel physical dose of one remaining planned fraction (Gy).
    :param alpha_beta_gy: α/β of the organ (Gy); e.g. :func:`twinrt.radiobiology.alpha_beta_for`.
    :param lkb_parameters: name of a :data:`twinrt.radiobiology.LKB_PARAMETERS` set or an
        :class:`LkbParameters`; ``None`` picks the organ's default from its name.
    """

    name: str
    delivered_bed_gy: np.ndarray
    planned_fraction_dose_gy: np.ndarray
    alpha_beta_gy: float
    lkb_parameters: "str | LkbParameters | None" = None

    def __post_init__(self) -> None:
        bed = np.asarray(self.delivered_bed_gy, dtype=np.float64).ravel()
        frac = np.asarray(self.planned_fraction_dose_gy, dtype=np.float64).ravel()
        if bed.shape != frac.shape or bed.size == 0:
            raise InvalidInputError(f"Organ '{self.name}': delivered BED and planned fraction dose need the same "
                                    f"(non-zero) number of voxels, got {bed.size} and {frac.size}")
        if not (np.isfinite(bed).all() and np.isfinite(frac).all()) or (bed < 0).any() or (frac < 0).any():
            raise InvalidInputError(f"Organ '{self.name}': doses must be finite and ≥ 0 Gy")
        if not (np.isfinite(self.alpha_beta_gy) and self.alpha_beta_gy > 0):
            raise InvalidInputError(f"Organ '{self.name}': α/β must be a positive number of Gy")
        object.__setattr__(self, "delivered_bed_gy", bed)
        object.__setattr__(self, "planned_fraction_dose_gy", frac)

    def parameters(self) -> LkbParameters:
        """The LKB parameter set used for this organ."""
        p = self.lkb_parameters
        if p is None:
            p = lkb_parameter_set_for(self.name)
        if isinstance(p, LkbParameters):
            return p
        if p not in LKB_PARAMETERS:
            raise InvalidInputError(f"Organ '{self.name}': unknown LKB parameter set {p!r}; use one of "
                                    f"{', '.join(LKB_PARAMETERS)}")
        return LKB_PARAMETERS[p]

    def course_eqd2_gy(self, oar_dose_scale: np.ndarray) -> np.ndarray:
        """Per-voxel EQD2 (Gy) of the delivered part plus remaining fractions scaled by ``oar_dose_scale``."""
        s = np.asarray(oar_dose_scale, dtype=np.float64)
        d = self.planned_fraction_dose_gy
        bed = self.delivered_bed_gy + d * s.sum() + d * d * (s * s).sum() / self.alpha_beta_gy
        return bed / (1.0 + 2.0 / self.alpha_beta_gy)

    def ntcp(self, oar_dose_scale: np.ndarray) -> float:
        """LKB NTCP of the course with the remaining fractions scaled by ``oar_dose_scale``."""
        p = self.parameters()
        e = self.course_eqd2_gy(oar_dose_scale)
        return float(lkb_ntcp(geud(e, np.ones_like(e), p.n), p.td50_gy, p.m))


@dataclass(frozen=True)
class RegimenOutcome:
    """Outcome of one regimen: TCP (posterior mean) with its credible interval, NTCP per organ and the
    complication-free control probability ``P+ = TCP · Π(1 − NTCP)`` (organs assumed independent)."""

    name: str
    n_remaining_fractions: int
    remaining_dose_gy: float
    tcp: float
    tcp_interval: tuple[float, float]
    ntcp: Mapping[str, float]
    p_plus: float
    viable_end_cc_median: float


@dataclass(frozen=True)
class RegimenComparison:
    """The outcomes of the compared regimens, in the order given."""

    outcomes: tuple[RegimenOutcome, ...]
    level: float
    clonogen_density_per_cc: float

    def to_rows(self) -> list[dict[str, object]]:
        """One dict per regimen for a table: regimen, fractions left, dose left (Gy), TCP, TCP interval,
        one ``NTCP <organ>`` column per organ, P+."""
        rows = []
        for o in self.outcomes:
            row: dict[str, object] = {"regimen": o.name, "fractions_left": o.n_remaining_fractions,
                                      "dose_left_gy": round(o.remaining_dose_gy, 3), "TCP": o.tcp,
                                      f"TCP {int(round(self.level * 100))}% CI": o.tcp_interval}
            for organ, value in o.ntcp.items():
                row[f"NTCP {organ}"] = value
            row["P+"] = o.p_plus
            rows.append(row)
        return rows

    def best(self) -> RegimenOutcome:
        """The regimen with the highest P+."""
        return max(self.outcomes, key=lambda o: o.p_plus)


def compare_regimens(posterior: Posterior, regimens: Sequence[Regimen], today_day: float,
                     oars: Sequence[OarDoses] = (), clonogen_density_per_cc: float = DEFAULT_CLONOGEN_DENSITY_PER_CC,
                     seed: int = 0, level: float = 0.9, max_samples: Optional[int] = 4000) -> RegimenComparison:
    """Compare candidate remaining courses by tumour control versus organ complications.

    For each regimen the course is the calibration schedule's fractions before ``today_day`` followed by
    the regimen's fractions. TCP per posterior draw is the Poisson TCP of the clonogens in the viable
    volume just after the last fraction (``V_end · clonogen_density``); the reported TCP is the posterior
    mean and the interval the equal-tailed credible interval of the per-draw TCP. NTCP per organ is the
    LKB NTCP of the per-voxel course EQD2 (:meth:`OarDoses.ntcp`).
    """
    if not isinstance(posterior, Posterior):
        raise InvalidInputError("posterior must come from twinrt.twin.response.calibrate")
    if not regimens:
        raise InvalidInputError("No regimen given: build them with standard_regimens(schedule, today_day)")
    if not (np.isfinite(clonogen_density_per_cc) and clonogen_density_per_cc > 0):
        raise InvalidInputError(f"clonogen_density_per_cc must be positive, got {clonogen_density_per_cc!r}")
    for r in regimens:
        if r.fraction_days.size and r.fraction_days[0] < today_day:
            raise InvalidInputError(f"Regimen '{r.name}' has a fraction before today (day {today_day:g})")
    theta, v0 = posterior._draws(max_samples, seed)
    given = posterior.schedule.delivered(today_day)
    outcomes = []
    for r in regimens:
        course = given.then(r.schedule)
        end = course.horizon_day + 1e-9  # just after the last fraction
        sim = simulate_volumes(theta, course, v0, [end])
        v_end = sim.viable_cc[:, 0]
        tcp_draws = poisson_tcp(v_end * clonogen_density_per_cc)
        lo, hi = _quantiles(tcp_draws, level)
        ntcp = {o.name: o.ntcp(r.oar_dose_scale) for o in oars}
        tcp = float(np.mean(tcp_draws))
        p_plus = tcp * float(np.prod([1.0 - v for v in ntcp.values()])) if ntcp else tcp
        outcomes.append(RegimenOutcome(r.name, int(r.fraction_days.size), float(r.doses_gy.sum()), tcp,
                                       (float(lo), float(hi)), ntcp, p_plus, float(np.median(v_end))))
    return RegimenComparison(tuple(outcomes), float(level), float(clonogen_density_per_cc))


# ------------------------------------------------------------------------------------------ coverage study
@dataclass(frozen=True)
class CoverageResult:
    """Coverage of the credible intervals over simulated patients whose true parameters are drawn from
    the prior: ``coverage`` over all parameters, ``per_parameter`` coverage, the truths and intervals
    (``(n_patients, 3)`` each), median R̂ and acceptance, and the run time (s)."""

    coverage: float
    per_parameter: Mapping[str, float]
    level: float
    n_patients: int
    observed_fractions: int
    truths: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    max_rhat: float
    mean_acceptance: float
    runtime_s: float


def coverage_study(n_patients: int = 50, observed_fractions: int = 15, level: float = 0.9, seed: int = 0,
                   schedule: Optional[Schedule] = None, prior: LogNormalPrior = POPULATION_PRIOR,
                   sigma_obs: float = DEFAULT_SIGMA_OBS, method: str = "mcmc", n_samples: int = 4000,
                   v0_range_cc: tuple[float, float] = (5.0, 80.0)) -> CoverageResult:
    """Simulation-based check of the calibration (benchmark ``param_ci_coverage``).

    For each simulated patient: true parameters drawn from ``prior``, V0 log-uniform in ``v0_range_cc``,
    the course ``schedule`` (default 35 × 2 Gy, weekdays), noisy observations (log-normal, ``sigma_obs``)
    before each of the first ``observed_fractions + 1`` fractions (day 0 is the pre-treatment scan, the
    last one "today"), calibration, and whether each true parameter lies in its ``level`` credible
    interval. For a correct inference the coverage is close to ``level``.
    """
    if int(n_patients) < 1:
        raise InvalidInputError(f"n_patients must be ≥ 1, got {n_patients!r}")
    schedule = Schedule.standard() if schedule is None else schedule
    if not 1 <= int(observed_fractions) < schedule.n_fractions:
        raise InvalidInputError(f"observed_fractions must be 1 … {schedule.n_fractions - 1}, "
                                f"got {observed_fractions!r}")
    lo_v0, hi_v0 = v0_range_cc
    if not (0 < lo_v0 <= hi_v0):
        raise InvalidInputError("v0_range_cc must be (low, high) with 0 < low ≤ high")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    days = schedule.fraction_days[: int(observed_fractions) + 1]
    truths = prior.sample(int(n_patients), rng)
    v0s = np.exp(rng.uniform(math.log(lo_v0), math.log(hi_v0), int(n_patients)))
    clean = simulate_volumes(truths, schedule, v0s, days).total_cc
    observed = clean * np.exp(sigma_obs * rng.standard_normal(clean.shape))
    lower, upper = np.empty_like(truths), np.empty_like(truths)
    rhats, accs = [], []
    for i in range(int(n_patients)):
        post = calibrate(days, observed[i], schedule, prior=prior, method=method, n_samples=n_samples,
                         seed=int(rng.integers(2 ** 31)), sigma_obs=sigma_obs)
        iv = post.interval(level)
        lower[i] = [iv[p][0] for p in PARAMETER_NAMES]
        upper[i] = [iv[p][1] for p in PARAMETER_NAMES]
        rhats.append(max(post.rhat.values()))
        accs.append(post.acceptance_rate)
    inside = (truths >= lower) & (truths <= upper)
    return CoverageResult(coverage=float(inside.mean()),
                          per_parameter={p: float(inside[:, i].mean()) for i, p in enumerate(PARAMETER_NAMES)},
                          level=float(level), n_patients=int(n_patients), observed_fractions=int(observed_fractions),
                          truths=truths, lower=lower, upper=upper, max_rhat=_nan_safe(np.nanmax, rhats),
                          mean_acceptance=_nan_safe(np.nanmean, accs), runtime_s=time.perf_counter() - start)


def _nan_safe(fn, values: list[float]) -> float:
    a = np.asarray(values, dtype=np.float64)
    return float(fn(a)) if np.isfinite(a).any() else float("nan")


__all__ = ["TUMOUR_ALPHA_BETA_GY", "CARRYING_CAPACITY_RATIO", "DEFAULT_SIGMA_OBS", "DEFAULT_CLONOGEN_DENSITY_PER_CC",
           "PARAMETER_NAMES", "ResponseParameters", "Schedule", "SimulatedVolumes", "LogNormalPrior",
           "POPULATION_PRIOR", "simulate_volumes", "Posterior", "Prediction", "calibrate", "Regimen",
           "standard_regimens", "OarDoses", "RegimenOutcome", "RegimenComparison", "compare_regimens",
           "CoverageResult", "coverage_study"]
