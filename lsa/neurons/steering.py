"""Steering by neurons: set, scale or shift chosen FFN neurons during a forward or generation.

Public as :mod:`lsa.steering`; it lives in :mod:`lsa.neurons`, whose statistics and neuron sets it
builds on and whose study (:func:`lsa.neurons.language_report`) uses it.

An edit (:class:`NeuronEdit`) changes some neurons of the adapter's ``mlp_act``
modules (the values LAPE measures) at every position:

- ``deactivate(neurons, value=0.0)``: set them to a value;
- ``scale(neurons, factor)``: multiply them;
- ``activate(neurons, stats, language, mode="replace" | "add")``: replace them
  with, or add, the language's mean activation (Language Arithmetics,
  Gurgurov et al. 2025);
- ``shift(neurons, stats, source, target)``: add the difference of means
  ``mean[target] - mean[source]``.

:func:`steer` adds the edits to the model's active steering (``model.steering``)
for the duration of a ``with`` block and drops them on exit, also when the block raises::

    with steer(model, deactivate(lape.mask("en")), activate(lape.mask("zh"), stats, "zh")):
        text = generate(model, ["When Mary and John"])

The engine (:mod:`lsa.engine`) makes them part of every forward lsa runs, on both of
its executors: local hooks, or, for remote models (``model.remote``: NDIF, or
``"local"`` for nnsight's simulation), one nnsight trace per forward that also
reduces inside the trace (a loss total, the next token), so only small results
come back. In a trace of your own, :func:`lsa.engine.apply` applies them::

    with steer(model, deactivate(mask)), model.trace(tokens):
        lsa.engine.apply(model)
        logits = model.nn.output.logits.save()

Effects are measured as per-language loss (:func:`language_loss`) and as the
share of generated characters in a script (:func:`script_share`, CJK vs Latin on
each whole decoded continuation; :func:`steering_summary` says how many prompts
each mean rests on).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import pandas as pd
import torch

from lsa import engine
from lsa.engine import Edit, Plan
from lsa.neurons.collect import as_language_dict, token_batches
from lsa.neurons.sets import as_neuron_set
from lsa.neurons.stats import NeuronStats

__all__ = [
    "OPS",
    "SCRIPTS",
    "NeuronEdit",
    "activate",
    "deactivate",
    "forward",
    "generate",
    "generate_ids",
    "language_loss",
    "scale",
    "script_counts",
    "script_share",
    "shift",
    "steer",
    "steering_run",
    "steering_summary",
]

OPS = ("set", "scale", "add")


@dataclass(frozen=True)
class NeuronEdit:
    """Change ``neurons`` (``{layer: indices}``) by ``op`` with ``values``.

    ``values``: a number for all neurons, or ``{layer: tensor [n_indices]}`` (one value per neuron).
    ``op``: ``"set"`` (x <- v), ``"scale"`` (x <- x * v) or ``"add"`` (x <- x + v).
    """

    neurons: dict  # any form lsa.neurons.as_neuron_set reads; stored as {layer: LongTensor}
    op: str
    values: float | dict

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; one of {OPS}")
        object.__setattr__(self, "neurons", as_neuron_set(self.neurons))
        if isinstance(self.values, Mapping):
            for layer, idx in self.neurons.items():
                if layer not in self.values or torch.as_tensor(self.values[layer]).numel() not in (1, len(idx)):
                    raise ValueError(f"values for layer {layer} must hold one number per neuron ({len(idx)})")

    def layer_values(self, layer: int) -> float | torch.Tensor:
        if isinstance(self.values, Mapping):
            return torch.as_tensor(self.values[layer])
        return float(self.values)


def deactivate(neurons, value: float = 0.0) -> NeuronEdit:
    """Set the neurons to ``value`` (0 by default)."""
    return NeuronEdit(as_neuron_set(neurons), "set", float(value))


def scale(neurons, factor: float) -> NeuronEdit:
    """Multiply the neurons by ``factor``."""
    return NeuronEdit(as_neuron_set(neurons), "scale", float(factor))


def _per_layer(neurons: dict, table: torch.Tensor, strength: float) -> dict:
    return {layer: (table[layer, idx] * strength).float() for layer, idx in neurons.items()}


def activate(neurons, stats: NeuronStats, language: str, *, mode: str = "replace", strength: float = 1.0) -> NeuronEdit:
    """Replace the neurons with (``mode="replace"``) or add to them (``"add"``) ``strength`` x the language's mean."""
    if mode not in ("replace", "add"):
        raise ValueError(f"mode must be 'replace' or 'add', not {mode!r}")
    neurons = as_neuron_set(neurons, stats.n_layers, stats.d_mlp)
    mean = stats.mean[stats.lang_index(language)]
    return NeuronEdit(neurons, "set" if mode == "replace" else "add", _per_layer(neurons, mean, strength))


