"""Figures of language-specific neuron sets (a :class:`lsa.neurons.LapeResult`)."""

from __future__ import annotations

from lsa.neurons.selection import LapeResult


def plot_neurons_per_layer(result: LapeResult, ax=None):
    """Bar chart: language-specific neurons per layer, one bar per language."""
    import matplotlib.pyplot as plt

    counts = result.counts().pivot(index="layer", columns="language", values="n_neurons")[result.languages]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4, 0.5 * len(counts) + 2), 3))
    counts.plot.bar(ax=ax, width=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("language-specific neurons")
    ax.set_title("LAPE neurons per layer")
    return ax


def plot_overlap(result: LapeResult, ax=None):
    """Heatmap of neurons shared by each pair of languages (diagonal = set size)."""
    import matplotlib.pyplot as plt

    table = result.overlap()
    if ax is None:
        _, ax = plt.subplots(figsize=(1 + 0.8 * len(table), 0.8 + 0.7 * len(table)))
    im = ax.imshow(table.values, cmap="Blues")
    ax.set_xticks(range(len(table)), table.columns)
    ax.set_yticks(range(len(table)), table.index)
    for i in range(len(table)):
        for j in range(len(table)):
            ax.text(j, i, str(table.values[i, j]), ha="center", va="center")
    ax.figure.colorbar(im, ax=ax)
    ax.set_title("shared language-specific neurons")
    return ax
