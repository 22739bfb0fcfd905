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

Positions (``positions="auto"``, the default; Wang et al. patch senders at END, S2 and
S1+1). Every head of the circuit has a *query position*, where its output was found to
matter: the end for heads found through the logits, and otherwise the position its
output was patched at. A step patches senders

- into the logits, and into receivers' queries, at the receivers' query position (the end
  for the logits): with every other head frozen a sender reaches the logits only through the
  end position's residual, so for step 1 this equals patching every position;
- into receivers' keys and values, at the position the receivers attend to most from their
  query position: of the prompt set's named positions and the token after each (``IO``,
  ``S1``, ``S1+1``, ``S2``, ``end``, ...), the one with the highest attention averaged over
  the prompts and the receivers (:func:`attended_position`, one forward reading the patterns).

Receivers whose query position is the end are read there: into their keys and values, a
sender's path runs through their output at the end alone (at every other position they keep
the base run's output; :func:`lsa.patching.path_patching`'s ``receivers_at="end"``), as
their effect was found at the end. Each such run then recomputes one position per prompt,
twice: the senders' one, then the end (every prompt in one forward, each at its own
positions). Receivers of another query position pass on their output wherever the patched
keys and values reach it. Receivers of one query position are patched together; one sweep
per query position for the queries, and one for the keys and values together (each input
scored on its own, from one senders' run: :func:`lsa.patching.path_patching`'s tuple of
inputs). A head found through keys or values at ``S2`` thus has ``S2`` as its query
position: the next step looks for what its query reads at ``S2`` and what its keys and values
hold where it attends from there (an induction head at S2 -> previous-token heads at S1+1).
Patching one position lets each run recompute that position and the ones after it alone
(:func:`lsa.patching.path_patching`'s prefix reuse). ``positions="all"`` patches every
position at every step (the variant before this rule): it also finds heads whose effect is
spread over positions, at many times the cost.

Roles of the heads found are then suggested by :mod:`lsa.circuits.ioi_roles`.

Cost: two unpatched runs of the prompts (:func:`lsa.patching.path_runs`), shared by
every sweep; one path-patching sweep for the logits and two per later step and query
position (one forward per sender from its layer on, of the positions above), plus one per
receiver and input for per-receiver edges; one forward reading attention patterns per
key / value group; and the role scores (:func:`lsa.circuits.ioi_roles.head_scores`).

>>> found = discover(model, prompts, k=1.5, floor=0.05)       # doctest: +SKIP
>>> found.circuit.table()                                      # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from lsa import ablation
from lsa.attribution import EDGE_METHODS, RANKS, EdgeScores, edge_attribution
from lsa.circuits.data import LOGITS, Circuit, Component, Edge, component_name, json_safe
from lsa.circuits.faithful import CURVE_SHARES, Curve, edge_curve, edge_curves, edge_sizes, node_curve
from lsa.circuits.ioi_roles import head_scores, suggest_roles
from lsa.model import Model
from lsa.tasks import PromptSet

METHODS = ("eap-ig", "eap", "path-patching")
TARGET = 0.8  # the normalised faithfulness a circuit must keep (Wang et al.'s IOI circuit keeps 0.87)


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


STEP_COLUMNS = [
    "layer", "head", "receiver_input", "receivers", "position", "receivers_at", "metric", "raw_effect", "effect",
    "z", "selected",
]  # fmt: skip


def path_step(
    model: Model,
    prompts: PromptSet,
    receivers="logits",
    receiver_input: str | tuple[str, ...] = "q",
    *,
    k: float = 1.5,
    floor: float = 0.05,
    direction: str = "noising",
    metric=None,
    positions: str | int = "auto",
    receivers_at: str | None = "auto",
    unpatched=None,
    **chunking,
) -> pd.DataFrame:
    """One discovery step: path patching every candidate head -> ``receivers`` and the selection rule.

    ``receivers``: ``"logits"`` or a list of ``(layer, head)``; candidates are the heads
    in layers before the last receiver. ``positions``: where senders are patched: ``"auto"``
    (the rule of the module docstring, for receivers whose query position is the end),
    ``"all"`` (every position) or a position (a name such as ``"S2"`` or ``"S1+1"``, or an
    index). ``receivers_at``: where the receivers' outputs take the patched path
    (:func:`lsa.patching.path_patching`): ``"auto"`` (:func:`receivers_read_at`), ``"end"`` or
    ``None`` (every position). ``unpatched``: :func:`lsa.patching.path_runs` of these prompts,
    shared between steps; ``chunking``: ``batch_size`` and ``progress``. Returns one row per candidate
    (:data:`STEP_COLUMNS`): ``layer``, ``head``, ``receiver_input`` ("logits", "q", "k" or "v"), ``receivers``
    (names), ``position`` (where the senders were patched; "all" = every position), ``receivers_at``
    ("end", or "all": every position), ``metric``, ``raw_effect`` (metric change), ``effect`` (the change
    over ``clean - corrupt``: noising, the usual normalised effect, negative = the head carries the
    behaviour; denoising, positive = it does), ``z``, ``selected``. A tuple ``receiver_input`` such as
    ``("k", "v")`` sweeps each input on its own (the selection rule per input), those patched at the
    same position from one senders' run (:func:`lsa.patching.path_patching`'s tuple of inputs); the
    frame holds every input's rows, input after input.
    """
    from lsa import patching

    to_logits = isinstance(receivers, str)
    kinds = [LOGITS] if to_logits else [receiver_input] if isinstance(receiver_input, str) else list(receiver_input)
    names = LOGITS if to_logits else ", ".join(component_name(r) for r in receivers)
    last = model.adapter.n_layers if to_logits else max(layer for layer, _ in receivers)
    senders = [(layer, h) for layer in range(last) for h in range(model.adapter.n_heads)]
    if not senders:
        return pd.DataFrame(columns=STEP_COLUMNS)
    sweeps: dict[tuple, list[str]] = {}  # (where senders are patched, where receivers read) -> inputs
    for kind in kinds:
        at = sender_position(model, prompts, receivers, kind, positions, direction=direction)
        read_at = receivers_read_at(kind, at) if receivers_at == "auto" else receivers_at
        sweeps.setdefault((at, read_at), []).append(kind)
    frames = {}
    for (at, read_at), inputs in sweeps.items():
        res = patching.path_patching(
            model, prompts, senders, receivers, receiver_input="q" if to_logits else tuple(inputs),
            direction=direction, metric=metric, positions=at, receivers_at=read_at, unpatched=unpatched, **chunking,
        )  # fmt: skip
        for kind, one in ({LOGITS: res} if to_logits else res).items():
            where = dict(receiver_input=kind, receivers=names, position="all" if at is None else str(at))
            frames[kind] = _step_frame(one, k, floor, receivers_at=read_at or "all", **where)
    out = pd.concat([frames[kind] for kind in kinds], ignore_index=True) if len(kinds) > 1 else frames[kinds[0]]
    out.attrs.update(clean=float(one.clean.mean()), corrupt=float(one.corrupt.mean()))  # the same in every sweep
    return out


def _step_frame(res, k: float, floor: float, **where) -> pd.DataFrame:
    """A sweep's rows of :func:`path_step`: the effects over ``clean - corrupt`` and the selection rule;
    ``where``: the columns every row shares (the receivers' input and names, the positions)."""
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
            **where,
            "metric": frame["metric"],
            "raw_effect": frame["effect"],
            "effect": sel["effect"],
            "z": sel["z"],
            "selected": sel["selected"],
        }
    )
    return out[STEP_COLUMNS]


