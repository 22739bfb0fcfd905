"""Figures of circuits (each takes circuits or result tables, never a model).

:func:`draw` is the circuit diagram of the paper's Figures 2 and 3: layers from
bottom to top, heads as nodes along each layer, components filled by role,
edges drawn with width by |effect|; two circuits overlay in two colours with
shared components ringed in both.

>>> fig = draw([en_circuit, zh_circuit], labels=["en", "zh"])     # doctest: +SKIP
>>> lsa.plotting.save(fig, output_dir, "circuit_en_vs_zh")          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, Patch

from lsa.circuits import LOGITS, Circuit
from lsa.plotting import whiskers

ROLE_COLOURS = {
    "name mover": "#66c2a5",
    "negative name mover": "#fc8d62",
    "S-inhibition": "#8da0cb",
    "induction": "#e78ac3",
    "duplicate token": "#a6d854",
    "previous token": "#ffd92f",
    "copy": "#e5c494",
    "copy suppression": "#fb9a99",
    "past tense": "#cab2d6",
    "direct (attends S)": "#bebada",
    "direct": "#d9d9d9",
    "unclassified": "#f7f7f7",
}
CIRCUIT_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
EDGE_STYLES = {"q": "-", "k": "--", "v": ":", "mlp": "-.", LOGITS: "-"}


def role_colour(role: str) -> str:
    if role in ROLE_COLOURS:
        return ROLE_COLOURS[role]
    palette = sns.color_palette("pastel", 10).as_hex()
    return palette[sum(map(ord, role or "?")) % len(palette)]


MAX_SIZE = (12.0, 9.0)  # inches: a circuit diagram is never larger (30-layer models included)
GAP = 0.45  # height of a run of layers without a component, in layer rows


def layer_rows(used: set[int], n_layers: int, compress: bool = True) -> tuple[dict[int, float], list]:
    """Vertical place of each layer and the y ticks ``[(y, label)]`` of a circuit diagram.

    Without ``compress`` layer ``l`` sits at ``y = l``. With it, layers holding a
    component are one row apart and each run of layers without one shares a single
    band of height :data:`GAP` (its layers at the band's middle), ticked ``"L3-9"``;
    so a 30-layer model with components in 5 layers is 5 rows and a few bands tall.
    """
    if not compress or not used:
        return {la: float(la) for la in range(n_layers)}, [(float(la), f"L{la}") for la in range(n_layers)]
    rows, ticks, bottom, la = {}, [], 0.0, 0  # bottom: where the next row or band starts
    while la < n_layers:
        end = la
        if la not in used:
            while end + 1 < n_layers and end + 1 not in used:
                end += 1
        height = 1.0 if la in used else GAP
        centre = bottom + height / 2
        rows.update({skipped: centre for skipped in range(la, end + 1)})
        ticks.append((centre, f"L{la}" if end == la else f"L{la}-{end}"))
        bottom, la = bottom + height, end + 1
    return rows, ticks


def _position(key: tuple, n_heads: int, rows: dict[int, float], group: int = 1) -> tuple[float, float]:
    """``(x, y)`` of a node: heads at ``(head, row of its layer)``, MLPs and neurons right of the heads, a
    key/value head below its group's query heads, the embeddings below layer 0 and the logits on top."""
    if key == (LOGITS,):
        return (n_heads - 1) / 2, max(rows.values(), default=-1.0) + 1.0
    if key == ("embed",):
        return (n_heads - 1) / 2, min(rows.values(), default=0.0) - 1.0
    if key[0] == "head":
        return float(key[2]), rows[key[1]]
    if key[0] == "kv":
        return (key[2] + 0.5) * group - 0.5, rows[key[1]] - 0.3
    x = n_heads + 0.3 if key[0] == "mlp" else n_heads + 0.3 + 0.15 * (key[2] % 5)
    return x, rows[key[1]] + 0.3


def _layer(key: tuple) -> int | None:
    return None if key in ((LOGITS,), ("embed",)) else key[1]


def strongest(circuit: Circuit, most: int) -> Circuit:
    """The circuit with its ``most`` edges of largest |effect| and their ends alone (to draw a large edge circuit)."""
    if len(circuit.edges) <= most:
        return circuit
    edges = sorted(circuit.edges, key=lambda e: -abs(e.effect or 0.0))[:most]
    ends = {k for e in edges for k in (e.sender, e.receiver)}
    return dataclasses.replace(circuit, edges=edges, components=[c for c in circuit.components if c.key in ends])


def draw(
    circuits: Circuit | Sequence[Circuit],
    labels: Sequence[str] | None = None,
    *,
    ax=None,
    title: str | None = None,
    overlay: bool | None = None,
    min_width: float = 0.5,
    max_width: float = 5.0,
    compress: bool = True,
):
    """The circuit diagram of one circuit, or of several of one shape overlaid (shared components ringed).

    Nodes: every head of the model as a grey dot; a circuit's component as a
    disc ringed in the circuit's colour and filled by its role in that circuit
    (shared components: nested discs, outermost = first circuit); MLPs and
    neurons as squares right of the heads. Edges: width by |effect|, line style by
    receiver input (q solid, k dashed, v dotted); one circuit: colour by the
    sign of the effect (blue = supports the behaviour, red = opposes); several:
    colour by circuit. ``overlay`` (default: when all circuits come from one model)
    puts them on one diagram; otherwise each gets its own panel, side by side
    (head indices of different models do not correspond).

    ``compress`` (default): only layers that hold a component get a row; each run of
    layers without one is a thin band ticked ``"L3-9"`` (:func:`layer_rows`), so deep
    models (SmolLM2: 30 layers) stay readable. The figure is at most
    :data:`MAX_SIZE` inches.
    """
    circuits = [circuits] if isinstance(circuits, Circuit) else list(circuits)
    if not circuits:
        raise ValueError("draw needs at least one circuit")
    labels = list(labels) if labels is not None else [c.language or c.model for c in circuits]
    if len(labels) != len(circuits):
        raise ValueError(f"{len(labels)} labels for {len(circuits)} circuits")
    shapes = {(c.n_layers, c.n_heads) for c in circuits}
    if overlay is None:
        overlay = len(shapes) == 1 and len({c.model for c in circuits}) == 1
    if overlay and len(shapes) > 1:
        raise ValueError(f"circuits of different shapes {sorted(shapes)} cannot be overlaid")
    if not overlay and len(circuits) > 1:
        return _side_by_side(circuits, labels, ax, title, compress)
    diagram = _Diagram(circuits, compress)
    if ax is None:
        width = min(MAX_SIZE[0], max(5.0, 1.0 * diagram.n_heads + 3.5))
        fig, ax = plt.subplots(figsize=(width, min(MAX_SIZE[1], max(4.0, 0.9 * diagram.span + 2.0))))
    else:
        fig = ax.figure
    ly = diagram.grid(ax)
    _edges(ax, circuits, diagram, min_width, max_width)
    members, roles_seen = _components(ax, circuits, diagram)
    _axes(ax, diagram, members, ly)
    _legend(ax, circuits, labels, members, roles_seen)
    if not members:
        ax.text((diagram.n_heads - 1) / 2, ly / 2, "empty circuit", ha="center", color="grey")
    ax.set_title(title or " vs ".join(f"{lab}" for lab in labels) + f" ({circuits[0].task or 'circuit'})")
    fig.tight_layout()
    return fig


def _side_by_side(circuits: list[Circuit], labels: list[str], ax, title, compress: bool):
    """One panel per circuit (circuits of different models: their head indices do not correspond)."""
    if ax is not None:
        raise ValueError("circuits drawn side by side make their own axes; do not pass ax")
    fig, axes = plt.subplots(1, len(circuits), figsize=(min(5.5 * len(circuits), 2 * MAX_SIZE[0]), 5.5))
    for i, (c, lab) in enumerate(zip(circuits, labels)):
        draw(c, [lab], ax=axes[i], title=f"{lab}: {c.model}", compress=compress)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


class _Diagram:
    """Where a diagram puts layers (rows, :func:`layer_rows`) and heads (columns), for circuits of one shape."""

    def __init__(self, circuits: list[Circuit], compress: bool):
        self.n_layers, self.n_heads = circuits[0].n_layers, circuits[0].n_heads
        kv = (k[2] + 1 for c in circuits for e in c.edges for k in (e.receiver,) if k[0] == "kv")
        self.group = self.n_heads // max(1, max(kv, default=self.n_heads))
        ends = [k for c in circuits for e in c.edges for k in (e.sender, e.receiver)]
        self.used = {_layer(k) for k in [*(comp.key for c in circuits for comp in c.components), *ends]} - {None}
        self.compress = compress
        self.rows, self.ticks = layer_rows(self.used, self.n_layers, compress)
        self.span = max(self.rows.values(), default=0.0) - min(self.rows.values(), default=0.0) + 1.0

    def at(self, key: tuple) -> tuple[float, float]:
        return _position(key, self.n_heads, self.rows, self.group)

    def grid(self, ax) -> float:
        """Every head of the shown layers as a grey dot, and the logits; returns the logits' row."""
        shown = sorted(self.used) if self.compress and self.used else range(self.n_layers)
        grid = np.array([(h, self.rows[la]) for la in shown for h in range(self.n_heads)])
        ax.scatter(grid[:, 0], grid[:, 1], s=60, c="#dddddd", zorder=1)
        lx, ly = _position((LOGITS,), self.n_heads, self.rows)
        ax.scatter([lx], [ly], marker="s", s=400, c="#444444", zorder=3)
        ax.annotate("logits", (lx, ly), ha="center", va="center", color="white", fontsize=8, zorder=4)
        return ly


def _edges(ax, circuits: list[Circuit], diagram: _Diagram, min_width: float, max_width: float) -> None:
    """Every circuit's edges: width by |effect|, style by receiver input, colour by sign (one circuit) or circuit."""
    effects = [abs(e.effect) for c in circuits for e in c.edges if e.effect is not None]
    top = max(effects) if effects else 1.0
    top = top if top > 0 else 1.0
    several = len(circuits) > 1
    offsets = np.linspace(-0.08, 0.08, len(circuits)) if several else [0.0]
    for i, c in enumerate(circuits):
        for e in c.edges:
            (x0, y0), (x1, y1) = diagram.at(e.sender), diagram.at(e.receiver)
            width = min_width + (max_width - min_width) * (abs(e.effect) / top if e.effect is not None else 0.2)
            colour = CIRCUIT_COLOURS[i % 4] if several else ("#1f4e9c" if (e.effect or 0) <= 0 else "#c0392b")
            ax.add_patch(
                FancyArrowPatch(
                    (x0 + offsets[i], y0),
                    (x1 + offsets[i], y1),
                    arrowstyle="-|>",
                    mutation_scale=10,
                    lw=width,
                    ls=EDGE_STYLES[e.kind],
                    color=colour,
                    alpha=0.6,
                    shrinkA=9,
                    shrinkB=11,
                    connectionstyle="arc3,rad=0.08",
                    zorder=2,
                )
            )


def _components(ax, circuits: list[Circuit], diagram: _Diagram) -> tuple[dict[tuple, list[int]], list]:
    """Every component as nested discs (one per circuit holding it, outermost first, filled by its role);
    returns the circuits holding each component and the roles shown."""
    members: dict[tuple, list[int]] = {}
    for i, c in enumerate(circuits):
        for comp in c.components:
            members.setdefault(comp.key, []).append(i)
    roles_seen = []
    for key, which in members.items():
        x, y = diagram.at(key)
        marker = "o" if key[0] == "head" else "s"
        for ring, i in enumerate(which):
            role = circuits[i].get(key).role
            roles_seen += [role] if role not in roles_seen else []
            size = 420 + 300 * (len(which) - 1 - ring)
            ax.scatter(
                [x],
                [y],
                s=size,
                marker=marker,
                c=role_colour(role),
                edgecolors=CIRCUIT_COLOURS[i % 4],
                linewidths=2.5,
                zorder=5 + ring,
            )
        ax.annotate(circuits[which[0]].get(key).name, (x, y), ha="center", va="center", fontsize=7, zorder=10)
    return members, roles_seen


def _axes(ax, diagram: _Diagram, members: dict, ly: float) -> None:
    """Layer ticks (bands of empty layers in grey), head ticks, limits, no top or right spine."""
    ax.set_yticks([y for y, _ in diagram.ticks], [label for _, label in diagram.ticks])
    for tick, (_, label) in zip(ax.get_yticklabels(), diagram.ticks):
        if "-" in label or (diagram.compress and diagram.used and int(label[1:]) not in diagram.used):
            tick.set_color("grey")
            tick.set_fontsize(7)
    n_heads, rows = diagram.n_heads, diagram.rows
    ax.set_xticks(range(n_heads))
    ax.set_xticklabels([f"H{h}" for h in range(n_heads)])
    ax.set_xlim(-0.8, n_heads + (1.2 if any(k[0] != "head" for k in members) else -0.2))
    ax.set_ylim(min(rows.values(), default=0.0) - (1.5 if ("embed",) in members else 0.7), ly + 0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _legend(ax, circuits: list[Circuit], labels: list[str], members: dict, roles_seen: list) -> None:
    handles = [Patch(facecolor=role_colour(r), label=r or "no role") for r in roles_seen]
    if len(circuits) > 1:
        handles += [
            Line2D([], [], marker="o", ls="", mfc="white", mec=CIRCUIT_COLOURS[i % 4], mew=2.5, ms=10, label=lab)
            for i, lab in enumerate(labels)
        ]
        shared = sum(len(w) == len(circuits) for w in members.values())
        handles.append(Line2D([], [], ls="", label=f"shared by all: {shared}"))
    kinds = [k for k in ("q", "k", "v", "mlp") if any(e.kind == k for c in circuits for e in c.edges)]
    handles += [Line2D([], [], color="grey", ls=EDGE_STYLES[k], label=f"via {k}") for k in kinds or ("q", "k", "v")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)


def _receivers_title(step, kind: str, receivers: str, width: int = 30, most: int = 4) -> str:
    """``"step 2 (q): -> 9.1, 9.6, 10.0, 10.7 +3 more"``, wrapped to ``width`` characters a line."""
    names = [r.strip() for r in str(receivers).split(",") if r.strip()]
    shown = ", ".join(names[:most]) + (f" +{len(names) - most} more" if len(names) > most else "")
    head = f"step {step}" + ("" if kind == LOGITS else f" ({kind})")
    return textwrap.fill(f"{head}: -> {shown}", width)


def step_effects(steps: pd.DataFrame, value: str = "effect", *, columns: int = 4):
    """Heatmaps ``[layer, head]`` of each discovery step's normalised effects (one panel per step and input).

    ``steps``: :attr:`lsa.circuits.Discovery.steps`. Selected heads are boxed.
    Panels fill rows of at most ``columns``; each title names at most four receivers
    (``+k more``) on wrapped lines, so titles never run into each other; the figure
    is at most 16 x 12 inches (deep models get fewer layer ticks).
    """
    if steps is None or not len(steps):
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no discovery steps", ha="center", va="center")
        ax.axis("off")
        return fig
    order = {kind: i for i, kind in enumerate((LOGITS, "q", "k", "v"))}
    panels = sorted(steps.groupby(["step", "receiver_input"]), key=lambda p: (p[0][0], order.get(p[0][1], 9)))
    n_layers, n_heads = int(steps["layer"].max()) + 1, int(steps["head"].max()) + 1
    ncols = max(1, min(columns, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    panel_height = min(6.0, 0.22 * n_layers + 1.6)
    size = (min(16.0, (0.25 * n_heads + 2.2) * ncols + 1.5), min(12.0, panel_height * nrows + 0.6))
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False, layout="constrained")
    lim = float(np.nanmax(np.abs(steps[value].to_numpy()))) or 1.0
    every = max(1, math.ceil(n_layers / 16))
    im = None
    for ax, ((step, kind), frame) in zip(axes.flat, panels):
        grid = np.full((n_layers, n_heads), np.nan)
        for r in frame.itertuples():
            grid[int(r.layer), int(r.head)] = getattr(r, value)
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower", aspect="auto")
        for r in frame[frame["selected"]].itertuples():
            ax.add_patch(plt.Rectangle((r.head - 0.5, r.layer - 0.5), 1, 1, fill=False, ec="black", lw=2))
        ax.set_title(_receivers_title(step, kind, frame["receivers"].iloc[0]), fontsize=8)
        ax.set_xlabel("head", fontsize=8)
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(0, n_layers, every))
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("layer")
    fig.colorbar(
        im,
        ax=list(axes.flat),
        shrink=0.8,
        label=textwrap.fill(f"normalised {value} (blue: carries the behaviour; boxed: selected)", 40),
    )
    return fig


def faithfulness_matrix(frame: pd.DataFrame, value: str = "normalized"):
    """Heatmap circuit x language of faithfulness (from :func:`lsa.circuits.faithfulness_table`)."""
    grid = frame.pivot_table(index="circuit", columns="language", values=value, aggfunc="mean")
    fig, ax = plt.subplots(figsize=(1.4 * grid.shape[1] + 2.5, 0.7 * grid.shape[0] + 1.6))
    sns.heatmap(
        grid, annot=True, fmt=".2f", cmap="viridis", vmin=0, vmax=max(1.0, float(np.nanmax(grid.to_numpy()))), ax=ax
    )
    ax.set_title(f"circuit faithfulness ({value}) by prompt language")
    ax.set_xlabel("prompts")
    ax.set_ylabel("circuit")
    fig.tight_layout()
    return fig


def overlap(matrix: pd.DataFrame, title: str = "circuit overlap (Jaccard)"):
    """Heatmap of a pairwise overlap matrix (from :func:`lsa.circuits.overlap_matrix`)."""
    fig, ax = plt.subplots(figsize=(0.9 * len(matrix) + 2.5, 0.8 * len(matrix) + 1.5))
    sns.heatmap(matrix.astype(float), annot=True, fmt=".2f", cmap="magma", vmin=0, vmax=1, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def curve(curves, *, target: float | None = 0.8, chosen=None, title: str | None = None):
    """Faithfulness curves (:class:`lsa.circuits.Curve`, by label) against the share of the model kept, each
    with its 95% interval as a band; the ``target`` line and the ``chosen`` circuits' sizes (edges or
    components, by label) marked. The title names the ablation and the prompts."""
    curves = {"": curves} if not isinstance(curves, dict) else curves
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for i, (label, c) in enumerate(curves.items()):
        frame = c.frame[c.frame["share"] > 0].sort_values("share")
        colour = CIRCUIT_COLOURS[i % 4]
        ax.plot(frame["share"], frame["normalized"], marker="o", ms=3, color=colour, label=label or None)
        ax.fill_between(frame["share"], frame["ci_low"], frame["ci_high"], color=colour, alpha=0.2, lw=0)
        size = (chosen or {}).get(label)
        if size is not None:
            unit = "edges" if c.level == "edges" else "size"
            row = frame.iloc[(frame[unit] - size).abs().argmin()]
            ax.scatter([row["share"]], [row["normalized"]], s=80, facecolors="none", edgecolors=colour, zorder=5)
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1)
        ax.text(ax.get_xlim()[0], target, f" target {target:g}", va="bottom", fontsize=8, color="grey")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel(
        "share of the model's " + ("edges" if next(iter(curves.values())).level == "edges" else "heads") + " kept"
    )
    ax.set_ylabel("normalised faithfulness")
    first = next(iter(curves.values()))
    n = first.metric.shape[1]
    ax.set_title(title or textwrap.fill(f"faithfulness on {n} held-out prompts; {first.ablation}", 60), fontsize=10)
    if any(curves):
        ax.legend(fontsize=8, frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def faithfulness_bars(frame: pd.DataFrame, target: float | None = 0.8):
    """Each circuit's faithfulness in each language with its 95% interval (rows of
    :func:`lsa.circuits.faithfulness_table`), the ablation in the title."""
    fig, ax = plt.subplots(figsize=(1.2 * len(frame) + 2.5, 3.6))
    labels = [f"{r.circuit}\non {r.language}" for r in frame.itertuples()]
    colours = [CIRCUIT_COLOURS[0] if r.own_language else CIRCUIT_COLOURS[1] for r in frame.itertuples()]
    err = whiskers(frame["normalized"], frame["ci_low"], frame["ci_high"])
    ax.bar(range(len(frame)), frame["normalized"], yerr=err, color=colours, capsize=4)
    ax.set_xticks(range(len(frame)), labels, fontsize=8)
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("normalised faithfulness")
    ablation = frame["ablation"].iloc[0] if "ablation" in frame and len(frame) else ""
    ax.set_title(textwrap.fill(f"held-out faithfulness (blue: own language); {ablation}", 60), fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def overlap_references(frame: pd.DataFrame, labels: tuple[str, str] = ("a", "b")):
    """Two circuits' overlap beside chance and resampling (:func:`lsa.circuits.edge_overlap`), edges and nodes."""
    fig, axes = plt.subplots(1, len(frame), figsize=(4.2 * len(frame), 3.4), squeeze=False)
    for ax, row in zip(axes[0], frame.itertuples()):
        names = ["observed", "across\nhalves", f"within\n{labels[0]}", f"within\n{labels[1]}", "chance"]
        values = [row.observed, row.across_halves, row.within_a, row.within_b, row.chance]
        ax.bar(range(5), values, color=["#1f77b4", "#6baed6", "#bdbdbd", "#bdbdbd", "#fdae6b"])
        ax.errorbar(
            [0], [row.observed], yerr=whiskers([row.observed], [row.ci_low], [row.ci_high]), color="black", capsize=4
        )
        chance = whiskers([row.chance], [row.chance], [row.chance_95])  # up to the null's 95th percentile
        ax.errorbar([4], [row.chance], yerr=chance, color="black", capsize=4)
        ax.set_xticks(range(5), names, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"Jaccard of {row.unit}", fontsize=10)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig
