"""Language-specific FFN neurons: activation statistics, LAPE, PLND importance, masks.

A *neuron* is one unit of a block's MLP activation module (the adapter's
``mlp_act``): ``act(c_fc(x))`` in GPT-2 / GPT-NeoX / BLOOM, the gate
activation ``act_fn(gate_proj(x))`` in SwiGLU models (Qwen2, Llama, Mistral),
as in Tang et al. 2024 (LAPE) who hook the same value.

Steps, each one call:

1. :func:`collect_stats` streams texts of each language through the model once
   with plain torch hooks on the ``mlp_act`` modules and keeps, per language,
   layer and neuron, the token count, the count of activations > 0 and the sums
   of activations, absolute activations and squares (:class:`NeuronStats`,
   ``[lang, layer, neuron]``). Memory does not grow with the corpus; the stats
   can be saved every few batches and a run resumed. On a remote model
   (``model.remote``: NDIF, or ``"local"`` for nnsight's simulation) each batch is
   one nnsight trace that reduces inside the trace (:func:`activation_totals`, the
   same code the hooks run), so only ``[layer, neuron]`` totals come back.
2. :func:`lape` picks language-specific neurons from the activation
   probabilities exactly as the published ``identify.py`` does (filter at the
   95th percentile, lowest-entropy 1 %, assignment at the 95th percentile);
   :func:`plnd_importance` gives a second, PLND-style score.
3. Masks are ``masks[language][layer] -> LongTensor`` of neuron indices, saved
   and loaded with ``torch.save`` in the published mask-file format
   (:func:`save_masks`, :func:`load_masks`).

Steering (set / scale / add on any neuron set during a forward or generation)
is in :mod:`lsa.steering`; :func:`language_report` runs the whole study.

Cost: one forward pass per batch plus four reductions over the MLP activations
(a few percent of the forward; see ``benchmarks/neurons.py``).
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

# ----------------------------------------------------------------- neuron sets

NeuronSet = Mapping[int, torch.Tensor] | list | tuple


def as_neuron_set(neurons, n_layers: int | None = None, d_mlp: int | None = None) -> dict[int, torch.Tensor]:
    """Normalise a neuron set to ``{layer: LongTensor of indices}`` (empty layers dropped).

    Accepts one language's mask (a list over layers of index tensors, the LAPE
    format), a dict ``{layer: indices}``, a DataFrame with ``layer`` and
    ``neuron`` columns, or a list of ``(layer, neuron)`` tuples (a list of
    lists is read as one index list per layer). With
    ``n_layers`` / ``d_mlp`` given, out-of-range entries raise ``IndexError``.
    """
    out: dict[int, list[int]] = {}
    if isinstance(neurons, pd.DataFrame):
        if not {"layer", "neuron"} <= set(neurons.columns):
            raise ValueError("a neuron DataFrame needs 'layer' and 'neuron' columns")
        for layer, neuron in zip(neurons["layer"], neurons["neuron"]):
            out.setdefault(int(layer), []).append(int(neuron))
    elif isinstance(neurons, Mapping):
        for layer, idx in neurons.items():
            out[int(layer)] = [int(i) for i in torch.as_tensor(idx).reshape(-1).tolist()]
    elif isinstance(neurons, (list, tuple)):
        if neurons and all(isinstance(p, tuple) and len(p) == 2 for p in neurons):
            for layer, neuron in neurons:
                out.setdefault(int(layer), []).append(int(neuron))
        else:
            for layer, idx in enumerate(neurons):
                out[layer] = [int(i) for i in torch.as_tensor(idx).reshape(-1).tolist()]
    else:
        raise ValueError(f"cannot read a neuron set from {type(neurons).__name__}")
    result = {}
    for layer, idx in sorted(out.items()):
        if not idx:
            continue
        if n_layers is not None and not 0 <= layer < n_layers:
            raise IndexError(f"layer {layer} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        t = torch.tensor(sorted(set(idx)), dtype=torch.long)
        if d_mlp is not None and (t.min() < 0 or t.max() >= d_mlp):
            raise IndexError(f"neuron index out of range in layer {layer}: each MLP has {d_mlp} neurons")
        result[layer] = t
    return result


def neuron_count(neurons) -> int:
    """Number of neurons in a set (any form :func:`as_neuron_set` reads)."""
    return sum(len(v) for v in as_neuron_set(neurons).values())


# ----------------------------------------------------------------- statistics


@dataclass
class NeuronStats:
    """Per-language activation statistics of every FFN neuron.

    Shapes: ``n_tokens [lang]``, every other tensor ``[lang, layer, neuron]``.
    ``n_items[lang]`` counts the texts (or sequences) consumed, so a stream can
    be resumed. Sums are float64; counts int64.

    >>> stats = collect_stats(model, {"en": en_texts, "zh": zh_texts})   # doctest: +SKIP
    >>> stats.prob.shape                                                  # doctest: +SKIP
    torch.Size([2, 12, 3072])
    """

    languages: list[str]
    n_tokens: torch.Tensor
    n_positive: torch.Tensor
    act_sum: torch.Tensor
    abs_sum: torch.Tensor
    sq_sum: torch.Tensor
    n_items: torch.Tensor
    meta: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, languages: Iterable[str], n_layers: int, d_mlp: int, meta: dict | None = None) -> NeuronStats:
        languages = list(languages)
        n = len(languages)
        if len(set(languages)) != n:
            raise ValueError(f"duplicate language names in {languages}")
        zeros = lambda dtype: torch.zeros(n, n_layers, d_mlp, dtype=dtype)
        return cls(
            languages=languages,
            n_tokens=torch.zeros(n, dtype=torch.long),
            n_positive=zeros(torch.long),
            act_sum=zeros(torch.float64),
            abs_sum=zeros(torch.float64),
            sq_sum=zeros(torch.float64),
            n_items=torch.zeros(n, dtype=torch.long),
            meta=dict(meta or {}),
        )

    # ------------------------------------------------------------ shape
    @property
    def n_layers(self) -> int:
        return self.n_positive.shape[1]

    @property
    def d_mlp(self) -> int:
        return self.n_positive.shape[2]

    def lang_index(self, language: str) -> int:
        if language not in self.languages:
            raise ValueError(f"unknown language {language!r}; these stats have {self.languages}")
        return self.languages.index(language)

    def add_language(self, language: str) -> int:
        """Append an empty language (for streaming a new one into existing stats)."""
        if language in self.languages:
            return self.lang_index(language)
        self.languages.append(language)
        pad = lambda t: torch.cat([t, torch.zeros((1, *t.shape[1:]), dtype=t.dtype)])
        for name in ("n_tokens", "n_positive", "act_sum", "abs_sum", "sq_sum", "n_items"):
            setattr(self, name, pad(getattr(self, name)))
        return len(self.languages) - 1

    # ------------------------------------------------------------ derived
    def _per_token(self, total: torch.Tensor) -> torch.Tensor:
        n = self.n_tokens.to(torch.float64).clamp(min=1).reshape(-1, 1, 1)
        return total.to(torch.float64) / n

    @property
    def prob(self) -> torch.Tensor:
        """P(activation > 0) per language: ``[lang, layer, neuron]``."""
        return self._per_token(self.n_positive)

    @property
    def mean(self) -> torch.Tensor:
        """Mean activation per language: ``[lang, layer, neuron]``."""
        return self._per_token(self.act_sum)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self._per_token(self.abs_sum)

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation of the activation per language."""
        var = self._per_token(self.sq_sum) - self.mean**2
        return var.clamp(min=0).sqrt()

    # ------------------------------------------------------------ update / merge
    def update(
        self,
        language: str,
        n_tokens: int,
        n_positive: torch.Tensor,
        act_sum: torch.Tensor,
        abs_sum: torch.Tensor,
        sq_sum: torch.Tensor,
        n_items: int = 0,
    ) -> None:
        """Add one batch's totals ``[layer, neuron]`` for a language (created if new)."""
        i = self.add_language(language)
        self.n_tokens[i] += int(n_tokens)
        self.n_items[i] += int(n_items)
        self.n_positive[i] += n_positive.to("cpu", torch.long)
        self.act_sum[i] += act_sum.to("cpu", torch.float64)
        self.abs_sum[i] += abs_sum.to("cpu", torch.float64)
        self.sq_sum[i] += sq_sum.to("cpu", torch.float64)

    def merge(self, other: NeuronStats) -> NeuronStats:
        """A new :class:`NeuronStats` with both runs' totals (languages united, in order of appearance)."""
        if (self.n_layers, self.d_mlp) != (other.n_layers, other.d_mlp):
            raise ValueError(
                f"cannot merge stats of shape {(self.n_layers, self.d_mlp)} and {(other.n_layers, other.d_mlp)}"
            )
        out = NeuronStats.empty([], self.n_layers, self.d_mlp, meta={**other.meta, **self.meta})
        for src in (self, other):
            for j, lang in enumerate(src.languages):
                out.update(
                    lang,
                    int(src.n_tokens[j]),
                    src.n_positive[j],
                    src.act_sum[j],
                    src.abs_sum[j],
                    src.sq_sum[j],
                    int(src.n_items[j]),
                )
        return out

    def select(self, languages: Iterable[str]) -> NeuronStats:
        """The stats of some languages only, in the given order."""
        idx = [self.lang_index(lang) for lang in languages]
        pick = lambda t: t[idx].clone()
        return NeuronStats(
            languages=list(languages),
            n_tokens=pick(self.n_tokens),
            n_positive=pick(self.n_positive),
            act_sum=pick(self.act_sum),
            abs_sum=pick(self.abs_sum),
            sq_sum=pick(self.sq_sum),
            n_items=pick(self.n_items),
            meta=dict(self.meta),
        )

    # ------------------------------------------------------------ io
    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (``torch.save`` of a dict; written atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(
            {
                "format": "lsa.NeuronStats/1",
                "languages": list(self.languages),
                "n_tokens": self.n_tokens,
                "n_positive": self.n_positive,
                "act_sum": self.act_sum,
                "abs_sum": self.abs_sum,
                "sq_sum": self.sq_sum,
                "n_items": self.n_items,
                "meta": dict(self.meta),
            },
            tmp,
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> NeuronStats:
        data = torch.load(Path(path), weights_only=True)
        if not isinstance(data, dict) or data.get("format") != "lsa.NeuronStats/1":
            raise ValueError(f"{path} is not a saved NeuronStats file")
        return cls(**{k: v for k, v in data.items() if k != "format"})

    @classmethod
    def from_lape_files(cls, files: Mapping[str, str | Path]) -> NeuronStats:
        """Read the published LAPE ``activation.<lang>.*`` files (dicts with ``n``, ``over_zero``, ``sum1``, ``sum2``).

        Those files keep no absolute sums; ``abs_sum`` is left at zero.
        """
        stats = None
        for lang, path in files.items():
            data = torch.load(Path(path), weights_only=True)
            over_zero = data["over_zero"]
            if stats is None:
                stats = cls.empty([], over_zero.shape[0], over_zero.shape[1])
            zero = torch.zeros_like(over_zero, dtype=torch.float64)
            stats.update(
                lang,
                int(data["n"]),
                over_zero,
                data.get("sum1", zero),
                zero,
                data.get("sum2", zero),
            )
        if stats is None:
            raise ValueError("no files given")
        return stats

    def to_frame(self) -> pd.DataFrame:
        """One row per (language, layer, neuron): ``prob``, ``mean``, ``std``, ``mean_abs``."""
        n_lang, n_layers, d_mlp = self.n_positive.shape
        grid = torch.cartesian_prod(torch.arange(n_lang), torch.arange(n_layers), torch.arange(d_mlp))
        return pd.DataFrame(
            {
                "language": [self.languages[i] for i in grid[:, 0].tolist()],
                "layer": grid[:, 1].numpy(),
                "neuron": grid[:, 2].numpy(),
                "prob": self.prob.reshape(-1).numpy(),
                "mean": self.mean.reshape(-1).numpy(),
                "std": self.std.reshape(-1).numpy(),
                "mean_abs": self.mean_abs.reshape(-1).numpy(),
            }
        )

    def __repr__(self) -> str:
        tokens = ", ".join(f"{lang}: {int(n)}" for lang, n in zip(self.languages, self.n_tokens))
        return f"NeuronStats({self.n_layers} layers x {self.d_mlp} neurons; tokens {{{tokens}}})"


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


def _from_weights(model, fn, *args) -> torch.Tensor:
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


def _as_language_dict(texts) -> dict[str, Iterable]:
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
    texts = _as_language_dict(texts)
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
    A remote model reads the norms inside one trace (:func:`_from_weights`).
    """
    norms = _from_weights(model, _out_norms).to(torch.float64)  # [layer, neuron]
    return stats.mean_abs * norms[None]


def _out_norms(cfg, root) -> torch.Tensor:
    """``||W_out[neuron]||`` of every layer: ``[layer, neuron]`` float32 (``root``: see :func:`_from_weights`)."""
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


# ----------------------------------------------------------------- mask files


def save_masks(masks: list[list[torch.Tensor]], path: str | Path) -> Path:
    """``torch.save`` a list over languages of lists over layers of LongTensors (the LAPE mask-file format)."""
    check_masks(masks)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save([[torch.as_tensor(idx, dtype=torch.long) for idx in lang] for lang in masks], path)
    return path


def load_masks(path: str | Path, languages: list[str] | None = None) -> list[list[torch.Tensor]] | dict:
    """Read a LAPE mask file; with ``languages`` (in the file's order) return ``{language: mask}``."""
    masks = torch.load(Path(path), weights_only=True)
    check_masks(masks)
    masks = [[idx.long() for idx in lang] for lang in masks]
    if languages is None:
        return masks
    if len(languages) != len(masks):
        raise ValueError(f"{len(languages)} language names for a mask file with {len(masks)} languages")
    return dict(zip(languages, masks))


def check_masks(masks, n_layers: int | None = None, d_mlp: int | None = None) -> None:
    """Raise ``ValueError`` unless ``masks`` is a list over languages of lists over layers of 1-D index tensors."""
    if not isinstance(masks, (list, tuple)) or not all(isinstance(m, (list, tuple)) for m in masks):
        raise ValueError("masks must be a list over languages of lists over layers of index tensors")
    for m in masks:
        if n_layers is not None and len(m) != n_layers:
            raise ValueError(f"a language mask has {len(m)} layers; the model has {n_layers}")
        for idx in m:
            t = torch.as_tensor(idx)
            if t.dim() != 1 or (t.numel() and t.is_floating_point()):
                raise ValueError("each layer's entry must be a 1-D integer tensor of neuron indices")
            if d_mlp is not None and t.numel() and (t.min() < 0 or t.max() >= d_mlp):
                raise IndexError(f"neuron index out of range: each MLP has {d_mlp} neurons")


def random_like(neurons, d_mlp: int, *, exclude=None, seed: int = 0) -> dict[int, torch.Tensor]:
    """Random neurons with the same count per layer as ``neurons``, avoiding ``exclude`` (a control set)."""
    neurons = as_neuron_set(neurons)
    exclude = as_neuron_set(exclude) if exclude is not None else {}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer, idx in neurons.items():
        allowed = torch.ones(d_mlp, dtype=torch.bool)
        if layer in exclude:
            allowed[exclude[layer]] = False
        pool = allowed.nonzero().reshape(-1)
        if len(pool) < len(idx):
            raise ValueError(f"layer {layer}: cannot draw {len(idx)} random neurons from {len(pool)} allowed")
        out[layer] = pool[torch.randperm(len(pool), generator=g)[: len(idx)]].sort().values
    return out


def union(*neuron_sets) -> dict[int, torch.Tensor]:
    """The union of neuron sets (any form :func:`as_neuron_set` reads)."""
    out: dict[int, set] = {}
    for s in neuron_sets:
        for layer, idx in as_neuron_set(s).items():
            out.setdefault(layer, set()).update(idx.tolist())
    return {layer: torch.tensor(sorted(v), dtype=torch.long) for layer, v in sorted(out.items())}


# ----------------------------------------------------------------- figures


def plot_neurons_per_layer(result: LapeResult, ax=None):
    """Bar chart: language-specific neurons per layer, one bar per language."""
    import matplotlib.pyplot as plt

    counts = result.counts().pivot(index="layer", columns="language", values="n_neurons")[result.languages]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4, 0.5 * len(counts) + 2), 3))
    counts.plot.bar(ax=ax, width=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("language-specific neurons")
    ax.set_title("LAPE neurons per layer")
    return ax


def plot_overlap(result: LapeResult, ax=None):
    """Heatmap of neurons shared by each pair of languages (diagonal = set size)."""
    import matplotlib.pyplot as plt

    table = result.overlap()
    if ax is None:
        _, ax = plt.subplots(figsize=(1 + 0.8 * len(table), 0.8 + 0.7 * len(table)))
    im = ax.imshow(table.values, cmap="Blues")
    ax.set_xticks(range(len(table)), table.columns)
    ax.set_yticks(range(len(table)), table.index)
    for i in range(len(table)):
        for j in range(len(table)):
            ax.text(j, i, str(table.values[i, j]), ha="center", va="center")
    ax.figure.colorbar(im, ax=ax)
    ax.set_title("shared language-specific neurons")
    return ax


# ----------------------------------------------------------------- inspecting one neuron


def check_neuron(stats_or_model, layer: int, neuron: int) -> None:
    """Raise ``IndexError`` naming the valid range unless ``(layer, neuron)`` exists."""
    if isinstance(stats_or_model, NeuronStats):
        n_layers, d_mlp = stats_or_model.n_layers, stats_or_model.d_mlp
    else:
        n_layers, d_mlp = stats_or_model.adapter.n_layers, stats_or_model.adapter.d_mlp
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer!r} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    if not isinstance(neuron, int) or isinstance(neuron, bool) or not 0 <= neuron < d_mlp:
        raise IndexError(f"neuron {neuron!r} out of range: each MLP has {d_mlp} neurons (0..{d_mlp - 1})")


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
        for lang, source in _as_language_dict(texts).items():
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
    logits = _from_weights(model, _direction_logits, layer, neuron, centre)  # [d_vocab]
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


