"""Steering's script share on real byte-level tokenizers: whole continuations decoded, counts reported.

GPT-2's byte-level BPE (``helpers.gpt2_tokenizer``, offline) splits most Chinese
characters into byte pieces, as SmolLM2's does (``tests/test_pretrained.py`` checks
that one): decoded one token at a time they become U+FFFD. The generation is
stubbed with fixed token ids, so the tests check the decoding and the counting,
independent of any model.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
from helpers import gpt2_tokenizer

from lsa import steering as S

ZH = "小明去了学校。"  # 6 CJK characters and a full stop


def _byte_split(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text), "the tokenizer should split these characters into byte pieces"
    assert any(S.REPLACEMENT in tokenizer.decode([i]) for i in ids)
    return ids


def _run_with(monkeypatch, tokenizer, base: list[list[int]], steered: list[list[int]], script: str) -> pd.DataFrame:
    """:func:`steering_run` with generation replaced by ``base`` (no edits) / ``steered`` (edits) token ids."""

    def fake_generate_ids(model, prompts, *, edits=(), **kwargs):
        return steered if list(edits) else base

    monkeypatch.setattr(S, "generate_ids", fake_generate_ids)
    model = SimpleNamespace(tokenizer=tokenizer)
    edit = S.deactivate({0: [0]})
    return S.steering_run(model, [f"p{i}" for i in range(len(base))], [edit], target_script=script)


def test_script_share_of_a_whole_decode_counts_every_character_that_token_by_token_decoding_loses():
    tok = gpt2_tokenizer()
    ids = _byte_split(tok, ZH)
    per_token = [tok.decode([i]) for i in ids]
    # the old way: one decode per token; byte pieces are U+FFFD and count for no script
    lost = S.script_counts(per_token)
    assert lost["undecodable"] > 0 and lost["cjk"] < 6
    whole = S.script_counts(tok.decode(ids))
    assert whole == {"cjk": 6, "latin": 0, "undecodable": 0}
    assert S.script_share(tok.decode(ids), "cjk") == 1.0


def test_steering_run_decodes_each_continuation_whole_and_counts_the_characters_each_share_rests_on(monkeypatch):
    tok = gpt2_tokenizer()
    zh = _byte_split(tok, ZH)
    en = tok(" went to school", add_special_tokens=False)["input_ids"]
    cut = zh[:1]  # one byte piece of a character: nothing decodable
    assert tok.decode(cut) == S.REPLACEMENT
    base = [en, en, en]
    steered = [zh, zh + en, cut]
    run = _run_with(monkeypatch, tok, base, steered, "cjk")
    assert run["steered"].tolist() == [ZH, ZH + " went to school", S.REPLACEMENT]
    assert run["share_before"].tolist() == [0.0, 0.0, 0.0]
    assert run["share_after"].iloc[0] == 1.0
    assert run["share_after"].iloc[1] == pytest.approx(6 / (6 + len("wenttoschool")))
    assert math.isnan(run["share_after"].iloc[2])
    assert run["chars_after"].tolist() == [6, 6 + 12, 0]
    assert run["chars_before"].tolist() == [12, 12, 12]

    summary = S.steering_summary(run)
    assert len(summary) == 1
    row = summary.iloc[0]
    assert row["n_prompts"] == 3
    assert (row["n_before"], row["excluded_before"]) == (3, 0)
    assert (row["n_after"], row["excluded_after"]) == (2, 1)  # the undecodable prompt is counted as excluded
    assert row["share_after"] == pytest.approx((1.0 + 6 / 18) / 2)


def test_steering_summary_groups_by_method_and_strength_and_keeps_groups_with_nothing_decodable(monkeypatch):
    tok = gpt2_tokenizer()
    zh = _byte_split(tok, ZH)
    a = _run_with(monkeypatch, tok, [zh, zh], [zh, zh[:1]], "cjk").assign(method="lape", strength=4.0)
    b = _run_with(monkeypatch, tok, [zh[:1], zh[:1]], [zh[:1], zh[:1]], "cjk").assign(method="lape", strength=16.0)
    summary = S.steering_summary(pd.concat([a, b], ignore_index=True), by=["method", "strength"])
    assert summary[["strength", "n_after", "excluded_after", "n_prompts"]].values.tolist() == [
        [4.0, 1, 1, 2],
        [16.0, 0, 2, 2],
    ]
    assert summary["share_after"].iloc[0] == 1.0  # rests on 1 of 2 prompts, and says so
    assert math.isnan(summary["share_after"].iloc[1])


def test_steering_run_refuses_an_unknown_script():
    with pytest.raises(ValueError, match="script"):
        S.steering_run(SimpleNamespace(tokenizer=None), ["x"], [], target_script="cyrillic")
