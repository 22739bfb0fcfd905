"""Task builders against real tokenizers: GPT-2's byte-level BPE for English, a word/character tokenizer for Chinese.

Every check re-tokenizes or decodes the texts independently of the builder.
"""

from __future__ import annotations

import copy
import re
from functools import cache

import pytest
import torch
from helpers import gpt2_tokenizer, word_tokenizer
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lsa import tasks
from lsa.splits import is_heldout


@cache
def gpt2():
    return gpt2_tokenizer()


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def dec(tok, ids):
    return tok.decode([int(i) for i in ids])


@cache
def chinese_tokenizer(bos: bool = False, missing: tuple[str, ...] = ()):
    """Names and verbs of the Chinese data as whole tokens, every other character its own token.

    Words in ``missing`` are still cut as one piece but left out of the vocabulary (they become <unk>).
    """
    words = set(tasks.all_names(tasks.load_data("ioi", "zh")))
    words |= {v["verb"] for v in tasks.load_data("past_tense", "zh")["verbs"]}
    words = sorted(words, key=len, reverse=True)
    chars = sorted({c for t in tasks.TASKS for c in str(tasks.load_data(t, "zh"))} | set("了长"))
    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2}
    for w in words + chars:
        if w not in missing:
            vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(map(re.escape, words)) + "|."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>")


def test_gpt2_tokenizer_gives_the_real_gpt2_ids():
    tok = gpt2()
    assert enc(tok, " Mary") == [5335]
    assert enc(tok, " John") == [1757]
    assert len(tok) == 50257


# ---------------------------------------------------------------------------
# data files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("language", tasks.LANGUAGES)
def test_ioi_data_files_have_enough_names_templates_and_varied_endings(language):
    data = tasks.load_data("ioi", language)
    assert len(set(data["names"])) >= 100
    assert len(data["places"]) >= 10 and len(data["objects"]) >= 10
    templates = data["templates"]
    assert len(templates) >= 15
    assert len({t["id"] for t in templates}) == len(templates)
    splits = [t["split"] for t in templates]
    assert set(splits) == {"train", "heldout"} and 3 <= splits.count("heldout") <= 4
    for t in templates:
        assert t["text"].count("{S}") == 2 and t["text"].count("{IO}") == 1, t["id"]
    io_first = [t["text"].index("{IO}") < t["text"].index("{S}") for t in templates]
    assert any(io_first) and not all(io_first)
    last = {t["text"][-1] if language == "zh" else t["text"].split()[-1] for t in templates if t["split"] == "train"}
    assert len(last) >= 4
    # every held-out ending also ends some training template (NOTES: unseen final tokens fail)
    held_last = {
        t["text"][-1] if language == "zh" else t["text"].split()[-1] for t in templates if t["split"] != "train"
    }
    assert held_last <= last


def test_past_tense_data_files_have_enough_verbs_adverbs_and_templates():
    en, zh = tasks.load_data("past_tense", "en"), tasks.load_data("past_tense", "zh")
    assert len(en["verbs"]) >= 100 and len(zh["verbs"]) >= 40
    assert all(v["present"] != v["past"] and v["rest"] for v in en["verbs"])
    assert len({v["present"] for v in en["verbs"]}) == len(en["verbs"])
    assert len({v["verb"] for v in zh["verbs"]}) == len(zh["verbs"])
    for data in (en, zh):
        assert len(data["past_adverbs"]) >= 5 and len(data["habitual_adverbs"]) >= 5
        assert len(data["templates"]) >= 6
        assert {t["split"] for t in data["templates"]} == {"train", "heldout"}


# ---------------------------------------------------------------------------
# IOI, English, GPT-2 BPE
# ---------------------------------------------------------------------------


def span_text(tok, ids, row, last, width):
    """The text of the ``width`` tokens ending at ``last`` in row ``row`` of ``ids``."""
    return dec(tok, ids[row, last - width + 1 : last + 1])


def continuation(tok, text, word):
    """The first token ``word`` adds after ``text``, by re-encoding (None when it merges with ``text``)."""
    ids, full = enc(tok, text), enc(tok, text + word)
    return full[len(ids)] if full[: len(ids)] == ids and len(full) > len(ids) else None


def test_ioi_en_positions_answers_and_texts_decode_to_the_names():
    tok = gpt2()
    p = tasks.build("ioi", "en", tok, n=40, seed=1)
    assert len(p) == 40
    assert torch.equal(p.positions["end"], p.lengths - 1)
    for i in range(len(p)):
        m = p.meta.iloc[i]
        n = int(p.lengths[i])
        assert p.clean[i, :n].tolist() == enc(tok, m.clean_text)
        assert p.corrupt[i, :n].tolist() == enc(tok, m.corrupt_text)
        assert (p.clean[i, n:] == p.pad_id).all() and (p.corrupt[i, n:] == p.pad_id).all()
        assert dec(tok, p.clean[i, :n]) == m.clean_text
        assert m.io_tokens == len(enc(tok, " " + m.io)) and m.s_tokens == len(enc(tok, " " + m.s))
        assert span_text(tok, p.clean, i, p.positions["IO"][i], m.io_tokens).strip() == m.io
        assert span_text(tok, p.clean, i, p.positions["S1"][i], m.s_tokens).strip() == m.s
        assert span_text(tok, p.clean, i, p.positions["S2"][i], m.s_tokens).strip() == m.s
        assert p.positions["S1"][i] < p.positions["S2"][i]
        assert int(p.answer[i]) == continuation(tok, m.clean_text, " " + m.io)
        assert int(p.distractor[i]) == continuation(tok, m.clean_text, " " + m.s)
        assert p.answer[i] != p.distractor[i]


def test_ioi_counterfactual_puts_three_distinct_new_names_in_the_slots():
    tok = gpt2()
    p = tasks.build("ioi", "en", tok, n=40, seed=2)
    for i in range(len(p)):
        m = p.meta.iloc[i]
        widths = (m.io_tokens, m.s_tokens, m.s_tokens)
        got = [span_text(tok, p.corrupt, i, p.positions[k][i], w).strip() for k, w in zip(("IO", "S1", "S2"), widths)]
        assert got == [m.corrupt_io, m.corrupt_s1, m.corrupt_s2]
        assert len(set(got)) == 3 and not set(got) & {m.io, m.s}
        # everything outside the three name spans is the same token
        same = p.clean[i] == p.corrupt[i]
        for k, w in zip(("IO", "S1", "S2"), widths):
            same[p.positions[k][i] - w + 1 : p.positions[k][i] + 1] = True
        assert same.all()


