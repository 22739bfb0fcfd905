"""Head-frequency comparison statistics against plain numpy loops over the same draws, and an exact
permutation test enumerated by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from lsa import bootstrap, flow
from lsa import frequency as F


def _usage(n: int, p: torch.Tensor, seed: int) -> torch.Tensor:
    """``[n, m]`` on/off usage, each component used with probability ``p [m]``."""
    return (torch.rand(n, len(p), generator=torch.Generator().manual_seed(seed)) < p).double()


P = torch.linspace(0.05, 0.95, 12)


def _r(x, y) -> float:
    return float(np.corrcoef(np.asarray(x, dtype=float), np.asarray(y, dtype=float))[0, 1])


def test_row_correlations_match_numpy_and_are_nan_for_a_constant_row():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    x[3] = 0.25
    got = F.correlations(x, y)
    assert torch.isnan(got[3])
    for i in (0, 1, 2, 4):
        assert got[i].item() == pytest.approx(_r(x[i], y[i]), abs=1e-12)


def test_frequencies_of_resampled_rows_count_repeats():
    usage = _usage(6, P, seed=1)
    rows = torch.tensor([[0, 0, 5], [1, 2, 3]])
    want = np.stack([usage.numpy()[r].mean(0) for r in rows.numpy()])
    np.testing.assert_allclose(F.frequencies(usage, rows).numpy(), want, atol=1e-12)


@pytest.mark.parametrize("n", [10, 11])
def test_split_half_correlates_two_disjoint_halves_of_each_random_order(n):
    usage = _usage(n, P, seed=2)
    got = F.split_half(usage, n_splits=25, seed=3)
    orders = F.permutations(n, 25, seed=3).numpy()
    u = usage.numpy()
    want = [_r(u[o[: n // 2]].mean(0), u[o[n // 2 : 2 * (n // 2)]].mean(0)) for o in orders]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    assert all(len(set(o[: n // 2]) & set(o[n // 2 : 2 * (n // 2)])) == 0 for o in orders)


def test_half_of_each_language_uses_the_split_half_sizes():
    a, b = _usage(10, P, seed=4), _usage(7, P, seed=5)
    got = F.across_halves(a, b, n_splits=20, seed=6)
    oa, ob = F.permutations(10, 20, seed=6).numpy(), F.permutations(7, 20, seed=7).numpy()
    want = [_r(a.numpy()[x[:5]].mean(0), b.numpy()[y[:3]].mean(0)) for x, y in zip(oa, ob)]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_bootstrap_correlation_resamples_each_language_independently():
    a, b = _usage(9, P, seed=8), _usage(7, P, seed=9)
    got = F.bootstrap_correlation(a, b, n_boot=30, seed=11)
    ia, ib = bootstrap.resamples(9, 30, 11).numpy(), bootstrap.resamples(7, 30, 12).numpy()
    want = [_r(a.numpy()[x].mean(0), b.numpy()[y].mean(0)) for x, y in zip(ia, ib)]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_heads_paired_at_random_permutes_one_languages_frequencies_over_the_heads():
    a, b = _usage(9, P, seed=13), _usage(8, P, seed=14)
    got = F.heads_paired_at_random(a, b, n_perm=30, seed=15)
    fa, fb = a.numpy().mean(0), b.numpy().mean(0)
    want = [_r(fa, fb[perm]) for perm in F.permutations(len(P), 30, seed=15).numpy()]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    assert abs(float(got.mean())) < 0.2 < _r(fa, fb)  # random pairs lose the shared profile P


def _exact_p(a: np.ndarray, b: np.ndarray) -> float:
    """Every way of dealing the pooled prompts into sets of the two sizes: the share whose correlation is at most
    the observed one."""
    pooled, observed = np.concatenate([a, b]), _r(a.mean(0), b.mean(0))
    values = []
    for rows in itertools.combinations(range(len(pooled)), len(a)):
        rest = [i for i in range(len(pooled)) if i not in rows]
        values.append(_r(pooled[list(rows)].mean(0), pooled[rest].mean(0)))
    values = np.array(values)
    values = values[np.isfinite(values)]
    return float((values <= observed + 1e-12).mean())


@pytest.mark.parametrize("shift", [0.0, 0.6])
def test_shuffled_language_p_value_matches_the_exact_permutation_test(shift):
    a = _usage(5, P, seed=16)
    b = _usage(5, (P + shift) % 1, seed=17)  # shift 0: the same process; 0.6: a different one
    exact = _exact_p(a.numpy(), b.numpy())
    null = F.shuffled_languages(a, b, n_perm=4000, seed=18)
    got = F.p_at_most(null, _r(a.mean(0), b.mean(0)))
    assert got == pytest.approx(exact, abs=0.03)
    assert (exact < 0.05) == (shift > 0)


def test_compare_reports_each_reference_from_the_same_draws():
    usage = {"en": _usage(12, P, seed=19).reshape(12, 3, 4), "zh": _usage(10, P.flip(0), seed=20).reshape(10, 3, 4)}
    got = F.compare(usage, "en", "zh", n_boot=50, n_splits=40, n_perm=60, seed=21)
    ua, ub = usage["en"].flatten(1), usage["zh"].flatten(1)
    freq = flow.frequency_table(usage)
    assert got.observed == pytest.approx(flow.frequency_correlation(freq, "en", "zh"), abs=1e-6)  # float32 table
    assert got.ci == pytest.approx(bootstrap.interval(F.bootstrap_correlation(ua, ub, 50, 21).numpy()))
    en = F.split_half(ua, 40, 21).numpy()
    assert (got.split_half["en"].mean, got.split_half["en"].low) == pytest.approx((en.mean(), np.percentile(en, 2.5)))
    assert got.chance.high == pytest.approx(np.percentile(F.heads_paired_at_random(ua, ub, 60, 21).numpy(), 97.5))
    assert got.p_shuffled == F.p_at_most(F.shuffled_languages(ua, ub, 60, 21), got.observed)
    assert got.observed < 0 < got.split_half["zh"].low  # opposite profiles: the languages differ
    frame = got.frame
    assert frame["reference"].tolist()[:3] == ["en vs zh, all prompts", "two halves of en", "two halves of zh"]
    assert (frame["low"] <= frame["high"]).all() and len(frame) == 6
    with pytest.raises(ValueError, match="no usage for 'fr'"):
        F.compare(usage, "en", "fr")


def test_frequency_table_counts_the_prompts_that_use_each_head():
    usage = {"en": torch.tensor([[[0.0, 0.3]], [[0.1, 0.0]], [[0.2, 0.5]]])}  # [3 prompts, 1 layer, 2 heads]
    got = flow.frequency_table(usage)
    want = pd.DataFrame(
        {"layer": [0, 0], "head": [0, 1], "language": "en", "frequency": [2 / 3, 2 / 3], "importance": [0.1, 0.8 / 3]}
    )
    pd.testing.assert_frame_equal(got.drop(columns="n_prompts"), want, check_dtype=False, atol=1e-7)
    assert (got["n_prompts"] == 3).all()
