"""Halves of a prompt set: disjoint, complete, balanced in size and in every template group, seeded."""

from collections import Counter

import pytest
import torch
from helpers import make_prompts

from lsa.splits import halves


@pytest.mark.parametrize("n", [2, 9, 16])
def test_halves_are_disjoint_cover_the_set_and_split_every_template_group_evenly(n):
    prompts = make_prompts(n=n, pos=6, lengths=[6 - (i % 3) for i in range(n)], seed=1)
    prompts.meta["template"] = [f"t{i % 2}" for i in range(n)]
    a, b = halves(prompts, seed=3)
    assert sorted(a.tolist() + b.tolist()) == list(range(n))
    assert len(a) - len(b) in (0, 1) and a.tolist() == sorted(a.tolist())
    groups = prompts.groups()
    assert len(set(groups.tolist())) == min(n, 6)  # template x length
    in_a, in_b = Counter(groups[a].tolist()), Counter(groups[b].tolist())
    assert all(abs(in_a[g] - in_b[g]) <= 1 for g in set(groups.tolist()))


def test_halves_are_fixed_by_the_seed_and_move_with_it():
    prompts = make_prompts(n=20, pos=5, seed=2)
    first = halves(prompts, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(first, halves(prompts, seed=0)))
    assert not torch.equal(first[0], halves(prompts, seed=1)[0])
    subset = prompts.subset(first[1])
    assert torch.equal(subset.clean, prompts.clean[first[1]])


def test_a_set_of_one_prompt_has_no_halves():
    with pytest.raises(ValueError, match="at least 2 prompts"):
        halves(make_prompts(n=1), seed=0)
