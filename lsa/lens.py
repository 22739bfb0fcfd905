"""Projection to the vocabulary: what a head, an FFN or a neuron writes, read as tokens; and the logit lens.

A write ``w [d_model]`` (a head's ``z_h @ W_O[h]``, an FFN's output, a neuron's
``activation * W_out[n]``) is read through the final norm and the unembedding.
With sandwich norms (Gemma 3) a write is what joins the residual: a head's or a
neuron's part is multiplied by the sublayer norm's factor at that position
(:meth:`lsa.adapter.Adapter.write_scale`), so the heads' writes sum to the
attention write and each neuron's to its share of the FFN write.
How the final norm is applied (``norm=``):

- ``"frozen"`` (default): the norm's scale is *frozen* at its value for the
  actual final residual ``x`` at that position, so the map is linear and the
  projections of all writes add up to the model's logits (minus the norm's and
  unembedding's biases): ``gamma * P(w) / s(x)``, with ``P`` the mean-centring
  of LayerNorm (identity for RMSNorm) and ``s(x) = sqrt(var(x) + eps)``
  (LayerNorm) or ``sqrt(mean(x**2) + eps)`` (RMSNorm). This is the usual choice
  for direct logit attribution.
- ``"apply"``: the final norm module applied to ``w`` itself, bias included, as
  if ``w`` were the whole residual.
- ``"none"``: unembed ``w`` directly.

A neuron's output *direction* (no position) uses ``"frozen"`` with ``s = 1``:
``gamma * P(W_out[n] * g)``, ``g`` the sandwich norm's gain (1 without one);
positive scales do not change its token ranking.
The logit lens reads each layer's residual stream with the real final norm.

>>> head_projection(model, tokens, layer=1, head=3, position=-1)   # doctest: +SKIP
>>> logit_lens(model, tokens, target=answer_id).target              # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from lsa.flow import Activations, capture
from lsa.model import Model

NORMS = ("frozen", "apply", "none")


# ---------------------------------------------------------------------------- final norm
@dataclass(frozen=True)
class NormParams:
    """The final norm as data: ``gamma [d_model]``, ``beta [d_model] | None``, ``eps``, ``centred`` (LayerNorm)."""

    gamma: torch.Tensor
    beta: torch.Tensor | None
    eps: float
    centred: bool

    def scale(self, resid: torch.Tensor) -> torch.Tensor:
        """``s(x)`` of residuals ``[..., d_model] -> [..., 1]``."""
        x = resid.float()
        if self.centred:
            return (x.var(-1, unbiased=False, keepdim=True) + self.eps).sqrt()
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def frozen(self, write: torch.Tensor, resid: torch.Tensor | None) -> torch.Tensor:
        """``gamma * P(write) / s(resid)`` (``s = 1`` without ``resid``): ``[..., d_model]``."""
        w = write.float()
        if self.centred:
            w = w - w.mean(-1, keepdim=True)
        if resid is not None:
            w = w / self.scale(resid)
        return w * self.gamma.float()


def final_norm(model: Model) -> NormParams:
    """The model's final norm as :class:`NormParams` (LayerNorm or an RMSNorm with ``weight``; gain from the adapter)."""
    module = model.module("final_norm")
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", None)
    if getattr(module, "weight", None) is None or eps is None:
        raise ValueError(f"final norm {type(module).__name__} has no weight/eps that lens can read")
    centred = isinstance(module, nn.LayerNorm)
    beta = getattr(module, "bias", None) if centred else None
    return NormParams(
        gamma=model.adapter.norm_gain(module),
        beta=None if beta is None else beta.detach(),
        eps=float(eps),
        centred=centred,
    )


def _normed(model: Model, write: torch.Tensor, resid: torch.Tensor | None, norm: str) -> torch.Tensor:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "frozen":
        params = final_norm(model)
        if resid is not None:  # the frozen map must reproduce the module on the residual itself
            got = params.frozen(resid, resid) + (0 if params.beta is None else params.beta.float())
            with torch.no_grad():
                want = model.module("final_norm")(resid).float()
            if not torch.allclose(got, want, atol=1e-4, rtol=1e-3):
                raise ValueError("lens cannot reproduce this final norm with a frozen scale; use norm='apply'")
        return params.frozen(write, resid)
    if norm == "apply":
        with torch.no_grad():
            return model.module("final_norm")(write.to(model.module("final_norm").weight.dtype)).float()
    return write.float()


@torch.no_grad()
def write_logits(
    model: Model, write: torch.Tensor, resid: torch.Tensor | None = None, *, norm: str = "frozen"
) -> torch.Tensor:
    """Logits of a write ``[..., d_model] -> [..., d_vocab]`` through the final norm (see module doc) and ``W_U``.

    ``resid`` is the actual final residual at the write's position (needed for
    ``norm="frozen"``; without it the scale is 1). The unembedding's bias, if
    any, is not added: it belongs to no write.
    """
    w_u = model.adapter.unembed_weight(model.hf).float()  # [d_vocab, d_model]
    return _normed(model, write.to(w_u.device), None if resid is None else resid.to(w_u.device), norm) @ w_u.T


