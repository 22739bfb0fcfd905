"""Two languages' head activation frequencies compared: the correlation, its interval, and what to expect.

The paper reads a high correlation between two languages' head activation frequencies (the share of
prompts whose information-flow route uses each head: :func:`lsa.flow.head_usage`) as shared heads. A
correlation alone has no scale, so :func:`compare` puts it beside what it would be

1) on other samples of the same prompts: its 95% bootstrap interval (each language's prompts
   resampled with replacement, independently). It leans low: a resample holds about 63% distinct
   prompts, and noisier frequencies correlate less (Gemma 3, 48 prompts per language: estimate
   0.916, resampled mean 0.908, interval 0.884 to 0.929);
2) for two samples of one process: split-half reliability, the correlation between two disjoint
   halves of one language's prompts over random splits, and beside it a half of one language
   against a half of the other of the same sizes (the like-for-like comparison; halves correlate
   less than whole sets, being smaller);
3) by chance: with the heads paired at random (one language's frequencies permuted over heads);
4) if the languages used heads alike: with the prompts' language labels shuffled (the two sets'
   sizes kept). ``p_shuffled`` is the share of shuffles whose correlation is as low as the
   observed one: a permutation test of "both languages use the heads alike".

Usage is ``[n_prompts, n_components]``: whether each prompt's route uses each head (any per-prompt
on/off usage works, neurons too). Every reference is a spread over seeded random draws (resamples,
splits, permutations), summarised as its mean and central 95% (:class:`Spread`).

Cost: ``n_boot + 3 * n_splits + 2 * n_perm`` correlations of frequency vectors, each frequency one
row of a ``[draws, n_prompts] @ [n_prompts, n_components]`` product: 0.06 s of one thread for 336
heads (the paper's Qwen2) and 100 prompts per language.

>>> comparison = compare(flow.head_usage(model, {"en": en, "zh": zh}))   # doctest: +SKIP
>>> comparison.frame                                                       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import astuple, dataclass

import pandas as pd
import torch

from lsa import bootstrap

N_SPLITS = 200  # random half splits per language
N_PERM = 1000  # permutations of heads, and shuffles of the language labels


@dataclass(frozen=True)
class Spread:
    """A statistic over random draws: its ``mean`` and the central 95% (``low``, ``high``; NaN draws dropped)."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: torch.Tensor) -> Spread:
        v = values[torch.isfinite(values)]
        return cls(float(v.mean()) if len(v) else float("nan"), *bootstrap.interval(v.numpy()))


