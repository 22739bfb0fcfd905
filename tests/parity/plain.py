"""Outputs as plain data, and where two of them differ.

:func:`plain` turns any result lsa returns (tensors, DataFrames, dataclasses such as
``PatchResult`` or ``Flow``, route graphs, nested lists and dicts) into what
``torch.save`` / ``torch.load(weights_only=True)`` keep exactly: tensors, dicts with
string keys, lists, strings, numbers, booleans and ``None``. :func:`differences` walks
two such values side by side and names every leaf that moved, by its path
(``patched``, ``frame.normalized``, ``steps.effect``), so a refactor sees what changed.

Conventions: a DataFrame is ``{"__frame__": columns, "data": {column: values},
"index": labels | None, "attrs": ...}`` with numeric columns as tensors (their dtype
kept) and others as lists; a dataclass is its fields plus ``"__type__"``; a tuple or
set becomes a list (a set sorted); dict keys become ``str(key)``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import torch

EXTRAS = {  # public derived values kept beside a result's fields, by class name
    "PatchResult": ("frame", "array", "effect", "normalized"),
    "Faithfulness": ("faithfulness", "normalized", "frame"),
    "NeuronStats": ("prob", "mean", "std", "mean_abs"),
}


def _series(values: pd.Series):
    dtype = values.dtype
    if pd.api.types.is_object_dtype(dtype):
        return [plain(v) for v in values.tolist()]
    if pd.api.types.is_bool_dtype(dtype):
        return torch.from_numpy(values.to_numpy(dtype=bool).copy())
    if pd.api.types.is_integer_dtype(dtype):
        return torch.from_numpy(values.to_numpy(dtype=np.int64).copy())
    if pd.api.types.is_float_dtype(dtype):
        return torch.from_numpy(values.to_numpy().copy())
    return [plain(v) for v in values.tolist()]


def _frame(frame: pd.DataFrame) -> dict:
    index = frame.index
    default = isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1
    return {
        "__frame__": [str(c) for c in frame.columns],
        "data": {str(c): _series(frame.iloc[:, i]) for i, c in enumerate(frame.columns)},
        "index": None if default else [plain(v) for v in index.tolist()],
        "attrs": plain(dict(frame.attrs)),
    }


def _graph(graph) -> dict:
    nodes = sorted(graph.nodes)
    edges = sorted(graph.edges(data=True), key=lambda e: (e[0], e[1]))
    return {
        "__graph__": True,
        "nodes": plain(nodes),
        "edges": [[plain(u), plain(v), plain(data)] for u, v, data in edges],
        "graph": plain(dict(graph.graph)),
    }


def plain(obj):
    """``obj`` as plain data that ``torch.save`` round-trips exactly (see the module docstring)."""
    import networkx as nx

    if obj is None:
        return None
    for kind in (bool, str, int, float):  # exact builtin types (no str or int subclasses reach the file)
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone().contiguous()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, pd.DataFrame):
        return _frame(obj)
    if isinstance(obj, pd.Series):
        return {"__series__": str(obj.name), "values": _series(obj), "index": [plain(v) for v in obj.index.tolist()]}
    if isinstance(obj, nx.Graph):
        return _graph(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = type(obj).__name__
        if name == "Circuit":
            return {"__type__": name, **plain(obj.to_dict())}
        out = {"__type__": name}
        for f in dataclasses.fields(obj):
            out[f.name] = plain(getattr(obj, f.name))
        for extra in EXTRAS.get(name, ()):
            out[extra] = plain(getattr(obj, extra))
        return out
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return [plain(v) for v in sorted(obj)]
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    raise TypeError(f"no plain form for {type(obj).__name__}")


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= atol + rtol * abs(b)


def differences(got, want, *, rtol: float, atol: float, path: str = "") -> list[str]:
    """Every leaf where ``got`` differs from ``want`` (both :func:`plain`), as ``"path: what"`` lines.

    Floats (and float tensors) agree within ``atol + rtol * |want|`` (NaN equals NaN); everything
    else (integers, booleans, strings, dtypes, shapes, keys, lengths) must be equal.
    """
    where = path or "<root>"
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return [f"{where}: expected a tensor, got {type(got).__name__}"]
        if got.dtype != want.dtype or got.shape != want.shape:
            return [f"{where}: expected {want.dtype} {tuple(want.shape)}, got {got.dtype} {tuple(got.shape)}"]
        if want.is_floating_point() or want.is_complex():
            bad = ~torch.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
        else:
            bad = got != want
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            err = (got.double() - want.double()).abs()
            err = err[~torch.isnan(err)] if want.is_floating_point() else err
            worst = float(err.max()) if err.numel() else float("nan")
            return [
                f"{where}: {int(bad.sum())} of {want.numel()} elements differ (max |diff| {worst:.3g}); first at "
                f"{list(idx)}: got {got[idx].item()!r}, expected {want[idx].item()!r}"
            ]
        return []
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{where}: expected a dict, got {type(got).__name__}"]
        out = []
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing:
            out.append(f"{where}: missing keys {missing}")
        if extra:
            out.append(f"{where}: unexpected keys {extra}")
        for key in want:
            if key in got:
                sub = key if not path else f"{path}.{key}"
                if key in ("data",) and "__frame__" in want:
                    sub = path or "<frame>"
                out += differences(got[key], want[key], rtol=rtol, atol=atol, path=sub)
        return out
    if isinstance(want, list):
        if not isinstance(got, list):
            return [f"{where}: expected a list, got {type(got).__name__}"]
        if len(got) != len(want):
            return [f"{where}: expected {len(want)} items, got {len(got)}"]
        out = []
        for i, (g, w) in enumerate(zip(got, want)):
            out += differences(g, w, rtol=rtol, atol=atol, path=f"{path}[{i}]")
        return out
    if isinstance(want, bool) or want is None or isinstance(want, str):
        return [] if (type(got) is type(want) and got == want) else [f"{where}: got {got!r}, expected {want!r}"]
    if isinstance(want, int):
        return [] if (type(got) is int and got == want) else [f"{where}: got {got!r}, expected {want!r}"]
    if isinstance(want, float):
        if type(got) is not float or not _close(got, want, rtol, atol):
            return [f"{where}: got {got!r}, expected {want!r}"]
        return []
    return [f"{where}: cannot compare {type(want).__name__}"]
