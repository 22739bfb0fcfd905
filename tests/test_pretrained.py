"""The real pretrained models (``gemma-3-270m``, ``smollm2-135m``) from the cache ``make models`` fills.

These load the converted float32 folders (``lsa.pretrained``), so they need
``make models`` first (``make test`` runs it); without it they fail with the
message that names that command. Few prompts, few layers: each model is loaded
once per module.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from test_patching import ref_patch_metric

import lsa
from lsa import flow, pretrained, tasks
from lsa.engine import Plan, run
from lsa.patching import activation_patching

GEMMA, SMOL = "gemma-3-270m", "smollm2-135m"


@pytest.fixture(scope="module")
def gemma():
    return lsa.load_model(GEMMA, device="cpu")


@pytest.fixture(scope="module")
def gemma_ioi(gemma):
    return tasks.build("ioi", "en", gemma.tokenizer, n=4, seed=0, prepend_bos=True)


def _plain_hf(name):
    """The converted folder loaded by transformers alone (eager attention, as lsa loads it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(pretrained.folder(name)), dtype=torch.float32, attn_implementation="eager"
    ).eval()


# ----------------------------------------------------------------- registry, cache, errors
def test_names_resolve_to_the_cache_and_an_empty_cache_names_the_install_command(tmp_path, monkeypatch):
    assert set(pretrained.NAMES) == {GEMMA, SMOL}
    for name in pretrained.NAMES:
        assert lsa.model.resolve_name(name) == str(pretrained.cache_dir() / name)
    monkeypatch.setenv("LSA_CACHE", str(tmp_path))
    with pytest.raises(pretrained.NotInstalled, match="make models"):
        lsa.load_model(GEMMA)
    # a folder converted from another GGUF (its record names another hash) is not valid either
    folder = tmp_path / "models" / SMOL
    folder.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_text("{}")
    (folder / "lsa.json").write_text(json.dumps({"sha256": "0" * 64}))
    assert not pretrained.is_installed(SMOL)
    (folder / "lsa.json").write_text(json.dumps({"sha256": pretrained.SMOLLM2.sha256}))
    assert pretrained.is_installed(SMOL)


