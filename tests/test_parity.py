"""The frozen parity suite (issue 13, "Freeze first"): every method's output equals the one frozen before the refactor.

``scripts/freeze_parity.py`` ran every case of ``tests/parity/cases.py`` (each public
lsa method, on a fixed tiny random model of every family, locally, on the simulated
remote path for gpt2 and qwen2, and under neuron steering) with the code as it was
before the intervention engine was rewritten, and kept the results in
``tests/parity/frozen/``. Here each case runs again and must give the same output to
1e-6 (absolute + relative), leaf by leaf; a failure names the family, the case
(``local/activation_patching/head/noising``) and every field that moved.

This is a regression reference, not a correctness check: the values themselves are
checked against independent computations in the other test files. Steered cases were
frozen on the local engine only: the remote engine then ignored ``steer()`` (issue 13).
Since the engine makes active steering part of every plan, their remote twins must
give the frozen local results too.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from parity import cases
from parity.plain import differences, plain

from lsa import behaviour, patching
from lsa import steering as S

FAMILIES = cases.FAMILIES
PAIRS = [(family, case.id) for family in FAMILIES for case in cases.cases_for(family)]


@functools.cache
def context(family: str) -> cases.Context:
    return cases.Context(family)


@functools.cache
def frozen(family: str) -> dict:
    return cases.load_frozen(family)


def _check(got, want, what: str, *, tol: float = cases.RTOL, versions: dict | None = None) -> None:
    diffs = differences(plain(got), want, rtol=tol, atol=tol)
    if diffs:
        shown = "\n  ".join(diffs[:25])
        more = f"\n  ... and {len(diffs) - 25} more" if len(diffs) > 25 else ""
        frozen_with = f"\n(frozen with {versions})" if versions else ""
        pytest.fail(f"{what}: {len(diffs)} field(s) moved beyond {tol:g}:\n  {shown}{more}{frozen_with}")


# ----------------------------------------------------------------- the frozen outputs
@pytest.mark.parametrize("family", FAMILIES)
def test_the_frozen_file_holds_exactly_the_registered_cases(family):
    payload = frozen(family)
    assert payload["family"] == family
    registered = {case.id for case in cases.cases_for(family)}
    kept = set(payload["cases"])
    assert not registered - kept, (
        f"cases without a frozen output (freeze them before changing code): {sorted(registered - kept)}"
    )
    assert not kept - registered, f"frozen outputs of cases that no longer exist: {sorted(kept - registered)}"


@pytest.mark.parametrize(("family", "case_id"), PAIRS, ids=[f"{f}:{c}" for f, c in PAIRS])
def test_every_method_gives_its_frozen_output(family, case_id):
    payload = frozen(family)
    got = cases.CASES[case_id].run(context(family))
    _check(got, payload["cases"][case_id], f"{family} {case_id}", versions=payload["versions"])


def test_the_suite_covers_every_family_locally_and_two_remotely():
    for family in FAMILIES:
        ids = {case.id for case in cases.cases_for(family)}
        assert any(i.startswith("local/activation_patching/") for i in ids)
        assert any(i.startswith("local/steered/") for i in ids)
        assert any(i.startswith("remote/") for i in ids) == (family in cases.REMOTE_FAMILIES)


# ----------------------------------------------------------------- steering
STEERED = [(f, key) for key in cases.REMOTE_STEERED for f in cases.REMOTE_FAMILIES]


def _remote_twin(case_id: str) -> cases.Case:
    """The steered case run on the ``remote="local"`` twin of the model."""
    case = cases.CASES[case_id]
    return dataclasses.replace(case, id=case_id.replace("local/", "remote/", 1))


@pytest.mark.parametrize(("family", "case_id"), STEERED, ids=[f"{f}:{c}" for f, c in STEERED])
def test_steered_methods_give_the_frozen_local_result_on_the_remote_path(family, case_id):
    got = _remote_twin(case_id).run(context(family))
    _check(got, frozen(family)["cases"][case_id], f"{family} remote {case_id}", tol=cases.STEERED_TOL)


STEERED_LOCAL = [(f, c.id) for f in FAMILIES for c in cases.cases_for(f) if c.steered]


@pytest.mark.parametrize(("family", "case_id"), STEERED_LOCAL, ids=[f"{f}:{c}" for f, c in STEERED_LOCAL])
def test_the_frozen_steered_outputs_differ_from_the_unsteered_ones(family, case_id):
    unsteered = dataclasses.replace(cases.CASES[case_id], steered=False).run(context(family))
    diffs = differences(plain(unsteered), frozen(family)["cases"][case_id], rtol=0, atol=1e-3)
    assert diffs, f"{family} {case_id}: the edits change nothing, so a remote engine ignoring them would pass"


# ----------------------------------------------------------------- the check on toy-bilingual
@pytest.fixture(scope="module")
def zoo():
    return cases.zoo_steering()


def _steered(model, edits, fn):
    with S.steer(model, *edits):
        return fn(model)


def _end_logits(prompts):
    return lambda m: behaviour.end_logits(m, prompts)


def _head_patching(prompts):
    return lambda m: patching.activation_patching(m, prompts, "head", progress=False).normalized


@pytest.mark.parametrize("quantity", ["end_logits", "head_patching"])
def test_steering_moves_toy_bilingual_end_logits_and_head_patching(zoo, quantity):
    local, _, prompts, edits = zoo
    fn = {"end_logits": _end_logits, "head_patching": _head_patching}[quantity](prompts)
    assert (_steered(local, edits, fn) - fn(local)).abs().max() > 1e-2


@pytest.mark.parametrize("quantity", ["end_logits", "head_patching"])
def test_steered_toy_bilingual_remote_equals_local(zoo, quantity):
    local, remote, prompts, edits = zoo
    fn = {"end_logits": _end_logits, "head_patching": _head_patching}[quantity](prompts)
    torch.testing.assert_close(_steered(remote, edits, fn), _steered(local, edits, fn), rtol=0, atol=cases.STEERED_TOL)


# ----------------------------------------------------------------- a second remote bug found while freezing
# The traced engine once ordered receiver projections by module name (k_proj < q_proj), not forward order.
def test_remote_path_patching_into_query_and_key_of_separate_projections():
    ctx = context("qwen2")
    got = patching.path_patching(ctx.remote, ctx.prompts, receivers=[(1, 0)], receiver_input="qkv", progress=False)
    _check(got, frozen("qwen2")["cases"]["local/path_patching/receiver_qkv"], "qwen2 remote path_patching qkv")
