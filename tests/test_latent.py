"""Latent language: prompt builders against real tokenizers, the logit lens against plain Hugging Face
forwards on every family (locally and through the traced executor), token energy against Wendler et
al.'s formula written out, and the summaries against hand-made numbers."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import FAMILIES, gpt2_tokenizer, tiny_model
from transformers import AutoTokenizer

from lsa import bootstrap, latent
from lsa.tasks import DropReport, NoPrompts, TokenizerMismatch

TOY = Path(__file__).resolve().parent.parent / "data" / "models" / "toy-bilingual"


@pytest.fixture(scope="module")
def toy_tokenizer():
    return AutoTokenizer.from_pretrained(TOY)


def hand_set(model, n: int = 4, pos: int = 7, other: bool = True, seed: int = 0) -> latent.LatentSet:
    """Random right-padded prompts of different lengths with random target / other ids."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.adapter.d_vocab
    lengths = torch.tensor([pos - i % 3 for i in range(n)])
    tokens = torch.randint(3, vocab, (n, pos), generator=g)
    tokens[torch.arange(pos)[None] >= lengths[:, None]] = 1
    target = torch.randint(3, vocab, (n,), generator=g)
    other_id = (target + 1 + torch.randint(0, vocab - 5, (n,), generator=g)) % (vocab - 3) + 3
    return latent.LatentSet(
        task="repetition",
        source="en",
        target="en",
        other="zh" if other else None,
        tokens=tokens,
        lengths=lengths,
        target_id=target,
        other_id=other_id if other else torch.full((n,), -1),
        meta=pd.DataFrame(
            {"word": [f"w{i}" for i in range(n)], "other_word": [f"o{i}" if other else "" for i in range(n)]}
            | {"source_word": [f"w{i}" for i in range(n)], "clean_text": [f"prompt {i}" for i in range(n)]}
        ),
        report=DropReport(total=n, kept=n),
        template="hand",
        pad_id=1,
    )


def reference_lens(model, s: latent.LatentSet) -> np.ndarray:
    """``[prompt, layer + 1, vocab]`` probabilities from plain forwards of each unpadded prompt: the hidden
    states Hugging Face returns, through the model's final norm and unembedding; the last layer is the
    model's own output."""
    out = []
    norm, unembed = model.module("final_norm"), model.module("unembed")
    with torch.no_grad():
        for i in range(len(s)):
            tokens = s.tokens[i : i + 1, : int(s.lengths[i])]
            hf = model.hf(tokens, output_hidden_states=True)
            layers = [unembed(norm(h[0, -1])) for h in hf.hidden_states[: model.adapter.n_layers]]
            out.append(torch.stack([*layers, hf.logits[0, -1]]).softmax(-1))
    return torch.stack(out).numpy()


