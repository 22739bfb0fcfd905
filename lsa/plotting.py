"""Figures of results (each takes a result table, never a model) and saving them beside the run."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

VALUES = ("normalized", "effect", "metric")
ONE = "all"  # the column label of a one-dimensional patching result


def save(fig, output_dir: str | Path, name: str) -> Path:
    """Write a figure as PNG (for reports) and SVG; returns the PNG path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    png = output_dir / f"{name}.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    fig.savefig(output_dir / f"{name}.svg", bbox_inches="tight")
    return png


def behaviour(frame: pd.DataFrame):
    """Per-prompt behaviour (from :func:`lsa.behaviour.score`): logit difference by task and language, accuracy above."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    sns.boxplot(data=frame, x="task", y="logit_diff", hue="language", ax=axes[0])
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set_ylabel("logit(answer) - logit(distractor)")
    axes[0].set_title("clean prompts")
    acc = frame.groupby(["task", "language"])[["correct", "top1_correct"]].mean().reset_index()
    acc = acc.melt(id_vars=["task", "language"], var_name="measure", value_name="share")
    acc["group"] = acc["task"] + " / " + acc["language"]
    sns.barplot(data=acc, x="group", y="share", hue="measure", ax=axes[1])
    axes[1].set_ylim(0, 1.05)
    axes[1].set_xlabel("")
    axes[1].tick_params(axis="x", rotation=30)
    axes[1].set_title("accuracy")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- patching maps
def diverging_limits(values) -> tuple[float, float]:
    """Symmetric colour limits around 0 for a tensor / array of effects (NaNs ignored; at least +-1e-6)."""
    import numpy as np

    arr = np.asarray(values, dtype=float)
    finite = arr[np.isfinite(arr)]
    m = float(np.abs(finite).max()) if finite.size else 1.0
    m = max(m, 1e-6)
    return -m, m


def map_dims(result) -> tuple[str, str, str | None]:
    """``(row dim, column dim, extra dim or None)`` of a result's grid (column ``"-"`` for a 1-D grid)."""
    dims = tuple(result.dims)
    if len(dims) == 1:
        return dims[0], "-", None
    if len(dims) == 2:
        return dims[0], dims[1], None
    if len(dims) == 3:
        return dims[0], dims[1], dims[2]
    raise ValueError(f"cannot map a result with {len(dims)} dimensions {dims}")


def map_grid(result, value: str = "normalized", extra=None) -> tuple[torch.Tensor, list, list]:
    """The 2-D map of a result: ``(grid [rows, cols], row labels, column labels)``.

    ``value``: ``"normalized"``, ``"effect"`` or ``"metric"`` (means over prompts).
    A 1-D result is one column labelled ``"all"``; a 3-D result is sliced at the
    label ``extra`` of its last dimension.
    """
    if value not in VALUES:
        raise ValueError(f"value must be one of {VALUES}, got {value!r}")
    row, col, third = map_dims(result)
    grid = result.grid(value)
    if third is not None:
        labels = list(result.axes[third])
        if extra not in labels:
            raise ValueError(f"{third} {extra!r} is not in this result; it has {labels}")
        grid = grid[..., labels.index(extra)]
    if col == "-":
        return grid[:, None], list(result.axes[row]), [ONE]
    return grid, list(result.axes[row]), list(result.axes[col])


def axis_labels(result, dim: str, labels: list) -> list[str]:
    """Display labels of ``labels`` on a result's axis ``dim``.

    Positions of a :func:`lsa.patching.activation_patching` sweep show their tokens
    and named positions (``result.meta["pos_labels"]``, e.g. ``"3:Mary (IO)"``);
    anything else its label as text.
    """
    meta = getattr(result, "meta", None) or {}
    shown = meta.get(f"{dim}_labels")
    axis = list(getattr(result, "axes", {}).get(dim, []))
    if shown and len(shown) == len(axis):
        lookup = dict(zip(axis, shown))
        return [str(lookup.get(x, x)) for x in labels]
    return [str(x) for x in labels]


