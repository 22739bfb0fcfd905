"""Held-out splits shared by the toy zoo's corpus and the task builders.

A combination (a name pair, an adverb x verb pair) is held out when a stable hash
of its sorted parts falls in the first ``share`` of the hash range: the same
answer on every machine and Python version (``zlib.crc32``, not ``hash``).

>>> is_heldout("Mary", "John") == is_heldout("John", "Mary")
True
"""

from __future__ import annotations

import zlib

HELDOUT_SHARE = 0.15


def is_heldout(*parts: str, share: float = HELDOUT_SHARE) -> bool:
    """Whether the unordered combination of ``parts`` is held out from training."""
    key = "|".join(sorted(parts)).encode("utf-8")
    return zlib.crc32(key) % 10_000 < share * 10_000