def test_every_kept_pair_has_equal_token_lengths():
    tok = gpt2()
    for task in tasks.TASKS:
        p = tasks.build(task, "en", tok, n=60, seed=3)
        for m, n in zip(p.meta.itertuples(), p.lengths.tolist()):
            assert len(enc(tok, m.clean_text)) == len(enc(tok, m.corrupt_text)) == n


MULTI = ["Bartholomew", "Maximiliana", "Philomena", "Gwendolyn", "Tiberius", "Eglantine", "Ella", "Irene"]


def test_multi_token_names_are_spans_whose_last_token_is_the_position():
    tok = gpt2()
    data = copy.deepcopy(tasks.load_data("ioi", "en"))
    data["names"] = MULTI + ["Mary", "John", "Tom", "Sam", "Anna", "Kate"]
    widths = {x: len(enc(tok, " " + x)) for x in data["names"]}
    assert {widths[x] for x in MULTI} == {2, 3}  # GPT-2 cuts these into 2 or 3 pieces
    p = tasks.build_ioi("en", tok, n=60, data=data, seed=1)
    assert len(p) == 60 and p.report.vocabulary["names"] == (14, 14)
    used = set(p.meta.io) | set(p.meta.s)
    assert len(used & set(MULTI)) >= 4
    for i in range(len(p)):
        m = p.meta.iloc[i]
        assert (m.io_tokens, m.s_tokens) == (widths[m.io], widths[m.s])
        # the counterfactual names have the clean names' token lengths, so the spans sit at the same places
        assert (widths[m.corrupt_io], widths[m.corrupt_s1], widths[m.corrupt_s2]) == (
            widths[m.io],
            widths[m.s],
            widths[m.s],
        )
        for k, name, cname in (("IO", m.io, m.corrupt_io), ("S1", m.s, m.corrupt_s1), ("S2", m.s, m.corrupt_s2)):
            last = int(p.positions[k][i])
            assert enc(tok, m.clean_text)[last - widths[name] + 1 : last + 1] == enc(tok, " " + name)
            assert enc(tok, m.corrupt_text)[last - widths[name] + 1 : last + 1] == enc(tok, " " + cname)
        assert int(p.answer[i]) == enc(tok, " " + m.io)[0] and int(p.distractor[i]) == enc(tok, " " + m.s)[0]


def test_names_too_long_or_in_byte_pieces_are_dropped_with_their_reason():
    tok = gpt2()
    data = copy.deepcopy(tasks.load_data("ioi", "en"))
    data["names"] = data["names"][:30] + ["Xochiquetzal", "张伟", "Mary"]  # Mary twice: counted once
    assert len(enc(tok, " Xochiquetzal")) == 5
    assert "\ufffd" in dec(tok, enc(tok, " 张伟")[:1])  # GPT-2 cuts a Chinese character into bytes
    p = tasks.build_ioi("en", tok, n=50, data=data)
    assert p.report.vocabulary["names"] == (30, 32)
    assert p.report.counts["names: more than 3 tokens"] == 1
    assert p.report.examples["names: more than 3 tokens"][0] == "' Xochiquetzal' -> [' X', 'och', 'iqu', 'etz', 'al']"
    assert p.report.counts["names: splits a character into byte pieces"] == 1
    used = set(p.meta.io) | set(p.meta.s) | set(p.meta.corrupt_io) | set(p.meta.corrupt_s1) | set(p.meta.corrupt_s2)
    assert used <= set(data["names"][:30])
    assert "names: more than 3 tokens" in p.report.table().reason.tolist()


def test_names_sharing_their_first_token_are_not_answer_and_distractor():
    tok = gpt2()
    assert enc(tok, " Maximiliana")[0] == enc(tok, " Max")[0]  # " Max" + "imil" + "iana"
    data = copy.deepcopy(tasks.load_data("ioi", "en"))
    names = ["Max", "Mary", "John", "Tom", "Sam", "Anna"] + MULTI[:6]  # six of 1 token, six of 3
    data["names"], data["places"], data["objects"] = names, ["park"], ["book"]
    data["templates"] = data["templates"][:1]
    p = tasks.build_ioi("en", tok, n=500, data=data)
    pairs = set(zip(p.meta.io, p.meta.s))
    first = {x: enc(tok, " " + x)[0] for x in names}
    clash = {(a, b) for a in names for b in names if a != b and first[a] == first[b]}
    assert clash == {("Max", "Maximiliana"), ("Maximiliana", "Max")}
    assert len(pairs) == 12 * 11 - 2 and not pairs & clash  # one template: a prompt per other ordered pair
    assert p.report.counts["answer and distractor share their first token"] > 0
    assert "both start with ' Max'" in p.report.examples["answer and distractor share their first token"][0]


def test_same_seed_gives_same_prompts_and_another_seed_differs():
    tok = gpt2()
    a, b = tasks.build("ioi", "en", tok, n=30, seed=7), tasks.build("ioi", "en", tok, n=30, seed=7)
    c = tasks.build("ioi", "en", tok, n=30, seed=8)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupt, b.corrupt)
    assert a.meta.equals(b.meta)
    assert a.meta.clean_text.tolist() != c.meta.clean_text.tolist()


def test_no_usable_name_raises_an_error_naming_the_name_filter():
    data = copy.deepcopy(tasks.load_data("ioi", "en"))
    data["names"] = ["Xochiquetzal", "Ermengarde", "Quetzalcoatl", "Wilhelmina", "Euphrosyne", "Hildegarde"]
    assert all(len(enc(gpt2(), " " + x)) > 3 for x in data["names"])
    with pytest.raises(ValueError, match=r"only 0 of 6 names are usable.*6 dropped: names: more than 3 tokens"):
        tasks.build_ioi("en", gpt2(), data=data)