# ---------------------------------------------------------------------------- the lens
@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_probabilities_ranks_and_entropy_equal_a_plain_forward_with_hidden_states(family):
    model = tiny_model(family)
    s = hand_set(model)
    result = latent.lens(model, [s], k=3, batch_size=3)
    want = reference_lens(model, s)  # [prompt, layer + 1, vocab]
    n_points = model.adapter.n_layers + 1
    assert len(result.answers) == len(s) * n_points * 2
    for role, ids in (("target", s.target_id), ("other", s.other_id)):
        got = result.answers[result.answers["role"] == role].sort_values(["prompt", "layer"])
        expected = np.take_along_axis(want, ids.numpy()[:, None, None].repeat(n_points, 1), -1)[..., 0]
        np.testing.assert_allclose(got["prob"].to_numpy().reshape(len(s), n_points), expected, atol=1e-5, rtol=0)
        ranks = (want > expected[..., None]).sum(-1)
        assert (got["rank"].to_numpy().reshape(len(s), n_points) == ranks).all()
        assert set(got["language"]) == {"en" if role == "target" else "zh"}
    entropy = -(want * np.log2(want)).sum(-1)
    got = result.layers.sort_values(["prompt", "layer"])["entropy"].to_numpy().reshape(len(s), n_points)
    np.testing.assert_allclose(got, entropy, atol=1e-4, rtol=1e-5)
    top = result.top[result.top["rank"] == 0].sort_values(["prompt", "layer"])
    assert (top["token_id"].to_numpy().reshape(len(s), n_points) == want.argmax(-1)).all()
    assert result.answers["layer"].min() == -1 and result.answers["layer"].max() == model.adapter.n_layers - 1


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_the_lens_runs_inside_the_trace_on_a_remote_model_with_the_same_numbers(family):
    model = tiny_model(family)
    s = hand_set(model, n=3)
    local = latent.lens(model, [s], k=3)
    model.remote = "local"  # nnsight's simulation of NDIF: the trace is serialized and rebuilt here
    remote = latent.lens(model, [s], k=3)
    for name in ("answers", "top"):
        pd.testing.assert_frame_equal(getattr(local, name), getattr(remote, name), atol=1e-6, rtol=1e-5)
    assert remote.layers["energy"].isna().all() and local.layers["energy"].notna().all()
    np.testing.assert_allclose(remote.layers["entropy"], local.layers["entropy"], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_token_energy_is_wendlers_rms_cosine_with_the_normalised_unembedding_over_its_average(family):
    model = tiny_model(family)
    s = hand_set(model, n=2)
    result = latent.lens(model, [s], k=2)
    norm = model.module("final_norm")
    gain = norm.weight + 1 if family == "gemma3" else norm.weight  # Gemma's norms scale by 1 + w
    u = model.module("unembed").weight * gain  # [vocab, d_model], Wendler's U_weighted
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)  # Gemma's padding row is 0: it adds 0, and counts
    average = ((u.T @ u) ** 2).sum().sqrt() / u.shape[0]
    with torch.no_grad():
        hidden = model.hf(s.tokens[:1, : int(s.lengths[0])], output_hidden_states=True).hidden_states
    for layer in range(model.adapter.n_layers):  # hidden_states[l] is the input of block l
        x = hidden[layer][0, -1]
        x = x - x.mean() if isinstance(norm, torch.nn.LayerNorm) else x
        x = x / x.norm()
        want = (((u @ x) ** 2).mean().sqrt() / average).detach()
        got = result.layers.query("prompt == 0 and layer == @layer - 1")["energy"].item()
        assert got == pytest.approx(float(want), rel=1e-4)


def test_the_lens_refuses_prompts_built_with_another_tokenizer(toy_tokenizer):
    s = latent.build("repetition", "en", toy_tokenizer, n=8)
    with pytest.raises(TokenizerMismatch, match="repetition en prompts were built with another tokenizer"):
        latent.lens(tiny_model("gpt2"), [s])


def test_an_english_only_set_has_target_rows_alone_and_no_overtaking():
    model = tiny_model("qwen2")
    s = hand_set(model, other=False)
    result = latent.lens(model, {"repetition en": s}, k=2)
    assert set(result.answers["role"]) == {"target"}
    table = latent.overtaking(result)
    assert table["layer"].isna().all() and table["n"].tolist() == [len(s)]
    assert set(latent.summarize(result)["role"]) == {"target"}


# ---------------------------------------------------------------------------- building prompts
def _first_after(tokenizer, text: str, word: str) -> int:
    before = tokenizer.encode(text, add_special_tokens=False)
    after = tokenizer.encode(text + word, add_special_tokens=False)
    assert after[: len(before)] == before
    return after[len(before)]


