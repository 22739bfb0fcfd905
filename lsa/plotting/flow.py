"""Figures of information-flow results: a route and head activation frequency.

Each function takes a result (a route graph from :func:`lsa.flow.route`, a
frequency frame from :func:`lsa.flow.head_frequency`), never a model, and returns
the matplotlib figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
import pandas as pd

from lsa.plotting import whiskers

KIND_COLOURS = {"attn": "tab:blue", "attn+residual": "tab:blue", "residual": "0.6", "ffn": "tab:orange"}


MAX_ROUTE_SIZE = (16.0, 12.0)  # inches: a route figure is never larger (30-layer models included)
QUIET = 0.3  # height of a layer the route only passes through on the residual (a working layer: 2)


def _working_layers(graph: nx.DiGraph) -> set[int]:
    """Layers where the route does more than pass the residual on: an attention head or the FFN on one of its edges."""
    return {v[0] for _, v, data in graph.edges(data=True) if data["kind"] != "residual" and v[2] != "embed"}


def layer_bands(graph: nx.DiGraph, n_layers: int, compress: bool = True) -> tuple[list[float], list[float]]:
    """``(bottom, height)`` of each layer's band in a route figure (the embedding row sits at 0).

    A layer's band is 2 high; with ``compress`` a layer the route crosses only on the
    residual stream (no head and no FFN above tau) is :data:`QUIET` high, so deep
    models keep their working layers readable.
    """
    working = _working_layers(graph)
    heights = [2.0 if not compress or layer in working else QUIET for layer in range(n_layers)]
    bottoms, y = [], 0.0
    for h in heights:
        bottoms.append(y)
        y += h
    return bottoms, heights


def _xy(node, parallel: bool, bands) -> tuple[float, float]:
    layer, position, kind = node
    if kind == "embed":
        return float(position), 0.0
    share = {"mid": 0.5, "ffn": 0.75, "post": 1.0}[kind] if not parallel else {"ffn": 0.5, "post": 1.0}[kind]
    x = position + (0.25 if kind == "ffn" else 0.0)
    bottoms, heights = bands
    return x, bottoms[layer] + share * heights[layer]


def plot_route(graph: nx.DiGraph, *, ax=None, max_width: float = 6.0, title: str | None = None, compress: bool = True):
    """Draw a route: tokens on x, layers on y (embedding at the bottom), edge width = importance.

    Attention edges are blue (labelled with their heads where one head dominates),
    residual edges grey, FFN edges orange; the output node is marked in red. With
    ``compress`` (default) layers the route crosses only on the residual stream are
    thin bands (:func:`layer_bands`) ticked in grey, and the figure is at most
    :data:`MAX_ROUTE_SIZE` inches.
    """
    tokens = graph.graph.get("tokens", [])
    parallel = graph.graph.get("parallel", False)
    n_layers = graph.graph.get("n_layers", 1 + max((n[0] for n in graph.nodes), default=0))
    bands = layer_bands(graph, n_layers, compress)
    top = bands[0][-1] + bands[1][-1]
    if ax is None:
        width = min(MAX_ROUTE_SIZE[0], max(4.0, 0.9 * len(tokens) + 1.5))
        fig, ax = plt.subplots(figsize=(width, min(MAX_ROUTE_SIZE[1], 1.0 + 0.55 * top)))
    else:
        fig = ax.figure
    for u, v, data in graph.edges(data=True):
        (x0, y0), (x1, y1) = _xy(u, parallel, bands), _xy(v, parallel, bands)
        ax.plot([x0, x1], [y0, y1], color=KIND_COLOURS[data["kind"]], lw=0.5 + max_width * data["weight"], alpha=0.75)
        heads = data.get("heads", {})
        if heads and u[1] != v[1]:
            best = max(heads, key=heads.get)
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{v[0]}.{best}", fontsize=7, color="tab:blue", ha="center")
    for node in graph.nodes:
        x, y = _xy(node, parallel, bands)
        ax.scatter(
            [x], [y], s=14 if node[2] != "ffn" else 22, color="black" if node[2] != "ffn" else "tab:orange", zorder=3
        )
    end = graph.graph.get("position")
    if end is not None:
        ax.scatter(*_xy((n_layers - 1, end, "post"), parallel, bands), s=60, color="tab:red", zorder=4)
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels(tokens, rotation=45, ha="right")
    tops = [b + h for b, h in zip(*bands)]
    working = _working_layers(graph) if compress else set(range(n_layers))
    ticks = [(0.0, "embed")] + [(tops[la], f"L{la}") for la in range(n_layers) if la in working or la == n_layers - 1]
    ax.set_yticks([y for y, _ in ticks], [label for _, label in ticks])
    quiet = [tops[la] for la in range(n_layers) if la not in working]
    ax.hlines([tops[la] for la in working], -0.5, len(tokens) - 0.5, color="0.9", lw=0.6, zorder=0)
    ax.hlines(quiet, -0.5, len(tokens) - 0.5, color="0.96", lw=0.4, zorder=0)
    ax.set_xlim(-0.5, max(len(tokens), 1) - 0.5)
    ax.set_ylim(-0.5, top + 0.5)
    tau = graph.graph.get("tau")
    pred = graph.graph.get("prediction")
    hidden = n_layers - len(working)
    note = f"; {hidden} layers only pass the residual (thin bands)" if compress and hidden else ""
    ax.set_title(title or f"route of the prediction {pred!r} at position {end} (tau={tau}){note}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_head_frequency(freq: pd.DataFrame, languages: list[str] | None = None, *, cmap: str = "viridis"):
    """Side-by-side heatmaps (layer x head), one per language, of head activation frequency."""
    languages = languages or list(dict.fromkeys(freq["language"]))
    n_layers, n_heads = int(freq["layer"].max()) + 1, int(freq["head"].max()) + 1
    panel = max(1.8, 0.35 * n_heads)  # inches per language: room for the head ticks with few heads
    fig, axes = plt.subplots(
        1, len(languages), sharey=True, figsize=(panel * len(languages) + 2, min(0.3 * n_layers + 1.5, 12))
    )
    axes = np.atleast_1d(axes)
    image = None
    for ax, language in zip(axes, languages):
        grid = freq[freq["language"] == language].pivot_table(index="layer", columns="head", values="frequency")
        grid = grid.reindex(index=range(n_layers), columns=range(n_heads))
        image = ax.imshow(grid.values, vmin=0, vmax=1, cmap=cmap, origin="lower", aspect="auto")
        ax.set_title(language)
        ax.set_xlabel("head")
        ax.set_xticks(range(0, n_heads, max(1, n_heads // 8)))
    axes[0].set_ylabel("layer")  # shared: one label, not one over each neighbour's ticks
    fig.colorbar(image, ax=list(axes), label="share of routes using the head")
    return fig


def plot_frequency_scatter(freq: pd.DataFrame, a: str = "en", b: str = "zh", *, n_label: int = 5, ax=None):
    """Head frequency in language ``a`` vs ``b``; the ``n_label`` heads that differ most are labelled ``layer.head``."""
    from lsa.flow import compare_frequency

    wide = compare_frequency(freq, a, b)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
    else:
        fig = ax.figure
    ax.scatter(wide[a], wide[b], s=14, alpha=0.7)
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
    for _, row in wide.head(n_label).iterrows():
        ax.annotate(
            f"{int(row['layer'])}.{int(row['head'])}",
            (row[a], row[b]),
            fontsize=8,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel(f"frequency ({a})")
    ax.set_ylabel(f"frequency ({b})")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"head activation frequency, r = {wide.attrs['correlation']:.2f}")
    fig.tight_layout()
    return fig


def plot_frequency_comparison(frame: pd.DataFrame, *, ax=None):
    """The cross-language correlation of head frequency beside its references, one row each.

    ``frame``: :attr:`lsa.frequency.FrequencyComparison.frame`. Each row is a point with its
    interval or spread (``low`` to ``high``); the first row's value is repeated as a dotted line.
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(frame) + 1.2))
    else:
        fig = ax.figure
    y = np.arange(len(frame))[::-1]
    values = frame["correlation"].to_numpy()
    ax.errorbar(values, y, xerr=whiskers(values, frame["low"], frame["high"]), fmt="o", capsize=4, color="tab:blue")
    ax.axvline(values[0], color="tab:blue", lw=0.8, ls=":")
    ax.axvline(0, color="0.6", lw=0.8, ls="--", zorder=0)
    ax.set_yticks(y, frame["reference"])
    ax.set_xlim(min(-0.1, np.nanmin(frame["low"]) - 0.05), 1.02)
    ax.set_xlabel("correlation of head activation frequencies")
    ax.set_title("head frequency: observed vs same-process and chance references (95%)", fontsize=10)
    fig.tight_layout()
    return fig