POSITIONS = ("auto", "all")


def sender_position(
    model: Model,
    prompts: PromptSet,
    receivers,
    receiver_input: str,
    positions: str | int = "auto",
    *,
    query: str = "end",
    direction: str = "noising",
) -> str | int | None:
    """Where senders are patched into ``receivers``' ``receiver_input`` (None = every position).

    ``positions="auto"``: the rule of the module docstring for receivers whose query position is
    ``query``: there for the logits and queries; for keys and values, :func:`attended_position`.
    ``"all"``: every position. Any other value is a position and is returned as it is.
    """
    if positions == "all":
        return None
    if positions != "auto":
        return positions
    if receiver_input in (LOGITS, "q") or isinstance(receivers, str):
        return query
    return attended_position(model, prompts, receivers, query, direction=direction)


def receivers_read_at(receiver_input: str, at, query: str = "end") -> str | None:
    """Where receivers' outputs take the patched path under the rule: ``"end"`` for keys and values of
    receivers whose query position is the end, with the senders at one position; else every position (None).

    >>> receivers_read_at("v", "S2"), receivers_read_at("q", "end"), receivers_read_at("k", None)
    ('end', None, None)
    """
    return "end" if receiver_input in ("k", "v") and at is not None and query == "end" else None


def candidate_positions(prompts: PromptSet) -> list[str]:
    """The positions a key / value step may patch at: every named position and ``"end"``, then the token after each."""
    from lsa.patching import position_index

    names = [*prompts.positions, *([] if "end" in prompts.positions else ["end"])]
    out = list(names)
    for name in names:
        try:
            position_index(prompts, f"{name}+1")
        except IndexError:  # after the end in some prompt
            continue
        out.append(f"{name}+1")
    return out


