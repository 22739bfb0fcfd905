"""The toy zoo: training works and round-trips, the shipped models still do their tasks, held-out data stays out.

Checks are independent of the zoo's own code where it matters: the reloaded
checkpoint is compared with the trained torch module's own forward, the shipped
models are scored here from ``lsa.tasks.build`` and a plain forward, and the
held-out rules are re-derived from the task data files.
"""

from __future__ import annotations

import json
import re
from functools import cache

import pytest
import torch

import lsa
from lsa import tasks
from lsa.model import ZOO_DIR
from lsa.splits import is_heldout
from lsa.zoo import World, build_tokenizer, generate, recipe_for, save, train
from lsa.zoo.corpus import MIX

SHIPPED = [n for n in ("toy-bilingual", "toy-en", "toy-zh") if (ZOO_DIR / n / "model.safetensors").exists()]


@cache
def worlds():
    return {lang: World.load(lang) for lang in ("en", "zh")}


@cache
def both_tokenizer():
    return build_tokenizer(list(worlds().values()))


# ---------------------------------------------------------------------------
# (1) training a micro model
# ---------------------------------------------------------------------------


def test_micro_model_loss_falls_and_its_checkpoint_reloads_with_identical_logits(tmp_path):
    recipe = recipe_for(
        "toy-bilingual",
        n_layer=1,
        n_head=2,
        n_embd=32,
        seq_len=48,
        batch_size=8,
        steps=80,
        warmup=10,
        lr=3e-3,
        docs_per_language=1500,
    )
    result = train(recipe, log_every=20, progress=lambda _: None)
    losses = [e["loss"] for e in result.log]
    assert result.steps == 80 and len(losses) >= 4
    assert losses[-1] < losses[0] - 1.0, losses

    path = save(result, tmp_path / "micro")
    assert {"config.json", "model.safetensors", "tokenizer.json", "zoo.json", "README.md"} <= {
        p.name for p in path.iterdir()
    }
    loaded = lsa.load_model(path, device="cpu")
    tokens = torch.tensor(
        [
            result.tokenizer.encode(
                "When Mary and John went to the store, John gave a drink to", add_special_tokens=False
            )[:12],
            result.tokenizer.encode("当小明和小红去商店时，小明把一杯饮料给了小红。", add_special_tokens=False)[:12],
        ]
    )
    with torch.no_grad():
        expected = result.model(tokens).logits  # the trained module's own forward
    assert torch.allclose(loaded.logits(tokens), expected, atol=1e-5)
    info = json.loads((path / "zoo.json").read_text())
    assert info["training"]["steps"] == 80 and info["parameters"] == sum(p.numel() for p in result.model.parameters())


def test_training_is_deterministic_by_seed():
    recipe = recipe_for(
        "toy-en", n_layer=1, n_head=2, n_embd=16, seq_len=32, batch_size=4, steps=5, docs_per_language=200
    )
    a = train(recipe, log_every=1, progress=lambda _: None)
    b = train(recipe, log_every=1, progress=lambda _: None)
    assert [e["loss"] for e in a.log] == [e["loss"] for e in b.log]
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


# ---------------------------------------------------------------------------
# (2) the shipped models still meet their bars on held-out data
# ---------------------------------------------------------------------------


@cache
def shipped(name):
    return lsa.load_model(name, device="cpu")


def end_logits(model, tokens, prompts):
    with torch.no_grad():
        logits = model.hf(tokens).logits
    return logits[torch.arange(len(prompts)), prompts.lengths - 1]


def languages_of(name):
    return json.loads((ZOO_DIR / name / "zoo.json").read_text())["recipe"]["languages"]


CASES = [
    (n, lang, split) for n in SHIPPED for lang in languages_of(n) for split in ("heldout_pairs", "heldout_templates")
]


# Bars a shipped model does not meet, as (task, model, language, split) -> the measured value from
# its card (empty: every bar is met). Strict: a retrained model that meets the bar fails here
# until its entry is removed.
SHORTFALLS: dict[tuple[str, str, str, str], str] = {}