@pytest.mark.parametrize("split", tasks.SPLITS)
def test_ioi_split_filters_follow_is_heldout_and_template_splits(split):
    p = tasks.build("ioi", "en", gpt2(), n=120, split=split, seed=4)
    template_split = {t["id"]: t["split"] for t in tasks.load_data("ioi", "en")["templates"]}
    splits = {template_split[t] for t in p.meta.template}
    held = {is_heldout(io, s) for io, s in zip(p.meta.io, p.meta.s)}
    if split == "train":
        assert splits == {"train"} and held == {False}
    elif split == "heldout_pairs":
        assert splits == {"train"} and held == {True}
    elif split == "heldout_templates":
        assert splits == {"heldout"}
    else:
        assert splits == {"train", "heldout"} and held == {True, False}


def test_unknown_task_language_split_or_variant_lists_the_valid_ones():
    tok = gpt2()
    with pytest.raises(ValueError, match=r"unknown task 'tense'.*'ioi', 'past_tense'"):
        tasks.build("tense", "en", tok)
    with pytest.raises(ValueError, match=r"unknown language 'fr'.*'en', 'zh'"):
        tasks.build("ioi", "fr", tok)
    with pytest.raises(ValueError, match=r"unknown split 'test'.*'heldout_pairs'"):
        tasks.build("ioi", "en", tok, split="test")
    with pytest.raises(ValueError, match=r"unknown variant 'marking'.*'abc'"):
        tasks.build("ioi", "en", tok, variant="marking")
    with pytest.raises(ValueError, match=r"unknown variant 'inflect'.*'copy', 'marking'"):
        tasks.build("past_tense", "en", tok, variant="inflect")


def test_fewer_prompts_than_requested_is_visible_in_the_report():
    data = copy.deepcopy(tasks.load_data("ioi", "en"))
    data["names"], data["places"], data["objects"] = ["Mary", "John", "Tom", "Sam", "Max"], ["park"], ["book"]
    data["templates"] = data["templates"][:1]
    p = tasks.build_ioi("en", gpt2(), n=500, data=data)
    assert len(p) == 5 * 4  # one template, one place, one object: a prompt per ordered name pair
    assert p.report.kept == 20 and p.report.requested == 500
    assert "(500 requested)" in str(p.report) and p.report.counts["duplicate of an earlier prompt"] > 0


# ---------------------------------------------------------------------------
# past tense, English
# ---------------------------------------------------------------------------


def test_past_tense_en_answer_is_the_past_form_and_positions_hit_verb_adverb_name():
    tok = gpt2()
    p = tasks.build("past_tense", "en", tok, n=40, seed=5)
    verbs = {v["present"]: v for v in tasks.load_data("past_tense", "en")["verbs"]}
    for i in range(len(p)):
        m = p.meta.iloc[i]
        n = int(p.lengths[i])
        assert dec(tok, p.clean[i, :n]) == m.clean_text
        low = lambda x: x[0].lower() + x[1:]
        assert m.corrupt_text in (
            m.clean_text.replace(f"{m.adverb},", f"{m.habitual},"),
            m.clean_text.replace(f"{low(m.adverb)},", f"{low(m.habitual)},"),
        )
        assert m.corrupt_text != m.clean_text
        assert int(p.answer[i]) == continuation(tok, m.clean_text, " " + verbs[m.verb]["past"])
        assert int(p.distractor[i]) == continuation(tok, m.clean_text, " " + m.verb)
        assert p.answer[i] != p.distractor[i]
        # verb and name2 are each word's last token: the text up to it ends with the word, the next token is new
        for key, word in (("verb", m.verb), ("name2", m["name"])):
            at = int(p.positions[key][i])
            assert dec(tok, p.clean[i, : at + 1]).endswith(" " + word)
            assert at + 1 == n or dec(tok, [p.clean[i, at + 1]])[0] in " ,."
        # the adverb position is the adverb's last token: the text up to it ends with the adverb
        upto = dec(tok, p.clean[i, : p.positions["adverb"][i] + 1])
        assert upto.lower().endswith(m.adverb.lower())
        assert dec(tok, p.corrupt[i, : p.positions["adverb"][i] + 1]).lower().endswith(m.habitual.lower())


@pytest.mark.parametrize("split", ["train", "heldout_pairs"])
def test_past_tense_split_follows_is_heldout_of_adverb_and_verb(split):
    p = tasks.build("past_tense", "en", gpt2(), n=80, split=split, seed=6)
    held = {is_heldout(a, v) for a, v in zip(p.meta.adverb, p.meta.verb)}
    assert held == {split == "heldout_pairs"}
    assert set(p.meta.split) == {"train"}


def test_counterfactual_of_different_length_is_dropped_and_reported():
    tok = gpt2()
    data = copy.deepcopy(tasks.load_data("past_tense", "en"))
    # capitalised, "Lately" and "Every day" are both 2 tokens, lowercased " lately" is 1 and " every day" 2
    assert len(enc(tok, ". Lately")) == len(enc(tok, ". Every day"))
    assert len(enc(tok, " lately")) != len(enc(tok, " every day"))
    data["past_adverbs"], data["habitual_adverbs"] = ["Lately"], ["Every day"]
    data["templates"] = [
        {"id": "t-lower", "split": "train", "text": "{HABITUAL}, {NAME} {PRESENT} {REST}. But {adverb}, {NAME}"}
    ]
    with pytest.raises(ValueError, match="clean/counterfactual lengths differ"):
        tasks.build_past_tense("en", tok, n=10, data=data)
    data["templates"].append(
        {"id": "t-upper", "split": "train", "text": "{HABITUAL}, {NAME} {PRESENT} {REST}. {ADVERB}, {NAME}"}
    )
    p = tasks.build_past_tense("en", tok, n=10, data=data)
    assert set(p.meta.template) == {"t-upper"} and p.report.counts["clean/counterfactual lengths differ"] > 0


