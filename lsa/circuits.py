"""Circuits as data: discover them, compare them across languages and models, test their faithfulness.

A :class:`Circuit` is what a circuit analysis concludes, written down so that it
can be saved, reloaded, compared and drawn: the model it came from (name and
shape), the task and language, its components (attention heads ``(layer, head)``,
MLPs ``layer``, neurons ``(layer, index)``) each with a role ("name mover",
"S-inhibition", ... or any label), the edges between them (sender -> receiver
through the receiver's query, key or value, or -> logits, with an effect), and
the evidence that selected each one (scores, method, parameters).

Discovery (:func:`discover`) is iterated path patching from the logits backwards
(Wang et al. 2022), with one explicit selection rule (:func:`select`):

1) step 1: every head -> logits (:func:`lsa.patching.path_patching`);
2) step ``s > 1``: every earlier head -> the query, key and value (each on its
   own) of the heads that were *new* at step ``s - 1``;
3) at every step and receiver input, a head is selected when its normalised
   effect ``(patched - clean) / (clean - corrupt)`` lies at least ``k`` standard
   deviations (population std over all candidate senders of that step and
   input) from their mean, **and** ``|effect| >= floor``. With fewer than two
   candidates, or no spread, only the floor decides;
4) stop when no new head is selected or after ``max_steps``.

Roles are *suggested* (:func:`suggest_roles`) from how a head was found and from
its attention pattern and vocabulary projection on the prompts
(:func:`head_scores`); see :func:`suggest_role` for the rule. They are
suggestions: set your own with :meth:`Circuit.label`.

Comparison (:func:`compare`) matches components by identity within one model
(e.g. its English and Chinese circuits), and by role and relative depth
(``(layer + 0.5) / n_layers``) across models. Faithfulness is :func:`lsa.ablation.faithfulness` (mean ablation of
every head outside the circuit) per circuit and language.

Cost: discovery runs one path-patching sweep for the logits and three per later
step (one forward per sender from its layer on), plus one per receiver and
input for per-receiver edges; :func:`head_scores` is one captured forward of
the prompts (chunked) and one vocabulary projection per head.

>>> found = discover(model, prompts, k=1.5, floor=0.05)       # doctest: +SKIP
>>> found.circuit.table()                                      # doctest: +SKIP
>>> found.circuit.to_json("circuit.json")                      # doctest: +SKIP
>>> compare(en_circuit, zh_circuit).summary                    # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lsa.model import Model
from lsa.tasks import PromptSet

KINDS = ("head", "mlp", "neuron")
EDGE_KINDS = ("logits", "q", "k", "v")
ROLES = (
    "name mover",
    "negative name mover",
    "S-inhibition",
    "induction",
    "duplicate token",
    "previous token",
    "copy",
    "copy suppression",
    "past tense",
    "direct (attends S)",
    "direct",
    "unclassified",
)
LOGITS = "logits"
FAITHFULNESS_COLUMNS = [
    "circuit",
    "circuit_model",
    "circuit_language",
    "model",
    "language",
    "components",
    "full",
    "circuit_metric",
    "empty",
    "faithfulness",
    "normalized",
    "own_language",
]


def _plain(value):
    """JSON-safe plain Python (tuples -> lists, tensors / numpy -> lists or scalars, NaN -> None)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _key(value) -> tuple:
    """A component key from a tuple / list / :class:`Component`: ``("head", l, h)``, ``("mlp", l)``, ``("neuron", l, i)``."""
    if isinstance(value, Component):
        return value.key
    if isinstance(value, str):
        if value == LOGITS:
            return (LOGITS,)
        raise ValueError(
            f"a component is ('head', layer, head), ('mlp', layer) or ('neuron', layer, index); got {value!r}"
        )
    value = tuple(value)
    if value == (LOGITS,):
        return value
    if len(value) == 2 and all(isinstance(x, (int, np.integer)) for x in value):
        value = ("head", *value)  # a bare (layer, head)
    if not value or value[0] not in KINDS or len(value) != (2 if value[0] == "mlp" else 3):
        raise ValueError(
            f"a component is ('head', layer, head), ('mlp', layer) or ('neuron', layer, index); got {value!r}"
        )
    return (value[0], *(int(x) for x in value[1:]))


