"""Collection: texts to token batches, and the model's ``mlp_act`` activations read from them.

:func:`collect_stats` streams texts of each language through the model once
with plain torch hooks on the ``mlp_act`` modules and keeps, per language,
layer and neuron, the token count, the count of activations > 0 and the sums of
activations, absolute activations and squares
(:class:`~lsa.neurons.stats.NeuronStats`, ``[lang, layer, neuron]``). Memory
does not grow with the corpus; the stats can be saved every few batches and a
run resumed. On a remote model (``model.remote``: NDIF, or ``"local"`` for
nnsight's simulation) each batch is one nnsight trace that reduces inside the
trace (:func:`activation_totals`, the same code the hooks run), so only
``[layer, neuron]`` totals come back.

:func:`record_activations` keeps one layer's activations at every token of a
small sample (for a neuron's top tokens); :func:`from_weights` computes a
function of the weights, locally or inside one trace.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

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


def _forward(model, ids: torch.Tensor, mask: torch.Tensor):
    """Forward with logits only at the last position where the model allows it."""
    device = model.device
    kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    try:
        return model.hf(**kwargs, logits_to_keep=1)
    except TypeError:
        return model.hf(**kwargs)


def _trace_args(model, ids: torch.Tensor, mask: torch.Tensor, *, last_only: bool = True) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``model.trace``: the forward :func:`_forward` runs, for a remote model.

    Inputs go to ``model.device`` (the CPU for NDIF, whose server places them).
    ``last_only``: logits at the last position only, where the model's forward
    takes ``logits_to_keep``.
    """
    device = model.device
    kwargs = {"attention_mask": mask.to(device), "use_cache": False}
    if last_only and "logits_to_keep" in inspect.signature(model.hf.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return (ids.to(device),), kwargs


def from_weights(model, fn, *args) -> torch.Tensor:
    """``fn(adapter, root, *args)`` computed from the model's weights (a tensor).

    ``root`` is the torch model for a local model; for a remote one it is the
    nnsight model inside a one-token trace, so the weights are read where they
    are and only ``fn``'s result comes back.
    """
    cfg = model.adapter
    if not model.remote:
        return fn(cfg, model.hf, *args)
    one = torch.zeros(1, 1, dtype=torch.long)
    inputs, kwargs = _trace_args(model, one, torch.ones_like(one))
    root = model.nn  # the block names no lsa Model: it would ship the tokenizer with every trace
    with torch.no_grad(), model.trace(*inputs, **kwargs):
        out = fn(cfg, root, *args).cpu().save()
    return out


# ----------------------------------------------------------------- collection


def activation_totals(x: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """One batch's totals of neuron activations ``x [..., d_mlp]`` over the kept positions.

    ``keep``: a boolean mask over the flattened positions (``None``: all). Returns
    ``(count of x > 0, sum, sum of |x|, sum of x^2)``, each ``[d_mlp]`` (sums in
    float32). The hooks of :func:`collect_stats` call it on a local model, and its
    trace calls it inside the trace on a remote one.
    """
    x = x.detach()
    x = x.reshape(-1, x.shape[-1])
    if keep is not None:
        x = x[keep.to(x.device)]
    x = x.float()
    return (x > 0).sum(0), x.sum(0), x.abs().sum(0), (x * x).sum(0)


def _traced_totals(model, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """One traced forward reducing every layer's activations inside the trace: ``[4, layer, d_mlp]`` float64.

    Only these totals come back from a remote trace, never the activations.
    """
    inputs, kwargs = _trace_args(model, ids, mask)
    acts = [model.envoy("mlp_act", layer) for layer in range(model.adapter.n_layers)]
    with torch.no_grad(), model.trace(*inputs, **kwargs):
        layers = []
        for env in acts:
            layers.append(torch.stack([t.double() for t in activation_totals(env.output, keep)]))
        totals = torch.stack(layers, dim=1).cpu().save()
    return totals


class _Accumulator:
    """One batch's totals of every ``mlp_act`` module, in buffers (no per-token Python).

    Local models: forward hooks on the modules; remote models (``model.remote``):
    one nnsight trace per batch that reduces inside the trace (:func:`_traced_totals`).
    """

    def __init__(self, model):
        self.model = model
        self.remote = bool(model.remote)
        cfg = model.adapter
        device = torch.device("cpu") if self.remote else model.device
        self.n_layers, self.d_mlp = cfg.n_layers, cfg.d_mlp
        self.mask: torch.Tensor | None = None
        self.handles = []
        self.calls = [0] * self.n_layers
        shape = (self.n_layers, self.d_mlp)
        self.pos = torch.zeros(shape, dtype=torch.long, device=device)
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.abs = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sq = torch.zeros(shape, dtype=torch.float64, device=device)

    def __enter__(self):
        if not self.remote:
            for layer in range(self.n_layers):
                module = self.model.module("mlp_act", layer)
                self.handles.append(module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            pos, total, abs_total, sq = activation_totals(output, self.mask)
            self.pos[layer] += pos
            self.sum[layer] += total
            self.abs[layer] += abs_total
            self.sq[layer] += sq
            self.calls[layer] += 1

        return hook

    def reset(self):
        for t in (self.pos, self.sum, self.abs, self.sq):
            t.zero_()
        self.calls = [0] * self.n_layers

    def run(self, ids: torch.Tensor, mask: torch.Tensor) -> int:
        if self.remote:
            flat = mask.reshape(-1).bool()
            totals = _traced_totals(self.model, ids, mask, None if bool(flat.all()) else flat)
            self.pos, self.sum, self.abs, self.sq = totals[0].long(), totals[1], totals[2], totals[3]
            return int(flat.sum())
        flat = mask.reshape(-1).bool().to(self.model.device)
        self.mask = None if bool(flat.all()) else flat
        self.reset()
        _forward(self.model, ids, mask)
        if self.calls != [1] * self.n_layers:
            raise RuntimeError(
                f"mlp_act hooks fired {self.calls} times per layer in one forward; expected once each "
                "(the adapter's mlp_act module must be called exactly once per block)"
            )
        return int(flat.sum())


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
    with _Accumulator(model) as acc:
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
                n_tok = acc.run(ids, mask)
                stats.update(lang, n_tok, acc.pos, acc.sum, acc.abs, acc.sq, n_items)
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


def _traced_rows(model, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One layer's activations at the non-padding tokens, read and saved inside one trace (remote models)."""
    inputs, kwargs = _trace_args(model, ids, mask)
    env, keep = model.envoy("mlp_act", layer), mask.bool()
    with torch.no_grad(), model.trace(*inputs, **kwargs):
        rows = _kept_rows(env.output, keep).save()
    return rows


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

    A remote model runs one trace per batch that saves the layer's activations at
    the non-padding tokens.
    """
    check_neuron(model, layer, 0)
    rows, chunks, text_id = [], [], 0
    store = {}
    handle = None
    if not model.remote:
        keep_rows = lambda m, i, o: store.__setitem__("x", _kept_rows(o, store["keep"]))
        handle = model.module("mlp_act", layer).register_forward_hook(keep_rows)
    try:
        for lang, source in as_language_dict(texts).items():
            sample = itertools.islice(iter(source), max_texts)
            for ids, mask, _ in token_batches(model, sample, batch_size=batch_size, max_length=max_length):
                keep = mask.bool()
                if model.remote:
                    chunks.append(_traced_rows(model, layer, ids, mask))
                else:
                    store["keep"] = keep
                    _forward(model, ids, mask)
                    chunks.append(store["x"])
                for b in range(ids.shape[0]):
                    for pos in range(int(keep[b].sum())):
                        tid = int(ids[b, pos])
                        rows.append((lang, text_id, pos, tid))
                    text_id += 1
    finally:
        if handle is not None:
            handle.remove()
    tok = model.tokenizer
    tokens = pd.DataFrame(rows, columns=["language", "text", "pos", "token_id"])
    tokens["token"] = [tok.decode([t]) if tok is not None else str(t) for t in tokens["token_id"]]
    acts = torch.cat(chunks) if chunks else torch.zeros(0, model.adapter.d_mlp)
    return LayerActivations(layer=layer, tokens=tokens, acts=acts)
