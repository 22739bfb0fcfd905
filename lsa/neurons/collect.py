"""Collection: texts to token batches, and the model's ``mlp_act`` activations read from them.

:func:`collect_stats` streams texts of each language through the model once
(one engine run per batch, :func:`batch_totals`) and keeps, per language,
layer and neuron, the token count, the count of activations > 0 and the sums of
activations, absolute activations and squares
(:class:`~lsa.neurons.stats.NeuronStats`, ``[lang, layer, neuron]``). Memory
does not grow with the corpus; the stats can be saved every few batches and a
run resumed. On a remote model (``model.remote``: NDIF, or ``"local"`` for
nnsight's simulation) the run is one nnsight trace that reduces inside the
trace (:func:`activation_totals`, the same code as locally), so only
``[layer, neuron]`` totals come back.

:func:`record_activations` keeps one layer's activations at every token of a
small sample (for a neuron's top tokens); :func:`from_weights` computes a
function of the weights, locally or inside one trace.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from lsa import engine
from lsa.engine import Plan, Read
from lsa.neurons.sets import check_neuron
from lsa.neurons.stats import NeuronStats

# ----------------------------------------------------------------- batches


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad or 0)


def _item(item, text_column: str):
    if isinstance(item, Mapping):
        if "input_ids" in item:
            return item
        if text_column not in item:
            raise ValueError(f"dataset rows have no {text_column!r} column (pass text_column=); keys: {list(item)}")
        return item[text_column]
    return item


def token_batches(
    model,
    texts: Iterable,
    *,
    batch_size: int = 16,
    max_length: int = 128,
    text_column: str = "text",
    add_special_tokens: bool = True,
):
    """Right-padded batches ``(input_ids [b, pos], attention_mask [b, pos], n_items)`` from any texts.

    ``texts`` may yield strings, token id lists / 1-D tensors, 2-D tensors
    (a ready batch), dicts with ``input_ids`` (and ``attention_mask``), or dataset
    rows with a ``text_column``. Sequences longer than ``max_length`` are cut.
    """
    pad = _pad_id(model.tokenizer) if model.tokenizer is not None else 0
    buffer: list[list[int]] = []
    strings: list[str] = []
    n_items = 0

    def flush():
        nonlocal buffer, n_items
        seqs = [s[:max_length] for s in buffer if len(s)]
        if seqs:
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
                mask[i, : len(s)] = 1
            out = (ids, mask, n_items)
        else:
            out = None
        buffer, n_items = [], 0
        return out

    def encode_strings():
        nonlocal strings
        if strings:
            if model.tokenizer is None:
                raise ValueError("texts are strings but the model has no tokenizer")
            enc = model.tokenizer(
                strings, add_special_tokens=add_special_tokens, truncation=True, max_length=max_length
            )["input_ids"]
            buffer.extend(list(e) for e in enc)
            strings = []

    for raw in texts:
        item = _item(raw, text_column)
        if isinstance(item, str):
            strings.append(item)
            n_items += 1
        elif isinstance(item, Mapping):
            encode_strings()
            ids = torch.as_tensor(item["input_ids"])
            mask = torch.as_tensor(item.get("attention_mask", torch.ones_like(ids)))
            if ids.dim() == 1:
                ids, mask = ids[None], mask[None]
            for row, m in zip(ids, mask):
                buffer.append(row[m.bool()].tolist())
            n_items += ids.shape[0]
        elif torch.is_tensor(item) and item.dim() == 2:
            encode_strings()
            buffer.extend(row.tolist() for row in item)
            n_items += item.shape[0]
        else:
            encode_strings()
            buffer.append([int(t) for t in (item.tolist() if torch.is_tensor(item) else item)])
            n_items += 1
        if len(strings) + len(buffer) >= batch_size:
            encode_strings()
            batch = flush()
            if batch is not None:
                yield batch
    encode_strings()
    batch = flush()
    if batch is not None:
        yield batch


def from_weights(model, fn, *args) -> torch.Tensor:
    """``fn(adapter, root, *args)`` computed from the model's weights (a tensor).

    ``root`` is the torch model for a local model; for a remote one it is the
    nnsight model inside a one-token trace, so the weights are read where they
    are and only ``fn``'s result comes back.
    """
    cfg = model.adapter
    if engine.can(model, "weights"):
        return fn(cfg, model.hf, *args)
    one = torch.zeros(1, 1, dtype=torch.long)
    root = model.nn  # the block names no lsa Model: it would ship the tokenizer with every trace
    with torch.no_grad(), model.trace(one, use_cache=False):
        out = fn(cfg, root, *args).cpu().save()
    return out


# ----------------------------------------------------------------- collection


def activation_totals(x: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """One batch's totals of neuron activations ``x [..., d_mlp]`` over the kept positions.

    ``keep``: a boolean mask over the flattened positions (``None``: all). Returns
    ``(count of x > 0, sum, sum of |x|, sum of x^2)``, each ``[d_mlp]``, summed in float64:
    the standard deviation is ``sqrt(E[x^2] - E[x]^2)``, and float32 sums left a neuron held
    constant by steering a std of up to 1e-3 from rounding alone. The hooks of
    :func:`collect_stats` call it on a local model, and its trace calls it inside the trace
    on a remote one.
    """
    x = x.detach()
    x = x.reshape(-1, x.shape[-1])
    if keep is not None:
        x = x[keep.to(x.device)]
    x = x.double()
    return (x > 0).sum(0), x.sum(0), x.abs().sum(0), (x * x).sum(0)


def _stacked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """:func:`activation_totals` stacked ``[4, d_mlp]`` float64 (computed where the model runs)."""
    return torch.stack([t.double() for t in activation_totals(x, keep)])  # the count is an integer


def batch_totals(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One batch's totals of every layer's ``mlp_act``: ``([4, layer, d_mlp]`` float64, kept tokens``)``.

    The four rows are :func:`activation_totals`' (count of x > 0, sum, sum of |x|, sum of x^2)
    over the non-padding tokens (``mask [batch, pos]``). One engine run reads every layer,
    reduced where the model runs (inside the trace for a remote model, so only the totals
    come back), and stops after the last layer's activation.
    """
    flat = mask.reshape(-1).bool()
    keep = None if bool(flat.all()) else flat
    n = model.adapter.n_layers
    plan = Plan(
        reads=[Read("mlp_act", layer, partial(_stacked, keep=keep)) for layer in range(n)],
        logits=None,
        attention_mask=mask,
        stop_after=("mlp_act", n - 1),
    )
    out = engine.run(model, ids, plan)
    return torch.stack([out[("mlp_act", layer)].cpu() for layer in range(n)], dim=1), int(flat.sum())


