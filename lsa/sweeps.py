"""The machinery every sweep shares: one component at a time, patched from other values, batched.

A *sweep* patches one component (a head, a neuron, a layer's site, at one position or all) at a
time and measures a metric; activation patching (:mod:`lsa.patching`), ablation sweeps
(:mod:`lsa.ablation`) and attribution patching (:mod:`lsa.attribution`) are sweeps. This module
holds what they share, and nothing of any one of them:

- the checks of their inputs (:func:`check_prompts`, :func:`check_direction`, :func:`check_site`)
  and the metric's (:func:`run_metric`);
- the interventions and their grid (:func:`sweep_specs`, :func:`position_index`,
  :func:`specs_frame`), positions as labels (:func:`position_labels`, :func:`position_map_prompts`);
- the unpatched runs (:func:`base_donor_tokens`, :func:`baseline`, :func:`cached_start`);
- the template of activation patching and ablation sweeps (:func:`sweep`): the base run, the
  donor's values, then every intervention in chunks (:class:`Chunking`) that start at their layer
  from the base run's residual stream and recompute only the positions from the patched one on;
- the result (:class:`PatchResult`).

Cost of :func:`sweep`: the base run and the donor's values once, then per patched layer ``L`` one
forward of the base batch expanded by the number of interventions (chunked to ``max_tokens``) that
starts at block ``L`` from the cached residual stream (for sites after the attention, layer ``L``'s
queries, keys and values come from the cache too), recomputes only positions from the patched one
on (the base run's keys and values before them reused), and computes logits only at each prompt's
end (only the metric's vocabulary columns where it reads no others). Memory: the residual stream of
every layer for the base run, its keys and values, plus one expanded chunk.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from lsa import engine
from lsa import metrics as lsa_metrics
from lsa.engine import AttnCache, Patch, Plan, Read, Start
from lsa.tasks import PromptSet, check_tokenizer

__all__ = [
    "ATTN_CACHE",
    "DEFAULT_MAX_TOKENS",
    "DIRECTIONS",
    "SITES",
    "Chunking",
    "Metric",
    "PatchResult",
    "auto_max_tokens",
    "base_donor_tokens",
    "baseline",
    "cached_start",
    "check_direction",
    "check_prompts",
    "check_site",
    "chunks",
    "halving",
    "position_index",
    "position_labels",
    "position_map_prompts",
    "row_groups",
    "run_metric",
    "specs_frame",
    "sweep",
    "sweep_meta",
    "sweep_specs",
]

# The sites a sweep patches, by name (the engine's site table, :data:`lsa.engine.SITES`, holds every site):
# the residual stream before, between and after the sublayers, the sublayers' writes, one head's output
# (its slice of the attention output projection's input), one neuron (the MLP output projection's input).
SITES = {
    name: engine.SITES[name]
    for name in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head", "neuron")
}
DIRECTIONS = ("noising", "denoising")
Metric = Callable[[torch.Tensor, PromptSet], torch.Tensor]
DEFAULT_MAX_TOKENS = {"cpu": 1024, "cuda": 16384}  # rows x positions per expanded forward (CPU: small is faster)
# What a cached start needs from the base run at a layer for its attention to skip queries, keys and values
# (:class:`lsa.engine.AttnCache`): the attention module's output, o_proj's input and output.
ATTN_CACHE = ("attn_full", "head", "attn_proj")


# ============================================================== checks
def check_site(model, site: str) -> str:
    """``site`` must be one a sweep patches (:data:`SITES`) and exist in this model."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; sites: {', '.join(SITES)}")
    engine.plan.check_defined(model, site)
    return site


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}")
    return direction


def check_prompts(prompts: PromptSet, model) -> None:
    """Clean and counterfactual prompts must pair up token for token, built with the model's tokenizer."""
    check_tokenizer(prompts, model.tokenizer, model.name)
    if prompts.clean.shape != prompts.corrupt.shape:
        raise ValueError(
            f"clean prompts {tuple(prompts.clean.shape)} and counterfactual prompts "
            f"{tuple(prompts.corrupt.shape)} have different shapes; patching needs equal-length pairs"
        )
    if len(prompts) == 0:
        raise ValueError("the prompt set is empty")


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


