"""Information flow routes: cost against a plain forward pass, and agreement with ablation on the toy model.

1) Speed: a GPT-2-small-shaped random model (12 layers x 12 heads, d_model 768),
   a batch of 16 prompts x 20 tokens, one thread. Routes for the whole batch
   (one hooked forward + every importance + the route heads of each prompt) vs a
   plain forward of the same batch; the median of interleaved repeats; target <= 3x.
2) When ``data/models/toy-bilingual/model.safetensors`` exists: for IOI in English
   and Chinese, heads ranked by their route importance (mean over prompts of the
   head's importance on its route edges) vs heads ranked by a hand-written mean
   ablation (each head's slice of the o_proj input replaced by its mean over
   the prompts' real positions; effect = drop in mean logit difference). Prints
   both rankings and the top-5 overlap.

Run: ``.venv/bin/python benchmarks/flow.py [--repeats 5] [--n 64]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lsa import flow  # noqa: E402
from lsa.configs import PAPER_SHAPES, random_hf_model  # noqa: E402
from lsa.model import ZOO_DIR, Model, load_model, wrap  # noqa: E402


def speed(batch: int = 16, pos: int = 20, repeats: int = 5) -> float:
    from helpers import word_tokenizer

    hf = random_hf_model(PAPER_SHAPES["gpt2"], seed=0)
    model = wrap(hf, word_tokenizer(hf.config.vocab_size), name="gpt2-shaped")
    tokens = torch.randint(0, hf.config.vocab_size, (batch, pos), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.no_grad():
            hf(tokens)

    def routes():
        result = flow.contributions(model, tokens, tau=flow.DEFAULT_TAU)
        flow.route_head_importance(result)

    forward(), routes()  # warm up
    times = {"forward": [], "routes": []}
    for _ in range(repeats):
        for name, fn in (("forward", forward), ("routes", routes)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    fwd, rts = statistics.median(times["forward"]), statistics.median(times["routes"])
    print(f"model: GPT-2-small shape (12 layers x 12 heads, d_model 768), batch {batch} x {pos} tokens")
    print(f"forward: median {fwd:.3f} s  (all: {', '.join(f'{t:.2f}' for t in times['forward'])})")
    print(f"routes:  median {rts:.3f} s  (all: {', '.join(f'{t:.2f}' for t in times['routes'])})")
    print(f"ratio routes / forward: {rts / fwd:.2f}x (target <= 3x)")
    return rts / fwd


@torch.no_grad()
def _logit_diff(model: Model, prompts, edit=None) -> float:
    handles = [] if edit is None else edit()
    try:
        logits = model.hf(prompts.clean.to(model.device)).logits
    finally:
        for h in handles:
            h.remove()
    idx = torch.arange(len(prompts))
    end = logits[idx, prompts.end]
    return float((end[idx, prompts.answer] - end[idx, prompts.distractor]).mean())


@torch.no_grad()
def mean_ablation(model: Model, prompts) -> torch.Tensor:
    """Drop in mean logit difference when one head's o_proj-input slice is set to its mean: ``[layers, heads]``."""
    ad = model.adapter
    z = {}
    handles = [
        model.module("o_proj", layer).register_forward_pre_hook(lambda m, a, layer=layer: z.__setitem__(layer, a[0]))
        for layer in range(ad.n_layers)
    ]
    clean = _logit_diff(model, prompts)
    for h in handles:
        h.remove()
    real = torch.arange(prompts.clean.shape[1])[None, :] < prompts.lengths[:, None]  # [n, pos]
    effect = torch.zeros(ad.n_layers, ad.n_heads)
    for layer in range(ad.n_layers):
        heads = z[layer].reshape(*z[layer].shape[:2], ad.n_heads, ad.d_head)
        mean = heads[real].mean(0)  # [n_heads, d_head]
        for head in range(ad.n_heads):

            def replace(m, args, head=head, mean=mean):
                x = args[0].reshape(*args[0].shape[:2], ad.n_heads, ad.d_head).clone()
                x[:, :, head] = mean[head]
                return (x.reshape(args[0].shape),)

            edit = lambda layer=layer, fn=replace: [model.module("o_proj", layer).register_forward_pre_hook(fn)]  # noqa: E731
            effect[layer, head] = clean - _logit_diff(model, prompts, edit)
    return effect


