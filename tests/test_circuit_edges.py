"""Edge circuits: discovery by edge attribution, faithfulness with its interval, curves, MIB areas, overlap beside
chance and resampling, and the verdict rule; each number checked against a hand computation."""

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_prompts, tiny_model

from lsa import bootstrap
from lsa import circuits as C
from lsa.ablation import ablate_edges
from lsa.attribution import EdgeScores, edge_attribution
from lsa.graph import Graph
from lsa.metrics import logit_diff
from lsa.model import load_model


def _setup(family="llama", n=8):
    model = tiny_model(family, spec={"initializer_range": 0.2})
    prompts = make_prompts(n=n, pos=6, seed=5)
    with torch.no_grad():  # orient: the counterfactual lowers the metric on average
        if (
            logit_diff(model.hf(prompts.clean).logits, prompts).mean()
            < logit_diff(model.hf(prompts.corrupt).logits, prompts).mean()
        ):
            prompts.answer, prompts.distractor = prompts.distractor, prompts.answer
    return model, prompts


def _by_hand(model, prompts, kept):
    with torch.no_grad():
        clean = logit_diff(model.hf(prompts.clean).logits, prompts).double()
        corrupt = logit_diff(model.hf(prompts.corrupt).logits, prompts).double()
    part = ablate_edges(model, prompts, kept).double()
    return float((part.mean() - corrupt.mean()) / (clean.mean() - corrupt.mean()))


def test_an_edge_circuit_round_trips_and_its_faithfulness_is_the_normalised_edge_ablation():
    model, prompts = _setup()
    scores = edge_attribution(model, prompts, steps=2, progress=False)
    graph = scores.graph
    kept = scores.circuit(15)
    circuit = C.Circuit.from_edges(model, kept, scores.scores, "random", "none", method="test")
    assert circuit.level == "edges" and torch.equal(circuit.mask(graph), kept)
    assert C.Circuit.from_dict(circuit.to_dict()) == circuit
    assert {c.key for c in circuit.components} == set(graph.nodes(kept))
    f = C.faithfulness(model, circuit, prompts)
    assert f.normalized == pytest.approx(_by_hand(model, prompts, kept), abs=1e-5)
    assert f.ablation == "interchange ablation of every edge outside the circuit"
    lo, hi = f.ci
    assert lo <= f.normalized <= hi
    other = tiny_model("llama", seed=1)
    other.name = "another"
    with pytest.raises(ValueError, match="found on model"):
        C.faithfulness(other, circuit, prompts)


def test_the_curve_measures_each_size_by_hand_and_its_areas_are_trapezoids():
    model, prompts = _setup()
    scores = edge_attribution(model, prompts, steps=1, progress=False)
    graph = scores.graph
    curve = C.edge_curve(model, scores, prompts, sizes=[3, 10, 40])
    for row in curve.frame.itertuples():
        kept = scores.circuit(row.size)
        assert row.edges == int(kept.sum()) and row.share == pytest.approx(row.edges / graph.n_edges)
        assert row.normalized == pytest.approx(_by_hand(model, prompts, kept), abs=1e-5)
        assert row.ci_low <= row.normalized <= row.ci_high
    frame = pd.DataFrame({"size": [1, 2], "share": [0.25, 0.5], "normalized": [0.5, 0.9]})
    toy = C.Curve(frame, torch.zeros(2, 1), torch.zeros(1), torch.zeros(1), "x", "edges")
    # (0,0) (0.25,0.5) (0.5,0.9) (1,1): areas by hand
    cpr = 0.25 * 0.25 + 0.25 * (0.5 + 0.9) / 2 + 0.5 * (0.9 + 1) / 2
    cmd = 0.25 * (1 + 0.5) / 2 + 0.25 * (0.5 + 0.1) / 2 + 0.5 * 0.1 / 2
    assert toy.areas() == pytest.approx({"cpr": cpr, "cmd": cmd})


def _crossfit_by_hand(model, prompts, scores, size, rank):
    """Normalised faithfulness with each half of the prompts (alternate rows) judging the other half's circuit."""
    parts = [torch.arange(len(prompts))[f::2] for f in range(2)]
    metric, clean, corrupt = torch.empty(len(prompts)), torch.empty(len(prompts)), torch.empty(len(prompts))
    for rows, fit in ((parts[0], parts[1]), (parts[1], parts[0])):
        part = prompts.subset(rows)
        metric[rows] = ablate_edges(model, part, scores.circuit(size, rank, fit))
        with torch.no_grad():
            clean[rows] = logit_diff(model.hf(part.clean).logits, part)
            corrupt[rows] = logit_diff(model.hf(part.corrupt).logits, part)
    return float((metric.mean() - corrupt.mean()) / (clean.mean() - corrupt.mean()))


