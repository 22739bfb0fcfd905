"""Activation patching and path patching: which components carry a task's behaviour.

Activation patching (Meng et al. 2022; Heimersheim & Nanda 2024) reruns the
model with one component's activation overwritten by its value from another
run and reads the change in a metric. Path patching (Wang et al. 2022) restricts
that change to one path: a sender head's effect on receivers (the logits, or
the query / key / value input of later heads) with every other head frozen.

Sites (``site=``), each per layer:

- ``resid_pre`` (block input), ``resid_mid`` (block input + attention write;
  undefined for parallel-residual models), ``resid_post`` (block output):
  ``[batch, pos, d_model]``;
- ``attn_out`` / ``mlp_out``: the attention / MLP *write*, what the sublayer
  adds to the residual stream (the output projection's output; with sandwich
  norms, as in Gemma 3, the output of the norm after it): ``[batch, pos, d_model]``;
- ``head``: one head's output, its slice of the attention output projection's
  *input* viewed ``[batch, pos, n_heads, d_head]``;
- ``neuron``: one MLP neuron, the MLP output projection's input ``[batch, pos, d_mlp]``.

Directions: ``"noising"`` runs the clean prompts and patches in activations of
the counterfactual run (the IOI paper's convention); ``"denoising"`` runs the
counterfactual prompts and patches in the clean run's activations. Either way
``normalized = (patched - clean) / (clean - corrupt)`` on the mean metric: 0 =
clean behaviour, -1 = counterfactual behaviour.

Cost: a sweep runs the two unpatched forwards once, then for each patched layer
``L`` one forward of the batch expanded by the number of interventions (chunked
to ``max_tokens``) that *starts at block L* from the cached residual stream
(blocks before ``L`` are skipped, their output taken from the cache; masks,
rotary and alibi terms are still built by the model itself; for sites after the
attention, layer ``L``'s queries, keys and values come from the cache too), and
computes logits only at each prompt's end position (final norm + unembedding on
those rows alone). Memory: the residual stream of every
layer for both runs, plus one expanded chunk. The engine (:mod:`lsa.engine`) runs
each forward; results equal a hook-by-hook reference (see ``tests/test_patching.py``).

>>> res = activation_patching(model, prompts, site="head")     # doctest: +SKIP
>>> res.array.shape                                              # [layer, head]  # doctest: +SKIP
>>> res.frame.sort_values("normalized").head()                  # doctest: +SKIP
>>> path = path_patching(model, prompts, receivers="logits")    # doctest: +SKIP
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from torch import nn

from lsa import engine
from lsa import metrics as lsa_metrics
from lsa.engine import AttnCache, Edit, Plan, Projection, Read, Start
from lsa.engine.plan import check_defined
from lsa.model import Model
from lsa.tasks import PromptSet, check_tokenizer

__all__ = [
    "SITES",
    "DIRECTIONS",
    "PatchResult",
    "activation_patching",
    "path_patching",
    "run_metric",
    "check_prompts",
    "position_map_prompts",
    "position_labels",
]

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head", "neuron")
RESID_SITES = ("resid_pre", "resid_mid", "resid_post")
DIRECTIONS = ("noising", "denoising")
Metric = Callable[[torch.Tensor, PromptSet], torch.Tensor]
DEFAULT_MAX_TOKENS = {"cpu": 1024, "cuda": 16384}  # rows x positions per expanded forward (CPU: small is faster)


# ============================================================== validation
def check_site(site: str) -> str:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; sites: {', '.join(SITES)}")
    return site


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}")
    return direction


def check_prompts(prompts: PromptSet, model: Model) -> None:
    """Clean and counterfactual prompts must pair up token for token, built with the model's tokenizer."""
    check_tokenizer(prompts, model.tokenizer, model.name)
    if prompts.clean.shape != prompts.corrupt.shape:
        raise ValueError(
            f"clean prompts {tuple(prompts.clean.shape)} and counterfactual prompts "
            f"{tuple(prompts.corrupt.shape)} have different shapes; patching needs equal-length pairs"
        )
    if len(prompts) == 0:
        raise ValueError("the prompt set is empty")


def _check_site_for_model(model: Model, site: str) -> None:
    check_site(site)
    check_defined(model, site)


def units(model: Model, site: str) -> tuple[int, int]:
    """``(units, width)``: how a site's last dimension splits into patchable units."""
    a = model.adapter
    if site == "head":
        return a.n_heads, a.d_head
    if site == "neuron":
        return a.d_mlp, 1
    return 1, a.d_model


def run_metric(metric: Metric, logits: torch.Tensor, prompts: PromptSet) -> torch.Tensor:
    """``metric(logits [n, d_vocab], prompts) -> [n]``, with a clear error for any other shape."""
    out = metric(logits, prompts)
    if not isinstance(out, torch.Tensor) or out.shape != (len(prompts),):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the metric must return one value per prompt, shape [{len(prompts)}]; got {shape} "
            f"(it receives end-position logits [n, d_vocab] and the PromptSet)"
        )
    return out.detach().float()


# ============================================================== running the model
# What a cached start needs from the unpatched run at a layer for its attention to skip queries,
# keys and values (:class:`lsa.engine.AttnCache`): the attention module's output, o_proj's input and output.
ATTN_CACHE = ("attn_full", "head", "attn_proj")