def shift(neurons, stats: NeuronStats, source: str, target: str, *, strength: float = 1.0) -> NeuronEdit:
    """Add ``strength * (mean[target] - mean[source])`` to the neurons (difference of means)."""
    neurons = as_neuron_set(neurons, stats.n_layers, stats.d_mlp)
    diff = stats.mean[stats.lang_index(target)] - stats.mean[stats.lang_index(source)]
    return NeuronEdit(neurons, "add", _per_layer(neurons, diff, strength))


def _apply(x: torch.Tensor, op: str, idx: torch.Tensor, v: float | torch.Tensor) -> torch.Tensor:
    """``x [..., d_mlp]`` with neurons ``idx`` set to / scaled by / shifted by ``v`` (``op``); torch only."""
    idx = idx.to(x.device)
    if torch.is_tensor(v):
        v = v.to(x.device, x.dtype)
    picked = x.index_select(-1, idx)
    if op == "set":
        new = torch.zeros_like(picked) + v
    elif op == "scale":
        new = picked * v
    else:
        new = picked + v
    return x.index_copy(-1, idx, new)


def _edited(x: torch.Tensor, steps: list[tuple]) -> torch.Tensor:
    for op, idx, v in steps:
        x = _apply(x, op, idx, v)
    return x


def _steps(model, edits) -> dict[int, list[tuple]]:
    """Per edited layer (ascending), its ``(op, indices, values)`` steps in edit order; checked against the model.

    Plain tensors and numbers, so a trace ships no lsa class to the server.
    """
    cfg = model.adapter
    steps: dict[int, list[tuple]] = {}
    for edit in edits:
        if not isinstance(edit, NeuronEdit):
            raise ValueError(f"steer takes NeuronEdit objects (deactivate/scale/activate/shift), not {type(edit)}")
        for layer, idx in as_neuron_set(edit.neurons, cfg.n_layers, cfg.d_mlp).items():
            steps.setdefault(layer, []).append((edit.op, idx, edit.layer_values(layer)))
    return dict(sorted(steps.items()))


@contextmanager
def steer(model, *edits: NeuronEdit):
    """Apply neuron edits (in order) to every forward lsa runs inside the ``with`` block.

    The edits join ``model.steering`` (:class:`lsa.engine.Edit` s at ``mlp_act``, outermost
    block first), which is part of every plan the engine runs, on local and remote
    models alike: every method (patching, ablation, lens, statistics, :func:`forward`,
    :func:`generate`) sees them. They are dropped on exit, even on error. A forward of
    your own (``model.hf(...)``, or a trace) is not steered until you say so: run it through
    :func:`lsa.engine.run`, or call :func:`lsa.engine.apply` first inside your trace.
    """
    steps = _steps(model, edits)
    depth = len(model.steering)
    model.steering.extend(
        Edit("mlp_act", layer, partial(_edited, steps=layer_steps)) for layer, layer_steps in steps.items()
    )
    try:
        yield model
    finally:
        del model.steering[depth:]


@torch.no_grad()
def forward(model, ids: torch.Tensor, mask: torch.Tensor | None = None, *, last_only: bool = False, reduce=None):
    """One forward of ``ids [batch, pos]`` under the edits of the enclosing :func:`steer` blocks.

    Returns the logits ``[batch, pos, d_vocab]`` (``[batch, 1, d_vocab]``, the last position's,
    with ``last_only``), or ``reduce(logits, ids, mask)`` when given, computed where the
    model runs (inside the trace for a remote model, so only its result comes back;
    ``reduce`` then runs on the server: it must use only torch and lsa).
    """
    mask = torch.ones_like(ids) if mask is None else mask
    plan = Plan(logits="last" if last_only else "all", attention_mask=mask, reduce=reduce)
    return engine.run(model, ids, plan).logits


