"""Circuit discovery: iterated path patching from the logits backwards (Wang et al. 2022).

:func:`discover` runs the steps, with one explicit selection rule (:func:`select`):

1) step 1: every head -> logits (:func:`lsa.patching.path_patching`);
2) step ``s > 1``: every earlier head -> the query, key and value (each on its
   own) of the heads that were *new* at step ``s - 1``;
3) at every step and receiver input, a head is selected when its normalised
   effect ``(patched - clean) / (clean - corrupt)`` lies at least ``k`` standard
   deviations (population std over all candidate senders of that step and
   input) from their mean, **and** ``|effect| >= floor``. With fewer than two
   candidates, or no spread, only the floor decides;
4) stop when no new head is selected or after ``max_steps``.

Positions (``positions="auto"``, the default): a sender's output is patched at the
end position alone for the logits and for receivers' queries, and at every
position for receivers' keys and values. With every other head frozen a sender
reaches the logits only through the end position's residual, so for step 1 this
equals patching every position; into queries it reads "the receivers' queries at
the end", where the IOI heads read; keys and values are read at every position a
receiver attends to. Patching at the end lets each run recompute that position
alone (:func:`lsa.patching.path_patching`'s prefix reuse). ``positions="all"``
patches every position at every step (the variant before this rule).

Roles of the heads found are then suggested by :mod:`lsa.circuits.ioi_roles`.

Cost: discovery runs one path-patching sweep for the logits and three per later
step (one forward per sender from its layer on), plus one per receiver and
input for per-receiver edges, plus the role scores (:func:`lsa.circuits.ioi_roles.head_scores`).

>>> found = discover(model, prompts, k=1.5, floor=0.05)       # doctest: +SKIP
>>> found.circuit.table()                                      # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lsa.circuits.data import LOGITS, Circuit, Component, Edge, component_name, json_safe
from lsa.circuits.ioi_roles import head_scores, suggest_roles
from lsa.model import Model
from lsa.tasks import PromptSet


def select(effects, k: float = 1.5, floor: float = 0.05) -> pd.DataFrame:
    """The selection rule: ``z = (e - mean) / std`` (population std) and ``selected = |z| >= k and |e| >= floor``.

    ``effects``: normalised effects of all candidate senders of one step ``[n]``.
    With fewer than two candidates or zero spread the z-test passes and only
    the floor decides. Returns columns ``effect``, ``z``, ``selected``.

    >>> select([0.0, 0.0, 0.0, -0.9], k=1.5, floor=0.05).selected.tolist()
    [False, False, False, True]
    """
    e = np.asarray(effects, dtype=float).reshape(-1)
    if k < 0 or floor < 0:
        raise ValueError(f"k and floor must be >= 0, got k={k}, floor={floor}")
    finite = np.isfinite(e)
    std = e[finite].std() if finite.sum() > 1 else 0.0
    if std > 0:
        z = (e - e[finite].mean()) / std
        passes = np.abs(z) >= k
    else:
        z = np.zeros_like(e)
        passes = np.ones_like(e, dtype=bool)
    selected = finite & passes & (np.abs(e) >= floor)
    return pd.DataFrame({"effect": e, "z": z, "selected": selected})


def path_step(
    model: Model,
    prompts: PromptSet,
    receivers="logits",
    receiver_input: str = "q",
    *,
    k: float = 1.5,
    floor: float = 0.05,
    direction: str = "noising",
    metric=None,
    batch_size: int | None = None,
    progress: bool = False,
    positions: str = "auto",
) -> pd.DataFrame:
    """One discovery step: path patching every candidate head -> ``receivers`` and the selection rule.

    ``receivers``: ``"logits"`` or a list of ``(layer, head)``; candidates are the heads
    in layers before the last receiver. Returns one row per candidate: ``layer``,
    ``head``, ``receiver_input`` ("logits", "q", "k" or "v"), ``receivers`` (names),
    ``metric``, ``raw_effect`` (metric change), ``effect`` (the change over ``clean - corrupt``:
    noising, the usual normalised effect, negative = the head carries the behaviour;
    denoising, positive = it does), ``z``, ``selected``.
    """
    from lsa import patching

    to_logits = isinstance(receivers, str)
    kind = LOGITS if to_logits else receiver_input
    names = LOGITS if to_logits else ", ".join(component_name(r) for r in receivers)
    a = model.adapter
    last = a.n_layers if to_logits else max(layer for layer, _ in receivers)
    senders = [(layer, h) for layer in range(last) for h in range(a.n_heads)]
    cols = ["layer", "head", "receiver_input", "receivers", "metric", "raw_effect", "effect", "z", "selected"]
    if not senders:
        return pd.DataFrame(columns=cols)
    res = patching.path_patching(
        model,
        prompts,
        senders,
        receivers,
        receiver_input=receiver_input,
        direction=direction,
        metric=metric,
        batch_size=batch_size,
        progress=progress,
        positions=sender_positions(kind, positions),
    )
    frame = res.frame
    span = float(res.clean.mean() - res.corrupt.mean())
    if span == 0:
        raise ValueError("clean and counterfactual metrics are equal: normalised effects are undefined")
    # change from the patched run's own baseline, in units of (clean - corrupt): noising = res.normalized
    sel = select(frame["effect"].to_numpy() / span, k=k, floor=floor)
    out = pd.DataFrame(
        {
            "layer": frame["layer"].astype(int),
            "head": frame["head"].astype(int),
            "receiver_input": kind,
            "receivers": names,
            "metric": frame["metric"],
            "raw_effect": frame["effect"],
            "effect": sel["effect"],
            "z": sel["z"],
            "selected": sel["selected"],
        }
    )
    out.attrs.update(clean=float(res.clean.mean()), corrupt=float(res.corrupt.mean()))
    return out[cols]


POSITIONS = ("auto", "all")


def sender_positions(receiver_input: str, positions: str = "auto") -> str | None:
    """Where senders are patched for a receiver input under the discovery's position rule (module docstring).

    >>> sender_positions("logits"), sender_positions("q"), sender_positions("k"), sender_positions("q", "all")
    ('end', 'end', None, None)
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    return "end" if positions == "auto" and receiver_input in (LOGITS, "q") else None