@pytest.mark.parametrize("task", ["translation", "repetition"])
def test_toy_prompts_use_the_plain_template_and_score_first_tokens_absent_from_the_rest_of_the_prompt(
    toy_tokenizer, task
):
    s = latent.build(task, "zh", toy_tokenizer, source="en" if task == "translation" else None, other="en", n=20)
    assert s.template == latent.pick_template(toy_tokenizer) == "plain"
    assert len(s) == 20 and s.report.kept == 20 and s.report.bos is None
    for i, row in s.meta.iterrows():
        ids = s.tokens[i, : int(s.lengths[i])].tolist()
        assert ids == toy_tokenizer.encode(row.clean_text, add_special_tokens=False)
        assert row.clean_text.endswith(("，", f"{row.source_word}，"))
        target = _first_after(toy_tokenizer, row.clean_text, row.word)
        other = _first_after(toy_tokenizer, row.clean_text, " " + row.other_word)
        assert (int(s.target_id[i]), int(s.other_id[i])) == (target, other) and target != other
        query = len(toy_tokenizer.encode(row.clean_text.rsplit("。", 1)[0] + "。", add_special_tokens=False))
        assert target not in ids[:query] and other not in ids[:query]  # the demonstrations hold neither
    assert s.meta["word"].is_unique  # one prompt per word


def test_quoted_prompts_on_gpt2_follow_wendlers_lines_and_drop_chinese_it_spells_in_byte_pieces():
    tok = gpt2_tokenizer()
    assert latent.pick_template(tok) == "quoted"
    s = latent.build("cloze", "en", tok, n=10, seed=1)
    assert s.other is None and (s.other_id == -1).all()
    text = s.meta["clean_text"][0]
    assert text.count('Answer: "') == 3 and text.endswith('Answer: "') and "\n" in text
    assert int(s.target_id[0]) == _first_after(tok, text, s.meta["word"][0])
    with pytest.raises(NoPrompts, match="byte pieces"):
        latent.build("repetition", "zh", tok, n=10)
    with pytest.raises(NoPrompts, match="(?s)cloze en: only 4 prompts, 8 needed.*byte pieces"):
        latent.build_sets(latent.TASKS, ["en", "zh"], tok, n=8, verbose=False)  # 4 words have whole-token Chinese
    sets, skipped = latent.build_sets(latent.TASKS, ["en"], tok, n=8, verbose=False)
    assert sorted(sets) == ["cloze en", "repetition en"] and "two languages" in skipped["translation"]
    assert all(len(s) == 8 and s.other is None for s in sets.values())
    sets, skipped = latent.build_sets("cloze", ["en", "zh"], tok, n=4, verbose=False)  # 4 asked for: 4 will do
    assert list(sets) == ["cloze en"] and len(sets["cloze en"]) == 4 and "byte pieces" in skipped["cloze zh"]


def _data(words: list[dict], shots: int = 2) -> dict:
    data = latent.load_data()
    return {**data, "words": words, "shots": {task: shots for task in latent.TASKS}}


def test_the_drop_report_says_which_words_and_prompts_were_dropped_and_why():
    tok = gpt2_tokenizer()
    words = [
        {"en": "water", "zh": "shui"},
        {"en": "fire", "zh": "huo"},
        {"en": "pizza", "zh": "pizza"},  # one first token for both languages
        {"en": "sun", "zh": "taiyang"},
        {"en": "sunflower", "zh": "kui"},  # its first token is "sun", which is a demonstration's (or the query's)
        {"en": "moon", "zh": "月"},  # Chinese in GPT-2: byte pieces
    ]
    s = latent.build("translation", "en", tok, source="zh", data=_data(words), n=10, template="quoted", seed=0)
    counts = s.report.counts
    assert counts["words: target and other words share their first token"] == 1  # pizza
    assert counts["words: other word after the prompt: splits a character into byte pieces"] == 1  # 月
    assert s.report.vocabulary["words"] == (4, 6) and s.report.total == 4  # each usable word tried once
    sun = {"sun", "sunflower"} - set(s.meta["word"])
    assert counts["target word's first token occurs elsewhere in the prompt"] == len(sun) >= 1
    assert s.report.kept == len(s) == 4 - len(sun)


def test_bad_requests_are_clear_errors():
    tok = gpt2_tokenizer()
    with pytest.raises(ValueError, match="unknown task"):
        latent.build("summary", "en", tok)
    with pytest.raises(ValueError, match="must differ only for translation"):
        latent.build("translation", "en", tok)
    with pytest.raises(ValueError, match="must differ only for translation"):
        latent.build("repetition", "en", tok, source="zh")
    with pytest.raises(ValueError, match="unknown template"):
        latent.build("repetition", "en", tok, template="fancy")
    with pytest.raises(ValueError, match="unknown language"):
        latent.build("cloze", "fr", tok)
    with pytest.raises(NoPrompts, match="no cloze format"):
        latent.build("cloze", "en", tok, template="plain")