def _loss_totals(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[summed next-token cross-entropy, predicted tokens]`` (float64) over non-padding pairs."""
    logits = logits.float()
    ids, mask = ids.to(logits.device), mask.to(logits.device)
    target = ids[:, 1:]
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    ).reshape(target.shape)
    return torch.stack([losses[valid].sum().double(), valid.sum().double()])


def _greedy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The most likely next token after the last position: ``[batch, 1]``."""
    return logits[:, -1].argmax(-1, keepdim=True)


# ----------------------------------------------------------------- measurements


@torch.no_grad()
def language_loss(
    model,
    texts: Mapping[str, Iterable],
    *,
    edits: Iterable[NeuronEdit] = (),
    batch_size: int = 16,
    max_length: int = 128,
    add_special_tokens: bool = True,
) -> pd.DataFrame:
    """Mean next-token cross-entropy per language over non-padding tokens (optionally under ``edits``).

    Returns one row per language: ``language``, ``loss``, ``n_tokens`` (predicted tokens).
    """
    rows = []
    with steer(model, *edits):
        for lang, source in as_language_dict(texts).items():
            total, count = 0.0, 0
            for ids, mask, _ in token_batches(
                model, source, batch_size=batch_size, max_length=max_length, add_special_tokens=add_special_tokens
            ):
                batch_total, batch_count = forward(model, ids, mask, reduce=_loss_totals).tolist()
                total += batch_total
                count += int(batch_count)
            rows.append({"language": lang, "loss": total / max(count, 1), "n_tokens": count})
    return pd.DataFrame(rows)


def generate(
    model,
    prompts: str | list[str],
    *,
    edits: Iterable[NeuronEdit] = (),
    max_new_tokens: int = 20,
    add_special_tokens: bool = True,
    stop_at_eos: bool = True,
) -> list[str]:
    """Greedy continuations of each prompt (decoded new tokens only), optionally under ``edits``."""
    ids = generate_ids(
        model,
        prompts,
        edits=edits,
        max_new_tokens=max_new_tokens,
        add_special_tokens=add_special_tokens,
        stop_at_eos=stop_at_eos,
    )
    return [_decode(model.tokenizer, new) for new in ids]


@torch.no_grad()
def generate_ids(
    model,
    prompts: str | list[str],
    *,
    edits: Iterable[NeuronEdit] = (),
    max_new_tokens: int = 20,
    add_special_tokens: bool = True,
    stop_at_eos: bool = True,
) -> list[list[int]]:
    """Greedy new token ids per prompt (a loop of full forwards: plain, and steered inside ``edits``).

    With ``stop_at_eos`` a prompt's generation ends before the tokenizer's end-of-text token.
    A remote model runs one trace per new token (only the token id comes back).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    stop = getattr(model.tokenizer, "eos_token_id", None) if stop_at_eos else None
    outs = []
    with steer(model, *edits):
        for prompt in prompts:
            ids = model.tokenizer(prompt, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
            ids = ids.to(model.device)
            new = []
            for _ in range(max_new_tokens):
                nxt = forward(model, ids, last_only=True, reduce=_greedy).to(ids.device)
                if stop is not None and int(nxt) == stop:
                    break
                new.append(int(nxt))
                ids = torch.cat([ids, nxt], dim=1)
            outs.append(new)
    return outs


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")
SCRIPTS = ("cjk", "latin")
REPLACEMENT = "\ufffd"  # what a tokenizer decodes a lone byte piece of a multi-byte character to


def script_counts(text: str | Iterable[str]) -> dict[str, int]:
    """Characters of ``text`` per script: ``{"cjk": n, "latin": n, "undecodable": n}``.

    ``text``: decoded text, or pieces of it (joined first). ``undecodable`` counts
    U+FFFD, what a byte piece of a multi-byte character decodes to on its own (SmolLM2
    and GPT-2 split Chinese characters into byte pieces): it counts for no script.
    Punctuation, digits and spaces count for no script either.

    >>> script_counts("小明 went。")
    {'cjk': 2, 'latin': 4, 'undecodable': 0}
    """
    text = text if isinstance(text, str) else "".join(text)
    return {
        "cjk": len(_CJK.findall(text)),
        "latin": len(_LATIN.findall(text)),
        "undecodable": text.count(REPLACEMENT),
    }


def _check_script(script: str) -> None:
    if script not in SCRIPTS:
        raise ValueError(f"script must be 'cjk' or 'latin', not {script!r}")


def script_share(text: str | Iterable[str], script: str) -> float:
    """Share of the characters in ``script`` (``"cjk"`` or ``"latin"``) among those in either; nan if none.

    ``text``: decoded text, or pieces of it (joined first, so a character split
    over two pieces of *text* still counts once). Decode whole sequences, not one
    token at a time: a lone byte piece of a Chinese character decodes to U+FFFD,
    which counts for neither script (see :func:`script_counts`).

    >>> script_share("小明 went", "cjk")   # 2 CJK of 6 characters in either script
    0.3333333333333333
    """
    _check_script(script)
    return _share(script_counts(text), script)


def _known(counts: dict[str, int]) -> int:
    """Characters in either script (the denominator of :func:`script_share`), from :func:`script_counts`."""
    return counts["cjk"] + counts["latin"]


def _share(counts: dict[str, int], script: str) -> float:
    known = _known(counts)
    return counts[script] / known if known else float("nan")


def steering_run(
    model,
    prompts: list[str],
    edits: Iterable[NeuronEdit],
    *,
    target_script: str,
    max_new_tokens: int = 20,
) -> pd.DataFrame:
    """Generate from each prompt with and without ``edits``; share of ``target_script`` characters in each.

    Each continuation is decoded whole (byte pieces of one character join up), then
    :func:`script_share` counts its characters. One row per prompt: ``prompt``,
    ``baseline``, ``steered``, ``share_before``, ``share_after``, and ``chars_before``,
    ``chars_after``: the characters in either script each share rests on (0: the share
    is NaN and the prompt is excluded from that figure; :func:`steering_summary`
    counts it so).
    """
    _check_script(target_script)
    edits = list(edits)
    base = generate_ids(model, prompts, max_new_tokens=max_new_tokens)
    steered = generate_ids(model, prompts, edits=edits, max_new_tokens=max_new_tokens)
    tok = model.tokenizer
    before = [_decode(tok, ids) for ids in base]
    after = [_decode(tok, ids) for ids in steered]
    counted_before, counted_after = [script_counts(t) for t in before], [script_counts(t) for t in after]
    return pd.DataFrame(
        {
            "prompt": prompts,
            "baseline": before,
            "steered": after,
            "share_before": [_share(c, target_script) for c in counted_before],
            "share_after": [_share(c, target_script) for c in counted_after],
            "chars_before": [_known(c) for c in counted_before],
            "chars_after": [_known(c) for c in counted_after],
        }
    )


def steering_summary(run: pd.DataFrame, by: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Mean shares of a :func:`steering_run` table and how many prompts each rests on.

    ``by``: columns to group on (e.g. ``["method", "strength"]`` for a
    :attr:`lsa.neurons.LanguageReport.steering` table); default: one row for all.
    Columns: ``share_before`` / ``share_after`` (mean over the prompts whose
    continuation has a character in either script), ``n_before`` / ``n_after``
    (those prompts), ``excluded_before`` / ``excluded_after`` (prompts with no such
    character: no share), ``n_prompts``.

    >>> steering_summary(report.steering, by=["method", "strength"])   # doctest: +SKIP
    """
    by = [by] if isinstance(by, str) else list(by or [])
    groups = run.groupby(by, sort=False) if by else [((), run)]
    rows = []
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        for when in ("before", "after"):
            counted = part[f"chars_{when}"] > 0
            row[f"share_{when}"] = float(part.loc[counted, f"share_{when}"].mean()) if counted.any() else float("nan")
            row[f"n_{when}"] = int(counted.sum())
            row[f"excluded_{when}"] = int((~counted).sum())
        row["n_prompts"] = len(part)
        rows.append(row)
    columns = [*by, "share_before", "n_before", "excluded_before", "share_after", "n_after", "excluded_after"]
    return pd.DataFrame(rows, columns=[*columns, "n_prompts"])