@torch.no_grad()
def attention_from(
    model: Model, prompts: PromptSet, heads, query: str = "end", *, direction: str = "noising", chunk: int = 32
) -> torch.Tensor:
    """Each head's attention from ``query`` (a position name) in the base run: ``[n, len(heads), pos]``.

    The base run is the clean prompts for noising, the counterfactual ones for denoising.
    """
    from lsa import engine
    from lsa.engine import Plan, Read
    from lsa.sweeps import base_donor_tokens, position_index

    heads = list(heads)
    tokens = base_donor_tokens(model, prompts, direction)[0]
    where = position_index(prompts, query)
    layers = sorted({layer for layer, _ in heads})
    out = []
    for lo in range(0, len(prompts), chunk):
        q = where[lo : lo + chunk].to(model.device)
        rows = torch.arange(len(q), device=model.device)
        reads = [Read("pattern", layer, fn=lambda p, q=q, rows=rows: p[rows, :, q]) for layer in layers]
        plan = Plan(reads=reads, logits=None, stop_after=("pattern", layers[-1]))
        seen = engine.run(model, tokens[lo : lo + chunk].to(model.device), plan).values
        out.append(torch.stack([seen[("pattern", layer)][:, head].float().cpu() for layer, head in heads], 1))
    return torch.cat(out)


def attended_position(
    model: Model, prompts: PromptSet, receivers, query: str = "end", *, direction: str = "noising"
) -> str:
    """The candidate position (:func:`candidate_positions`) the receivers attend to most from ``query``.

    Attention averaged over the prompts and the receivers; ties go to the earlier candidate.
    """
    from lsa.patching import position_index

    att = attention_from(model, prompts, receivers, query, direction=direction)  # [n, r, pos]
    rows = torch.arange(len(prompts))
    best, best_score = None, -1.0
    for name in candidate_positions(prompts):
        score = float(att[rows, :, position_index(prompts, name).cpu()].mean())
        if score > best_score:
            best, best_score = name, score
    return best


