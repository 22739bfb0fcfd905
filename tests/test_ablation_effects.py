"""Ablation effects per prompt set: the per-prompt metrics against plain hooks, the relative metric and the
gap between sets with their bootstrap intervals against numpy over the same resamples, and their figure."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_prompts, tiny_model
from test_ablation import _acts, ref_ablate

from lsa import ablation_effects, bootstrap
from lsa.metrics import logit_diff


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_measure_gives_each_prompts_clean_and_interchange_ablated_metric_as_plain_hooks_do(family):
    model = tiny_model(family)
    sets = {"a": make_prompts(n=4, pos=6, lengths=[6, 5, 6, 4], seed=1), "b": make_prompts(n=3, pos=5, seed=2)}
    conditions = {"one head": [("head", 0, 1)], "an MLP": [("mlp", 1)], "nothing": []}
    got = ablation_effects.measure(model, sets, conditions, min_logit_diff=-np.inf)
    assert list(got.columns) == ablation_effects.COLUMNS and got.attrs == {"method": "interchange", "skipped": {}}
    assert set(got["condition"]) == {"one head", "an MLP"}  # an empty condition is left out
    d_head = model.adapter.d_head
    for name, prompts in sets.items():
        with torch.no_grad():
            clean = logit_diff(model.hf(prompts.clean).logits, prompts)
        own = {  # each prompt's own counterfactual's activation
            "one head": _acts(model, prompts.corrupt, model.module("o_proj", 0), "in")[..., d_head : 2 * d_head],
            "an MLP": _acts(model, prompts.corrupt, model.module("mlp_write", 1), "out"),
        }
        for label, components in conditions.items():
            rows = got[(got["set"] == name) & (got["condition"] == label)]
            if not components:
                continue
            assert rows["prompt"].tolist() == list(range(len(prompts)))
            np.testing.assert_allclose(rows["clean"], clean.numpy(), atol=1e-4)
            want = ref_ablate(model, prompts, components, [own[label]])
            np.testing.assert_allclose(rows["ablated"], want.numpy(), atol=1e-4)


def test_a_set_the_model_does_not_do_is_not_ablated():
    model = tiny_model("gpt2")
    got = ablation_effects.measure(model, {"a": make_prompts(n=3, seed=3)}, {"x": [("mlp", 0)]}, min_logit_diff=1e9)
    assert len(got) == 0 and list(got.attrs["skipped"]) == ["a"]


def _per_prompt() -> pd.DataFrame:
    g = np.random.default_rng(0)
    rows = []
    for name, n, loss in (("en", 9, 0.6), ("zh", 7, 0.1)):
        clean = g.uniform(2, 4, n)
        for label, scale in (("heads", 1.0), ("ffns", 0.3)):
            ablated = clean * (1 - loss * scale) + g.normal(0, 0.3, n)
            rows.append(
                pd.DataFrame({"set": name, "condition": label, "prompt": range(n), "clean": clean, "ablated": ablated})
            )
    frame = pd.concat(rows, ignore_index=True)
    frame.attrs["method"] = "interchange"
    return frame


def _resampled_ratio(frame: pd.DataFrame, name: str, label: str, n_boot: int) -> np.ndarray:
    """Ratio of mean ablated to mean clean over each resample, with numpy, over the resamples the module
    documents (seeded by the set's name)."""
    rows = frame[(frame["set"] == name) & (frame["condition"] == label)]
    idx = bootstrap.resamples(len(rows), n_boot, seed=zlib.crc32(name.encode())).numpy()
    return rows["ablated"].to_numpy()[idx].mean(1) / rows["clean"].to_numpy()[idx].mean(1)


def test_relative_effects_and_their_intervals_match_numpy_over_the_same_resamples():
    frame = _per_prompt()
    got = ablation_effects.relative_effects(frame, n_boot=200).set_index(["set", "condition"])
    for name in ("en", "zh"):
        for label in ("heads", "ffns"):
            rows = frame[(frame["set"] == name) & (frame["condition"] == label)]
            row = got.loc[(name, label)]
            assert row["relative"] == pytest.approx(rows["ablated"].mean() / rows["clean"].mean())
            lo, hi = np.percentile(_resampled_ratio(frame, name, label, 200), [2.5, 97.5])
            assert (row["ci_low"], row["ci_high"]) == pytest.approx((lo, hi))
            assert row["prompts"] == len(rows) and row["ablation"] == f"interchange ablation of {label}"
    assert got.loc[("en", "heads"), "ci_high"] < got.loc[("zh", "heads"), "ci_low"]  # en loses 0.6, zh 0.1


def test_gap_is_how_much_more_the_first_set_loses_with_an_interval_from_both_sets_resamples():
    frame = _per_prompt()
    got = ablation_effects.gaps(frame, "en", "zh", n_boot=200).set_index("condition")
    for label in ("heads", "ffns"):
        rel = {s: frame[(frame["set"] == s) & (frame["condition"] == label)] for s in ("en", "zh")}
        want = (
            rel["zh"]["ablated"].mean() / rel["zh"]["clean"].mean()
            - rel["en"]["ablated"].mean() / rel["en"]["clean"].mean()
        )
        assert got.loc[label, "gap"] == pytest.approx(want)
        diff = _resampled_ratio(frame, "zh", label, 200) - _resampled_ratio(frame, "en", label, 200)
        assert (got.loc[label, "ci_low"], got.loc[label, "ci_high"]) == pytest.approx(
            tuple(np.percentile(diff, [2.5, 97.5]))
        )
    assert got.loc["heads", "ci_low"] > 0
    assert ablation_effects.gaps(frame, "en", "fr").empty


def test_the_effects_figure_draws_each_interval_and_names_the_ablation():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lsa.plotting.ablation_effects import plot_relative_effects

    effects = ablation_effects.relative_effects(_per_prompt(), n_boot=50)
    fig = plot_relative_effects(effects)
    ax = fig.axes[0]
    assert "interchange ablation" in ax.get_title()
    bars = [c for c in ax.containers]
    assert len(bars) == 2  # one per prompt set
    for container, name in zip(bars, ("en", "zh")):
        points = container.lines[0].get_ydata()
        rows = effects[effects["set"] == name]
        np.testing.assert_allclose(points, rows["relative"])
        segments = container.lines[2][0].get_segments()
        np.testing.assert_allclose([s[:, 1] for s in segments], rows[["ci_low", "ci_high"]].to_numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["heads", "ffns"]
    plt.close("all")
