"""Language-specific neurons: statistics, LAPE, masks, PLND importance, steering, report."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from lsa import engine
from lsa import neurons as N
from lsa import steering as S
from lsa.plotting import neurons as neuron_plots

STAT_FAMILIES = ("gpt2", "bloom", "qwen2", "gpt_neox", "mistral")


def _sequences(seed: int, n: int, lo: int = 3, hi: int = 97) -> list[list[int]]:
    """Token id lists of different lengths (so batches need padding)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(lo, hi, (int(torch.randint(2, 11, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def _reference_activations(model, seqs: list[list[int]]) -> torch.Tensor:
    """Neuron activations ``[n_tokens, d_mlp]`` of one layer-stack, one unpadded sequence at a time.

    Independent of the adapter's ``mlp_act`` module: for plain MLPs, the input of the
    output projection; for gated MLPs, ``silu(gate_proj(x))`` recomputed from the MLP input.
    """
    layers = []
    for layer in range(model.adapter.n_layers):
        mlp = model.module("mlp", layer)
        got = []
        if hasattr(mlp, "gate_proj"):
            hook = mlp.register_forward_pre_hook(lambda m, args, got=got: got.append(F.silu(m.gate_proj(args[0]))))
        else:
            out_proj = model.module("mlp_out", layer)
            hook = out_proj.register_forward_pre_hook(lambda m, args, got=got: got.append(args[0]))
        layers.append((hook, got))
    with torch.no_grad():
        for seq in seqs:
            model.hf(torch.tensor([seq]))
    for hook, _ in layers:
        hook.remove()
    return torch.stack([torch.cat(got, dim=1)[0] for _, got in layers])  # [layer, n_tokens, d_mlp]


@pytest.mark.parametrize("family", STAT_FAMILIES)
def test_activation_probability_and_mean_match_plain_hook_computation(family):
    model = tiny_model(family)
    texts = {"en": _sequences(1, 7), "zh": _sequences(2, 5)}
    stats = N.collect_stats(model, texts, batch_size=3, progress=False)
    for j, lang in enumerate(["en", "zh"]):
        acts = _reference_activations(model, texts[lang])  # [layer, n_tokens, d_mlp]
        assert int(stats.n_tokens[j]) == sum(len(s) for s in texts[lang]) == acts.shape[1]
        torch.testing.assert_close(stats.prob[j].float(), (acts > 0).float().mean(1), rtol=0, atol=1e-6)
        torch.testing.assert_close(stats.mean[j].float(), acts.mean(1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.std[j].float(), acts.std(1, unbiased=False), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.mean_abs[j].float(), acts.abs().mean(1), rtol=1e-4, atol=1e-5)


def test_a_neuron_held_constant_by_steering_has_zero_std():
    # std = sqrt(E[x^2] - E[x]^2): float32 sums left rounding noise (1.7e-4 to 1.1e-3 in the parity cases)
    model = tiny_model("llama")
    with S.steer(model, S.NeuronEdit({1: [3]}, "set", 0.7)):
        stats = N.collect_stats(model, {"en": _sequences(3, 6)}, progress=False)
    assert abs(float(stats.mean[0, 1, 3]) - 0.7) < 1e-6
    assert float(stats.std[0, 1, 3]) < 1e-6
    assert float(stats.std[0, 1, 4]) > 1e-3  # its neighbour varies


def test_mlp_act_module_fires_once_per_layer_per_forward_in_every_family():
    for family in ("gpt2", "bloom", "qwen2", "llama", "mistral", "gpt_neox"):
        model = tiny_model(family)
        calls = [0] * model.adapter.n_layers
        hooks = [
            model.module("mlp_act", i).register_forward_hook(
                lambda m, a, o, i=i, calls=calls: calls.__setitem__(i, calls[i] + 1)
            )
            for i in range(model.adapter.n_layers)
        ]
        with torch.no_grad():
            model.hf(torch.tensor([[5, 6, 7]]))
        for h in hooks:
            h.remove()
        assert calls == [1] * model.adapter.n_layers, family


def test_stats_from_strings_token_lists_tensors_and_dataset_rows_agree():
    model = tiny_model("gpt2")
    seqs = [[5, 6, 7, 8], [9, 30, 31], [40, 41, 42, 43]]
    as_text = [" ".join(f"w{t}" for t in s) for s in seqs]
    sources = {
        "strings": as_text,
        "lists": seqs,
        "rows": [{"text": t} for t in as_text],
        "batch": [
            {
                "input_ids": torch.tensor([s + [1] * (4 - len(s))]),
                "attention_mask": torch.tensor([[1] * len(s) + [0] * (4 - len(s))]),
            }
            for s in seqs
        ],
    }
    ref = N.collect_stats(model, {"x": [torch.tensor(s) for s in seqs]}, progress=False)
    for name, src in sources.items():
        got = N.collect_stats(model, {"x": src}, batch_size=2, progress=False)
        assert int(got.n_tokens[0]) == 11, name
        torch.testing.assert_close(got.n_positive, ref.n_positive, msg=name)
        torch.testing.assert_close(got.act_sum, ref.act_sum, rtol=1e-5, atol=1e-6, msg=name)


def test_stats_save_resume_and_merge_equal_one_pass(tmp_path):
    model = tiny_model("bloom")
    en, zh = _sequences(3, 10), _sequences(4, 6)
    full = N.collect_stats(model, {"en": en, "zh": zh}, batch_size=4, progress=False)
    path = tmp_path / "stats.pt"
    N.collect_stats(model, {"en": en[:5]}, batch_size=4, save_path=path, progress=False)
    assert int(N.NeuronStats.load(path).n_items[0]) == 5
    resumed = N.collect_stats(model, {"en": en, "zh": zh}, batch_size=4, save_path=path, progress=False)
    merged = N.collect_stats(model, {"en": en[:4]}, progress=False).merge(
        N.collect_stats(model, {"en": en[4:], "zh": zh}, progress=False)
    )
    for other in (resumed, merged, N.NeuronStats.load(path)):
        assert other.languages == ["en", "zh"]
        assert other.n_tokens.tolist() == full.n_tokens.tolist()
        torch.testing.assert_close(other.n_positive, full.n_positive)
        torch.testing.assert_close(other.act_sum, full.act_sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.sq_sum, full.sq_sum, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- LAPE on hand-made tables

# [layer][neuron] -> probabilities for (en, zh, fr)
HAND = [
    [[0.9, 0.05, 0.05], [0.5, 0.5, 0.5], [0.02, 0.01, 0.03], [0.05, 0.8, 0.7], [0.3, 0.3, 0.35]],
    [[0.1, 0.1, 0.95], [0.6, 0.4, 0.5], [0.01, 0.0, 0.0], [0.0, 0.0, 0.0], [0.15, 0.8, 0.05]],
]


def _hand_probs() -> torch.Tensor:
    return torch.tensor(HAND, dtype=torch.float64).permute(2, 0, 1)  # [lang, layer, neuron]


def _as_lists(masks):
    return [[m.tolist() for m in lang] for lang in masks]


def test_lape_selects_hand_computed_neurons_on_small_table():
    # 30 probabilities sorted: 5 zeros, .01 .01 .02 .03, four .05, .1 .1 (15th = 0.1), .15, .3 .3, .35, .4,
    # four .5 (21st-24th), .6, .7, .8 .8, .9, .95.
    # filter_rate .5 -> 15th value 0.1: neurons (0,2), (1,2), (1,3) never exceed it and are dropped.
    # Entropies of the rest: (0,0) .394, (1,0) .583, (1,4) .613, (0,3) .811, (1,1) 1.08, (0,4) 1.10, (0,1) 1.10.
    # top_rate .3 -> round(3.0) = 3 lowest: (0,0), (1,0), (1,4).
    # activation_bar_ratio .75 -> round(22.5) = 22 (Python rounds half to even) -> 0.5:
    # (0,0) en .9; (1,0) fr .95; (1,4) zh .8.
    result = N.lape(
        _hand_probs(), languages=["en", "zh", "fr"], top_rate=0.3, filter_rate=0.5, activation_bar_ratio=0.75
    )
    assert result.filter_value == pytest.approx(0.1)
    assert result.activation_bar == pytest.approx(0.5)
    assert _as_lists(result.masks) == [[[0], []], [[], [4]], [[], [0]]]
    assert set(zip(result.table.layer, result.table.neuron)) == {(0, 0), (1, 0), (1, 4)}
    assert result.entropy[0, 2] == float("inf") and result.entropy[1, 3] == float("inf")


def test_lape_assigns_a_neuron_to_every_language_above_the_bar():
    # same selection; bar at the 15th value 0.1: (1,4) has en .15 and zh .8 above it; (1,0) en/zh .1 are not above.
    result = N.lape(
        _hand_probs(), languages=["en", "zh", "fr"], top_rate=0.3, filter_rate=0.5, activation_bar_ratio=0.5
    )
    assert _as_lists(result.masks) == [[[0], [4]], [[], [4]], [[], [0]]]
    assert result.overlap().loc["en", "zh"] == 1
    assert result.counts().query("language == 'en'")["n_neurons"].tolist() == [1, 1]


def test_lape_published_defaults_on_a_400_neuron_table():
    # 4 layers x 100 neurons, 2 languages. Background neurons sit at (.5, .5): 784 values of .5, 6 special
    # values below and 10 above, so the 760th value (filter and bar at .95) is .5 and only neurons with a
    # probability above .5 survive. top_rate .01 -> 4 neurons: lowest entropies B .105, A .199, D .307, C .457.
    probs = torch.full((2, 4, 100), 0.5, dtype=torch.float64)
    special = {
        (0, 3): (0.95, 0.05),  # A -> en
        (1, 7): (0.02, 0.9),  # B -> zh
        (2, 11): (0.97, 0.2),  # C -> en
        (3, 20): (0.1, 0.99),  # D -> zh
        (3, 50): (0.8, 0.7),  # E: kept but high entropy
        (2, 60): (0.7, 0.6),  # F
        (0, 90): (0.6, 0.55),  # G
        (1, 99): (0.3, 0.3),  # H: filtered
    }
    for (layer, neuron), (en, zh) in special.items():
        probs[0, layer, neuron], probs[1, layer, neuron] = en, zh
    result = N.lape(probs, languages=["en", "zh"])
    assert result.params == {"top_rate": 0.01, "filter_rate": 0.95, "activation_bar_ratio": 0.95}
    assert _as_lists(result.masks) == [[[3], [], [11], []], [[], [7], [], [20]]]


def test_masks_round_trip_through_the_published_file_format(tmp_path):
    result = N.lape(
        _hand_probs(), languages=["en", "zh", "fr"], top_rate=0.3, filter_rate=0.5, activation_bar_ratio=0.5
    )
    path = result.save(tmp_path / "toy.neuron.pth")
    raw = torch.load(path)  # what the published ppl.py / generation.py read
    assert isinstance(raw, list) and all(isinstance(lang, list) for lang in raw)
    assert all(t.dtype == torch.long for lang in raw for t in lang)
    assert _as_lists(raw) == _as_lists(result.masks)
    # a file written the published way (plain torch.save of lists of LongTensors) loads by name
    torch.save([[torch.tensor([2, 5]).long(), torch.tensor([]).long()]], tmp_path / "pub.pth")
    loaded = N.load_masks(tmp_path / "pub.pth", languages=["en"])
    assert _as_lists([loaded["en"]]) == [[[2, 5], []]]
    with pytest.raises(ValueError, match="language names"):
        N.load_masks(tmp_path / "pub.pth", languages=["en", "zh"])


def test_plnd_importance_is_mean_abs_activation_times_output_row_norm():
    model = tiny_model("gpt2")
    stats = N.collect_stats(model, {"en": _sequences(5, 4), "zh": _sequences(6, 4)}, progress=False)
    imp = N.plnd_importance(model, stats)
    w = model.hf.transformer.h[1].mlp.c_proj.weight  # Conv1D: [d_mlp, d_model]
    torch.testing.assert_close(imp[1, 1].float(), (stats.mean_abs[1, 1] * w.norm(dim=1).double()).float())
    found = N.plnd_neurons(imp, ["en", "zh"], top_rate=0.05)
    for j in range(2):
        for layer, idx in enumerate(found.masks[j]):
            other = found.masks[1 - j][layer].tolist()
            assert not set(idx.tolist()) & set(other)


# ----------------------------------------------------------------- steering


def _logits_with_plain_hook(model, tokens, layer, fn):
    def hook(module, inputs, output):
        return fn(output.clone())

    h = model.module("mlp_act", layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model.hf(tokens).logits
    finally:
        h.remove()


@pytest.mark.parametrize("family", ["gpt2", "bloom", "qwen2", "gemma3"])
def test_steering_sets_scales_and_adds_exactly_the_chosen_neurons(family):
    model = tiny_model(family)
    tokens = torch.tensor([[5, 6, 7, 8, 9], [30, 31, 32, 33, 34]])
    idx = [1, 4, 7]
    stats = N.collect_stats(model, {"en": _sequences(7, 4), "zh": _sequences(8, 4)}, progress=False)
    zh_mean = stats.mean[1, 1, idx].float()
    diff = (stats.mean[1, 1, idx] - stats.mean[0, 1, idx]).float()

    def set_(o, v):
        o[..., idx] = v
        return o

    def mul(o):
        o[..., idx] *= 0.5
        return o

    def add(o, v):
        o[..., idx] += v
        return o

    cases = [
        (S.deactivate({1: idx}), lambda o: set_(o, 0.0)),
        (S.deactivate({1: idx}, value=-0.3), lambda o: set_(o, -0.3)),
        (S.scale({1: idx}, 0.5), mul),
        (S.activate({1: idx}, stats, "zh"), lambda o: set_(o, zh_mean)),
        (S.activate({1: idx}, stats, "zh", mode="add", strength=2.0), lambda o: add(o, 2 * zh_mean)),
        (S.shift({1: idx}, stats, "en", "zh"), lambda o: add(o, diff)),
    ]
    for edit, fn in cases:
        # the engine's run under steer(): its logits, and layer 1's activations after the edit
        with S.steer(model, edit), torch.no_grad():
            out = engine.run(model, tokens, engine.Plan(reads=[engine.Read("mlp_act", 1)], logits="all"))
        got, seen = out.logits, {"x": out[("mlp_act", 1)]}
        expected = _logits_with_plain_hook(model, tokens, 1, fn)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        plain = {}
        h = model.module("mlp_act", 1).register_forward_hook(
            lambda m, a, o, plain=plain: plain.__setitem__("x", o.clone())
        )
        with torch.no_grad():
            model.hf(tokens)
        h.remove()
        untouched = [i for i in range(model.adapter.d_mlp) if i not in idx]
        torch.testing.assert_close(seen["x"][..., untouched], plain["x"][..., untouched], rtol=0, atol=0)
        torch.testing.assert_close(seen["x"][..., idx], fn(plain["x"].clone())[..., idx], rtol=0, atol=0)


def test_steering_edits_are_dropped_even_when_the_block_raises_and_leave_no_hooks():
    model = tiny_model("gpt2")
    mask = [torch.tensor([0, 3]), torch.tensor([2])]
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    plain = model.logits(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with S.steer(model, S.deactivate(mask)):
            assert [(e.site, e.layer) for e in model.steering] == [("mlp_act", 0), ("mlp_act", 1)]
            assert not torch.allclose(model.logits(tokens), plain, atol=1e-4)
            raise RuntimeError("boom")
    assert model.steering == []
    torch.testing.assert_close(model.logits(tokens), plain, rtol=0, atol=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.hf.modules())


def test_steering_rejects_out_of_range_neurons():
    model = tiny_model("qwen2")
    with pytest.raises(IndexError, match="48 neurons"):
        with S.steer(model, S.deactivate({0: [48]})):
            pass
    with pytest.raises(IndexError, match="layer 5"):
        with S.steer(model, S.deactivate({5: [1]})):
            pass


def test_language_loss_matches_per_text_cross_entropy():
    model = tiny_model("gpt2")
    seqs = _sequences(9, 5)
    got = S.language_loss(model, {"en": seqs}, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            logits = model.hf(torch.tensor([s])).logits[0]
            total += float(F.cross_entropy(logits[:-1], torch.tensor(s[1:]), reduction="sum"))
            count += len(s) - 1
    assert got.loc[0, "n_tokens"] == count
    assert got.loc[0, "loss"] == pytest.approx(total / count, rel=1e-5)


def test_generation_under_deactivation_matches_a_plain_greedy_loop_with_an_independent_hook():
    model = tiny_model("bloom")
    prompt = [5, 6, 7]
    mask = {0: torch.arange(0, 128, 2)}
    got = S.generate_ids(model, "w5 w6 w7", edits=[S.deactivate(mask)], max_new_tokens=4)[0]

    def hook(m, a, o):
        o = o.clone()
        o[..., ::2] = 0
        return o

    h = model.module("mlp_act", 0).register_forward_hook(hook)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model.hf(torch.tensor([ids])).logits[0, -1].argmax()))
    h.remove()
    assert got == ids[3:]


def test_script_share_counts_cjk_and_latin_characters():
    # 小明了: 3 CJK characters; went, to: 6 Latin letters; 。 and spaces count for neither
    assert S.script_share(["小明", " went", "了", "。", " to"], "cjk") == pytest.approx(3 / 9)
    assert S.script_share("小明 went了。 to", "latin") == pytest.approx(6 / 9)
    assert S.script_share(["ひら", "한국", "ab"], "cjk") == pytest.approx(4 / 6)
    assert S.script_share([".", " "], "cjk") != S.script_share([".", " "], "cjk")  # nan: nothing to count
    assert S.script_share("\ufffd\ufffd", "cjk") != S.script_share("\ufffd", "cjk")  # byte pieces: nothing either
    with pytest.raises(ValueError, match="script"):
        S.script_share(["a"], "cyrillic")


def test_neuron_sets_read_masks_dicts_frames_and_pairs():
    import pandas as pd

    want = {0: [1, 3], 2: [0]}
    forms = [
        [torch.tensor([3, 1]), torch.tensor([], dtype=torch.long), torch.tensor([0])],
        {0: [1, 3], 2: [0]},
        pd.DataFrame({"layer": [0, 0, 2], "neuron": [3, 1, 0]}),
        [(0, 1), (2, 0), (0, 3)],
    ]
    for form in forms:
        assert {k: v.tolist() for k, v in N.as_neuron_set(form).items()} == want
    ctrl = N.random_like(want, 10, exclude=want, seed=1)
    assert {k: len(v) for k, v in ctrl.items()} == {0: 2, 2: 1}
    assert not set(ctrl[0].tolist()) & {1, 3}


def test_language_report_runs_end_to_end_on_a_random_model():
    model = tiny_model("gpt2")
    g = torch.Generator().manual_seed(0)
    words = lambda lo, hi: " ".join(f"w{int(i)}" for i in torch.randint(lo, hi, (6,), generator=g))
    texts = {"en": [words(30, 60) for _ in range(30)], "zh": [words(60, 97) for _ in range(30)]}
    report = N.language_report(
        model, texts, top_rate=0.05, n_random=2, n_prompts=2, max_new_tokens=3, strength=(1.0, 2.0), progress=False
    )
    assert report.stats.n_items.tolist() == [24, 24]
    lape_counts = report.counts.query("method == 'lape'")["n_neurons"]
    assert lape_counts.sum() == sum(N.neuron_count(m) for m in report.lape.masks)
    assert set(report.deactivation["evaluated"]) == {"en", "zh"}
    assert set(report.deactivation["method"]) == {"lape", "plnd"}
    # 2 methods x 2 strengths x 2 prompts
    assert len(report.steering) == 8 and set(report.steering["strength"]) == {1.0, 2.0}
    assert "language-specific neurons per layer" in report.summary()


def test_shipped_corpus_has_parallel_english_and_chinese_lines():
    en, zh = N.load_corpus("en"), N.load_corpus("zh")
    assert len(en) == len(zh) >= 200
    assert S.script_share(list("".join(zh)), "cjk") > 0.95
    assert S.script_share(" ".join(en).split(), "latin") == 1.0
    with pytest.raises(FileNotFoundError, match="available"):
        N.load_corpus("xx")


def test_study_texts_take_the_users_files_else_the_zoo_world_else_the_shipped_corpus(tmp_path):
    (tmp_path / "en.txt").write_text("  first text \n\nsecond text\nthird\n", encoding="utf-8")
    (tmp_path / "zh.txt").write_text("第一句。\n  第二句。\n", encoding="utf-8")
    files = {"en": str(tmp_path / "en.txt"), "zh": str(tmp_path / "zh.txt")}
    texts, source = N.study_texts("gemma-3-270m", ["en", "zh"], 2, files=files)
    assert texts == {"en": ["first text", "second text"], "zh": ["第一句。", "第二句。"]}
    assert source.startswith("your text files") and files["zh"] in source
    with pytest.raises(ValueError, match=r"no file for \['zh'\]"):
        N.study_texts("gemma-3-270m", ["en", "zh"], 2, files={"en": files["en"]})
    with pytest.raises(FileNotFoundError, match="one text per line"):
        N.study_texts("gemma-3-270m", ["en"], 2, files={"en": str(tmp_path / "none.txt")})
    shipped, source = N.study_texts("gemma-3-270m", ["zh"], 5)
    by_hand = (N.CORPUS_DIR / "zh.txt").read_text(encoding="utf-8").splitlines()[:5]
    assert shipped == {"zh": by_hand} and source == N.SHIPPED
    zoo, source = N.study_texts("toy-bilingual", ["en"], 3, seed=0)
    assert zoo == N.zoo_texts(("en",), n=3, seed=1234) and "toy zoo" in source


def test_figures_draw_the_counts_and_overlap_of_a_result():
    import matplotlib

    matplotlib.use("Agg")
    result = N.lape(
        _hand_probs(), languages=["en", "zh", "fr"], top_rate=0.3, filter_rate=0.5, activation_bar_ratio=0.5
    )
    ax = neuron_plots.plot_neurons_per_layer(result)
    heights = [p.get_height() for p in ax.patches]
    assert heights == [1, 1, 0, 1, 0, 1]  # en L0, L1; zh L0, L1; fr L0, L1 (hand-computed masks above)
    ax = neuron_plots.plot_overlap(result)
    assert ax.images[0].get_array().tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_collect_stats_rejects_texts_without_languages():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="language"):
        N.collect_stats(model, ["w5 w6"], progress=False)


def test_published_activation_files_load_as_stats(tmp_path):
    over_zero = {"en": torch.tensor([[3, 0, 5]], dtype=torch.int32), "zh": torch.tensor([[1, 4, 5]], dtype=torch.int32)}
    files = {}
    for lang, oz in over_zero.items():
        files[lang] = tmp_path / f"activation.{lang}.train.toy"
        s1 = oz.double() * 0.5
        torch.save(dict(n=10, sum1=s1, sum2=s1 * 2, sum3=s1, sum4=s1, over_zero=oz), files[lang])
    stats = N.NeuronStats.from_lape_files(files)
    assert stats.languages == ["en", "zh"]
    assert stats.prob[:, 0].tolist() == [[0.3, 0.0, 0.5], [0.1, 0.4, 0.5]]
    assert stats.mean[0, 0].tolist() == [0.15, 0.0, 0.25]
