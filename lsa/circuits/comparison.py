"""Comparing circuits: shared and specific components, overlap scores and role agreement.

:func:`compare` matches components by identity within one model (e.g. its
English and Chinese circuits), and by role and relative depth
(``(layer + 0.5) / n_layers``) across models.

>>> compare(en_circuit, zh_circuit).summary                    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from lsa import bootstrap
from lsa.circuits.data import LOGITS, Circuit, component_name


def _weights(circuit: Circuit, units: dict) -> dict:
    w = {}
    for unit, comps in units.items():
        w[unit] = sum(abs(c.effect) if c.effect is not None else 1.0 for c in comps)
    total = sum(w.values())
    return {u: v / total for u, v in w.items()} if total > 0 else w


def _units(circuit: Circuit, by: str) -> dict:
    """Components by unit (the component, or its role; an MLP without one: "MLP"); the embeddings, in every
    edge circuit, are left out."""
    units: dict = {}
    for c in circuit.components:
        if c.kind == "embed":
            continue
        unit = c.key if by == "component" else (c.role or ("MLP" if c.kind == "mlp" else "unlabelled"))
        units.setdefault(unit, []).append(c)
    return units


@dataclass
class Comparison:
    """Two circuits side by side: ``table`` (one row per component or role), ``summary`` (one row of scores)."""

    table: pd.DataFrame
    summary: pd.DataFrame
    labels: tuple[str, str]
    by: str

    def __getitem__(self, name: str):
        return self.summary[name].iloc[0]

    @property
    def shared(self) -> list:
        return self.table.loc[self.table["status"] == "shared", "unit"].tolist()

    def only(self, which: int) -> list:
        return self.table.loc[self.table["status"] == f"only {self.labels[which]}", "unit"].tolist()


def jaccard(a: Iterable, b: Iterable) -> float:
    """``|A & B| / |A | B|`` (1.0 for two empty sets: nothing differs)."""
    a, b = set(a), set(b)
    return 1.0 if not a | b else len(a & b) / len(a | b)


def compare(a: Circuit, b: Circuit, *, labels: Sequence[str] | None = None, by: str | None = None) -> Comparison:
    """Shared and specific components of two circuits, overlap scores and role agreement.

    ``by``: "component" (identity; needs equal shapes; the default for two circuits of
    one model) or "role" (the default across models, since head indices of
    independently trained models do not correspond even at equal shapes): units
    are roles, compared by count, summed |effect| and mean relative depth
    ``(layer + 0.5) / n_layers``.

    Summary columns: ``jaccard`` (units), ``weighted_overlap`` (sum of min / sum of max
    of each unit's share of the circuit's total |effect|; 1 for identical, 0 for
    disjoint), ``role_agreement`` (share of shared components with the same role;
    by role: NaN), ``n_shared``, ``n_only_a``, ``n_only_b``, ``depth_difference``
    (by role: mean |difference| of relative depth over shared roles),
    ``logit_effect_correlation`` (by component: :func:`logit_effect_correlation`).
    """
    la, lb = labels or (a.language or a.model or "a", b.language or b.model or "b")
    if la == lb:
        la, lb = f"{la} (1)", f"{lb} (2)"
    same_shape = (a.n_layers, a.n_heads) == (b.n_layers, b.n_heads)
    by = by or ("component" if same_shape and a.model == b.model else "role")
    if by not in ("component", "role"):
        raise ValueError(f"by must be 'component' or 'role', got {by!r}")
    if by == "component" and not same_shape:
        raise ValueError(
            f"circuits of different shapes ({a.n_layers}x{a.n_heads} vs {b.n_layers}x{b.n_heads}) "
            "cannot be compared component by component; use by='role'"
        )
    ua, ub = _units(a, by), _units(b, by)
    wa, wb = _weights(a, ua), _weights(b, ub)
    rows = [_unit_row(unit, by, (la, a, ua, wa), (lb, b, ub, wb)) for unit in list(ua) + [u for u in ub if u not in ua]]
    table = pd.DataFrame(rows)
    keys = list(dict.fromkeys([*ua, *ub]))
    mins = sum(min(wa.get(u, 0.0), wb.get(u, 0.0)) for u in keys)
    maxs = sum(max(wa.get(u, 0.0), wb.get(u, 0.0)) for u in keys)
    shared = [u for u in ua if u in ub]
    summary = {
        "a": la,
        "b": lb,
        "by": by,
        "n_a": sum(map(len, ua.values())),
        "n_b": sum(map(len, ub.values())),
        "n_shared": len(shared),
        f"n_only_{la}": len([u for u in ua if u not in ub]),
        f"n_only_{lb}": len([u for u in ub if u not in ua]),
        "jaccard": jaccard(ua, ub),
        "weighted_overlap": 1.0 if maxs == 0 else mins / maxs,
    }
    if by == "component":
        summary["logit_effect_correlation"] = logit_effect_correlation(a, b)
        summary["role_agreement"] = (
            float(np.mean([ua[u][0].role == ub[u][0].role for u in shared])) if shared else float("nan")
        )
    else:
        summary["role_agreement"] = float("nan")
        depths = [abs(r[f"depth_{la}"] - r[f"depth_{lb}"]) for r in rows if r["status"] == "shared"]
        summary["depth_difference"] = float(np.mean(depths)) if depths else float("nan")
    return Comparison(table=table, summary=pd.DataFrame([summary]), labels=(la, lb), by=by)


def _unit_row(unit, by: str, one: tuple, other: tuple) -> dict:
    """One row of :func:`compare`'s table: ``one`` and ``other`` are ``(label, circuit, units, weights)``."""
    (la, _, ua, wa), (lb, _, ub, wb) = one, other
    in_a, in_b = unit in ua, unit in ub
    status = "shared" if in_a and in_b else f"only {la}" if in_a else f"only {lb}"
    row = {"unit": component_name(unit) if by == "component" else unit, "status": status}
    if by == "component":
        ca, cb = (ua[unit][0] if in_a else None), (ub[unit][0] if in_b else None)
        row.update(kind=unit[0], layer=unit[1], index=unit[2] if len(unit) == 3 else None)
        row.update({f"role_{la}": ca.role if ca else None, f"role_{lb}": cb.role if cb else None})
        row.update({f"effect_{la}": ca.effect if ca else None, f"effect_{lb}": cb.effect if cb else None})
        row["same_role"] = bool(ca and cb and ca.role == cb.role) if in_a and in_b else None
    else:
        for lab, circ, units, _ in (one, other):
            comps = units.get(unit, [])
            row[f"count_{lab}"] = len(comps)
            row[f"depth_{lab}"] = float(np.mean([(c.layer + 0.5) / circ.n_layers for c in comps])) if comps else None
            row[f"components_{lab}"] = ", ".join(c.name for c in comps)
    row[f"weight_{la}"] = wa.get(unit, 0.0)
    row[f"weight_{lb}"] = wb.get(unit, 0.0)
    return row


