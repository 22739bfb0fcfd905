"""What ablating a set of components does to each prompt set, relative to the full model, with intervals.

For claims such as "these heads matter to English, not to Chinese" (the paper's past-tense head):
:func:`measure` ablates each set of components on each prompt set (:func:`lsa.ablation.ablate`,
interchange ablation unless told otherwise: each prompt's components take their values from its
own counterfactual), and from those per-prompt metrics

- :func:`relative_effects`: each prompt set's *relative metric*, ``mean ablated / mean clean``
  (1 = unchanged, 0 = no preference left, below 0 = the counterfactual's answer preferred), with a
  95% bootstrap interval over its prompts (:mod:`lsa.bootstrap`);
- :func:`gaps`: the *gap* between two prompt sets ``a`` and ``b``, ``relative(b) - relative(a)``
  (how much more ``a`` loses than ``b``), with an interval from resampling each set's prompts
  independently, with the same resamples as their own intervals.

Components chosen from data (the English-specific heads) must be chosen on other prompts than
these (:func:`lsa.splits.halves`). A prompt set whose mean clean metric is below
``min_logit_diff`` is not ablated: a ratio to a metric near zero means nothing.

Cost: per prompt set, one clean forward, and per set of components one forward of the
counterfactuals and one ablated forward.

>>> per_prompt = measure(model, {"en": en, "zh": zh}, {"late FFNs": [("mlp", 9), ("mlp", 10)]})   # doctest: +SKIP
>>> relative_effects(per_prompt)                                                                 # doctest: +SKIP
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from lsa import ablation, behaviour, bootstrap, metrics
from lsa.model import Model
from lsa.tasks import PromptSet

MIN_LOGIT_DIFF = 0.5  # a prompt set with a smaller mean clean logit difference has no relative effect
COLUMNS = ["set", "condition", "prompt", "clean", "ablated"]


def measure(
    model: Model,
    sets: Mapping[str, PromptSet],
    conditions: Mapping[str, Iterable],
    *,
    method: str = ablation.DEFAULT_METHOD,
    min_logit_diff: float = MIN_LOGIT_DIFF,
) -> pd.DataFrame:
    """The logit difference of every prompt, clean and with each condition's components ablated together.

    ``sets``: ``{name: PromptSet}``; ``conditions``: ``{label: components}`` (as
    :func:`lsa.ablation.ablate` takes them; an empty one is left out). Returns one row per
    prompt set, condition and prompt: ``set, condition, prompt, clean, ablated``; ``attrs``:
    ``method`` and ``skipped`` (``{name: mean clean metric}`` of the sets the model does not do).
    """
    ablation.check_method(method)
    rows, skipped = [], {}
    for name, prompts in sets.items():
        clean = metrics.logit_diff(behaviour.end_logits(model, prompts), prompts)
        if float(clean.mean()) < min_logit_diff:
            skipped[name] = float(clean.mean())
            continue
        for label, components in conditions.items():
            components = list(components)
            if not components:
                continue
            ablated = ablation.ablate(model, prompts, components, method=method)
            columns = (name, label, np.arange(len(prompts)), clean.numpy(), ablated.numpy())
            rows.append(pd.DataFrame(dict(zip(COLUMNS, columns))))
    frame = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=COLUMNS)
    frame.attrs.update(method=method, skipped=skipped)
    return frame


def _resampled(rows: pd.DataFrame, name: str, n_boot: int) -> np.ndarray:
    """The relative metric of one set's ``rows`` over ``n_boot`` resamples of its prompts: ``[n_boot]``.

    Seeded by the set's name, so every condition and every gap of a set use the same resamples.
    """
    clean, ablated = (torch.tensor(rows[c].to_numpy(), dtype=torch.float64) for c in ("clean", "ablated"))
    idx = bootstrap.resamples(len(rows), n_boot, seed=zlib.crc32(name.encode()))
    return bootstrap.normalized_means(ablated, clean, torch.zeros_like(clean), idx).numpy()  # empty = 0: a ratio


def relative_effects(per_prompt: pd.DataFrame, n_boot: int = bootstrap.N_BOOT) -> pd.DataFrame:
    """One row per prompt set and condition: ``set, condition, ablation`` (in words), ``prompts, clean,
    ablated`` (means), ``relative, ci_low, ci_high`` (95% bootstrap interval of ``relative``)."""
    method = per_prompt.attrs.get("method", ablation.DEFAULT_METHOD)
    rows = []
    for (name, label), group in per_prompt.groupby(["set", "condition"], sort=False):
        lo, hi = bootstrap.interval(_resampled(group, name, n_boot))
        clean, ablated = group["clean"].mean(), group["ablated"].mean()
        rows.append(
            {
                "set": name,
                "condition": label,
                "ablation": f"{method} ablation of {label}",
                "prompts": len(group),
                "clean": clean,
                "ablated": ablated,
                "relative": ablated / clean,
                "ci_low": lo,
                "ci_high": hi,
            }
        )
    return pd.DataFrame(rows)


def gaps(per_prompt: pd.DataFrame, a: str, b: str, n_boot: int = bootstrap.N_BOOT) -> pd.DataFrame:
    """One row per condition measured on both sets: ``condition, gap, ci_low, ci_high`` with
    ``gap = relative(b) - relative(a)`` (how much more set ``a`` loses) and its 95% bootstrap interval."""
    rows = []
    for label, group in per_prompt.groupby("condition", sort=False):
        by_set = {name: g for name, g in group.groupby("set")}
        if a not in by_set or b not in by_set:
            continue
        (ra, rb) = (by_set[s]["ablated"].mean() / by_set[s]["clean"].mean() for s in (a, b))
        diff = _resampled(by_set[b], b, n_boot) - _resampled(by_set[a], a, n_boot)
        lo, hi = bootstrap.interval(diff)
        rows.append({"condition": label, "a": a, "b": b, "gap": rb - ra, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=["condition", "a", "b", "gap", "ci_low", "ci_high"])
