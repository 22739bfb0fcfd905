"""Figures of attribution patching against exact patching (from :func:`lsa.attribution.compare`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd


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