def as_language_dict(texts) -> dict[str, Iterable]:
    """``texts`` as a dict ``{language: iterable of texts}``; ``ValueError`` unless it is a mapping."""
    if isinstance(texts, Mapping):
        return dict(texts)
    raise ValueError("texts must be a mapping {language: texts}, e.g. {'en': [...], 'zh': [...]}")


def _len_or_none(obj) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


@torch.no_grad()
def collect_stats(
    model,
    texts: Mapping[str, Iterable],
    *,
    batch_size: int = 16,
    max_length: int = 128,
    text_column: str = "text",
    add_special_tokens: bool = True,
    stats: NeuronStats | None = None,
    save_path: str | Path | None = None,
    save_every: int = 50,
    resume: bool = True,
    progress: bool = True,
) -> NeuronStats:
    """Activation statistics of every FFN neuron per language over ``texts``.

    Args:
        model: a :class:`lsa.model.Model`.
        texts: ``{language: iterable}``; each iterable yields strings, token id
            sequences, ``[batch, pos]`` tensors or dataset rows (see :func:`token_batches`).
        stats: existing stats to add to (e.g. another language).
        save_path: write the stats there every ``save_every`` batches and at the end;
            with ``resume`` and an existing file, continue from it, skipping the
            texts of each language already consumed.

    Only non-padding tokens count. Returns :class:`NeuronStats` ``[lang, layer, neuron]``.
    """
    from tqdm.auto import tqdm

    cfg = model.adapter
    texts = as_language_dict(texts)
    if stats is None and save_path is not None and resume and Path(save_path).exists():
        stats = NeuronStats.load(save_path)
    if stats is None:
        stats = NeuronStats.empty([], cfg.n_layers, cfg.d_mlp, meta={"model": getattr(model, "name", "model")})
    if (stats.n_layers, stats.d_mlp) != (cfg.n_layers, cfg.d_mlp):
        raise ValueError(
            f"stats have shape {(stats.n_layers, stats.d_mlp)} but the model has {(cfg.n_layers, cfg.d_mlp)}"
        )
    for lang in texts:
        stats.add_language(lang)
    n_batches = 0
    for lang, source in texts.items():
        done = int(stats.n_items[stats.lang_index(lang)])
        total = _len_or_none(source)
        stream = itertools.islice(iter(source), done, None) if done else source
        bar = tqdm(
            total=None if total is None else max(total - done, 0),
            desc=f"neuron stats [{lang}]",
            unit="text",
            disable=not progress,
            leave=False,
        )
        batches = token_batches(
            model,
            stream,
            batch_size=batch_size,
            max_length=max_length,
            text_column=text_column,
            add_special_tokens=add_special_tokens,
        )
        for ids, mask, n_items in batches:
            totals, n_tok = batch_totals(model, ids, mask)
            stats.update(lang, n_tok, totals[0].long(), totals[1], totals[2], totals[3], n_items)
            bar.update(n_items)
            n_batches += 1
            if save_path is not None and n_batches % save_every == 0:
                stats.save(save_path)
        bar.close()
    if save_path is not None:
        stats.save(save_path)
    return stats