# ============================================================== results
@dataclass
class PatchResult:
    """The outcome of a patching sweep.

    ``components``: one row per intervention (``site``, ``layer``, and where they
    apply ``head`` / ``neuron`` / ``pos``); ``patched``: ``[n_components, n_prompts]``
    metric with that intervention; ``clean`` / ``corrupt``: ``[n_prompts]`` unpatched
    metrics; ``dims`` / ``axes``: the grid the components fill (``("layer", "head")``
    with the labels of each axis), so :attr:`array` is e.g. ``[layer, head]``.
    """

    components: pd.DataFrame
    patched: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    dims: tuple[str, ...]
    axes: dict[str, list]
    direction: str = "noising"
    method: str = "activation patching"
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        n_comp, n = self.patched.shape
        grid = " x ".join(f"{d} {len(self.axes[d])}" for d in self.dims)
        return (
            f"PatchResult({self.method}, {self.direction}, {self.meta.get('site', '')}: {n_comp} components "
            f"[{grid}] x {n} prompts; clean {self.clean.mean():.3f}, counterfactual {self.corrupt.mean():.3f})"
        )

    @property
    def base(self) -> torch.Tensor:
        """Metric of the run that was patched (clean for noising, counterfactual for denoising): ``[n]``."""
        return self.clean if self.direction == "noising" else self.corrupt

    @property
    def effect(self) -> torch.Tensor:
        """Mean patched metric minus mean unpatched metric: ``[n_components]``."""
        return self.patched.mean(1) - self.base.mean()

    @property
    def normalized(self) -> torch.Tensor:
        """``(patched - clean) / (clean - corrupt)`` on means: ``[n_components]``.

        All NaN, with a warning that says what to do, when :func:`lsa.metrics.normalized` refuses (the
        counterfactual does not clearly lower the metric); ``effect`` and ``metric`` stay defined.
        """
        try:
            return lsa_metrics.normalized(self.patched.mean(1), self.clean.mean(), self.corrupt.mean())
        except ValueError as refusal:
            warnings.warn(f"{self.method} ({self.direction}): {refusal}", stacklevel=2)
            return torch.full((self.patched.shape[0],), float("nan"))

    def to_frame(self, per_prompt: bool = False) -> pd.DataFrame:
        """Tidy table: one row per component (means), or per component x prompt."""
        comp = self.components.reset_index(drop=True)
        if not per_prompt:
            frame = comp.copy()
            frame["metric"] = self.patched.mean(1).numpy()
            frame["effect"] = self.effect.numpy()
            frame["normalized"] = self.normalized.numpy()
            return frame
        n_comp, n = self.patched.shape
        frame = comp.loc[comp.index.repeat(n)].reset_index(drop=True)
        frame["prompt"] = list(range(n)) * n_comp
        patched = self.patched.reshape(-1)
        clean = self.clean.repeat(n_comp)
        corrupt = self.corrupt.repeat(n_comp)
        frame["metric"] = patched.numpy()
        frame["effect"] = (patched - self.base.repeat(n_comp)).numpy()
        denom = clean - corrupt
        frame["normalized"] = torch.where(denom != 0, (patched - clean) / denom, torch.nan).numpy()
        return frame

    @property
    def frame(self) -> pd.DataFrame:
        """One row per component: its labels, ``metric``, ``effect``, ``normalized``."""
        return self.to_frame()

    def grid(self, value: str = "normalized") -> torch.Tensor:
        """A per-component value (``"normalized"``, ``"effect"``, ``"metric"``) laid out on :attr:`dims`."""
        values = {"normalized": self.normalized, "effect": self.effect, "metric": self.patched.mean(1)}[value]
        shape = [len(self.axes[d]) for d in self.dims]
        out = torch.full(shape, float("nan"))
        index = {d: {label: i for i, label in enumerate(self.axes[d])} for d in self.dims}
        for row, v in zip(self.components.to_dict("records"), values.tolist()):
            out[tuple(index[d][row[d]] for d in self.dims)] = v
        return out

    @property
    def array(self) -> torch.Tensor:
        """Normalised effects on the sweep's grid, e.g. ``[layer, head]`` or ``[layer, pos]``."""
        return self.grid("normalized")


# ============================================================== interventions
@dataclass(frozen=True)
class _Spec:
    """One intervention: a site at a layer, one unit (head / neuron) or all, one position per prompt or all."""

    site: str
    layer: int
    unit: int | None = None
    pos: str | int | None = None  # None = all positions; int = absolute; str = a named position


def position_index(prompts: PromptSet, pos: str | int | None) -> torch.Tensor | None:
    """Per-prompt position ``[n]`` of a spec (None = every position).

    ``pos``: an absolute position, ``"end"``, a name of ``prompts.positions``, or a name with an
    offset (``"S1+1"``: the token after S1 in each prompt; it must lie within every prompt).
    """
    if pos is None:
        return None
    if isinstance(pos, str):
        name, sign, offset = re.fullmatch(r"(.+?)(?:([+-])(\d+))?", pos).groups()
        if name == "end":
            base = prompts.end
        elif name in prompts.positions:
            base = prompts.positions[name]
        else:
            raise ValueError(
                f"unknown position name {pos!r}; this prompt set has {sorted(prompts.positions)} and 'end' "
                "(a name may take an offset: 'S1+1')"
            )
        if sign is None:
            return base
        index = base + (int(offset) if sign == "+" else -int(offset))
        if bool((index < 0).any()) or bool((index > prompts.end.to(index.device)).any()):
            raise IndexError(f"position {pos!r} lies outside some prompts (before 0 or after their end)")
        return index
    width = prompts.clean.shape[1]
    if not isinstance(pos, int) or not 0 <= pos < width:
        raise IndexError(f"position {pos!r} out of range: prompts are {width} tokens wide (0..{width - 1})")
    return torch.full((len(prompts),), pos, dtype=torch.long)


def _mask(
    specs: Sequence[_Spec], prompts: PromptSet, width: int, units: int, device
) -> torch.Tensor:  # [k * n, pos, units]
    n = len(prompts)
    mask = torch.zeros(len(specs) * n, width, units, dtype=torch.bool, device=device)
    rows = torch.arange(n, device=device)
    for j, spec in enumerate(specs):
        unit = slice(None) if spec.unit is None else spec.unit
        pos = position_index(prompts, spec.pos)
        if pos is None:
            mask[j * n : (j + 1) * n, :, unit] = True
        else:
            mask[j * n + rows, pos.to(device), unit] = True
    return mask