@dataclass
class Discovery:
    """What :func:`discover` found: the ``circuit``, path patching's step tables (``steps``; empty for edge
    attribution), the heads' role ``scores``, and for edge attribution its faithfulness ``curve`` on the
    discovery prompts (:class:`lsa.circuits.faithful.Curve`) and the ``edges`` scores
    (:class:`lsa.attribution.EdgeScores`)."""

    circuit: Circuit
    steps: pd.DataFrame
    scores: pd.DataFrame | None = None
    curve: Curve | None = None
    edges: EdgeScores | None = None

    @property
    def size(self) -> int:
        """The circuit's size along its ranking: the number of top edges it was cut at, or its heads."""
        return int(self.circuit.evidence["size"]) if self.edges is not None else len(self.circuit)

    def heldout_curve(self, model: Model, prompts: PromptSet, **kwargs) -> Curve:
        """The faithfulness curve of this discovery's ranking on other ``prompts``, the circuit's own size
        included (:meth:`Curve.at` gives its faithfulness): an edge circuit along its edge ranking at MIB's
        shares (:func:`edge_curve`); a path-patching circuit along the order its heads were found in,
        at 1, 2, 4, ... heads (:func:`node_curve`)."""
        if self.edges is not None:
            sizes = sorted({*edge_sizes(self.edges.graph), self.size})
            rank = self.circuit.evidence["parameters"]["rank"]
            return edge_curve(model, self.edges, prompts, sizes=sizes, rank=rank, **kwargs)
        sizes = sorted({*(2**i for i in range(max(1, self.size).bit_length())), self.size} - {0})
        return node_curve(model, self.circuit.keys, prompts, sizes=sizes, **kwargs)

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


