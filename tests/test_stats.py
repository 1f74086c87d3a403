"""stats.py: the bootstrap interval, McNemar's exact test, Student's t and the power of the paired t-test, against
scipy and hand computation."""

import random

import numpy as np
import pytest

import eval as evaluation
import stats
from data.sonnets import read_sonnets

scipy_stats = pytest.importorskip("scipy.stats")


def scipy_percentile_ci(metric, hypotheses, references, n_resamples, seed=1):
    """scipy's percentile bootstrap of the same corpus-level metric, resampling (hypothesis, reference) pairs."""
    result = scipy_stats.bootstrap((hypotheses, references), lambda h, r: metric(list(h), list(r)), paired=True,
                                   vectorized=False, method="percentile", confidence_level=0.95,
                                   n_resamples=n_resamples, rng=np.random.default_rng(seed))
    return result.confidence_interval.low, result.confidence_interval.high


# -----------------------------------------------------------------------------
# bootstrap_ci


def test_bootstrap_of_accuracy_is_the_binomial_interval():
    """With k of n right, a resample's number right is Binomial(n, k/n), so with many resamples the percentile
    interval is exactly (binom.ppf(0.025) / n, binom.ppf(0.975) / n), as long as neither quantile sits near a
    jump of the binomial's CDF (checked: both are more than 0.011 from one, ~10 standard errors here)."""
    n, k = 30, 26
    labels = [random.Random(0).randint(0, 1) for _ in range(n)]
    predictions = [y if i < k else 1 - y for i, y in enumerate(labels)]
    binom = scipy_stats.binom(n, k / n)
    low, high = binom.ppf(0.025), binom.ppf(0.975)
    assert min(0.025 - binom.cdf(low - 1), binom.cdf(low) - 0.025,
               0.975 - binom.cdf(high - 1), binom.cdf(high) - 0.975) > 0.011
    ours = stats.bootstrap_ci(evaluation.accuracy, predictions, labels, n_resamples=10000)
    assert (low / n, high / n) == pytest.approx((22 / 30, 29 / 30))
    assert ours == pytest.approx((22 / 30, 29 / 30))
    assert scipy_percentile_ci(evaluation.accuracy, predictions, labels, 10000) == pytest.approx(ours)


def test_bootstrap_hand_cases():
    # one right, one wrong: a resample has accuracy 0, 1/2 or 1 with probability 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are 0 and 1
    assert stats.bootstrap_ci(evaluation.accuracy, [1, 1], [1, 0]) == (0.0, 1.0)
    # hypotheses and references resampled together: every resample of a perfect system scores perfectly
    labels = [0, 1, 1, 0, 1, 0, 0, 1]
    assert stats.bootstrap_ci(evaluation.accuracy, labels, labels) == (1.0, 1.0)
    assert stats.bootstrap_ci(evaluation.macro_f1, labels, labels) == (1.0, 1.0)
    texts = ["Shall I compare thee", "to a summer's day?", "Thou art more lovely"]
    assert stats.bootstrap_ci(evaluation.chrf, texts, texts) == (100.0, 100.0)
    # the seed makes it reproducible
    predictions = [1, 0, 0, 1, 1, 1, 0, 1]
    a = stats.bootstrap_ci(evaluation.macro_f1, predictions, labels, seed=3)
    assert stats.bootstrap_ci(evaluation.macro_f1, predictions, labels, seed=3) == a
    assert a[0] < evaluation.macro_f1(predictions, labels) < a[1]


def test_bootstrap_of_macro_f1_agrees_with_scipy():
    rng = random.Random(0)
    labels = [int(rng.random() < 0.4) for _ in range(100)]
    predictions = [y if rng.random() < 0.8 else 1 - y for y in labels]
    ours = stats.bootstrap_ci(evaluation.macro_f1, predictions, labels, n_resamples=8000)
    theirs = scipy_percentile_ci(evaluation.macro_f1, predictions, labels, 8000)
    # Monte Carlo error of each end is about 0.0015 here; a 90% instead of a 95% interval would move them ~0.015
    assert ours == pytest.approx(theirs, abs=0.006)
    assert ours[1] - ours[0] > 0.1


def test_bootstrap_of_chrf_over_sonnets_agrees_with_scipy(sample_data):
    true = [s.text for s in read_sonnets(sample_data / "sonnets.txt")]
    # "generations" of every quality: the i-th is the first 3 + i lines of the true sonnet
    hypotheses = ["\n".join(sonnet.split("\n")[:3 + i]) for i, sonnet in enumerate(true)]
    ours = stats.bootstrap_ci(evaluation.chrf, hypotheses, true, n_resamples=20000)
    theirs = scipy_percentile_ci(evaluation.chrf, hypotheses, true, 5000)
    # the interval is ~25 chrF wide, (46.7, 71.4); scipy's ends vary by ~0.3 from seed to seed at 5000
    # resamples; a 90% instead of a 95% interval would move each end by ~2
    assert ours == pytest.approx(theirs, abs=1.0)
    assert ours[0] < evaluation.chrf(hypotheses, true) < ours[1] and ours[1] - ours[0] > 20


def test_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError, match="equally many"):
        stats.bootstrap_ci(evaluation.accuracy, [1, 0], [1])
    with pytest.raises(ValueError, match="equally many"):
        stats.bootstrap_ci(evaluation.accuracy, [], [])
    with pytest.raises(ValueError, match="0 < confidence < 1"):
        stats.bootstrap_ci(evaluation.accuracy, [1], [1], confidence=95)
    with pytest.raises(ValueError, match="n_resamples >= 1"):
        stats.bootstrap_ci(evaluation.accuracy, [1], [1], n_resamples=0)


# -----------------------------------------------------------------------------
# McNemar's exact test and the paired difference


