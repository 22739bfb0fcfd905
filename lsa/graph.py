"""The residual graph of a model: what writes to the residual stream, what reads it, the edges between.

*Senders* write to the residual stream: the embeddings (everything before block 0, i.e. block
0's input), every attention head (its slice of the output projection; with a sandwich norm,
times that norm's factor in the run, :meth:`lsa.adapter.Adapter.write_scale`, so that the heads'
writes sum to the attention write) and every MLP. *Receivers* read it: each head's query, each
key/value head's key and value (one per group under grouped-query attention), each MLP, and the
logits. An *edge* is a sender -> receiver pair in which the sender writes before the receiver
reads. Edge scores and circuits are matrices ``[senders, receivers]``; :attr:`Graph.valid` marks
the pairs that are edges.

Order: senders ``embed``, then per layer heads ``0 .. H-1`` and the MLP; receivers per layer
``q`` of heads ``0 .. H-1``, ``k`` and ``v`` of key/value heads ``0 .. G-1``, the MLP, then the
logits. Node keys: ``("embed",)``, ``("head", layer, head)``, ``("kv", layer, group)`` (a key/value
head, a receiver only), ``("mlp", layer)``, ``("logits",)``.

How a run reads its senders' writes and feeds its receivers lives here too: :class:`SenderWrites`
(one engine run's writes, ``[batch, pos, senders, d_model]``), :class:`ReceiverInputs` (every
receiver reads the residual stream itself; the inputs kept for their gradients) and
:class:`AblatedInputs` (each receiver reads the residual stream with its ablated edges' senders
swapped for their reference writes). Cost: the writes take ``batch * pos * senders * d_model``
floats (Gemma 3 270M, 16 prompts of 25 tokens: 93 MB).

>>> g = Graph.of(model); g.n_edges, g.senders[:2], g.receivers[-1]      # doctest: +SKIP
(5560, [('embed',), ('head', 0, 0)], (('logits',), 'logits'))
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import pandas as pd
import torch

from lsa import engine
from lsa.engine import Edit, Plan, Read, Split

INPUTS = ("q", "k", "v", "mlp", "logits")


def node_name(key: tuple) -> str:
    """Short label: head ``"2.1"``, key/value head ``"2.kv0"``, MLP ``"MLP2"``, neuron ``"N2.17"``, ``"embed"``, ``"logits"``."""
    kind = key[0]
    if kind in ("embed", "logits"):
        return kind
    if kind == "head":
        return f"{key[1]}.{key[2]}"
    if kind == "kv":
        return f"{key[1]}.kv{key[2]}"
    if kind == "mlp":
        return f"MLP{key[1]}"
    return f"N{key[1]}.{key[2]}"


@dataclass(frozen=True)
class Graph:
    """The senders, receivers and edges of one model shape (module docstring)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool = False

    @classmethod
    def of(cls, model) -> Graph:
        a = model.adapter
        return cls(a.n_layers, a.n_heads, a.n_kv_heads, a.parallel_residual)

    @property
    def _per_layer(self) -> int:
        return self.n_heads + 2 * self.n_kv_heads + 1

    @cached_property
    def senders(self) -> list[tuple]:
        out = [("embed",)]
        for layer in range(self.n_layers):
            out += [("head", layer, h) for h in range(self.n_heads)] + [("mlp", layer)]
        return out

    @cached_property
    def receivers(self) -> list[tuple[tuple, str]]:
        """``(node key, input)`` per receiver (module docstring)."""
        out = []
        for layer in range(self.n_layers):
            out += [(("head", layer, h), "q") for h in range(self.n_heads)]
            for kind in "kv":
                out += [(("kv", layer, g), kind) for g in range(self.n_kv_heads)]
            out.append((("mlp", layer), "mlp"))
        return out + [(("logits",), "logits")]

    def sender(self, key: tuple) -> int:
        """A sender's index."""
        if key[0] == "embed":
            return 0
        base = 1 + key[1] * (self.n_heads + 1)
        return base + (key[2] if key[0] == "head" else self.n_heads)

    def span(self, layer: int, kind: str) -> slice:
        """The receivers of one layer and input (``"logits"``: ``layer = n_layers``)."""
        base, h, g = layer * self._per_layer, self.n_heads, self.n_kv_heads
        start, n = {"q": (0, h), "k": (h, g), "v": (h + g, g), "mlp": (h + 2 * g, 1), "logits": (0, 1)}[kind]
        return slice(base + start, base + start + n)

    def before(self, layer: int, kind: str) -> int:
        """How many senders write before the receivers of ``(layer, kind)`` read (a prefix of :attr:`senders`)."""
        done = 1 + layer * (self.n_heads + 1)
        return done + (self.n_heads if kind == "mlp" and not self.parallel else 0)

    @cached_property
    def upstream(self) -> torch.Tensor:
        """``[receivers]``: :meth:`before` of each receiver."""
        return torch.tensor(
            [self.before(key[1] if key[0] != "logits" else self.n_layers, kind) for key, kind in self.receivers]
        )

    @cached_property
    def valid(self) -> torch.Tensor:
        """``[senders, receivers]`` bool: which pairs are edges."""
        return torch.arange(len(self.senders))[:, None] < self.upstream[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def frame(self, scores: torch.Tensor, name: str = "score") -> pd.DataFrame:
        """One row per edge: ``sender``, ``receiver``, ``input``, ``name`` (from ``scores`` ``[senders, receivers]``)."""
        s, r = self.valid.nonzero(as_tuple=True)
        return pd.DataFrame(
            {
                "sender": [node_name(self.senders[i]) for i in s.tolist()],
                "receiver": [node_name(self.receivers[j][0]) for j in r.tolist()],
                "input": [self.receivers[j][1] for j in r.tolist()],
                name: scores[s, r].double().numpy(),
            }
        )

    def edge_keys(self, chosen: torch.Tensor) -> list[tuple[tuple, tuple, str]]:
        """``(sender key, receiver key, input)`` of the edges marked in ``chosen`` ``[senders, receivers]``."""
        s, r = (chosen & self.valid).nonzero(as_tuple=True)
        return [(self.senders[i], *self.receivers[j]) for i, j in zip(s.tolist(), r.tolist())]

    def mask(self, edges) -> torch.Tensor:
        """``[senders, receivers]`` bool from ``(sender key, receiver key, input)`` triples."""
        index = {rec: j for j, rec in enumerate(self.receivers)}
        out = torch.zeros_like(self.valid)
        for sender, receiver, kind in edges:
            j = index.get((tuple(receiver), kind))
            i = self.sender(tuple(sender))
            if j is None or not self.valid[i, j]:
                raise ValueError(f"no edge {node_name(sender)} -> {node_name(receiver)} ({kind}) in this graph")
            out[i, j] = True
        return out

    def top(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """The ``n`` edges with the largest ``values`` ``[senders, receivers]`` (ties: the earlier edge), as bool."""
        flat = torch.where(self.valid, values.double(), -torch.inf).flatten()
        order = torch.sort(flat, descending=True, stable=True).indices[: max(0, min(n, self.n_edges))]
        out = torch.zeros(flat.shape, dtype=torch.bool)
        out[order] = True
        return out.view(self.valid.shape)

    def prune(self, chosen: torch.Tensor) -> torch.Tensor:
        """Keep the edges on a path from the embeddings to the logits.

        1) bottom-up: a head or MLP is reached when one of its inputs (a head's query, its
        key/value head's key or value) has an edge from a reached sender (the embeddings are);
        edges from senders not reached go; 2) top-down: a sender is used when it has an edge into
        the logits or into an input of a used node; edges into inputs of unused nodes go.
        """
        kept = chosen & self.valid
        reached = torch.zeros(len(self.senders), dtype=torch.bool)
        reached[0] = True
        for layer in range(self.n_layers):
            for kind in ("q", "mlp"):
                fed = kept[:, self._inputs_of(layer, kind)] & reached[:, None, None]
                for i, key in self._nodes_of(layer, kind):
                    reached[i] = bool(fed[:, key].any())
        kept &= reached[:, None]
        used = torch.zeros(len(self.senders), dtype=torch.bool)
        for j in reversed(range(len(self.receivers))):
            key, kind = self.receivers[j]
            if kind == "logits" or used[self._reader(key, kind)].any():
                used |= kept[:, j]
            else:
                kept[:, j] = False
        return kept

    def _reader(self, key: tuple, kind: str) -> list[int]:
        """The senders whose output a receiver's input feeds (a key/value head: its group's query heads)."""
        if key[0] == "kv":
            size = self.n_heads // self.n_kv_heads
            return [self.sender(("head", key[1], h)) for h in range(key[2] * size, (key[2] + 1) * size)]
        return [self.sender(key)]

    def _inputs_of(self, layer: int, kind: str) -> torch.Tensor:
        """``[nodes, inputs]`` receiver indices of each head's q, k, v (``kind="q"``) or the MLP's input."""
        if kind == "mlp":
            return torch.tensor([[self.span(layer, "mlp").start]])
        size = self.n_heads // self.n_kv_heads
        q, k, v = (self.span(layer, x) for x in "qkv")
        return torch.tensor([[q.start + h, k.start + h // size, v.start + h // size] for h in range(self.n_heads)])

    def _nodes_of(self, layer: int, kind: str) -> list[tuple[int, int]]:
        keys = [("mlp", layer)] if kind == "mlp" else [("head", layer, h) for h in range(self.n_heads)]
        return [(self.sender(key), row) for row, key in enumerate(keys)]

    def nodes(self, chosen: torch.Tensor) -> list[tuple]:
        """The senders with an edge in ``chosen`` (embeddings, heads, MLPs), in graph order."""
        return [self.senders[i] for i in (chosen & self.valid).any(1).nonzero().flatten().tolist()]


class SenderWrites:
    """Every sender's part of the residual stream in one engine run, gathered as the run reaches it.

    :attr:`values` ``[batch, pos, senders, d_model]``: the embeddings' and each MLP's write, and each
    head's output through its rows of the output projection. Where the family has a sandwich norm on
    the attention output (Gemma 3) that head part is taken before the norm, and :attr:`attn` keeps each
    layer's projection output ``[batch, pos, d_model]``: the layer's write is ``norm(attn)``, not a sum
    of head writes, so a receiver that reads some heads' parts from another run reads the norm of the
    mixture (:meth:`layer_write`), as the model would compute it. :meth:`reads` are the plan's reads
    that fill both.
    """

    def __init__(self, model, graph: Graph, batch: int, pos: int):
        a = model.adapter
        self.normed = a.layout.attn_post_norm is not None
        if self.normed and any(a.o_proj_bias(model.hf, i) is not None for i in range(a.n_layers)):
            raise ValueError("a sandwich norm over a biased output projection is not supported")
        self.model, self.graph = model, graph
        self.values = torch.zeros(batch, pos, len(graph.senders), a.d_model, device=model.device)
        self.attn: dict[int, torch.Tensor] = {}

    def reads(self) -> list[Read]:
        out = [Read("resid_pre", 0, self._embed)]
        for layer in range(self.model.adapter.n_layers):
            out.append(Read("head", layer, self._heads(layer)))
            if self.normed:
                out.append(
                    Read("attn_proj", layer, lambda proj, layer=layer: self.attn.__setitem__(layer, proj.detach()))
                )
            out.append(Read("mlp_out", layer, self._mlp(layer)))
        return out

    def layer_write(self, layer: int, raw: torch.Tensor) -> torch.Tensor:
        """The attention write of ``layer`` from a projection output ``raw`` ``[..., d_model]`` (its norm, if any)."""
        scale = self.model.adapter.write_scale(self.model.hf, "attn", layer, raw) if self.normed else None
        return raw if scale is None else raw * scale.to(raw.dtype)

    def heads(self, layer: int) -> slice:
        """The senders that are ``layer``'s heads."""
        first = self.graph.sender(("head", layer, 0))
        return slice(first, first + self.graph.n_heads)

    def _put(self, start: int, x: torch.Tensor) -> None:
        self.values[:, :, start : start + x.shape[2]] = x.detach().to(self.values.dtype)

    def _embed(self, x: torch.Tensor) -> None:
        self._put(0, x[:, :, None])

    def _heads(self, layer: int):
        def part(z: torch.Tensor) -> None:
            a = self.model.adapter
            w_o = a.o_proj_by_head(self.model.hf, layer)  # [n_heads, d_head, d_model]
            z = z.reshape(*z.shape[:2], a.n_heads, a.d_head).to(w_o.dtype)
            self._put(self.heads(layer).start, torch.einsum("bphe,hed->bphd", z, w_o))

        return part

    def _mlp(self, layer: int):
        return lambda w: self._put(self.graph.sender(("mlp", layer)), w[:, :, None])


@torch.no_grad()
def read_writes(model, graph: Graph, tokens: torch.Tensor) -> SenderWrites:
    """Every sender's part (:class:`SenderWrites`) in a plain run of ``tokens`` ``[batch, pos]``."""
    writes = SenderWrites(model, graph, *tokens.shape)
    engine.run(model, tokens, Plan(reads=writes.reads(), logits=None))
    return writes


@torch.no_grad()
def swap_changes(base: SenderWrites, donor: SenderWrites) -> torch.Tensor:
    """``[batch, pos, senders, d_model]``: how the residual stream changes when one sender alone takes its
    donor-run part in the base run: ``donor - base``, and for a head under a sandwich norm the norm of the
    base layer's projection output with that head's part swapped, minus the base layer's write."""
    delta = donor.values - base.values
    if base.normed:
        for layer, raw in base.attn.items():
            cols = base.heads(layer)
            mixed = raw[:, :, None] + delta[:, :, cols]  # [batch, pos, heads, d_model]
            delta[:, :, cols] = base.layer_write(layer, mixed) - base.layer_write(layer, raw)[:, :, None]
    return delta


class ReceiverInputs:
    """Every receiver reads the residual stream itself (values unchanged); :attr:`kept` holds each input tensor
    ``[batch, pos, n, d_model]`` by ``(layer, kind)``, to differentiate the metric by."""

    def __init__(self):
        self.kept: dict[tuple[int, str], torch.Tensor] = {}

    def __call__(self, layer: int, kind: str, x: torch.Tensor, n: int) -> torch.Tensor:
        self.kept[(layer, kind)] = x[:, :, None].expand(*x.shape[:2], n, x.shape[-1])
        return self.kept[(layer, kind)]


class AblatedInputs(SenderWrites):
    """Receivers read the residual stream with each ablated edge's sender swapped for its reference part.

    A receiver ``r`` reads ``x - sum_s ablated[s, r] * (part_s - reference_s)``: ``x`` is the residual
    stream it reads in this run, ``part_s`` the sender's part in this run (it moves with what the sender's
    own inputs read), ``reference_s`` its part under the ablation (e.g. in the counterfactual run).
    ``reference``: ``[batch, pos, senders, d_model]`` (a reference run's :attr:`SenderWrites.values`);
    ``ablated``: ``[senders, receivers]`` or one per row ``[batch, senders, receivers]`` (0 / 1). Here
    :attr:`values` holds ``part_s - reference_s``.

    Under a sandwich norm (``norm(o) = o * g / sqrt(mean(o**2) + eps)``) a layer's heads enter as
    ``norm(o - m) - norm(o)`` with ``o`` the layer's projection output and ``m = sum_h ablated[h, r] *
    (part_h - reference_h)`` (:class:`SenderWrites`). Computed without forming ``o - m`` per receiver:
    ``|o - m|^2`` from the layer's dot products ``o.o``, ``o.d_h``, ``d_h.d_k`` (float64), then
    ``norm(o - m) - norm(o) = g * (o * (s - s_o) - s * m)`` with ``s``, ``s_o`` the two scales.
    """

    def __init__(self, model, graph: Graph, reference: torch.Tensor, ablated: torch.Tensor):
        super().__init__(model, graph, reference.shape[0], reference.shape[1])
        self.reference = reference
        self.ablated = ablated.to(device=model.device, dtype=reference.dtype)
        self._layer, self._attn = None, None
        self._norms: dict[str, torch.Tensor] = {}  # per normed layer: its dot products and gained parts
        self._normed = 0  # the normed layers seen so far
        # senders whose part enters the residual stream as it is (all but the heads of normed layers)
        self.linear = torch.ones(len(graph.senders), dtype=torch.bool, device=model.device)
        if self.normed:
            for layer in range(graph.n_layers):
                self.linear[self.heads(layer)] = False
        self.total = torch.zeros(reference.shape[0], reference.shape[1], model.adapter.d_model, device=model.device)
        self._put_upto = 0  # the senders put so far: ``total`` sums their linear parts

    def _put(self, start: int, x: torch.Tensor) -> None:
        stop = start + x.shape[2]
        self.values[:, :, start:stop] = x.to(self.values.dtype) - self.reference[:, :, start:stop]
        self.total += self.values[:, :, start:stop][:, :, self.linear[start:stop]].sum(2)
        self._put_upto = stop

    def reads(self) -> list[Read]:
        out = super().reads()
        if self.normed:  # once a layer's heads and projection output are in, keep its dot products
            for layer in range(self.model.adapter.n_layers):
                out.append(Read("attn_out", layer, lambda w, layer=layer: self._keep_norm(layer)))
        return out

    def _keep_norm(self, layer: int) -> None:
        gain, eps = self.model.adapter.write_norm(self.model.hf, "attn", layer)
        o, d = self.attn[layer], self.values[:, :, self.heads(layer)]  # [b, p, dm], [b, p, H, dm]
        o64, d64 = o.double(), d.double()
        sq = o64.pow(2).sum(-1)
        kept = dict(
            sq=sq, cross=torch.einsum("bpd,bphd->bph", o64, d64), gram=torch.einsum("bphd,bpkd->bphk", d64, d64),
            scale=torch.rsqrt(sq / o.shape[-1] + eps), go=gain.to(o) * o, gd=gain.to(o) * d,
        )  # fmt: skip
        if not self._norms:  # one slot per layer, filled as the run reaches it
            n = self.model.adapter.n_layers
            self._norms = {k: v.new_zeros(*v.shape[:2], n, *v.shape[2:]) for k, v in kept.items()}
            self._norms["eps"] = torch.zeros(n, dtype=torch.float64, device=o.device)
        for name, value in kept.items():
            self._norms[name][:, :, layer] = value
        self._norms["eps"][layer] = eps
        self._normed = layer + 1

    def __call__(self, layer: int, kind: str, x: torch.Tensor, n: int) -> torch.Tensor:
        g = self.graph
        if kind not in "qkv":
            return self._inputs(x, g.span(layer, kind), g.before(layer, kind))
        if self._layer != layer:  # a layer's queries, keys and values read the same senders: one pass
            cols = slice(g.span(layer, "q").start, g.span(layer, "v").stop)
            self._layer, self._attn = layer, self._inputs(x, cols, g.before(layer, "q"))
        first, cols = g.span(layer, "q").start, g.span(layer, kind)
        return self._attn[:, :, cols.start - first : cols.stop - first]

    def _inputs(self, x: torch.Tensor, cols: slice, done: int) -> torch.Tensor:
        """``[batch, pos, receivers, d_model]`` for the receivers ``cols``, which read the first ``done`` senders.

        ``x - sum_s ablated * change = x - (sum over every linear sender) + (sum over the kept edges)``: the
        first sum runs with the forward (:attr:`total`), the second over the few senders a circuit keeps.
        """
        total = self.total
        if done < self._put_upto:  # senders put that these receivers do not read (parallel attention and MLP)
            total = total - self.values[:, :, done : self._put_upto][:, :, self.linear[done : self._put_upto]].sum(2)
        kept = (1 - self.ablated[..., :done, cols]) * self.linear[:done, None]  # [(batch), senders, receivers]
        rows = kept.reshape(-1, done, kept.shape[-1]).any(0).any(-1).nonzero().flatten()  # senders with a kept edge
        kept = kept[..., rows, :]
        kept = kept.transpose(-1, -2) if kept.ndim == 2 else kept.transpose(-1, -2)[:, None]  # [(b, 1), r, s]
        out = (x - total.to(x.dtype))[:, :, None] + torch.matmul(kept, self.values[:, :, rows]).to(x.dtype)
        if self._normed:
            out = out + self._normed_heads(cols, x.shape[-1]).to(x.dtype)
        return out

    def _normed_heads(self, cols: slice, width: int) -> torch.Tensor:
        """``sum over normed layers of norm(o - m) - norm(o)`` for the receivers ``cols`` (class docstring)."""
        n = self._normed
        k = {name: v[:n] if name == "eps" else v[:, :, :n] for name, v in self._norms.items()}
        m = torch.stack([self.ablated[..., self.heads(layer), cols] for layer in range(n)], -3)  # [(b), L, H, r]
        m = (m[None, None] if m.ndim == 3 else m[:, None]).expand(*k["cross"].shape, -1)  # [b, p, L, H, r]
        m64 = m.double()
        sq = k["sq"][..., None] - 2 * torch.einsum("bplh,bplhr->bplr", k["cross"], m64)
        sq = sq + torch.einsum("bplhr,bplhk,bplkr->bplr", m64, k["gram"], m64)
        s = torch.rsqrt(sq / width + k["eps"][:, None])  # [b, p, L, r]
        go, gd = k["go"], k["gd"].flatten(2, 3)  # [b, p, L, d], [b, p, L * H, d]
        change = torch.matmul((s - k["scale"][..., None]).transpose(-1, -2).to(go.dtype), go)
        return change - torch.matmul((m64 * s[:, :, :, None]).flatten(2, 3).transpose(-1, -2).to(gd.dtype), gd)


def split(model, inputs) -> Split:
    """A :class:`lsa.engine.Split` from ``inputs(layer, kind, x, n)`` (``n``: the receivers of that kind)."""
    a = model.adapter
    count = {"q": a.n_heads, "k": a.n_kv_heads, "v": a.n_kv_heads, "mlp": 1, "logits": 1}
    return Split(lambda layer, kind, x: inputs(layer, kind, x, count[kind]))


def interpolation(donor: SenderWrites, alpha: float) -> Edit:
    """An edit of block 0's input, ``x + alpha * (donor - x)`` (``donor``: the donor run's embeddings), a tensor to
    differentiate (integrated gradients along the input)."""
    start = donor.values[:, :, 0]
    return Edit("resid_pre", 0, lambda x: (x.detach() + alpha * (start.to(x.dtype) - x.detach())).requires_grad_())
