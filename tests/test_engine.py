"""The intervention engine's own contract: plan checks, the two executors, attention implementations."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import FAMILIES, make_prompts, tiny_model

from lsa import engine
from lsa import steering as S
from lsa.engine import Edit, Plan, Read


def test_bad_plans_are_refused_with_the_reason():
    model = tiny_model("gpt2")
    tokens = torch.tensor([[5, 6, 7, 8]])
    end = torch.tensor([3])
    bad = [
        (Plan(reads=[Read("nowhere", 0)], end=end), "unknown site 'nowhere'"),
        (Plan(edits=[Edit("pattern", 0, lambda x: x)], end=end), "can be read, not edited"),
        (Plan(reads=[Read("embed", 1)], end=end), "exists at layer 0 only"),
        (Plan(reads=[Read("resid_final", 0)], end=end), "exists at layer 1 only"),
        (Plan(logits="end"), "needs the end positions"),
        (Plan(logits="some"), "logits must be one of"),
        (Plan(reads=[Read("pattern", 0)], attention="sdpa", end=end), "eager implementation"),
        (
            Plan(start=engine.Start(1, torch.zeros(1, 4, 32), first=2), end=end),
            "needs the cached run's keys and values",
        ),
        (Plan(logits="all", columns=torch.tensor([3, 4])), "columns"),
    ]
    for plan, message in bad:
        with pytest.raises(ValueError, match=message):
            engine.run(model, tokens, plan)


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_and_eager_runs_agree_and_patterns_come_from_eager(family):
    model = tiny_model(family)
    prompts = make_prompts(n=3, pos=6, seed=1)
    reads = [Read("head", 1), Read("mlp_out", 0)]
    eager = engine.run(model, prompts.clean, Plan(reads=reads, end=prompts.end, attention="eager"))
    sdpa = engine.run(model, prompts.clean, Plan(reads=reads, end=prompts.end, attention="sdpa"))
    torch.testing.assert_close(sdpa.logits, eager.logits, rtol=0, atol=1e-4)
    for key in eager.values:
        torch.testing.assert_close(sdpa[key], eager[key], rtol=0, atol=1e-4)
    assert model.hf.config._attn_implementation == "eager"  # restored after the run
    pattern = engine.run(model, prompts.clean, Plan(reads=[Read("pattern", 0)], logits=None))[("pattern", 0)]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]), rtol=0, atol=1e-5)


def test_both_executors_run_the_same_plan_with_steering_active():
    local = tiny_model("qwen2")
    remote = dataclasses.replace(local, remote="local")
    prompts = make_prompts(n=2, pos=5, seed=3)
    plan = Plan(
        edits=[Edit("neuron", 0, lambda x: 0.5 * x)], reads=[Read("mlp_act", 1), Read("attn_out", 0)], end=prompts.end
    )
    edit = S.scale({0: [1, 2], 1: [0]}, 3.0)
    with S.steer(local, edit):
        want = engine.run(local, prompts.clean, plan)
    with S.steer(remote, edit):
        got = engine.run(remote, prompts.clean, plan)
    unsteered = engine.run(local, prompts.clean, plan)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-4)
    for key in want.values:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-4)
    assert (want.logits - unsteered.logits).abs().max() > 1e-3
    assert local.steering == [] and remote.steering == []


@pytest.mark.parametrize("family", FAMILIES)
def test_vocabulary_columns_equal_those_columns_of_the_full_logits(family):
    model = tiny_model(family)
    prompts = make_prompts(n=3, pos=6, lengths=[6, 5, 4], seed=3)
    ids = torch.tensor([90, 4, 17, 5])
    full = engine.run(model, prompts.clean, Plan(end=prompts.end)).logits
    some = engine.run(model, prompts.clean, Plan(end=prompts.end, columns=ids)).logits
    assert some.shape == (3, 4)
    torch.testing.assert_close(some, full[:, ids], rtol=0, atol=1e-6)
    if family in ("gpt2", "llama"):  # the traced executor takes the same columns
        traced = engine.run(
            dataclasses.replace(model, remote="local"), prompts.clean, Plan(end=prompts.end, columns=ids)
        ).logits
        torch.testing.assert_close(traced, full[:, ids], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_idle_mlps_write_nothing_as_a_hook_zeroing_the_mlp_output_projection(family):
    """``Plan.idle_mlps`` against plain torch: a forward hook zeroing the MLP's output projection (its write to
    the residual: BLOOM's MLP adds the residual itself, Gemma 3's sandwich norm keeps a zero zero)."""
    model = tiny_model(family)
    prompts = make_prompts(n=3, pos=6, seed=4)
    idle = (0,) if model.adapter.n_layers == 1 else (0, model.adapter.n_layers - 1)
    handles = [
        model.module("mlp_out", layer).register_forward_hook(lambda m, args, out: torch.zeros_like(out))
        for layer in idle
    ]
    try:
        with torch.no_grad():
            want = model.hf(input_ids=prompts.clean).logits[torch.arange(3), prompts.end]
    finally:
        for h in handles:
            h.remove()
    got = engine.run(model, prompts.clean, Plan(end=prompts.end, idle_mlps=idle)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    plain = engine.run(model, prompts.clean, Plan(end=prompts.end)).logits
    assert (plain - want).abs().max() > 1e-3  # the idle MLPs changed the run
    if family in ("gpt2", "llama"):  # the traced executor zeroes their writes
        traced = engine.run(
            dataclasses.replace(model, remote="local"), prompts.clean, Plan(end=prompts.end, idle_mlps=idle)
        ).logits
        torch.testing.assert_close(traced, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="idle"):
        engine.run(model, prompts.clean, Plan(reads=[Read("mlp_act", idle[0])], end=prompts.end, idle_mlps=idle))


def test_a_plan_stops_after_its_site_even_where_it_reads_nothing_there():
    model = tiny_model("llama")
    prompts = make_prompts(n=2, pos=5, seed=6)
    ran = []
    handle = model.adapter.block(model.hf, 1).register_forward_pre_hook(lambda m, args: ran.append(1))
    try:
        engine.run(model, prompts.clean, Plan(stop_after=("head", 0), logits=None))
        assert ran == []  # block 1 never ran
        engine.run(model, prompts.clean, Plan(end=prompts.end))
        assert ran == [1]
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefix_per_row_runs_each_row_at_its_own_position_as_the_plain_forward(family):
    """``Start(first=tensor)``: each row recomputes its own end alone from the cached keys and values (rows
    of lengths 8, 5 and 7 in one forward; Gemma 3's sliding window is 4), equal to the model's own forward
    there; a head edit at the end equals the same edit by a plain torch hook."""
    model = tiny_model(family)
    prompts = make_prompts(n=3, pos=8, lengths=[8, 5, 7], seed=9)
    rows, end = torch.arange(3), prompts.end
    with torch.no_grad():
        want = model.hf(input_ids=prompts.clean).logits[rows, end]
    base = engine.run(model, prompts.clean, Plan(reads=[Read("resid_pre", 1)], end=end, keep_cache=True))
    hidden = base[("resid_pre", 1)]  # the cached run's, at every position: the engine takes each row's end
    got = engine.run(model, prompts.clean, Plan(start=engine.Start(1, hidden, first=end, cache=base.cache), end=end))
    torch.testing.assert_close(got.logits, want, rtol=0, atol=1e-5)
    # an edit at the run's one position: head 0's output at layer 1 scaled, at each row's end
    o_proj = model.module("o_proj", 1)
    d_head = model.adapter.d_head

    def scale_end(module, args):
        x = args[0].clone()
        x[rows, end, :d_head] *= 3.0
        return (x, *args[1:])

    handle = o_proj.register_forward_pre_hook(scale_end)
    try:
        with torch.no_grad():
            want = model.hf(input_ids=prompts.clean).logits[rows, end]
    finally:
        handle.remove()

    def scale(x):
        x = x.clone()
        x[:, :, :d_head] *= 3.0
        return x

    plan = Plan(start=engine.Start(1, hidden, first=end, cache=base.cache), edits=[Edit("head", 1, scale)], end=end)
    torch.testing.assert_close(engine.run(model, prompts.clean, plan).logits, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="must equal it"):
        engine.run(model, prompts.clean, dataclasses.replace(plan, end=end - 1))


def test_executors_declare_what_they_can_do_and_without_turns_the_shortcuts_off_for_the_same_results():
    from lsa.attribution import edge_attribution
    from lsa.patching import activation_patching

    local = tiny_model("gpt2")
    remote = dataclasses.replace(local, remote="local")
    prompts = make_prompts(n=3, pos=6, seed=2)
    assert engine.can(local, "split") and engine.can(local, "start")
    assert not engine.can(remote, "split") and not engine.can(remote, "start")
    with pytest.raises(ValueError, match="edge attribution needs an executor with 'split'.*without remote="):
        edge_attribution(remote, prompts)
    with pytest.raises(ValueError, match="turns off start, reuse_cache, skip_attention"):
        with engine.without("split"):
            pass
    activation_patching(local, prompts, "head", layers=[1], progress=False)  # the engine's one-off probes of the model
    calls = []
    handle = local.module("attn", 0).register_forward_pre_hook(lambda m, args: calls.append(1))  # inside block 0
    try:
        fast = activation_patching(local, prompts, "head", layers=[1], positions=["mid"], progress=False)
        n_fast = len(calls)
        with engine.without("start"):
            assert not engine.can(local, "reuse_cache")  # keys and values are reused by a run that starts at a block
            plain = activation_patching(local, prompts, "head", layers=[1], positions=["mid"], progress=False)
    finally:
        handle.remove()
    assert engine.can(local, "start")  # on again after the block
    assert n_fast == 2 and len(calls) - n_fast > 2  # block 0 ran in the two unpatched runs alone, then in every chunk
    torch.testing.assert_close(plain.patched, fast.patched, rtol=0, atol=1e-5)