def test_past_adverb_without_an_equal_length_partner_is_reported():
    data = copy.deepcopy(tasks.load_data("past_tense", "en"))
    data["past_adverbs"] = ["Yesterday", "Two weeks ago"]
    data["habitual_adverbs"] = ["Usually"]
    p = tasks.build_past_tense("en", gpt2(), n=10, data=data)
    assert set(p.meta.adverb) == {"Yesterday"}
    assert p.report.vocabulary["past adverbs"] == (1, 2)
    assert "past adverb has no habitual adverb of equal token length" in p.report.counts


# ---------------------------------------------------------------------------
# Chinese, word/character tokenizer
# ---------------------------------------------------------------------------


def test_ioi_zh_names_are_single_tokens_and_positions_decode():
    tok = chinese_tokenizer()
    names = tasks.all_names(tasks.load_data("ioi", "zh"))
    p = tasks.build("ioi", "zh", tok, n=40, seed=0)
    assert len(p) == 40 and p.report.vocabulary["names"] == (len(names), len(names))
    for i in range(len(p)):
        m = p.meta.iloc[i]
        n = int(p.lengths[i])
        assert p.clean[i, :n].tolist() == enc(tok, m.clean_text)
        assert dec(tok, p.clean[i, :n]) == m.clean_text
        assert dec(tok, [p.clean[i, p.positions["IO"][i]]]) == m.io
        assert dec(tok, [p.clean[i, p.positions["S1"][i]]]) == m.s == dec(tok, [p.clean[i, p.positions["S2"][i]]])
        assert dec(tok, [p.answer[i]]) == m.io and dec(tok, [p.distractor[i]]) == m.s
        got = [dec(tok, [p.corrupt[i, p.positions[k][i]]]) for k in ("IO", "S1", "S2")]
        assert len(set(got)) == 3 and not set(got) & {m.io, m.s}


@cache
def character_tokenizer(bos: bool = False):
    """Every character of the Chinese data its own token (as Gemma 3 cuts 张伟 into 张 伟), with an optional BOS."""
    chars = sorted({c for t in tasks.TASKS for c in str(tasks.load_data(t, "zh"))} | set("了"))
    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>")


def test_ioi_zh_full_names_in_characters_are_spans_scored_on_the_surname():
    tok = character_tokenizer()
    p = tasks.build("ioi", "zh", tok, n=120, seed=0)
    assert len(p) == 120
    assert {len(x) for x in set(p.meta.io) | set(p.meta.s)} == {2, 3}  # 张伟, 王建国
    for i in range(len(p)):
        m = p.meta.iloc[i]
        assert (m.io_tokens, m.s_tokens) == (len(m.io), len(m.s))
        for k, name in (("IO", m.io), ("S1", m.s), ("S2", m.s)):
            last = int(p.positions[k][i])
            assert dec(tok, p.clean[i, last - len(name) + 1 : last + 1]) == name
        for k, name in (("IO", m.corrupt_io), ("S1", m.corrupt_s1), ("S2", m.corrupt_s2)):
            last = int(p.positions[k][i])
            assert dec(tok, p.corrupt[i, last - len(name) + 1 : last + 1]) == name
        assert dec(tok, [p.answer[i]]) == m.io[0] and dec(tok, [p.distractor[i]]) == m.s[0] != m.io[0]
    # 小明 / 小红, 王芳 / 王建国: pairs that share a surname (a first token) were drawn and dropped
    assert p.report.counts["answer and distractor share their first token"] > 0


def test_past_tense_zh_copy_counterfactual_puts_the_distractor_verb_in_the_context():
    tok = chinese_tokenizer()
    rest = {v["verb"]: v["rest"] for v in tasks.load_data("past_tense", "zh")["verbs"]}
    p = tasks.build("past_tense", "zh", tok, n=40, seed=1)
    assert set(p.meta.counterfactual) == {"verb"}
    for i in range(len(p)):
        m = p.meta.iloc[i]
        other = dec(tok, [p.distractor[i]])
        assert dec(tok, [p.answer[i]]) == m.verb == dec(tok, [p.clean[i, p.positions["verb"][i]]])
        assert other != m.verb and m.corrupt_verb == other == dec(tok, [p.corrupt[i, p.positions["verb"][i]]])
        assert dec(tok, [p.clean[i, p.positions["name2"][i]]]) == m["name"]
        first, second = m.clean_text.split("。")
        cfirst, csecond = m.corrupt_text.split("。")
        assert csecond == second and m.adverb in second  # the past adverb stays: only the verb to copy changes
        assert cfirst == first.replace(m.verb + m.rest, other + rest[other])
        assert len(enc(tok, m.corrupt_text)) == len(enc(tok, m.clean_text)) == int(p.lengths[i])


def test_past_tense_zh_copy_adverb_counterfactual_swaps_the_adverb_only():
    tok = chinese_tokenizer()
    p = tasks.build("past_tense", "zh", tok, n=40, seed=1, counterfactual="adverb")
    assert set(p.meta.counterfactual) == {"adverb"} and (p.meta.corrupt_verb == p.meta.verb).all()
    for i in range(len(p)):
        m = p.meta.iloc[i]
        second = m.clean_text.split("。")[1]
        assert m.adverb in second and m.corrupt_text.split("。")[1] == second.replace(m.adverb, m.habitual)
        assert m.corrupt_text.split("。")[0] == m.clean_text.split("。")[0]


def test_verb_counterfactual_outside_chinese_copying_is_refused_with_the_alternative():
    for language, variant in (("en", "copy"), ("zh", "marking")):
        with pytest.raises(ValueError, match=r"no counterfactual 'verb'.*use counterfactual='adverb'"):
            tasks.build(
                "past_tense",
                language,
                gpt2() if language == "en" else chinese_tokenizer(),
                variant=variant,
                counterfactual="verb",
            )
    with pytest.raises(ValueError, match=r"unknown counterfactual 'names'"):
        tasks.build("past_tense", "en", gpt2(), counterfactual="names")


