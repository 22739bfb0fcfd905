"""The remote (NDIF) path, offline: nnsight's local simulation with a server that has no lsa installed.

``remote="local"`` serializes every trace as a remote request would and rebuilds
it before running; the fixture below also makes ``import lsa`` fail while the
request is rebuilt (an editable install would otherwise still find it), so a
pass means lsa's code really travels with the request. Results are compared with
the local engine, which ``tests/test_patching.py`` checks against plain hooks,
and the number of simulated requests shows the traced path ran.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import sys

import cloudpickle
import pytest
import torch
from helpers import FAMILIES, make_prompts, tiny_model
from nnsight.intervention.backends.local import LocalSimulationBackend

import lsa
from lsa import ablation, behaviour, circuits, flow, tasks
from lsa.neurons import activation_totals
from lsa.patching import activation_patching, path_patching

TOL = 1e-5


class _NoLsa(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "lsa" or name.startswith("lsa."):
            raise ModuleNotFoundError(f"No module named {name!r} on the simulated server")


@pytest.fixture
def server(monkeypatch):
    """Count simulated remote requests; hide lsa from the rebuilt request."""
    calls = []
    hide, restore, run = (
        LocalSimulationBackend._hide_local_modules,
        LocalSimulationBackend._restore,
        LocalSimulationBackend.__call__,
    )

    def hide_all(self):
        hidden = hide(self)
        sys.meta_path.insert(0, _NoLsa())
        return hidden

    def restore_all(self, hidden):
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _NoLsa)]
        restore(self, hidden)

    def counted(self, tracer):
        calls.append(1)
        return run(self, tracer)

    monkeypatch.setattr(LocalSimulationBackend, "_hide_local_modules", hide_all)
    monkeypatch.setattr(LocalSimulationBackend, "_restore", restore_all)
    monkeypatch.setattr(LocalSimulationBackend, "__call__", counted)
    return calls


def remote_twin(model):
    """The same weights behind the simulated remote path."""
    return dataclasses.replace(model, remote="local")


def _trace_calling_lsa(model, tokens):
    """A hand-written trace whose block calls an lsa function (so the server needs lsa's code)."""
    act = model.envoy("mlp_act", 1)
    with model.trace(tokens, use_cache=False):
        positive = activation_totals(act.output)[0].save()
    return positive


def test_model_trace_ships_lsa_and_the_simulated_server_needs_it(server, monkeypatch):
    import nnsight.ndif

    local = tiny_model("gpt2")
    tokens = make_prompts(n=3, pos=6).clean
    seen = {}
    handle = local.module("mlp_act", 1).register_forward_hook(lambda m, i, o: seen.update(x=o))
    local.logits(tokens)
    handle.remove()
    want = (seen["x"] > 0).sum((0, 1))  # positive activations per neuron, by a plain hook
    assert torch.equal(_trace_calling_lsa(remote_twin(local), tokens), want)
    monkeypatch.setattr(lsa.model, "ship_lsa", lambda: None)
    monkeypatch.setattr(nnsight.ndif, "_PULLED_ENV", True)  # no automatic registration either
    cloudpickle.unregister_pickle_by_value(lsa)
    try:
        with pytest.raises(ModuleNotFoundError, match="lsa"):
            _trace_calling_lsa(remote_twin(local), tokens)
    finally:
        cloudpickle.register_pickle_by_value(lsa)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_patching_remote_equals_local_on_every_family(family, server):
    local = tiny_model(family)
    prompts = make_prompts(n=3, pos=6, lengths=[6, 4, 5])
    sites = ["head", "mlp_out", "resid_pre", "attn_out"] + ([] if local.adapter.parallel_residual else ["resid_mid"])
    for site in sites:
        a = activation_patching(local, prompts, site, progress=False)
        server.clear()
        b = activation_patching(remote_twin(local), prompts, site, progress=False)
        assert len(server) == 2 + local.adapter.n_layers, site  # two baselines, one expanded forward per layer
        assert torch.allclose(a.clean, b.clean, atol=TOL) and torch.allclose(a.corrupt, b.corrupt, atol=TOL)
        assert torch.allclose(a.patched, b.patched, atol=TOL), (site, (a.patched - b.patched).abs().max())
    a = activation_patching(local, prompts, "neuron", layers=[1], neurons=[0, 5, 7], positions="mid", progress=False)
    b = activation_patching(
        remote_twin(local), prompts, "neuron", layers=[1], neurons=[0, 5, 7], positions="mid", progress=False
    )
    assert torch.allclose(a.patched, b.patched, atol=TOL)


@pytest.mark.parametrize("family", ["gpt2", "bloom", "qwen2", "gpt_neox"])
def test_path_patching_remote_equals_local(family, server):
    local = tiny_model(family)
    prompts = make_prompts(n=3, pos=6)
    last = local.adapter.n_layers - 1
    for receivers, kind in [("logits", "q"), ([(last, 0)], "q"), ([(last, 1), (last - 1, 0)], "kv")]:
        a = path_patching(local, prompts, receivers=receivers, receiver_input=kind, progress=False)
        b = path_patching(remote_twin(local), prompts, receivers=receivers, receiver_input=kind, progress=False)
        assert torch.allclose(a.patched, b.patched, atol=TOL), (receivers, kind)
        assert a.patched.std() > 0  # the paths do something


@pytest.fixture(scope="module")
def zoo_pair():
    local = lsa.load_model("toy-bilingual", device="cpu")
    prompts = tasks.build("ioi", "en", local.tokenizer, n=12, seed=3)
    return local, prompts


def test_behaviour_and_ablation_remote_equal_local(zoo_pair, server):
    local, prompts = zoo_pair
    remote = remote_twin(local)
    a, b = behaviour.score(local, prompts), behaviour.score(remote, prompts)
    assert len(server) >= 1
    with torch.no_grad():  # independent: a plain Hugging Face forward, read at each prompt's end
        full = local.hf(prompts.clean).logits[torch.arange(len(prompts)), prompts.end]
    plain = full.gather(1, prompts.answer[:, None])[:, 0] - full.gather(1, prompts.distractor[:, None])[:, 0]
    assert torch.allclose(torch.tensor(a["logit_diff"].to_numpy()), plain, atol=1e-4)
    assert (a["logit_diff"] - b["logit_diff"]).abs().max() < 1e-4
    assert (a["top_predictions"] == b["top_predictions"]).all()
    heads = [("head", 2, 2), ("head", 0, 2)]
    fa = ablation.faithfulness(local, prompts, heads)
    fb = ablation.faithfulness(remote, prompts, heads)
    assert torch.allclose(fa.circuit, fb.circuit, atol=1e-4) and torch.allclose(fa.empty, fb.empty, atol=1e-4)


def test_circuit_discovery_remote_finds_the_same_circuit(zoo_pair, server):
    local, prompts = zoo_pair
    a = circuits.path_patching_discovery(local, prompts, max_steps=2).circuit
    server.clear()
    with pytest.warns(UserWarning, match="role suggestions"):
        b = circuits.path_patching_discovery(remote_twin(local), prompts, max_steps=2).circuit
    assert len(server) > 0
    assert a.keys == b.keys and len(a) > 0
    for key in a.keys:
        assert a.get(key).effect == pytest.approx(b.get(key).effect, abs=1e-4)


def test_remote_parameter_is_checked():
    with pytest.raises(ValueError, match="remote must be"):
        lsa.load_model("toy-bilingual", device="cpu", remote="yes")
    with pytest.raises(ValueError, match="exists only on this machine"):
        lsa.load_model("random:gpt2", remote=True)
    assert lsa.load_model("random:gpt2", remote="local").remote == "local"


def test_local_only_analyses_say_so_on_a_remote_model(zoo_pair):
    local, prompts = zoo_pair
    with pytest.raises(ValueError, match="remote"):
        flow.capture(remote_twin(local), prompts.clean[:2])


# ----------------------------------------------------------------- batch sizes that adapt to memory
def test_a_chunk_that_runs_out_of_memory_is_split_and_gives_the_same_result(monkeypatch):
    from lsa import engine

    model = tiny_model("gpt2")
    prompts = make_prompts(n=3, pos=6)
    want = activation_patching(model, prompts, "head", progress=False, batch_size=64)
    real, sizes = engine.run, []

    def small_memory(model, tokens, plan):
        sizes.append(tokens.shape[0])
        if tokens.shape[0] > 2 * len(prompts):
            raise torch.OutOfMemoryError("simulated: more than 2 interventions at once")
        return real(model, tokens, plan)

    monkeypatch.setattr(engine, "run", small_memory)
    got = activation_patching(model, prompts, "head", progress=False, batch_size=64)
    assert torch.allclose(got.patched, want.patched, atol=1e-6)
    assert max(sizes) > 2 * len(prompts) and sizes[-1] <= 2 * len(prompts)  # tried big, finished small
    path_want = path_patching(model, prompts, progress=False, batch_size=64)
    monkeypatch.setattr(engine, "run", real)
    assert torch.allclose(path_patching(model, prompts, progress=False, batch_size=64).patched, path_want.patched)


def test_the_token_budget_follows_free_gpu_memory(monkeypatch):
    from lsa import sweeps

    model = tiny_model("gpt2")
    assert sweeps.auto_max_tokens(model, 20) == sweeps.DEFAULT_MAX_TOKENS["cpu"]
    assert sweeps.auto_max_tokens(remote_twin(model), 20) == sweeps.DEFAULT_MAX_TOKENS["cuda"]
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    budgets = []
    for free in (2**30, 2**32):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 2**34))
        budgets.append(sweeps.auto_max_tokens(model, 20))
    assert budgets[1] == pytest.approx(4 * budgets[0], rel=1e-3) and budgets[0] > 1000
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1, 2**34))
    assert sweeps.auto_max_tokens(model, 20) == 20  # never below one prompt's width