# ----------------------------------------------------------------- texts

CORPUS_DIR = Path(__file__).resolve().parent.parent / "data" / "corpora"


def load_corpus(language: str, root: str | Path | None = None) -> list[str]:
    """The shipped sample sentences of a language (``data/corpora/<language>.txt``, one per line)."""
    path = Path(root or CORPUS_DIR) / f"{language}.txt"
    if not path.exists():
        have = sorted(p.stem for p in path.parent.glob("*.txt"))
        raise FileNotFoundError(f"no corpus for {language!r} at {path}; available: {have}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def zoo_texts(languages=("en", "zh"), n: int = 2000, seed: int = 1234) -> dict[str, list[str]]:
    """Documents of the toy zoo's world per language (``lsa.zoo`` generator, a seed unlike training's)."""
    from lsa.zoo.corpus import World, generate

    return {lang: generate(World.load(lang), n=n, seed=seed) for lang in languages}


# ----------------------------------------------------------------- the whole study


@dataclass
class LanguageReport:
    """What :func:`language_report` found.

    Attributes:
        stats: activation statistics on the training texts.
        lape: the language-specific neurons by activation-probability entropy.
        plnd: the language-specific neurons by PLND-style importance (None if not asked for).
        counts: neurons per (method, language, layer).
        base_loss: per-language loss of the unchanged model on the held-out texts.
        deactivation: one row per (method, deactivated language set, evaluated language):
            ``n_neurons``, ``loss``, ``delta`` (minus the unchanged loss), ``random_delta``
            (the same count per layer of random neurons outside every set, mean over seeds).
        steering: one row per (method, strength, prompt): ``baseline``, ``steered``,
            ``share_before``, ``share_after``, ``chars_before``, ``chars_after`` (see
            :func:`lsa.steering.steering_run`; :func:`lsa.steering.steering_summary` gives
            the means with the number of prompts each rests on).
    """

    stats: NeuronStats
    lape: LapeResult
    plnd: LapeResult | None
    counts: pd.DataFrame
    base_loss: pd.DataFrame
    deactivation: pd.DataFrame
    steering: pd.DataFrame
    params: dict

    def summary(self) -> str:
        p = self.params
        lines = [f"held-out loss, unchanged model: {dict(zip(self.base_loss.language, self.base_loss.loss.round(3)))}"]
        for method, counts in self.counts.groupby("method", sort=False):
            lines.append(f"\n[{method}] language-specific neurons per layer:")
            lines.append(counts.pivot(index="language", columns="layer", values="n_neurons").to_string())
        lines.append("\nloss change when a language's neurons are set to 0 (random: same count per layer):")
        cols = ["method", "deactivated", "evaluated", "n_neurons", "loss", "delta", "random_delta"]
        lines.append(self.deactivation[cols].to_string(index=False, float_format="%.3f"))
        if len(self.steering):
            lines.append(
                f"\nsteering {p['steer_from']} -> {p['steer_to']} ({p['steer_from']} neurons set to 0, "
                f"{p['steer_to']} neurons set to strength x their {p['steer_to']} mean): "
                f"share of {p['target_script']} characters in greedy continuations"
            )
            from lsa.steering import steering_summary

            for row in steering_summary(self.steering, by=["method", "strength"]).itertuples():
                lines.append(
                    f"  [{row.method}] strength {row.strength:g}: {row.share_before:.2f} "
                    f"({row.n_before} of {row.n_prompts} prompts) -> {row.share_after:.2f} "
                    f"({row.n_after} of {row.n_prompts}; a prompt whose continuation has no CJK or Latin "
                    "character is excluded)"
                )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def _split(texts: list, share: float) -> tuple[list, list]:
    n_held = max(1, round(len(texts) * share))
    return texts[:-n_held], texts[-n_held:]


def language_report(
    model,
    texts: Mapping[str, Iterable[str]],
    *,
    heldout: Mapping[str, Iterable[str]] | None = None,
    heldout_share: float = 0.2,
    stats: NeuronStats | None = None,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
    activation_bar_ratio: float = 0.95,
    plnd_top_rate: float | None = 0.01,
    n_random: int = 3,
    steer_from: str = "en",
    steer_to: str = "zh",
    scripts: Mapping[str, str] | None = None,
    strength: float | tuple[float, ...] = (1.0, 4.0, 16.0),
    prompts: list[str] | None = None,
    n_prompts: int = 8,
    prompt_tokens: int = 4,
    max_new_tokens: int = 20,
    batch_size: int = 16,
    max_length: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> LanguageReport:
    """Language-specific neurons end to end: statistics, LAPE (and PLND) sets, deactivation, steering.

    1) collect :class:`NeuronStats` on ``texts`` (minus the last ``heldout_share`` of
       each language unless ``heldout`` is given; skipped when ``stats`` are passed);
    2) :func:`lape` with the given thresholds, and (unless ``plnd_top_rate`` is None)
       :func:`plnd_neurons` on :func:`plnd_importance`;
    3) per-language loss on the held-out texts with each language's set set to 0,
       against the same number of random neurons per layer (``n_random`` draws);
    4) from the first ``prompt_tokens`` tokens of held-out ``steer_from`` texts (or
       from ``prompts``), greedy generation with the ``steer_from`` set at 0 and the
       ``steer_to`` set at ``strength`` x its ``steer_to`` mean (each strength given);
       the share of tokens in ``steer_to``'s script (``scripts``; default en: latin,
       zh: cjk) before and after.

    >>> report = language_report(model, {"en": en_texts, "zh": zh_texts})   # doctest: +SKIP
    >>> print(report.summary())                                             # doctest: +SKIP
    """
    from lsa import steering

    scripts = dict(scripts or {"en": "latin", "zh": "cjk"})
    texts = {lang: list(src) for lang, src in _as_language_dict(texts).items()}
    if heldout is None:
        pairs = {lang: _split(src, heldout_share) for lang, src in texts.items()}
        train = {lang: p[0] for lang, p in pairs.items()}
        held = {lang: p[1] for lang, p in pairs.items()}
    else:
        train, held = texts, {lang: list(src) for lang, src in heldout.items()}
    if stats is None:
        stats = collect_stats(model, train, batch_size=batch_size, max_length=max_length, progress=progress)
    sets = {"lape": lape(stats, top_rate=top_rate, filter_rate=filter_rate, activation_bar_ratio=activation_bar_ratio)}
    if plnd_top_rate is not None:
        sets["plnd"] = plnd_neurons(plnd_importance(model, stats), stats.languages, top_rate=plnd_top_rate)
    loss = lambda edits=(): steering.language_loss(
        model, held, edits=edits, batch_size=batch_size, max_length=max_length
    ).set_index("language")["loss"]
    base = loss()
    rows = []
    for method, result in sets.items():
        everything = union(*result.masks)
        for lang, mask in zip(result.languages, result.masks):
            n = neuron_count(mask)
            hit = loss([steering.deactivate(mask)]) if n else base
            randoms = [
                loss([steering.deactivate(random_like(mask, model.adapter.d_mlp, exclude=everything, seed=seed + s))])
                for s in range(n_random if n else 0)
            ]
            rand = sum(randoms) / len(randoms) if randoms else base
            for evaluated in held:
                rows.append(
                    {
                        "method": method,
                        "deactivated": lang,
                        "evaluated": evaluated,
                        "n_neurons": n,
                        "loss": float(hit[evaluated]),
                        "delta": float(hit[evaluated] - base[evaluated]),
                        "random_loss": float(rand[evaluated]),
                        "random_delta": float(rand[evaluated] - base[evaluated]),
                    }
                )
    columns = [
        "method",
        "strength",
        "prompt",
        "baseline",
        "steered",
        "share_before",
        "share_after",
        "chars_before",
        "chars_after",
    ]
    runs = []
    if steer_from in stats.languages and steer_to in stats.languages and steer_from in held:
        tok = model.tokenizer
        if prompts is None:
            prompts = []
            for text in held[steer_from][:n_prompts]:
                ids = tok(text, add_special_tokens=False)["input_ids"][:prompt_tokens]
                prompts.append(tok.decode(ids))
        prompts = list(prompts)
        strengths = [strength] if isinstance(strength, (int, float)) else list(strength)
        for method, result in sets.items():
            for st in strengths:
                edits = [
                    steering.deactivate(result.mask(steer_from)),
                    steering.activate(result.mask(steer_to), stats, steer_to, strength=st),
                ]
                run = steering.steering_run(
                    model, prompts, edits, target_script=scripts[steer_to], max_new_tokens=max_new_tokens
                )
                runs.append(run.assign(method=method, strength=float(st)))
    steer_table = pd.concat(runs, ignore_index=True)[columns] if runs else pd.DataFrame(columns=columns)
    counts = pd.concat([r.counts().assign(method=m) for m, r in sets.items()], ignore_index=True)
    return LanguageReport(
        stats=stats,
        lape=sets["lape"],
        plnd=sets.get("plnd"),
        counts=counts[["method", "language", "layer", "n_neurons"]],
        base_loss=base.rename("loss").reset_index(),
        deactivation=pd.DataFrame(rows),
        steering=steer_table,
        params=dict(
            top_rate=top_rate,
            filter_rate=filter_rate,
            activation_bar_ratio=activation_bar_ratio,
            plnd_top_rate=plnd_top_rate,
            n_random=n_random,
            steer_from=steer_from,
            steer_to=steer_to,
            target_script=scripts.get(steer_to),
            strength=strength,
            seed=seed,
        ),
    )
