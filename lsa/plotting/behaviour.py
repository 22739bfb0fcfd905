"""Figures of behaviour on clean prompts (from :func:`lsa.behaviour.score`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns


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