def logit_effect_correlation(a: Circuit, b: Circuit) -> float:
    """Pearson correlation, over every head, of the two discoveries' step-1 effects (head -> logits).

    A threshold-free companion to the overlaps: two circuits can differ only in which
    heads crossed the selection rule while every head's effect agrees. NaN when either
    circuit has no discovery steps or they share fewer than three heads.
    """
    sa, sb = a.steps(), b.steps()
    if not len(sa) or not len(sb):
        return float("nan")
    first = [s[(s["step"] == 1) & (s["receiver_input"] == LOGITS)][["layer", "head", "effect"]] for s in (sa, sb)]
    joined = first[0].merge(first[1], on=["layer", "head"]).dropna()
    if len(joined) < 3 or joined["effect_x"].std() == 0 or joined["effect_y"].std() == 0:
        return float("nan")
    return float(np.corrcoef(joined["effect_x"], joined["effect_y"])[0, 1])


def overlap_matrix(circuits: Mapping[str, Circuit], score: str = "jaccard", by: str | None = None) -> pd.DataFrame:
    """Pairwise ``score`` (a :func:`compare` summary column) of several circuits, labelled by the mapping's keys."""
    names = list(circuits)
    out = pd.DataFrame(index=names, columns=names, dtype=float)
    for i in names:
        for j in names:
            out.loc[i, j] = compare(circuits[i], circuits[j], labels=(f"{i}#a", f"{j}#b"), by=by)[score]
    return out


# ============================================================== edge circuits: overlap beside its references
def _nodes(graph, kept: torch.Tensor) -> set:
    return {
        key for key in graph.nodes(kept) if key[0] != "embed"
    }  # heads and MLPs: the embeddings are in every circuit


