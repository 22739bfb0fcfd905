"""Does a circuit hold across the prompts it is found on? Two disjoint discovery samples per language.

For each language: one build of IOI prompts split into three disjoint sets (two discovery samples and
one held-out set, :func:`lsa.tasks.disjoint`); a circuit discovered on each sample (EAP-IG, as notebook
01 does: :func:`lsa.circuits.discover`); each circuit's faithfulness on the held-out set with its 95%
interval; the two circuits' overlap (Jaccard of edges, and of heads and MLPs) beside random circuits of
the same sizes. Prints one markdown table. Minutes per language on one thread.

    .venv/bin/python scripts/circuit_stability.py [--model gemma-3-270m] [--languages en zh] [--n 64] [--steps 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

import lsa  # noqa: E402
from lsa import circuits  # noqa: E402


def one_language(model, language: str, n: int, seed: int, steps: int) -> dict:
    built = lsa.tasks.build("ioi", language, model.tokenizer, n=3 * n * 5 // 4 + 8, seed=seed)
    first, second, heldout = lsa.tasks.disjoint(built, [n, n, n])
    found = []
    for sample in (first, second):
        start = time.perf_counter()
        d = circuits.discover(model, sample, "eap-ig", steps=steps, progress=False, roles=False)
        f = circuits.faithfulness(model, d.circuit, heldout)
        found.append((d, f, time.perf_counter() - start))
    graph = found[0][0].edges.graph
    a, b = (d.circuit.mask(graph) for d, _, _ in found)
    edges, nodes = circuits.overlaps(graph, a, b)
    chance = circuits.chance_overlaps(graph, a, b, 1000, seed).mean(0)
    rows = []
    for name, (d, f, seconds) in zip(("A", "B"), found):
        lo, hi = f.ci
        rows.append(
            f"| {language} | {name} ({len(first)}) | {len(d.circuit.edges)} ({len(d.circuit.edges) / graph.n_edges:.1%}) | "
            f"{sum(c.kind in ('head', 'mlp') for c in d.circuit.components)} | {d.circuit.evidence['parameters']['rank']} | "
            f"{f.normalized:.2f} [{lo:.2f}, {hi:.2f}] ({len(heldout)}) | {seconds:.0f} s |"
        )
    rows.append(f"| {language} | A vs B | Jaccard of edges {edges:.2f} (chance {chance[0]:.2f}), of heads and MLPs "
                f"{nodes:.2f} (chance {chance[1]:.2f}) | | | | |")  # fmt: skip
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--languages", nargs="+", default=["en", "zh"])
    parser.add_argument("--n", type=int, default=64, help="prompts per discovery sample and in the held-out set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3, help="EAP-IG's steps (3: the real preset's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = lsa.load_model(args.model)
    print(f"## {args.model}: circuits from two disjoint samples ({time.strftime('%Y-%m-%d')})\n")
    print(
        "| language | sample (prompts) | edges (share) | heads and MLPs | ranking | held-out faithfulness [95%] (prompts) | time |"
    )
    print("|---|---|---|---|---|---|---|")
    for language in args.languages:
        print("\n".join(one_language(model, language, args.n, args.seed, args.steps)["rows"]), flush=True)


if __name__ == "__main__":
    main()