def map_figure(grids: dict, row_dim: str, col_dim: str, value: str, cell: tuple[int, int] | None = None, title=""):
    """Heatmaps (one per language) of ``{language: (grid [rows, cols], row labels, column labels)}``.

    Colours are symmetric around 0 (red = negative: towards the counterfactual); ``cell``
    (row index, column index) is outlined in every panel.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(grids)
    first = next(iter(grids.values()))
    rows, cols = first[0].shape
    width = min(16.0, n * (1.5 + 0.35 * cols) + 1.0)
    height = min(10.0, 1.5 + 0.3 * rows)
    fig, axes = plt.subplots(1, n, figsize=(width, height + 0.4), squeeze=False, layout="constrained")
    vmin, vmax = diverging_limits(torch.cat([g.flatten() for g, _, _ in grids.values()]))
    image = None
    for ax, (language, (grid, row_labels, col_labels)) in zip(axes[0], grids.items()):
        image = ax.imshow(grid.numpy(), cmap="RdBu", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_yticks(range(len(row_labels)), [str(x) for x in row_labels], fontsize=8)
        ax.set_xticks(
            range(len(col_labels)), [str(x) for x in col_labels], fontsize=8, rotation=90 if col_dim == "pos" else 0
        )
        ax.set_ylabel(row_dim)
        ax.set_xlabel(col_dim)
        ax.set_title(language)
        if cell is not None and cell[0] < grid.shape[0] and cell[1] < grid.shape[1]:
            ax.add_patch(Rectangle((cell[1] - 0.5, cell[0] - 0.5), 1, 1, fill=False, edgecolor="black", lw=2))
    fig.colorbar(image, ax=list(axes[0]), label=value)
    if title:
        fig.suptitle(title)
    return fig


def patching_map(results, value: str = "normalized", extra=None, title: str = ""):
    """Heatmaps of a :class:`lsa.patching.PatchResult` or ``{language: PatchResult}`` (one panel per language).

    A layer x position map labels its positions with tokens (:func:`axis_labels`) and
    titles each panel with the number of prompts it rests on when that is fewer than given.
    """
    results = results if isinstance(results, dict) else {"": results}
    row_dim, col_dim, _ = map_dims(next(iter(results.values())))
    grids = {}
    for lang, res in results.items():
        grid, rows, cols = map_grid(res, value, extra)
        meta = getattr(res, "meta", None) or {}
        n, given = meta.get("n_prompts"), meta.get("n_given")
        name = f"{lang} ({n} of {given} prompts)".strip() if n is not None and given and n < given else lang
        grids[name] = (grid, axis_labels(res, row_dim, rows), axis_labels(res, col_dim, cols))
    return map_figure(grids, row_dim, col_dim, value, title=title)


def attribution_scatter(tables: dict[str, pd.DataFrame]):
    """Exact vs attribution effects per component (tables from :func:`lsa.attribution.compare`), one panel per language."""
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 3.8), squeeze=False)
    for ax, (language, table) in zip(axes[0], tables.items()):
        ax.scatter(table["exact"], table["attribution"], s=14, alpha=0.8)
        lo = float(min(table["exact"].min(), table["attribution"].min()))
        hi = float(max(table["exact"].max(), table["attribution"].max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel(f"exact patching ({table.attrs.get('value', 'effect')})")
        ax.set_ylabel("attribution patching")
        ax.set_title(f"{language}: r = {table.attrs['correlation']:.3f}")
        top = table.reindex(table["exact"].abs().sort_values(ascending=False).index).head(4)
        for row in top.itertuples():
            label = ".".join(str(getattr(row, d)) for d in ("layer", "head", "neuron", "pos") if hasattr(row, d))
            ax.annotate(label, (row.exact, row.attribution), fontsize=8, xytext=(3, 3), textcoords="offset points")
    fig.tight_layout()
    return fig


# Fonts with Chinese glyphs, tried after DejaVu Sans (matplotlib falls back per glyph).
CJK_FONTS = (
    "WenQuanYi Micro Hei",
    "Noto Sans CJK SC",
    "Source Han Sans SC",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
)


def use_cjk_fonts() -> list[str]:
    """Add the installed CJK fonts to matplotlib's fallback list (so Chinese tokens render); returns them."""
    from matplotlib import font_manager, rcParams

    installed = {f.name for f in font_manager.fontManager.ttflist}
    found = [name for name in CJK_FONTS if name in installed]
    if found:
        rcParams["font.family"] = ["DejaVu Sans", *found]
    return found


use_cjk_fonts()