def toy_check(n: int = 64, k: int = 5, name: str = "toy-bilingual", figures: str | None = None) -> None:
    path = Path(name) if Path(name).exists() else ZOO_DIR / name
    if not (path / "model.safetensors").exists():
        print(f"\n{path / 'model.safetensors'} does not exist yet: skipping the route vs ablation check")
        return
    from lsa import tasks

    model = load_model(str(path), device="cpu")
    ad = model.adapter
    print(f"\n{name}: {ad.n_layers} layers x {ad.n_heads} heads, d_model {ad.d_model}; IOI, {n} prompts per language")
    sets = {}
    for lang in ("en", "zh"):
        try:
            sets[lang] = tasks.build("ioi", lang, model.tokenizer, n=n, seed=0)
        except Exception as error:  # e.g. a monolingual model's tokenizer lacks the other language
            print(f"no IOI prompts in {lang!r}: {type(error).__name__}: {error}")
    sets = {lang: ps for lang, ps in sets.items() if len(ps)}
    if not sets:
        return
    start = time.perf_counter()
    freq = flow.head_frequency(model, sets, tau=flow.DEFAULT_TAU)
    print(f"routes for {sum(len(s) for s in sets.values())} prompts: {time.perf_counter() - start:.2f} s")
    if figures:
        _figures(model, sets, freq, Path(figures))
    if len(sets) == 2:
        wide = flow.compare_frequency(freq, "en", "zh")
        print(f"head frequency EN vs ZH: correlation {wide.attrs['correlation']:.3f}; most different heads:")
        print(wide.head(k).to_string(index=False))
    for lang, prompts in sets.items():
        effect = mean_ablation(model, prompts)
        part = freq[freq["language"] == lang]
        grid = part.pivot(index="layer", columns="head", values="importance")
        score = torch.tensor(grid.to_numpy(copy=True), dtype=torch.float32)
        by_route = [divmod(int(i), ad.n_heads) for i in score.flatten().argsort(descending=True)[:k]]
        by_ablation = [divmod(int(i), ad.n_heads) for i in effect.flatten().argsort(descending=True)[:k]]
        overlap = len(set(by_route) & set(by_ablation))
        fmt = lambda heads: ", ".join(f"{a}.{b}" for a, b in heads)  # noqa: E731
        print(f"\n[{lang}] clean logit diff {_logit_diff(model, prompts):.2f}")
        print(f"  top-{k} by route importance: {fmt(by_route)}")
        print(f"  top-{k} by mean ablation:    {fmt(by_ablation)}")
        chance = k * k / score.numel()
        print(
            f"  overlap: {overlap}/{k}  (chance ~{chance:.1f}; heads on at least one route: {int((score > 0).sum())})"
        )
        share = part.set_index(["layer", "head"])["frequency"]
        print(
            "  route frequency of the top ablation heads: "
            + ", ".join(f"{a}.{b}: {share[(a, b)]:.2f}" for a, b in by_ablation)
        )
        flat_score, flat_effect = score.flatten(), effect.flatten()
        r = torch.corrcoef(torch.stack([flat_score, flat_effect]))[0, 1]
        print(f"  Pearson r (route importance vs ablation effect, all {flat_score.numel()} heads): {float(r):.3f}")
        at_end = end_route_importance(model, prompts)
        by_end = [divmod(int(i), ad.n_heads) for i in at_end.flatten().argsort(descending=True)[:k]]
        print(f"  top-{k} by route importance into the end position only: {fmt(by_end)}")
        print(f"  overlap with mean ablation: {len(set(by_end) & set(by_ablation))}/{k}")
        patched = patching_effect(model, prompts)
        if patched is not None:
            by_patch = [divmod(int(i), ad.n_heads) for i in patched.flatten().argsort(descending=True)[:k]]
            print(f"  top-{k} by activation patching (noising, lsa.patching): {fmt(by_patch)}")
            print(
                f"  overlap with routes: {len(set(by_route) & set(by_patch))}/{k}; end-only: {len(set(by_end) & set(by_patch))}/{k}"
            )
    tense_frequency(model, n=n, k=k)


