"""Freeze today's outputs of every lsa method for the parity suite (issue 13: "Freeze first").

Runs every case of ``tests/parity/cases.py`` (each public method on a fixed tiny random
model of every family, locally, on the simulated remote path for two families, and
under neuron steering) and writes one ``tests/parity/frozen/<family>.pt.gz`` per family:
a gzipped ``torch.save`` of ``{"format", "family", "versions", "cases": {case id: plain result}}``
(load it with :func:`parity.cases.load_frozen`).
``tests/test_parity.py`` recomputes each case and compares it with these files to 1e-6.

Deterministic: fixed seeds, one thread, no timestamps in the files; two runs give
byte-identical files (``--out`` another folder and compare the printed SHA-256). Rerun
it only on purpose: a refreeze makes the old outputs the new reference, so do it
before a refactor, never to make a failing parity test pass. ~1 minute on one thread.

    python scripts/freeze_parity.py [--families gpt2 qwen2] [--out tests/parity/frozen]

``--cases PATTERN ...`` (shell-style, e.g. ``'*/ablate/mean'``) refreezes only the matching cases of
the existing files, the rest byte for byte as they were, and prints each refrozen case's fields that
moved: for a deliberate change of what a method computes, recorded with its reason.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import fnmatch  # noqa: E402
import hashlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from parity import cases  # noqa: E402
from parity.plain import differences, plain  # noqa: E402


def versions() -> dict[str, str]:
    import nnsight
    import pandas
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "nnsight": str(getattr(nnsight, "__version__", "?")),
        "pandas": str(pandas.__version__),
    }


def freeze(family: str) -> dict:
    """Every case of ``family`` run with today's code, as plain data."""
    ctx = cases.Context(family)
    results = {}
    for case in cases.cases_for(family):
        results[case.id] = plain(case.run(ctx))
    return {"format": cases.FORMAT, "family": family, "versions": versions(), "cases": results}


def refreeze(family: str, patterns: list[str], folder: Path) -> dict:
    """The family's frozen payload with the cases matching ``patterns`` run again; prints what moved."""
    payload = cases.load_frozen(family, folder)
    ctx = cases.Context(family)
    for case in cases.cases_for(family):
        if not any(fnmatch.fnmatch(case.id, p) for p in patterns):
            continue
        new = plain(case.run(ctx))
        old = payload["cases"].get(case.id)
        moved = ["new case"] if old is None else differences(new, old, rtol=1e-6, atol=1e-6)
        print(f"{family} {case.id}: " + ("; ".join(moved[:6]) if moved else "unchanged"))
        payload["cases"][case.id] = new
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(cases.FAMILIES), choices=cases.FAMILIES)
    parser.add_argument("--out", type=Path, default=cases.FROZEN_DIR)
    parser.add_argument("--cases", nargs="*", help="refreeze only these case ids (shell patterns) in place")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for family in args.families:
        start = time.perf_counter()
        payload = refreeze(family, args.cases, args.out) if args.cases else freeze(family)
        path = cases.frozen_path(family, args.out)
        cases.save_frozen(payload, path)
        size = path.stat().st_size
        total += size
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(
            f"{family:<9} {len(payload['cases']):>4} cases  {size / 1024:7.1f} KiB  "
            f"{time.perf_counter() - start:5.1f} s  sha256 {digest[:16]}  {path}"
        )
    print(f"total {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