# ============================================================== results
@dataclass
class PatchResult:
    """The outcome of a sweep (activation, path or attribution patching, an ablation sweep).

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
    pos: str | int | None = None  # None = every position; int = absolute; str = a named position


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


def _mask(specs: Sequence[_Spec], prompts: PromptSet, n_units: int, device) -> torch.Tensor:
    """``[len(specs) * n, pos, n_units]`` (bool): where each spec patches, replica-major (one replica per spec)."""
    n, width = prompts.clean.shape
    mask = torch.zeros(len(specs) * n, width, n_units, dtype=torch.bool, device=device)
    rows = torch.arange(n, device=device)
    for j, spec in enumerate(specs):
        unit = slice(None) if spec.unit is None else spec.unit
        pos = position_index(prompts, spec.pos)
        if pos is None:
            mask[j * n : (j + 1) * n, :, unit] = True
        else:
            mask[j * n + rows, pos.to(device), unit] = True
    return mask


def _layers(model, layers) -> list[int]:
    if layers is None:
        return list(range(model.adapter.n_layers))
    layers = [layers] if isinstance(layers, int) else list(layers)
    for layer in layers:
        model.adapter.check_layer(layer)
    return layers


def _units(model, site: str, heads, neurons) -> list[int | None]:
    """The units a sweep of ``site`` patches one at a time (``[None]``: the whole site)."""
    a = model.adapter
    if site not in ("head", "neuron"):
        if heads is not None or neurons is not None:
            raise ValueError(f"site {site!r} has no heads or neurons; use site='head' or site='neuron'")
        return [None]
    chosen, n, check = (heads, a.n_heads, a.check_head) if site == "head" else (neurons, a.d_mlp, a.check_neuron)
    chosen = list(range(n)) if chosen is None else [chosen] if isinstance(chosen, int) else list(chosen)
    for unit in chosen:
        check(unit)
    return chosen


def _positions(prompts: PromptSet, positions) -> list:
    """``None`` -> [None] (all at once); ``"each"`` -> every position; a list of ints / names."""
    if positions is None:
        return [None]
    if positions == "all":
        raise ValueError(
            "every position at once is positions=None (lsa has one value for it); 'each' maps them one by one"
        )
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
    model, prompts: PromptSet, site: str, *, layers=None, heads=None, neurons=None, positions=None
) -> tuple[list[_Spec], tuple[str, ...], dict[str, list]]:
    """The interventions of a sweep plus its grid (dims and axis labels)."""
    check_site(model, site)
    layer_list = _layers(model, layers)
    pos_list = _positions(prompts, positions)
    unit_list = _units(model, site, heads, neurons)
    specs = [_Spec(site, layer, unit, p) for layer in layer_list for unit in unit_list for p in pos_list]
    dims, axes = ("layer",), {"layer": layer_list}
    if site in ("head", "neuron"):
        dims, axes = ("layer", site), {"layer": layer_list, site: unit_list}
    if pos_list != [None]:
        dims, axes = (*dims, "pos"), {**axes, "pos": pos_list}
    return specs, dims, axes


def specs_frame(specs: Sequence[_Spec], dims: tuple[str, ...]) -> pd.DataFrame:
    """One row per intervention: ``site``, ``layer`` and, where the grid has them, ``head`` / ``neuron`` / ``pos``."""
    rows = []
    for s in specs:
        row = {"site": s.site, "layer": s.layer}
        for dim in ("head", "neuron"):
            if dim in dims:
                row[dim] = s.unit
        if "pos" in dims:
            row["pos"] = s.pos
        rows.append(row)
    return pd.DataFrame(rows)


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
    a name stays its name; ``None`` (every position) is ``"all"``. Without a
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


def sweep_meta(model, prompts: PromptSet, site: str, axes: dict, n_given: int) -> dict:
    """A sweep's ``meta``: its site, and with a position axis the token labels and the prompts it rests on."""
    meta = {"site": site}
    if "pos" in axes:
        tokenizer = getattr(model, "tokenizer", None)
        meta["pos_labels"] = position_labels(prompts, tokenizer, axes["pos"])
        meta["n_prompts"], meta["n_given"] = len(prompts), n_given
    return meta