# ---------------------------------------------------------------------------- summaries
def _percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolated linearly between neighbours (numpy's default), by hand."""
    at = q * (len(ordered) - 1)
    below = math.floor(at)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (at - below) * (ordered[above] - ordered[below])


@pytest.mark.parametrize("n", [1, 5, 24, 57])
def test_the_median_interval_is_the_percentile_interval_of_resampled_medians(n):
    values = np.random.default_rng(n).normal(size=n)
    median, low, high = latent.median_interval(np.append(values, np.nan))  # NaN left out
    rows = bootstrap.resamples(n).tolist()  # the project's seeded resamples; medians and percentiles by hand
    medians = sorted(statistics.median(values[r] for r in row) for row in rows)
    assert median == pytest.approx(statistics.median(values))
    assert (low, high) == pytest.approx((_percentile(medians, 0.025), _percentile(medians, 0.975)))
    assert values.min() <= low <= median <= high <= values.max()
    assert all(math.isnan(v) for v in latent.median_interval([]))
    assert latent.median_interval([0.5] * 9) == (0.5, 0.5, 0.5)


def _lens_of(prob: np.ndarray) -> latent.LatentLens:
    """A LatentLens whose answers are ``prob[prompt, layer, role]`` (roles target, other; layers from -1)."""
    n, layers, _ = prob.shape
    rows = [
        dict(set="t", prompt=p, word=f"w{p}", layer=layer - 1, role=role, language=lang, token_id=r, token="x")
        | dict(prob=prob[p, layer, r], rank=0 if prob[p, layer, r] == prob[p, layer].max() else 1)
        for p in range(n)
        for layer in range(layers)
        for r, (role, lang) in enumerate((("target", "zh"), ("other", "en")))
    ]
    prompts = pd.DataFrame(
        {"set": "t", "task": "repetition", "source": "zh", "target": "zh", "other": "en", "prompt": range(n)}
    )
    return latent.LatentLens(answers=pd.DataFrame(rows), layers=pd.DataFrame(), top=pd.DataFrame(), prompts=prompts)


def test_overtaking_finds_where_the_other_language_leads_and_where_the_target_takes_over():
    # 8 prompts, 5 points (embedding, layers 0-3): noise, other ahead, other ahead, target ahead, target ahead
    rng = np.random.default_rng(0)
    base = np.array([[1e-9, 2e-9], [0.05, 0.4], [0.1, 0.3], [0.5, 0.2], [0.8, 0.05]])
    prob = base[None] * (1 + 0.1 * rng.random((8, 5, 2)))
    row = latent.overtaking(_lens_of(prob)).iloc[0]
    assert (row["task"], row["source"], row["target"], row["other"]) == ("repetition", "zh", "zh", "en")
    assert row["n"] == 8 and row["top1"] == 1.0
    assert row["layer"] == 2 and row["prompt_layer"] == 2 and row["ahead"] == 8
    assert row["other_leads"] == [0, 1] and row["target_leads"] == [2, 3]  # the embedding's 1e-9 is below the floor
    summary = latent.summarize(_lens_of(prob))
    medians = summary.query("role == 'other'").sort_values("layer")["median"].to_numpy()
    np.testing.assert_allclose(medians, np.median(prob[:, :, 1], axis=0))
    prob[:, -1] = [0.001, 0.002]  # the target never ends ahead: no takeover
    assert math.isnan(latent.overtaking(_lens_of(prob)).iloc[0]["layer"])


# ---------------------------------------------------------------------------- figures, explorer, report
def test_the_figure_draws_each_sets_medians_and_the_explorer_shows_one_words_layers():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lsa.plotting import latent as latent_plots
    from widgets import LatentExplorer

    model = tiny_model("llama")
    sets = {"repetition en": hand_set(model, n=3), "cloze en": hand_set(model, n=2, other=False, seed=1)}
    sets["cloze en"].task = "cloze"
    result = latent.lens(model, sets, k=2)
    summary = latent.summarize(result)
    fig = latent_plots.plot_curves(summary)
    target = summary.query("set == 'repetition en' and role == 'target'").sort_values("layer")
    assert fig.axes[0].lines[0].get_ydata().tolist() == pytest.approx(target["median"].tolist())
    assert [len(ax.lines) for ax in fig.axes] == [2, 1]  # the English-only set has no other language
    rows = latent.by_role(summary, latent.overtaking(result))
    assert rows[["set", "role"]].values.tolist() == [["repetition en", "target"], ["repetition en", "other"]] + [
        ["cloze en", "target"]
    ]
    assert rows["medians"][0] == pytest.approx(target["median"].tolist())

    explorer = LatentExplorer(result)
    explorer.set.value = "cloze en"
    explorer.word.value = 1
    table = explorer.current
    want = result.answers.query("set == 'cloze en' and prompt == 1").sort_values("layer")["prob"]
    assert len(table) == model.adapter.n_layers + 1 and table["p_target"].tolist() == pytest.approx(want.tolist())
    assert "p_other" not in table and explorer.word.label == "w1"
    assert explorer.figure is not None and explorer.prompt_html.value == "<pre>prompt 1</pre>"
    with pytest.raises(ValueError, match="no prompt 7"):
        latent.prompt_table(result, "cloze en", 7)
    plt.close("all")


def _run(findings: dict) -> dict:
    from lsa import findings as keys

    made = {}
    for (task, source, target), (top1, layer, leads, medians, ranks) in findings.items():
        made[keys.latent_top1(task, source, target)] = {"value": top1}
        made[keys.latent_overtake(task, source, target)] = {"value": layer}
        made[keys.latent_leads(task, source, target, "other")] = {"value": leads}
        made[keys.latent_median(task, source, target, "other")] = {"value": medians}
        made[keys.latent_rank(task, source, target, "other")] = {"value": ranks}
    prov = {"notebook": "06_latent_language.ipynb", "model": "gemma-3-270m", "language": "en+zh"}
    return {"provenance": prov, "findings": made}


def test_the_report_states_the_layers_language_against_both_papers_from_the_saved_numbers():
    from lsa import reproduce

    flat = [0.0, 0.0, 0.01, 0.0]  # embedding and layers 0-2
    run = _run(
        {
            ("repetition", "zh", "zh"): (0.9, 2.0, [0, 1], [0.0, 0.3, 0.2, 0.0], [900, 0, 1, 40]),
            ("cloze", "zh", "zh"): (0.2, float("nan"), [], flat, [900, 50, 30, 70]),
            ("translation", "en", "zh"): (0.8, 2.0, [1], [0.0, 0.1, 0.6, 0.0], [900, 3, 0, 9]),
            ("repetition", "en", "en"): (1.0, 1.0, [], flat, [900, 80, 14, 200]),
        }
    )
    chinese, english = reproduce.latent_language([run])
    assert "Gemma 3 270M agrees: English leads in the middle layers" in chinese  # cloze zh, top-1 0.2, does not count
    assert (
        "repetition zh (top-1 0.90): English leads at layers 0-1 (median probability at most 0.300, layer 0" in chinese
    )
    assert "cloze zh (top-1 0.20): English leads at no layer" in chinese and "the target never takes over" in chinese
    assert "translation en->zh (top-1 0.80): English leads at layer 1 (" in chinese
    assert "shows no Chinese phase" in english and "best median rank 14, layer 1" in english
    assert "the target leads from layer 1 (layers 0-2)" in english and "Translating" not in english
    run["findings"][next(k for k in run["findings"] if k.endswith("cloze_zh_zh_top1"))]["value"] = 0.7
    assert "agrees in part: English leads in 1 of 2 sets" in reproduce.latent_language([run])[0]
    assert reproduce.latent_language([]) == []