def test_packages_are_installed_at_their_pins_and_the_ggufs_match_their_hashes(tmp_path):
    for name in pretrained.NAMES:
        assert pretrained.missing_packages(name) == []
    # SmolLM2's GGUF as shipped, hashed here independently
    path = pretrained.locate_gguf(SMOL, tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pretrained.SMOLLM2.sha256
    record = json.loads((pretrained.folder(GEMMA) / "lsa.json").read_text())
    assert (
        record["sha256"]
        == pretrained.GEMMA.sha256
        == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    )


def test_each_model_has_a_card_with_source_licence_and_the_dequantisation_caveat():
    for model in pretrained.NAMES.values():
        card = model.card.read_text()
        assert model.licence.split(" (")[0] in card
        assert "dequantised" in card and "4-bit" in card and "not equal" in card
        assert model.sha256 in card


# ----------------------------------------------------------------- Gemma 3 270M
def test_gemma_loads_with_its_real_geometry_and_its_logits_equal_the_hf_forward(gemma, gemma_ioi):
    ad = gemma.adapter
    assert (ad.model_type, ad.n_layers, ad.n_heads, ad.n_kv_heads, ad.d_head) == ("gemma3_text", 18, 4, 1, 256)
    assert (ad.d_model, ad.d_mlp, ad.d_vocab) == (640, 2048, 262144)
    assert gemma.meta["pretrained"]["sha256"] == pretrained.GEMMA.sha256
    hf = _plain_hf(GEMMA)
    tokens = gemma_ioi.clean
    rows = torch.arange(len(gemma_ioi))
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        want = out.logits[rows, gemma_ioi.end]
        # the same unembedding of the end rows alone: a matrix product of another shape rounds differently
        # (1.8e-5 on logits of about 15 on this CPU; within 1e-5 on the one this test was written on)
        want_end = hf.lm_head(out.hidden_states[-1][rows, gemma_ioi.end])
    got = run(gemma, tokens, Plan(end=gemma_ioi.end)).logits  # lsa's local executor, end positions only
    assert (got - want_end).abs().max() <= 1e-5
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (gemma.logits(tokens)[rows, gemma_ioi.end] - want).abs().max() <= 1e-5
    assert (want.argmax(-1) == gemma_ioi.answer).float().mean() >= 0.5  # it does the task (top-1, 4 prompts)


def test_gemma_per_head_writes_plus_bias_rebuild_the_attention_output(gemma, gemma_ioi):
    ad = gemma.adapter
    for layer in (0, 5, 17):
        seen = {}
        proj = gemma.module("o_proj", layer)
        h = proj.register_forward_hook(lambda m, i, o, seen=seen: seen.update(z=i[0].detach(), out=o.detach()))
        try:
            gemma.logits(gemma_ioi.clean[:2])
        finally:
            h.remove()
        z = seen["z"].view(*seen["z"].shape[:2], ad.n_heads, ad.d_head)
        per_head = torch.einsum("bphd,hdm->bphm", z, ad.o_proj_by_head(gemma.hf, layer))
        bias = ad.o_proj_bias(gemma.hf, layer)
        total = per_head.sum(2) + (0 if bias is None else bias)
        assert (total - seen["out"]).abs().max() <= 1e-4 * seen["out"].abs().max().clamp_min(1)
        assert (per_head.abs().amax(dim=(0, 1, 3)) > 0).all()


def test_gemma_head_patching_equals_a_plain_hook_reference(gemma, gemma_ioi):
    layers = [3, 17]
    res = activation_patching(gemma, gemma_ioi, "head", layers=layers, progress=False)
    assert res.array.shape == (2, 4)
    for row, patched in zip(res.components.to_dict("records"), res.patched):
        ref = ref_patch_metric(gemma, gemma_ioi, "head", row["layer"], row["head"], None)
        assert (patched - ref).abs().max() <= 1e-4, row


def test_gemma_route_parts_sum_to_each_residual_write(gemma, gemma_ioi):
    tokens = gemma_ioi.clean[:2, : int(gemma_ioi.lengths[:2].max())]
    ad = gemma.adapter
    got = {"pre": {}, "mid": {}, "post": {}}
    handles = []
    for layer in range(ad.n_layers):
        block = ad.block(gemma.hf, layer)
        handles += [
            block.register_forward_pre_hook(
                lambda m, a, k, layer=layer: got["pre"].__setitem__(layer, a[0] if a else k["hidden_states"]),
                with_kwargs=True,
            ),
            block.pre_feedforward_layernorm.register_forward_pre_hook(
                lambda m, a, layer=layer: got["mid"].__setitem__(layer, a[0])
            ),
            block.register_forward_hook(lambda m, a, o, layer=layer: got["post"].__setitem__(layer, o)),
        ]
    try:
        gemma.logits(tokens)
    finally:
        for h in handles:
            h.remove()
    acts = flow.capture(gemma, tokens)
    worst = 0.0
    for layer in range(ad.n_layers):
        parts, bias = flow.decompose_attention(gemma, acts, layer)
        write = got["mid"][layer] - got["pre"][layer]
        err = ((parts.sum((1, 3)) + bias) - write).abs().max() / write.abs().max()
        w_out = ad.mlp_out_weight(gemma.hf, layer).detach()
        ffn = (acts.neurons[layer] @ w_out) * acts.mlp_scale[layer]  # neuron parts, summed
        err_ffn = (ffn - (got["post"][layer] - got["mid"][layer])).abs().max() / ffn.abs().max()
        worst = max(worst, float(err), float(err_ffn))
    assert worst <= 1e-4


# ----------------------------------------------------------------- SmolLM2 135M
def test_smollm2_loads_and_its_logits_equal_the_hf_forward():
    model = lsa.load_model(SMOL, device="cpu")
    ad = model.adapter
    assert (ad.model_type, ad.n_layers, ad.n_heads, ad.n_kv_heads, ad.d_model) == ("llama", 30, 9, 3, 576)
    prompts = tasks.build("ioi", "en", model.tokenizer, n=4, seed=0)
    hf = _plain_hf(SMOL)
    rows = torch.arange(len(prompts))
    with torch.no_grad():
        out = hf(prompts.clean, output_hidden_states=True)
        want = out.logits[rows, prompts.end]
        want_end = hf.lm_head(out.hidden_states[-1][rows, prompts.end])  # end rows alone, as lsa unembeds
    got = run(model, prompts.clean, Plan(end=prompts.end)).logits
    assert (got - want_end).abs().max() <= 1e-5
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (model.logits(prompts.clean)[rows, prompts.end] - want).abs().max() <= 1e-5


def test_smollm2_steering_counts_the_chinese_characters_its_tokenizer_splits_into_byte_pieces():
    """SmolLM2's byte-level BPE splits Chinese characters; the share must come from each whole continuation."""
    import re

    from lsa import steering

    model = lsa.load_model(SMOL, device="cpu")
    tok = model.tokenizer
    text = "小明去了学校。"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 6 and sum("\ufffd" in tok.decode([i]) for i in ids) >= 2  # byte pieces, decoded alone
    assert steering.script_counts(tok.decode(ids)) == {"cjk": 6, "latin": 0, "undecodable": 0}
    prompts = ["小明今天去了", "The weather today is"]
    run = steering.steering_run(
        model, prompts, [steering.scale({10: [0, 1]}, 1.0)], target_script="cjk", max_new_tokens=8
    )
    new = steering.generate_ids(model, prompts, max_new_tokens=8)
    for i, row in run.iterrows():  # independent count: the tokenizer's own decode of all new tokens, one regex
        whole = tok.decode(new[i], skip_special_tokens=True)
        cjk, latin = len(re.findall(r"[\u4e00-\u9fff]", whole)), len(re.findall(r"[A-Za-z]", whole))
        assert row["baseline"] == row["steered"] == whole  # a x1.0 scale changes nothing
        assert row["chars_before"] == cjk + latin
        assert (row["share_before"] == cjk / (cjk + latin)) if cjk + latin else math.isnan(row["share_before"])
    summary = steering.steering_summary(run).iloc[0]
    assert summary["n_before"] + summary["excluded_before"] == summary["n_prompts"] == 2


def test_smollm2_position_map_keeps_one_layout_of_a_length_group_that_mixes_them():
    from transformers import AutoTokenizer

    from lsa.patching import position_labels, position_map_prompts

    tok = AutoTokenizer.from_pretrained(str(pretrained.folder(SMOL)))
    p = tasks.build("ioi", "en", tok, n=24, seed=0)
    mixed = p.by_length()[0]
    assert len(set(mixed.positions["IO"].tolist())) > 1  # a length group mixes templates (IO at 1, 3, 7 here)
    with pytest.warns(UserWarning, match="patching the largest"):
        group = position_map_prompts(mixed)
    for name in ("IO", "S1", "S2", "end"):
        assert len(set(group.positions[name].tolist())) == 1
    labels = position_labels(group, tok, list(range(group.clean.shape[1])))
    io = int(group.positions["IO"][0])
    assert labels[io].endswith("(IO)") and group.meta["io"].iloc[0].endswith(labels[io].split(":")[1].split(" ")[0])


# ----------------------------------------------------------------- random stand-ins
@pytest.mark.parametrize("name,shape", [(GEMMA, "google/gemma-3-270m"), (SMOL, "HuggingFaceTB/SmolLM2-135M")])
def test_random_stand_ins_have_the_real_models_layer_head_and_window_layout(name, shape):
    from transformers import AutoConfig

    from lsa.configs import PAPER_SHAPES, build_config

    real = AutoConfig.from_pretrained(str(pretrained.folder(name)))
    built = build_config(PAPER_SHAPES[shape])
    keys = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    keys += ("hidden_size", "intermediate_size", "vocab_size", "tie_word_embeddings", "rope_parameters")
    keys += ("layer_types", "sliding_window", "query_pre_attn_scalar", "final_logit_softcapping")
    for key in keys:
        assert getattr(built, key, None) == getattr(real, key, None), key
    narrow = lsa.load_model(f"random-narrow:{shape}")
    assert (narrow.adapter.n_layers, narrow.adapter.n_heads, narrow.adapter.n_kv_heads) == (
        real.num_hidden_layers,
        real.num_attention_heads,
        real.num_key_value_heads,
    )


# ----------------------------------------------------------------- typed text and another model's prompts
def test_gemma_typed_text_starts_with_bos_as_hf_tokenizes_it_and_as_the_builders_do(gemma, gemma_ioi):
    from widgets.heads import TYPED, HeadExplorer

    text = gemma_ioi.meta["clean_text"][0]
    tokens = gemma.to_tokens(text)[0]
    assert int(tokens[0]) == gemma.tokenizer.bos_token_id == 2
    assert tokens.tolist() == gemma.tokenizer(text)["input_ids"]  # HF's own special tokens: BOS and nothing else
    assert tokens.tolist() == gemma_ioi.clean[0, : int(gemma_ioi.lengths[0])].tolist()
    explorer = HeadExplorer(gemma, text="当小明和小红去商店时，小明把一杯饮料给了")
    assert explorer.prompt.value == TYPED and int(explorer.current["tokens"][0]) == 2


def test_prompts_built_with_smollm2s_tokenizer_are_refused_on_gemma_naming_both(gemma):
    from transformers import AutoTokenizer

    from lsa import behaviour

    smol = tasks.build("ioi", "en", AutoTokenizer.from_pretrained(pretrained.folder(SMOL)), n=4, seed=0)
    with pytest.raises(
        tasks.TokenizerMismatch, match=r"\(smollm2-135m: 49152 tokens.*gemma-3-270m's \(gemma-3-270m: 262144"
    ):
        behaviour.score(gemma, smol)
    with pytest.raises(tasks.TokenizerMismatch):
        activation_patching(gemma, smol, "head", progress=False)