def test_edge_discovery_returns_the_smallest_measured_circuit_whose_cross_fitted_interval_reaches_the_target():
    model, prompts = _setup(n=12)
    found = C.discover(model, prompts, "eap-ig", steps=2, target=0.6, progress=False, roles=False)
    frame, rank = found.curve.frame, found.circuit.evidence["parameters"]["rank"]
    for row in frame.itertuples():  # every prompt judged by the circuit of the other half's scores
        want = _crossfit_by_hand(model, prompts, found.edges, row.size, rank)
        assert row.normalized == pytest.approx(want, abs=1e-4)  # a ratio of means: 1e-5 in the metric
    reached = frame[frame["ci_low"] >= 0.6]
    assert len(reached), "the toy model's curve never reaches the target: the test says nothing"
    best = reached.sort_values("edges").iloc[0]
    assert torch.equal(found.circuit.mask(found.edges.graph), found.edges.circuit(int(best["size"]), rank))
    assert found.circuit.evidence["reached_target"] is True
    with pytest.raises(ValueError, match="method must be one of"):
        C.discover(model, prompts, "acdc")


def test_bootstrap_intervals_are_percentiles_of_resampled_ratios_of_means():
    g = torch.Generator().manual_seed(0)
    part, full, empty = (torch.randn(30, generator=g) + k for k in (2.0, 3.0, 0.0))
    idx = bootstrap.resamples(30, n_boot=500, seed=1)
    got = bootstrap.normalized_means(part, full, empty, idx).numpy()
    p, f, e = (x.double().numpy()[idx.numpy()].mean(1) for x in (part, full, empty))
    assert np.allclose(got, (p - e) / (f - e))
    assert bootstrap.interval(got) == pytest.approx(tuple(np.percentile(got, [2.5, 97.5])))
    assert bootstrap.interval([np.nan, np.inf]) != bootstrap.interval([np.nan, np.inf])  # NaN: none finite


def _scores(graph, per_prompt):
    return EdgeScores(graph, per_prompt, "eap-ig", "noising", 1)


def test_edge_overlap_is_one_for_one_circuit_zero_for_disjoint_ones_and_chance_is_the_hypergeometric_mean():
    graph = Graph(n_layers=3, n_heads=4, n_kv_heads=2)
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(1, *graph.valid.shape, generator=g).expand(16, -1, -1) * graph.valid
    same = C.edge_overlap(_scores(graph, shared), _scores(graph, shared), 20, 20, n_boot=20, n_splits=3, n_chance=2000)
    assert (same[["observed", "ci_low", "ci_high", "within_a", "within_b", "across_halves"]] == 1).all().all()
    edges = same.set_index("unit").loc["edges"]
    k = int(_scores(graph, shared).circuit(20).sum())
    n = graph.n_edges
    # E|A & B| = k^2 / n for two random k-sets of n; Jaccard = i / (2k - i), averaged over the hypergeometric i
    i = np.arange(k + 1)
    from math import comb

    p = np.array([comb(k, j) * comb(n - k, k - j) / comb(n, k) for j in i])
    assert edges["chance"] == pytest.approx(float((p * i / (2 * k - i)).sum()), abs=0.01)
    top = _scores(graph, shared).circuit(20)
    apart = shared.clone()
    apart[:, top] = 0  # the second set's strongest edges are all outside the first circuit
    other = C.edge_overlap(_scores(graph, shared), _scores(graph, apart), 20, 20, n_boot=5, n_splits=2, n_chance=10)
    assert other.set_index("unit").loc["edges", "observed"] == 0


def _faith(own, cross, ci=0.05):
    rows = []
    for circuit, lang, other in (("en", "en", "zh"), ("zh", "zh", "en")):
        rows.append(
            dict(
                circuit=circuit, circuit_language=lang, language=lang, normalized=own, ci_low=own - ci, ci_high=own + ci
            )
        )
        rows.append(
            dict(
                circuit=circuit,
                circuit_language=lang,
                language=other,
                normalized=cross,
                ci_low=cross - ci,
                ci_high=cross + ci,
            )
        )
    return pd.DataFrame(rows)


def _overlap(across, chance_95=0.1, within=0.6):
    return pd.DataFrame(
        [dict(unit="nodes", observed=across + 0.1, ci_low=across - 0.1, ci_high=across + 0.2, chance=0.05,
              chance_95=chance_95, within_a=within, within_b=within, across_halves=across)]
    )  # fmt: skip


def test_the_verdict_follows_its_written_rule():
    assert C.verdict(_faith(0.7, 0.9), _overlap(0.5))[0] == "inconclusive"  # a circuit below the target
    assert C.verdict(_faith(0.9, 0.85), _overlap(0.5))[0] == "same"
    assert C.verdict(_faith(0.9, 0.85), _overlap(0.05))[0] == "inconclusive"  # overlap not beyond chance
    assert C.verdict(_faith(0.9, 0.3), _overlap(0.2, within=0.6))[0] == "different"
    assert C.verdict(_faith(0.9, 0.3), _overlap(0.7, within=0.6))[0] == "inconclusive"  # as close as two halves
    assert "target" in C.VERDICT_RULE and "95th percentile" in C.VERDICT_RULE


def test_edges_rank_by_size_or_by_how_far_they_carry_the_behaviour():
    graph = Graph(n_layers=1, n_heads=2, n_kv_heads=1)
    scores = torch.zeros(1, *graph.valid.shape)
    (s0, r0), (s1, r1), (s2, r2) = graph.valid.nonzero()[:3].tolist()
    scores[0, s0, r0], scores[0, s1, r1], scores[0, s2, r2] = -0.5, 2.0, -1.0  # noising: negative carries it
    noising = EdgeScores(graph, scores, "eap-ig", "noising", 1)
    assert graph.top(noising.values("absolute"), 1)[s1, r1]  # |2.0| is the largest
    top2 = graph.top(noising.values("signed"), 2)
    assert top2[s2, r2] and top2[s0, r0] and not top2[s1, r1]  # -1.0 and -0.5 carry the behaviour
    denoising = EdgeScores(graph, scores, "eap-ig", "denoising", 1)
    assert graph.top(denoising.values("signed"), 1)[s1, r1]
    assert not graph.top(noising.values(), graph.n_edges)[~graph.valid].any()  # never an edge off the graph
    with pytest.raises(ValueError, match="rank must be"):
        noising.values("median")


def test_discovery_and_heldout_prompts_share_no_sentence_and_are_rebuilt_alike():
    from lsa import tasks
    from lsa.workbook import circuit_prompts, heldout_sets, prompt_record

    model = load_model("toy-bilingual")
    train, heldout = circuit_prompts(model, "en", n_prompts=40, n_heldout=30, seed=3)
    assert len(train) == 40 and len(heldout) == 30
    assert not set(train.meta["clean_text"]) & set(heldout.meta["clean_text"])
    circuit = C.Circuit.empty_for(model, "ioi", "en", prompts=prompt_record(40, 30, 3, "all"))
    again, skipped = heldout_sets(model, circuit, ["en", "zh"])
    assert not skipped and torch.equal(again["en"].clean, heldout.clean)
    parts = tasks.disjoint(train, [10, 10, 100])
    assert [len(p) for p in parts] == [10, 10, 20]
    with pytest.raises(ValueError, match="no prompts left"):
        tasks.disjoint(train, [40, 1])


def test_a_path_patching_circuit_is_judged_along_the_order_its_heads_were_found_in():
    from lsa.ablation import faithfulness

    model, prompts = _setup("qwen2")
    found = C.path_patching_discovery(model, prompts, k=0.5, floor=0.0, max_steps=1, progress=False, roles=False)
    assert found.edges is None and found.size == len(found.circuit) > 2
    curve = found.heldout_curve(model, prompts)
    sizes = curve.frame["size"].tolist()
    assert sizes[0] == 1 and sizes[-1] == found.size and all(b > a for a, b in zip(sizes, sizes[1:]))
    for row in curve.frame.itertuples():  # heads outside the first ``size`` ablated, MLPs intact
        want = faithfulness(model, prompts, found.circuit.keys[: row.size], method="interchange").normalized
        assert row.normalized == pytest.approx(want, abs=1e-5)
    assert curve.at(found.size).normalized == pytest.approx(curve.frame["normalized"].iloc[-1])


def test_a_circuit_keeps_its_faithfulness_on_a_prompt_set_and_gives_it_back_from_its_json(monkeypatch, tmp_path):
    model, prompts = _setup()
    scores = edge_attribution(model, prompts, steps=1, progress=False)
    circuit = C.Circuit.from_edges(model, scores.circuit(12), scores.scores, "random", "none")
    first = C.faithfulness(model, circuit, prompts)
    C.record(circuit, prompts, first)
    again = C.Circuit.from_json(circuit.to_json(tmp_path / "circuit.json"))
    monkeypatch.setattr("lsa.ablation.ablate_edges", lambda *a, **k: pytest.fail("the model ran again"))
    kept = C.faithfulness(model, again, prompts)
    assert kept.normalized == first.normalized and kept.ci == first.ci and kept.ablation == first.ablation
    other = make_prompts(n=8, pos=6, seed=6)  # other prompts, or another ablation: computed, not reused
    for prompts_, method in ((other, "interchange"), (prompts, "mean")):
        with pytest.raises(pytest.fail.Exception, match="ran again"):
            C.faithfulness(model, again, prompts_, method=method)


def test_overlap_references_draws_a_skewed_null_and_an_interval_that_misses_its_estimate():
    """A null whose mean lies above its 95th percentile (rare large overlaps of tiny circuits) gets no
    whisker, and a percentile interval above its estimate a whisker up to its top: both used to raise."""
    import matplotlib.pyplot as plt

    from lsa.plotting import circuits as circuit_plots

    row = dict(unit="edges", observed=0.5, ci_low=0.55, ci_high=0.7, across_halves=0.6, within_a=0.7, within_b=0.65)
    fig = circuit_plots.overlap_references(pd.DataFrame([{**row, "chance": 0.04, "chance_95": 0.0}]), ("en", "zh"))
    bars = [c.get_segments()[0] for c in fig.axes[0].collections]  # the two error bars, in drawing order
    assert np.allclose(bars[0], [[0, 0.5], [0, 0.7]]) and np.allclose(bars[1], [[4, 0.04], [4, 0.04]])
    plt.close(fig)