def test_past_tense_zh_marking_prompt_ends_with_the_verb_and_answers_le():
    tok = chinese_tokenizer()
    p = tasks.build("past_tense", "zh", tok, n=40, seed=1, variant="marking")
    le = enc(tok, "了")
    assert len(le) == 1 and set(p.meta.counterfactual) == {"adverb"}
    for i in range(len(p)):
        m = p.meta.iloc[i]
        end = int(p.positions["end"][i])
        assert dec(tok, [p.clean[i, end]]) == m.verb == dec(tok, [p.corrupt[i, end]])
        assert int(p.answer[i]) == le[0]
        assert dec(tok, [p.distractor[i]]) == m.rest[0]  # characters are tokens here


def test_multi_character_chinese_verbs_are_spans_and_a_shared_first_character_is_dropped():
    tok = character_tokenizer()
    data = copy.deepcopy(tasks.load_data("past_tense", "zh"))
    data["verbs"] = [v for v in data["verbs"] if v["verb"] in ("打", "打扫", "复习", "参观", "去", "吃")]
    # the verb counterfactual pairs verbs of equal token lengths: 打扫 (2) + 房间 (2) with 复习 (2) + 功课 (2)
    p = tasks.build_past_tense("zh", tok, n=100, data=data, seed=2)
    assert p.report.vocabulary["verbs"] == (6, 6)
    assert {"复习", "打扫"} <= set(p.meta.verb)
    for i in range(len(p)):
        m = p.meta.iloc[i]
        assert len(m.corrupt_verb) == len(m.verb) and len(m.corrupt_text) == len(m.clean_text)
        at = int(p.positions["verb"][i])  # the last character of the verb, in both prompts
        assert dec(tok, p.clean[i, at - len(m.verb) + 1 : at + 1]) == m.verb
        assert dec(tok, p.corrupt[i, at - len(m.verb) + 1 : at + 1]) == m.corrupt_verb
        assert dec(tok, [p.answer[i]]) == m.verb[0] and dec(tok, [p.distractor[i]]) == m.corrupt_verb[0] != m.verb[0]
    # the adverb counterfactual draws any other verb as the distractor: 打 against 打扫 share a first token
    q = tasks.build_past_tense("zh", tok, n=100, data=data, seed=2, counterfactual="adverb")
    assert q.report.counts["answer and distractor share their first token"] > 0
    assert "both start with '打'" in q.report.examples["answer and distractor share their first token"][0]
    assert all(d[0] != v[0] for d, v in zip(q.meta.distractor_text, q.meta.verb))


def test_bos_follows_the_tokenizer_unless_asked():
    plain, with_bos = chinese_tokenizer(), chinese_tokenizer(bos=True)
    assert with_bos.encode("小明")[0] == 2 and plain.encode("小明")[0] != 2  # only one adds <s> by itself
    assert tasks.adds_bos(with_bos) and not tasks.adds_bos(plain)
    assert not tasks.adds_bos(gpt2()) and not tasks.adds_bos(word_tokenizer())  # GPT-2 has a BOS it does not add
    a = tasks.build("ioi", "zh", plain, n=10)
    b = tasks.build("ioi", "zh", with_bos, n=10)  # default: the tokenizer adds BOS, so the builder does
    c = tasks.build("ioi", "zh", with_bos, n=10, prepend_bos=False)
    d = tasks.build("ioi", "zh", plain, n=10, prepend_bos=True)
    assert (b.clean[:, 0] == 2).all() and (b.corrupt[:, 0] == 2).all() and torch.equal(b.clean[:, 1:], a.clean)
    assert all(torch.equal(b.positions[k], a.positions[k] + 1) for k in a.positions)
    assert torch.equal(b.lengths, a.lengths + 1) and torch.equal(b.answer, a.answer)
    assert torch.equal(c.clean, a.clean) and torch.equal(d.clean, b.clean)
    assert (a.report.bos, b.report.bos) == (None, 2) and "BOS 2 first" in str(b.report)


def test_describe_shows_the_tokens_at_each_position():
    tok = gpt2()
    p = tasks.build("ioi", "en", tok, n=4)
    table = tasks.describe(p, tok, k=3)
    assert len(table) == 3
    assert table["at IO"].str.strip().tolist() == p.meta.io[:3].tolist()
    assert table["answer"].tolist() == (" " + p.meta.io[:3]).tolist()


def test_words_unknown_to_a_word_level_tokenizer_are_dropped_not_kept_as_unk():
    tok = chinese_tokenizer(missing=("小明", "去"))
    assert enc(tok, "小明") == [tok.unk_token_id]  # one token, but the unknown one
    p = tasks.build("ioi", "zh", tok, n=60)
    n_names = len(tasks.all_names(tasks.load_data("ioi", "zh")))
    assert p.report.vocabulary["names"] == (n_names - 1, n_names)
    assert p.report.examples["names: unknown to the tokenizer"] == ["'小明' -> ['<unk>']"]
    assert p.report.counts["prompt has tokens unknown to the tokenizer"] > 0  # templates with 去 in them
    q = tasks.build("past_tense", "zh", tok, n=60)
    assert q.report.counts["verbs: unknown to the tokenizer"] == 1
    for ps in (p, q):
        assert not (ps.clean == tok.unk_token_id).any() and not (ps.corrupt == tok.unk_token_id).any()
        assert "小明" not in "".join(ps.meta.clean_text) + "".join(ps.meta.corrupt_text)


def test_bad_count_or_bos_request_is_a_clear_error():
    with pytest.raises(ValueError, match="n must be a positive number"):
        tasks.build("ioi", "en", gpt2(), n=0)
    with pytest.raises(ValueError, match="no bos_token_id"):
        tasks.build("ioi", "en", word_tokenizer(), n=3, prepend_bos=True)