def overlaps(graph, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Jaccard of two edge circuits' edges and of their nodes (heads and MLPs)."""
    union = int((a | b).sum())
    edges = 1.0 if union == 0 else int((a & b).sum()) / union
    return edges, jaccard(_nodes(graph, a), _nodes(graph, b))


def chance_overlaps(graph, a: torch.Tensor, b: torch.Tensor, draws: int, seed: int) -> np.ndarray:
    """``[draws, 2]``: Jaccard of edges and of nodes of random circuits with as many edges / nodes as ``a`` and ``b``."""
    g = torch.Generator().manual_seed(seed)
    valid = graph.valid.nonzero()
    nodes = [k for k in graph.senders if k[0] != "embed"]
    size = [(int(m.sum()), len(_nodes(graph, m))) for m in (a, b)]
    out = np.empty((draws, 2))
    for i in range(draws):
        picks = [set(torch.randperm(len(valid), generator=g)[:n].tolist()) for n, _ in size]
        out[i, 0] = jaccard(*picks)
        picks = [{nodes[j] for j in torch.randperm(len(nodes), generator=g)[:k].tolist()} for _, k in size]
        out[i, 1] = jaccard(*picks)
    return out


def edge_overlap(
    a,
    b,
    size_a: int,
    size_b: int,
    *,
    rank: str = "absolute",
    n_boot: int = 200,
    n_splits: int = 10,
    n_chance: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """The overlap of two edge circuits of one model, beside what chance and resampling give.

    ``a``, ``b``: :class:`lsa.attribution.EdgeScores` of two prompt sets (e.g. English and Chinese),
    per prompt; the circuits are each set's top ``size_a`` / ``size_b`` edges by ``rank``, pruned
    (:meth:`lsa.attribution.EdgeScores.circuit`).
    One row per unit, ``"edges"`` and ``"nodes"`` (heads and MLPs), with columns:

    - ``observed``: Jaccard of the two circuits; ``ci_low``, ``ci_high``: 95% bootstrap interval
      (each set's prompts resampled, ``n_boot`` times);
    - ``chance``, ``chance_95``: mean and 95th percentile of the Jaccard of random circuits with as
      many edges (nodes) as the two (``n_chance`` draws);
    - ``within_a``, ``within_b``: resampling, the Jaccard of the circuits of two disjoint halves of one
      set's prompts; ``across_halves``: a half of ``a`` against a half of ``b``, so at the same sample size
      as ``within_*`` (means over ``n_splits`` random halvings).
    """
    graph = a.graph
    ca, cb = a.circuit(size_a, rank), b.circuit(size_b, rank)
    observed = overlaps(graph, ca, cb)
    g = torch.Generator().manual_seed(seed)
    boot = np.array(
        [
            overlaps(
                graph,
                a.circuit(size_a, rank, _draw(len(a.per_prompt), g)),
                b.circuit(size_b, rank, _draw(len(b.per_prompt), g)),
            )
            for _ in range(n_boot)
        ]
    ).reshape(-1, 2)
    within_a, within_b, across = [], [], []
    for _ in range(n_splits):
        ha, hb = _halves(len(a.per_prompt), g), _halves(len(b.per_prompt), g)
        circuits_a = [a.circuit(size_a, rank, rows) for rows in ha]
        circuits_b = [b.circuit(size_b, rank, rows) for rows in hb]
        within_a.append(overlaps(graph, *circuits_a))
        within_b.append(overlaps(graph, *circuits_b))
        across += [overlaps(graph, x, y) for x, y in zip(circuits_a, circuits_b)]
    chance = chance_overlaps(graph, ca, cb, n_chance, seed)
    rows = []
    for i, unit in enumerate(("edges", "nodes")):
        lo, hi = bootstrap.interval(boot[:, i])
        rows.append(
            {
                "unit": unit,
                "observed": observed[i],
                "ci_low": lo,
                "ci_high": hi,
                **_references(chance[:, i]),
                "within_a": float(np.mean([w[i] for w in within_a])),
                "within_b": float(np.mean([w[i] for w in within_b])),
                "across_halves": float(np.mean([w[i] for w in across])),
            }
        )
    return pd.DataFrame(rows)


def _references(chance: np.ndarray) -> dict[str, float]:
    return {"chance": float(chance.mean()), "chance_95": float(np.percentile(chance, 95))}


def stability(
    scores, size: int, *, rank: str = "absolute", n_splits: int = 10, n_chance: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """How far one prompt set's edge circuit holds across its prompts: the Jaccard of the top-``size`` circuits
    (pruned) of two disjoint halves of the prompts, over ``n_splits`` random halvings (``within``: mean,
    ``within_min``, ``within_max``), beside random circuits of the same sizes (``chance``, ``chance_95``).
    One row per unit, ``"edges"`` and ``"nodes"``."""
    graph, g = scores.graph, torch.Generator().manual_seed(seed)
    pairs = [[scores.circuit(size, rank, rows) for rows in _halves(len(scores.per_prompt), g)] for _ in range(n_splits)]
    seen = np.array([overlaps(graph, *pair) for pair in pairs])
    chance = chance_overlaps(graph, *pairs[0], n_chance, seed)
    rows = []
    for i, unit in enumerate(("edges", "nodes")):
        spread = {"within": seen[:, i].mean(), "within_min": seen[:, i].min(), "within_max": seen[:, i].max()}
        rows.append({"unit": unit, **spread, **_references(chance[:, i])})
    return pd.DataFrame(rows)


def _draw(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(n, (n,), generator=g)


def _halves(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=g)
    return order[: n // 2], order[n // 2 : 2 * (n // 2)]


VERDICT_RULE = (
    "1) each circuit must keep at least the target share of its own language's behaviour on held-out prompts "
    "(normalised faithfulness), or the verdict is 'inconclusive': circuits that do not explain the behaviour say "
    "nothing of the mechanism; 2) 'same' when, besides, each circuit keeps at least the target of the other "
    "language's behaviour and the two languages' circuits overlap beyond chance: their heads and MLPs, from half "
    "of each language's prompts, overlap more than the 95th percentile of random circuits of the same sizes; "
    "3) 'different' when, besides 1, one circuit's cross-language faithfulness interval lies wholly below the "
    "target and that cross-language overlap is below both languages' overlap between two halves of their own "
    "prompts; 4) otherwise 'inconclusive'. Overlaps are compared at half samples on both sides, as the circuits "
    "of resampled prompts overlap less than those of all of them."
)


def verdict(faith: pd.DataFrame, overlap: pd.DataFrame, target: float = 0.8) -> tuple[str, list[str]]:
    """ "same", "different" or "inconclusive" by :data:`VERDICT_RULE`, with the reasons in words.

    ``faith``: each circuit in each language on held-out prompts (:func:`lsa.circuits.faithfulness_table` rows:
    ``circuit``, ``circuit_language``, ``language``, ``normalized``, ``ci_low``, ``ci_high``); ``overlap``:
    :func:`edge_overlap`'s frame.
    """
    own = faith[faith["language"] == faith["circuit_language"]]
    cross = faith[faith["language"] != faith["circuit_language"]]
    nodes = overlap.set_index("unit").loc["nodes"]
    weak = [
        f"{r.circuit} keeps {r.normalized:.2f} of its own language's behaviour"
        for r in own.itertuples()
        if not r.normalized >= target
    ]
    if weak or own.empty:
        return "inconclusive", weak or ["no held-out faithfulness of the circuits in their own language"]
    reasons = [
        f"{r.circuit} keeps {r.normalized:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] of {r.language}"
        for r in cross.itertuples()
    ]
    above_chance = nodes["across_halves"] > nodes["chance_95"]
    reasons.append(
        f"node overlap {nodes['observed']:.2f} [{nodes['ci_low']:.2f}, {nodes['ci_high']:.2f}] against chance "
        f"{nodes['chance']:.2f} (95th percentile {nodes['chance_95']:.2f}); at half samples across languages "
        f"{nodes['across_halves']:.2f}, within each language {nodes['within_a']:.2f} and {nodes['within_b']:.2f}"
    )
    if len(cross) and (cross["normalized"] >= target).all() and above_chance:
        return "same", reasons
    below = (cross["ci_high"] < target).any()
    if below and nodes["across_halves"] < min(nodes["within_a"], nodes["within_b"]):
        return "different", reasons
    return "inconclusive", reasons