def cases(task):
    return [
        pytest.param(*case, marks=pytest.mark.xfail(strict=True, reason=SHORTFALLS[(task, *case)]))
        if (task, *case) in SHORTFALLS
        else case
        for case in CASES
    ]


@pytest.mark.parametrize("name,language,split", cases("ioi"))
def test_shipped_model_does_ioi_on_heldout_data(name, language, split):
    model = shipped(name)
    p = tasks.build("ioi", language, model.tokenizer, n=80, seed=7, split=split)
    assert split != "heldout_pairs" or p.meta["pair_heldout"].all()
    assert split != "heldout_templates" or (p.meta["split"] == "heldout").all()
    last = end_logits(model, p.clean, p)
    rows = torch.arange(len(p))
    diff = last[rows, p.answer] - last[rows, p.distractor]
    assert (diff > 0).float().mean() >= 0.95
    assert diff.mean() >= 3.0


@pytest.mark.parametrize("name,language,split", cases("past_tense"))
def test_shipped_model_copies_and_marks_past_tense_on_heldout_data(name, language, split):
    model = shipped(name)
    tok = model.tokenizer
    p = tasks.build("past_tense", language, tok, n=80, seed=7, split=split, variant="copy")
    last = end_logits(model, p.clean, p)
    rows = torch.arange(len(p))
    top = last.argmax(-1)
    # the expected token, re-derived from the prompt's metadata
    want = [
        tok.encode((" " + m.past) if language == "en" else m.verb, add_special_tokens=False)
        for m in p.meta.itertuples()
    ]
    assert all(len(w) == 1 for w in want)
    want = torch.tensor([w[0] for w in want])
    assert (top == want).float().mean() >= 0.90
    if language == "en":
        present = torch.tensor([tok.encode(" " + m.verb, add_special_tokens=False)[0] for m in p.meta.itertuples()])
        assert (last[rows, want] > last[rows, present]).float().mean() >= 0.95
    else:
        m = tasks.build("past_tense", language, tok, n=80, seed=7, split=split, variant="marking")
        le = tok.encode("了", add_special_tokens=False)[0]
        assert (end_logits(model, m.clean, m).argmax(-1) == le).float().mean() >= 0.95
        assert (end_logits(model, m.corrupt, m).argmax(-1) != le).float().mean() >= 0.95


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_card_records_its_evaluation(name):
    info = json.loads((ZOO_DIR / name / "zoo.json").read_text())
    assert info["name"] == name and info["training"]["steps"] > 0 and info["evaluation"]
    assert info["parameters"] == sum(p.numel() for p in shipped(name).hf.parameters())
    assert (ZOO_DIR / name / "README.md").read_text().startswith(f"# {name}")


def test_shipped_weights_stay_small():
    total = sum((ZOO_DIR / n / "model.safetensors").stat().st_size for n in SHIPPED)
    assert total < 30 * 2**20


# ---------------------------------------------------------------------------
# (3) tokenizer: names, verbs and particles are single tokens
# ---------------------------------------------------------------------------


def tokenizers_to_check():
    out = [("built", both_tokenizer())]
    out += [(n, shipped(n).tokenizer) for n in SHIPPED]
    return out


def test_tokenizer_keeps_every_name_and_verb_form_one_token():
    for label, tok in tokenizers_to_check():
        langs = languages_of(label) if label in SHIPPED else ["en", "zh"]

        def one(text, label=label, tok=tok):
            ids = tok.encode(text, add_special_tokens=False)
            assert len(ids) == 1 and ids[0] != tok.unk_token_id, (label, text, ids)

        if "en" in langs:
            data = tasks.load_data("past_tense", "en")
            for name in data["names"]:
                one(" " + name)
                one(name)
            for v in data["verbs"]:
                one(" " + v["present"])
                one(" " + v["past"])
        if "zh" in langs:
            data = tasks.load_data("past_tense", "zh")
            for name in data["names"]:
                one(name)
                # in context: the name stays whole between other words
                ids = tok.encode(f"当{name}和{name}去", add_special_tokens=False)
                assert tok.convert_ids_to_tokens(ids)[1] == name, (label, name)
            for v in data["verbs"]:
                one(v["verb"])
            one("了")
            one("会")