@pytest.mark.parametrize("language", tasks.LANGUAGES)
def test_ioi_context_variant_adds_a_third_name_first_and_replaces_all_four(language):
    tok = gpt2() if language == "en" else chinese_tokenizer()
    space = " " if language == "en" else ""
    p = tasks.build("ioi", language, tok, n=20, variant="context", seed=3)
    assert len(p) == 20
    for i in range(len(p)):
        m = p.meta.iloc[i]
        widths = {"IO": m.io_tokens, "S1": m.s_tokens, "S2": m.s_tokens}
        # C opens the text, so the tokens up to its position are exactly C
        at = lambda ids, k, i=i, widths=widths: (
            dec(tok, ids[i, : p.positions[k][i] + 1])
            if k == "C"
            else span_text(tok, ids, i, p.positions[k][i], widths[k])
        ).strip()
        assert p.positions["C"][i] < p.positions["IO"][i] and p.positions["C"][i] < p.positions["S1"][i]
        assert [at(p.clean, k) for k in ("C", "IO", "S1", "S2")] == [m.c, m.io, m.s, m.s]
        new = [at(p.corrupt, k) for k in ("C", "IO", "S1", "S2")]
        assert new == [m.corrupt_c, m.corrupt_io, m.corrupt_s1, m.corrupt_s2]
        assert len(set(new)) == 4 and not set(new) & {m.c, m.io, m.s}
        assert m.clean_text.startswith(m.c) and int(p.answer[i]) == continuation(tok, m.clean_text, space + m.io)


def test_template_without_the_slots_its_task_reads_is_named_in_the_error():
    data = copy.deepcopy(tasks.load_data("ioi", "en"))
    data["templates"] = [{"id": "bad-1", "split": "train", "text": "When {IO} and {S} went out, someone gave it to"}]
    with pytest.raises(ValueError, match=r"template 'bad-1' needs \{IO\} once and \{S\} twice"):
        tasks.build_ioi("en", gpt2(), n=5, data=data)
    data = copy.deepcopy(tasks.load_data("past_tense", "zh"))
    data["templates"] = [{"id": "bad-2", "split": "train", "text": "每天，{NAME}{VERB}{REST}。{NAME}"}]
    with pytest.raises(ValueError, match=r"template 'bad-2' needs .*\{ADVERB\}"):
        tasks.build_past_tense("zh", chinese_tokenizer(), n=5, data=data)


# ---------------------------------------------------------------------------
# thin sets warn
# ---------------------------------------------------------------------------


def test_a_set_resting_on_few_names_or_verbs_warns_and_says_so_in_the_report():
    data = copy.deepcopy(tasks.load_data("past_tense", "en"))
    data["names"], data["verbs"] = ["Mary", "John"], data["verbs"][:3]
    with pytest.warns(UserWarning, match=r"200 prompts rest on 2 distinct names \(John, Mary\)") as seen:
        p = tasks.build_past_tense("en", gpt2(), n=200, data=data)
    assert len(p) == 200 and len(set(p.meta["name"])) == 2
    assert any("rest on 3 distinct verbs" in str(w.message) for w in seen)
    assert len(p.report.warnings) == 2 and "warning: past_tense/en: 200 prompts rest on 2" in str(p.report)


def test_a_set_on_many_names_and_verbs_does_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for task in tasks.TASKS:
            p = tasks.build(task, "en", gpt2(), n=100, seed=0)
            assert p.report.warnings == []
        small = tasks.build("ioi", "en", gpt2(), n=3)  # 3 prompts cannot use 10 names: not thin
    assert small.report.warnings == []


# ---------------------------------------------------------------------------
# the toy zoo keeps its world
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["toy-bilingual", "toy-zh"])
def test_full_chinese_names_never_reach_a_zoo_tokenizer(model):
    from transformers import AutoTokenizer

    from lsa.model import resolve_name

    tok = AutoTokenizer.from_pretrained(resolve_name(model))
    data = tasks.load_data("ioi", "zh")
    world, full = data["names"], data["full_names"]
    assert world == [x.strip() for x in (tasks.DATA_DIR / "names_zh.txt").read_text(encoding="utf-8").splitlines()]
    assert len(full) >= 100 and not set(full) & set(world)
    assert all(tok.unk_token_id in enc(tok, x) for x in full)  # each has a character the zoo never saw
    p = tasks.build("ioi", "zh", tok, n=200, seed=0)
    assert p.report.vocabulary["names"] == (len(world), len(world) + len(full))
    assert set(p.meta.io) | set(p.meta.s) | set(p.meta.corrupt_io) <= set(world)
    assert set(p.meta.io_tokens) == set(p.meta.s_tokens) == {1}


# ---------------------------------------------------------------------------
# real tokenizers: Gemma 3 and SmolLM2, from the real-model cache
# ---------------------------------------------------------------------------


@cache
def real_tokenizer(name: str):
    """A real model's tokenizer from lsa's real-model cache (``$LSA_CACHE``, filled by `make test`); where it is
    not filled, :func:`lsa.pretrained.folder` fails naming the command that fills it."""
    from transformers import AutoTokenizer

    from lsa import pretrained

    return AutoTokenizer.from_pretrained(pretrained.folder(name))


def check_ioi_spans(tok, p, space):
    """Every named position is its name's last token; answer / distractor are the names' first tokens after the text."""
    bos = int(p.report.bos is not None)
    for i in range(len(p)):
        m = p.meta.iloc[i]
        for k, name, w in (("IO", m.io, m.io_tokens), ("S1", m.s, m.s_tokens), ("S2", m.s, m.s_tokens)):
            last = int(p.positions[k][i])
            assert dec(tok, p.clean[i, last - w + 1 : last + 1]).strip() == name
            assert (
                enc(tok, m.clean_text)[last - bos - w + 1 : last - bos + 1]
                == p.clean[i, last - w + 1 : last + 1].tolist()
            )
        assert int(p.answer[i]) == continuation(tok, m.clean_text, space + m.io)
        assert int(p.distractor[i]) == continuation(tok, m.clean_text, space + m.s)
        assert p.answer[i] != p.distractor[i]
        assert len(enc(tok, m.clean_text)) == len(enc(tok, m.corrupt_text)) == int(p.lengths[i]) - bos


