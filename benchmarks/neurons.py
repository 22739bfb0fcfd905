"""Benchmark: what collecting neuron statistics adds to a plain forward pass.

Model: a random GPT-2-small-shaped model (12 layers, 768 wide, 3072 neurons per
MLP), one CPU thread. Text: a ``--batch`` x ``--pos`` batch of random tokens
(and a right-padded variant). Compared on the same tokens:

- plain: a forward with logits at the last position only (``logits_to_keep=1``:
  no unembedding of unread positions), no hooks;
- plain, full logits: what an ordinary ``model(tokens)`` costs;
- stats: :func:`lsa.neurons.collect_stats` (one engine run per batch that reads every
  ``mlp_act``, reduced on the spot, and stops after the last one; bookkeeping).

The machine is shared, so timings are taken in ``--repeats`` interleaved pairs
(plain, stats in alternating order); reported: the minimum of each (least
disturbed run), the median of the per-pair ratios, and the time spent inside
the reductions (:func:`lsa.neurons.activation_totals`) as a share of the plain forward (independent of noise).
Target: stats / plain <= 1.15.

    .venv/bin/python benchmarks/neurons.py [--batch 16 --pos 32 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from lsa import neurons as N  # noqa: E402
from lsa.configs import PAPER_SHAPES, random_hf_model  # noqa: E402
from lsa.model import wrap  # noqa: E402
from tests.helpers import word_tokenizer  # noqa: E402


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pos", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = wrap(
        random_hf_model(PAPER_SHAPES["openai-community/gpt2"], seed=0), word_tokenizer(50257), name="gpt2-small-random"
    )
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 50257, (args.batch, args.pos), generator=g)
    lengths = torch.randint(args.pos // 2, args.pos + 1, (args.batch,), generator=g)
    rows = [row[: int(n)] for row, n in zip(tokens, lengths)]
    (padded_ids, padded_mask, _) = next(N.token_batches(model, rows, batch_size=args.batch))

    @torch.no_grad()
    def plain(ids=tokens, mask=None, full=False):
        mask = torch.ones_like(ids) if mask is None else mask
        if full:
            model.hf(input_ids=ids, attention_mask=mask, use_cache=False)
        else:
            model.hf(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    def stats(texts=(tokens,)):
        N.collect_stats(model, {"x": list(texts)}, batch_size=args.batch, max_length=args.pos, progress=False)

    pairs = {
        "full batch": (lambda: plain(), lambda: stats()),
        "padded batch": (lambda: plain(padded_ids, padded_mask), lambda: stats(rows)),
    }
    plain()  # warm up
    stats()
    report = {}
    print(
        f"random GPT-2-small shape, {args.threads} thread(s), batch [{args.batch}, {args.pos}], "
        f"{args.repeats} interleaved pairs"
    )
    for name, (fa, fb) in pairs.items():
        ta, tb, ratios = [], [], []
        for r in range(args.repeats):
            if r % 2:
                b, a = _timed(fb), _timed(fa)
            else:
                a, b = _timed(fa), _timed(fb)
            ta.append(a)
            tb.append(b)
            ratios.append(b / a)
        report[name] = (min(ta), min(tb), statistics.median(ratios))
        print(
            f"  {name:13s} plain {min(ta):6.3f} s   stats {min(tb):6.3f} s   "
            f"min ratio {min(tb) / min(ta):.3f}   median pair ratio {statistics.median(ratios):.3f}"
        )
    full = min(_timed(lambda: plain(full=True)) for _ in range(2))
    print(
        f"  plain with full logits {full:6.3f} s  (stats / full-logits forward = {report['full batch'][1] / full:.3f})"
    )

    # time inside the reductions alone, as a share of a plain forward
    spent = [0.0]

    def timed_totals(module, inputs, output):
        t = time.perf_counter()
        N.activation_totals(output)
        spent[0] += time.perf_counter() - t

    n_layers = model.adapter.n_layers
    handles = [model.module("mlp_act", i).register_forward_hook(timed_totals) for i in range(n_layers)]
    t_forward = min(_timed(plain) for _ in range(2))
    spent[0] = 0.0
    plain()
    for h in handles:
        h.remove()
    share = spent[0] / report["full batch"][0]
    print(f"  time inside the reductions: {spent[0]:.3f} s per batch = {share:.1%} of a plain forward")
    ratio = report["full batch"][1] / report["full batch"][0]
    print(f"  stats / plain = {ratio:.3f} (target <= 1.15)")
    return {"ratio": ratio, "hook_share": share, "forward_with_hooks": t_forward}


if __name__ == "__main__":
    main()
