"""Information flow routes (Ferrando & Voita 2024): per-prediction graphs from one forward pass.

Each residual-stream state is a sum of parts. At layer ``l`` and position ``q``::

    mid[q]  = pre[q] + sum_{k, h} A_h[q, k] * (v_h[k] @ W_O[h]) + b_O      (attention sum)
    post[q] = mid[q] + ffn[q]                                              (FFN sum)

(GPT-NeoX with a parallel residual has one sum per layer:
``post[q] = pre[q] + attention parts + b_O + ffn[q]``.) The importance of a part
``z`` of a sum ``y`` is its *proximity*, ``max(|y|_1 - |y - z|_1, 0)``,
normalised over the parts of that sum (the paper's formula; the reference tool
clips at 1e-5 instead of 0, which only matters when every part is 0). The
output-projection bias ``b_O`` is its own part (it has no source token, so it
is never an edge, but it takes its share of each sum). Value vectors include
the value bias, so each head's (token, head) parts sum to that head's write.

Sandwich norms (Gemma 3). There each sublayer's output passes through an
RMSNorm before it joins the residual: the attention write at ``q`` is
``N(o[q]) = o[q] * g / rms(o[q])`` with ``o[q] = sum_{k, h} A_h[q, k] * (v_h[k] @ W_O[h]) + b_O``
the output projection's output, and likewise the FFN write. ``N`` is not
linear, so the write is not a plain sum of the heads' parts; but with its scale
``1 / rms(o[q])`` taken from the run itself (fixed, as ALTI and Ferrando & Voita
treat layer norms), it is linear at each position, and each part's contribution
to the write is ``part * g / rms(o[q])`` (:meth:`lsa.adapter.Adapter.write_scale`).
These contributions sum to the write exactly, so importances are computed on
them as on any other family. The factor depends on the query position ``q``
(each output position has its own scale), not on the source token.

Thresholding (as in the LM Transparency Tool): parts with importance ``<= tau``
are zeroed and the rest renormalised to sum to 1 per sum; the route of a
prediction is then everything reachable backwards from the output node at the
predicting position through edges of weight ``> tau``. An attention edge
``(source token k -> token q)`` has weight ``sum_h importance(k, h)``; the edge
from a token to itself also carries the residual's importance (as in the tool,
the two are one edge; the split is kept in edge attributes).

Cost: one forward pass with hooks, then per layer and prompt
``heads * pos**2 / 2 * d_model`` element operations (one query position at a
time, so memory stays at ``heads * pos * d_model`` floats): about 1.5-2x a plain
forward pass for GPT-2-small shapes at 20 tokens (``benchmarks/flow.py``); the
extra work grows with ``pos ** 2``. Importances are kept as
``[batch, layers, heads, pos, pos]`` floats.

>>> flow = contributions(model, tokens)                 # doctest: +SKIP
>>> graph = route(flow, index=0, tau=0.04)               # doctest: +SKIP
>>> freq = head_frequency(model, {"en": en, "zh": zh})   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial

import networkx as nx
import pandas as pd
import torch

from lsa import engine
from lsa.engine import Plan, Read
from lsa.model import Model

DEFAULT_TAU = 0.04


# ---------------------------------------------------------------------------- capture
@dataclass
class Activations:
    """Everything one forward pass leaves for routes and lenses (lists are per layer).

    Shapes: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_in``, ``attn_out``,
    ``mlp_out``: ``[batch, pos, d_model]``; ``z`` (o_proj input):
    ``[batch, pos, n_heads * d_head]``; ``pattern``: ``[batch, n_heads, q, k]``;
    ``neurons`` (MLP output-projection input): ``[batch, pos, d_mlp]``;
    ``logits``: ``[batch, pos, d_vocab]`` (``None`` when not computed). ``resid_mid`` is ``None`` with a
    parallel residual. ``resid_post[-1]`` is the input of the final norm.
    ``attn_out`` and ``mlp_out`` are the sublayers' *writes* (what joins the
    residual: the sandwich norm's output where there is one). ``attn_scale`` /
    ``mlp_scale``: ``[batch, pos, d_model]`` factors from the projection output
    to the write in this run (:meth:`lsa.adapter.Adapter.write_scale`), ``None``
    per layer where the write is the projection output itself.
    """

    tokens: torch.Tensor
    resid_pre: list[torch.Tensor]
    resid_mid: list[torch.Tensor | None]
    resid_post: list[torch.Tensor]
    attn_in: list[torch.Tensor]
    z: list[torch.Tensor]
    attn_out: list[torch.Tensor]
    pattern: list[torch.Tensor]
    neurons: list[torch.Tensor]
    mlp_out: list[torch.Tensor]
    logits: torch.Tensor | None
    attn_scale: list[torch.Tensor | None] = field(default_factory=list)
    mlp_scale: list[torch.Tensor | None] = field(default_factory=list)


@torch.no_grad()
def capture(model: Model, tokens: torch.Tensor, *, logits: bool = True) -> Activations:
    """Run ``tokens [batch, pos]`` once through ``model.hf`` and keep the activations routes need.

    One engine run (:mod:`lsa.engine`) reading, per layer, the sites ``resid_pre``,
    ``attn_in``, ``pattern`` (needs eager attention), ``head`` (the heads' outputs),
    ``attn_out`` and ``mlp_out`` (the writes), ``resid_mid``, ``neuron`` (the MLP
    output projection's input), the projections' outputs (reduced to the sandwich
    norms' scales, :meth:`lsa.adapter.Adapter.write_scale`), and ``resid_final``; the logits at
    every position unless ``logits=False`` (with a large vocabulary they can cost more than the
    layers: Gemma 3's unembedding is 168M multiply-adds per position, its 18 layers about 100M).
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    engine.require(model, "weights", "flow routes")
    ad = model.adapter
    n = ad.n_layers
    # name in Activations -> engine site (and a reduction of it)
    wanted = {
        "resid_pre": ("resid_pre", None),
        "attn_in": ("attn_in", None),
        "pattern": ("pattern", None),
        "z": ("head", None),
        "attn_scale": ("attn_proj", "attn"),
        "attn_out": ("attn_out", None),
        "resid_mid": ("resid_mid", None),
        "neurons": ("neuron", None),
        "mlp_scale": ("mlp_proj", "mlp"),
        "mlp_out": ("mlp_out", None),
    }
    if ad.parallel_residual:
        del wanted["resid_mid"]
    reads = [Read("resid_final", n - 1)]
    for layer in range(n):
        for site, sublayer in wanted.values():
            scale = None if sublayer is None else partial(ad.write_scale, model.hf, sublayer, layer)
            reads.append(Read(site, layer, scale))
    out = engine.run(model, tokens, Plan(reads=reads, logits="all" if logits else None))
    store = {name: [out.values.get((site, layer)) for layer in range(n)] for name, (site, _) in wanted.items()}
    store.setdefault("resid_mid", [None] * n)
    for layer, pattern in enumerate(store["pattern"]):
        if pattern is None:
            raise RuntimeError(
                f"layer {layer}'s attention module returned no attention pattern; load the model with "
                "attn_implementation='eager' (load_model does this by default)"
            )
    resid_post = store["resid_pre"][1:] + [out[("resid_final", n - 1)]]
    return Activations(tokens=tokens, resid_post=resid_post, logits=out.logits, **store)


# ---------------------------------------------------------------------------- decomposition
def head_values(model: Model, acts: Activations, layer: int) -> torch.Tensor:
    """Value vectors per query head ``[batch, n_heads, pos, d_head]`` (value bias included, GQA repeated)."""
    w, b = model.adapter.value_weights(model.hf, layer)  # [n_kv, d_model, d_head], [n_kv, d_head]
    x = acts.attn_in[layer]
    v = torch.einsum("bpd,gde->bgpe", x.to(w.dtype), w)
    if b is not None:
        v = v + b[None, :, None, :]
    return v.repeat_interleave(model.adapter.group_size, dim=1)


def head_source_writes(model: Model, acts: Activations, layer: int) -> torch.Tensor:
    """What each head's projection output gets per unit attention to each source: ``v_h[k] @ W_O[h]``.

    ``[batch, n_heads, k, d_model]``. With sandwich norms the write at query ``q``
    is this times ``acts.attn_scale[layer][:, q]`` (see the module docstring).
    """
    w_o = model.adapter.o_proj_by_head(model.hf, layer)  # [n_heads, d_head, d_model]
    return torch.einsum("bhke,hed->bhkd", head_values(model, acts, layer), w_o)


@torch.no_grad()
def head_writes(model: Model, acts: Activations, layer: int) -> torch.Tensor:
    """Each head's write at each position: ``(z_h @ W_O[h]) * scale``, ``[batch, pos, n_heads, d_model]``.

    ``scale`` is the sandwich norm's factor of this run (1 without one); the heads'
    writes plus the (scaled) output bias sum to the attention write ``acts.attn_out``.
    """
    ad = model.adapter
    z = acts.z[layer].reshape(*acts.z[layer].shape[:2], ad.n_heads, ad.d_head)
    w_o = ad.o_proj_by_head(model.hf, layer)  # [n_heads, d_head, d_model]
    out = torch.einsum("bphe,hed->bphd", z.to(w_o.dtype), w_o)
    scale = acts.attn_scale[layer] if acts.attn_scale else None
    return out if scale is None else out * scale[:, :, None, :].to(out.dtype)


@torch.no_grad()
def decompose_attention(model: Model, acts: Activations, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention write split into (query, source token, head) parts, and the bias part.

    Returns ``parts [batch, n_heads, q, k, d_model]`` with
    ``parts[b, h, q, k] = A_h[q, k] * (v_h[k] @ W_O[h]) * scale[b, q]`` and ``bias``:
    ``[d_model]`` (zeros where the projection has none) without a sandwich norm,
    ``b_O * scale`` ``[batch, q, d_model]`` with one (``scale``: ``acts.attn_scale``,
    see the module docstring). ``parts.sum((1, 3)) + bias`` is the attention write
    ``acts.attn_out``. Memory: ``batch * heads * pos**2 * d_model`` floats.
    """
    model.adapter.check_layer(layer)
    u = head_source_writes(model, acts, layer)
    pattern = acts.pattern[layer].to(u.dtype)
    parts = pattern[..., None] * u[:, :, None, :, :]
    bias = model.adapter.o_proj_bias(model.hf, layer)
    bias = torch.zeros(u.shape[-1], dtype=u.dtype, device=u.device) if bias is None else bias.detach().to(u.dtype)
    scale = acts.attn_scale[layer] if acts.attn_scale else None
    if scale is not None:
        parts = parts * scale[:, None, :, None, :].to(u.dtype)
        bias = bias * scale.to(u.dtype)
    return parts, bias


def proximity(whole: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``max(|whole|_1 - |whole - part|_1, 0)`` over the last dimension (broadcasting)."""
    return (whole.abs().sum(-1) - (whole - part).abs().sum(-1)).clamp_min(0)


def _attention_proximity(
    y: torch.Tensor,
    pattern: torch.Tensor,
    u: torch.Tensor,
    lengths: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Proximity of every (q, k, h) part to ``y[q]``: ``[batch, heads, q, k]``.

    Only causal pairs ``k <= q < length`` are computed (the rest are 0: a part
    with zero attention has zero proximity): for each prompt and query position,
    ``|y[q] - A[:, q, :q+1] * u[:, :q+1] * scale[q]|_1`` into a reused buffer of
    ``heads * (q + 1) * d_model`` floats (``scale [batch, q, d_model]``: the
    sandwich norm's factor, one more product per query; ``None``: 1). This loop
    is most of the cost of routes beyond the forward pass.
    """
    batch, heads, pos, _ = pattern.shape
    d = u.shape[-1]
    norm = y.abs().sum(-1)  # [batch, q]
    dist = norm[:, None, :, None].expand(batch, heads, pos, pos).clone()
    buf = torch.empty(heads, pos, d, dtype=y.dtype, device=y.device)
    scaled = torch.empty(heads, pos, d, dtype=y.dtype, device=y.device) if scale is not None else None
    for i in range(batch):
        yi, ai, ui = y[i], pattern[i], u[i]
        for q in range(int(lengths[i])):
            part = buf[:, : q + 1]
            uq = ui[:, : q + 1]
            if scaled is not None:
                uq = torch.mul(uq, scale[i, q], out=scaled[:, : q + 1])
            torch.addcmul(yi[q], ai[:, q, : q + 1, None], uq, value=-1, out=part)
            dist[i, :, q, : q + 1] = part.abs_().sum(-1)
    return (norm[:, None, :, None] - dist).clamp_min(0)


@dataclass
class Flow:
    """Importances of every part of every residual sum, for a batch.

    Shapes (``L`` layers, ``H`` heads): ``attn [batch, L, H, q, k]`` (source token
    ``k`` via head ``h`` into the attention sum at ``q``), ``attn_resid``,
    ``attn_bias``, ``ffn``, ``ffn_resid``: ``[batch, L, q]``. With a parallel
    residual the attention sum *is* the layer's only sum: ``ffn`` is a part of it
    and ``ffn_resid`` is all zeros. Each sum's importances add up to 1 (0 where
    every part was thresholded away). ``tau`` is ``None`` before thresholding.
    ``predicted [batch, pos]``: the model's top-1 token ids (``None`` where not computed); ``labels``: decoded
    input tokens; ``decode``: decoded top-1 predictions at each prompt's end.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    attn: torch.Tensor
    attn_resid: torch.Tensor
    attn_bias: torch.Tensor
    ffn: torch.Tensor
    ffn_resid: torch.Tensor
    parallel: bool
    predicted: torch.Tensor | None
    labels: list[list[str]] = field(default_factory=list)
    decode: dict[int, str] = field(default_factory=dict)
    tau: float | None = None

    def prediction_label(self, index: int, position: int) -> str:
        """The decoded top-1 prediction of prompt ``index`` at ``position`` (its id without a tokenizer; "?" if not computed)."""
        if self.predicted is None:
            return "?"
        token = int(self.predicted[index, position])
        return self.decode.get(token, str(token))

    @property
    def n_layers(self) -> int:
        return int(self.attn.shape[1])

    @property
    def n_heads(self) -> int:
        return int(self.attn.shape[2])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def threshold(self, tau: float = DEFAULT_TAU) -> Flow:
        """Zero every importance ``<= tau`` and renormalise each sum to 1 (the tool's renormalising threshold)."""
        if not 0 <= tau < 1:
            raise ValueError(f"tau must be in [0, 1), got {tau}")
        keep = lambda x: x * (x > tau)  # noqa: E731
        attn, a_res, a_bias, ffn, f_res = map(
            keep, (self.attn, self.attn_resid, self.attn_bias, self.ffn, self.ffn_resid)
        )
        a_tot = attn.sum((2, 4)) + a_res + a_bias  # [batch, L, q]
        if self.parallel:
            a_tot = a_tot + ffn
            f_tot = a_tot
        else:
            f_tot = ffn + f_res
        a_den = torch.where(a_tot > 0, a_tot, torch.ones_like(a_tot))
        f_den = torch.where(f_tot > 0, f_tot, torch.ones_like(f_tot))
        return replace(
            self,
            attn=attn / a_den[:, :, None, :, None],
            attn_resid=a_res / a_den,
            attn_bias=a_bias / a_den,
            ffn=ffn / f_den,
            ffn_resid=f_res / f_den,
            tau=tau,
        )


@torch.no_grad()
def flow_from_activations(model: Model, acts: Activations, lengths: torch.Tensor | None = None) -> Flow:
    """Importances of every part of every sum (see :class:`Flow`) from captured activations."""
    ad = model.adapter
    batch, pos = acts.tokens.shape
    L, H = ad.n_layers, ad.n_heads
    f32 = torch.float32
    dev = acts.resid_pre[0].device
    attn = torch.empty(batch, L, H, pos, pos, dtype=f32, device=dev)
    attn_resid, attn_bias, ffn, ffn_resid = (torch.zeros(batch, L, pos, dtype=f32, device=dev) for _ in range(4))
    if lengths is None:
        lengths = torch.full((batch,), pos, dtype=torch.long)
    lengths = torch.as_tensor(lengths).cpu()
    if lengths.shape != (batch,) or (lengths < 1).any() or (lengths > pos).any():
        raise ValueError(f"lengths must be [batch] = [{batch}] values in 1..{pos}, got {lengths.tolist()}")
    for layer in range(L):
        pre = acts.resid_pre[layer].to(f32)
        post = acts.resid_post[layer].to(f32)
        mid = post if ad.parallel_residual else acts.resid_mid[layer].to(f32)
        _check_sum(
            layer, "attention", mid, pre, acts.attn_out[layer], acts.mlp_out[layer] if ad.parallel_residual else 0
        )
        if not ad.parallel_residual:
            _check_sum(layer, "FFN", post, mid, acts.mlp_out[layer], 0)
        u = head_source_writes(model, acts, layer).to(f32)
        scale = acts.attn_scale[layer] if acts.attn_scale else None
        scale = None if scale is None else scale.to(f32)
        parts = _attention_proximity(mid, acts.pattern[layer].to(f32), u, lengths, scale)
        bias = ad.o_proj_bias(model.hf, layer)
        if bias is not None:
            bias = bias.to(f32) if scale is None else bias.to(f32) * scale
        p_bias = proximity(mid, bias) if bias is not None else torch.zeros_like(mid[..., 0])
        p_res = proximity(mid, pre)
        total = parts.sum((1, 3)) + p_bias + p_res
        mlp = acts.mlp_out[layer].to(f32)
        if ad.parallel_residual:
            p_ffn = proximity(mid, mlp)
            total = total + p_ffn
        den = torch.where(total > 0, total, torch.ones_like(total))
        attn[:, layer] = parts / den[:, None, :, None]
        attn_resid[:, layer] = p_res / den
        attn_bias[:, layer] = p_bias / den
        if ad.parallel_residual:
            ffn[:, layer] = p_ffn / den
        else:
            p_ffn, p_res2 = proximity(post, mlp), proximity(post, mid)
            den2 = p_ffn + p_res2
            den2 = torch.where(den2 > 0, den2, torch.ones_like(den2))
            ffn[:, layer], ffn_resid[:, layer] = p_ffn / den2, p_res2 / den2
    return Flow(
        tokens=acts.tokens.cpu(),
        lengths=lengths,
        attn=attn.cpu(),
        attn_resid=attn_resid.cpu(),
        attn_bias=attn_bias.cpu(),
        ffn=ffn.cpu(),
        ffn_resid=ffn_resid.cpu(),
        parallel=ad.parallel_residual,
        predicted=None if acts.logits is None else acts.logits.argmax(-1).cpu(),
    )


def _check_sum(layer, name, whole, base, write, extra) -> None:
    err = (whole - (base + write.to(whole.dtype) + extra)).abs().max()
    scale = whole.abs().max().clamp_min(1.0)
    if err > 1e-3 * scale:
        raise RuntimeError(
            f"layer {layer}: the residual after the {name} sublayer is not the residual before it plus the "
            f"sublayer's write (max error {float(err):.3g}); this variant of the architecture (e.g. a residual "
            "taken after the layer norm, or dropout in training mode) is not supported by flow routes"
        )


def contributions(
    model: Model,
    tokens: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    tau: float | None = None,
    predictions: bool = True,
) -> Flow:
    """One forward pass over ``tokens [batch, pos]`` -> every part's importance (:class:`Flow`).

    ``lengths [batch]`` marks right padding (routes stop there); ``tau`` thresholds
    and renormalises at once (``None`` keeps raw importances). ``predictions=False`` skips
    the unembedding (``Flow.predicted`` is then ``None``): importances do not need it.
    """
    acts = capture(model, tokens, logits=predictions)
    flow = flow_from_activations(model, acts, lengths)
    flow.labels = _labels(model, flow.tokens)
    if model.tokenizer is not None and flow.predicted is not None:
        ids = set(flow.predicted[torch.arange(len(flow)), flow.lengths - 1].tolist())
        flow.decode = {i: model.tokenizer.decode([i]) for i in ids}
    return flow if tau is None else flow.threshold(tau)


def _labels(model: Model, tokens: torch.Tensor) -> list[list[str]]:
    if model.tokenizer is None:
        return [[str(t) for t in row] for row in tokens.tolist()]
    return [[model.tokenizer.decode([t]) for t in row] for row in tokens.tolist()]


# ---------------------------------------------------------------------------- routes
def _thresholded(flow: Flow, tau: float | None) -> Flow:
    if tau is None:
        if flow.tau is None:
            return flow.threshold(DEFAULT_TAU)
        return flow
    if flow.tau is not None and flow.tau != tau:
        raise ValueError(f"this Flow was thresholded at tau={flow.tau}; pass tau=None or the raw Flow")
    return flow if flow.tau == tau else flow.threshold(tau)


def _positions(flow: Flow, positions) -> torch.Tensor:
    if positions is None:
        return flow.lengths - 1
    positions = torch.as_tensor(positions).reshape(-1).expand(len(flow)).long()
    bad = (positions < 0) | (positions >= flow.lengths)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise IndexError(f"position {int(positions[i])} out of range for prompt {i} of length {int(flow.lengths[i])}")
    return positions


def route_head_importance(flow: Flow, tau: float | None = None, positions=None, *, into: str = "any") -> torch.Tensor:
    """Each head's importance summed over the edges of each prompt's route: ``[batch, n_layers, n_heads]``.

    The route starts at the output at ``positions`` (default: each prompt's last
    real token); a head counts on an edge when its importance (after
    thresholding) is above ``tau``. ``into="end"`` counts only edges into the
    predicting position's own stream (heads that move information *to* the
    prediction), ``"any"`` every route edge. Works on the whole batch at once.

    Steps, from the top layer down: 1) the reached outputs of layer ``l``; 2) the
    FFN sum reaches its FFN node and its residual-in (``mid``) through parts
    ``> tau``; 3) the attention sum reaches source tokens through edges whose
    weight (heads summed, plus the residual on the self edge) is ``> tau``; the
    heads above ``tau`` on those edges are on the route; 4) the reached sources
    are the outputs of layer ``l - 1``.
    """
    if into not in ("any", "end"):
        raise ValueError(f"into must be 'any' or 'end', got {into!r}")
    flow = _thresholded(flow, tau)
    tau = flow.tau
    batch, L, H, pos, _ = flow.attn.shape
    end = _positions(flow, positions)
    reached = torch.zeros(batch, pos, dtype=torch.bool)
    reached[torch.arange(batch), end] = True
    at_end = reached.clone()
    weights = torch.zeros(batch, L, H)
    eye = torch.eye(pos, dtype=torch.bool)
    for layer in reversed(range(L)):
        ffn_on = reached & (flow.ffn[:, layer] > tau)
        target = reached if flow.parallel else reached & (ffn_on | (flow.ffn_resid[:, layer] > tau))
        attn = flow.attn[:, layer]  # [batch, H, q, k]
        weight = attn.sum(1) + eye * flow.attn_resid[:, layer, :, None]  # [batch, q, k]
        edge = target[:, :, None] & (weight > tau)
        counted = edge & at_end[:, :, None] if into == "end" else edge
        weights[:, layer] = (attn * ((attn > tau) & counted[:, None])).sum((-1, -2))
        reached = edge.any(1)
        if flow.parallel:
            reached = reached | ffn_on
    return weights


def heads_used(flow: Flow, tau: float | None = None, positions=None) -> torch.Tensor:
    """Which heads each prompt's route uses (importance above ``tau`` on a route edge): ``[batch, n_layers, n_heads]`` bool."""
    return route_head_importance(flow, tau, positions) > 0


def route_heads_frame(flow: Flow, tau: float | None = None, positions=None, *, into: str = "any") -> pd.DataFrame:
    """Tidy per-prompt head usage: ``prompt, layer, head, importance, used`` (one row per prompt x head)."""
    weights = route_head_importance(flow, tau, positions, into=into)
    batch, L, H = weights.shape
    prompt, layer, head = torch.meshgrid(torch.arange(batch), torch.arange(L), torch.arange(H), indexing="ij")
    return pd.DataFrame(
        {
            "prompt": prompt.flatten().numpy(),
            "layer": layer.flatten().numpy(),
            "head": head.flatten().numpy(),
            "importance": weights.flatten().numpy(),
            "used": (weights > 0).flatten().numpy(),
        }
    )


def _src(layer: int, position: int):
    return (layer - 1, position, "post") if layer > 0 else (0, position, "embed")


def route(flow: Flow, index: int = 0, position: int | None = None, tau: float | None = None) -> nx.DiGraph:
    """The route of one prediction as a ``networkx.DiGraph`` (edges point forward, input -> output).

    Nodes ``(layer, position, kind)``: ``(0, p, "embed")`` (token embedding),
    ``(l, p, "mid")`` (residual after layer ``l``'s attention), ``(l, p, "ffn")``
    (the FFN block), ``(l, p, "post")`` (residual after layer ``l``; the output
    node is ``(L - 1, position, "post")``). No ``mid`` nodes with a parallel residual.
    Edge attributes: ``weight`` (importance after thresholding), ``kind``
    (``attn``, ``residual``, ``attn+residual``, ``ffn``), ``heads``
    (``{head: importance}``, heads above tau) and ``residual`` (its share).
    Graph attributes: ``tokens`` (labels), ``index``, ``position``, ``tau``,
    ``n_layers``, ``parallel``, ``prediction`` (the decoded top-1 token at ``position``).
    """
    if not 0 <= index < len(flow):
        raise IndexError(f"index {index} out of range for a batch of {len(flow)} prompts")
    flow = _thresholded(flow, tau)
    tau = flow.tau
    length = int(flow.lengths[index])
    end = int(_positions(flow, None if position is None else [position] * len(flow))[index])
    L = flow.n_layers
    labels = flow.labels[index][:length] if flow.labels else [str(t) for t in flow.tokens[index, :length].tolist()]
    pred = flow.prediction_label(index, end)
    g = nx.DiGraph(
        tokens=labels, index=index, position=end, tau=tau, n_layers=L, parallel=flow.parallel, prediction=pred
    )
    out = (L - 1, end, "post")
    g.add_node(out)
    reached = {end}
    for layer in reversed(range(L)):
        sums: set[int] = set()
        nxt: set[int] = set()
        for q in sorted(reached):
            post = (layer, q, "post")
            f, fr = float(flow.ffn[index, layer, q]), float(flow.ffn_resid[index, layer, q])
            if f > tau:
                source = _src(layer, q) if flow.parallel else (layer, q, "mid")
                g.add_edge(source, (layer, q, "ffn"), weight=f, kind="ffn", heads={}, residual=0.0)
                g.add_edge((layer, q, "ffn"), post, weight=f, kind="ffn", heads={}, residual=0.0)
                sums.add(q)
                if flow.parallel:
                    nxt.add(q)
            if flow.parallel:
                sums.add(q)
            elif fr > tau:
                g.add_edge((layer, q, "mid"), post, weight=fr, kind="residual", heads={}, residual=fr)
                sums.add(q)
        for q in sorted(sums):
            target = (layer, q, "post") if flow.parallel else (layer, q, "mid")
            for k in range(q + 1):
                heads = {h: float(flow.attn[index, layer, h, q, k]) for h in range(flow.n_heads)}
                heads = {h: w for h, w in heads.items() if w > tau}
                res = float(flow.attn_resid[index, layer, q]) if k == q else 0.0
                res = res if res > tau else 0.0
                weight = sum(heads.values()) + res
                if weight <= tau:
                    continue
                kind = "attn+residual" if heads and res else ("attn" if heads else "residual")
                g.add_edge(_src(layer, k), target, weight=weight, kind=kind, heads=heads, residual=res)
                nxt.add(k)
        reached = nxt
    return g


def route_heads(graph: nx.DiGraph) -> set[tuple[int, int]]:
    """``{(layer, head)}`` used by a route graph (heads above tau on any edge)."""
    found = set()
    for _, v, data in graph.edges(data=True):
        for h in data.get("heads", {}):
            found.add((v[0], h))
    return found


def route_edges(graph: nx.DiGraph) -> pd.DataFrame:
    """A route's edges as a tidy frame: one row per (edge, head) and one per residual/FFN edge.

    Columns: ``layer, source, target, source_kind, target_kind, kind, head, importance``
    (``head`` is -1 for residual and FFN rows).
    """
    rows = []
    for u, v, data in graph.edges(data=True):
        base = dict(layer=v[0], source=u[1], target=v[1], source_kind=u[2], target_kind=v[2])
        for h, w in data["heads"].items():
            rows.append({**base, "kind": "attn", "head": h, "importance": w})
        if data["kind"] == "ffn":
            rows.append({**base, "kind": "ffn", "head": -1, "importance": data["weight"]})
        elif data["residual"]:
            rows.append({**base, "kind": "residual", "head": -1, "importance": data["residual"]})
    cols = ["layer", "source", "target", "source_kind", "target_kind", "kind", "head", "importance"]
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------------------- head frequency
def head_usage(model: Model, prompts, *, tau: float = DEFAULT_TAU, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Each prompt's route importance of each head, per language: ``{language: [n, n_layers, n_heads]}``.

    ``prompts``: a :class:`lsa.tasks.PromptSet` or ``{language: PromptSet}``. A head is on a
    prompt's route (from its ``end``) where its importance is above 0 (:func:`route_head_importance`).
    One forward pass per batch of ``batch_size``.
    """
    sets = prompts if isinstance(prompts, Mapping) else {prompts.language: prompts}
    usage = {}
    for language, ps in sets.items():
        if len(ps) == 0:
            raise ValueError(f"prompt set for {language!r} is empty")
        weights = []
        for s in range(0, len(ps), batch_size):
            lengths = ps.lengths[s : s + batch_size].cpu()
            tokens = ps.clean[s : s + batch_size, : int(lengths.max())]
            flow = contributions(model, tokens, lengths, tau=tau, predictions=False)
            weights.append(route_head_importance(flow, positions=ps.end[s : s + batch_size].cpu()))
        usage[language] = torch.cat(weights)
    return usage


def frequency_table(usage: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Tidy ``layer, head, language, frequency, importance, n_prompts`` from :func:`head_usage`'s ``usage``.

    One row per head and language: ``frequency`` is the share of prompts whose route uses
    the head, ``importance`` its route importance averaged over prompts (0 where unused).
    """
    frames = []
    for language, weights in usage.items():
        n, n_layers, n_heads = weights.shape
        layer, head = torch.meshgrid(torch.arange(n_layers), torch.arange(n_heads), indexing="ij")
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer.flatten().numpy(),
                    "head": head.flatten().numpy(),
                    "language": language,
                    "frequency": (weights > 0).float().mean(0).flatten().numpy(),
                    "importance": weights.mean(0).flatten().numpy(),
                    "n_prompts": n,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def head_frequency(model: Model, prompts, *, tau: float = DEFAULT_TAU, batch_size: int = 16) -> pd.DataFrame:
    """Share of prompts whose route (from each prompt's ``end``) uses each head, per language.

    :func:`frequency_table` of :func:`head_usage` (see there for ``prompts`` and the columns).

    >>> freq = head_frequency(model, {"en": en, "zh": zh})   # doctest: +SKIP
    """
    return frequency_table(head_usage(model, prompts, tau=tau, batch_size=batch_size))


def compare_frequency(freq: pd.DataFrame, a: str = "en", b: str = "zh") -> pd.DataFrame:
    """Wide table ``layer, head, <a>, <b>, difference`` (``a - b``), largest ``|difference|`` first.

    ``frame.attrs["correlation"]`` is the Pearson correlation of the two columns
    (NaN when either is constant).
    """
    for lang in (a, b):
        if lang not in set(freq["language"]):
            raise ValueError(f"no frequencies for language {lang!r}; have {sorted(set(freq['language']))}")
    wide = freq.pivot_table(index=["layer", "head"], columns="language", values="frequency").reset_index()
    wide = wide[["layer", "head", a, b]].copy()
    wide.columns.name = None
    wide["difference"] = wide[a] - wide[b]
    wide = wide.reindex(wide["difference"].abs().sort_values(ascending=False, kind="stable").index)
    wide = wide.reset_index(drop=True)
    wide.attrs["correlation"] = frequency_correlation(freq, a, b)
    return wide


def frequency_correlation(freq: pd.DataFrame, a: str = "en", b: str = "zh") -> float:
    """Pearson correlation between two languages' head frequencies (NaN if either is constant)."""
    wide = freq.pivot_table(index=["layer", "head"], columns="language", values="frequency")
    x, y = wide[a], wide[b]
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(x.corr(y))


# ---------------------------------------------------------------------------- neurons
@torch.no_grad()
def neuron_contributions(
    model: Model, tokens: torch.Tensor, layer: int, position: int, index: int = 0, *, top: int | None = 20
) -> pd.DataFrame:
    """Importance of each FFN neuron's write ``n_i * W_out[i]`` to the FFN sum at one position.

    Parts of the sum: every neuron, the FFN output bias (``neuron = -1``) and the
    incoming residual (``neuron = -2``), normalised together (no threshold). With a
    sandwich norm each neuron's and the bias's part is scaled by the norm's factor
    at that position (see the module docstring), so the parts still sum to the write.
    Returns ``neuron, activation, importance`` for the ``top`` neurons (all with ``None``).
    Not available with a parallel residual (the FFN shares its sum with attention).
    """
    ad = model.adapter
    ad.check_layer(layer)
    if ad.parallel_residual:
        raise ValueError("neuron_contributions needs a sequential residual (this model has a parallel one)")
    acts = capture(model, tokens)
    if not 0 <= position < tokens.shape[1]:
        raise IndexError(f"position {position} out of range for {tokens.shape[1]} tokens")
    f32 = torch.float32
    act = acts.neurons[layer][index, position].to(f32)  # [d_mlp]
    w_out = ad.mlp_out_weight(model.hf, layer).to(f32)  # [d_mlp, d_model]
    scale = acts.mlp_scale[layer]
    scale = torch.ones(ad.d_model, device=w_out.device) if scale is None else scale[index, position].to(f32)
    post = acts.resid_post[layer][index, position].to(f32)
    mid = acts.resid_mid[layer][index, position].to(f32)
    p_neurons = proximity(post, act[:, None] * w_out * scale)
    bias = ad.mlp_out_bias(model.hf, layer)
    p_bias = proximity(post, bias.to(f32) * scale) if bias is not None else torch.tensor(0.0)
    p_res = proximity(post, mid)
    total = p_neurons.sum() + p_bias + p_res
    total = total if total > 0 else torch.tensor(1.0)
    frame = pd.DataFrame(
        {
            "neuron": list(range(ad.d_mlp)) + [-1, -2],
            "activation": act.tolist() + [float("nan"), float("nan")],
            "importance": (torch.cat([p_neurons, p_bias.reshape(1), p_res.reshape(1)]) / total).tolist(),
        }
    )
    frame = frame.sort_values("importance", ascending=False, kind="stable").reset_index(drop=True)
    return frame if top is None else frame.head(top)