# ----------------------------------------------------------------- one layer's activations


@dataclass
class LayerActivations:
    """Every neuron's activation of one layer on a sample of texts.

    ``tokens``: one row per non-padding token (``language``, ``text``, ``pos``,
    ``token_id``, ``token``); ``acts``: ``[n_tokens, d_mlp]`` float32, rows aligned.
    """

    layer: int
    tokens: pd.DataFrame
    acts: torch.Tensor

    def neuron(self, neuron: int) -> torch.Tensor:
        """``[n_tokens]`` activations of one neuron."""
        if not 0 <= neuron < self.acts.shape[1]:
            raise IndexError(f"neuron {neuron!r} out of range: each MLP has {self.acts.shape[1]} neurons")
        return self.acts[:, neuron]


def _kept_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x [batch, pos, d_mlp]`` at the positions where ``keep [batch, pos]`` is true: ``[n_kept, d_mlp]`` float32, CPU."""
    return x.detach()[keep.to(x.device)].float().cpu()


@torch.no_grad()
def record_activations(
    model,
    texts: Mapping[str, Iterable],
    layer: int,
    *,
    max_texts: int = 64,
    batch_size: int = 16,
    max_length: int = 64,
) -> LayerActivations:
    """Activations of all neurons of ``layer`` on up to ``max_texts`` texts per language (for top tokens).

    One engine run per batch keeps the layer's activations at the non-padding tokens
    (selected where the model runs, inside the trace for a remote model) and stops there.
    """
    check_neuron(model, layer, 0)
    rows, chunks, text_id = [], [], 0
    for lang, source in as_language_dict(texts).items():
        sample = itertools.islice(iter(source), max_texts)
        for ids, mask, _ in token_batches(model, sample, batch_size=batch_size, max_length=max_length):
            keep = mask.bool()
            read = Read("mlp_act", layer, partial(_kept_rows, keep=keep))
            plan = Plan(reads=[read], logits=None, attention_mask=mask, stop_after=("mlp_act", layer))
            chunks.append(engine.run(model, ids, plan)[("mlp_act", layer)].cpu())
            for b in range(ids.shape[0]):
                for pos in range(int(keep[b].sum())):
                    tid = int(ids[b, pos])
                    rows.append((lang, text_id, pos, tid))
                text_id += 1
    tok = model.tokenizer
    tokens = pd.DataFrame(rows, columns=["language", "text", "pos", "token_id"])
    tokens["token"] = [tok.decode([t]) if tok is not None else str(t) for t in tokens["token_id"]]
    acts = torch.cat(chunks) if chunks else torch.zeros(0, model.adapter.d_mlp)
    return LayerActivations(layer=layer, tokens=tokens, acts=acts)
