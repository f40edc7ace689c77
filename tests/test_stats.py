"""Rates with intervals: Wilson score intervals, the Rogan–Gladen correction and its interval, hand-computed."""

from __future__ import annotations

import math

import pytest

from alignkit.measure.stats import Z95, corrected_interval, rate, rogan_gladen, wilson

# z = 1.959964, z² = 3.841459 throughout


@pytest.mark.parametrize(
    "k, n, expected",
    [
        # p = 0, z²/n = 0.384146, denom = 1.384146; centre = (0 + z²/20)/denom = 0.192073/1.384146 = 0.138766;
        # half = z·sqrt(0 + z²/400)/denom = (z²/20)/denom = 0.138766 → (0, 0, 0.277533)
        (0, 10, (0.0, 0.0, 0.277533)),
        # p = 0.5: centre = (0.5 + 0.192073)/1.384146 = 0.5;
        # half = z·sqrt(0.025 + 0.0096037)/1.384146 = 1.959964·0.186021/1.384146 = 0.263407 → (0.236593, 0.763407)
        (5, 10, (0.5, 0.236593, 0.763407)),
        # p = 1, denom = 1 + z²/84 = 1.045732; centre = (1 + z²/168)/denom = 1.022866/1.045732 = 0.978134;
        # half = (z²/168)/denom = 0.022866/1.045732 = 0.021866 → low 0.956268, high exactly 1
        (84, 84, (1.0, 0.956268, 1.0)),
        # p = 1/3, denom = 1 + z²/3 = 2.280486; centre = (0.333333 + 0.640243)/2.280486 = 0.426916;
        # half = z·sqrt(0.222222/3 + z²/36)/denom = 1.959964·sqrt(0.180781)/2.280486 = 0.365424
        # → (0.061492, 0.792340)
        (1, 3, (1 / 3, 0.061492, 0.792340)),
        # p = 1/3, denom = 1 + z²/9 = 1.426829; centre = (0.333333 + 0.213414)/1.426829 = 0.383191;
        # half = z·sqrt(0.222222/9 + z²/324)/denom = 1.959964·0.191175/1.426829 = 0.262607 → (0.120584, 0.645798)
        (3, 9, (1 / 3, 0.120584, 0.645798)),
    ],
)
def test_wilson_golden(k, n, expected):
    assert wilson(k, n) == pytest.approx(expected, abs=1e-6)


def test_wilson_ends_are_exact_and_z_matters():
    p, low, high = wilson(0, 10)
    assert low == 0.0 and p == 0.0
    assert wilson(84, 84)[2] == 1.0  # not 0.9999999999999999 from rounding
    # a smaller z gives a narrower interval: z = 1 → half = sqrt(0.025 + 0.0025)/1.1 = 0.150756
    assert wilson(5, 10, z=1.0) == pytest.approx((0.5, 0.349244, 0.650756), abs=1e-6)


def test_wilson_n_zero_is_uninformative_and_k_out_of_range_raises():
    p, low, high = wilson(0, 0)
    assert math.isnan(p) and (low, high) == (0.0, 1.0)
    with pytest.raises(ValueError, match="k=11, n=10"):
        wilson(11, 10)
    with pytest.raises(ValueError):
        wilson(-1, 10)


def test_rogan_gladen_golden_and_clipping():
    # (0.3 + 0.8 − 1)/(0.9 + 0.8 − 1) = 0.1/0.7 = 0.142857
    assert rogan_gladen(0.3, 0.9, 0.8) == pytest.approx(0.142857, abs=1e-6)
    # (0.5 + 0.75 − 1)/(5/6 + 0.75 − 1) = 0.25/0.583333 = 0.428571
    assert rogan_gladen(0.5, 5 / 6, 0.75) == pytest.approx(3 / 7, abs=1e-12)
    # a perfect judge changes nothing
    assert rogan_gladen(0.37, 1.0, 1.0) == pytest.approx(0.37, abs=1e-12)
    # (0.1 + 0.8 − 1)/0.7 = −0.142857 → 0;  (0.95 + 0.8 − 1)/0.7 = 1.071429 → 1
    assert rogan_gladen(0.1, 0.9, 0.8) == 0.0
    assert rogan_gladen(0.95, 0.9, 0.8) == 1.0


@pytest.mark.parametrize("se, sp", [(0.5, 0.5), (0.3, 0.6), (0.0, 0.0)])
def test_rogan_gladen_needs_a_judge_better_than_chance(se, sp):
    with pytest.raises(ValueError, match="no better than chance"):
        rogan_gladen(0.3, se, sp)


def test_corrected_interval_point_is_rogan_gladen_and_inside_the_interval():
    # k/n = 0.3, Se = 18/20 = 0.9, Sp = 16/20 = 0.8 → 0.142857 as above
    point, low, high = corrected_interval(30, 100, 18, 20, 16, 20)
    assert point == pytest.approx(0.142857, abs=1e-6)
    assert point == rogan_gladen(0.3, 0.9, 0.8)
    assert 0.0 <= low <= point <= high <= 1.0
    for args in [(0, 50, 9, 10, 9, 10), (50, 50, 9, 10, 9, 10), (7, 40, 40, 50, 30, 40), (1, 3, 5, 6, 3, 4)]:
        p, lo, hi = corrected_interval(*args)
        assert 0.0 <= lo <= p <= hi <= 1.0, args


def test_corrected_interval_widens_when_the_judge_is_validated_on_fewer_items():
    few = corrected_interval(60, 200, 18, 20, 16, 20)
    many = corrected_interval(60, 200, 1800, 2000, 1600, 2000)
    assert few[0] == pytest.approx(many[0])  # same Se, Sp → same point
    assert few[1] < many[1] and few[2] > many[2]
    assert (few[2] - few[1]) > 1.5 * (many[2] - many[1])


def test_corrected_interval_with_a_perfect_well_known_judge_is_about_wilson():
    _, w_low, w_high = wilson(60, 200)
    point, low, high = corrected_interval(60, 200, 10**6, 10**6, 10**6, 10**6)
    assert point == pytest.approx(0.3)
    assert low == pytest.approx(w_low, abs=0.01) and high == pytest.approx(w_high, abs=0.01)


def test_corrected_interval_n_zero_and_chance_judge():
    p, low, high = corrected_interval(0, 0, 9, 10, 9, 10)
    assert math.isnan(p) and (low, high) == (0.0, 1.0)
    with pytest.raises(ValueError):
        corrected_interval(3, 10, 5, 10, 5, 10)  # Se + Sp = 1


def test_rate_record():
    assert rate(0, 0) is None
    r = rate(1, 3)
    assert set(r) == {"k", "n", "rate", "low", "high", "corrected"}
    assert (r["k"], r["n"], r["corrected"]) == (1, 3, None)
    assert (r["rate"], r["low"], r["high"]) == wilson(1, 3)
    judge = {"se_k": 18, "se_n": 20, "sp_k": 16, "sp_n": 20}
    c = rate(30, 100, judge)["corrected"]
    assert (c["rate"], c["low"], c["high"]) == corrected_interval(30, 100, 18, 20, 16, 20)
    assert rate(30, 100, {})["corrected"] is None  # no validation counts: no correction


def test_z95_is_the_two_sided_95_percent_quantile():
    # Φ(1.959964) = 0.975: erfc(z/√2)/2 = 0.025
    assert math.erfc(Z95 / math.sqrt(2)) / 2 == pytest.approx(0.025, abs=1e-12)
