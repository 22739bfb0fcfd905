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

from lsa.circuits.data import LOGITS, Circuit, component_name


def _weights(circuit: Circuit, units: dict) -> dict:
    w = {}
    for unit, comps in units.items():
        w[unit] = sum(abs(c.effect) if c.effect is not None else 1.0 for c in comps)
    total = sum(w.values())
    return {u: v / total for u, v in w.items()} if total > 0 else w


def _units(circuit: Circuit, by: str) -> dict:
    units: dict = {}
    for c in circuit.components:
        unit = c.key if by == "component" else (c.role or "unlabelled")
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
    rows = []
    for unit in list(ua) + [u for u in ub if u not in ua]:
        in_a, in_b = unit in ua, unit in ub
        status = "shared" if in_a and in_b else f"only {la}" if in_a else f"only {lb}"
        row = {"unit": component_name(unit) if by == "component" else unit, "status": status}
        if by == "component":
            ca, cb = (ua[unit][0] if in_a else None), (ub[unit][0] if in_b else None)
            row.update(
                kind=unit[0],
                layer=unit[1],
                index=unit[2] if len(unit) == 3 else None,
                **{f"role_{la}": ca.role if ca else None, f"role_{lb}": cb.role if cb else None},
                **{f"effect_{la}": ca.effect if ca else None, f"effect_{lb}": cb.effect if cb else None},
            )
            row["same_role"] = bool(ca and cb and ca.role == cb.role) if in_a and in_b else None
        else:
            for lab, circ, units in ((la, a, ua), (lb, b, ub)):
                comps = units.get(unit, [])
                row[f"count_{lab}"] = len(comps)
                row[f"depth_{lab}"] = (
                    float(np.mean([(c.layer + 0.5) / circ.n_layers for c in comps])) if comps else None
                )
                row[f"components_{lab}"] = ", ".join(c.name for c in comps)
        row[f"weight_{la}"] = wa.get(unit, 0.0)
        row[f"weight_{lb}"] = wb.get(unit, 0.0)
        rows.append(row)
    table = pd.DataFrame(rows)
    keys = list(dict.fromkeys([*ua, *ub]))
    mins = sum(min(wa.get(u, 0.0), wb.get(u, 0.0)) for u in keys)
    maxs = sum(max(wa.get(u, 0.0), wb.get(u, 0.0)) for u in keys)
    shared = [u for u in ua if u in ub]
    summary = {
        "a": la,
        "b": lb,
        "by": by,
        "n_a": len(a),
        "n_b": len(b),
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
