"""A word-level tokenizer for the toy world, saved so ``AutoTokenizer.from_pretrained`` loads it offline.

English words carry their leading space as in GPT-2 (" Mary"); Chinese is cut
without spaces by a ``Split`` pre-tokenizer whose regex lists the world's
Chinese words longest-first, then falls back to single characters. Every name,
verb form, place, object, adverb word and 了 / 会 is one token. Text outside
the vocabulary becomes ``<|unk|>``.

>>> tok = build_tokenizer([World.load("en"), World.load("zh")])   # doctest: +SKIP
>>> tok.tokenize("When Mary and John went")                         # doctest: +SKIP
['When', ' Mary', ' and', ' John', ' went']
"""

from __future__ import annotations

import re

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lsa.zoo.corpus import ACTIONS, CONNECTORS, CONTEXT, FILLERS, OPENINGS, SLOT, TENSE_FIRST, TENSE_SECOND, World

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
SPECIALS = (PAD, EOS, UNK)  # ids 0, 1, 2
CJK = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")
EXTRA = {"en": [" will", ".", ",", " "], "zh": ["了", "会", "。", "，"]}


def _pattern(chinese_words: list[str]) -> str:
    words = sorted({w for w in chinese_words if len(w) > 1}, key=lambda w: (-len(w), w))
    alternatives = [re.escape(w) for w in words] + [r" ?[A-Za-z]+", r" ?[0-9]+", r"\s+", r"."]
    return "|".join(alternatives)


def _pre_tokenizer(chinese_words: list[str]):
    return pre_tokenizers.Split(Regex(_pattern(chinese_words)), behavior="isolated")


def _literals(text: str) -> str:
    """A template with its slots replaced by a separator that is dropped afterwards."""
    return SLOT.sub("\x00", text)


def vocabulary(worlds: list[World]) -> list[str]:
    """Every piece of the worlds' words, templates and grammar, in a fixed order (specials first)."""
    chinese = [w for world in worlds if world.language == "zh" for w in world.words()]
    pre = _pre_tokenizer(chinese)
    texts: list[str] = []
    for world in worlds:
        lang = world.language
        if lang == "en":  # names and adverbs start sentences; every word also follows a space
            starters = world.names + world.adverbs()
            texts += starters + [" " + w for w in world.words()]
        else:
            texts += world.words()
        texts += [_literals(t["text"]) for t in world.ioi_templates + world.tense_templates]
        grammar = (
            FILLERS[lang] + CONTEXT[lang] + OPENINGS[lang] + ACTIONS[lang] + TENSE_FIRST[lang] + TENSE_SECOND[lang]
        )
        texts += [_literals(t) for t in grammar]
        texts += CONNECTORS[lang]
        texts += EXTRA[lang]
        if lang == "en":  # template and grammar words also start a sentence after another one
            texts += [" " + piece.strip() for t in list(texts) for piece, _ in pre.pre_tokenize_str(t) if piece.strip()]
    pieces = {piece for t in texts for piece, _ in pre.pre_tokenize_str(t)}
    pieces = {p for p in pieces if p and "\x00" not in p}
    return list(SPECIALS) + sorted(pieces - set(SPECIALS))


def build_tokenizer(worlds: list[World], max_length: int = 64) -> PreTrainedTokenizerFast:
    """The word-level tokenizer of one or more worlds (pad, eos, unk defined; no special tokens added)."""
    vocab = {piece: i for i, piece in enumerate(vocabulary(worlds))}
    chinese = [w for world in worlds if world.language == "zh" for w in world.words()]
    tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tk.pre_tokenizer = _pre_tokenizer(chinese)
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=UNK,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
