"""Tumour response model of the digital twin (issue 7): analytic checks of the simulator, Bayesian
calibration (recovery, coverage, determinism), prediction and regimen comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from twinrt.errors import InvalidInputError
from twinrt.radiobiology import bed_from_fractions
from twinrt.twin.response import (CARRYING_CAPACITY_RATIO, PARAMETER_NAMES, POPULATION_PRIOR, OarDoses, Regimen,
                                  ResponseParameters, Schedule, _split_rhat, calibrate, compare_regimens,
                                  coverage_study, simulate_volumes, standard_regimens)

NO_DOSE = Schedule(np.zeros(0), np.zeros(0))


def _observe(truth: ResponseParameters, schedule: Schedule, days, v0=30.0, sigma=0.08, seed=1):
    clean = simulate_volumes(truth, schedule, v0, days).total_cc[0]
    return clean * np.exp(sigma * np.random.default_rng(seed).standard_normal(clean.size))


# ------------------------------------------------------------------------------------------ simulator
def test_no_dose_is_the_logistic_solution():
    p = ResponseParameters(0.3, 0.12, 20.0)
    days = np.arange(0.0, 61.0, 2.5)
    sim = simulate_volumes(p, NO_DOSE, 10.0, days)
    k_cap = CARRYING_CAPACITY_RATIO * 10.0
    growth = np.exp(0.12 * days)
    exact = k_cap * 10.0 * growth / (k_cap + 10.0 * (growth - 1.0))
    np.testing.assert_allclose(sim.total_cc[0], exact, rtol=1e-7)
    assert np.all(sim.dead_cc == 0)


def test_single_fraction_kills_exactly_one_minus_s_and_clearance_halves_dead_volume():
    p = ResponseParameters(0.25, 1e-3, 12.0)
    sched = Schedule(np.array([0.0]), np.array([3.0]))
    s = math.exp(-0.25 * 3.0 - 0.025 * 9.0)  # α/β = 10 Gy
    sim = simulate_volumes(p, sched, 20.0, [0.0, 1e-12, 12.0, 24.0])
    # day 0 is before the fraction, just after it the split is exact
    assert sim.viable_cc[0, 0] == pytest.approx(20.0) and sim.dead_cc[0, 0] == 0
    assert sim.viable_cc[0, 1] == pytest.approx(20.0 * s, rel=1e-9)
    assert sim.dead_cc[0, 1] == pytest.approx(20.0 * (1 - s), rel=1e-9)
    # dead volume halves every T_clear, whatever the viable part does
    assert sim.dead_cc[0, 2] == pytest.approx(0.5 * sim.dead_cc[0, 1], rel=1e-12)
    assert sim.dead_cc[0, 3] == pytest.approx(0.25 * sim.dead_cc[0, 1], rel=1e-12)


def test_simulation_is_vectorised_and_scale_invariant():
    theta = POPULATION_PRIOR.sample(5, np.random.default_rng(0))
    sched = Schedule.standard()
    days = [0.0, 10.0, 46.0]
    one_by_one = np.vstack([simulate_volumes(t, sched, 7.0, days).total_cc for t in theta])
    batch = simulate_volumes(theta, sched, np.full(5, 7.0), days)
    np.testing.assert_allclose(batch.total_cc, one_by_one, rtol=1e-12)
    np.testing.assert_allclose(simulate_volumes(theta, sched, 70.0, days).total_cc, 10 * batch.total_cc, rtol=1e-12)


def test_standard_schedule_skips_weekends():
    s = Schedule.standard()
    assert s.n_fractions == 35 and s.total_dose_gy == pytest.approx(70.0) and s.horizon_day == 46.0
    assert s.fraction_days[:7].tolist() == [0, 1, 2, 3, 4, 7, 8]
    thursday = Schedule.standard(n_fractions=4, start_weekday=3)
    assert thursday.fraction_days.tolist() == [0, 1, 4, 5]
    saturday = Schedule.standard(n_fractions=2, start_weekday=5)
    assert saturday.fraction_days.tolist() == [2, 3]


def test_prior_gives_plausible_shrinkage():
    theta = POPULATION_PRIOR.sample(2000, np.random.default_rng(0))
    end = simulate_volumes(theta, Schedule.standard(), 1.0, [46.0]).total_cc[:, 0]
    loss = 1 - end
    assert 0.55 < np.median(loss) < 0.8          # Barker et al. 2004: median 69.5 %
    assert np.quantile(loss, 0.1) > 0.2 and np.quantile(loss, 0.9) < 0.97


# ------------------------------------------------------------------------------------------ calibration
def test_calibration_recovers_parameters_from_noise_free_data():
    # a radio-resistant, fast-growing tumour: viable cells stay visible, so all three parameters show
    truth = ResponseParameters(0.12, 0.2, 18.0)
    sched = Schedule.standard()
    days = sched.fraction_days[:31]
    y = _observe(truth, sched, days, sigma=0.0)
    post = calibrate(days, y, sched, sigma_obs=0.01, seed=0)
    iv = post.interval(0.9)
    prior_ratio = math.exp(1.645 * 0.35) / math.exp(-1.645 * 0.35)  # α prior: 90 % interval hi/lo ratio
    for name, value, fitted in zip(PARAMETER_NAMES, truth.as_array(), post.map_parameters.as_array()):
        assert iv[name][0] <= value <= iv[name][1], name
        assert fitted == pytest.approx(value, rel=0.06), name
        assert iv[name][1] / iv[name][0] < 0.5 * prior_ratio, name  # much narrower than every prior
    assert post.map_v0_cc == pytest.approx(30.0, rel=0.01)
    assert max(post.rhat.values()) < 1.1 and 0.1 < post.acceptance_rate < 0.9


def test_laplace_method_and_fixed_v0():
    truth = ResponseParameters(0.2, 0.15, 25.0)
    sched = Schedule.standard()
    days = sched.fraction_days[:16]
    y = _observe(truth, sched, days)
    post = calibrate(days, y, sched, method="laplace", n_samples=2000, v0_cc=30.0)
    assert post.method == "laplace" and np.isnan(post.acceptance_rate)
    assert np.all(post.v0_samples_cc == 30.0)
    iv = post.interval(0.95)
    assert iv["t_clear_days"][0] <= 25.0 <= iv["t_clear_days"][1]


def test_calibration_is_deterministic_given_the_seed():
    sched = Schedule.standard()
    days = sched.fraction_days[:10]
    y = _observe(ResponseParameters(0.2, 0.15, 22.0), sched, days)
    a = calibrate(days, y, sched, seed=3, n_samples=1000)
    b = calibrate(days, y, sched, seed=3, n_samples=1000)
    c = calibrate(days, y, sched, seed=4, n_samples=1000)
    np.testing.assert_array_equal(a.samples, b.samples)
    np.testing.assert_array_equal(a.v0_samples_cc, b.v0_samples_cc)
    assert not np.array_equal(a.samples, c.samples)


def test_coverage_on_a_few_simulated_patients():
    result = coverage_study(n_patients=12, observed_fractions=10, level=0.9, seed=5, n_samples=4000)
    assert 0.7 <= result.coverage <= 1.0
    assert set(result.per_parameter) == set(PARAMETER_NAMES)
    assert result.truths.shape == result.lower.shape == (12, 3)
    assert result.max_rhat < 1.2
    assert result.runtime_s < 30


def test_split_rhat_is_one_for_independent_chains_and_large_for_stuck_ones():
    rng = np.random.default_rng(0)
    good = rng.standard_normal((500, 8, 3))
    assert np.all(np.abs(_split_rhat(good) - 1) < 0.02)
    stuck = good + np.arange(8)[None, :, None]
    assert np.all(_split_rhat(stuck) > 1.5)


@pytest.mark.parametrize("days, volumes, match", [
    ([0.0], [30.0], "at least 2"),
    ([0.0, 1.0], [30.0, 0.0], "positive"),
    ([0.0, 1.0], [30.0, float("nan")], "NaN"),
    ([0.0, 50.0], [30.0, 20.0], "after the schedule"),
    ([0.0, 1.0, 2.0], [30.0, 20.0], "One volume per"),
    ([-1.0, 1.0], [30.0, 20.0], "≥ 0"),
])
def test_bad_observations_are_refused(days, volumes, match):
    with pytest.raises(InvalidInputError, match=match):
        calibrate(days, volumes, Schedule.standard())


def test_bad_settings_are_refused():
    sched = Schedule.standard()
    with pytest.raises(InvalidInputError, match="method"):
        calibrate([0, 1], [30, 29], sched, method="nuts")
    with pytest.raises(InvalidInputError, match="sigma_obs"):
        calibrate([0, 1], [30, 29], sched, sigma_obs=0)
    with pytest.raises(InvalidInputError, match="time order"):
        Schedule(np.array([2.0, 1.0]), np.array([2.0, 2.0]))
    with pytest.raises(InvalidInputError, match="positive"):
        ResponseParameters(-0.1, 0.1, 10.0)
    with pytest.raises(InvalidInputError, match=r"\(N, 3\)"):
        simulate_volumes(np.ones((2, 2)), sched, 10.0, [0.0])


# ------------------------------------------------------------------------------------------ prediction
def test_prediction_band_contains_the_true_course():
    truth = ResponseParameters(0.2, 0.15, 20.0)
    sched = Schedule.standard()
    days = sched.fraction_days[:16]
    y = _observe(truth, sched, days, sigma=0.05, seed=2)
    post = calibrate(days, y, sched, sigma_obs=0.05, seed=1)
    future = np.array([25.0, 35.0, 46.0])
    pred = post.predict(sched, future, level=0.9)
    true = simulate_volumes(truth, sched, 30.0, future).total_cc[0]
    assert np.all(pred.lower_cc <= pred.median_cc) and np.all(pred.median_cc <= pred.upper_cc)
    assert np.all((pred.lower_cc <= true) & (true <= pred.upper_cc))
    assert np.all(np.diff(pred.median_cc) < 0)  # still shrinking


# ------------------------------------------------------------------------------------------ regimens
def _parotid(n_given: int, rng) -> OarDoses:
    per_fraction = rng.uniform(0.3, 1.2, 500)
    return OarDoses("Parotid_L", bed_from_fractions([per_fraction] * n_given, 3.0), per_fraction, 3.0)


def test_boost_raises_tcp_and_ntcp_and_de_escalation_lowers_both():
    rng = np.random.default_rng(0)
    sched = Schedule.standard()
    days = sched.fraction_days[:16]
    today = float(sched.fraction_days[15])
    y = _observe(ResponseParameters(0.28, 0.15, 20.0), sched, days)
    post = calibrate(days, y, sched, seed=0)
    cord = OarDoses("SpinalCord", bed_from_fractions([np.full(50, 1.2)] * 15, 2.0), np.full(50, 1.2), 2.0)
    result = compare_regimens(post, standard_regimens(sched, today), today, oars=[_parotid(15, rng), cord])
    by = {o.name: o for o in result.outcomes}
    keep, boost, low = by["keep"], by["boost"], by["de-escalate"]
    assert 0.0 < low.tcp < keep.tcp < boost.tcp < 1.0
    for organ in ("Parotid_L", "SpinalCord"):
        assert low.ntcp[organ] < keep.ntcp[organ] < boost.ntcp[organ]
    assert keep.p_plus == pytest.approx(keep.tcp * (1 - keep.ntcp["Parotid_L"]) * (1 - keep.ntcp["SpinalCord"]))
    assert keep.remaining_dose_gy == pytest.approx(40.0) and boost.remaining_dose_gy == pytest.approx(44.0)
    assert keep.tcp_interval[0] <= keep.tcp <= keep.tcp_interval[1]
    rows = result.to_rows()
    assert [r["regimen"] for r in rows] == ["keep", "boost", "de-escalate"]
    assert {"TCP", "TCP 90% CI", "NTCP Parotid_L", "NTCP SpinalCord", "P+"} <= set(rows[0])
    assert result.best().name in by


def test_oar_course_eqd2_matches_bed_of_the_fractions():
    rng = np.random.default_rng(1)
    organ = _parotid(10, rng)
    scale = np.full(25, 1.1)
    expected = bed_from_fractions([organ.planned_fraction_dose_gy] * 10
                                  + [1.1 * organ.planned_fraction_dose_gy] * 25, 3.0) / (1 + 2 / 3.0)
    np.testing.assert_allclose(organ.course_eqd2_gy(scale), expected, rtol=1e-12)
    assert organ.parameters().td50_gy == pytest.approx(39.9)


def test_regimen_input_errors():
    sched = Schedule.standard()
    with pytest.raises(InvalidInputError, match="same"):
        OarDoses("Parotid_L", np.zeros(3), np.zeros(4), 3.0)
    with pytest.raises(InvalidInputError, match="No LKB parameter set"):
        OarDoses("Femur_L", np.zeros(3), np.zeros(3), 3.0).parameters()
    with pytest.raises(InvalidInputError, match="No fraction left"):
        standard_regimens(sched, today_day=100.0)
    days = sched.fraction_days[:5]
    post = calibrate(days, _observe(ResponseParameters(0.2, 0.15, 20.0), sched, days), sched,
                     method="laplace", n_samples=200)
    early = Regimen("early", np.array([1.0]), np.array([2.0]), np.array([1.0]))
    with pytest.raises(InvalidInputError, match="before today"):
        compare_regimens(post, [early], today_day=7.0)
