"""Figures of lens results: a vocabulary projection and the logit lens (from :mod:`lsa.lens`).

Each function takes a frame or result of :mod:`lsa.lens`, never a model, and returns
the matplotlib figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd


def plot_projection(frame: pd.DataFrame, *, title: str | None = None):
    """Bar chart of a vocabulary projection (:func:`lsa.lens.head_projection` and friends): promoted vs suppressed."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 0.3 * frame["rank"].max() + 2))
    for ax, direction, colour in zip(axes, ("promoted", "suppressed"), ("tab:green", "tab:red")):
        part = frame[frame["direction"] == direction].sort_values("rank", ascending=False)
        ax.barh(part["token"].astype(str), part["logit"], color=colour)
        ax.set_title(direction)
    first = frame.iloc[0] if len(frame) else None
    if title is None and first is not None:
        what = {"head": f"head {first['layer']}.{first['head']}", "ffn": f"FFN {first['layer']}"}.get(
            first["component"], f"neuron {first['layer']}.{first['neuron']}"
        )
        title = f"{what} write at position {first['position']}"
    fig.suptitle(title or "")
    fig.tight_layout()
    return fig


def plot_logit_lens(lens) -> plt.Figure:
    """Target token probability and rank per layer (from :func:`lsa.lens.logit_lens`), top-1 token annotated."""
    if lens.target is None:
        raise ValueError("this logit lens has no target token; pass target= to logit_lens")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    t = lens.target
    ax.plot(t["layer"], t["prob"], marker="o", label=f"p({t['token'].iloc[0]!r})")
    ax.set_xticks(t["layer"].tolist())
    ax.set_xlabel("layer (-1 = embedding)")
    ax.set_ylabel("probability")
    ax.set_ylim(-0.02, 1.02)
    top1 = lens.top[lens.top["rank"] == 0]
    for _, row in top1.iterrows():
        ax.annotate(
            str(row["token"]),
            (row["layer"], row["prob"]),
            fontsize=7,
            xytext=(0, 6),
            textcoords="offset points",
            ha="center",
        )
    rank = ax.twinx()
    rank.plot(t["layer"], t["rank"], color="tab:red", ls="--", label="rank")
    rank.set_ylabel("rank of the target")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig
