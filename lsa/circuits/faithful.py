"""Faithfulness of circuits: how much of the behaviour a circuit keeps with the rest of the model ablated.

``normalized = (F(circuit) - F(empty)) / (F(model) - F(empty))`` on mean metrics (1 = the circuit alone
does what the model does, 0 = no more than nothing), with its ablation named and a 95% bootstrap
interval over the prompts (:mod:`lsa.bootstrap`). An edge circuit (``level="edges"``) is judged by
ablating every edge outside it (:func:`lsa.ablation.ablate_edges`), a node circuit by ablating every
head outside it, MLPs intact as in the IOI paper (:func:`lsa.ablation.faithfulness`). The ablation is
interchange by default (:mod:`lsa.ablation` says why). Judge a circuit on prompts it was not found on.

Curves: faithfulness against circuit size along a ranking (:func:`edge_curve`: the top edges by
|score|, pruned to the paths from the embeddings to the logits; :func:`node_curve`: components in
order), with the MIB benchmark's areas (:meth:`Curve.areas`: CPR, the area under the curve, and CMD,
the area between it and 1, over the share of the model's edges or nodes kept).

Cost: one forward per circuit size and chunk of prompts, plus the reference run per chunk.

>>> f = faithfulness(model, circuit, heldout); f.normalized, f.ci, f.ablation        # doctest: +SKIP
>>> curve = edge_curve(model, scores, heldout); curve.smallest(0.8); curve.areas()   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from lsa import ablation, bootstrap, engine
from lsa import metrics as lsa_metrics
from lsa.circuits.data import Circuit
from lsa.engine import Plan
from lsa.graph import Graph
from lsa.model import Model
from lsa.patching import run_metric
from lsa.tasks import PromptSet

FAITHFULNESS_COLUMNS = [
    "circuit",
    "circuit_model",
    "circuit_language",
    "model",
    "language",
    "components",
    "edges",
    "ablation",
    "prompts",
    "full",
    "circuit_metric",
    "empty",
    "faithfulness",
    "normalized",
    "ci_low",
    "ci_high",
    "own_language",
]
# MIB's circuit sizes, as shares of the model's edges (Mueller et al. 2025, circuit localization track)
MIB_SHARES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# the sizes a curve measures by default: MIB's from 0.5% (below it a circuit prunes to a handful of edges, and
# the shares below 0.5% span 0.005 of the areas' axis)
CURVE_SHARES = MIB_SHARES[2:]


def check_model(model: Model, circuit: Circuit) -> None:
    """Refuse a circuit found on another model (its components would name another model's parts)."""
    if circuit.model != model.name:
        raise ValueError(
            f"circuit {circuit.title!r} was found on model {circuit.model!r}, not on {model.name!r}: run it on its own "
            "model (lsa.workbook.cross_faithfulness loads it), or compare circuits of two models by role "
            "(lsa.circuits.compare)"
        )


def clean_metric(model: Model, prompts: PromptSet, metric=None) -> torch.Tensor:
    """The model's metric per prompt ``[n]`` on the clean prompts."""
    metric = metric or lsa_metrics.logit_diff
    with torch.no_grad():
        logits = engine.run(model, prompts.clean, Plan(end=prompts.end)).logits
    return run_metric(metric, logits, prompts).cpu()


def faithfulness(
    model: Model,
    circuit: Circuit,
    prompts: PromptSet,
    *,
    method: str = ablation.DEFAULT_METHOD,
    metric=None,
    seed=0,
    **kwargs,
) -> ablation.Faithfulness:
    """A circuit's faithfulness on ``prompts`` (module docstring): ``.normalized``, ``.ci``, ``.ablation``.

    The circuit must come from this model (:func:`check_model`). Node circuits take
    :func:`lsa.ablation.faithfulness`'s further arguments (``kinds``, ``reference``, ...). A circuit that
    keeps its faithfulness on these very prompts and with this ablation (:func:`record`) gives it back
    without running the model.
    """
    check_model(model, circuit)
    circuit.validate(model)
    kept = recorded(circuit, prompts, method) if metric is None and not kwargs else None
    if kept is not None:
        return kept
    if circuit.level == "nodes":
        keys = [c.key for c in circuit.components]
        return ablation.faithfulness(model, prompts, keys, method=method, metric=metric, seed=seed, **kwargs)
    mask = circuit.mask(Graph.of(model))
    both = ablation.ablate_edges(
        model, prompts, torch.stack([mask, torch.zeros_like(mask)]), method=method, metric=metric, seed=seed
    )
    full = clean_metric(model, prompts, metric)
    return ablation.Faithfulness(both[0], full, both[1], method, len(circuit), "every edge outside the circuit")


def prompts_key(prompts: PromptSet) -> str:
    """A fingerprint of a prompt set's tokens and answers (16 hex digits)."""
    digest = hashlib.sha256()
    for t in (prompts.clean, prompts.corrupt, prompts.answer, prompts.distractor):
        digest.update(t.detach().cpu().to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def record(circuit: Circuit, prompts: PromptSet, result: ablation.Faithfulness) -> None:
    """Keep ``result`` (the logit difference per prompt) in ``circuit.evidence["faithfulness"]``, by prompt set
    (:func:`prompts_key`), so that the circuit saved to JSON carries it (:func:`faithfulness` gives it back)."""
    kept = {name: getattr(result, name).tolist() for name in ("circuit", "full", "empty")}
    kept.update(method=result.method, scope=result.scope, n_components=result.n_components)
    circuit.evidence.setdefault("faithfulness", {})[prompts_key(prompts)] = kept


def recorded(circuit: Circuit, prompts: PromptSet, method: str) -> ablation.Faithfulness | None:
    """The faithfulness :func:`record` kept for these prompts and this ablation, or ``None``."""
    kept = circuit.evidence.get("faithfulness", {}).get(prompts_key(prompts))
    if kept is None or kept["method"] != method:
        return None
    values = {name: torch.tensor(kept[name]) for name in ("circuit", "full", "empty")}
    return ablation.Faithfulness(**values, method=method, n_components=kept["n_components"], scope=kept["scope"])


def faithfulness_table(
    model: Model, circuits: Mapping[str, Circuit], prompt_sets: Mapping[str, PromptSet], **kwargs
) -> pd.DataFrame:
    """Each circuit in each language (on one model): one row per (circuit, language), columns
    :data:`FAITHFULNESS_COLUMNS`. Cross-language faithfulness is the rows where ``language != circuit_language``."""
    rows = []
    for label, circuit in circuits.items():
        for language, prompts in prompt_sets.items():
            summary = faithfulness(model, circuit, prompts, **kwargs).frame.iloc[0].to_dict()
            summary["circuit_metric"] = summary.pop("circuit")
            rows.append(
                {
                    **summary,
                    "circuit": label,
                    "circuit_model": circuit.model,
                    "circuit_language": circuit.language,
                    "model": model.name,
                    "language": language,
                    "components": len(circuit),
                    "edges": len(circuit.edges) if circuit.level == "edges" else None,
                    "own_language": language == circuit.language,
                }
            )
    return pd.DataFrame(rows, columns=FAITHFULNESS_COLUMNS)


@dataclass
class Curve:
    """Faithfulness along a ranking: ``frame`` has one row per circuit size, ``metric`` ``[sizes, n]`` per prompt.

    Columns: ``size`` (edges taken from the ranking, or components), ``edges`` and ``nodes`` (after
    pruning; nodes = heads and MLPs), ``heads``, ``mlps``, ``share`` (of the model's edges, or
    components), ``normalized``, ``ci_low``, ``ci_high``. ``ablation`` names the ablation.
    """

    frame: pd.DataFrame
    metric: torch.Tensor
    full: torch.Tensor
    empty: torch.Tensor
    ablation: str
    level: str
    meta: dict = field(default_factory=dict)

    def joined(self, other: Curve) -> Curve:
        """This curve with ``other``'s sizes (same prompts, model and ablation), ordered by size."""
        order = np.argsort(np.concatenate([self.frame["size"], other.frame["size"]]), kind="stable")
        frame = pd.concat([self.frame, other.frame], ignore_index=True).iloc[order].reset_index(drop=True)
        metric = torch.cat([self.metric, other.metric])[torch.as_tensor(order)]
        return Curve(frame, metric, self.full, self.empty, self.ablation, self.level, self.meta)

    def at(self, size: int) -> ablation.Faithfulness:
        """The faithfulness (per prompt, with its interval) of the circuit of one measured ``size``."""
        rows = self.frame.index[self.frame["size"] == size]
        if not len(rows):
            raise KeyError(f"size {size} was not measured; sizes: {self.frame['size'].tolist()}")
        row = self.frame.loc[rows[0]]
        method, scope = self.ablation.split(" ablation of ", 1)
        count = int(row["edges"]) if self.level == "edges" else int(row["size"])
        return ablation.Faithfulness(self.metric[rows[0]], self.full, self.empty, method, count, scope)

    def smallest(self, target: float = 0.8, by: str = "normalized") -> pd.Series | None:
        """The smallest circuit whose normalised faithfulness reaches ``target`` (None where none does);
        ``by="ci_low"``: whose 95% interval lies at or above it."""
        hit = self.frame[self.frame[by] >= target]
        return None if hit.empty else hit.sort_values("edges" if self.level == "edges" else "size").iloc[0]

    def areas(self) -> dict[str, float]:
        """MIB's areas over the share kept, from the empty circuit (0, 0) to the whole model (1, 1):
        ``cpr`` = area under the faithfulness curve (higher is better), ``cmd`` = area between it and 1
        (lower is better); trapezoids between the sizes measured."""
        frame = self.frame.sort_values("share")
        x = np.concatenate([[0.0], frame["share"].to_numpy(float), [1.0]])
        y = np.concatenate([[0.0], frame["normalized"].to_numpy(float), [1.0]])
        keep = np.concatenate([[True], np.diff(x) > 0])  # the whole model measured: keep one point at 1
        x, y = x[keep], y[keep]
        return {"cpr": float(np.trapezoid(y, x)), "cmd": float(np.trapezoid(np.abs(1 - y), x))}


def _curve(metric: torch.Tensor, full: torch.Tensor, empty: torch.Tensor, rows: list[dict], **kw) -> Curve:
    """A :class:`Curve` from per-prompt metrics ``[sizes, n]``: the normalised means and their intervals."""
    idx = bootstrap.resamples(metric.shape[1])
    for row, values in zip(rows, metric):
        row["normalized"] = float(bootstrap.normalized_means(values, full, empty, torch.arange(len(full))[None])[0])
        row["ci_low"], row["ci_high"] = bootstrap.interval(bootstrap.normalized_means(values, full, empty, idx))
    return Curve(pd.DataFrame(rows), metric, full, empty, **kw)


def edge_sizes(graph: Graph, shares: Sequence[float] = CURVE_SHARES) -> list[int]:
    """Numbers of top edges at the given shares of the graph's edges (at least 1, no repeats)."""
    return sorted({max(1, round(s * graph.n_edges)) for s in shares})


def edge_curve(
    model: Model,
    scores,
    prompts: PromptSet,
    *,
    sizes: Sequence[int] | None = None,
    rank: str = "absolute",
    method: str = ablation.DEFAULT_METHOD,
    metric=None,
    seed: int = 0,
    progress: bool = False,
) -> Curve:
    """Faithfulness of the top-``size`` edges of ``scores`` (:class:`lsa.attribution.EdgeScores`) by ``rank``,
    pruned to the paths from the embeddings to the logits (:meth:`lsa.attribution.EdgeScores.circuit`), for each
    size (default: :data:`CURVE_SHARES`); every other edge ablated (``method``)."""
    sizes = edge_sizes(scores.graph) if sizes is None else sizes
    kw = dict(method=method, metric=metric, seed=seed, progress=progress)
    return edge_curves(model, scores, prompts, {rank: sizes}, **kw)[rank]


def edge_curves(
    model: Model, scores, prompts: PromptSet, wanted: Mapping[str, Sequence[int]], *, folds: int = 1, **kw
) -> dict[str, Curve]:
    """:func:`edge_curve` for several rankings, ``{rank: sizes}``, in one pass over the prompts (the reference
    run shared; each distinct circuit run once). ``folds=2``: cross-fitted on the prompts ``scores`` were
    computed on: the prompts split in two (alternate rows), each half judged by the circuits of the other
    half's scores, so that every prompt judges circuits not found on it; the rows' sizes and counts are
    those of the circuits of all the prompts' scores (the circuits a discovery reports)."""
    graph, n = scores.graph, len(prompts)
    folds = folds if n >= 2 * folds else 1
    wanted = {rank: sorted({int(x) for x in sizes}) for rank, sizes in wanted.items()}
    parts = [torch.arange(n)[f::folds] for f in range(folds)]
    metric = {rank: torch.empty(len(sizes), n) for rank, sizes in wanted.items()}
    full, empty = torch.empty(n), torch.empty(n)
    kept = {rank: [scores.circuit(size, rank) for size in sizes] for rank, sizes in wanted.items()}  # all prompts'
    for rows in parts:
        if folds == 1:
            masks = [k for ks in kept.values() for k in ks]
        else:
            fit = torch.cat([p for p in parts if p is not rows])  # the other half
            masks = [scores.circuit(size, rank, fit) for rank, sizes in wanted.items() for size in sizes]
        got, full[rows], empty[rows] = _judge(model, prompts.subset(rows), graph, masks, kw)
        at = 0
        for rank, sizes in wanted.items():
            metric[rank][:, rows] = got[at : at + len(sizes)]
            at += len(sizes)
    scope = f"{kw.get('method', ablation.DEFAULT_METHOD)} ablation of every edge outside the circuit"
    curves = {}
    for rank, sizes in wanted.items():
        rows = [
            dict(size=m, share=int(k.sum()) / graph.n_edges, **_counts(graph, k)) for m, k in zip(sizes, kept[rank])
        ]
        meta = {"rank": rank, "folds": folds}
        curves[rank] = _curve(metric[rank], full, empty, rows, ablation=scope, level="edges", meta=meta)
    return curves


def _judge(model: Model, prompts: PromptSet, graph: Graph, masks: list[torch.Tensor], kw: dict):
    """``(metric [len(masks), n], full [n], empty [n])``: each edge circuit judged on ``prompts``, each distinct
    circuit run once (no edge kept: the empty circuit; every edge: the model itself)."""
    distinct = [torch.zeros_like(graph.valid)]
    for k in masks:
        if not any(torch.equal(k, d) for d in distinct) and not torch.equal(k, graph.valid):
            distinct.append(k)
    out = ablation.ablate_edges(model, prompts, torch.stack(distinct), **kw)
    full = clean_metric(model, prompts, kw.get("metric"))
    rows = [
        full if torch.equal(k, graph.valid) else out[[torch.equal(k, d) for d in distinct].index(True)] for k in masks
    ]
    return torch.stack(rows), full, out[0]


def _counts(graph: Graph, kept: torch.Tensor) -> dict[str, int]:
    nodes = graph.nodes(kept)
    heads = sum(k[0] == "head" for k in nodes)
    mlps = sum(k[0] == "mlp" for k in nodes)
    return {"edges": int(kept.sum()), "nodes": heads + mlps, "heads": heads, "mlps": mlps}


def node_curve(
    model: Model,
    ranking: Sequence[tuple],
    prompts: PromptSet,
    *,
    sizes: Sequence[int] | None = None,
    method: str = ablation.DEFAULT_METHOD,
    metric=None,
    seed: int = 0,
) -> Curve:
    """Faithfulness of the first ``size`` components of ``ranking`` (heads, in order), every other head ablated
    (MLPs intact), for each size (default: every size); ``share`` is of the model's heads."""
    a = model.adapter
    sizes = range(1, len(ranking) + 1) if sizes is None else sorted(set(int(s) for s in sizes))
    every = [("head", layer, h) for layer in range(a.n_layers) for h in range(a.n_heads)]
    kw = dict(method=method, metric=metric or lsa_metrics.logit_diff, seed=seed)
    metric_rows, rows = [], []
    for n in sizes:
        keep = set(ranking[:n])
        metric_rows.append(ablation.ablate(model, prompts, [h for h in every if h not in keep], **kw))
        rows.append(dict(size=n, share=n / len(every), edges=None, nodes=n, heads=n, mlps=0))
    empty = ablation.ablate(model, prompts, every, **kw)
    full = clean_metric(model, prompts, metric)
    scope = f"{method} ablation of every head outside the circuit (MLPs intact)"
    return _curve(torch.stack(metric_rows), full, empty, rows, ablation=scope, level="nodes")