def end_route_importance(model: Model, prompts, batch_size: int = 16) -> torch.Tensor:
    """Each head's importance on route edges into the predicting position's stream, mean over prompts."""
    ad = model.adapter
    total = torch.zeros(ad.n_layers, ad.n_heads)
    for s in range(0, len(prompts), batch_size):
        lengths = prompts.lengths[s : s + batch_size]
        result = flow.contributions(model, prompts.clean[s : s + batch_size, : int(lengths.max())], lengths)
        total += flow.route_head_importance(result, flow.DEFAULT_TAU, prompts.end[s : s + batch_size], into="end").sum(
            0
        )
    return total / len(prompts)


def _figures(model: Model, sets, freq, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from lsa.plotting import flow as flow_plots

    out.mkdir(parents=True, exist_ok=True)
    for lang, prompts in sets.items():
        result = flow.contributions(model, prompts.clean[:1, : int(prompts.lengths[0])], prompts.lengths[:1])
        flow_plots.plot_route(flow.route(result, 0)).savefig(out / f"route_ioi_{lang}.png", dpi=110)
    flow_plots.plot_head_frequency(freq).savefig(out / "head_frequency_ioi.png", dpi=110)
    if len(sets) == 2:
        flow_plots.plot_frequency_scatter(freq).savefig(out / "head_frequency_ioi_scatter.png", dpi=110)
    print(f"figures written to {out}")


def tense_frequency(model: Model, n: int = 64, k: int = 5) -> None:
    """Head activation frequency EN vs ZH on the past-tense task (the paper's Figure 4a setting)."""
    from lsa import tasks

    try:
        sets = {lang: tasks.build("past_tense", lang, model.tokenizer, n=n, seed=0) for lang in ("en", "zh")}
    except Exception as error:  # e.g. a monolingual model: no prompts in the other language
        print(f"\npast tense EN vs ZH skipped: {type(error).__name__}: {str(error)[:120]}")
        return
    freq = flow.head_frequency(model, sets, tau=flow.DEFAULT_TAU)
    wide = flow.compare_frequency(freq, "en", "zh")
    print(
        f"\npast tense, {n} prompts per language: head frequency EN vs ZH correlation {wide.attrs['correlation']:.3f}"
    )
    print(wide.head(k).to_string(index=False))


def patching_effect(model: Model, prompts) -> torch.Tensor | None:
    """Drop in logit difference when a head takes its counterfactual activation (lsa.patching), or None."""
    try:
        from lsa.patching import activation_patching

        res = activation_patching(model, prompts, "head", direction="noising", progress=False)
        frame = res.to_frame()
        grid = frame.pivot(index="layer", columns="head", values="effect")
        return -torch.tensor(grid.to_numpy(copy=True), dtype=torch.float32)
    except Exception as error:  # the patching engine is another module, still moving
        print(f"  (activation patching unavailable: {type(error).__name__}: {error})")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pos", type=int, default=20)
    parser.add_argument("--n", type=int, default=64, help="IOI prompts per language on the toy model")
    parser.add_argument("--model", default="toy-bilingual", help="zoo name or folder of the model for the check")
    parser.add_argument("--figures", default=None, help="folder for route and frequency figures of the check")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch threads: {torch.get_num_threads()}")
    if not args.skip_speed:
        speed(batch=args.batch, pos=args.pos, repeats=args.repeats)
    toy_check(n=args.n, name=args.model, figures=args.figures)


if __name__ == "__main__":
    main()
