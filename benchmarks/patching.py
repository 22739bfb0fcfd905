"""Benchmark: lsa's head-patching sweep against the naive loop, TransformerLens, and attribution patching.

Model: a random GPT-2-small-shaped model (12 layers x 12 heads, d_model 768,
vocabulary 50257), ``--batch`` 16 prompts x ``--pos`` 20 random tokens (clean and
counterfactual), metric = mean logit difference at the last position, noising
(clean run, each head's output patched from the counterfactual run at every
position). Timed in one run, same weights, same thread count:

(a)  the naive loop: one nnsight trace per head (full logits, as a user writes it),
     plus the trace that caches the counterfactual head outputs;
(a') TransformerLens 4.3's own helper (``get_act_patch_attn_head_out_all_pos`` =
     ``generic_activation_patch`` on ``hook_z``) on a ``TransformerBridge`` booted
     offline around a copy of the same Hugging Face model;
(b)  ``lsa.patching.activation_patching(model, prompts, "head")``, all 144 heads;
(c)  ``lsa.attribution.attribution_patching(model, prompts, "head")`` (and (c'):
     ``steps=2``, integrated gradients over the input path, for reference).

(a) and (a') cost the same for every head (each is a full forward), so by
default they time ``--heads-per-layer`` heads per layer and extrapolate linearly
to 144 (printed as such); ``--full`` times all 144. The values of (a), (a') and
(b) are checked to agree on the heads timed. Targets: (b) <= 0.45 x (a);
(a) / (c) >= 30. Times are wall and process CPU time (one thread: CPU time does
not count waiting for a core that other jobs hold).

``--zoo`` (automatic when ``data/models/toy-bilingual/model.safetensors`` exists):
correlation of attribution vs exact head patching on the zoo model's IOI prompts
(target >= 0.9), English and Chinese, noising and denoising, ``steps`` 1 and 2.

    .venv/bin/python benchmarks/patching.py [--threads 1] [--heads-per-layer 2] [--full] [--zoo]
    .venv/bin/python benchmarks/patching.py --zoo-only [--zoo-model toy-bilingual | PATH] [--zoo-n 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from lsa.attribution import attribution_patching, correlation  # noqa: E402
from lsa.configs import PAPER_SHAPES, gpt2_bpe_tokenizer  # noqa: E402
from lsa.metrics import logit_diff  # noqa: E402
from lsa.model import random_model  # noqa: E402
from lsa.patching import activation_patching  # noqa: E402
from lsa.tasks import DropReport, PromptSet  # noqa: E402

ZOO_WEIGHTS = ROOT / "data" / "models" / "toy-bilingual" / "model.safetensors"


def random_prompts(n: int, pos: int, vocab: int, seed: int = 0) -> PromptSet:
    import pandas as pd

    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n, pos), generator=g)
    corrupt = torch.randint(0, vocab, (n, pos), generator=g)
    answer = torch.randint(0, vocab, (n,), generator=g)
    distractor = (answer + 1 + torch.randint(0, vocab - 2, (n,), generator=g)) % vocab
    lengths = torch.full((n,), pos)
    return PromptSet(
        task="random",
        language="none",
        clean=clean,
        corrupt=corrupt,
        lengths=lengths,
        answer=answer,
        distractor=distractor,
        positions={},
        meta=pd.DataFrame({"i": range(n)}),
        report=DropReport(total=n, kept=n),
    )


def now() -> torch.Tensor:
    """``[wall seconds, CPU seconds of this process]``: on a shared machine CPU time is the fairer clock."""
    return torch.tensor([time.perf_counter(), time.process_time()], dtype=torch.float64)


def timed(fn):
    t = now()
    out = fn()
    return out, now() - t


def fmt(t: torch.Tensor) -> str:
    return f"{t[0]:8.2f} s wall, {t[1]:8.2f} s CPU"


def naive_nnsight(model, prompts, heads):
    """(a): one nnsight trace per head, full logits; returns {head: mean metric}, seconds of the corrupt trace."""
    a = model.adapter
    d = a.d_head
    with torch.no_grad():
        t0 = now()
        zs = {}
        with model.trace(prompts.corrupt):
            for layer in range(a.n_layers):
                zs[layer] = model.envoy("o_proj", layer).input.save()
        t_cache = now() - t0
        out = {}
        for layer, head in heads:
            with model.trace(prompts.clean):
                model.envoy("o_proj", layer).input[:, :, head * d : (head + 1) * d] = zs[layer][
                    :, :, head * d : (head + 1) * d
                ]
                logits = model.nn.output.logits.save()
            out[(layer, head)] = float(logit_diff(logits, prompts).mean())
    return out, t_cache


def transformer_lens_patch(model, prompts, heads):
    """(a'): TransformerLens 4.3's head-output patching helper on a bridge around a copy of the model."""
    import pandas as pd
    import transformer_lens.patching as tlp
    from transformer_lens.model_bridge import TransformerBridge

    # Offline: with a BOS token set, TransformerLens reloads the tokenizer by its hub name
    # (KeyError 'name_or_path' here); tokens are passed in directly, so the BOS token is dropped.
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.bos_token = None
    tlp.tqdm = lambda iterable, **kw: iterable  # its progress bar would fill the output
    bridge = TransformerBridge.boot_transformers(
        "gpt2", hf_model=copy.deepcopy(model.hf), tokenizer=tokenizer, device="cpu"
    )
    bridge.eval()
    with torch.no_grad():
        t0 = now()
        _, cache = bridge.run_with_cache(prompts.corrupt, names_filter=lambda name: name.endswith("hook_z"))
        t_cache = now() - t0
        index = pd.DataFrame(heads, columns=["layer", "head"])
        t0 = now()
        metric = lambda logits: logit_diff(logits, prompts).mean()  # noqa: E731
        if len(heads) == model.adapter.n_layers * model.adapter.n_heads:
            values = tlp.get_act_patch_attn_head_out_all_pos(bridge, prompts.clean, cache, metric).flatten()
        else:  # the same helper's machinery, on the timed subset of heads
            values = tlp.generic_activation_patch(
                bridge,
                prompts.clean,
                cache,
                metric,
                patch_setter=tlp.layer_head_vector_patch_setter,
                activation_name="z",
                index_df=index,
            )
        t_loop = now() - t0
    return {h: float(v) for h, v in zip(heads, values)}, t_cache, t_loop


def zoo_correlation(n: int, name: str = "toy-bilingual") -> None:
    from lsa import tasks
    from lsa.model import load_model

    model = load_model(name, device="cpu")
    print(f"\nzoo: {model.name} ({model.adapter.n_layers} layers x {model.adapter.n_heads} heads)")
    for language in ("en", "zh"):
        try:
            prompts = tasks.build("ioi", language, model.tokenizer, n=n)
        except ValueError as err:
            print(f"  IOI {language}: no prompts for this tokenizer ({err})")
            continue
        for direction in ("noising", "denoising"):
            exact, t_exact = timed(
                lambda p=prompts, d=direction: activation_patching(model, p, "head", direction=d, progress=False)
            )
            line = []
            for steps in (1, 2):
                approx, t_attr = timed(
                    lambda p=prompts, d=direction, k=steps: attribution_patching(model, p, "head", direction=d, steps=k)
                )
                r = correlation(exact, approx)
                line.append(f"steps={steps}: r = {r:.3f} [{'PASS' if r >= 0.9 else 'FAIL'}] ({t_attr[0]:.2f} s)")
            print(
                f"  IOI {language} {direction}: n={len(prompts)}, clean logit diff {exact.clean.mean():.2f}, "
                f"counterfactual {exact.corrupt.mean():.2f}; exact {t_exact[0]:.2f} s; attribution vs exact "
                f"(target r >= 0.9): " + "; ".join(line)
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pos", type=int, default=20)
    parser.add_argument("--heads-per-layer", type=int, default=2, help="heads per layer timed for (a), (a')")
    parser.add_argument("--full", action="store_true", help="time all heads for (a) and (a')")
    parser.add_argument("--skip-tl", action="store_true", help="skip (a') TransformerLens")
    parser.add_argument("--zoo", action="store_true", help="also the zoo model's attribution correlation")
    parser.add_argument("--zoo-only", action="store_true")
    parser.add_argument("--zoo-n", type=int, default=64)
    parser.add_argument("--zoo-model", default="toy-bilingual", help="zoo short name or a local model folder")
    parser.add_argument("--shape", default="gpt2-small", help="'gpt2-small' or a config as JSON (for a quick check)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads: torch.get_num_threads() = {torch.get_num_threads()}")
    if args.zoo_only:
        zoo_correlation(args.zoo_n, args.zoo_model)
        return

    spec = PAPER_SHAPES["openai-community/gpt2"] if args.shape == "gpt2-small" else json.loads(args.shape)
    model = random_model(spec, tokenizer=gpt2_bpe_tokenizer(), seed=0)
    a = model.adapter
    prompts = random_prompts(args.batch, args.pos, a.d_vocab)
    print(
        f"model: random {spec['model_type']} ({a.n_layers} layers x {a.n_heads} heads, d_model {a.d_model}, "
        f"vocab {a.d_vocab}); prompts: {args.batch} x {args.pos} tokens"
    )
    all_heads = [(layer, h) for layer in range(a.n_layers) for h in range(a.n_heads)]
    if args.full:
        heads = all_heads
    else:
        step = max(1, a.n_heads // args.heads_per_layer)
        heads = [(layer, h) for layer in range(a.n_layers) for h in range(0, a.n_heads, step)][
            : a.n_layers * args.heads_per_layer
        ]
    scale = len(all_heads) / len(heads)
    note = "" if scale == 1 else f" (timed {len(heads)} heads, extrapolated x{scale:.0f} to {len(all_heads)})"

    # warm-up: one forward through each path so first-call costs are not timed
    with torch.no_grad():
        model.hf(prompts.clean[:2])
    activation_patching(model, prompts.subset(slice(0, 2)), "head", layers=[a.n_layers - 1], progress=False)

    naive, t_naive_loop = timed(lambda: naive_nnsight(model, prompts, heads))
    naive, t_naive_cache = naive
    t_a = t_naive_cache + (t_naive_loop - t_naive_cache) * scale
    per_head = (t_naive_loop - t_naive_cache) / len(heads)
    print(f"(a)  naive nnsight loop:          {fmt(t_a)}{note}; {per_head[0]:.3f} s wall per head")

    tl = None
    if not args.skip_tl:
        try:
            tl, t_tl_cache, t_tl_loop = transformer_lens_patch(model, prompts, heads)
            t_a2 = t_tl_cache + t_tl_loop * scale
            print(
                f"(a') TransformerLens 4.3 helper:  {fmt(t_a2)}{note}; {t_tl_loop[0] / len(heads):.3f} s wall per head"
            )
        except Exception as err:  # report why, keep the rest of the benchmark
            import traceback

            traceback.print_exc()
            print(f"(a') TransformerLens could not run: {type(err).__name__}: {err}")

    exact, t_b = timed(lambda: activation_patching(model, prompts, "head", progress=False))
    print(f"(b)  lsa activation_patching:     {fmt(t_b)} (all {len(all_heads)} heads)")
    approx, t_c = timed(lambda: attribution_patching(model, prompts, "head"))
    print(f"(c)  lsa attribution_patching:    {fmt(t_c)} (all {len(all_heads)} heads)")
    _, t_c2 = timed(lambda: attribution_patching(model, prompts, "head", steps=2))
    print(f"(c') the same, steps=2 (IG):       {fmt(t_c2)} (all {len(all_heads)} heads)")

    lsa_mean = {
        (r["layer"], r["head"]): float(v) for r, v in zip(exact.components.to_dict("records"), exact.patched.mean(1))
    }
    diff_a = max(abs(naive[h] - lsa_mean[h]) for h in heads)
    print(f"agreement (a) vs (b): max |difference| of mean metric over {len(heads)} heads = {diff_a:.2e}")
    if tl is not None:
        diff_tl = max(abs(tl[h] - lsa_mean[h]) for h in heads)
        print(f"agreement (a') vs (b): max |difference| = {diff_tl:.2e}")
    ok = diff_a <= 1e-4 and (tl is None or diff_tl <= 1e-4)
    print(f"agree within 1e-4: {'PASS' if ok else 'FAIL'}")
    print(f"attribution vs exact (random model, effects tiny): correlation = {correlation(exact, approx):.3f}")

    ratio_b, ratio_c = t_b / t_a, t_a / t_c
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    print("\nratios (wall | CPU time; CPU time is the fair clock when other jobs share the machine):")
    print(
        f"(b) / (a) = {ratio_b[0]:.3f} | {ratio_b[1]:.3f}  [target <= 0.45: "
        f"{verdict(ratio_b[0] <= 0.45)} | {verdict(ratio_b[1] <= 0.45)}]"
    )
    if tl is not None:
        ratio_tl = t_b / t_a2
        print(f"(b) / (a') = {ratio_tl[0]:.3f} | {ratio_tl[1]:.3f}")
    print(
        f"(a) / (c) = {ratio_c[0]:.1f}x | {ratio_c[1]:.1f}x  [target >= 30: "
        f"{verdict(ratio_c[0] >= 30)} | {verdict(ratio_c[1] >= 30)}]"
    )
    ratio_c2 = t_a / t_c2
    print(f"(a) / (c') = {ratio_c2[0]:.1f}x | {ratio_c2[1]:.1f}x")

    if args.zoo or ZOO_WEIGHTS.exists():
        zoo_correlation(args.zoo_n, args.zoo_model)
    else:
        print(f"\nzoo: {ZOO_WEIGHTS} not built; skipped (run with --zoo once it exists)")


if __name__ == "__main__":
    main()
