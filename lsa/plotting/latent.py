"""Figures of latent-language results (:mod:`lsa.latent`): which language the layers' predictions are in.

Each function takes a result of :mod:`lsa.latent` (:func:`~lsa.latent.summarize`'s table or a
:class:`~lsa.latent.LatentLens`), never a model, and returns the matplotlib figure. Languages keep
one colour throughout (English orange, Chinese blue, as in Wendler et al.'s figures).
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd

COLOURS = {"en": "tab:orange", "zh": "tab:blue"}
STYLES = {"target": "-", "other": "--"}


def _colour(language: str) -> str:
    return COLOURS.get(language, "tab:gray")


def plot_curves(summary: pd.DataFrame, *, ncols: int = 2):
    """One panel per set: the median probability, after each layer, of the answer's first token in the target
    language (solid) and in the other language (dashed), each with its 95% interval over prompts shaded."""
    names = list(dict.fromkeys(summary["set"]))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 2.8 * nrows), squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names):
        part = summary[summary["set"] == name]
        for role, style in STYLES.items():
            curve = part[part["role"] == role].sort_values("layer")
            if len(curve):
                language = curve["language"].iloc[0]
                colour = _colour(language)
                ax.plot(curve["layer"], curve["median"], style, color=colour, label=f"{language} ({role})")
                ax.fill_between(curve["layer"], curve["low"], curve["high"], color=colour, alpha=0.2, lw=0)
        ax.set_title(f"{name} (n={int(part['n'].max())})", fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="upper left", fontsize=8)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("layer (-1 = embedding)")
    for ax in axes[:, 0]:
        ax.set_ylabel("probability")
    fig.tight_layout()
    return fig


def plot_entropy(result) -> plt.Figure:
    """Median entropy of the lens distribution (bits) and median token energy per layer, one line per set."""
    medians = result.layers.groupby(["set", "layer"], sort=False)[["entropy", "energy"]].median().reset_index()
    shown = [c for c in ("entropy", "energy") if medians[c].notna().any()]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3), squeeze=False)
    for ax, column in zip(axes[0], shown):
        for name, part in medians.groupby("set", sort=False):
            ax.plot(part["layer"], part[column], marker=".", label=name)
        ax.set_xlabel("layer (-1 = embedding)")
        ax.set_ylabel("entropy (bits)" if column == "entropy" else "token energy")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_prompt(result, name: str, prompt: int) -> plt.Figure:
    """One prompt of set ``name``: the probability of its target and other word per layer, each layer's top
    token written above the target's curve."""
    answers = result.answers[(result.answers["set"] == name) & (result.answers["prompt"] == prompt)]
    if not len(answers):
        raise ValueError(f"no prompt {prompt} in set {name!r}")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for role, style in STYLES.items():
        curve = answers[answers["role"] == role].sort_values("layer")
        if len(curve):
            label = f"{curve['language'].iloc[0]} ({role}): {curve['token'].iloc[0]!r}"
            ax.plot(
                curve["layer"], curve["prob"], style, marker="o", color=_colour(curve["language"].iloc[0]), label=label
            )
    top = result.top[(result.top["set"] == name) & (result.top["prompt"] == prompt) & (result.top["rank"] == 0)]
    for row in top.itertuples():
        ax.annotate(str(row.token), (row.layer, 1.0), fontsize=7, rotation=60, ha="left", va="bottom")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer (-1 = embedding); top token above")
    ax.set_ylabel("probability")
    ax.legend(loc="center left", fontsize=8)
    fig.tight_layout()
    return fig
