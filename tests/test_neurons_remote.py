"""Language-specific neurons on a remote model: nnsight traces give what the local hooks give.

``remote="local"`` runs nnsight's simulation of NDIF: every trace is serialized,
rebuilt with lsa's modules hidden and run on the same weights, so the remote path
must reproduce the hook path of the same model exactly.
"""

from __future__ import annotations

import pytest
import torch

import lsa
from lsa import engine
from lsa import neurons as N
from lsa import steering as S

PROMPTS = ["When Mary and John", "小明和"]


@pytest.fixture(scope="module")
def models():
    local = lsa.load_model("toy-bilingual", device="cpu")
    remote = lsa.load_model("toy-bilingual", device="cpu", remote="local")
    assert not local.remote and remote.remote == "local"
    return local, remote


@pytest.fixture(scope="module")
def texts():
    # different lengths in each batch of 3, so padding is masked out
    return {"en": N.load_corpus("en")[:5], "zh": N.load_corpus("zh")[:4]}


@pytest.fixture(scope="module")
def stats(models, texts):
    local, remote = models
    return tuple(N.collect_stats(m, texts, batch_size=3, progress=False) for m in (local, remote))


def _edits(stats):
    return [
        S.deactivate({0: torch.arange(0, 256, 3), 2: [1, 5, 9]}),
        S.activate({1: [4, 7, 30]}, stats, "zh", strength=3.0),
    ]


def test_remote_statistics_equal_the_hook_statistics(stats):
    local, remote = stats
    assert remote.languages == local.languages == ["en", "zh"]
    assert remote.n_tokens.tolist() == local.n_tokens.tolist()
    assert remote.n_items.tolist() == [5, 4]
    assert torch.equal(remote.n_positive, local.n_positive)
    for name in ("act_sum", "abs_sum", "sq_sum"):
        torch.testing.assert_close(getattr(remote, name), getattr(local, name), rtol=1e-6, atol=1e-6, msg=name)
    assert 0 < float(local.prob.mean()) < 1


def test_remote_positive_counts_match_an_independent_plain_hook(models, texts, stats):
    local, _ = models
    layer, picked = 2, [0, 17, 63, 200]
    counts = torch.zeros(len(picked), dtype=torch.long)
    sums = torch.zeros(len(picked), dtype=torch.float64)
    act = local.hf.transformer.h[layer].mlp.act  # GPT-2's activation module, found without lsa's adapter

    def hook(module, inputs, output):
        nonlocal counts, sums
        x = output[0, :, picked]
        counts += (x > 0).sum(0)
        sums += x.double().sum(0)

    handle = act.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for text in texts["zh"]:  # one unpadded text at a time
                local.hf(torch.tensor([local.tokenizer(text)["input_ids"]]))
    finally:
        handle.remove()
    remote = stats[1]
    j = remote.lang_index("zh")
    assert remote.n_positive[j, layer, picked].tolist() == counts.tolist()
    torch.testing.assert_close(remote.act_sum[j, layer, picked], sums, rtol=1e-5, atol=1e-5)


def test_remote_layer_activations_importance_and_promoted_tokens_equal_local(models, texts, stats):
    local, remote = models
    a = N.record_activations(local, texts, 1, max_texts=3, batch_size=2)
    b = N.record_activations(remote, texts, 1, max_texts=3, batch_size=2)
    assert b.acts.shape == a.acts.shape == (len(a.tokens), local.adapter.d_mlp)
    assert b.tokens.equals(a.tokens)
    torch.testing.assert_close(b.acts, a.acts, rtol=0, atol=0)
    torch.testing.assert_close(N.plnd_importance(remote, stats[1]), N.plnd_importance(local, stats[0]))
    assert N.promoted_tokens(remote, 3, 11, k=4).equals(N.promoted_tokens(local, 3, 11, k=4))


def test_remote_language_loss_under_edits_equals_local(models, texts, stats):
    local, remote = models
    edits = _edits(stats[0])
    base = S.language_loss(local, texts, batch_size=3)
    want = S.language_loss(local, texts, edits=edits, batch_size=3)
    got = S.language_loss(remote, texts, edits=edits, batch_size=3)
    assert got["n_tokens"].tolist() == want["n_tokens"].tolist()
    assert got["loss"].tolist() == pytest.approx(want["loss"].tolist(), rel=1e-6)
    assert (want["loss"] - base["loss"]).abs().min() > 1e-3  # the edits do change the loss


def test_remote_greedy_generation_under_an_edit_equals_local(models, stats):
    local, remote = models
    edits = _edits(stats[0])
    want = S.generate_ids(local, PROMPTS, edits=edits, max_new_tokens=4)
    assert S.generate_ids(remote, PROMPTS, edits=edits, max_new_tokens=4) == want
    assert want != S.generate_ids(local, PROMPTS, max_new_tokens=4)  # the edits change the continuation
    # steer() around lsa's measurements on a remote model, nested blocks applied in order
    with S.steer(remote, edits[0]):
        with S.steer(remote, edits[1]):
            assert _active(remote) == _layers(edits)
            assert S.generate(remote, PROMPTS[0], max_new_tokens=4) == [local.tokenizer.decode(want[0])]
        assert _active(remote) == _layers(edits[:1])
    assert _active(remote) == []


def _active(model) -> list[tuple[str, int]]:
    """The sites and layers of the model's active steering edits, outermost block first."""
    return [(e.site, e.layer) for e in model.steering]


def _layers(edits) -> list[tuple[str, int]]:
    """What steer() adds for these neuron edits: one mlp_act edit per edited layer, in edit order."""
    return [("mlp_act", layer) for e in edits for layer in sorted(e.neurons)]


def test_remote_forward_and_a_users_own_trace_apply_the_edits_and_steer_cleans_up(models, stats):
    local, remote = models
    ids = local.to_tokens("When Mary and John went to the store")
    edits = _edits(stats[0])
    with S.steer(local, *edits):
        want = S.forward(local, ids)
    with S.steer(remote, edits[0]), S.steer(remote, edits[1]):  # the outer block's edit, then the inner one's
        prepared = engine.prepare(remote)  # before the trace: the request carries the edits, not the model
    with torch.no_grad(), remote.trace(ids):
        prepared.apply()
        own = remote.nn.output.logits.cpu().save()
    with S.steer(remote, *edits):
        got = S.forward(remote, ids)
    assert not torch.allclose(want, local.logits(ids), atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(own, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"):
        with S.steer(remote, *edits):
            raise RuntimeError("boom")
    assert _active(remote) == []
    assert all(not remote.module("mlp_act", i)._forward_hooks for i in range(remote.adapter.n_layers))
    with pytest.raises(IndexError, match="layer 7"):
        with S.steer(remote, S.deactivate({7: [1]})):
            pass