@dataclass
class Discovery:
    """What :func:`discover` found: the ``circuit``, every step's table (``steps``) and the heads' ``scores``."""

    circuit: Circuit
    steps: pd.DataFrame
    scores: pd.DataFrame | None = None

    @property
    def n_steps(self) -> int:
        return int(self.steps["step"].max()) if len(self.steps) else 0

    def step(self, i: int, top: int | None = None) -> pd.DataFrame:
        """Step ``i``'s candidates, strongest first (|effect|), optionally the ``top`` per receiver input."""
        frame = self.steps[self.steps["step"] == i].copy()
        frame = frame.assign(_abs=frame["effect"].abs()).sort_values(
            ["receiver_input", "_abs"], ascending=[True, False]
        )
        if top is not None:
            frame = frame.groupby("receiver_input", sort=False).head(top)
        return frame.drop(columns="_abs").reset_index(drop=True)

    def selected(self) -> pd.DataFrame:
        return self.steps[self.steps["selected"]].reset_index(drop=True)


def _edge_effects(model, prompts, senders, receivers, kind, *, per_receiver, direction, metric, batch_size, positions):
    """``{(sender, receiver): normalised effect}`` for selected senders into receivers' ``kind`` input."""
    from lsa import patching

    out = {}
    groups = [[r] for r in receivers] if per_receiver else [list(receivers)]
    for group in groups:
        usable = [s for s in senders if s[0] < max(layer for layer, _ in group)]
        if not usable:
            continue
        res = patching.path_patching(
            model,
            prompts,
            usable,
            group,
            receiver_input=kind,
            direction=direction,
            metric=metric,
            batch_size=batch_size,
            progress=False,
            positions=sender_positions(kind, positions),
        )
        span = float(res.clean.mean() - res.corrupt.mean())
        for s, v in zip(usable, (res.effect / span).tolist()):
            for r in group:
                if s[0] < r[0]:
                    out[(s, r)] = v
    return out