@torch.no_grad()
def write_logit_z(
    model: Model, write: torch.Tensor, resid: torch.Tensor, targets: torch.Tensor, *, gram=None
) -> torch.Tensor:
    """``(logits[target] - logits.mean()) / logits.std()`` of :func:`write_logits` (frozen norm) per row ``[b]``,
    without the ``[b, d_vocab]`` logits: the mean and the (unbiased) variance over the vocabulary come
    from ``W_U``'s column means and Gram matrix ``W_U^T W_U``, in float64.

    ``write``, ``resid`` ``[b, d_model]``; ``targets`` ``[b]`` vocabulary ids; ``gram``: :func:`unembed_gram`'s
    result, to share between calls (default: computed here).
    """
    w_u = model.adapter.unembed_weight(model.hf)
    mean_row, g = unembed_gram(model) if gram is None else gram
    x = _normed(model, write.to(w_u.device), resid.to(w_u.device), "frozen").double()
    v = w_u.shape[0]
    at = (x * w_u[targets.to(w_u.device)].double()).sum(-1)
    mean = x @ mean_row
    var = (((x @ g) * x).sum(-1) - v * mean**2) / (v - 1)
    return ((at - mean) / var.clamp(min=0).sqrt().clamp(min=1e-12)).float()


@torch.no_grad()
def unembed_gram(model: Model) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_U``'s mean row ``[d_model]`` and Gram matrix ``W_U^T W_U`` ``[d_model, d_model]``, float64 (:func:`write_logit_z`)."""
    w_u = model.adapter.unembed_weight(model.hf).double()
    return w_u.mean(0), w_u.T @ w_u


def _decode(model: Model, ids: list[int]) -> list[str]:
    if model.tokenizer is None:
        return [str(i) for i in ids]
    return [model.tokenizer.decode([i]) for i in ids]


def top_tokens(model: Model, logits: torch.Tensor, k: int = 10) -> pd.DataFrame:
    """Top-``k`` promoted (highest) and suppressed (lowest) tokens of a logit vector ``[d_vocab]``.

    Columns: ``direction`` (``promoted``/``suppressed``), ``rank`` (0 = strongest), ``token_id``, ``token``, ``logit``.
    """
    if logits.ndim != 1:
        raise ValueError(f"logits must be one vector [d_vocab], got shape {tuple(logits.shape)}")
    k = min(k, logits.shape[0])
    rows = []
    for direction, largest in (("promoted", True), ("suppressed", False)):
        vals, ids = logits.topk(k, largest=largest)
        for rank, (v, i, t) in enumerate(zip(vals.tolist(), ids.tolist(), _decode(model, ids.tolist()))):
            rows.append(dict(direction=direction, rank=rank, token_id=i, token=t, logit=v))
    return pd.DataFrame(rows, columns=["direction", "rank", "token_id", "token", "logit"])


# ---------------------------------------------------------------------------- component writes
def _prepare(model: Model, tokens: torch.Tensor, position: int, index: int) -> tuple[Activations, int]:
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    if not 0 <= index < tokens.shape[0]:
        raise IndexError(f"index {index} out of range for a batch of {tokens.shape[0]}")
    pos = tokens.shape[1]
    if not -pos <= position < pos:
        raise IndexError(f"position {position} out of range for {pos} tokens")
    return capture(model, tokens), position % pos


def head_write(acts: Activations, model: Model, layer: int, head: int, index: int, position: int) -> torch.Tensor:
    """Head ``head``'s write at a position: ``z[index, position, head] @ W_O[head]`` (times the sandwich
    norm's factor there, if any), ``[d_model]`` (no bias)."""
    model.adapter.check_head(head, layer)
    ad = model.adapter
    z = acts.z[layer][index, position].reshape(ad.n_heads, ad.d_head)[head]
    write = z @ ad.o_proj_by_head(model.hf, layer)[head]
    scale = acts.attn_scale[layer]
    return write if scale is None else write * scale[index, position].to(write.dtype)


def _frame(model, logits, k, **info) -> pd.DataFrame:
    frame = top_tokens(model, logits, k)
    for i, (key, value) in enumerate(info.items()):
        frame.insert(i, key, value)
    return frame


@torch.no_grad()
def head_projection(
    model: Model,
    tokens: torch.Tensor,
    layer: int,
    head: int,
    position: int = -1,
    *,
    index: int = 0,
    k: int = 10,
    norm: str = "frozen",
) -> pd.DataFrame:
    """Tokens a head's write at ``position`` promotes and suppresses (tidy; see :func:`top_tokens`).

    >>> head_projection(model, tokens, layer=21, head=3, position=-1)   # doctest: +SKIP
    """
    acts, position = _prepare(model, tokens, position, index)
    write = head_write(acts, model, layer, head, index, position)
    logits = write_logits(model, write, acts.resid_post[-1][index, position], norm=norm)
    return _frame(model, logits, k, component="head", layer=layer, head=head, neuron=-1, position=position)


