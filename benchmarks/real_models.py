"""Benchmark: lsa's patching on a real model (SmolLM2-135M, Gemma 3 270M), with ratios measured in one run.

Model: ``--model`` (default ``smollm2-135m``, 30 layers x 9 heads; ``gemma-3-270m``,
18 layers x 4 heads, 262k vocabulary) on ``--device`` in ``--dtype``; prompts:
``--n`` English IOI prompts (``lsa.tasks.build("ioi", "en", ...)``), metric = mean
logit difference (IO - S) at the end position, noising (clean run, counterfactual
activations). The swept heads are every head of the last ``--layers`` layers (8:
the setting of issue 16's end-only measurement; ``--layers 99``: all, the setting of
its hooked-loop and TransformerLens targets: lsa skips the layers before the first
swept one and the loops do not, so fewer layers flatter lsa's ratios to them). Wall
times on a shared machine are noisy: the ratios of times taken in the same run are
what this reports, each as wall | process CPU time (one thread: CPU time does not
count waiting for a core that other jobs hold; on a GPU read the wall column).

1. All-position head sweep: ``lsa.patching.activation_patching(model, prompts, "head",
   layers=...)`` vs
   (a) the hooked loop: one plain forward of the Hugging Face model per head, a torch
       forward pre-hook on the layer's ``o_proj`` replacing that head's slice of its
       input by the counterfactual run's (end-position logits only, as lsa computes);
   (b) TransformerLens 4.3 (``transformer_lens_patch`` of ``benchmarks/patching.py``:
       its ``generic_activation_patch`` on ``hook_z``, a ``TransformerBridge`` booted
       offline around a copy of the model; CPU only, skipped with the reason when
       ``transformer_lens`` is not importable);
   (c) the nnsight loop (``naive_nnsight`` of ``benchmarks/patching.py``: one trace per
       head, full logits).
   Every column's per-head mean metric is checked against lsa's (max |difference|).
2. End-only vs all-position: the same sweep with ``positions=["end"]``, timed the old
   way (every position recomputed, ``lsa.engine.without("reuse_cache")``, and the whole vocabulary unembedded in
   every patched run: ``full_vocabulary``, the metric without its mark), with the whole
   vocabulary alone, and by default (two columns of the unembedding), and checked against the hooked loop patching the end
   position alone. Target: end-only <= 0.2 x all-position.
3. Path patching to the logits (``lsa.patching.path_patching(model, prompts, senders=
   the swept heads, receivers="logits")``) vs the activation sweep of the same heads;
   with ``lsa.engine.without("skip_attention")`` (frozen heads' attention recomputed) and the whole
   vocabulary as well where ``path_patching`` has that keyword.
4. ``--discovery``: path-patching discovery (``lsa.circuits.path_patching_discovery(model,
   prompts, k=1.5, floor=0.05, max_steps=3)`` on ``build_sets("ioi", "en", ...,
   n=100, seed=0)``; ``--discovery-n``, ``--max-steps``). Minutes on a CPU. Timed the
   old way (``positions="all"``: senders at every position, and path patching with
   ``without("reuse_cache", "skip_attention")``, the whole vocabulary, its own two
   unpatched runs in every call, and one call per receiver input) and with the defaults;
   target: after <= 1/4 before.

5. ``--edges``: edge attribution with integrated gradients over every edge of the residual graph
   (``lsa.attribution.edge_attribution(model, prompts, method="eap-ig", steps=5)``) vs path-patching
   discovery (defaults) on the same ``--edges-n`` prompts (64): their wall and CPU times and ratio.

A markdown summary of the ratios and issue 16's targets ends the output.

    .venv/bin/python benchmarks/real_models.py [--model gemma-3-270m] [--layers 8] [--n 16] [--threads 1]
    .venv/bin/python benchmarks/real_models.py --layers 2 --n 8            # a quick check
    .venv/bin/python benchmarks/real_models.py --discovery [--discovery-n 100] [--max-steps 3]
    .venv/bin/python benchmarks/real_models.py --model gemma-3-270m --edges [--edges-n 64]
    .venv/bin/python benchmarks/real_models.py --device cuda --dtype bfloat16   # the GPU variant
    /path/to/venv-with-transformer-lens/bin/python benchmarks/real_models.py   # with column (b)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import inspect
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import lsa  # noqa: E402
from benchmarks.patching import naive_nnsight, now, transformer_lens_patch  # noqa: E402
from lsa import circuits, patching  # noqa: E402
from lsa.metrics import logit_diff  # noqa: E402
from lsa.patching import activation_patching, path_patching  # noqa: E402

# notebooks/01_ioi_circuit.ipynb's parameters for its discovery
NOTEBOOK_01 = {"n_prompts": 100, "seed": 0, "k": 1.5, "floor": 0.05, "max_steps": 3}
# the shortcuts whose absence is the old way (every position recomputed, frozen heads' attention recomputed),
# with the keywords older lsa took for them; discovery's old way: senders patched at every position, through
# path patching's old way
OLD_WAY = {"reuse_cache": "reuse_prefix", "skip_attention": "freeze_attention"}
# ... and each of discovery's path-patching calls runs its own two unpatched runs
OLD_SHARING = {"unpatched": None}
OLD_DISCOVERY = {"positions": "all"}


def full_vocabulary(logits, prompts):
    """``logit_diff`` without its mark (``lsa.metrics.reads_answer_columns``): a sweep given it unembeds the
    whole vocabulary in every patched run, the old way."""
    return logit_diff(logits, prompts)


def switches(fn, wanted: dict) -> dict:
    """The entries of ``wanted`` that ``fn`` takes as keywords (those this lsa has)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in wanted.items() if k in params}