def discover(
    model: Model,
    prompts: PromptSet,
    *,
    k: float = 1.5,
    floor: float = 0.05,
    max_steps: int = 3,
    receiver_input: str = "qkv",
    direction: str = "noising",
    metric=None,
    per_receiver_edges: bool = True,
    roles: bool = True,
    attention: float = 0.3,
    batch_size: int | None = None,
    progress: bool = True,
    positions: str = "auto",
) -> Discovery:
    """Discover a circuit of heads by iterated path patching from the logits backwards (module docstring).

    Args:
        k, floor: the selection rule (:func:`select`), applied per step and receiver input.
        max_steps: at most this many steps (step 1 = heads -> logits).
        receiver_input: which inputs of the previous step's new heads are receivers
            at later steps, each on its own ("qkv" = query, key and value).
        per_receiver_edges: measure each edge sender -> receiver on its own (one
            path-patching run per receiver and input); else every edge of a step gets
            the effect into the whole receiver set.
        roles: suggest roles (:func:`suggest_roles`; one captured forward).
        positions: ``"auto"`` (senders at the end for the logits and queries, at every
            position for keys and values: module docstring) or ``"all"`` (every position).
        progress: a line per step and receiver input, and each sweep's progress bar.

    Returns a :class:`Discovery` (``.circuit``, ``.steps``, ``.scores``). A model in
    which no head passes the rule gives an empty circuit, not an error.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    kinds = list(dict.fromkeys(receiver_input))
    if not kinds or any(x not in "qkv" for x in kinds):
        raise ValueError(f"receiver_input must be letters from 'qkv', got {receiver_input!r}")
    sender_positions(LOGITS, positions)  # checks the rule's name
    kw = dict(
        k=k,
        floor=floor,
        direction=direction,
        metric=metric,
        batch_size=batch_size,
        progress=progress,
        positions=positions,
    )
    params = dict(
        k=k,
        floor=floor,
        max_steps=max_steps,
        receiver_input=receiver_input,
        direction=direction,
        n_prompts=len(prompts),
        positions=positions,
    )
    params["metric"] = getattr(metric, "__name__", "logit_diff") if metric is not None else "logit_diff"
    circuit = Circuit.empty_for(
        model, prompts.task, prompts.language, method="iterated path patching", parameters=params
    )
    tables, frontier = [], None
    say = print if progress else (lambda *args: None)
    for step in range(1, max_steps + 1):
        if step == 1:
            say(f"step 1: every head -> logits (senders at {sender_positions(LOGITS, positions) or 'every position'})")
            frames = [path_step(model, prompts, LOGITS, **kw)]
        else:
            frames = []
            for kind in kinds:
                where = sender_positions(kind, positions) or "every position"
                say(f"step {step}: earlier heads -> {kind} of {len(frontier)} new head(s) (senders at {where})")
                frames.append(path_step(model, prompts, frontier, kind, **kw))
        new: list[tuple[int, int]] = []
        for frame in frames:
            if not len(frame):
                continue
            if step == 1:
                circuit.evidence.update(clean=frame.attrs.get("clean"), corrupt=frame.attrs.get("corrupt"))
            frame = frame.assign(step=step, new=False)
            kind = frame["receiver_input"].iloc[0]
            chosen = frame[frame["selected"]]
            senders = [(int(r.layer), int(r.head)) for r in chosen.itertuples()]
            for r in chosen.itertuples():
                head = (int(r.layer), int(r.head))
                if head not in circuit and head not in new:
                    new.append(head)
                    frame.loc[r.Index, "new"] = True
                    circuit.add(
                        Component(
                            "head",
                            head[0],
                            head[1],
                            effect=float(r.effect),
                            evidence=dict(
                                step=step,
                                receiver_input=kind,
                                receivers=r.receivers,
                                effect=float(r.effect),
                                raw_effect=float(r.raw_effect),
                                z=float(r.z),
                                rule=f"|z| >= {k} and |effect| >= {floor}",
                            ),
                        )
                    )
            if kind == LOGITS:
                for r in chosen.itertuples():
                    circuit.edges.append(Edge(("head", int(r.layer), int(r.head)), (LOGITS,), LOGITS, float(r.effect)))
            elif senders and len(frontier) == 1:  # one receiver: the step's own effects are the edges
                effects = {(s, frontier[0]): float(r.effect) for s, r in zip(senders, chosen.itertuples())}
            elif senders:
                effects = _edge_effects(
                    model,
                    prompts,
                    senders,
                    frontier,
                    kind,
                    per_receiver=per_receiver_edges,
                    direction=direction,
                    metric=metric,
                    batch_size=batch_size,
                    positions=positions,
                )
            if kind != LOGITS and senders:
                for (s, r), v in effects.items():
                    circuit.edges.append(
                        Edge(("head", *s), ("head", *r), kind, v, evidence={"per_receiver": per_receiver_edges})
                    )
            tables.append(frame)
        say(f"step {step}: {len(new)} new head(s): {', '.join(component_name(h) for h in new) or 'none'}")
        if not new:
            break
        frontier = sorted(new)
    steps = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    circuit.evidence["steps"] = json_safe(steps.to_dict("records"))  # every candidate's score, kept with the circuit
    scores = None
    if roles and len(circuit) and model.remote:
        warnings.warn(
            "role suggestions read attention patterns and weights locally: skipped for a remote model "
            "(the circuit and its edges are complete)",
            stacklevel=2,
        )
    elif roles and len(circuit):
        scores = head_scores(model, prompts)
        suggest_roles(circuit, scores, attention=attention)
    return Discovery(circuit=circuit, steps=steps, scores=scores)