@torch.no_grad()
def ffn_projection(
    model: Model,
    tokens: torch.Tensor,
    layer: int,
    position: int = -1,
    *,
    index: int = 0,
    k: int = 10,
    norm: str = "frozen",
) -> pd.DataFrame:
    """Tokens the FFN of ``layer`` promotes and suppresses at ``position`` (its whole output, bias included)."""
    model.adapter.check_layer(layer)
    acts, position = _prepare(model, tokens, position, index)
    write = acts.mlp_out[layer][index, position]
    logits = write_logits(model, write, acts.resid_post[-1][index, position], norm=norm)
    return _frame(model, logits, k, component="ffn", layer=layer, head=-1, neuron=-1, position=position)


@torch.no_grad()
def neuron_projection(
    model: Model,
    layer: int,
    neuron: int,
    tokens: torch.Tensor | None = None,
    position: int = -1,
    *,
    index: int = 0,
    k: int = 10,
) -> pd.DataFrame:
    """Tokens a neuron promotes and suppresses.

    Without ``tokens``: its output direction ``W_out[neuron]`` through the final
    norm's gain (and centring), scale 1. With ``tokens``: its write
    ``activation * W_out[neuron]`` at ``position``, frozen-scale norm (a negative
    activation flips promoted and suppressed).
    """
    model.adapter.check_neuron(neuron, layer)
    direction = model.adapter.mlp_out_weight(model.hf, layer)[neuron].detach().float()
    if tokens is None:
        gain = model.adapter.write_gain(model.hf, "mlp", layer)
        direction = direction if gain is None else direction * gain.to(direction.device)
        logits = write_logits(model, direction, None, norm="frozen")
        return _frame(model, logits, k, component="neuron", layer=layer, head=-1, neuron=neuron, position=-1)
    acts, position = _prepare(model, tokens, position, index)
    act = acts.neurons[layer][index, position, neuron]
    scale = acts.mlp_scale[layer]
    write = act * direction if scale is None else act * direction * scale[index, position]
    logits = write_logits(model, write, acts.resid_post[-1][index, position], norm="frozen")
    frame = _frame(model, logits, k, component="neuron", layer=layer, head=-1, neuron=neuron, position=position)
    frame["activation"] = float(act)
    return frame


# ---------------------------------------------------------------------------- logit lens
@dataclass
class LogitLens:
    """The residual stream read as predictions, layer by layer.

    ``top``: ``layer, rank, token_id, token, prob, logit`` (``layer = -1`` is the
    embedding, ``l`` the residual after block ``l``). ``target``: ``layer,
    token_id, token, rank, prob, logit`` of the target token per layer (``None``
    without a target). ``logits``: ``[n_layers + 1, d_vocab]``.
    """

    top: pd.DataFrame
    target: pd.DataFrame | None
    logits: torch.Tensor


@torch.no_grad()
def logit_lens(
    model: Model, tokens: torch.Tensor, position: int = -1, *, index: int = 0, k: int = 5, target: int | None = None
) -> LogitLens:
    """Apply the final norm and unembedding to the residual stream after each layer at one position.

    >>> lens = logit_lens(model, tokens, target=answer_id)   # doctest: +SKIP
    >>> lens.target[["layer", "rank", "prob"]]               # doctest: +SKIP
    """
    acts, position = _prepare(model, tokens, position, index)
    resid = torch.stack([acts.resid_pre[0][index, position]] + [r[index, position] for r in acts.resid_post])
    logits = model.adapter.unembed(model.hf, resid).float()  # [L + 1, d_vocab]
    probs = logits.softmax(-1)
    layers = list(range(-1, model.adapter.n_layers))
    rows = []
    for i, layer in enumerate(layers):
        vals, ids = logits[i].topk(min(k, logits.shape[-1]))
        for rank, (v, t, s) in enumerate(zip(vals.tolist(), ids.tolist(), _decode(model, ids.tolist()))):
            rows.append(dict(layer=layer, rank=rank, token_id=t, token=s, prob=float(probs[i, t]), logit=v))
    top = pd.DataFrame(rows, columns=["layer", "rank", "token_id", "token", "prob", "logit"])
    target_frame = None
    if target is not None:
        target = int(target)
        if not 0 <= target < logits.shape[-1]:
            raise IndexError(f"target token {target} out of range for a vocabulary of {logits.shape[-1]}")
        ranks = (logits > logits[:, target : target + 1]).sum(-1)
        name = _decode(model, [target])[0]
        target_frame = pd.DataFrame(
            {
                "layer": layers,
                "token_id": target,
                "token": name,
                "rank": ranks.tolist(),
                "prob": probs[:, target].tolist(),
                "logit": logits[:, target].tolist(),
            }
        )
    return LogitLens(top=top, target=target_frame, logits=logits)
