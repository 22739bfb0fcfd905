"""Held-out splits shared by the toy zoo's corpus and the task builders, and halves of a prompt set.

A combination (a name pair, an adverb x verb pair) is held out when a stable hash
of its sorted parts falls in the first ``share`` of the hash range: the same
answer on every machine and Python version (``zlib.crc32``, not ``hash``).

>>> is_heldout("Mary", "John") == is_heldout("John", "Mary")
True
"""

from __future__ import annotations

import zlib

import torch

HELDOUT_SHARE = 0.15


def is_heldout(*parts: str, share: float = HELDOUT_SHARE) -> bool:
    """Whether the unordered combination of ``parts`` is held out from training."""
    key = "|".join(sorted(parts)).encode("utf-8")
    return zlib.crc32(key) % 10_000 < share * 10_000


def halves(prompts, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``([ceil(n/2)], [floor(n/2)])`` of two disjoint halves of a prompt set, each sorted.

    For a finding chosen on one half and measured on the other. Every template group
    (:meth:`lsa.tasks.PromptSet.groups`) is dealt alternately into the two halves, in a random
    order drawn from ``seed``, so each half holds the same mix of templates (to one prompt).

    >>> select, evaluate = halves(prompts, seed=0)          # doctest: +SKIP
    >>> held_out = prompts.subset(evaluate)                  # doctest: +SKIP
    """
    n = len(prompts)
    if n < 2:
        raise ValueError(f"two halves need at least 2 prompts, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    order = order[torch.sort(prompts.groups()[order], stable=True).indices]  # grouped, random within a group
    return order[0::2].sort().values, order[1::2].sort().values