def correlations(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``x`` with the same row of ``y`` (``[k, m]`` each): ``[k]``.

    NaN where either row is constant.
    """
    xc = x.double() - x.double().mean(-1, keepdim=True)
    yc = y.double() - y.double().mean(-1, keepdim=True)
    den = (xc.square().sum(-1) * yc.square().sum(-1)).sqrt()
    return torch.where(den > 0, (xc * yc).sum(-1) / den, torch.nan)


def frequencies(usage: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Each draw's frequencies: the mean of ``usage [n, m]`` over the rows ``rows [k, s]`` (repeats count): ``[k, m]``."""
    counts = torch.zeros(rows.shape[0], usage.shape[0], dtype=torch.float64)
    counts.scatter_add_(1, rows, torch.ones(rows.shape, dtype=torch.float64))
    return counts @ usage.double() / rows.shape[1]


def permutations(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[k, n]``: ``k`` random orders of ``0..n-1`` (seeded)."""
    return torch.rand(k, n, generator=torch.Generator().manual_seed(seed)).argsort(-1)


def split_half(usage: torch.Tensor, n_splits: int = N_SPLITS, seed: int = 0) -> torch.Tensor:
    """Correlation of the frequencies of two disjoint random halves of ``usage [n, m]``, per split: ``[n_splits]``.

    Each half holds ``n // 2`` prompts (one is left out when ``n`` is odd).
    """
    half = _half(usage)
    order = permutations(len(usage), n_splits, seed)
    return correlations(frequencies(usage, order[:, :half]), frequencies(usage, order[:, half : 2 * half]))


def across_halves(a: torch.Tensor, b: torch.Tensor, n_splits: int = N_SPLITS, seed: int = 0) -> torch.Tensor:
    """Correlation of a random half of ``a`` with a random half of ``b`` (the sizes of :func:`split_half`): ``[n_splits]``."""
    rows = [permutations(len(u), n_splits, seed + i)[:, : _half(u)] for i, u in enumerate((a, b))]
    return correlations(frequencies(a, rows[0]), frequencies(b, rows[1]))


def _half(usage: torch.Tensor) -> int:
    if len(usage) < 2:
        raise ValueError(f"split halves need at least 2 prompts, got {len(usage)}")
    return len(usage) // 2


def bootstrap_correlation(a: torch.Tensor, b: torch.Tensor, n_boot: int = bootstrap.N_BOOT, seed: int = 0):
    """The correlation of ``a``'s and ``b``'s frequencies over ``n_boot`` resamples of each one's prompts: ``[n_boot]``."""
    idx_a = bootstrap.resamples(len(a), n_boot, seed)
    idx_b = bootstrap.resamples(len(b), n_boot, seed + 1)
    return correlations(frequencies(a, idx_a), frequencies(b, idx_b))


def heads_paired_at_random(a: torch.Tensor, b: torch.Tensor, n_perm: int = N_PERM, seed: int = 0) -> torch.Tensor:
    """The correlation of ``a``'s frequencies with ``b``'s permuted over the heads (columns): ``[n_perm]``."""
    fa, fb = a.double().mean(0), b.double().mean(0)
    return correlations(fa.expand(n_perm, -1), fb[permutations(len(fb), n_perm, seed)])


def shuffled_languages(a: torch.Tensor, b: torch.Tensor, n_perm: int = N_PERM, seed: int = 0) -> torch.Tensor:
    """The correlation with the prompts of ``a`` and ``b`` pooled and dealt at random into sets of their sizes: ``[n_perm]``."""
    pooled = torch.cat([a, b]).double()
    order = permutations(len(pooled), n_perm, seed)
    return correlations(frequencies(pooled, order[:, : len(a)]), frequencies(pooled, order[:, len(a) :]))


def p_at_most(null: torch.Tensor, observed: float) -> float:
    """Permutation p-value of a statistic as low as ``observed``: ``(1 + #{null <= observed}) / (1 + #null)``
    over the finite ``null`` draws (the observed arrangement counts as one draw); NaN if ``observed`` is."""
    null = null[torch.isfinite(null)]
    if observed != observed:
        return float("nan")
    return float((1 + (null <= observed).sum()) / (1 + len(null)))


@dataclass
class FrequencyComparison:
    """The correlation of two languages' head frequencies beside its references (module docstring).

    ``observed``: on all prompts, with its 95% bootstrap interval ``ci``; ``split_half``: per language;
    ``halves``: a half of one language against a half of the other; ``chance``: heads paired at
    random; ``shuffled``: language labels shuffled, and ``p_shuffled`` the share of shuffles (plus the
    observed one) whose correlation is at most ``observed``.
    """

    languages: tuple[str, str]
    n_prompts: tuple[int, int]
    observed: float
    ci: tuple[float, float]
    split_half: dict[str, Spread]
    halves: Spread
    chance: Spread
    shuffled: Spread
    p_shuffled: float

    @property
    def frame(self) -> pd.DataFrame:
        """One row per correlation: ``reference, correlation, low, high, spread`` (what low and high are)."""
        a, b = self.languages
        over = "mean and central 95% over random "
        rows = [(f"{a} vs {b}, all prompts", self.observed, *self.ci, "estimate and 95% bootstrap interval")]
        rows += [(f"two halves of {lang}", *astuple(s), over + "splits") for lang, s in self.split_half.items()]
        rows += [(f"a half of {a} vs a half of {b}", *astuple(self.halves), over + "splits")]
        rows += [("languages shuffled across prompts", *astuple(self.shuffled), over + "shuffles")]
        rows += [("heads paired at random", *astuple(self.chance), over + "permutations")]
        return pd.DataFrame(rows, columns=["reference", "correlation", "low", "high", "spread"])


def compare(
    usage: Mapping[str, torch.Tensor],
    a: str = "en",
    b: str = "zh",
    *,
    n_boot: int = bootstrap.N_BOOT,
    n_splits: int = N_SPLITS,
    n_perm: int = N_PERM,
    seed: int = 0,
) -> FrequencyComparison:
    """Languages ``a`` and ``b`` of ``usage`` (``{language: [n, ...]}``, e.g. :func:`lsa.flow.head_usage`;
    a head counts as used where its value is above 0) compared, with every reference of the module docstring."""
    missing = [lang for lang in (a, b) if lang not in usage]
    if missing:
        raise ValueError(f"no usage for {', '.join(map(repr, missing))}; have {sorted(usage)}")
    ua, ub = ((usage[lang] > 0).flatten(1).double() for lang in (a, b))
    observed = float(correlations(ua.mean(0)[None], ub.mean(0)[None])[0])
    shuffled = shuffled_languages(ua, ub, n_perm, seed)
    return FrequencyComparison(
        languages=(a, b),
        n_prompts=(len(ua), len(ub)),
        observed=observed,
        ci=bootstrap.interval(bootstrap_correlation(ua, ub, n_boot, seed).numpy()),
        split_half={lang: Spread.of(split_half(u, n_splits, seed)) for lang, u in ((a, ua), (b, ub))},
        halves=Spread.of(across_halves(ua, ub, n_splits, seed)),
        chance=Spread.of(heads_paired_at_random(ua, ub, n_perm, seed)),
        shuffled=Spread.of(shuffled),
        p_shuffled=p_at_most(shuffled, observed),
    )
