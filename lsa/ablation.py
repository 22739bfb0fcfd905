"""Ablation: knock components out (zero, mean or resample) and measure what is left.

Components are plain tuples: ``("head", layer, head)``, ``("mlp", layer)``,
``("neuron", layer, index)``. A head is ablated by overwriting its slice of the
attention output projection's input, an MLP by overwriting the MLP output
projection's output, a neuron by overwriting its entry of that projection's input.

Methods:
- ``"zero"``: zeros;
- ``"mean"``: the mean over a reference set (default: the prompts' own
  counterfactuals, the IOI paper's "ABC" distribution), per position over the
  reference prompts that reach it (``per_position=False``: over all real tokens);
  positions no reference prompt reaches get the all-token mean;
- ``"resample"``: each prompt gets the activation of one reference prompt at the
  same position (a random one per prompt, or ``index``).

Circuit faithfulness (Wang et al. 2022) = the metric with everything outside the
circuit ablated, relative to the full model: ``faithfulness = F(C) / F(M)`` and
``normalized = (F(C) - F(empty)) / (F(M) - F(empty))``.

Cost: one forward of the reference set (mean / resample) plus one forward per
ablation; :func:`ablation_sweep` batches one-component-at-a-time ablations like
:func:`lsa.patching.activation_patching`.

>>> ablate(model, prompts, [("head", 1, 2), ("mlp", 0)], method="zero")     # doctest: +SKIP
>>> faithfulness(model, prompts, [("head", 1, 2), ("head", 1, 3)]).frame   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd
import torch

from lsa import engine
from lsa import metrics as lsa_metrics
from lsa.engine import Edit, Plan, Read
from lsa.model import Model
from lsa.patching import (
    Metric,
    PatchResult,
    baseline,
    check_prompts,
    position_index,
    position_map_prompts,
    replace_units,
    run_metric,
    run_specs,
    specs_frame,
    sweep_meta,
    sweep_specs,
    units,
)
from lsa.tasks import PromptSet

__all__ = [
    "METHODS",
    "Faithfulness",
    "ablate",
    "ablation_sweep",
    "ablation_values",
    "complement",
    "faithfulness",
    "parse_components",
]

METHODS = ("zero", "mean", "resample")
KINDS = {"head": ("head", 3), "mlp": ("mlp_out", 2), "neuron": ("neuron", 3)}


def parse_components(model: Model, components: Iterable) -> list[tuple]:
    """Validate components: ``("head", layer, head)``, ``("mlp", layer)``, ``("neuron", layer, index)``.

    Objects with a ``kind`` / ``layer`` / ``index`` (or ``head`` / ``neuron``) attribute
    are read as the matching tuple.
    """
    out = []
    for comp in components:
        if not isinstance(comp, tuple):
            kind = getattr(comp, "kind", None)
            unit = getattr(comp, "index", getattr(comp, "head", getattr(comp, "neuron", None)))
            comp = (kind, comp.layer) if unit is None else (kind, comp.layer, unit)
        if not comp or comp[0] not in KINDS or len(comp) != KINDS[comp[0]][1]:
            raise ValueError(
                f"bad component {comp!r}: use ('head', layer, head), ('mlp', layer) or ('neuron', layer, index)"
            )
        kind, layer = comp[0], comp[1]
        if kind == "head":
            model.adapter.check_head(comp[2], layer)
        elif kind == "neuron":
            model.adapter.check_neuron(comp[2], layer)
        else:
            model.adapter.check_layer(layer)
        out.append(tuple(comp))
    return list(dict.fromkeys(out))


def _reference(prompts: PromptSet, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [m, pos], lengths [m])`` of the reference set."""
    if reference is None:
        return prompts.corrupt, prompts.lengths
    if isinstance(reference, PromptSet):
        return reference.clean, reference.lengths
    tokens = torch.as_tensor(reference)
    if tokens.ndim != 2:
        raise ValueError(f"reference tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    return tokens, torch.full((tokens.shape[0],), tokens.shape[1])


@torch.no_grad()
def ablation_values(
    model: Model,
    prompts: PromptSet,
    sites: Iterable[tuple[str, int]],
    method: str = "mean",
    *,
    reference=None,
    per_position: bool = True,
    index: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[tuple[str, int], torch.Tensor]:
    """Replacement activations ``[n, pos, width]`` per ``(site, layer)``, aligned with ``prompts.clean``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    sites = sorted(set(sites))
    n, width = prompts.clean.shape
    dev = model.device
    if method == "zero":
        widths = {s: units(model, s[0]) for s in sites}
        return {s: torch.zeros(n, width, u * w, device=dev) for s, (u, w) in widths.items()}
    tokens, lengths = _reference(prompts, reference)
    tokens, lengths = tokens.to(dev), lengths.to(dev)
    acts = engine.run(model, tokens, Plan(reads=[Read(*s) for s in sites], logits=None)).values
    m, ref_width = tokens.shape
    real = torch.arange(ref_width, device=dev)[None, :] < lengths[:, None]  # [m, pos]
    out = {}
    for s in sites:
        a = acts[s].float()
        overall = (a * real[..., None]).sum((0, 1)) / real.sum()  # [width]
        if method == "mean":
            if per_position:
                count = real.sum(0)  # [pos]
                per_pos = (a * real[..., None]).sum(0) / count.clamp(min=1)[:, None]
                per_pos = torch.where((count > 0)[:, None], per_pos, overall)
                value = overall.expand(width, -1).clone()
                keep = min(width, ref_width)
                value[:keep] = per_pos[:keep]
            else:
                value = overall.expand(width, -1)
            out[s] = value.expand(n, -1, -1).to(acts[s].dtype)
        else:
            if index is None:
                g = torch.Generator().manual_seed(seed)
                idx = torch.randint(m, (n,), generator=g)
            else:
                idx = torch.as_tensor(index)
                if idx.shape != (n,) or idx.min() < 0 or idx.max() >= m:
                    raise ValueError(f"index must be [n={n}] reference rows in 0..{m - 1}")
            value = overall.expand(n, width, -1).clone()
            keep = min(width, ref_width)
            value[:, :keep] = a[idx.to(dev), :keep]
            out[s] = value.to(acts[s].dtype)
    return out


def _edits(
    model: Model, prompts: PromptSet, targets: dict[tuple[str, int], list[int] | None], values, where=None
) -> list[Edit]:
    """Edits putting ``values`` into the listed units (None = the whole site) of each site.

    ``where``: one position per prompt ``[n]`` (default: every position).
    """
    n, width = prompts.clean.shape
    rows = torch.ones(n, width, dtype=torch.bool, device=model.device)
    if where is not None:
        rows = torch.arange(width, device=model.device)[None, :] == where.to(model.device)[:, None]
    edits = []
    for (site, layer), units_sel in targets.items():
        n_units, w = units(model, site)
        mask = torch.zeros(n, width, n_units, dtype=torch.bool, device=model.device)
        if units_sel is None:
            mask[rows] = True
        else:
            mask[..., units_sel] = rows[..., None]
        edits.append(Edit(site, layer, replace_units(mask, values[(site, layer)], n_units, w)))
    return edits


def _targets(components: list[tuple]) -> dict[tuple[str, int], list[int] | None]:
    targets: dict[tuple[str, int], list[int] | None] = {}
    for comp in components:
        site = KINDS[comp[0]][0]
        if comp[0] == "mlp":
            targets[(site, comp[1])] = None
        else:
            targets.setdefault((site, comp[1]), []).append(comp[2])
    return targets


@torch.no_grad()
def ablate(
    model: Model,
    prompts: PromptSet,
    components: Iterable,
    *,
    method: str = "mean",
    reference=None,
    metric: Metric | None = None,
    per_position: bool = True,
    index: torch.Tensor | None = None,
    seed: int = 0,
    positions: str | int | None = None,
) -> torch.Tensor:
    """The metric ``[n]`` on the clean prompts with ``components`` ablated together.

    ``positions``: ablate at one position only, a name of ``prompts.positions``, ``"end"``
    or an absolute position (default: every position).
    """
    check_prompts(prompts, model)
    metric = metric or lsa_metrics.logit_diff
    components = parse_components(model, components)
    targets = _targets(components)
    values = ablation_values(
        model, prompts, targets, method, reference=reference, per_position=per_position, index=index, seed=seed
    )
    edits = _edits(model, prompts, targets, values, position_index(prompts, positions))
    logits = engine.run(model, prompts.clean, Plan(edits=edits, end=prompts.end)).logits
    return run_metric(metric, logits, prompts).cpu()


@dataclass
class Faithfulness:
    """Metric per prompt ``[n]`` of the circuit alone (``circuit``), the full model and everything ablated."""

    circuit: torch.Tensor
    full: torch.Tensor
    empty: torch.Tensor
    method: str
    n_components: int

    @property
    def faithfulness(self) -> float:
        """``F(circuit) / F(full model)`` on mean metrics (1 = the circuit does it all)."""
        return float(self.circuit.mean() / self.full.mean())

    @property
    def normalized(self) -> float:
        """``(F(circuit) - F(empty)) / (F(full) - F(empty))`` on mean metrics."""
        return float((self.circuit.mean() - self.empty.mean()) / (self.full.mean() - self.empty.mean()))

    @property
    def frame(self) -> pd.DataFrame:
        """One summary row."""
        return pd.DataFrame(
            [
                {
                    "method": self.method,
                    "components": self.n_components,
                    "full": float(self.full.mean()),
                    "circuit": float(self.circuit.mean()),
                    "empty": float(self.empty.mean()),
                    "faithfulness": self.faithfulness,
                    "normalized": self.normalized,
                }
            ]
        )


def complement(model: Model, components: Iterable, kinds: Iterable[str] | None = None) -> list[tuple]:
    """Every component of ``kinds`` outside the set (neurons: the other neurons of a partly kept MLP).

    ``kinds`` defaults to heads, plus MLPs when the set names an MLP or neuron.
    """
    comps = parse_components(model, components)
    kinds = set(kinds) if kinds is not None else {"head"} | ({"mlp"} if any(c[0] != "head" for c in comps) else set())
    if not kinds <= {"head", "mlp"}:
        raise ValueError(f"kinds must be from 'head', 'mlp'; got {sorted(kinds)}")
    keep = set(comps)
    a = model.adapter
    out = []
    if "head" in kinds:
        out += [("head", la, h) for la in range(a.n_layers) for h in range(a.n_heads) if ("head", la, h) not in keep]
    if "mlp" in kinds:
        for layer in range(a.n_layers):
            if ("mlp", layer) in keep:
                continue
            kept = {c[2] for c in keep if c[0] == "neuron" and c[1] == layer}
            if kept:
                out += [("neuron", layer, i) for i in range(a.d_mlp) if i not in kept]
            else:
                out.append(("mlp", layer))
    return out


@torch.no_grad()
def faithfulness(
    model: Model,
    prompts: PromptSet,
    components: Iterable,
    *,
    method: str = "mean",
    reference=None,
    metric: Metric | None = None,
    kinds: Iterable[str] | None = None,
    per_position: bool = True,
    seed: int = 0,
) -> Faithfulness:
    """How much of the behaviour a set of components keeps with everything else ablated.

    ``kinds``: which component kinds outside the set are ablated (default: heads,
    plus MLPs when the set names an MLP or neuron; MLPs are otherwise left intact,
    as in the IOI paper).
    """
    check_prompts(prompts, model)
    metric = metric or lsa_metrics.logit_diff
    comps = parse_components(model, components)
    kinds = set(kinds) if kinds is not None else {"head"} | ({"mlp"} if any(c[0] != "head" for c in comps) else set())
    kw = dict(method=method, reference=reference, metric=metric, per_position=per_position, seed=seed)
    logits = engine.run(model, prompts.clean, Plan(end=prompts.end)).logits
    full = run_metric(metric, logits, prompts).cpu()
    outside = complement(model, comps, kinds)
    circuit = ablate(model, prompts, outside, **kw) if outside else full.clone()
    empty = ablate(model, prompts, complement(model, [], kinds), **kw)
    return Faithfulness(circuit=circuit, full=full, empty=empty, method=method, n_components=len(comps))


@torch.no_grad()
def ablation_sweep(
    model: Model,
    prompts: PromptSet,
    site: str = "head",
    *,
    method: str = "mean",
    reference=None,
    layers=None,
    heads=None,
    neurons=None,
    metric: Metric | None = None,
    per_position: bool = True,
    seed: int = 0,
    positions=None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    reuse_prefix: bool = True,
) -> PatchResult:
    """Ablate one component at a time (``site`` ``"head"``, ``"mlp_out"`` or ``"neuron"``), batched.

    ``positions`` and ``reuse_prefix`` as in :func:`lsa.patching.activation_patching`: an
    ablation at a position ``p`` recomputes positions ``>= p`` alone (exact: nothing
    before ``p`` changes). Returns a :class:`lsa.patching.PatchResult` on the clean prompts
    (``corrupt`` holds the counterfactual run's metric, so ``normalized`` reads as in patching).
    """
    check_prompts(prompts, model)
    if site not in ("head", "mlp_out", "neuron"):
        raise ValueError(f"ablation_sweep ablates 'head', 'mlp_out' or 'neuron', got {site!r}")
    metric = metric or lsa_metrics.logit_diff
    n_given = len(prompts)
    if positions == "each":
        prompts = position_map_prompts(prompts)
    specs, dims, axes = sweep_specs(
        model, prompts, site, layers=layers, heads=heads, neurons=neurons, positions=positions
    )
    sites = {(s.site, s.layer) for s in specs}
    values = ablation_values(model, prompts, sites, method, reference=reference, per_position=per_position, seed=seed)
    tokens = prompts.clean.to(model.device)
    base = baseline(model, prompts, tokens, attn_layers={s.layer for s in specs}, kv=reuse_prefix)
    logits, cache = base.logits, base.values
    corrupt_logits = engine.run(model, prompts.corrupt, Plan(end=prompts.end)).logits
    patched = run_specs(
        model,
        prompts,
        specs,
        values,
        tokens,
        cache,
        metric=metric,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        desc=f"{method}-ablating {site}",
        base_kv=base.kv,
    )
    return PatchResult(
        components=specs_frame(specs, dims),
        patched=patched,
        clean=run_metric(metric, logits, prompts).cpu(),
        corrupt=run_metric(metric, corrupt_logits, prompts).cpu(),
        dims=dims,
        axes=axes,
        direction="noising",
        method=f"{method} ablation",
        meta=sweep_meta(model, prompts, site, axes, n_given),
    )
