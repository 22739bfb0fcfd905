"""Neuron sets: one neuron's address, sets of neurons and their algebra, and the LAPE mask-file format.

A neuron set is ``{layer: LongTensor of indices}`` (:func:`as_neuron_set` reads
the other forms). Masks are ``masks[language][layer] -> LongTensor`` of neuron
indices, saved and loaded with ``torch.save`` in the published mask-file format
(:func:`save_masks`, :func:`load_masks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch

from lsa.neurons.stats import NeuronStats

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
