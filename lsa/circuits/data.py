"""The circuit data model: components, edges and circuits, saved and reloaded as JSON.

A :class:`Circuit` is what a circuit analysis concludes, written down so that it
can be saved, reloaded, compared and drawn: the model it came from (name and
shape), the task and language, its components (attention heads ``(layer, head)``,
MLPs ``layer``, neurons ``(layer, index)``, the embeddings) each with a role ("name mover",
"S-inhibition", ... or any label), the edges between them (sender -> receiver
through the receiver's query, key or value, its MLP input, or -> logits, with an effect), and
the evidence that selected each one (scores, method, parameters).

Its ``level`` says what defines it. ``"nodes"`` (path patching): the components; everything
else is ablated node by node (heads outside it, MLPs intact). ``"edges"`` (edge attribution):
the edges, over the model's residual graph (:class:`lsa.graph.Graph`: a key or value edge
ends at a key/value head ``("kv", layer, group)``); every other edge is ablated; the components
are the senders its edges leave from.

>>> c = Circuit("toy", 4, 4, "ioi", "en", [Component("head", 3, 0, role="name mover")])   # doctest: +SKIP
>>> c.to_json("circuit.json"); Circuit.from_json("circuit.json") == c                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lsa.graph import Graph, node_name
from lsa.model import Model

KINDS = ("head", "mlp", "neuron", "embed")
EDGE_KINDS = ("logits", "q", "k", "v", "mlp")
LEVELS = ("nodes", "edges")
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


def json_safe(value):
    """JSON-safe plain Python (tuples -> lists, tensors / numpy -> lists or scalars, NaN -> None)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _key(value) -> tuple:
    """A node key from a tuple / list / :class:`Component`: ``("head", l, h)``, ``("mlp", l)``, ``("neuron", l, i)``,
    ``("embed",)``, and as an edge's end also ``("kv", l, g)`` or ``("logits",)``."""
    if isinstance(value, Component):
        return value.key
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    if value in ((LOGITS,), ("embed",)):
        return value
    if len(value) == 2 and all(isinstance(x, (int, np.integer)) for x in value):
        value = ("head", *value)  # a bare (layer, head)
    if not value or value[0] not in (*KINDS, "kv") or len(value) != (2 if value[0] == "mlp" else 3):
        raise ValueError(
            f"a component is ('head', layer, head), ('mlp', layer), ('neuron', layer, index) or ('embed',); got {value!r}"
        )
    return (value[0], *(int(x) for x in value[1:]))


def component_name(key) -> str:
    """Short label: head ``"2.1"``, MLP ``"MLP2"``, neuron ``"N2.17"``, ``"embed"``, ``"logits"`` (:func:`lsa.graph.node_name`)."""
    return node_name(_key(key))


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
        if self.kind == "embed":  # below every layer
            self.layer, self.index = -1, None
        else:
            key = _key((self.kind, self.layer) if self.index is None else (self.kind, self.layer, self.index))
            self.kind, self.layer = key[0], key[1]
            self.index = key[2] if len(key) == 3 else None
        self.effect = None if self.effect is None or not math.isfinite(self.effect) else float(self.effect)
        self.evidence = json_safe(dict(self.evidence))

    @property
    def key(self) -> tuple:
        if self.kind == "embed":
            return ("embed",)
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
        if (self.kind == LOGITS) != (self.receiver == (LOGITS,)) or (self.kind == "mlp") != (self.receiver[0] == "mlp"):
            raise ValueError(
                f"an edge to the logits has kind 'logits', one into an MLP kind 'mlp' (got receiver {self.receiver}, "
                f"kind {self.kind!r})"
            )
        self.effect = None if self.effect is None or not math.isfinite(self.effect) else float(self.effect)
        self.evidence = json_safe(dict(self.evidence))


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
    level: str = "nodes"

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        self.components = [c if isinstance(c, Component) else Component(**c) for c in self.components]
        self.edges = [e if isinstance(e, Edge) else Edge(**e) for e in self.edges]
        self.evidence = json_safe(dict(self.evidence))
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

    # ------------------------------------------------------------ edges
    def mask(self, graph: Graph) -> torch.Tensor:
        """An edge circuit as ``[senders, receivers]`` bool over ``graph`` (:meth:`lsa.graph.Graph.mask`)."""
        if self.level != "edges":
            raise ValueError(f"circuit {self.title!r} is defined by its nodes (level 'nodes'), not by edges")
        return graph.mask([(e.sender, e.receiver, e.kind) for e in self.edges])

    @classmethod
    def from_edges(
        cls, model: Model, kept: torch.Tensor, scores: torch.Tensor, task="", language="", **evidence
    ) -> Circuit:
        """An edge circuit from ``kept`` ``[senders, receivers]`` bool over the model's graph (:meth:`with_edges`)."""
        return cls.empty_for(model, task, language, **evidence).with_edges(Graph.of(model), kept, scores)

    def with_edges(self, graph: Graph, kept: torch.Tensor, scores: torch.Tensor) -> Circuit:
        """This circuit's model, task, language and evidence with the edges ``kept`` ``[senders, receivers]`` bool
        over ``graph`` instead of its own: each edge's ``effect`` is its score, each sender's the sum of its
        edges' scores, with the input of its strongest edge (``receiver_input``) as evidence; a sender this
        circuit holds keeps its role."""
        edges, strongest = [], {}
        for i, j in (kept & graph.valid).nonzero().tolist():
            sender, (receiver, kind), score = graph.senders[i], graph.receivers[j], float(scores[i, j])
            edges.append(Edge(sender, receiver, kind, score))
            total, best = strongest.get(sender, (0.0, (0.0, "")))
            strongest[sender] = (total + score, max(best, (abs(score), kind)))
        roles = self.roles()
        components = []
        for sender, (total, (_, kind)) in strongest.items():
            layer = sender[1] if len(sender) > 1 else -1  # the embeddings: below every layer
            index = sender[2] if len(sender) > 2 else None
            role = roles.get(sender, "")
            components.append(Component(sender[0], layer, index, role, total, {"receiver_input": kind}))
        return dataclasses.replace(self, components=components, edges=edges, level="edges")

    # ------------------------------------------------------------ checks
    def validate(self, model: Model) -> Circuit:
        """Raise IndexError naming any component or edge end the model does not have; returns the circuit."""
        a = model.adapter
        ends = [k for e in self.edges for k in (e.sender, e.receiver)]
        for key in [k for k in self.keys + ends if k not in ((LOGITS,), ("embed",))]:
            try:
                a.check_layer(key[1])
                if key[0] == "head":
                    a.check_head(key[2])
                elif key[0] == "kv" and not 0 <= key[2] < a.n_kv_heads:
                    raise IndexError(f"key/value head {key[2]} out of range: each layer has {a.n_kv_heads}")
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
        return json_safe(asdict(self))

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