def component_name(key) -> str:
    """Short label: head ``"2.1"``, MLP ``"MLP2"``, neuron ``"N2.17"``, ``"logits"``."""
    key = _key(key)
    if key[0] == LOGITS:
        return LOGITS
    if key[0] == "head":
        return f"{key[1]}.{key[2]}"
    if key[0] == "mlp":
        return f"MLP{key[1]}"
    return f"N{key[1]}.{key[2]}"


# ============================================================================ data
@dataclass
class Component:
    """One part of a circuit: ``kind`` ("head", "mlp", "neuron"), ``layer``, ``index`` (head / neuron; None for an MLP).

    ``effect``: the score that selected it (discovery: normalised path-patching
    effect; negative = it carries the clean behaviour); ``evidence``: how it was
    found (JSON-safe dict).
    """

    kind: str
    layer: int
    index: int | None = None
    role: str = ""
    effect: float | None = None
    evidence: dict = field(default_factory=dict)

    def __post_init__(self):
        key = _key((self.kind, self.layer) if self.index is None else (self.kind, self.layer, self.index))
        self.kind, self.layer = key[0], key[1]
        self.index = key[2] if len(key) == 3 else None
        self.effect = None if self.effect is None or not math.isfinite(self.effect) else float(self.effect)
        self.evidence = _plain(dict(self.evidence))

    @property
    def key(self) -> tuple:
        return (self.kind, self.layer) if self.index is None else (self.kind, self.layer, self.index)

    @property
    def name(self) -> str:
        return component_name(self.key)


@dataclass
class Edge:
    """``sender`` -> ``receiver`` (a component key, or ``("logits",)``) through ``kind`` ("logits", "q", "k", "v")."""

    sender: tuple
    receiver: tuple
    kind: str
    effect: float | None = None
    evidence: dict = field(default_factory=dict)

    def __post_init__(self):
        self.sender, self.receiver = _key(self.sender), _key(self.receiver)
        if self.kind not in EDGE_KINDS:
            raise ValueError(f"edge kind must be one of {', '.join(EDGE_KINDS)}, got {self.kind!r}")
        if (self.kind == LOGITS) != (self.receiver == (LOGITS,)):
            raise ValueError(
                f"an edge to the logits has kind 'logits' (got receiver {self.receiver}, kind {self.kind!r})"
            )
        self.effect = None if self.effect is None or not math.isfinite(self.effect) else float(self.effect)
        self.evidence = _plain(dict(self.evidence))


