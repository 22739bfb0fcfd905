"""Figures of patching results: heatmaps of :class:`lsa.patching.PatchResult` grids, one panel per language."""

from __future__ import annotations

import torch

VALUES = ("normalized", "effect", "metric")
ONE = "all"  # the column label of a one-dimensional patching result


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