def the_old_way(fn, *shortcuts: str):
    """``fn`` without lsa's ``shortcuts`` (keys of :data:`OLD_WAY`): inside ``lsa.engine.without`` where this lsa has
    it, else with the older keywords set to False; ``None`` where it has neither."""
    if hasattr(lsa.engine, "without"):

        def old(*args, **kwargs):
            with lsa.engine.without(*shortcuts):
                return fn(*args, **kwargs)

        return old
    keywords = switches(fn, {OLD_WAY[s]: False for s in shortcuts})
    return functools.partial(fn, **keywords) if len(keywords) == len(shortcuts) else None


def clocked(fn, device: torch.device):
    """``(fn(), [wall s, CPU s])``, CUDA synchronised before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = now()
    out = fn()
    sync()
    return out, now() - t


def head_means(result) -> dict[tuple[int, int], float]:
    """``{(layer, head): mean patched metric}`` of a head sweep."""
    rows = result.components.to_dict("records")
    return {(r["layer"], r["head"]): float(v) for r, v in zip(rows, result.patched.mean(1))}


def max_diff(a: dict, b: dict) -> float:
    return max(abs(a[h] - b[h]) for h in b)


@torch.no_grad()
def hooked_loop(model, prompts, heads, *, end_only: bool = False) -> dict[tuple[int, int], float]:
    """One plain forward per head, noising: a forward pre-hook on the layer's ``o_proj`` replaces the head's
    slice of its input by the counterfactual run's (at every position, or at each prompt's end alone).

    Unembeds the end positions alone (``logits_to_keep``), as lsa's sweeps do. Also runs the counterfactual
    forward that caches the ``o_proj`` inputs, and the clean forward (its metric), as a sweep needs both.
    """
    device = model.device
    clean, corrupt = prompts.clean.to(device), prompts.corrupt.to(device)
    rows = torch.arange(len(prompts), device=device)
    end = prompts.end.to(device)
    keep = end.unique()  # the positions whose logits are computed (sorted)
    col = torch.searchsorted(keep, end)
    d = model.adapter.d_head

    def metric(tokens: torch.Tensor) -> float:
        logits = model.hf(tokens, logits_to_keep=keep).logits[rows, col]
        return float(logit_diff(logits, prompts).mean())

    donor: dict[int, torch.Tensor] = {}
    handles = [
        model.module("o_proj", layer).register_forward_pre_hook(
            lambda module, args, layer=layer: donor.__setitem__(layer, args[0])
        )
        for layer in sorted({layer for layer, _ in heads})
    ]
    try:
        metric(corrupt)
    finally:
        for h in handles:
            h.remove()
    metric(clean)

    out = {}
    for layer, head in heads:
        cols = slice(head * d, (head + 1) * d)

        def patch(module, args, layer=layer, cols=cols):
            x = args[0].clone()
            if end_only:
                x[rows, end, cols] = donor[layer][rows, end, cols]
            else:
                x[..., cols] = donor[layer][..., cols]
            return (x, *args[1:])

        handle = model.module("o_proj", layer).register_forward_pre_hook(patch)
        try:
            out[(layer, head)] = metric(clean)
        finally:
            handle.remove()
    return out


def tl_unavailable(device: torch.device) -> str | None:
    """Why the TransformerLens column cannot run here (None when it can)."""
    if importlib.util.find_spec("transformer_lens") is None:
        return f"transformer_lens is not installed in this Python ({sys.executable})"
    if device.type != "cpu":
        return "benchmarks/patching.py's transformer_lens_patch boots its bridge on the CPU"
    return None


def on_device(prompts, device: torch.device):
    """The prompts with their token ids on ``device`` (for the nnsight loop's traces)."""
    return dataclasses.replace(prompts, clean=prompts.clean.to(device), corrupt=prompts.corrupt.to(device))


def row(name: str, t: torch.Tensor, note: str = "") -> torch.Tensor:
    """Print one timed method (and return its time)."""
    print(f"  {name:<44} {t[0]:8.2f} s wall {t[1]:8.2f} s CPU  {note}", flush=True)
    return t


def fmt_ratio(r: torch.Tensor) -> str:
    return f"{r[0]:.3f} | {r[1]:.3f}"


def verdict(r: torch.Tensor, target: float, strict: bool = False, sep: str = " | ") -> str:
    ok = [(x < target) if strict else (x <= target) for x in r.tolist()]
    return sep.join("PASS" if o else "FAIL" for o in ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="zoo / pretrained short name, id or path")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, ...")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8, help="sweep the heads of the last K layers")
    parser.add_argument("--n", type=int, default=16, help="IOI prompts for sections 1-3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-tl", action="store_true", help="skip column (b), TransformerLens")
    parser.add_argument("--skip-nnsight", action="store_true", help="skip column (c), the nnsight loop")
    parser.add_argument("--discovery", action="store_true", help="also time notebook 01's discovery (minutes)")
    parser.add_argument("--discovery-n", type=int, default=NOTEBOOK_01["n_prompts"])
    parser.add_argument("--max-steps", type=int, default=NOTEBOOK_01["max_steps"])
    parser.add_argument(
        "--edges", action="store_true", help="also time EAP-IG against path-patching discovery (minutes)"
    )
    parser.add_argument("--edges-n", type=int, default=64, help="IOI prompts for --edges")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(f"torch {torch.__version__}, threads: torch.get_num_threads() = {torch.get_num_threads()}")
    try:
        model = lsa.load_model(args.model, device=args.device, dtype=args.dtype)
    except (OSError, ValueError) as err:  # a real model not installed here (`make models`)
        print(f"skipped: cannot load {args.model!r}: {type(err).__name__}: {err}")
        return
    device, a = model.device, model.adapter
    layers = list(range(max(0, a.n_layers - args.layers), a.n_layers))
    heads = [(layer, h) for layer in layers for h in range(a.n_heads)]
    prompts = lsa.tasks.build("ioi", "en", model.tokenizer, n=args.n, seed=args.seed)
    print(
        f"model: {args.model} ({a.n_layers} layers x {a.n_heads} heads, d_model {a.d_model}, vocab {a.d_vocab}) "
        f"on {device}, {next(model.hf.parameters()).dtype}; {len(prompts)} English IOI prompts of "
        f"{int(prompts.lengths.min())}-{int(prompts.lengths.max())} tokens; swept: layers {layers[0]}-{layers[-1]}, "
        f"{len(heads)} heads"
    )
    tol = 1e-3 if next(model.hf.parameters()).dtype == torch.float32 else 0.25
    reuse = the_old_way(activation_patching, "reuse_cache")
    freeze = the_old_way(path_patching, "skip_attention")

    # warm-up: one pass through each path on two prompts and one layer, so first-call costs are not timed
    few = prompts.subset(slice(0, 2))
    activation_patching(model, few, "head", layers=layers[-1:], progress=False)
    activation_patching(model, few, "head", layers=layers[-1:], positions=["end"], progress=False)
    path_patching(model, few, senders=[heads[-1]], progress=False)
    hooked_loop(model, few, heads[-1:])

    print("\n1. all-position head sweep")
    res, t_lsa = clocked(lambda: activation_patching(model, prompts, "head", layers=layers, progress=False), device)
    lsa_all = head_means(res)
    print(
        f"  metric: clean {float(res.clean.mean()):.3f}, counterfactual {float(res.corrupt.mean()):.3f}, patched "
        f"{min(lsa_all.values()):.3f} to {max(lsa_all.values()):.3f} over the swept heads"
    )
    row("lsa activation_patching", t_lsa)
    hooked, t_hooked = clocked(lambda: hooked_loop(model, prompts, heads), device)
    per_forward = t_hooked / (len(heads) + 2)
    row(
        "(a) hooked loop",
        t_hooked,
        f"max |diff| vs lsa {max_diff(hooked, lsa_all):.2e}; {per_forward[0]:.3f} s wall per forward",
    )
    t_tl = None
    why = "--skip-tl" if args.skip_tl else tl_unavailable(device)
    if why is None:
        try:
            (tl, t_tl_cache, t_tl_loop), _ = clocked(lambda: transformer_lens_patch(model, prompts, heads), device)
            t_tl = row("(b) TransformerLens 4.3", t_tl_cache + t_tl_loop, f"max |diff| {max_diff(tl, lsa_all):.2e}")
        except Exception as err:  # report why, keep the rest of the benchmark
            why = f"{type(err).__name__}: {err}"
    if t_tl is None:
        print(f"  (b) TransformerLens column skipped: {why}")
    t_nn = None
    if args.skip_nnsight:
        print("  (c) nnsight column skipped: --skip-nnsight")
    else:
        (nn_values, _), t_nn = clocked(lambda: naive_nnsight(model, on_device(prompts, device), heads), device)
        row("(c) nnsight loop", t_nn, f"max |diff| {max_diff(nn_values, lsa_all):.2e}")
    diffs = [max_diff(hooked, lsa_all)]
    diffs += [max_diff(tl, lsa_all)] if t_tl is not None else []
    diffs += [max_diff(nn_values, lsa_all)] if t_nn is not None else []
    print(f"  agree within {tol:g}: {'PASS' if max(diffs) <= tol else 'FAIL'}")
    fwd = t_lsa / per_forward
    print(f"  lsa's sweep costs {fwd[0]:.1f} | {fwd[1]:.1f} forward-equivalents for {len(heads)} interventions")

    print("\n2. end-only vs all-position (the all-position time is section 1's)")
    end_ref, t_end_hooked = clocked(lambda: hooked_loop(model, prompts, heads, end_only=True), device)
    row("(a) hooked loop, end only", t_end_hooked)
    t_end_old = None
    if reuse:
        res, t_end_old = clocked(
            lambda: reuse(
                model, prompts, "head", layers=layers, positions=["end"], progress=False, metric=full_vocabulary
            ),
            device,
        )
        row(
            "lsa end-only, no cache reuse, full vocab",
            t_end_old,
            f"max |diff| vs (a) {max_diff(end_ref, head_means(res)):.2e}",
        )
    else:
        print("  cache reuse cannot be turned off in this lsa")
    res, t_end_vocab = clocked(
        lambda: activation_patching(
            model, prompts, "head", layers=layers, positions=["end"], progress=False, metric=full_vocabulary
        ),
        device,
    )
    row("lsa end-only, full vocabulary", t_end_vocab, f"max |diff| vs (a) {max_diff(end_ref, head_means(res)):.2e}")
    res, t_end = clocked(
        lambda: activation_patching(model, prompts, "head", layers=layers, positions=["end"], progress=False), device
    )
    d_end = max_diff(end_ref, head_means(res))
    row("lsa end-only (default)", t_end, f"max |diff| vs (a) {d_end:.2e}")
    print(f"  agree within {tol:g}: {'PASS' if d_end <= tol else 'FAIL'}")
    r_end = t_end / t_lsa
    print(f"  end-only / all-position = {fmt_ratio(r_end)}  [target <= 0.2: {verdict(r_end, 0.2)}]")

    print("\n3. path patching to the logits vs activation patching (the activation time is section 1's)")
    _, t_path = clocked(
        lambda: path_patching(model, prompts, senders=heads, receivers="logits", progress=False), device
    )
    row("lsa path_patching (default)", t_path, f"{fmt_ratio(t_path / t_lsa)} x activation sweep")
    t_path_old = None
    if freeze:
        _, t_path_old = clocked(
            lambda: freeze(model, prompts, senders=heads, receivers="logits", progress=False, metric=full_vocabulary),
            device,
        )
        row(
            "lsa path_patching, attention not skipped, full vocab",
            t_path_old,
            f"{fmt_ratio(t_path_old / t_lsa)} x activation",
        )
    else:
        print("  skipping attention cannot be turned off in this lsa")

    t_disc = t_disc_old = None
    if args.discovery:
        print(f"\n4. notebook 01's discovery (n={args.discovery_n}, max_steps={args.max_steps})")
        built = lsa.tasks.build_sets(
            "ioi", "en", model.tokenizer, n=args.discovery_n, seed=NOTEBOOK_01["seed"], split="all", verbose=False
        )
        dprompts = built["ioi", "en"]
        kw = dict(k=NOTEBOOK_01["k"], floor=NOTEBOOK_01["floor"], max_steps=args.max_steps)
        old = switches(circuits.path_patching_discovery, OLD_DISCOVERY)
        old_path = switches(path_patching, OLD_SHARING)
        slow_path = the_old_way(path_patching, *OLD_WAY) or path_patching
        found_old = None
        if old:
            # discovery calls lsa.patching.path_patching by name: for this run it takes the old-way switches
            def old_path_patching(*args, **kwargs):  # the old-way switches over discovery's own arguments
                inputs = kwargs.get("receiver_input", "q")
                if isinstance(inputs, str):
                    return slow_path(*args, **{**kwargs, **old_path})
                # several receiver inputs sharing one senders' run: the old way runs one call per input
                return {ix: slow_path(*args, **{**kwargs, **old_path, "receiver_input": ix}) for ix in inputs}

            with mock.patch.object(patching, "path_patching", old_path_patching):
                found_old, t_disc_old = clocked(
                    lambda: circuits.path_patching_discovery(model, dprompts, **kw, **old, metric=full_vocabulary),
                    device,
                )
            row(
                f"discover, {', '.join(f'{k}={v}' for k, v in {**old, **old_path}.items())}, no shortcuts, full vocab",
                t_disc_old,
                f"{found_old.n_steps} step(s), {len(found_old.circuit)} heads",
            )
        else:
            print("  the old-way switch (positions='all') is not available in discover")
        found, t_disc = clocked(lambda: circuits.path_patching_discovery(model, dprompts, **kw), device)
        names = [c.name for c in found.circuit.components]
        row("discover (default)", t_disc, f"{found.n_steps} step(s), {len(found.circuit)} heads: {', '.join(names)}")
        if found_old is not None:  # the rules differ at the query step, so the circuits may too
            old_names = [c.name for c in found_old.circuit.components]
            shared = len(set(names) & set(old_names))
            print(f"  old way's heads: {', '.join(old_names)}; {shared} shared")

    t_edges = t_paths = None
    if args.edges:
        t_edges, t_paths = time_edges(model, args.edges_n, device)

    print(
        f"\n## Summary: {args.model}, {device}, {args.dtype}, {len(heads)} heads (last {len(layers)} layers), n={len(prompts)}"
    )
    if len(layers) < a.n_layers:
        print(
            f"\n(last {len(layers)} of {a.n_layers} layers: lsa skips the layers before them, the loops do not; "
            "the hooked-loop and TransformerLens targets are for all layers, --layers 99)"
        )
    print("\n| ratio | wall | CPU | target | verdict (wall / CPU) |\n|---|---|---|---|---|")

    def line(name: str, r: torch.Tensor, target: float | None = None, strict: bool = False) -> None:
        goal = "" if target is None else f"{'<' if strict else '<='} {target:g}"
        v = "" if target is None else verdict(r, target, strict, sep=" / ")
        print(f"| {name} | {r[0]:.3f} | {r[1]:.3f} | {goal} | {v} |")

    line("end-only (default) / all-position", r_end, 0.2)
    line("end-only, full vocabulary / all-position", t_end_vocab / t_lsa)
    if t_end_old is not None:
        line("end-only, no cache reuse, full vocabulary / all-position", t_end_old / t_lsa)
    line("end-only lsa / end-only hooked loop", t_end / t_end_hooked)
    line("all-position lsa / hooked loop", t_lsa / t_hooked, 0.6)
    if t_tl is not None:
        line("all-position lsa / TransformerLens", t_lsa / t_tl, 1.0, strict=True)
    if t_nn is not None:
        line("all-position lsa / nnsight loop", t_lsa / t_nn)
    line("path patching to logits / activation sweep", t_path / t_lsa)
    if t_path_old is not None:
        line("path patching, attention not skipped, full vocabulary / activation sweep", t_path_old / t_lsa)
    if t_disc_old is not None:
        line("discovery after / before", t_disc / t_disc_old, 0.25)
    if t_disc is not None:
        print(f"\npath-patching discovery: {t_disc[0]:.1f} s wall, {t_disc[1]:.1f} s CPU (default)")
    if t_edges is not None:
        line("EAP-IG (every edge) / path-patching discovery, same prompts", t_edges / t_paths)
        print(f"\nEAP-IG over every edge, {args.edges_n} prompts: {t_edges[0]:.1f} s wall, {t_edges[1]:.1f} s CPU")


def time_edges(model, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Section 5: EAP-IG over every edge, the whole edge discovery (scores and the cross-fitted search) and
    path-patching discovery on the same ``n`` IOI prompts; EAP-IG with the real preset's steps."""
    from lsa.attribution import edge_attribution
    from lsa.runner import PRESETS

    steps = dict(PRESETS["real"][0][3])["steps"]
    prompts = on_device(lsa.tasks.build("ioi", "en", model.tokenizer, n=n, seed=0), device)
    print(f"\n5. EAP-IG over every edge vs path-patching discovery (n={len(prompts)})")
    scores, t_edges = clocked(
        lambda: edge_attribution(model, prompts, method="eap-ig", steps=steps, progress=False), device
    )
    row(f"EAP-IG, {steps} steps, {scores.graph.n_edges} edges", t_edges)
    found, t_found = clocked(lambda: circuits.discover(model, prompts, scores=scores, progress=False), device)
    size = f"{len(found.circuit.edges)} edges, reached the target: {found.circuit.evidence['reached_target']}"
    row("  + the search along its ranking (edge discovery)", t_found, size)
    kw = dict(k=NOTEBOOK_01["k"], floor=NOTEBOOK_01["floor"], max_steps=NOTEBOOK_01["max_steps"], progress=False)
    found, t_paths = clocked(lambda: circuits.path_patching_discovery(model, prompts, **kw), device)
    row("path-patching discovery (default)", t_paths, f"{found.n_steps} step(s), {len(found.circuit)} heads")
    return t_edges, t_paths


if __name__ == "__main__":
    main()