def test_gemma_tokenizer_gets_100_ioi_prompts_per_language_with_its_bos_and_two_token_chinese_names():
    tok = real_tokenizer("gemma-3-270m")
    assert tasks.adds_bos(tok) and [dec(tok, [i]) for i in enc(tok, "张伟")] == ["张", "伟"]
    for language, space in (("en", " "), ("zh", "")):
        p = tasks.build("ioi", language, tok, n=100, seed=0)
        assert len(p) == 100 and (p.clean[:, 0] == tok.bos_token_id).all() and p.report.bos == tok.bos_token_id
        check_ioi_spans(tok, p, space)
        if language == "zh":
            assert set(p.meta.io_tokens) >= {2, 3} and len(set(p.meta.io) | set(p.meta.s)) >= 100
            # the surname, but for the few names that are one word to Gemma (万里, 高峰)
            first = [dec(tok, [a]) for a in p.answer.tolist()]
            assert all(io.startswith(f) for f, io in zip(first, p.meta.io))
            assert sum(f == io[0] for f, io in zip(first, p.meta.io)) >= 90


def test_gemma_tokenizer_past_tense_zh_counterfactual_changes_the_verb_at_the_same_place():
    tok = real_tokenizer("gemma-3-270m")
    p = tasks.build("past_tense", "zh", tok, n=60, seed=0)
    assert len(p) == 60 and set(p.meta.counterfactual) == {"verb"}
    for i in range(len(p)):
        m = p.meta.iloc[i]
        at = int(p.positions["verb"][i])
        assert m.verb.endswith(dec(tok, [p.clean[i, at]])) and m.corrupt_verb.endswith(dec(tok, [p.corrupt[i, at]]))
        assert dec(tok, p.clean[i, : at + 1]).endswith(m.verb) and dec(tok, p.corrupt[i, : at + 1]).endswith(
            m.corrupt_verb
        )
        assert int(p.answer[i]) == continuation(tok, m.clean_text, m.verb) != int(p.distractor[i])
        assert int(p.distractor[i]) == continuation(tok, m.clean_text, m.corrupt_verb)


def test_smollm2_tokenizer_builds_english_ioi_without_bos_and_refuses_chinese_in_byte_pieces():
    tok = real_tokenizer("smollm2-135m")
    assert not tasks.adds_bos(tok)
    p = tasks.build("ioi", "en", tok, n=100, seed=0)
    assert len(p) == 100 and p.report.bos is None
    check_ioi_spans(tok, p, " ")
    with pytest.raises(
        ValueError, match=r"ioi/zh: only 1 of \d+ names are usable.*splits a character into byte pieces"
    ):
        tasks.build("ioi", "zh", tok, n=100)


def test_aligned_groups_share_length_and_every_named_position():
    tok = gpt2()
    data = copy.deepcopy(tasks.load_data("ioi", "en"))
    data["names"] = MULTI + ["Mary", "John", "Tom", "Sam", "Anna", "Kate"]
    p = tasks.build_ioi("en", tok, n=80, data=data, seed=3)
    groups = p.aligned()
    assert sum(len(g) for g in groups) == len(p) and len(groups[0]) == max(len(g) for g in groups)
    seen = set()
    for g in groups:
        for k in ("IO", "S1", "S2", "end"):
            assert len(set(g.positions[k].tolist())) == 1
        key = (int(g.lengths[0]), *(int(g.positions[k][0]) for k in ("IO", "S1", "S2")))
        assert key not in seen  # one group per distinct layout
        seen.add(key)
        assert set(g.meta.clean_text) <= set(p.meta.clean_text)
    # equal lengths alone would mix layouts: some length group holds names at different places
    assert any(len(set(g.positions["IO"].tolist())) > 1 for g in p.by_length())


# ---------------------------------------------------------------------------
# several sets at once: build_sets skips what a tokenizer cannot express
# ---------------------------------------------------------------------------


def test_build_sets_skips_chinese_in_gpt2_byte_pieces_with_its_reason_and_keeps_english(capsys):
    tok = gpt2()  # byte-level BPE: every Chinese name and nearly every verb becomes byte pieces
    sets = tasks.build_sets(["ioi", "past_tense"], ["en", "zh"], tok, n=12, seed=3)
    assert sorted(sets) == [("ioi", "en"), ("past_tense", "en")]
    for task in ("ioi", "past_tense"):  # what it keeps is exactly what build gives
        alone = tasks.build(task, "en", tok, n=12, seed=3)
        assert torch.equal(sets[task, "en"].clean, alone.clean) and sets[task, "en"].language == "en"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert re.fullmatch(r"\s*ioi en: kept 12 of \d+.*", lines[0])
    assert re.fullmatch(r"\s*ioi zh: skipped: ioi/zh: only 0 of \d+ names are usable.*byte pieces", lines[1])
    assert re.fullmatch(r"\s*past_tense zh: skipped: past_tense/zh: no name is usable.*byte pieces", lines[3])


def test_builders_raise_no_prompts_for_an_inexpressible_language_and_plain_value_error_for_bad_arguments():
    with pytest.raises(tasks.NoPrompts):
        tasks.build("ioi", "zh", gpt2(), n=4)
    with pytest.raises(ValueError, match="unknown split") as err:
        tasks.build_sets("ioi", ["en", "zh"], gpt2(), n=4, split="test")
    assert not isinstance(err.value, tasks.NoPrompts)  # a real error is raised, not skipped
    data = copy.deepcopy(tasks.load_data("ioi", "en"))
    data["templates"][0]["text"] = data["templates"][0]["text"].replace("{IO}", "Anna")
    with pytest.raises(ValueError, match="needs") as err:  # a malformed template in the data
        tasks.build_sets("ioi", "en", gpt2(), n=4, data=data)
    assert not isinstance(err.value, tasks.NoPrompts)


def test_circuit_prompt_sets_skip_what_the_tokenizer_cannot_express_and_raise_real_errors():
    from types import SimpleNamespace

    from lsa.workbook import prompt_sets

    model = SimpleNamespace(tokenizer=gpt2())
    built, skipped = prompt_sets(model, ["en", "zh"], n=6, seed=1)
    assert list(built) == ["en"] and torch.equal(built["en"].clean, tasks.build("ioi", "en", gpt2(), n=6, seed=1).clean)
    assert list(skipped) == ["zh"] and "byte pieces" in skipped["zh"]
    with pytest.raises(ValueError, match="unknown split"):  # no longer swallowed as a skip
        prompt_sets(model, ["en"], split="test")