@pytest.mark.parametrize("family", ["gpt2", "bloom", "qwen2"])
def test_attribution_patching_remote_equals_local(family, server):
    from lsa.attribution import attribution_patching

    local = tiny_model(family)
    prompts = make_prompts(n=3, pos=6, lengths=[6, 4, 5])
    sites = ["head", "mlp_out", "resid_pre"] + ([] if local.adapter.parallel_residual else ["resid_mid"])
    for site in sites:
        a = attribution_patching(local, prompts, site)
        server.clear()
        b = attribution_patching(remote_twin(local), prompts, site)
        assert len(server) == 3  # donor run, base run, base run with its backward
        assert torch.allclose(a.patched, b.patched, atol=1e-5), (site, (a.patched - b.patched).abs().max())
        assert a.effect.abs().max() > 0
    with pytest.raises(ValueError, match="steps=1 remotely"):
        attribution_patching(remote_twin(local), prompts, "head", steps=2)


# ----------------------------------------------------------------- the same notebooks, remote
REMOTE_NOTEBOOKS = {
    "00_quickstart": {"n_prompts": [12]},
    # edge attribution differentiates the model here: on NDIF the circuit notebooks run the paper's path patching
    "01_ioi_circuit": {"n_prompts": [12], "n_heldout": [12], "method": ["path-patching"], "max_steps": [2]},
    "03_compare_circuits": {"n_prompts": [12], "method": ["path-patching"]},
    "04_language_neurons": {"n_texts": [60]},
    "05_activation_patching": {"n_prompts": [12]},
}