def replace_units(mask: torch.Tensor, donor: torch.Tensor, units: int, width: int) -> Edit:
    """An edit putting ``donor`` (``[batch, pos, units * width]``) where ``mask`` ``[batch, pos, units]`` is set."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xv = x.reshape(*shape[:-1], units, width)
        dv = donor.reshape(*shape[:-1], units, width).to(x.dtype)
        return torch.where(mask[..., None], dv, xv).reshape(shape)

    return edit


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _chunk_size(
    prompts: PromptSet,
    batch_size: int | None,
    max_tokens: int | None,
    model: Model | None = None,
    tokens: int | None = None,
) -> int:
    """Interventions per expanded forward: ``batch_size``, else as many as fit ``max_tokens`` rows x positions.

    ``tokens``: the positions one intervention recomputes over all prompts (default: every position of
    every prompt; fewer where a reused prefix spares the rest). Default budget: :func:`auto_max_tokens`.
    """
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return batch_size
    width = prompts.clean.shape[1]
    if max_tokens is None:
        max_tokens = auto_max_tokens(model, width) if model is not None else DEFAULT_MAX_TOKENS["cpu"]
    return max(1, max_tokens // (tokens or len(prompts) * width))


def auto_max_tokens(model: Model, width: int) -> int:
    """Rows x positions per expanded forward on this model's device.

    CPU: :data:`DEFAULT_MAX_TOKENS` (on one CPU thread batching gains nothing and
    big batches leave the cache). Remote: the GPU budget. CUDA: half of the free
    memory over an estimate of one token's live activations in a block (residual
    copies, MLP hidden, eager attention scores over ``width`` keys); a chunk
    that still runs out of memory is split in two and retried (:func:`_halving`).
    """
    if model.remote:
        return DEFAULT_MAX_TOKENS["cuda"]
    device = model.device
    if device.type != "cuda":
        return DEFAULT_MAX_TOKENS.get(device.type, DEFAULT_MAX_TOKENS["cpu"])
    free, _ = torch.cuda.mem_get_info(device)
    a = model.adapter
    size = next(model.hf.parameters()).element_size()
    per_token = size * (8 * a.d_model + 2 * a.d_mlp + 3 * a.n_heads * width)
    return max(width, int(0.5 * free / per_token))


def _halving(run: Callable[[list[int]], None], chunk: list[int]) -> None:
    """``run(chunk)``; on an out-of-memory error split the chunk in two and run the halves."""
    try:
        run(chunk)
    except torch.OutOfMemoryError:
        if len(chunk) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(chunk) // 2
        _halving(run, chunk[:half])
        _halving(run, chunk[half:])


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def runs(model: Model, prompts: PromptSet, direction: str):
    """``(base tokens, donor tokens)``: the run that is patched and the run patched from."""
    clean, corrupt = prompts.clean.to(model.device), prompts.corrupt.to(model.device)
    return (clean, corrupt) if direction == "noising" else (corrupt, clean)


@torch.no_grad()
def run_specs(
    model: Model,
    prompts: PromptSet,
    specs: Sequence[_Spec],
    donor_cache: dict[tuple[str, int], torch.Tensor],
    base_tokens: torch.Tensor,
    base_cache: dict[tuple[str, int], torch.Tensor],
    *,
    metric: Metric,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    desc: str = "patching",
    base_kv=None,
) -> torch.Tensor:
    """Metric ``[len(specs), n]`` with each spec's site set to ``donor_cache`` values, batched by layer.

    ``base_cache`` is the unpatched run's :func:`baseline` cache: ``("resid_pre", layer)``
    (the block input ``[n, pos, d_model]``) for every patched layer, and where
    present ``("attn_full" | "head" | "attn_proj", layer)``, which let the patched
    layer's attention skip its queries, keys and values (sites after them only).
    ``base_kv``: that run's keys and values (``baseline(..., kv=True).kv``); with them the
    prompts of a chunk whose specs patch positions ``>= p`` in them run together and
    recompute only positions ``p`` up to their last end (a chunk holds specs of one layer,
    site and position; the positions after a prompt's end are padding, never read). Specs at
    the end (or after it) recompute each prompt's end alone, every prompt in one forward
    (:class:`lsa.engine.Start` with a prefix per row).
    """
    n, width = base_tokens.shape
    out = torch.empty(len(specs), n)
    ids, scored = lsa_metrics.answer_columns(metric, prompts)  # vocabulary ids patched runs compute
    order: dict[tuple[int, str, str], list[int]] = {}
    for i, spec in enumerate(specs):  # with a prefix to reuse, a chunk patches one position (name)
        order.setdefault((spec.layer, spec.site, repr(spec.pos) if base_kv is not None else ""), []).append(i)
    groups = []
    for key in sorted(order):
        first = position_index(prompts, specs[order[key][0]].pos) if key[2] else None
        recomputed = None if first is None else int((prompts.lengths - torch.minimum(first, prompts.end)).sum())
        size = _chunk_size(prompts, batch_size, max_tokens, model, recomputed)
        groups += [(chunk, first) for chunk in _chunks(order[key], size)]
    bar = _progress(len(specs), desc, progress)

    def run(chunk: list[int], first: torch.Tensor | None) -> None:
        chunk_specs = [specs[i] for i in chunk]
        site, layer = chunk_specs[0].site, chunk_specs[0].layer
        m = len(chunk)
        n_units, w = units(model, site)
        mask = _mask(chunk_specs, prompts, width, n_units, model.device)  # [m * n, pos, units]
        if ("resid_pre", layer) not in base_cache:
            first = None
        if first is not None and bool((first.cpu() >= prompts.end.cpu()).all()):
            groups = [(None, prompts.end.cpu())]  # the ends alone: every prompt in one forward, at its own end
        else:  # rows that share their first patched position run together, from it to their last end
            groups = _row_groups(prompts, first)
        for rows, p in groups:
            sub = scored if rows is None else scored.subset(rows)
            r, wd = len(sub), sub.clean.shape[1]
            index = torch.arange(m * n) if rows is None else (torch.arange(m)[:, None] * n + rows[None, :]).flatten()
            start = _start(base_cache, layer, m, site != "resid_pre", p, base_kv, rows, wd)
            donor = _span(donor_cache[(site, layer)], rows, p, wd, m)
            patched = _span(mask[index.to(mask.device)], None, p.repeat(m) if isinstance(p, torch.Tensor) else p, wd, 1)
            edits = [Edit(site, layer, replace_units(patched, donor, n_units, w))]
            tokens = base_tokens[slice(None) if rows is None else rows.to(base_tokens.device), :wd].repeat(m, 1)
            plan = Plan(edits=edits, start=start, end=sub.end.repeat(m).to(model.device), columns=ids)
            logits = engine.run(model, tokens, plan).logits
            for j, i in enumerate(chunk):
                out[i, slice(None) if rows is None else rows] = run_metric(
                    metric, logits[j * r : (j + 1) * r], sub
                ).cpu()
        bar.update(m)

    for chunk, first in groups:
        _halving(lambda c, first=first: run(c, first), chunk)
    bar.close()
    return out


def _span(x: torch.Tensor, rows, lo, width: int | None, m: int) -> torch.Tensor:
    """Positions ``lo`` to ``width - 1`` of ``rows`` of ``x`` ``[n, pos, ...]`` (``None``: every row), or, of every
    row, with ``lo`` a tensor ``[n]`` each row's position ``lo`` alone (``[n, 1, ...]``); a copy, repeated for
    ``m`` replicas."""
    if isinstance(lo, torch.Tensor):
        x = x[torch.arange(x.shape[0], device=x.device), lo.to(x.device)][:, None]
    else:
        x = x[slice(None) if rows is None else rows, lo:width]
    return x.repeat(m, *([1] * (x.ndim - 1)))


def _out_features(module: nn.Module) -> int:
    """Output width of a linear layer (``nn.Linear``, or GPT-2's transposed ``Conv1D``)."""
    return module.out_features if hasattr(module, "out_features") else module.nf


def _start(
    base_cache: dict, layer: int, m: int, attn: bool = False, prefix: int = 0, kv=None, rows=None, width=None
) -> Start | None:
    """Start a forward of ``m`` replicas at ``layer`` from the cached block input (None when not cached).

    ``attn``: also reuse the layer's cached attention (valid when nothing before the heads' outputs changes).
    ``prefix`` with ``kv`` (the unpatched run's keys and values): recompute positions ``>= prefix`` alone;
    a tensor ``[n]`` (every row): each row's position ``prefix`` alone.
    ``rows`` / ``width``: the cached run's rows and first positions this forward runs (default: all).
    """
    hidden = base_cache.get(("resid_pre", layer))
    if hidden is None:
        return None
    per_row = isinstance(prefix, torch.Tensor)
    lo = prefix if kv is not None else 0  # with a reused prefix, the positions the run computes alone

    def take(x):
        return _span(x, rows, lo, width, m)

    cached = None
    if attn and all((key, layer) in base_cache for key in ATTN_CACHE):
        cached = AttnCache(*(take(base_cache[(key, layer)]) for key in ATTN_CACHE))
    if kv is None or not (per_row or prefix):
        return Start(layer, take(hidden), cached)
    prefix = prefix.repeat(m).to(hidden.device) if per_row else prefix
    return Start(layer, take(hidden), cached, prefix, kv, rows)


def _row_groups(prompts: PromptSet, first: torch.Tensor | None) -> list[tuple[torch.Tensor | None, int]]:
    """Rows that share their first patched position ``first`` ``[n]`` (clipped to each row's end), with it.

    ``[(None, 0)]`` (all rows, every position recomputed) when ``first`` is None.
    """
    if first is None:
        return [(None, 0)]
    first = torch.minimum(first.cpu(), prompts.end.cpu())
    return [((first == p).nonzero().flatten(), int(p)) for p in first.unique().tolist()]


def _layers(model: Model, layers) -> list[int]:
    if layers is None:
        return list(range(model.adapter.n_layers))
    layers = [layers] if isinstance(layers, int) else list(layers)
    for layer in layers:
        model.adapter.check_layer(layer)
    return layers


def _heads(model: Model, heads, layer: int | None = None) -> list[int]:
    if heads is None:
        return list(range(model.adapter.n_heads))
    heads = [heads] if isinstance(heads, int) else list(heads)
    for head in heads:
        model.adapter.check_head(head, layer)
    return heads


def position_map_prompts(prompts: PromptSet) -> PromptSet:
    """The prompts a position-by-position sweep (``positions="each"``) patches.

    Patching absolute positions one at a time compares prompts position by
    position, so every prompt needs the same length *and* the same named positions
    (IO, S1, S2, verb, ...): one group of :meth:`lsa.tasks.PromptSet.aligned`. On
    real tokenizers a length group mixes templates whose names sit at different
    positions, and a name or verb of another token length moves the positions after
    it. All the prompts when they form one group; else the largest group, with a
    warning that says how many prompts it keeps (map each group with
    ``for group in prompts.aligned(): ...``).
    """
    groups = prompts.aligned()
    if len(groups) <= 1:
        return prompts
    kept = groups[0]
    templates = sorted(set(kept.meta["template"])) if "template" in kept.meta else []
    which = (
        f" (template {', '.join(map(str, templates[:3]))}{', ...' if len(templates) > 3 else ''})" if templates else ""
    )
    warnings.warn(
        f"positions='each' patches absolute positions, which mean the same thing only where the prompts' lengths "
        f"and named positions coincide; these {len(prompts)} prompts form {len(groups)} such groups "
        f"(sizes {[len(g) for g in groups]}): patching the largest, {len(kept)} prompts{which}. "
        "To map every group: [activation_patching(model, g, site, positions='each') for g in prompts.aligned()]",
        stacklevel=3,
    )
    return kept


def _token_label(tokenizer, token: int) -> str:
    """A short display form of one token: its text, or its vocabulary entry when it is a byte piece."""
    text = tokenizer.decode([token])
    if "\ufffd" in text and hasattr(tokenizer, "convert_ids_to_tokens"):
        text = str(tokenizer.convert_ids_to_tokens(token))
    text = text.strip().replace("\n", "\\n") or repr(text)
    return text if len(text) <= 12 else text[:11] + "…"


def position_labels(prompts: PromptSet, tokenizer, positions: Sequence) -> list[str]:
    """Display labels of a sweep's positions: ``"3:Mary (IO)"``.

    An absolute position gets its index, the first prompt's token there and the
    named positions that every prompt has there (``IO``, ``S1``, ``S2``, ``end``);
    a name stays its name; ``None`` (all positions) is ``"all"``. Without a
    tokenizer, the index and names alone.
    """
    named = {**prompts.positions, "end": prompts.end}
    labels = []
    for pos in positions:
        if pos is None or isinstance(pos, str):
            labels.append("all" if pos is None else pos)
            continue
        names = [name for name, at in named.items() if len(at) and bool((at == pos).all())]
        label = str(pos)
        if tokenizer is not None and len(prompts) and pos < int(prompts.lengths[0]):
            label += f":{_token_label(tokenizer, int(prompts.clean[0, pos]))}"
        labels.append(label + (f" ({'/'.join(names)})" if names else ""))
    return labels


def _positions(prompts: PromptSet, positions) -> list:
    """``None`` -> [None] (all at once); ``"each"`` -> every position; a list of ints / names."""
    if positions is None or positions == "all":
        return [None]
    if positions == "each":
        if not prompts.same_length:
            raise ValueError(
                "positions='each' patches absolute positions, which differ between prompts of different "
                "lengths; split the set with prompts.aligned() (groups whose length and named positions coincide) "
                "or pass named positions (e.g. ['S2', 'end'])"
            )
        return list(range(prompts.clean.shape[1]))
    positions = [positions] if isinstance(positions, (int, str)) else list(positions)
    for pos in positions:
        position_index(prompts, pos)  # validates
    return positions


def sweep_specs(
    model: Model, prompts: PromptSet, site: str, *, layers=None, heads=None, neurons=None, positions=None
) -> tuple[list[_Spec], tuple[str, ...], dict[str, list]]:
    """The interventions of a sweep plus its grid (dims and axis labels)."""
    _check_site_for_model(model, site)
    layer_list = _layers(model, layers)
    pos_list = _positions(prompts, positions)
    by_pos = pos_list != [None]
    if site == "head":
        head_list = _heads(model, heads)
        specs = [_Spec(site, layer, h, p) for layer in layer_list for h in head_list for p in pos_list]
        dims, axes = ("layer", "head"), {"layer": layer_list, "head": head_list}
    elif site == "neuron":
        if neurons is None:
            neurons = list(range(model.adapter.d_mlp))
        neurons = [neurons] if isinstance(neurons, int) else list(neurons)
        for i in neurons:
            model.adapter.check_neuron(i)
        specs = [_Spec(site, layer, i, p) for layer in layer_list for i in neurons for p in pos_list]
        dims, axes = ("layer", "neuron"), {"layer": layer_list, "neuron": neurons}
    else:
        if heads is not None or neurons is not None:
            raise ValueError(f"site {site!r} has no heads or neurons; use site='head' or site='neuron'")
        specs = [_Spec(site, layer, None, p) for layer in layer_list for p in pos_list]
        dims, axes = ("layer",), {"layer": layer_list}
    if by_pos:
        dims, axes = (*dims, "pos"), {**axes, "pos": pos_list}
    return specs, dims, axes


def specs_frame(specs: Sequence[_Spec], dims: tuple[str, ...]) -> pd.DataFrame:
    rows = []
    for s in specs:
        row = {"site": s.site, "layer": s.layer}
        if "head" in dims:
            row["head"] = s.unit
        if "neuron" in dims:
            row["neuron"] = s.unit
        if "pos" in dims:
            row["pos"] = s.pos
        rows.append(row)
    return pd.DataFrame(rows)


@torch.no_grad()
def baseline(
    model: Model,
    prompts: PromptSet,
    tokens: torch.Tensor,
    sites: Iterable[tuple[str, int]] = (),
    attn_layers: Iterable[int] = (),
    kv: bool = False,
) -> engine.Run:
    """Unpatched run: end logits ``[n, d_vocab]`` plus the read sites and every block input (``resid_pre``).

    ``attn_layers``: also read the attention output and the output projection's
    input and output there (for :func:`run_specs` to reuse). ``kv``: also keep every
    layer's keys and values (``Run.kv``), so interventions restricted to later
    positions recompute those alone (:class:`lsa.engine.Start`'s ``prefix``).
    """
    reads = set(sites)
    if not model.remote:  # remote forwards start at layer 0: no cache to send back and forth
        reads |= {("resid_pre", layer) for layer in range(model.adapter.n_layers)}
        reads |= {(key, layer) for layer in attn_layers for key in ATTN_CACHE}
    plan = Plan(reads=[Read(*key) for key in sorted(reads)], end=prompts.end, kv=kv and not model.remote)
    return engine.run(model, tokens, plan)


def activation_patching(
    model: Model,
    prompts: PromptSet,
    site: str = "head",
    *,
    layers: int | Iterable[int] | None = None,
    heads: int | Iterable[int] | None = None,
    neurons: int | Iterable[int] | None = None,
    positions=None,
    direction: str = "noising",
    metric: Metric | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    reuse_prefix: bool = True,
) -> PatchResult:
    """Patch one component at a time from the other run and measure the metric.

    Args:
        site: one of :data:`SITES`.
        layers, heads, neurons: which components (default: every layer, every head /
            neuron); ``neurons`` only with ``site="neuron"``.
        positions: ``None`` (all positions at once), ``"each"`` (every position
            separately, for a layer x position map: on the prompts whose length and
            named positions coincide, :func:`position_map_prompts`, which warns when
            it keeps only the largest such group), or a list of absolute
            positions and/or names in ``prompts.positions`` (``"S2"``, ``"end"``),
            each patched on its own (``None`` in the list = all positions).
        direction: ``"noising"`` (clean run, counterfactual activations) or ``"denoising"``.
        metric: ``metric(logits [n, d_vocab], prompts) -> [n]`` at the end position
            (default :func:`lsa.metrics.logit_diff`).
        batch_size: interventions per forward (default: as many as fit ``max_tokens``).
        reuse_prefix: an intervention at positions ``>= p`` (a named or absolute position,
            ``"each"``) recomputes only those positions, attending to the unpatched run's
            keys and values before ``p`` (exact: nothing before ``p`` can change).
            ``False``: recompute every position (as before; for comparison).

    Returns a :class:`PatchResult` whose ``array`` is ``[layer, head]`` for heads,
    ``[layer, neuron]`` for neurons, ``[layer]`` otherwise, with a trailing
    ``pos`` axis when positions are patched one at a time; then ``meta["pos_labels"]``
    labels that axis with tokens (:func:`position_labels`, e.g. ``"3:Mary (IO)"``)
    and ``meta["n_prompts"]`` / ``meta["n_given"]`` say how many prompts it rests on.

    >>> res = activation_patching(model, prompts, "resid_pre", positions="each")  # doctest: +SKIP
    >>> res.array.shape   # [layer, pos]                                           # doctest: +SKIP
    """
    check_prompts(prompts, model)
    check_direction(direction)
    metric = metric or lsa_metrics.logit_diff
    n_given = len(prompts)
    if positions == "each":
        prompts = position_map_prompts(prompts)
    specs, dims, axes = sweep_specs(
        model, prompts, site, layers=layers, heads=heads, neurons=neurons, positions=positions
    )
    base_tokens, donor_tokens = runs(model, prompts, direction)
    sites = {(s.site, s.layer) for s in specs}
    attn_layers = {s.layer for s in specs if s.site != "resid_pre"}
    base = baseline(model, prompts, base_tokens, attn_layers=attn_layers, kv=reuse_prefix)
    base_logits, base_cache = base.logits, base.values
    donor = baseline(model, prompts, donor_tokens, sites)
    donor_logits, donor_cache = donor.logits, donor.values
    base_metric = run_metric(metric, base_logits, prompts).cpu()
    donor_metric = run_metric(metric, donor_logits, prompts).cpu()
    clean, corrupt = (base_metric, donor_metric) if direction == "noising" else (donor_metric, base_metric)
    patched = run_specs(
        model,
        prompts,
        specs,
        donor_cache,
        base_tokens,
        base_cache,
        metric=metric,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        desc=f"patching {site}",
        base_kv=base.kv,
    )
    return PatchResult(
        components=specs_frame(specs, dims),
        patched=patched,
        clean=clean,
        corrupt=corrupt,
        dims=dims,
        axes=axes,
        direction=direction,
        meta=sweep_meta(model, prompts, site, axes, n_given),
    )


def sweep_meta(model: Model, prompts: PromptSet, site: str, axes: dict, n_given: int) -> dict:
    """A sweep's ``meta``: its site, and with a position axis the token labels and the prompts it rests on."""
    meta = {"site": site}
    if "pos" in axes:
        tokenizer = getattr(model, "tokenizer", None)
        meta["pos_labels"] = position_labels(prompts, tokenizer, axes["pos"])
        meta["n_prompts"], meta["n_given"] = len(prompts), n_given
    return meta


# ============================================================== path patching
def _frozen_heads(
    model: Model, base_cache: dict, donor_cache: dict, groups: list, layer: int, where, rows, lo, hi: int | None
) -> torch.Tensor:
    """Every head's output at ``layer`` for a chunk of sender groups: the base run's, the senders' from the donor run.

    ``[m * r, hi - lo, n_heads * d_head]``, replica-major (one replica per group): positions ``lo`` to
    ``hi - 1`` of ``rows`` (``None``: every row), or with ``lo`` a tensor ``[r]`` each row's position
    ``lo`` alone (``[m * r, 1, ...]``); ``where`` ``[n]``: the position patched in each prompt
    (``None``: every position).
    """
    a = model.adapter
    device = base_cache[("head", layer)].device
    take = slice(None) if rows is None else rows.to(device)
    lo = lo.to(device) if isinstance(lo, torch.Tensor) else lo
    dz = _span(donor_cache[("head", layer)], take, lo, hi, 1)
    r, width = dz.shape[:2]
    dz = dz.reshape(r, width, a.n_heads, a.d_head)
    z = _span(base_cache[("head", layer)], take, lo, hi, len(groups)).reshape(-1, width, a.n_heads, a.d_head)
    dz = dz.to(z)
    if where is not None:
        pos = where.to(z.device)[take] - lo
        inside = ((pos >= 0) & (pos < width)).nonzero().flatten()
        pos = pos[inside]
    for j, group in enumerate(groups):
        for sl, sh in group:
            if sl == layer and where is None:
                z[j * r : (j + 1) * r, :, sh] = dz[:, :, sh]
            elif sl == layer:
                z[j * r + inside, pos, sh] = dz[inside, pos, sh]
    return z.reshape(len(groups) * r, width, a.n_heads * a.d_head)


def _receiver_projections(model: Model, rsites: dict, seen: dict) -> list[Projection]:
    """Each receiver layer's q / k / v projections applied to its recorded attention input ``seen[("attn_in", layer)]``.

    Every head's q / k / v comes from the patched input; only the receivers' columns are used.
    """
    projections = []
    for (_, layer), patched_in in sorted(seen.items()):
        by_module: dict[nn.Module, list[slice]] = {}
        for kind, heads in rsites[layer].items():
            for unit in heads:
                module, cols = model.adapter.qkv_columns(model.hf, kind, layer, unit)
                by_module.setdefault(module, []).append(cols)
        for module, cols_list in by_module.items():
            colmask = torch.zeros(_out_features(module), dtype=torch.bool, device=patched_in.device)
            for cols in cols_list:
                colmask[cols] = True
            projections.append(Projection(module, layer, patched_in, colmask))
    return projections


def _receiver_heads(model: Model, rsites: dict, layer: int) -> torch.Tensor:
    """The query heads whose outputs the receivers' patched inputs reach at ``layer`` ``[n_heads]`` (bool):
    a query receiver's head, every head of a key / value receiver's KV group."""
    a = model.adapter
    mask = torch.zeros(a.n_heads, dtype=torch.bool)
    for kind, units in rsites[layer].items():
        for h in range(a.n_heads):
            mask[h] |= (h if kind == "q" else a.kv_head(h)) in units
    return mask


def _receivers_at_end(model: Model, base_cache: dict, rsites: dict, layers, m: int, rows, p: int, ends) -> list[Edit]:
    """Edits that give the receivers' heads at ``layers`` the base run's output at every position but each row's end."""
    a = model.adapter
    edits = []
    for layer in layers:
        heads = _receiver_heads(model, rsites, layer)
        z = base_cache[("head", layer)][slice(None) if rows is None else rows].repeat(m, 1, 1)

        def keep_end(x, z=z, heads=heads):
            width = x.shape[1]
            other = torch.arange(p, p + width, device=x.device)[None, :] != ends.to(x.device)[:, None]
            cols = heads.to(x.device).repeat_interleave(a.d_head)
            return torch.where(other[:, :, None] & cols, z[:, p : p + width].to(x), x).contiguous()

        edits.append(Edit("head", layer, keep_end))
    return edits


def _sender_groups(model: Model, senders) -> list[tuple[tuple[int, int], ...]]:
    """Normalise senders: ``(layer, head)`` or a list of them (patched together) per entry."""
    groups = []
    for entry in senders:
        if isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(x, int) for x in entry):
            entry = [entry]
        group = tuple(tuple(h) for h in entry)
        if not group:
            raise ValueError("an empty sender group")
        for layer, head in group:
            model.adapter.check_head(head, layer)
        groups.append(group)
    return groups


def _receiver_sites(model: Model, receivers, receiver_input: str) -> dict[int, dict[str, list[int]]]:
    """``{layer: {"q": [heads], "k": [kv heads], "v": [kv heads]}}`` (keys and values per KV group)."""
    kinds = list(dict.fromkeys(receiver_input))
    if not kinds or any(k not in "qkv" for k in kinds):
        raise ValueError(f"receiver_input must be letters from 'qkv' (e.g. 'q', 'kv', 'qkv'), got {receiver_input!r}")
    sites: dict[int, dict[str, list[int]]] = {}
    for entry in receivers:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise ValueError(f"a receiver head is (layer, head), got {entry!r}")
        layer, head = entry
        model.adapter.check_head(head, layer)
        for kind in kinds:
            unit = head if kind == "q" else model.adapter.kv_head(head)
            units = sites.setdefault(layer, {}).setdefault(kind, [])
            if unit not in units:
                units.append(unit)
    return sites


@dataclass
class PathRuns:
    """Path patching's two unpatched runs of ``prompts`` (:func:`path_runs`), shared by several calls.

    ``base``: every head's output and attention input, keys and values (locally); ``donor``: every
    head's output. Valid for the same ``prompts`` object and ``direction`` alone.
    """

    prompts: PromptSet
    direction: str
    base: engine.Run
    donor: engine.Run


@torch.no_grad()
def path_runs(model: Model, prompts: PromptSet, direction: str = "noising") -> PathRuns:
    """The unpatched runs that :func:`path_patching` calls on the same prompts can share (``unpatched=``).

    Iterated path patching calls it once per receiver set and input; sharing spares two forwards
    of the prompts per call.
    """
    check_prompts(prompts, model)
    check_direction(direction)
    base_tokens, donor_tokens = runs(model, prompts, direction)
    n_layers = model.adapter.n_layers
    heads = {("head", layer) for layer in range(n_layers)}
    base = baseline(model, prompts, base_tokens, heads | {("attn_in", layer) for layer in range(n_layers)}, kv=True)
    return PathRuns(prompts, direction, base, baseline(model, prompts, donor_tokens, heads))


@torch.no_grad()
def path_patching(
    model: Model,
    prompts: PromptSet,
    senders=None,
    receivers="logits",
    *,
    receiver_input: str | tuple[str, ...] = "q",
    direction: str = "noising",
    metric: Metric | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    positions: str | int | None = None,
    freeze_attention: bool = True,
    reuse_prefix: bool = True,
    unpatched: PathRuns | None = None,
    receivers_at: str | None = None,
) -> PatchResult | dict[str, PatchResult]:
    """Path patching (Wang et al. 2022): each sender's effect through its direct path to the receivers.

    Args:
        senders: ``(layer, head)`` entries, each patched on its own; an entry may
            be a list of heads patched together. Default: every head (for
            ``receivers="logits"``) or every head in a layer before the last
            receiver layer.
        receivers: ``"logits"`` (the final residual stream) or a list of
            ``(layer, head)`` whose ``receiver_input`` (``"q"``, ``"k"``, ``"v"`` or
            a combination such as ``"kv"``) takes the patched path. Under
            grouped-query attention a key / value receiver is the head's KV group
            (every query head of the group sees the patched keys / values).
            A tuple of inputs, such as ``("k", "v")``, patches each on its own and returns
            ``{input: PatchResult}``, equal to one call per input; the inputs share the senders' run
            (step 2) and, with ``receivers_at="end"``, the run of the receivers' keys and values.
        positions: where the senders' outputs are patched: ``None`` (every position), or one
            named (``"end"``, a name of ``prompts.positions``) or absolute position. With every
            other head frozen, a sender reaches the logits only through the end position's
            residual, so ``positions="end"`` gives the same result as ``None`` for
            ``receivers="logits"``, and it means "the receivers' queries at the end" for ``"q"``.
        reuse_prefix: with ``positions``, recompute only the positions from the earliest patched
            one on (the unpatched run's keys and values before it are reused; exact). Where that is
            one position per prompt (senders at the end, or receivers read at the end alone: the
            senders' position, then the end), every prompt runs in one forward at its own position.
        freeze_attention: frozen layers' attention computes no queries, keys or values
            (its heads' outputs are all given: :class:`lsa.engine.Plan`'s ``given_heads``);
            ``False``: compute them and overwrite the heads' outputs (as before; for comparison).
        unpatched: the two unpatched runs from :func:`path_runs` of these ``prompts`` and this
            ``direction`` (default: run them here).
        receivers_at: where the receivers' outputs take the patched path: ``None`` (wherever their
            patched inputs reach them, Wang et al.'s step 3) or ``"end"`` (at the end position
            alone; at every other position they give the base run's output, so that position is
            the base run's at every layer). With senders at one position ``p`` before the end,
            only the end is then recomputed: one run of position ``p`` through the receiver layers
            gives the receivers' keys and values there, the base run's the rest.

    Steps (noising; denoising swaps the two runs):
      1) run clean and counterfactual prompts, caching every head's output;
      2) rerun the clean prompts with the sender heads' outputs taken from the
         counterfactual run and every other head frozen to its clean output
         (MLPs and norms recomputed); for ``"logits"`` this run's metric is the result;
      3) otherwise record the receiver layers' attention input (``ln1`` output) in
         run 2 and rerun the clean prompts with only the receivers' q / k / v
         computed from it (their projection's output columns replaced).

    Returns a :class:`PatchResult` with one row per sender (``layer``, ``head``;
    ``array`` ``[layer, head]`` when every sender is a single head).
    """
    check_prompts(prompts, model)
    check_direction(direction)
    metric = metric or lsa_metrics.logit_diff
    a = model.adapter
    n_layers, n = a.n_layers, len(prompts)
    to_logits = isinstance(receivers, str)
    if to_logits and receivers != "logits":
        raise ValueError(f"receivers must be 'logits' or a list of (layer, head), got {receivers!r}")
    inputs = (receiver_input,) if isinstance(receiver_input, str) else tuple(receiver_input)
    if not inputs or (to_logits and len(inputs) > 1):
        raise ValueError(
            f"receiver_input must be an input or a tuple of inputs for head receivers, got {receiver_input!r}"
        )
    sites = {} if to_logits else {ix: _receiver_sites(model, receivers, ix) for ix in inputs}
    rsites = {} if to_logits else _receiver_sites(model, receivers, "".join(inputs))  # every input's, for the runs
    if receivers_at not in (None, "end") or (receivers_at and to_logits):
        raise ValueError(f"receivers_at must be None or 'end' (for head receivers), got {receivers_at!r}")
    last_receiver = n_layers if to_logits else max(rsites)
    if senders is None:
        senders = [(layer, h) for layer in range(last_receiver) for h in range(a.n_heads)]
    groups = _sender_groups(model, senders)

    base_tokens, donor_tokens = runs(model, prompts, direction)
    where = position_index(prompts, positions)  # [n] or None (every position)
    if unpatched is None:
        head_sites = {("head", layer) for layer in range(n_layers)}
        attn_in = {("attn_in", layer) for layer in rsites}
        base = baseline(model, prompts, base_tokens, head_sites | attn_in, kv=reuse_prefix and where is not None)
        donor = baseline(model, prompts, donor_tokens, head_sites)
    elif unpatched.prompts is not prompts or unpatched.direction != direction:
        raise ValueError(
            "unpatched runs are for the prompts and direction they were made from "
            f"(path_runs(model, prompts, {direction!r}))"
        )
    else:
        base, donor = unpatched.base, unpatched.donor
        if not (reuse_prefix and where is not None):
            base = replace(base, kv=None)
    base_logits, base_cache = base.logits, base.values
    donor_logits, donor_cache = donor.logits, donor.values
    base_metric = run_metric(metric, base_logits, prompts).cpu()
    donor_metric = run_metric(metric, donor_logits, prompts).cpu()
    clean, corrupt = (base_metric, donor_metric) if direction == "noising" else (donor_metric, base_metric)

    recomputed = None
    if base.kv is not None and receivers_at:  # each run recomputes one position per prompt
        recomputed = n
    elif base.kv is not None:  # each replica recomputes its prompts from the patched position to their end
        recomputed = int((prompts.lengths - torch.minimum(where.cpu(), prompts.end.cpu())).sum())
    k = _chunk_size(prompts, batch_size, max_tokens, model, recomputed)
    order: dict[int, list[int]] = {}
    for i, group in enumerate(groups):
        order.setdefault(min(layer for layer, _ in group), []).append(i)
    chunks = [c for layer in sorted(order) for c in _chunks(order[layer], k)]
    outs = {ix: torch.empty(len(groups), n) for ix in inputs}
    ids, scored = lsa_metrics.answer_columns(metric, prompts)  # vocabulary ids patched runs compute
    bar = _progress(len(groups), "path patching", progress)

    # each prompt runs one position, all prompts together: the senders' position for the run into the
    # receivers, their end for the logits (senders at the end, or receivers read at the end alone)
    alone = base.kv is not None and where is not None
    alone = alone and (bool((where.cpu() >= prompts.end.cpu()).all()) or (receivers_at == "end" and not to_logits))
    at_p = None if where is None else torch.minimum(where.cpu(), prompts.end.cpu())

    def at(key, pos, m):
        return _span(base_cache[key], None, pos, None, m)

    def senders_plan(chunk: list[int], start: int, reads: list, rows, lo, hi, begin: Start, ends) -> Plan:
        """Step 2: the chunk's senders from the donor run, every other head frozen to the base run (positions
        ``lo`` to ``hi - 1`` of ``rows``, or each row's ``lo``); the logits, or the receivers' inputs."""
        edits: list[Edit] = []
        given: dict[int, torch.Tensor] = {}
        for layer in range(start, last_receiver):
            z = _frozen_heads(model, base_cache, donor_cache, [groups[gi] for gi in chunk], layer, where, rows, lo, hi)
            if freeze_attention:
                given[layer] = z
            else:
                edits.append(Edit("head", layer, lambda x, z=z: z))
        if to_logits:
            return Plan(edits=edits, given_heads=given, start=begin, end=ends, columns=ids)
        return Plan(
            edits=edits,
            given_heads=given,
            reads=[Read(*key) for key in reads],
            start=begin,
            stop_after=max(reads),
            logits=None,
        )

    def run_alone(chunk: list[int], start: int, reads: list) -> None:
        m = len(chunk)
        end = prompts.end.cpu()
        p_m, e_m = at_p.repeat(m).to(model.device), end.repeat(m).to(model.device)  # per row of the run
        tokens = base_tokens.repeat(m, 1)
        frozen = _start(base_cache, start, m, prefix=at_p, kv=base.kv)
        plan = senders_plan(chunk, start, reads, None, at_p, None, frozen, e_m)
        plans = {}
        if to_logits:
            plans[inputs[0]] = plan
        else:
            seen = engine.run(model, tokens, plan).values  # the receivers' inputs at the senders' position
            first = min(layer for _, layer in reads)
            later = (at_p < end).repeat(m).to(model.device)  # rows whose receivers read at a later end
            moves = bool(later.any())
            if moves:  # the receivers' keys and values at the senders' position
                begin = _start(base_cache, first, m, prefix=at_p, kv=base.kv)
                idle = begin.hidden.new_zeros(n * m, 1, a.n_heads * a.d_head)
                last = max(rsites)
                plan = Plan(
                    projections=_receiver_projections(model, rsites, seen),
                    given_heads={layer: idle for layer in range(first, last) if ("attn_in", layer) not in seen},
                    idle_mlps=tuple(range(first, last)),
                    start=begin,
                    stop_after=("head", last),
                    logits=None,
                    kv=True,
                )
                patched = engine.run(model, tokens, plan).kv
                moved = later.nonzero().flatten()
            for ix in inputs:
                kv = list(base.kv)
                for _, layer in seen if moves else ():
                    pair = list(kv[layer])
                    for slot, kind in enumerate("kv"):
                        units = sites[ix][layer].get(kind, [])
                        if units:
                            store = pair[slot].repeat(m, 1, 1, 1)
                            new = patched[layer][slot][:, :, -1]  # the run's own position: its last slot
                            for unit in units:
                                store[moved, unit, p_m[moved]] = new[moved, unit]
                            pair[slot] = store
                    kv[layer] = tuple(pair)
                given_in = {key: torch.where(later[:, None, None], at(key, end, m).to(x), x) for key, x in seen.items()}
                plans[ix] = Plan(
                    projections=_receiver_projections(model, sites[ix], given_in),
                    start=_start(base_cache, first, m, prefix=end, kv=kv),
                    end=e_m,
                    columns=ids,
                )
        for ix, plan in plans.items():
            logits = engine.run(model, tokens, plan).logits
            for j, gi in enumerate(chunk):
                outs[ix][gi] = run_metric(metric, logits[j * n : (j + 1) * n], scored).cpu()

    def run(chunk: list[int]) -> None:
        m = len(chunk)
        start = min(layer for layer, _ in groups[chunk[0]])
        reads = [("attn_in", layer) for layer in rsites if layer > start]
        if not to_logits and not reads:  # no receiver after the senders: no path, the base run's metric
            for out in outs.values():
                out[chunk] = base_metric
            bar.update(m)
            return
        if alone:
            run_alone(chunk, start, reads)
            bar.update(m)
            return
        # rows that share the patched position run together, from it to their last end (prefix reuse)
        for rows, p in _row_groups(prompts, where if base.kv is not None else None):
            sub = scored if rows is None else scored.subset(rows)
            r, wd = len(sub), sub.clean.shape[1]
            tokens = base_tokens[slice(None) if rows is None else rows, :wd].repeat(m, 1)
            ends = sub.end.repeat(m)
            # 2) senders from the donor run, every other head frozen to the base run. With every head
            # frozen nothing moves between positions, so a run into receivers, whose senders are patched
            # at p alone, changes position p alone: it runs p by itself (the base run gives the rest).
            upto = p + 1 if base.kv is not None and not to_logits else wd
            base_start = _start(base_cache, start, m, prefix=p, kv=base.kv, rows=rows, width=upto)
            plan = senders_plan(chunk, start, reads, rows, p, upto, base_start, ends)
            plans = {}
            if to_logits:
                plans[inputs[0]] = plan
            else:
                seen = engine.run(model, tokens[:, :upto], plan).values
                if upto < wd:  # the positions after p as in the base run
                    seen = {
                        key: torch.cat([x, base_cache[key][rows, upto:wd].repeat(m, 1, 1).to(x)], 1)
                        for key, x in seen.items()
                    }
                # 3) receivers' q / k / v from the recorded attention inputs (positions >= p); all else recomputed.
                first = min(layer for _, layer in reads)
                for ix in inputs:
                    at_end = _receivers_at_end(model, base_cache, sites[ix], [la for _, la in reads], m, rows, p, ends)
                    plans[ix] = Plan(
                        projections=_receiver_projections(model, sites[ix], seen),
                        edits=at_end if receivers_at else [],
                        start=_start(base_cache, first, m, prefix=p, kv=base.kv, rows=rows, width=wd),
                        end=ends,
                        columns=ids,
                    )
            for ix, plan in plans.items():
                logits = engine.run(model, tokens, plan).logits
                for j, gi in enumerate(chunk):
                    outs[ix][gi, slice(None) if rows is None else rows] = run_metric(
                        metric, logits[j * r : (j + 1) * r], sub
                    ).cpu()
        bar.update(m)

    for chunk in chunks:
        _halving(run, chunk)
    bar.close()
    single = all(len(g) == 1 for g in groups)
    if single:
        components = pd.DataFrame([{"site": "head", "layer": g[0][0], "head": g[0][1]} for g in groups])
        dims = ("layer", "head")
        axes = {"layer": sorted({g[0][0] for g in groups}), "head": sorted({g[0][1] for g in groups})}
    else:
        components = pd.DataFrame(
            [{"site": "heads", "senders": ", ".join(f"{lh[0]}.{lh[1]}" for lh in g)} for g in groups]
        )
        dims, axes = ("senders",), {"senders": components["senders"].tolist()}
    results = {
        ix: PatchResult(
            components=components.copy(),
            patched=out,
            clean=clean,
            corrupt=corrupt,
            dims=dims,
            axes=axes,
            direction=direction,
            method="path patching",
            meta={
                "site": "head",
                "receivers": receivers,
                "receiver_input": None if to_logits else ix,
                **({} if positions is None else {"positions": positions}),
            },
        )
        for ix, out in outs.items()
    }
    return results[inputs[0]] if isinstance(receiver_input, str) else results
