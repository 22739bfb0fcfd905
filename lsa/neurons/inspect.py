"""Inspecting one neuron: its statistics per language, its top tokens, the tokens its output promotes.

:func:`top_activating` ranks the activations that
:func:`lsa.neurons.collect.record_activations` keeps.
"""

from __future__ import annotations

import pandas as pd
import torch

from lsa.neurons.collect import LayerActivations, from_weights
from lsa.neurons.sets import check_neuron
from lsa.neurons.stats import NeuronStats


def neuron_profile(stats: NeuronStats, layer: int, neuron: int) -> pd.DataFrame:
    """One row per language: ``prob`` (P(a > 0)), ``mean``, ``std``, ``mean_abs``, ``n_tokens`` of one neuron."""
    check_neuron(stats, layer, neuron)
    return pd.DataFrame(
        {
            "language": stats.languages,
            "prob": stats.prob[:, layer, neuron].numpy(),
            "mean": stats.mean[:, layer, neuron].numpy(),
            "std": stats.std[:, layer, neuron].numpy(),
            "mean_abs": stats.mean_abs[:, layer, neuron].numpy(),
            "n_tokens": stats.n_tokens.numpy(),
        }
    )


def top_activating(record: LayerActivations, neuron: int, *, k: int = 10, window: int = 4) -> pd.DataFrame:
    """The ``k`` tokens per language where ``neuron`` fires most, with ``window`` tokens of context each side.

    Columns: ``language``, ``rank``, ``activation``, ``token``, ``context`` (the token in ``[[ ]]``).
    """
    values = record.neuron(neuron)
    tokens = record.tokens
    out = []
    for lang in tokens["language"].unique():
        rows = (tokens["language"] == lang).to_numpy().nonzero()[0]
        if not len(rows):
            continue
        top = torch.as_tensor(values[rows]).topk(min(k, len(rows)))
        for rank, (v, r) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            row = rows[r]
            text, pos = tokens["text"].iat[row], tokens["pos"].iat[row]
            same = tokens.index[(tokens["text"] == text) & (tokens["pos"].between(pos - window, pos + window))]
            parts = [
                f"[[{tokens['token'].iat[i]}]]" if tokens["pos"].iat[i] == pos else tokens["token"].iat[i] for i in same
            ]
            out.append(
                {
                    "language": lang,
                    "rank": rank,
                    "activation": v,
                    "token": tokens["token"].iat[row],
                    "context": "".join(parts),
                }
            )
    return pd.DataFrame(out, columns=["language", "rank", "activation", "token", "context"])


@torch.no_grad()
def promoted_tokens(model, layer: int, neuron: int, *, k: int = 10) -> pd.DataFrame:
    """Tokens a neuron's output direction promotes and suppresses through the unembedding.

    The direction ``W_out[neuron]`` goes through the linear part of the final norm
    (centred for LayerNorm, times its weight; no bias, no data-dependent scale)
    and the unembedding. For a positive activation (a positive gate x up product
    in SwiGLU models) the top rows are promoted. Columns: ``direction``
    (``promoted`` / ``suppressed``), ``rank``, ``token``, ``token_id``, ``logit``.
    A remote model computes the ``[d_vocab]`` logits inside one trace.
    """
    check_neuron(model, layer, neuron)
    centre = isinstance(model.adapter.module(model.hf, "final_norm"), torch.nn.LayerNorm)
    logits = from_weights(model, _direction_logits, layer, neuron, centre)  # [d_vocab]
    rows = []
    for direction, largest in (("promoted", True), ("suppressed", False)):
        top = logits.topk(min(k, logits.numel()), largest=largest)
        for rank, (v, i) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            token = model.tokenizer.decode([i]) if model.tokenizer is not None else str(i)
            rows.append({"direction": direction, "rank": rank, "token": token, "token_id": i, "logit": v})
    return pd.DataFrame(rows)


def _direction_logits(cfg, root, layer: int, neuron: int, centre: bool) -> torch.Tensor:
    """``[d_vocab]``: a neuron's output direction through the final norm's linear part and the unembedding."""
    d = cfg.mlp_out_weight(root, layer)[neuron].detach().float()
    gain = cfg.write_gain(root, "mlp", layer)  # a sandwich norm's gain (Gemma 3), else None
    if gain is not None:
        d = d * gain.to(d.device)
    if centre:
        d = d - d.mean()
    norm = cfg.module(root, "final_norm")
    if getattr(norm, "weight", None) is not None:
        d = d * cfg.norm_gain(norm).to(d.device)
    return cfg.unembed_weight(root).detach().float() @ d