def _numbers(value):
    if isinstance(value, bool) or isinstance(value, str):
        return [value]
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _numbers(value[k])]
    return [x for v in value for x in _numbers(v)]


@pytest.mark.parametrize("notebook", sorted(REMOTE_NOTEBOOKS))
def test_a_notebook_with_remote_local_saves_the_same_findings(notebook, tmp_path):
    import json
    import math

    from lsa import runner

    found = {}
    for remote in (False, "local"):
        params = {**REMOTE_NOTEBOOKS[notebook], "remote": [remote]}
        cells = runner.plan([notebook], ["toy-bilingual"], ["en"], params, tmp_path / str(remote))
        result = runner.run_grid(cells, progress=False, cell_timeout=300)  # a hung kernel fails in minutes
        assert [(c.label, c.error) for c in result.failed] == []
        (path,) = (tmp_path / str(remote)).rglob("findings.json")
        found[remote] = {k: v["value"] for k, v in json.loads(path.read_text()).items()}
    assert found[False] and found[False].keys() == found["local"].keys()
    for key in found[False]:
        a, b = _numbers(found[False][key]), _numbers(found["local"][key])
        assert len(a) == len(b), key
        for x, y in zip(a, b):
            same = x == y if isinstance(x, (bool, str)) else math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-4)
            assert same or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), (key, x, y)