@dataclass
class Circuit:
    """A circuit as data (see the module docstring).

    >>> c = Circuit("toy", 4, 4, "ioi", "en", [Component("head", 3, 0, role="name mover")])   # doctest: +SKIP
    >>> c.validate(model); c.to_json("circuit.json"); Circuit.from_json("circuit.json") == c   # doctest: +SKIP
    """

    model: str
    n_layers: int
    n_heads: int
    task: str = ""
    language: str = ""
    components: list[Component] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    evidence: dict = field(default_factory=dict)
    d_mlp: int | None = None

    def __post_init__(self):
        self.components = [c if isinstance(c, Component) else Component(**c) for c in self.components]
        self.edges = [e if isinstance(e, Edge) else Edge(**e) for e in self.edges]
        self.evidence = _plain(dict(self.evidence))
        keys = [c.key for c in self.components]
        if len(set(keys)) != len(keys):
            dup = sorted({component_name(k) for k in keys if keys.count(k) > 1})
            raise ValueError(f"circuit lists components more than once: {', '.join(dup)}")

    # ------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.components)

    def __contains__(self, item) -> bool:
        return _key(item) in self.keys

    @property
    def keys(self) -> list[tuple]:
        return [c.key for c in self.components]

    @property
    def heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` of the circuit's heads."""
        return [(c.layer, c.index) for c in self.components if c.kind == "head"]

    @property
    def title(self) -> str:
        return " / ".join(x for x in (self.model, self.task, self.language) if x)

    def get(self, item) -> Component:
        key = _key(item)
        for c in self.components:
            if c.key == key:
                return c
        raise KeyError(f"{component_name(key)} is not in the circuit ({self.title})")

    def steps(self) -> pd.DataFrame:
        """The discovery steps kept as evidence (one row per candidate head per step; empty if none)."""
        return pd.DataFrame(self.evidence.get("steps", []))

    def roles(self) -> dict[tuple, str]:
        return {c.key: c.role for c in self.components}

    def label(self, item, role: str) -> Circuit:
        """Set a component's role (any label); returns the circuit."""
        self.get(item).role = str(role)
        return self

    def add(self, component: Component) -> Circuit:
        if component.key in self.keys:
            raise ValueError(f"{component.name} is already in the circuit")
        self.components.append(component)
        return self

    def depth(self, item) -> float:
        """Relative depth ``(layer + 0.5) / n_layers`` (0 = bottom, 1 = top)."""
        return (self.get(item).layer + 0.5) / self.n_layers

    # ------------------------------------------------------------ tables
    def table(self) -> pd.DataFrame:
        """One row per component: ``component``, ``kind``, ``layer``, ``index``, ``role``, ``effect``, ``step``, ``found_via``."""
        rows = []
        for c in self.components:
            rows.append(
                {
                    "component": c.name,
                    "kind": c.kind,
                    "layer": c.layer,
                    "index": c.index,
                    "role": c.role,
                    "effect": c.effect,
                    "step": c.evidence.get("step"),
                    "found_via": c.evidence.get("receiver_input"),
                }
            )
        cols = ["component", "kind", "layer", "index", "role", "effect", "step", "found_via"]
        return pd.DataFrame(rows, columns=cols)

    def edge_table(self) -> pd.DataFrame:
        """One row per edge: ``sender``, ``receiver``, ``kind``, ``effect``."""
        rows = [
            {
                "sender": component_name(e.sender),
                "receiver": component_name(e.receiver),
                "kind": e.kind,
                "effect": e.effect,
            }
            for e in self.edges
        ]
        return pd.DataFrame(rows, columns=["sender", "receiver", "kind", "effect"])

    # ------------------------------------------------------------ checks
    def validate(self, model: Model) -> Circuit:
        """Raise IndexError naming any component or edge end the model does not have; returns the circuit."""
        a = model.adapter
        for key in self.keys + [k for e in self.edges for k in (e.sender, e.receiver) if k != (LOGITS,)]:
            try:
                a.check_layer(key[1])
                if key[0] == "head":
                    a.check_head(key[2])
                elif key[0] == "neuron":
                    a.check_neuron(key[2])
            except IndexError as err:
                raise IndexError(
                    f"circuit {self.title!r} names {key[0]} {component_name(key)}, which model "
                    f"{model.name!r} ({a.n_layers} layers x {a.n_heads} heads, {a.d_mlp} neurons per MLP) "
                    f"does not have: {err}"
                ) from None
        return self

    # ------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping) -> Circuit:
        data = dict(data)
        data["components"] = [Component(**c) for c in data.get("components", [])]
        data["edges"] = [
            Edge(**{**e, "sender": tuple(e["sender"]), "receiver": tuple(e["receiver"])}) for e in data.get("edges", [])
        ]
        return cls(**data)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Circuit:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def empty_for(cls, model: Model, task: str = "", language: str = "", **evidence) -> Circuit:
        a = model.adapter
        return cls(model.name, a.n_layers, a.n_heads, task, language, evidence=evidence, d_mlp=a.d_mlp)


# ============================================================================ selection
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


# ============================================================================ roles
def _attn_to(pattern: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``pattern [n, heads, q, k]`` at per-prompt ``query`` / ``key`` positions ``[n]`` -> ``[n, heads]``."""
    rows = torch.arange(pattern.shape[0])
    return pattern[rows, :, query, key]


@torch.no_grad()
def attention_scores(pattern: torch.Tensor, prompts: PromptSet) -> pd.DataFrame:
    """Attention-pattern scores of each head from patterns ``[n, layer, head, q, k]`` (or one layer ``[n, head, q, k]``).

    Columns: ``layer``, ``head``, ``end_IO``, ``end_S1``, ``end_S2`` (mean attention from
    the end position to IO / S1 / S2), ``S2_S1`` (duplicate token: S2 -> S1),
    ``S2_S1+1`` (induction: S2 -> the token after S1), ``prev_token`` (mean attention
    from each real position p >= 1 to p - 1). Scores need the IOI positions
    ``IO``, ``S1``, ``S2``; without them they are NaN (``prev_token`` always exists).
    """
    if pattern.ndim == 4:
        pattern = pattern[:, None]
    if pattern.ndim != 5:
        raise ValueError(f"patterns must be [n, layer, head, q, k], got shape {tuple(pattern.shape)}")
    n, n_layers, n_heads, width, _ = pattern.shape
    pattern = pattern.float().cpu()
    pos = {name: p.cpu().long() for name, p in prompts.positions.items()}
    end = prompts.end.cpu().long()
    lengths = prompts.lengths.cpu().long()
    # previous-token score over real positions 1..len-1
    p_idx = torch.arange(1, width)
    prev = pattern[:, :, :, p_idx, p_idx - 1]  # [n, L, H, width-1]
    real = (p_idx[None, :] < lengths[:, None]).float()  # [n, width-1]
    prev_score = (prev * real[:, None, None]).sum((0, 3)) / real.sum().clamp(min=1)
    rows = []
    for layer in range(n_layers):
        pat = pattern[:, layer]
        scores = {"prev_token": prev_score[layer]}
        nan = torch.full((n_heads,), float("nan"))
        if all(name in pos for name in ("IO", "S1", "S2")):
            s1_next = (pos["S1"] + 1).clamp(max=width - 1)
            scores["end_IO"] = _attn_to(pat, end, pos["IO"]).mean(0)
            scores["end_S1"] = _attn_to(pat, end, pos["S1"]).mean(0)
            scores["end_S2"] = _attn_to(pat, end, pos["S2"]).mean(0)
            scores["S2_S1"] = _attn_to(pat, pos["S2"], pos["S1"]).mean(0)
            scores["S2_S1+1"] = _attn_to(pat, pos["S2"], s1_next).mean(0)
        for h in range(n_heads):
            row = {"layer": layer, "head": h}
            for name in ("end_IO", "end_S1", "end_S2", "S2_S1", "S2_S1+1", "prev_token"):
                row[name] = float(scores.get(name, nan)[h])
            rows.append(row)
    return pd.DataFrame(rows)


@torch.no_grad()
def head_scores(
    model: Model, prompts: PromptSet, *, heads: Iterable[tuple[int, int]] | None = None, chunk: int = 32
) -> pd.DataFrame:
    """Attention scores (:func:`attention_scores`) and a copy score for heads on the clean prompts.

    ``copy_score``: for each prompt, the token the head attends to most from the
    end position, z-scored within the head's vocabulary projection at the end
    position (:func:`lsa.lens.write_logits`, frozen final norm), averaged over
    prompts; > 0 means the head promotes what it attends to (copy), < 0 that it
    suppresses it (copy suppression). ``attended_IO``: share of prompts whose most
    attended token is the IO name. One row per head (default: every head).
    """
    from lsa import flow, lens

    a = model.adapter
    heads = [(la, h) for la in range(a.n_layers) for h in range(a.n_heads)] if heads is None else list(heads)
    for la, h in heads:
        a.check_head(h, la)
    n = len(prompts)
    patterns, copy, attended_io = [], {hh: [] for hh in heads}, {hh: [] for hh in heads}
    for start in range(0, n, chunk):
        part = prompts.subset(slice(start, start + chunk))
        acts = flow.capture(model, part.clean.to(model.device))
        pat = torch.stack([p.float().cpu() for p in acts.pattern], 1)  # [b, L, H, q, k]
        if pat.shape[-1] < prompts.clean.shape[1]:  # subset trims padding; pad back to full width
            pad = prompts.clean.shape[1] - pat.shape[-1]
            pat = torch.nn.functional.pad(pat, (0, pad, 0, pad))
        patterns.append(pat)
        rows = torch.arange(len(part))
        end = part.end.to(model.device)
        final = acts.resid_post[-1][rows.to(model.device), end]  # [b, d_model]
        at_end: dict[int, torch.Tensor] = {}  # layer -> heads' writes at the end position [b, H, d_model]
        for la, h in heads:
            if la not in at_end:
                at_end[la] = flow.head_writes(model, acts, la)[rows.to(model.device), end]
            write = at_end[la][:, h]  # [b, d_model]
            logits = lens.write_logits(model, write, final)  # [b, d_vocab]
            src = acts.pattern[la][rows.to(model.device), h, end].float()  # [b, k]
            target = part.clean.to(model.device)[rows.to(model.device), src.argmax(-1)]
            zs = (logits.gather(1, target[:, None])[:, 0] - logits.mean(-1)) / logits.std(-1).clamp(min=1e-12)
            copy[(la, h)].append(zs.cpu())
            if "IO" in part.positions:
                attended_io[(la, h)].append((src.argmax(-1).cpu() == part.positions["IO"].cpu()).float())
    frame = attention_scores(torch.cat(patterns), prompts)
    frame = frame.set_index(["layer", "head"]).loc[heads].reset_index()
    frame["copy_score"] = [float(torch.cat(copy[hh]).mean()) for hh in heads]
    frame["attended_IO"] = [
        float(torch.cat(attended_io[hh]).mean()) if attended_io[hh] else float("nan") for hh in heads
    ]
    return frame


def effect_sign(effect: float | None, direction: str = "noising") -> int:
    """Whether a head's patching effect supports the answer: ``+1`` supports, ``-1`` opposes, ``0`` unknown.

    The effect is normalised patching (:func:`lsa.patching.path_patching` into the
    logits, or a later step): noising moves the metric towards the counterfactual
    (negative) when it patches a head that carries the behaviour, so there ``effect
    < 0`` supports the answer and ``> 0`` opposes it; denoising is the reverse.
    None, NaN and 0 are unknown.

    >>> effect_sign(-0.4), effect_sign(-0.4, "denoising"), effect_sign(None)
    (1, -1, 0)
    """
    if effect is None or not math.isfinite(float(effect)) or float(effect) == 0.0:
        return 0
    supports = float(effect) < 0 if direction == "noising" else float(effect) > 0
    return 1 if supports else -1


def suggest_role(
    scores: Mapping,
    effect: float | None,
    found_via: str,
    *,
    attention: float = 0.3,
    copy: float = 1.0,
    direction: str = "noising",
    step: int | None = None,
) -> str:
    """A role from how a head was found, the sign of its effect and its scores (a row of :func:`head_scores`).

    Sign first: :func:`effect_sign` says whether the head's patching ``effect``
    *supports* the answer (noising: effect < 0; denoising: > 0), *opposes* it, or is
    unknown (None, NaN, 0). A **negative** role ("negative name mover", "copy
    suppression": heads that push against the answer) needs an effect that opposes
    it; a head that supports the answer, or whose sign is unknown, never gets one,
    whatever its copy score (a supporting head with a negative copy score suppresses
    what it attends to, e.g. S, which helps the answer: it is "direct").

    Rule (``attention``: the least attention share that counts as "attends";
    ``copy``: the least |copy_score|), first match wins:

    1) found through the **logits**: attends most to IO (``end_IO`` the largest of
       end -> IO / S1 / S2 and >= ``attention``): "name mover" if its effect supports
       the answer, "negative name mover" if it opposes it; otherwise
       ``copy_score <= -copy`` and the effect opposes the answer: "copy suppression";
       ``copy_score >= copy``: "copy"; attends most to S1 or S2 (>= ``attention``):
       "direct (attends S)"; else "direct";
    2) found at step 2 (``step`` None: any step) through the **query** of a head that
       writes to the logits: "S-inhibition";
    3) by attention at S2 and elsewhere: ``S2_S1+1`` >= ``attention`` and larger than
       ``S2_S1``: "induction"; ``S2_S1`` >= ``attention``: "duplicate token";
       ``prev_token`` >= ``attention``: "previous token";
    4) else "unclassified".

    >>> suggest_role({"end_IO": 0.1, "copy_score": -2.0}, -0.3, "logits")   # supports: not copy suppression
    'direct'
    >>> suggest_role({"end_IO": 0.1, "copy_score": -2.0}, +0.3, "logits")
    'copy suppression'
    """

    def get(name):
        v = scores.get(name, float("nan"))
        return float("nan") if v is None else float(v)

    if found_via == LOGITS:
        sign = effect_sign(effect, direction)
        end = {name: get(f"end_{name}") for name in ("IO", "S1", "S2")}
        attends_io = not math.isnan(end["IO"]) and end["IO"] >= attention
        if attends_io and all(math.isnan(v) or end["IO"] >= v for v in (end["S1"], end["S2"])) and sign:
            return "name mover" if sign > 0 else "negative name mover"
        c = get("copy_score")
        if not math.isnan(c) and c <= -copy and sign < 0:
            return "copy suppression"
        if not math.isnan(c) and c >= copy:
            return "copy"
        s_max = max((v for v in (end["S1"], end["S2"]) if not math.isnan(v)), default=float("nan"))
        if not math.isnan(s_max) and s_max >= attention and (math.isnan(end["IO"]) or s_max >= end["IO"]):
            return "direct (attends S)"
        return "direct"
    if found_via == "q" and step in (None, 2):
        return "S-inhibition"
    ind, dup, prev = get("S2_S1+1"), get("S2_S1"), get("prev_token")
    if not math.isnan(ind) and ind >= attention and ind > (dup if not math.isnan(dup) else -1):
        return "induction"
    if not math.isnan(dup) and dup >= attention:
        return "duplicate token"
    if not math.isnan(prev) and prev >= attention:
        return "previous token"
    return "unclassified"


def suggest_roles(circuit: Circuit, scores: pd.DataFrame, *, attention: float = 0.3, copy: float = 1.0) -> Circuit:
    """Fill in the role of each head that has none (see :func:`suggest_role`) and keep its scores as evidence."""
    by_head = scores.set_index(["layer", "head"])
    for c in circuit.components:
        if c.kind != "head" or (c.layer, c.index) not in by_head.index:
            continue
        row = by_head.loc[(c.layer, c.index)].to_dict()
        c.evidence = _plain({**c.evidence, "scores": row})
        if not c.role:
            direction = circuit.evidence.get("parameters", {}).get("direction", "noising")
            via = c.evidence.get("receiver_input", "")
            step = c.evidence.get("step")
            c.role = suggest_role(row, c.effect, via, attention=attention, copy=copy, direction=direction, step=step)
    return circuit


# ============================================================================ discovery
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


def _edge_effects(model, prompts, senders, receivers, kind, *, per_receiver, direction, metric, batch_size):
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
    progress: bool = False,
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

    Returns a :class:`Discovery` (``.circuit``, ``.steps``, ``.scores``). A model in
    which no head passes the rule gives an empty circuit, not an error.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    kinds = list(dict.fromkeys(receiver_input))
    if not kinds or any(x not in "qkv" for x in kinds):
        raise ValueError(f"receiver_input must be letters from 'qkv', got {receiver_input!r}")
    kw = dict(k=k, floor=floor, direction=direction, metric=metric, batch_size=batch_size, progress=progress)
    params = dict(
        k=k,
        floor=floor,
        max_steps=max_steps,
        receiver_input=receiver_input,
        direction=direction,
        n_prompts=len(prompts),
    )
    params["metric"] = getattr(metric, "__name__", "logit_diff") if metric is not None else "logit_diff"
    circuit = Circuit.empty_for(
        model, prompts.task, prompts.language, method="iterated path patching", parameters=params
    )
    tables, frontier = [], None
    for step in range(1, max_steps + 1):
        if step == 1:
            frames = [path_step(model, prompts, LOGITS, **kw)]
        else:
            frames = [path_step(model, prompts, frontier, kind, **kw) for kind in kinds]
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
                )
            if kind != LOGITS and senders:
                for (s, r), v in effects.items():
                    circuit.edges.append(
                        Edge(("head", *s), ("head", *r), kind, v, evidence={"per_receiver": per_receiver_edges})
                    )
            tables.append(frame)
        if not new:
            break
        frontier = sorted(new)
    steps = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    circuit.evidence["steps"] = _plain(steps.to_dict("records"))  # every candidate's score, kept with the circuit
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


# ============================================================================ comparison
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


# ============================================================================ faithfulness
def faithfulness(model: Model, circuit: Circuit, prompts: PromptSet, **kwargs):
    """:func:`lsa.ablation.faithfulness` of a circuit (validated against the model first)."""
    from lsa import ablation

    circuit.validate(model)
    return ablation.faithfulness(model, prompts, [c.key for c in circuit.components], **kwargs)


def faithfulness_table(
    model: Model, circuits: Mapping[str, Circuit], prompt_sets: Mapping[str, PromptSet], **kwargs
) -> pd.DataFrame:
    """Each circuit in each language (on one model): one row per (circuit, language).

    Columns: ``circuit``, ``circuit_language``, ``language``, ``components``, ``full``,
    ``circuit_metric``, ``empty``, ``faithfulness``, ``normalized``, ``own_language``.
    Cross-language faithfulness is the rows where ``language != circuit_language``.
    """
    rows = []
    for label, circuit in circuits.items():
        for language, prompts in prompt_sets.items():
            f = faithfulness(model, circuit, prompts, **kwargs)
            rows.append(
                {
                    "circuit": label,
                    "circuit_model": circuit.model,
                    "circuit_language": circuit.language,
                    "model": model.name,
                    "language": language,
                    "components": len(circuit),
                    "full": float(f.full.mean()),
                    "circuit_metric": float(f.circuit.mean()),
                    "empty": float(f.empty.mean()),
                    "faithfulness": f.faithfulness,
                    "normalized": f.normalized,
                    "own_language": language == circuit.language,
                }
            )
    return pd.DataFrame(rows, columns=FAITHFULNESS_COLUMNS)


# ============================================================================ helpers for notebooks
def prompt_sets(
    model: Model,
    languages: Iterable[str],
    task: str = "ioi",
    *,
    n: int | None = None,
    seed: int = 0,
    split: str = "all",
) -> tuple[dict[str, PromptSet], dict[str, str]]:
    """Prompt sets per language for a model's tokenizer, plus ``{language: reason}`` for those that cannot be built.

    A language the tokenizer cannot express (e.g. Chinese names in an English-only
    vocabulary) is skipped with its reason instead of failing the whole run
    (:func:`lsa.tasks.try_build`); any other error raises.
    """
    from lsa import tasks

    built, skipped = {}, {}
    for language in languages:
        prompts, why = tasks.try_build(task, language, model.tokenizer, n=n, seed=seed, split=split)
        if prompts is None:
            skipped[language] = why
        else:
            built[language] = prompts
    return built, skipped


def circuit_labels(circuits: Sequence[Circuit]) -> list[str]:
    """Short distinct labels: the language when all circuits share a model, else ``model/language``."""
    models = {c.model for c in circuits}
    labels = [c.language if len(models) == 1 else f"{c.model}/{c.language}" for c in circuits]
    if len(set(labels)) < len(labels):
        labels = [f"{lab}#{i}" for i, lab in enumerate(labels)]
    return labels


def cross_faithfulness(
    circuits: Mapping[str, Circuit],
    languages: Iterable[str],
    *,
    models: Mapping[str, Model] | None = None,
    n_prompts: int | None = None,
    seed: int = 0,
    split: str = "all",
    device="auto",
    remote: bool | str = False,
    **kwargs,
) -> pd.DataFrame:
    """Each circuit's faithfulness in each language, on the model it was found in (loaded by name if not given).

    One row per (circuit, language) as in :func:`faithfulness_table`; a language whose
    prompts cannot be built for that model's tokenizer gets a row with NaN scores
    and the reason in ``note``.
    """
    from lsa.model import load_model

    models = dict(models or {})
    languages = list(languages)
    frames = []
    for label, circuit in circuits.items():
        if circuit.model not in models:
            models[circuit.model] = load_model(circuit.model, device=device, remote=remote)
        model = models[circuit.model]
        built, skipped = prompt_sets(model, languages, circuit.task or "ioi", n=n_prompts, seed=seed, split=split)
        frame = faithfulness_table(model, {label: circuit}, built, **kwargs)
        notes = [
            {
                "circuit": label,
                "circuit_model": circuit.model,
                "circuit_language": circuit.language,
                "model": model.name,
                "language": language,
                "own_language": language == circuit.language,
                "note": reason,
            }
            for language, reason in skipped.items()
        ]
        frames += [f for f in (frame, pd.DataFrame(notes)) if len(f)]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    out = out.reindex(columns=[*FAITHFULNESS_COLUMNS, "note"])
    out["note"] = out["note"].fillna("")
    return out


def discover_each(
    pairs: Iterable[tuple[str, str]],
    *,
    models: dict[str, Model] | None = None,
    task: str = "ioi",
    n_prompts: int | None = None,
    seed: int = 0,
    split: str = "all",
    device="auto",
    remote: bool | str = False,
    **discover_kwargs,
) -> tuple[list[Circuit], dict[str, str]]:
    """Discover a circuit for each ``(model name, language)`` pair; ``({...}, {pair: reason skipped})``.

    Models are loaded once each and kept in ``models`` (pass a dict to reuse them,
    e.g. for :func:`cross_faithfulness`). A language the model's tokenizer cannot
    express is skipped with its reason.

    >>> circuits, skipped = discover_each([("toy-en", "en"), ("toy-zh", "zh")])   # doctest: +SKIP
    """
    from lsa.model import load_model

    models = models if models is not None else {}
    found, skipped = [], {}
    for name, language in pairs:
        if name not in models:
            models[name] = load_model(name, device=device, remote=remote)
        built, why = prompt_sets(models[name], [language], task, n=n_prompts, seed=seed, split=split)
        if language in why:
            skipped[f"{name}/{language}"] = why[language]
            continue
        found.append(discover(models[name], built[language], **discover_kwargs).circuit)
    return found, skipped