def path_patching_discovery(
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
    positions: str = "auto",
    **chunking,
) -> Discovery:
    """A circuit of heads by iterated path patching from the logits backwards (module docstring).

    Args:
        k, floor: the selection rule (:func:`select`), applied per step and receiver input.
        max_steps: at most this many steps (step 1 = heads -> logits).
        receiver_input: which inputs of the previous step's new heads are receivers
            at later steps, each on its own ("qkv" = query, key and value).
        per_receiver_edges: measure each edge sender -> receiver on its own (one
            path-patching run per receiver and input); else every edge of a step gets
            the effect into the whole receiver set.
        roles: suggest roles (:func:`suggest_roles`; one captured forward).
        positions: ``"auto"`` (each head's query position for the logits and queries, the
            position the receivers attend to most for keys and values: module docstring) or
            ``"all"`` (every position at every step). ``steps["position"]`` says where each
            sweep patched its senders.
        chunking: ``batch_size``, and ``progress`` (default True: a line per step and receiver input,
            and each sweep's progress bar).

    Returns a :class:`Discovery` (``.circuit``, ``.steps``, ``.scores``). A model in
    which no head passes the rule gives an empty circuit, not an error.
    """
    from lsa.patching import check_prompts, path_runs

    check_prompts(prompts, model)  # before anything reads the prompts' positions
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    kinds = list(dict.fromkeys(receiver_input))
    if not kinds or any(x not in "qkv" for x in kinds):
        raise ValueError(f"receiver_input must be letters from 'qkv', got {receiver_input!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    progress = chunking.setdefault("progress", True)
    params = dict(k=k, floor=floor, max_steps=max_steps, receiver_input=receiver_input, direction=direction)
    params.update(n_prompts=len(prompts), positions=positions)
    params["metric"] = getattr(metric, "__name__", "logit_diff") if metric is not None else "logit_diff"
    circuit = Circuit.empty_for(
        model, prompts.task, prompts.language, method="iterated path patching", parameters=params
    )
    unpatched = path_runs(model, prompts, direction)  # every sweep starts from the same two runs
    search = _PathSearch(model, prompts, circuit, kinds, positions, per_receiver_edges, progress)
    search.rule, search.sweep = dict(k=k, floor=floor), dict(direction=direction, metric=metric, unpatched=unpatched)
    search.sweep.update(chunking)
    frontier = None
    for step in range(1, max_steps + 1):
        new = search.step(step, frontier)
        if not new:
            break
        frontier = sorted(new)
    steps = pd.concat(search.tables, ignore_index=True) if search.tables else pd.DataFrame()
    circuit.evidence["steps"] = json_safe(steps.to_dict("records"))  # every candidate's score, kept with the circuit
    return Discovery(circuit=circuit, steps=steps, scores=_path_roles(model, prompts, circuit) if roles else None)


def _path_roles(model: Model, prompts: PromptSet, circuit: Circuit) -> pd.DataFrame | None:
    """Suggest the roles of the circuit's heads (:func:`suggest_roles`) where the weights are here."""
    from lsa import engine

    if not len(circuit):
        return None
    if not engine.can(model, "weights"):
        warnings.warn(
            "role suggestions read attention patterns and weights locally: skipped for a remote model "
            "(the circuit and its edges are complete)",
            stacklevel=3,
        )
        return None
    scores = head_scores(model, prompts)
    suggest_roles(circuit, scores)
    return scores


class _PathSearch:
    """Iterated path patching's state: the circuit so far, each head's query position (module docstring), the
    selection ``rule`` (``k``, ``floor``), the options every sweep shares (``sweep``) and the step tables."""

    def __init__(self, model, prompts, circuit, kinds, positions, per_receiver, progress):
        self.model, self.prompts, self.circuit = model, prompts, circuit
        self.kinds, self.positions, self.per_receiver = kinds, positions, per_receiver
        self.say = print if progress else (lambda *args: None)
        self.rule: dict = {}
        self.sweep: dict = {}
        self.query_at: dict[tuple[int, int], str] = {}
        self.tables: list[pd.DataFrame] = []

    def step(self, step: int, frontier) -> list[tuple[int, int]]:
        """Runs one step (step 1: every head -> logits; later: earlier heads -> ``frontier``'s inputs), adds
        what it selects to the circuit, and returns the heads new to it."""
        new: list[tuple[int, int]] = []
        for receivers, at, read_at, frame in self.sweeps(step, self.calls(step, frontier)):
            if len(frame):
                self.tables.append(self.take(step, receivers, at, frame, new))
                self.add_edges(frame, receivers, at, read_at)
        self.say(f"step {step}: {len(new)} new head(s): {', '.join(component_name(h) for h in new) or 'none'}")
        return new

    def calls(self, step: int, frontier) -> list[tuple]:
        """``(receivers, inputs, where senders are patched, the receivers' query position)`` of one step: one
        group of receivers per query position ("all": one group), one sweep per sender position."""
        if step == 1:
            return [(LOGITS, ("q",), sender_position(self.model, self.prompts, LOGITS, LOGITS, self.positions), "end")]
        groups: dict[str, list[tuple[int, int]]] = {}
        for head in frontier:
            groups.setdefault("all" if self.positions == "all" else self.query_at[head], []).append(head)
        calls = []
        for query, group in groups.items():
            at_kind: dict = {}  # where senders are patched -> the inputs patched there (one sweep)
            attended = None
            for kind in self.kinds:
                if self.positions == "all":
                    at = None
                elif kind == "q":
                    at = query
                else:  # keys and values: one reading of the patterns per group
                    direction = self.sweep["direction"]
                    attended = attended or attended_position(
                        self.model, self.prompts, group, query, direction=direction
                    )
                    at = attended
                at_kind.setdefault(at, []).append(kind)
            calls += [(group, tuple(inputs), at, query) for at, inputs in at_kind.items()]
        return calls

    def sweeps(self, step: int, calls: list[tuple]) -> list[tuple]:
        """``(receivers, at, read_at, table)`` per call and receiver input: :func:`path_step`'s tables."""
        out = []
        for receivers, inputs, at, query in calls:
            read_at = receivers_read_at(inputs[0], at, query)
            where = "every position" if at is None else at
            if isinstance(receivers, str):
                self.say(f"step 1: every head -> logits (senders at {where})")
            else:
                says = f"{len(receivers)} new head(s)" + ("" if self.positions == "all" else f" at {query}")
                read = ", read at the end" if read_at else ""
                self.say(f"step {step}: earlier heads -> {' and '.join(inputs)} of {says} (senders at {where}{read})")
            frame = path_step(
                self.model, self.prompts, receivers, inputs, positions="all" if at is None else at,
                receivers_at=read_at, **self.rule, **self.sweep,
            )  # fmt: skip
            for _, part in frame.groupby("receiver_input", sort=False):  # one table per input
                part = part.reset_index(drop=True)
                part.attrs.update(frame.attrs)
                out.append((receivers, at, read_at, part))
        return out

    def take(self, step: int, receivers, at, frame: pd.DataFrame, new: list) -> pd.DataFrame:
        """Adds the heads one table selects to the circuit (those new to it also to ``new``); the table with
        its ``step`` and which rows were ``new``."""
        if step == 1:
            self.circuit.evidence.update(clean=frame.attrs.get("clean"), corrupt=frame.attrs.get("corrupt"))
        frame = frame.assign(step=step, new=False)
        kind = frame["receiver_input"].iloc[0]
        rule = f"|z| >= {self.rule['k']} and |effect| >= {self.rule['floor']}"
        for r in frame[frame["selected"]].itertuples():
            head = (int(r.layer), int(r.head))
            if head in self.circuit or head in new:
                continue
            new.append(head)
            self.query_at[head] = "end" if kind == LOGITS or at is None else str(at)
            frame.loc[r.Index, "new"] = True
            evidence = dict(step=step, receiver_input=kind, receivers=r.receivers, position=r.position)
            evidence.update(effect=float(r.effect), raw_effect=float(r.raw_effect), z=float(r.z), rule=rule)
            self.circuit.add(Component("head", head[0], head[1], effect=float(r.effect), evidence=evidence))
        return frame

    def add_edges(self, frame: pd.DataFrame, receivers, at, read_at) -> None:
        """The edges of one table's selected senders: into the logits, or into each receiver's input (one
        receiver: the step's own effects; several: :meth:`edge_effects`)."""
        kind = frame["receiver_input"].iloc[0]
        chosen = frame[frame["selected"]]
        senders = [(int(r.layer), int(r.head)) for r in chosen.itertuples()]
        if kind == LOGITS:
            for s, r in zip(senders, chosen.itertuples()):
                self.circuit.edges.append(Edge(("head", *s), (LOGITS,), LOGITS, float(r.effect)))
            return
        if not senders:
            return
        if len(receivers) == 1:
            effects = {(s, receivers[0]): float(r.effect) for s, r in zip(senders, chosen.itertuples())}
        else:
            effects = self.edge_effects(senders, receivers, kind, at, read_at)
        for (s, r), v in effects.items():
            edge = Edge(("head", *s), ("head", *r), kind, v, evidence={"per_receiver": self.per_receiver})
            self.circuit.edges.append(edge)

    def edge_effects(self, senders, receivers, kind: str, at, read_at) -> dict:
        """``{(sender, receiver): normalised effect}`` for the selected senders into the receivers' ``kind``
        input: per receiver, or into the whole receiver set (``per_receiver=False``)."""
        from lsa import patching

        out = {}
        for group in [[r] for r in receivers] if self.per_receiver else [list(receivers)]:
            usable = [s for s in senders if s[0] < max(layer for layer, _ in group)]
            if not usable:
                continue
            sweep = {**self.sweep, "progress": False}
            res = patching.path_patching(
                self.model,
                self.prompts,
                usable,
                group,
                receiver_input=kind,
                positions=at,
                receivers_at=read_at,
                **sweep,
            )
            span = float(res.clean.mean() - res.corrupt.mean())
            for s, v in zip(usable, (res.effect / span).tolist()):
                out.update({(s, r): v for r in group if s[0] < r[0]})
        return out


SELECT = "ci_low"  # a circuit is chosen where the lower end of its 95% interval reaches the target
FIRST_LOOK = 0.05  # the share of the edges up to which the discovery curve is measured first
ROLE_PROMPTS = 16  # prompts whose attention patterns and projections suggest the heads' roles
REFINE = 2  # sizes measured between the last search size below the target and the first above it


def _crossing(curve: Curve, target: float) -> tuple[float, float]:
    """Sort key of a curve: the edges of its smallest circuit whose interval reaches ``target`` (none:
    infinity), then minus its best faithfulness."""
    best = curve.smallest(target, SELECT)
    return (math.inf if best is None else float(best["edges"]), -float(curve.frame["normalized"].max()))


def _search(model, scores, prompts, ranks, target: float, kw: dict) -> dict[str, Curve]:
    """The discovery curve of the first ranking of ``ranks`` that reaches the target, measured at the
    curve's shares (:data:`lsa.circuits.faithful.CURVE_SHARES`) up to :data:`FIRST_LOOK` first and at the
    larger ones only where no ranking reaches it there; a ranking after the first only where the earlier
    ones do not reach it at all."""
    grid = edge_sizes(scores.graph, CURVE_SHARES[1:])  # from 1%
    curves: dict[str, Curve] = {}
    for sizes in ([n for n in grid if n <= FIRST_LOOK * scores.graph.n_edges], grid):
        for r in ranks:
            done = set(curves[r].frame["size"]) if r in curves else set()
            todo = [n for n in sizes if n not in done]
            if todo:
                new = edge_curves(model, scores, prompts, {r: todo}, folds=2, **kw)[r]
                curves[r] = curves[r].joined(new) if r in curves else new
            if curves[r].smallest(target, SELECT) is not None:
                return {r: curves[r]}
    return curves


def discover(
    model: Model, prompts: PromptSet, method: str = "eap-ig", *, target: float = TARGET, **options
) -> Discovery:
    """A circuit of the model's behaviour on ``prompts``: ``method`` ``"eap-ig"`` or ``"eap"`` (edge attribution,
    :func:`edge_discovery`: the smallest circuit whose faithfulness reaches ``target``) or ``"path-patching"``
    (the paper's iterated path patching, :func:`path_patching_discovery`, with its own selection rule; ``target``
    is not used). ``options`` go to that function. Judge the circuit on other prompts
    (:func:`lsa.circuits.faithfulness`).

    >>> found = discover(model, train, "eap-ig", target=0.8)      # doctest: +SKIP
    >>> found.circuit, found.curve.frame                          # doctest: +SKIP
    """
    if method == "path-patching":
        return path_patching_discovery(model, prompts, **options)
    if method not in EDGE_METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return edge_discovery(model, prompts, method=method, target=target, **options)


def edge_discovery(
    model: Model,
    prompts: PromptSet,
    *,
    method: str = "eap-ig",
    steps: int = 5,
    target: float = TARGET,
    ablation_method: str = ablation.DEFAULT_METHOD,
    rank: str = "auto",
    metric=None,
    roles: bool = True,
    scores: EdgeScores | None = None,
    progress: bool = True,
) -> Discovery:
    """The smallest edge circuit along the edge attribution ranking whose faithfulness on ``prompts`` reaches ``target``.

    Steps: 1) score every edge (:func:`lsa.attribution.edge_attribution`, or the given ``scores``);
    2) the search curve: the top edges at MIB's shares of the graph from 1% (:func:`edge_curves`, every
    other edge ablated with ``ablation_method``; up to :data:`FIRST_LOOK` first, the larger shares only
    where none of those reaches the target), cross-fitted: each half of the prompts judges the circuits
    of the other half's scores, so that a size is chosen by how its circuits do on prompts they were not
    found on (in-sample, a circuit tuned to its prompts looks better than it is: SmolLM2's kept 1.00 of
    the behaviour on its own prompts and 0.68 on others); edges ranked by ``rank``
    (:meth:`lsa.attribution.EdgeScores.values`; ``"auto"``: by how far each carries the behaviour,
    ``"signed"``, and by |score| where that ranking never reaches the target: on Gemma 3's IOI the signed
    ranking reaches it with a sixth of the edges the absolute one needs, while on the toy zoo's models,
    far from linear, it never does); 3) between the largest share below the target and the first at or
    above it, :data:`REFINE` sizes more (evenly spaced); 4) the circuit: the top edges of all the prompts' scores
    at the smallest size measured whose 95% interval lies at or above the target (:data:`SELECT`;
    faithfulness need not grow with size: the first crossing), pruned to the paths from the embeddings to
    the logits; where no size reaches the target, the most faithful one, with
    ``evidence["reached_target"] = False``; 5) roles of its heads (:func:`suggest_roles`, from the
    attention patterns of :data:`ROLE_PROMPTS` prompts).

    The search curve is on the discovery prompts (cross-fitted), so it chooses the size; held-out prompts
    judge the result. For the denoising direction, give ``scores`` of ``edge_attribution(...,
    direction="denoising")``.
    """
    say = print if progress else (lambda *args: None)
    if scores is None:
        scores = edge_attribution(model, prompts, method=method, steps=steps, metric=metric, progress=progress)
    graph = scores.graph
    kw = dict(method=ablation_method, metric=metric, progress=progress)
    curves = _search(model, scores, prompts, RANKS if rank == "auto" else (rank,), target, kw)
    rank, curve = min(curves.items(), key=lambda item: _crossing(item[1], target))
    frame = curve.frame
    hit = frame.index[frame[SELECT] >= target]
    if len(hit) and hit[0] > 0:
        lo, hi = int(frame["size"][hit[0] - 1]), int(frame["size"][hit[0]])
        between = np.unique(np.linspace(lo, hi, REFINE + 2).round().astype(int))[1:-1]
        if len(between):
            more = edge_curves(model, scores, prompts, {rank: between.tolist()}, folds=2, **kw)[rank]
            curve = curve.joined(more)
    best = curve.smallest(target, SELECT)
    reached = best is not None
    if best is None:
        best = curve.frame.loc[curve.frame["normalized"].idxmax()]
    kept = scores.circuit(int(best["size"]), rank)
    say(
        f"{method}: {int(best['edges'])} of {graph.n_edges} edges ({best['share']:.2%}), {int(best['nodes'])} nodes, "
        f"normalised faithfulness {best['normalized']:.2f} on the {len(prompts)} discovery prompts (each judged by "
        "circuits of the other half's scores)" + ("" if reached else f": no size reaches the target {target}")
    )
    params = dict(method=method, steps=scores.steps, direction=scores.direction, target=target, rank=rank)
    params["ablation"] = ablation_method
    params.update(n_prompts=len(prompts), metric=getattr(metric, "__name__", "logit_diff") if metric else "logit_diff")
    params["select"] = f"the smallest circuit whose 95% interval on the discovery prompts reaches {target}"
    evidence = dict(
        method="edge attribution" + (" with integrated gradients" if method == "eap-ig" else ""),
        parameters=params, size=int(best["size"]), found_normalized=float(best["normalized"]), reached_target=reached,
        ablation=curve.ablation, n_edges_model=graph.n_edges,
    )  # fmt: skip
    circuit = Circuit.from_edges(model, kept, scores.scores, prompts.task, prompts.language, **evidence)
    role_scores = None
    if roles and any(c.kind == "head" for c in circuit.components):
        role_scores = head_scores(model, prompts.subset(range(min(ROLE_PROMPTS, len(prompts)))))
        suggest_roles(circuit, role_scores)
    return Discovery(circuit=circuit, steps=pd.DataFrame(), scores=role_scores, curve=curve, edges=scores)