def test_build_sets_with_every_set_skipped_fails_naming_each_reason(capsys):
    with pytest.raises(tasks.NoPrompts, match=r"(?s)no task and language has usable.*ioi/zh: .*past_tense/zh: "):
        tasks.build_sets(["ioi", "past_tense"], "zh", gpt2(), n=4)
    with pytest.raises(tasks.NoPrompts, match=r"ioi/en: only 5 prompt\(s\), 6 needed"):
        tasks.build_sets("ioi", "en", gpt2(), n=5, min_prompts=6)
    assert "skipped" in capsys.readouterr().out


def test_build_sets_skips_chinese_for_the_smollm2_tokenizer_and_keeps_english(capsys):
    tok = real_tokenizer("smollm2-135m")
    sets = tasks.build_sets("ioi", ["en", "zh"], tok, n=16, seed=0)
    assert list(sets) == [("ioi", "en")] and len(sets["ioi", "en"]) == 16
    out = capsys.readouterr().out
    assert re.search(r"ioi zh: skipped: ioi/zh: only 1 of \d+ names are usable.*byte pieces", out)


# ---------------------------------------------------------------------------
# a prompt set records its tokenizer; methods refuse another tokenizer's prompts
# ---------------------------------------------------------------------------


def _adds_special(tok) -> bool:
    """Whether encoding with special tokens gives more than without (independent of tasks.adds_bos)."""
    return len(tok("When")["input_ids"]) > len(enc(tok, "When"))


def test_tokenizer_stamps_are_equal_exactly_when_the_vocabularies_and_bos_agree():
    from transformers import AutoTokenizer

    from lsa.model import resolve_name

    toks = {
        "gpt2": gpt2(),
        "gpt2 again": gpt2_tokenizer(),  # another object, the same vocabulary
        "words 97": word_tokenizer(97),
        "words 98": word_tokenizer(98),
        "chinese": chinese_tokenizer(),
        "chinese with BOS": chinese_tokenizer(bos=True),  # the same vocabulary, a BOS added
        **{name: AutoTokenizer.from_pretrained(resolve_name(name)) for name in ("toy-en", "toy-zh", "toy-bilingual")},
    }
    for a, ta in toks.items():
        for b, tb in toks.items():
            same = ta.get_vocab() == tb.get_vocab() and _adds_special(ta) == _adds_special(tb)
            assert (tasks.tokenizer_stamp(ta) == tasks.tokenizer_stamp(tb)) == same, (a, b)
    assert tasks.tokenizer_stamp(toks["gpt2"]).size == 50257


def test_a_built_set_and_its_subsets_record_the_tokenizer_and_another_tokenizer_is_refused_by_name():
    p = tasks.build("ioi", "en", gpt2(), n=6, seed=0)
    assert p.built_with == tasks.tokenizer_stamp(gpt2_tokenizer())
    assert p.subset([0, 2]).built_with == p.built_with and p.aligned()[0].built_with == p.built_with
    tasks.check_tokenizer(p, gpt2_tokenizer(), "gpt2")  # a second load of the same tokenizer passes
    with pytest.raises(
        tasks.TokenizerMismatch, match=r"ioi/en prompts were built with another tokenizer.*50257 tokens"
    ):
        tasks.check_tokenizer(p, word_tokenizer(), "tiny")
    p.built_with = None  # a set made by hand from token ids: nothing to compare
    tasks.check_tokenizer(p, word_tokenizer(), "tiny")


@pytest.fixture(scope="module")
def zoo_mismatch():
    """toy-bilingual, and IOI prompts built with toy-en's tokenizer (a smaller vocabulary: valid ids, other words)."""
    import lsa

    model = lsa.load_model("toy-bilingual", device="cpu")
    other = lsa.load_model("toy-en", device="cpu")
    return model, tasks.build("ioi", "en", other.tokenizer, n=4, seed=0)


def _methods():
    from lsa import ablation, attribution, behaviour, circuits, patching
    from lsa.circuits import Circuit, Component
    from lsa.graph import Graph
    from widgets.behaviour import BehaviourExplorer
    from widgets.heads import HeadExplorer

    def circuit(model):
        a = model.adapter
        return Circuit(model.name, a.n_layers, a.n_heads, "ioi", "en", [Component("head", 0, 0)], d_mlp=a.d_mlp)

    def edges(model):  # every edge of the residual graph kept
        graph = Graph.of(model)
        return torch.ones(len(graph.senders), len(graph.receivers), dtype=torch.bool)

    return {
        "behaviour.score": lambda m, p: behaviour.score(m, p),
        "activation_patching": lambda m, p: patching.activation_patching(m, p, "head", progress=False),
        "path_patching": lambda m, p: patching.path_patching(m, p, [(0, 0)], "logits", progress=False),
        "attribution_patching": lambda m, p: attribution.attribution_patching(m, p, "head"),
        "ablate": lambda m, p: ablation.ablate(m, p, [(0, 0)]),
        "ablation_sweep": lambda m, p: ablation.ablation_sweep(m, p, "head"),
        "ablation.faithfulness": lambda m, p: ablation.faithfulness(m, p, [(0, 0)]),
        "circuits.faithfulness": lambda m, p: circuits.faithfulness(m, circuit(m), p),
        "circuits.discover": lambda m, p: circuits.discover(m, p, steps=1, progress=False),
        "path_patching_discovery": lambda m, p: circuits.path_patching_discovery(m, p, max_steps=1, progress=False),
        "edge_attribution": lambda m, p: attribution.edge_attribution(m, p, steps=1, progress=False),
        "ablate_edges": lambda m, p: ablation.ablate_edges(m, p, edges(m)),
        "HeadExplorer": lambda m, p: HeadExplorer(m, {"en": p}),
        "BehaviourExplorer": lambda m, p: BehaviourExplorer(m, {"en": p}),
    }


@pytest.mark.parametrize("method", list(_methods()))
def test_every_method_refuses_prompts_built_with_another_tokenizer(zoo_mismatch, method):
    model, prompts = zoo_mismatch
    with pytest.raises(
        tasks.TokenizerMismatch, match=r"toy-en: 959 tokens.*than toy-bilingual's \(toy-bilingual: 1312"
    ):
        _methods()[method](model, prompts)
