"""Figures of ablation effects (:mod:`lsa.ablation_effects`): each takes a result table, never a model."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lsa.plotting import whiskers


def plot_relative_effects(effects: pd.DataFrame, *, title: str | None = None, ax=None):
    """Each prompt set's relative metric per condition, with its 95% interval as an error bar.

    ``effects``: :func:`lsa.ablation_effects.relative_effects`. Conditions on x, one marker colour per
    prompt set; dashed lines at 1 (unchanged) and 0 (no preference left). The title names the ablation.
    """
    conditions = list(dict.fromkeys(effects["condition"]))
    names = list(dict.fromkeys(effects["set"]))
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(conditions), 3.8))
    else:
        fig = ax.figure
    width = 0.6 / max(len(names), 1)
    for i, name in enumerate(names):
        rows = effects[effects["set"] == name].set_index("condition").reindex(conditions)
        value, lo, hi = (rows[c].to_numpy(float) for c in ("relative", "ci_low", "ci_high"))
        x = np.arange(len(conditions)) + (i - (len(names) - 1) / 2) * width
        ax.errorbar(x, value, yerr=whiskers(value, lo, hi), fmt="o", capsize=4, label=name)
    for level in (1, 0):
        ax.axhline(level, color="0.6", lw=0.8, ls="--", zorder=0)
    ax.set_xticks(range(len(conditions)), conditions)
    ax.set_xlim(-0.6, len(conditions) - 0.4)
    ax.set_ylabel("metric relative to the full model")
    ax.legend(title="prompts", fontsize=8)
    methods = sorted({text.split(" ablation of ")[0] for text in effects["ablation"]})
    ax.set_title(title or f"{' / '.join(methods)} ablation (95% bootstrap intervals)", fontsize=10)
    fig.tight_layout()
    return fig