def paired_outcomes(only_a, only_b, both, neither, seed=0):
    """Two models' correct/incorrect lists with the given counts of each kind of example, shuffled."""
    rows = [(1, 0)] * only_a + [(0, 1)] * only_b + [(1, 1)] * both + [(0, 0)] * neither
    random.Random(seed).shuffle(rows)
    return [a for a, _ in rows], [b for _, b in rows]


def mcnemar(correct_a, correct_b):
    return stats.paired_difference(correct_a, correct_b)["p_value"]


def test_mcnemar_by_hand():
    # b = 1, c = 5: n = 6, p = 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7 / 64
    assert mcnemar(*paired_outcomes(1, 5, 10, 3)) == 14 / 64
    # b = 0, c = 3: p = 2 * 1/8
    assert mcnemar(*paired_outcomes(0, 3, 4, 4)) == 0.25
    # b = c: the two tails overlap at the middle; p is capped at 1
    assert mcnemar(*paired_outcomes(2, 2, 5, 1)) == 1.0
    # no discordant pairs: the data cannot tell the models apart
    assert mcnemar(*paired_outcomes(0, 0, 7, 2)) == 1.0
    # symmetric in the two models
    assert mcnemar(*paired_outcomes(9, 2, 5, 5)) == mcnemar(
        *paired_outcomes(2, 9, 5, 5))


@pytest.mark.parametrize("b, c", [(1, 5), (0, 1), (0, 12), (7, 7), (7, 8), (30, 12), (3, 40), (130, 95),
                                  (2900, 3100), (4000, 3000), (20000, 19000)])
def test_mcnemar_equals_scipys_binomial_test(b, c):
    correct_a, correct_b = paired_outcomes(b, c, both=50, neither=20)
    assert mcnemar(correct_a, correct_b) == pytest.approx(
        scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9, abs=1e-300)


def test_paired_difference():
    # A right on 0, 1, 4; B right on 0, 2: only A on 1 and 4 (b = 2), only B on 2 (c = 1)
    result = stats.paired_difference([1, 1, 0, 0, 1], [True, False, True, False, False])
    assert result == {"difference": pytest.approx(3 / 5 - 2 / 5), "p_value": 1.0,  # 2 * (1 + 3) / 8, capped
                      "only_a_correct": 2, "only_b_correct": 1, "n": 5}
    correct_a, correct_b = paired_outcomes(30, 12, both=400, neither=58)
    result = stats.paired_difference(correct_a, correct_b)
    assert result["difference"] == pytest.approx((430 - 412) / 500)
    assert result["p_value"] == pytest.approx(scipy_stats.binomtest(30, 42, 0.5).pvalue) and result["p_value"] < 0.01
    with pytest.raises(ValueError, match="equally long"):
        stats.paired_difference([1, 0], [1])


# -----------------------------------------------------------------------------
# Student's t and the paired t-test


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 29])
def test_t_tail_and_quantile_equal_scipys(df):
    for t in [0.0, 0.1, 0.7, 1.5, 2.9, 4.3, 12.7, 80.0]:
        assert stats.t_tail(t, df) == pytest.approx(2 * scipy_stats.t.sf(t, df), rel=1e-10, abs=1e-15)
        assert stats.t_tail(-t, df) == stats.t_tail(t, df)
    for q in [0.5, 0.8, 0.9, 0.975, 0.995]:
        assert stats.t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-9, abs=1e-12)


def test_t_test_is_scipys_one_sample_test_and_interval():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        values = rng.normal(0.01, 0.02, size=n)
        ours = stats.t_test(values)
        theirs = scipy_stats.ttest_1samp(values, 0.0)
        low, high = theirs.confidence_interval(0.95)
        assert ours["difference"] == pytest.approx(values.mean())
        assert ours["p_value"] == pytest.approx(theirs.pvalue, rel=1e-9)
        assert ours["ci95"] == pytest.approx([low, high], rel=1e-9)
    # by hand: differences 1, 2, 3: mean 2, sd 1, t = 2 sqrt(3) on 2 df, half-width 4.303 / sqrt(3)
    hand = stats.t_test([1.0, 2.0, 3.0])
    assert hand["p_value"] == pytest.approx(2 * scipy_stats.t.sf(2 * np.sqrt(3), 2))
    assert hand["ci95"] == pytest.approx([2 - 4.302652729911275 / np.sqrt(3), 2 + 4.302652729911275 / np.sqrt(3)])
    # one value: no spread, so neither an interval nor a p-value; equal values: p is 1 at 0 and 0 elsewhere
    assert stats.t_test([0.5]) == {"difference": 0.5, "ci95": None, "p_value": None}
    assert stats.t_test([0.0, 0.0])["p_value"] == 1.0 and stats.t_test([0.2, 0.2])["p_value"] == 0.0


@pytest.mark.parametrize("n, alpha", [(3, 0.05), (3, 0.05 / 7), (4, 0.05 / 14), (5, 0.01), (10, 0.05)])
def test_smallest_detectable_difference_has_80_percent_power_by_scipys_noncentral_t(n, alpha):
    """Power of the two-sided t-test with n - 1 df at noncentrality delta sqrt(n) / sd: scipy's noncentral t tails."""
    sd = 0.006
    delta = stats.smallest_detectable(sd, n, alpha)
    critical, shift = scipy_stats.t.ppf(1 - alpha / 2, n - 1), delta * np.sqrt(n) / sd
    power = scipy_stats.nct.sf(critical, n - 1, shift) + scipy_stats.nct.cdf(-critical, n - 1, shift)
    assert power == pytest.approx(0.8, abs=1e-4)
    assert stats.smallest_detectable(2 * sd, n, alpha) == pytest.approx(2 * delta)
    assert stats.smallest_detectable(sd, 1) is None