# ============================================================== chunks
@dataclass(frozen=True)
class Chunking:
    """How a sweep batches its interventions: ``batch_size`` interventions per forward, or (default) as many as
    fit ``max_tokens`` rows x positions (default :func:`auto_max_tokens`); ``progress``: a progress bar.

    Sweeps take these as keywords (``activation_patching(..., batch_size=8, progress=False)``).
    """

    batch_size: int | None = None
    max_tokens: int | None = None
    progress: bool = True

    def size(self, model, prompts: PromptSet, tokens: int | None = None) -> int:
        """Interventions per expanded forward. ``tokens``: the positions one intervention recomputes over all
        prompts (default: every position of every prompt; fewer where the base run's keys and values spare the rest).
        """
        if self.batch_size is not None:
            if self.batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
            return self.batch_size
        width = prompts.clean.shape[1]
        budget = auto_max_tokens(model, width) if self.max_tokens is None else self.max_tokens
        return max(1, budget // (tokens or len(prompts) * width))

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def auto_max_tokens(model, width: int) -> int:
    """Rows x positions per expanded forward for this model.

    The executor's own budget where it has one (:class:`lsa.engine.Capabilities`: a remote GPU's).
    CPU: :data:`DEFAULT_MAX_TOKENS` (on one CPU thread batching gains nothing and big batches
    leave the cache). CUDA: half of the free memory over an estimate of one token's live
    activations in a block (residual copies, MLP hidden, eager attention scores over ``width``
    keys); a chunk that still runs out of memory is split in two and retried (:func:`halving`).
    """
    preferred = engine.capabilities(model).max_tokens
    if preferred is not None:
        return preferred
    device = model.device
    if device.type != "cuda":
        return DEFAULT_MAX_TOKENS.get(device.type, DEFAULT_MAX_TOKENS["cpu"])
    free, _ = torch.cuda.mem_get_info(device)
    a = model.adapter
    size = next(model.hf.parameters()).element_size()
    per_token = size * (8 * a.d_model + 2 * a.d_mlp + 3 * a.n_heads * width)
    return max(width, int(0.5 * free / per_token))


def halving(run: Callable[[list[int]], None], chunk: list[int]) -> None:
    """``run(chunk)``; on an out-of-memory error split the chunk in two and run the halves."""
    try:
        run(chunk)
    except torch.OutOfMemoryError:
        if len(chunk) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(chunk) // 2
        halving(run, chunk[:half])
        halving(run, chunk[half:])


# ============================================================== unpatched runs
def base_donor_tokens(model, prompts: PromptSet, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(base tokens, donor tokens)``: the run that is patched and the run patched from (noising: clean, counterfactual)."""
    clean, corrupt = prompts.clean.to(model.device), prompts.corrupt.to(model.device)
    return (clean, corrupt) if direction == "noising" else (corrupt, clean)


@torch.no_grad()
def baseline(
    model,
    prompts: PromptSet,
    tokens: torch.Tensor,
    sites: Iterable[tuple[str, int]] = (),
    attn_layers: Iterable[int] = (),
    keep_cache: bool = False,
) -> engine.Run:
    """Unpatched run: end logits ``[n, d_vocab]`` plus the read sites, and what later runs start from.

    Where the executor can start at a block (:func:`lsa.engine.can`), every block input
    (``resid_pre``) and, at ``attn_layers``, the attention output and the output projection's input
    and output (:data:`ATTN_CACHE`); with ``keep_cache`` where it can reuse them, every layer's keys
    and values (``Run.cache``), so that runs patching later positions recompute those alone.
    """
    reads = set(sites)
    if engine.can(model, "start"):
        reads |= {("resid_pre", layer) for layer in range(model.adapter.n_layers)}
        reads |= {(key, layer) for layer in attn_layers for key in ATTN_CACHE}
    keep = keep_cache and engine.can(model, "reuse_cache")
    plan = Plan(reads=[Read(*key) for key in sorted(reads)], end=prompts.end, keep_cache=keep)
    return engine.run(model, tokens, plan)


def cached_start(base: engine.Run, layer: int, attn: bool = False, first: int | torch.Tensor = 0) -> Start | None:
    """A start at ``layer`` from the base run (``None`` where its block input was not read).

    ``attn``: also reuse the layer's attention (valid when nothing before the heads' outputs changes);
    ``first``: the first position recomputed (an int, or one per row of the run), where the base run
    kept its keys and values.
    """
    hidden = base.values.get(("resid_pre", layer))
    if hidden is None:
        return None
    cached = None
    if attn and all((key, layer) in base.values for key in ATTN_CACHE):
        cached = AttnCache(*(base.values[(key, layer)] for key in ATTN_CACHE))
    if base.cache is None:
        return Start(layer, hidden, cached)
    return Start(layer, hidden, cached, first, base.cache)


def row_groups(prompts: PromptSet, first: torch.Tensor | None) -> list[tuple[torch.Tensor | None, int]]:
    """Rows that share their first patched position ``first`` ``[n]`` (clipped to each row's end), with it.

    ``[(None, 0)]`` (every row, every position recomputed) when ``first`` is None.
    """
    if first is None:
        return [(None, 0)]
    first = torch.minimum(first.cpu(), prompts.end.cpu())
    return [((first == p).nonzero().flatten(), int(p)) for p in first.unique().tolist()]


# ============================================================== the template
Donor = Callable[[PromptSet, set, torch.Tensor], tuple[dict, torch.Tensor]]


@torch.no_grad()
def sweep(model, prompts: PromptSet, site: str, select: dict, *, donor: Donor, direction, metric, method, chunking):
    """Patch each component of ``select`` from the donor's values, one at a time: activation patching and ablation.

    1) the interventions and their grid (:func:`sweep_specs` of ``select``: ``layers``, ``heads``,
       ``neurons``, ``positions``; ``positions="each"`` on :func:`position_map_prompts`);
    2) the base run (clean for noising), keeping what the patched runs start from;
    3) the donor's values: ``donor(prompts, sites, donor tokens) -> (values {(site, layer): [n, pos, ...]},
       the donor run's end logits)``: the counterfactual run's activations (activation patching) or an
       ablation's values;
    4) every intervention on the base run (:class:`_Interventions`);
    5) a :class:`PatchResult` (``clean`` / ``corrupt`` from the base and donor runs by ``direction``).
    """
    check_prompts(prompts, model)
    check_direction(direction)
    metric = metric or lsa_metrics.logit_diff
    n_given = len(prompts)
    if select.get("positions") == "each":
        prompts = position_map_prompts(prompts)
    specs, dims, axes = sweep_specs(model, prompts, site, **select)
    base_tokens, donor_tokens = base_donor_tokens(model, prompts, direction)
    attn_layers = {s.layer for s in specs if s.site != "resid_pre"}
    base = baseline(model, prompts, base_tokens, attn_layers=attn_layers, keep_cache=True)
    values, donor_logits = donor(prompts, {(s.site, s.layer) for s in specs}, donor_tokens)
    base_metric = run_metric(metric, base.logits, prompts).cpu()
    donor_metric = run_metric(metric, donor_logits, prompts).cpu()
    clean, corrupt = (base_metric, donor_metric) if direction == "noising" else (donor_metric, base_metric)
    each = _Interventions(model, prompts, base, base_tokens, metric, chunking)
    return PatchResult(
        components=specs_frame(specs, dims),
        patched=each.run(specs, values, f"{method} {site}"),
        clean=clean,
        corrupt=corrupt,
        dims=dims,
        axes=axes,
        direction=direction,
        method=method,
        meta=sweep_meta(model, prompts, site, axes, n_given),
    )


class _Interventions:
    """Step 4 of :func:`sweep`: each spec's site set to the donor's values on the base run, batched by layer.

    A chunk holds specs of one layer, site and position: the base batch expanded by one replica per
    spec, started at the layer from the base run (for sites after the attention, its attention too).
    Where the base run kept its keys and values, the prompts whose patched position is ``p`` run
    together from ``p`` to their last end; specs at the end (or after it) run each prompt's end
    alone, every prompt in one forward.
    """

    def __init__(self, model, prompts: PromptSet, base: engine.Run, tokens: torch.Tensor, metric, chunking: Chunking):
        self.model, self.prompts, self.base, self.tokens, self.metric = model, prompts, base, tokens, metric
        self.chunking = chunking
        self.columns, self.scored = lsa_metrics.answer_columns(metric, prompts)  # vocabulary ids patched runs compute

    def run(self, specs: Sequence[_Spec], values: dict, desc: str) -> torch.Tensor:
        """Metric ``[len(specs), n]`` with each spec's site set to ``values``."""
        self.specs, self.values = specs, values
        self.out = torch.empty(len(specs), len(self.prompts))
        self.bar = self.chunking.bar(len(specs), desc)
        for chunk, first in self._chunks():
            halving(lambda c, first=first: self._chunk(c, first), chunk)
        self.bar.close()
        return self.out

    def _chunks(self) -> list[tuple[list[int], torch.Tensor | None]]:
        prompts, reuse = self.prompts, self.base.cache is not None
        order: dict[tuple[int, str, str], list[int]] = {}
        for i, spec in enumerate(self.specs):  # with keys and values to reuse, a chunk patches one position (name)
            order.setdefault((spec.layer, spec.site, repr(spec.pos) if reuse else ""), []).append(i)
        out = []
        for key in sorted(order):
            first = position_index(prompts, self.specs[order[key][0]].pos) if key[2] else None
            recomputed = None if first is None else int((prompts.lengths - torch.minimum(first, prompts.end)).sum())
            size = self.chunking.size(self.model, prompts, recomputed)
            out += [(chunk, first) for chunk in chunks(order[key], size)]
        return out

    def _chunk(self, chunk: list[int], first: torch.Tensor | None) -> None:
        model, prompts = self.model, self.prompts
        specs = [self.specs[i] for i in chunk]
        site, layer, m, n = specs[0].site, specs[0].layer, len(chunk), len(prompts)
        mask = _mask(specs, prompts, engine.units(model, site)[0], model.device)  # [m * n, pos, units]
        if ("resid_pre", layer) not in self.base.values:
            first = None
        if first is not None and bool((first.cpu() >= prompts.end.cpu()).all()):
            groups = [(None, prompts.end.cpu())]  # the ends alone: every prompt in one forward, at its own end
        else:  # rows that share their first patched position run together, from it to their last end
            groups = row_groups(prompts, first)
        for rows, p in groups:
            sub = self.scored if rows is None else self.scored.subset(rows)
            r, width = len(sub), sub.clean.shape[1]
            index = torch.arange(m * n) if rows is None else (torch.arange(m)[:, None] * n + rows[None, :]).flatten()
            at = p.repeat(m).to(model.device) if isinstance(p, torch.Tensor) else p
            plan = Plan(
                edits=[Patch(site, layer, self.values[(site, layer)], mask[index.to(mask.device)])],
                start=cached_start(self.base, layer, site != "resid_pre", at),
                rows=rows,
                end=sub.end.repeat(m).to(model.device),
                columns=self.columns,
            )
            take = slice(None) if rows is None else rows.to(self.tokens.device)
            logits = engine.run(model, self.tokens[take, :width].repeat(m, 1), plan).logits
            for j, i in enumerate(chunk):
                self.out[i, slice(None) if rows is None else rows] = run_metric(
                    self.metric, logits[j * r : (j + 1) * r], sub
                ).cpu()
        self.bar.update(m)
