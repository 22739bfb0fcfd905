"""Bootstrap intervals over prompts: resample the prompts with replacement, recompute the statistic.

Every interval lsa reports on a number that rests on a sample of prompts (a circuit's faithfulness,
an overlap of two circuits, an ablation effect) is a percentile interval over :data:`N_BOOT`
resamples of those prompts, seeded, so the same data give the same interval.

>>> lo, hi = interval(ratio_of_means(num, den))            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

N_BOOT = 1000
LEVEL = 0.95


def resamples(n: int, n_boot: int = N_BOOT, seed: int = 0) -> torch.Tensor:
    """``[n_boot, n]`` row indices, each row a resample of ``n`` prompts with replacement."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one prompt")
    return torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed))


def interval(values, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``values`` (non-finite ones dropped; NaN if none)."""
    v = np.asarray(values, dtype=float).reshape(-1)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(v, [tail, 100 - tail])
    return float(lo), float(hi)


def normalized_means(part: torch.Tensor, full: torch.Tensor, empty: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``(mean part - mean empty) / (mean full - mean empty)`` over the rows ``idx`` ``[n_boot, n]`` of per-prompt values."""
    p, f, e = (x.double()[idx].mean(-1) for x in (part, full, empty))
    return (p - e) / (f - e)


def each(statistic: Callable[[torch.Tensor], float], n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``statistic(rows)`` for each resample's rows ``[n]`` (for statistics that do not vectorise)."""
    return np.array([statistic(rows) for rows in resamples(n, n_boot, seed)], dtype=float)