def test_tokenizer_round_trips_text_and_defines_pad_and_eos():
    tok = both_tokenizer()
    for text in ("Yesterday, Tom walked to the park.", "每天，小明去公园。昨天，小明去了公园。"):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.convert_ids_to_tokens(tok.encode("When Mary", add_special_tokens=False)) == ["When", " Mary"]
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id


# ---------------------------------------------------------------------------
# (4) held-out templates and pairs never occur in the training corpus
# ---------------------------------------------------------------------------


@cache
def sample_corpus(language):
    return generate(worlds()[language], 6000, seed=0)


def heldout_template_regexes(language):
    out = []
    for task in ("ioi", "past_tense"):
        for t in tasks.load_data(task, language)["templates"]:
            if t["split"] == "heldout":
                # every slot must be filled by something, the literals must appear in order
                literals = re.split(r"\{[A-Za-z]+\}", t["text"])
                out.append(re.compile(".+?".join(re.escape(x) for x in literals)))
    return out


@pytest.mark.parametrize("language", ["en", "zh"])
def test_corpus_never_contains_a_heldout_template(language):
    regexes = heldout_template_regexes(language)
    assert regexes
    for doc in sample_corpus(language):
        assert not any(r.search(doc) for r in regexes), doc
    # ... while every train template does occur
    for t in tasks.load_data("ioi", language)["templates"]:
        if t["split"] == "train":
            head = re.split(r"\{[A-Za-z]+\}", t["text"])
            assert any(all(h in d for h in head) for d in sample_corpus(language)), t["id"]


@pytest.mark.parametrize("language", ["en", "zh"])
def test_corpus_never_pairs_heldout_names(language):
    names = tasks.load_data("ioi", language)["names"]
    if language == "en":
        found = [set(re.findall(r"[A-Z][a-z]+", d)) & set(names) for d in sample_corpus(language)]
    else:
        found = [{n for n in names if n in d} for d in sample_corpus(language)]
    pairs_seen = 0
    for doc, ns in zip(sample_corpus(language), found):
        ns = sorted(ns)
        for i, a in enumerate(ns):
            for b in ns[i + 1 :]:
                pairs_seen += 1
                assert not is_heldout(a, b), (a, b, doc)
    assert pairs_seen > 1000


@pytest.mark.parametrize("language", ["en", "zh"])
def test_corpus_never_puts_a_heldout_adverb_with_its_verb(language):
    data = tasks.load_data("past_tense", language)
    adverbs = data["past_adverbs"] + data["habitual_adverbs"]
    checked = 0
    sep = " " if language == "en" else ""
    for doc in sample_corpus(language):  # a document never holds a held-out adverb with the verb's phrase
        present = [a for a in adverbs if re.search(rf"(^|[^A-Za-z]){re.escape(a)}([^A-Za-z]|$)", doc, re.I)]
        for v in data["verbs"]:
            key = v["present"] if language == "en" else v["verb"]
            forms = [v["present"], v["past"]] if language == "en" else [v["verb"], v["verb"] + "了"]
            if any(f"{f}{sep}{v['rest']}" in doc for f in forms):
                for a in present:
                    checked += 1
                    assert not is_heldout(a, key), (a, key, doc)
    assert checked > 500


def test_corpus_generation_is_deterministic_and_mixes_every_kind():
    w = worlds()["zh"]
    assert generate(w, 300, seed=3) == generate(w, 300, seed=3)
    assert generate(w, 300, seed=3) != generate(w, 300, seed=4)
    for kind in MIX:
        assert generate(w, 5, seed=0, mix={kind: 1.0})
    with pytest.raises(ValueError, match="unknown document kinds"):
        generate(w, 5, mix={"poetry": 1.0})
