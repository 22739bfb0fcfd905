"""Selection of language-specific neurons: LAPE (Tang et al. 2024) and PLND-style importance.

:func:`lape` picks language-specific neurons from the activation probabilities
exactly as the published ``identify.py`` does (filter at the 95th percentile,
lowest-entropy 1 %, assignment at the 95th percentile); :func:`plnd_importance`
gives a second, PLND-style score and :func:`plnd_neurons` the sets it implies.
Both selections return a :class:`LapeResult`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from lsa.neurons.collect import from_weights
from lsa.neurons.sets import save_masks
from lsa.neurons.stats import NeuronStats

# ----------------------------------------------------------------- LAPE


def _kth(values: torch.Tensor, ratio: float) -> float:
    """``values.kthvalue(round(len * ratio))`` as in the published code (k clamped to 1..len)."""
    k = min(max(round(values.numel() * ratio), 1), values.numel())
    return values.kthvalue(k).values.item()


@dataclass
class LapeResult:
    """Language-specific neurons found by :func:`lape`.

    Attributes:
        languages: language names, in mask order.
        masks: ``masks[lang][layer]`` -> sorted LongTensor of neuron indices (the published format).
        table: one row per (selected neuron, assigned language): ``layer``, ``neuron``,
            ``language``, ``entropy``, ``prob_<lang>`` for every language.
        entropy: ``[layer, neuron]`` normalised-probability entropy (inf where filtered out).
        filter_value: the activation probability a neuron must exceed in some language to be kept.
        activation_bar: the probability a selected neuron must exceed in a language to be assigned to it.
        params: the thresholds used.
    """

    languages: list[str]
    masks: list[list[torch.Tensor]]
    table: pd.DataFrame
    entropy: torch.Tensor
    filter_value: float
    activation_bar: float
    params: dict

    def mask(self, language: str) -> list[torch.Tensor]:
        if language not in self.languages:
            raise ValueError(f"unknown language {language!r}; this result has {self.languages}")
        return self.masks[self.languages.index(language)]

    def strongest(self, language: str | None = None) -> tuple[int, int] | None:
        """``(layer, neuron)`` of the set's neuron that is strongest in its language: the highest activation
        probability there (LAPE's ``prob_<language>``; PLND's ``importance_<language>``). ``language``:
        default the first language whose set is not empty; ``None`` when every set is empty.
        """
        languages = [language] if language is not None else self.languages
        for lang in languages:
            self.mask(lang)  # an unknown language is an error naming the known ones
            rows = self.table[self.table["language"] == lang]
            if len(rows):
                score = f"prob_{lang}" if f"prob_{lang}" in rows else f"importance_{lang}"
                best = rows.loc[rows[score].idxmax()]
                return int(best["layer"]), int(best["neuron"])
        return None

    def counts(self) -> pd.DataFrame:
        """Language-specific neurons per layer: one row per (language, layer) with ``n_neurons``."""
        rows = [
            {"language": lang, "layer": layer, "n_neurons": len(idx)}
            for lang, mask in zip(self.languages, self.masks)
            for layer, idx in enumerate(mask)
        ]
        return pd.DataFrame(rows)

    def overlap(self) -> pd.DataFrame:
        """Neurons shared by each pair of languages: ``[lang x lang]`` counts (diagonal = set sizes)."""
        sets = [{(layer, int(i)) for layer, idx in enumerate(m) for i in idx.tolist()} for m in self.masks]
        data = [[len(a & b) for b in sets] for a in sets]
        return pd.DataFrame(data, index=self.languages, columns=self.languages)

    def save(self, path: str | Path) -> Path:
        """Write the masks in the published format (see :func:`save_masks`)."""
        return save_masks(self.masks, path)


def _as_probs(source, languages) -> tuple[torch.Tensor, list[str]]:
    if isinstance(source, NeuronStats):
        return source.prob, list(source.languages)
    probs = torch.as_tensor(source, dtype=torch.float64)
    if probs.dim() != 3:
        raise ValueError(f"activation probabilities must be [lang, layer, neuron]; got shape {tuple(probs.shape)}")
    languages = list(languages) if languages is not None else [f"lang{i}" for i in range(probs.shape[0])]
    if len(languages) != probs.shape[0]:
        raise ValueError(f"{len(languages)} language names for {probs.shape[0]} languages")
    return probs, languages


def lape(
    source: NeuronStats | torch.Tensor,
    *,
    languages: list[str] | None = None,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
    activation_bar_ratio: float = 0.95,
) -> LapeResult:
    """Language activation probability entropy (Tang et al. 2024), as the published ``identify.py``.

    ``source``: :class:`NeuronStats` or activation probabilities ``[lang, layer, neuron]``.

    1) normalise each neuron's probabilities over languages and take their entropy;
    2) drop neurons whose probability exceeds the ``filter_rate`` quantile
       (``kthvalue(round(N * filter_rate))`` over all layer x neuron x language
       probabilities) in no language;
    3) keep the ``round(n_layers * d_mlp * top_rate)`` lowest-entropy neurons left;
    4) assign each kept neuron to every language where its probability exceeds the
       ``activation_bar_ratio`` quantile (same kthvalue rule).

    One deliberate difference: neurons dropped in step 2 are never selected in
    step 3, even when fewer neurons than the quota survive (the published code
    ranks them at infinite entropy; with equal ``filter_rate`` and
    ``activation_bar_ratio`` it assigns them nowhere anyway).
    """
    probs, languages = _as_probs(source, languages)
    n_lang, n_layers, d_mlp = probs.shape
    p = probs.permute(1, 2, 0)  # [layer, neuron, lang]
    normed = p / p.sum(-1, keepdim=True)
    normed = torch.nan_to_num(normed, nan=0.0)
    logs = torch.where(normed > 0, normed.log(), torch.zeros_like(normed))
    entropy = -(normed * logs).sum(-1)  # [layer, neuron]
    flat_probs = p.reshape(-1)
    filter_value = _kth(flat_probs, filter_rate)
    keep = (p > filter_value).any(-1)
    entropy = torch.where(keep, entropy, torch.full_like(entropy, math.inf))
    quota = round(entropy.numel() * top_rate)
    n_select = min(quota, int(keep.sum()))
    flat_entropy = entropy.reshape(-1)
    _, index = flat_entropy.topk(n_select, largest=False, sorted=True)
    rows, cols = index // d_mlp, index % d_mlp
    selected = p[rows, cols]  # [n_select, lang]
    bar = _kth(flat_probs, activation_bar_ratio)
    assigned = selected > bar  # [n_select, lang]
    masks: list[list[torch.Tensor]] = []
    records = []
    for j, lang in enumerate(languages):
        hit = assigned[:, j]
        pairs = sorted(zip(rows[hit].tolist(), cols[hit].tolist()))
        per_layer: list[list[int]] = [[] for _ in range(n_layers)]
        for layer, neuron in pairs:
            per_layer[layer].append(neuron)
            records.append(
                {
                    "language": lang,
                    "layer": layer,
                    "neuron": neuron,
                    "entropy": float(entropy[layer, neuron]),
                    **{f"prob_{name}": float(p[layer, neuron, k]) for k, name in enumerate(languages)},
                }
            )
        masks.append([torch.tensor(idx, dtype=torch.long) for idx in per_layer])
    columns = ["language", "layer", "neuron", "entropy"] + [f"prob_{name}" for name in languages]
    table = pd.DataFrame(records, columns=columns)
    return LapeResult(
        languages=languages,
        masks=masks,
        table=table,
        entropy=entropy,
        filter_value=filter_value,
        activation_bar=bar,
        params=dict(top_rate=top_rate, filter_rate=filter_rate, activation_bar_ratio=activation_bar_ratio),
    )


# ----------------------------------------------------------------- PLND-style importance


def plnd_importance(model, stats: NeuronStats) -> torch.Tensor:
    """PLND-style importance ``E|a| * ||W_out[neuron]||`` per language: ``[lang, layer, neuron]``.

    The expected norm of what a neuron writes to the residual stream (Zhao et al.
    2024 score a neuron by the output change when it is removed). For SwiGLU
    models ``a`` is the gate activation, so this ignores the up projection's factor.
    A remote model reads the norms inside one trace (:func:`from_weights`).
    """
    norms = from_weights(model, _out_norms).to(torch.float64)  # [layer, neuron]
    return stats.mean_abs * norms[None]


def _out_norms(cfg, root) -> torch.Tensor:
    """``||W_out[neuron]||`` of every layer: ``[layer, neuron]`` float32 (``root``: see :func:`from_weights`)."""
    norms = []
    for layer in range(cfg.n_layers):
        w_out = cfg.mlp_out_weight(root, layer).detach().float()
        gain = cfg.write_gain(root, "mlp", layer)  # a sandwich norm's gain (Gemma 3), else None
        w_out = w_out if gain is None else w_out * gain.to(w_out.device)
        norms.append(w_out.norm(dim=-1).cpu())
    return torch.stack(norms)


def plnd_neurons(importance: torch.Tensor, languages: list[str], *, top_rate: float = 0.01) -> LapeResult:
    """Neurons in a language's top ``top_rate`` by importance and in no other language's top set.

    ``importance``: ``[lang, layer, neuron]`` (e.g. from :func:`plnd_importance`).
    Returned in the same form as :func:`lape` (``entropy`` is not used: zeros).
    """
    importance = torch.as_tensor(importance, dtype=torch.float64)
    n_lang, n_layers, d_mlp = importance.shape
    k = max(round(n_layers * d_mlp * top_rate), 1)
    top = torch.zeros(n_lang, n_layers * d_mlp, dtype=torch.bool)
    for j in range(n_lang):
        top[j, importance[j].reshape(-1).topk(k).indices] = True
    only = top & (top.sum(0, keepdim=True) == 1)
    masks, records = [], []
    for j, lang in enumerate(languages):
        flat = only[j].nonzero().reshape(-1)
        rows, cols = (flat // d_mlp).tolist(), (flat % d_mlp).tolist()
        per_layer: list[list[int]] = [[] for _ in range(n_layers)]
        for layer, neuron in zip(rows, cols):
            per_layer[layer].append(neuron)
            records.append(
                {
                    "language": lang,
                    "layer": layer,
                    "neuron": neuron,
                    **{f"importance_{n}": float(importance[i, layer, neuron]) for i, n in enumerate(languages)},
                }
            )
        masks.append([torch.tensor(idx, dtype=torch.long) for idx in per_layer])
    return LapeResult(
        languages=list(languages),
        masks=masks,
        table=pd.DataFrame(records),
        entropy=torch.zeros(n_layers, d_mlp),
        filter_value=float("nan"),
        activation_bar=float("nan"),
        params={"method": "plnd", "top_rate": top_rate},
    )
