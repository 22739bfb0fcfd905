"""Token-checked prompt sets for the paper's tasks (IOI, past tense) in English and Chinese.

A :class:`PromptSet` holds clean and counterfactual prompts, right-padded to one
length (causal models never look right, so padding changes no real position),
each pair of equal token length, with the answer / distractor ids and the named
positions (IOI: ``IO``, ``S1``, ``S2``, ``end``; tense: ``verb``, ``adverb``, ``name2``, ``end``).
Metrics read logits at ``end`` (the last real token of each prompt).

:func:`build` makes one from the editable files in ``data/tasks/`` for a given
tokenizer. A word (name, verb form) is a *span* of up to :data:`MAX_WORD_TOKENS`
tokens, checked *in context* (the tokens of the text before a slot must be a
prefix of the tokens with the slot, which must be a prefix of the whole prompt's
tokens), so it works for byte-level BPE with leading spaces, for Chinese without
spaces, and for real tokenizers that cut a Chinese name into surname + given name
(Gemma 3: 张伟 -> 张 伟):

- a named position points at its span's **last** token;
- the answer and distractor are the **first** tokens of the words that continue
  the prompt, and the builder requires them to differ;
- the counterfactual puts words of the same token length in the same places, so a
  clean / counterfactual pair has the same length and the same named positions.

With a word-level tokenizer (the toy zoo) every span is one token. What fails is
dropped and counted in ``prompts.report`` with its reason, never silently; a set
that rests on few distinct names or verbs also warns. The tokenizer's BOS is
prepended when the tokenizer itself adds it (``prepend_bos=None``; Gemma 3 does
IOI with it and fails without). Building 200 prompts takes 1-2 s on a busy 2-core machine.

>>> prompts = build("ioi", "zh", gemma_tokenizer, n=200, split="heldout_pairs")   # doctest: +SKIP
>>> print(prompts.report)                                                           # doctest: +SKIP
kept 200 of 242, BOS 2 first; names: 239 of 239 usable; 39 dropped: clean/counterfactual lengths differ; ...
>>> describe(prompts, tokenizer)                                              # doctest: +SKIP

:func:`build_sets` builds several (task, language) sets at once for a notebook: it
prints each set's report and skips, with the reason, a language the tokenizer cannot
express (:class:`NoPrompts`; SmolLM2 spells Chinese in byte pieces), so the other
languages are still analysed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from lsa.splits import is_heldout


class NoPrompts(ValueError):
    """A builder found nothing usable for this tokenizer: too few names or verbs survive its filters, or no prompt does.

    The message names the filter and carries the drop report. Other errors of the builders
    (an unknown task or split, a malformed template) stay plain :class:`ValueError`.
    """


@dataclass
class DropReport:
    """What a builder removed and why: ``counts[reason] = n``, ``examples[reason] = [...]``.

    ``total`` / ``kept`` count candidate prompts; ``requested`` is the ``n`` asked for;
    ``vocabulary[item] = (kept, total)`` says how many names / verbs / adverbs passed the
    per-item token filter (their drops are in ``counts`` too, with reasons "names: ...");
    ``warnings`` lists what the kept set is thin on (few distinct names or verbs);
    ``bos`` is the BOS id put before every prompt (None when none was).
    """

    total: int = 0
    kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    vocabulary: dict[str, tuple[int, int]] = field(default_factory=dict)
    requested: int | None = None
    warnings: list[str] = field(default_factory=list)
    bos: int | None = None

    def drop(self, reason: str, example: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(example)

    def table(self) -> pd.DataFrame:
        rows = [
            {"reason": r, "dropped": n, "examples": ", ".join(self.examples.get(r, []))} for r, n in self.counts.items()
        ]
        return pd.DataFrame(rows, columns=["reason", "dropped", "examples"])

    def __str__(self) -> str:
        parts = [f"kept {self.kept} of {self.total}"]
        if self.requested is not None and self.kept < self.requested:
            parts[0] += f" ({self.requested} requested)"
        if self.bos is not None:
            parts[0] += f", BOS {self.bos} first"
        parts += [f"{item}: {k} of {n} usable" for item, (k, n) in self.vocabulary.items()]
        parts += [f"{n} dropped: {r}" for r, n in self.counts.items()]
        parts += [f"warning: {w}" for w in self.warnings]
        return "; ".join(parts)


@dataclass(frozen=True)
class TokenizerStamp:
    """What a tokenizer does, in short: a SHA-256 ``digest`` of its vocabulary (every token with its id) and of
    whether it puts its BOS first, and its ``size``. Two loads of one vocabulary are equal; ``name`` (where it
    was loaded from, for messages) is not compared."""

    digest: str
    size: int
    name: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.name or 'unnamed'}: {self.size} tokens, vocabulary {self.digest[:12]}"


_STAMPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its size, its stamp)


def tokenizer_stamp(tokenizer) -> TokenizerStamp:
    """The :class:`TokenizerStamp` of a Hugging Face tokenizer (computed once per tokenizer object and size;
    Gemma 3's 262k tokens take about 0.3 s).

    >>> tokenizer_stamp(gemma.tokenizer) == tokenizer_stamp(AutoTokenizer.from_pretrained(path))   # doctest: +SKIP
    True
    """
    size = len(tokenizer)
    cached = _STAMPS.get(tokenizer)
    if cached is not None and cached[0] == size:
        return cached[1]
    digest = hashlib.sha256(f"adds_bos={adds_bos(tokenizer)}\n".encode())
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{index} {token}\n".encode("utf-8", "surrogatepass"))
    name = Path(str(getattr(tokenizer, "name_or_path", "") or "")).name or type(tokenizer).__name__
    stamp = TokenizerStamp(digest.hexdigest(), size, name)
    _STAMPS[tokenizer] = (size, stamp)
    return stamp


class TokenizerMismatch(ValueError):
    """Prompts built with one tokenizer given to a model with another: their token ids would mean other words."""


def check_tokenizer(prompts: PromptSet, tokenizer, model_name: str = "the model") -> None:
    """Refuse ``prompts`` built with another tokenizer than ``tokenizer`` (:class:`TokenizerMismatch`).

    Sets made by hand from token ids (``built_with=None``) and models without a tokenizer pass: there is
    nothing to compare.
    """
    if prompts.built_with is None or tokenizer is None:
        return
    have = tokenizer_stamp(tokenizer)
    if prompts.built_with != have:
        raise TokenizerMismatch(
            f"these {prompts.task}/{prompts.language} prompts were built with another tokenizer "
            f"({prompts.built_with}) than {model_name}'s ({have}): their token ids would stand for other text. "
            f"Build them for this model: lsa.tasks.build({prompts.task!r}, {prompts.language!r}, model.tokenizer, ...)"
        )


@dataclass
class PromptSet:
    """Clean / counterfactual prompt pairs for one task in one language.

    Shapes: ``clean``, ``corrupt``: ``[n, pos]`` token ids (right-padded with
    ``pad_id``); ``lengths``, ``answer``, ``distractor``, ``corrupt_answer``: ``[n]``;
    ``positions[name]``: ``[n]``.
    ``meta`` has one row per prompt (template, names or verb, texts). ``built_with``: the
    tokenizer the builder used (:func:`tokenizer_stamp`; ``None`` for a set made by hand
    from token ids), which every method checks against the model's (:func:`check_tokenizer`).
    """

    task: str
    language: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    lengths: torch.Tensor
    answer: torch.Tensor
    distractor: torch.Tensor
    positions: dict[str, torch.Tensor]
    meta: pd.DataFrame
    report: DropReport
    pad_id: int = 0
    built_with: TokenizerStamp | None = None

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def end(self) -> torch.Tensor:
        """Position of each prompt's last real token: ``[n]``."""
        return self.lengths - 1

    @property
    def same_length(self) -> bool:
        return bool((self.lengths == self.lengths[0]).all())

    def subset(self, index) -> PromptSet:
        """Rows ``index`` (a slice, list or boolean mask) as a new set, padding trimmed."""
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        lengths = self.lengths[index]
        width = int(lengths.max()) if len(index) else 0
        return PromptSet(
            task=self.task,
            language=self.language,
            clean=self.clean[index, :width],
            corrupt=self.corrupt[index, :width],
            lengths=lengths,
            answer=self.answer[index],
            distractor=self.distractor[index],
            positions={k: v[index] for k, v in self.positions.items()},
            meta=self.meta.iloc[index.tolist()].reset_index(drop=True),
            report=self.report,
            pad_id=self.pad_id,
            built_with=self.built_with,
        )

    def by_length(self) -> list[PromptSet]:
        """Equal-length groups, largest group first (named positions may differ within one: see :meth:`aligned`)."""
        groups = [self.subset(self.lengths == n) for n in self.lengths.unique().tolist()]
        return sorted(groups, key=len, reverse=True)

    def aligned(self) -> list[PromptSet]:
        """Groups in which the length and every named position coincide (for layer x position maps), largest first.

        With one-token words this is one group per template (and length); on real
        tokenizers a name or verb of another token length moves the positions after it,
        so a template splits into several groups.
        """
        keys = torch.stack([self.lengths, *self.positions.values()], dim=1)
        groups = [self.subset((keys == k).all(1)) for k in keys.unique(dim=0)]
        return sorted(groups, key=len, reverse=True)

    def groups(self) -> torch.Tensor:
        """``[n]`` group ids from 0: prompts of one template whose length and named positions coincide, so
        that each position holds the same part of the sentence in every prompt of a group (ablation means
        and resampled rows are taken within a group). Without a ``template`` column, by positions alone."""
        keys = torch.stack([self.lengths, *self.positions.values()], dim=1).tolist()
        templates = self.meta["template"].tolist() if "template" in self.meta else [None] * len(self)
        ids: dict = {}
        return torch.tensor([ids.setdefault((t, *k), len(ids)) for t, k in zip(templates, keys)], dtype=torch.long)

    def to(self, device) -> PromptSet:
        self.clean, self.corrupt = self.clean.to(device), self.corrupt.to(device)
        return self


# ---------------------------------------------------------------------------
# Data files and the vocabulary of choices
# ---------------------------------------------------------------------------

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"
TASKS = ("ioi", "past_tense")
LANGUAGES = ("en", "zh")
SPLITS = ("all", "train", "heldout_templates", "heldout_pairs")
VARIANTS = {"ioi": ("abc", "context"), "past_tense": ("copy", "marking")}
DEFAULT_N = 200
MAX_WORD_TOKENS = 3  # a name or verb form may be at most this many tokens (Gemma 3: Chinese names are 2)
FEW = {"names": 10, "verbs": 5}  # a kept set with fewer distinct ones than this (or than its prompts) warns
COUNTERFACTUALS = ("adverb", "verb")

_SPACE = {"en": " ", "zh": ""}  # what joins a word to the text before it
_LEFT = {"en": "Then", "zh": "然后"}  # neutral left context for the per-item vocabulary filter
_SLOT = re.compile(r"\{([A-Za-z_]+)\}")


def check_choice(kind: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(repr(v) for v in valid)}")


def _read_names(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(n for n in lines if n and not n.startswith("#")))


def load_data(task: str, language: str, data_dir: str | Path | None = None) -> dict:
    """The task's JSON file for a language, with its names under ``"names"`` and ``"full_names"``.

    ``names`` is ``names_{language}.txt``, the toy zoo's world (its corpus and tokenizer
    read that file too); ``full_names`` is ``names_{language}_full.txt`` where it exists
    (Chinese full names, surname + given name, which no zoo model has seen: its
    tokenizer marks them unknown, so they only reach tokenizers that can spell them).
    The builders draw from both.

    >>> load_data("ioi", "en")["templates"][0]["id"]
    'ioi-en-01'
    """
    check_choice("task", task, TASKS)
    check_choice("language", language, LANGUAGES)
    root = Path(data_dir) if data_dir is not None else DATA_DIR
    with open(root / f"{task}_{language}.json", encoding="utf-8") as f:
        data = json.load(f)
    data["names"] = _read_names(root / f"names_{language}.txt")
    data["full_names"] = _read_names(root / f"names_{language}_full.txt")
    return data


def all_names(data: dict) -> list[str]:
    """Every name a builder may draw from ``data``: ``names`` then ``full_names``, without repeats."""
    return list(dict.fromkeys([*data["names"], *data.get("full_names", [])]))


# ---------------------------------------------------------------------------
# Tokens in context
# ---------------------------------------------------------------------------


class Tokens:
    """``tokenizer.encode(text, add_special_tokens=False)`` with a cache (no BOS ever: positions never shift)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.unk = getattr(tokenizer, "unk_token_id", None)
        self._cache: dict[str, list[int]] = {}
        self._pieces: dict[int, str] = {}

    def unknown(self, *ids) -> bool:
        """Whether any of ``ids`` (ints or lists of ints) is the tokenizer's unknown token."""
        if self.unk is None:
            return False
        return any(self.unk in i if isinstance(i, list) else i == self.unk for i in ids)

    def decode(self, token: int) -> str:
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.tokenizer.decode([token])
        return text

    def broken(self, ids: list[int]) -> bool:
        """Whether a token of ``ids`` alone is part of a character (byte-level pieces of Chinese decode to U+FFFD)."""
        return any("\ufffd" in self.decode(i) for i in ids)

    def __call__(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []
            self._cache[text] = ids
        return ids

    def span(self, text: str, start: int, end: int, ids: list[int] | None = None) -> tuple[int, int] | None:
        """Token range ``[a, b)`` of ``text[start:end]`` inside ``text``'s tokens, or None when the cut is not clean.

        Clean means: the tokens of ``text[:start]`` are a prefix of those of ``text[:end]``,
        which are a prefix of the tokens of the whole text (``ids``).
        """
        ids = self(text) if ids is None else ids
        pre, upto = self(text[:start]), self(text[:end])
        if upto[: len(pre)] != pre or ids[: len(upto)] != upto:
            return None
        return len(pre), len(upto)

    def after(self, text: str, word: str) -> list[int] | None:
        """The tokens ``word`` adds after ``text`` (None when it merges with ``text``'s last token or adds none)."""
        ids, full = self(text), self(text + word)
        if full[: len(ids)] != ids or len(full) == len(ids):
            return None
        return full[len(ids) :]


def _fill(template: str, values: dict[str, str | list[str]], space: str) -> tuple[str, list[tuple[str, int, int]]]:
    """Fill ``{SLOT}``s; a list value gives one string per occurrence. Returns the text and slot spans.

    A span ``(slot, start, end)`` covers the slot's text plus the ``space`` before it, so
    " Mary" is one piece for byte-level BPE.
    """
    out, spans, seen, last = [], [], {}, 0
    pos = 0
    for m in _SLOT.finditer(template):
        literal = template[last : m.start()]
        out.append(literal)
        pos += len(literal)
        name = m.group(1)
        if name not in values:
            raise ValueError(f"template slot {{{name}}} has no value; template: {template!r}")
        value = values[name]
        if isinstance(value, list):
            value = value[seen.get(name, 0)]
        seen[name] = seen.get(name, 0) + 1
        start = pos - len(space) if space and literal.endswith(space) else pos
        out.append(value)
        pos += len(value)
        spans.append((name, start, pos))
        last = m.end()
    out.append(template[last:])
    return "".join(out), spans


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def word_problem(tokens: Tokens, ids: list[int] | None, max_tokens: int | None = MAX_WORD_TOKENS) -> str | None:
    """Why a word's tokens ``ids`` cannot be a span (None when they can; ``max_tokens=None``: any length)."""
    if ids is None:
        return "merges with the text before it"
    if tokens.unknown(ids):
        return "unknown to the tokenizer"
    if tokens.broken(ids):
        return "splits a character into byte pieces"
    if max_tokens is not None and len(ids) > max_tokens:
        return f"more than {max_tokens} tokens"
    return None


def _word_widths(words: list[str], tokens: Tokens, language: str, label: str, report: DropReport) -> dict[str, int]:
    """``{word: its number of tokens}`` after a neutral left context, for the words that can be spans.

    A word is dropped (and counted in ``report`` as "{label}: <reason>") when it merges
    with the text before it, has a token unknown to the tokenizer, is cut into byte
    pieces of a character, or is longer than :data:`MAX_WORD_TOKENS` tokens.
    """
    kept = {}
    for word in words:
        text = _SPACE[language] + word
        ids = tokens.after(_LEFT[language], text)
        problem = word_problem(tokens, ids)
        if problem is None:
            kept[word] = len(ids)
        else:
            pieces = [tokens.decode(i) for i in ids or []]
            report.drop(f"{label}: {problem}", f"{text!r} -> {pieces}")
    report.vocabulary[label] = (len(kept), len(words))
    return kept


def _continuations(tokens: Tokens, prompt: str, answer: str, distractor: str) -> tuple[int, int]:
    """First tokens of ``answer`` and of ``distractor`` after ``prompt`` (the metric's ids); raises Drop.

    Each word must continue the prompt cleanly with known, whole tokens, and the two first tokens must differ.
    """
    first = []
    for role, word in (("answer", answer), ("distractor", distractor)):
        ids = tokens.after(prompt, word)
        problem = word_problem(tokens, ids, max_tokens=None)  # only its first token is read
        if problem is not None:
            raise Drop(f"{role} after the prompt: {problem}", f"{word!r} after {prompt!r}")
        first.append(ids[0])
    if first[0] == first[1]:
        raise Drop(
            "answer and distractor share their first token",
            f"{answer!r} / {distractor!r} both start with {tokens.decode(first[0])!r}",
        )
    return first[0], first[1]


def _warn_few(report: DropReport, task: str, language: str, label: str, used: set, n_prompts: int, n_data: int):
    """Warn (and note in the report) when the kept prompts use fewer distinct ``label`` than :data:`FEW` asks."""
    want = min(FEW[label], n_prompts)
    if len(used) < want:
        shown = ", ".join(sorted(map(str, used))[:5])
        msg = (
            f"{task}/{language}: {n_prompts} prompts rest on {len(used)} distinct {label} ({shown}); the data has "
            f"{n_data} (the report says why others were not used). Effects may be about these {label}, not the "
            f"task: add {label} this tokenizer can spell, or use another tokenizer"
        )
        report.warnings.append(msg)
        warnings.warn(msg, stacklevel=4)


def pad_rows(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def pad_token_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _check_template(t: dict, task: str, language: str) -> None:
    """A template must have the slots its task reads; else a ValueError naming it."""
    slots = _SLOT.findall(t["text"])
    if task == "ioi":
        ok = (
            slots.count("IO") == 1
            and slots.count("S") == 2
            and slots.index("IO") < max(i for i, x in enumerate(slots) if x == "S")
        )
        need = "{IO} once and {S} twice, IO before the second S"
    else:
        verb = "PRESENT" if language == "en" else "VERB"
        ok = "NAME" in slots and verb in slots and ("ADVERB" in slots) + ("adverb" in slots) == 1
        need = f"{{NAME}}, {{{verb}}} and one of {{ADVERB}} / {{adverb}}"
    if not ok:
        raise ValueError(f"{task}/{language} template {t.get('id')!r} needs {need}: {t['text']!r}")


def _templates(data: dict, split: str, task: str) -> list[dict]:
    want = {
        "all": ("train", "heldout"),
        "train": ("train",),
        "heldout_pairs": ("train",),
        "heldout_templates": ("heldout",),
    }
    chosen = [t for t in data["templates"] if t.get("split", "train") in want[split]]
    if not chosen:
        raise ValueError(f"{task}: no template has split {want[split]} (needed for split={split!r})")
    return chosen


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` itself puts its BOS first (``add_special_tokens=True``): Gemma's does, GPT-2's not.

    >>> adds_bos(gpt2_tokenizer)   # doctest: +SKIP
    False
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = list(tokenizer.encode("a", add_special_tokens=True))
    return bool(ids) and ids[0] == bos


def bos_id(tokenizer, prepend_bos: bool | None) -> int | None:
    """The BOS id to put before every prompt: None unless asked for, or (``None``) unless the tokenizer adds one."""
    if prepend_bos is None:
        prepend_bos = adds_bos(tokenizer)
    if not prepend_bos:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError("prepend_bos=True but the tokenizer has no bos_token_id; pass prepend_bos=False")
    return int(bos)


def encode(tokenizer, text: str, prepend_bos: bool | None = None) -> list[int]:
    """The token ids of ``text`` as the builders make a prompt's: no special tokens, then the BOS first where
    the tokenizer adds one itself (:func:`adds_bos`; ``prepend_bos`` overrides, as in :func:`build`).

    >>> encode(gemma_tokenizer, "When Mary")[0] == gemma_tokenizer.bos_token_id   # doctest: +SKIP
    True
    """
    bos = bos_id(tokenizer, prepend_bos)
    return ([] if bos is None else [bos]) + list(tokenizer.encode(text, add_special_tokens=False))


def first_token(tokenizer, text: str, word: str) -> int:
    """The first token ``word`` adds after ``text``: the id a metric reads for a typed answer, as the builders
    read a name's (``word`` with its joining space in English: ``" Mary"``; none in Chinese).

    Raises ``ValueError`` saying why when ``word`` merges with the text's last token, adds nothing, or has a
    token unknown to the tokenizer or a byte piece of a character.

    >>> first_token(gpt2_tokenizer, "John gave a drink to", " Mary")   # doctest: +SKIP
    5335
    """
    tokens = Tokens(tokenizer)
    ids = tokens.after(text, word)
    problem = word_problem(tokens, ids, max_tokens=None)
    if problem is not None:
        raise ValueError(f"{word!r} after {text[-30:]!r}: {problem}; type it as it continues the text")
    return ids[0]


def prompt_count(n: int | None) -> int:
    n = DEFAULT_N if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be a positive number of prompts, got {n}")
    return n


def _pair_allowed(split: str, heldout: bool) -> bool:
    return {"all": True, "heldout_templates": True, "train": not heldout, "heldout_pairs": heldout}[split]


class Drop(Exception):
    """A candidate prompt failed a token check; the message is the report's reason."""

    def __init__(self, reason: str, example: str):
        super().__init__(reason)
        self.reason, self.example = reason, example


def _locate(
    tokens: Tokens, text: str, ids: list[int], spans, which: str, only: tuple[str, ...]
) -> dict[str, tuple[int, int]]:
    """Token ranges of the slots named in ``only``, keyed ``SLOT#k`` (k-th occurrence, from 1); raises Drop.

    Other slots (place, object, complement) may merge with their neighbours: no position depends on them.
    """
    out, seen = {}, {}
    for name, start, end in spans:
        seen[name] = seen.get(name, 0) + 1
        if name not in only:
            continue
        rng = tokens.span(text, start, end, ids)
        if rng is None:
            raise Drop(f"{which} slot {{{name}}} merges with its neighbours", repr(text[start:end]))
        out[f"{name}#{seen[name]}"] = rng
    return out


def _finish(task, language, rows, dropped: dict[str, int], report: DropReport, tokenizer, bos: int | None):
    """Stack kept rows into a PromptSet (raises when nothing survived, naming the filter that removed most)."""
    report.kept = len(rows)
    if not rows:
        reason, count = max(dropped.items(), key=lambda kv: kv[1])
        ex = "; ".join(report.examples.get(reason, [])[:3])
        raise NoPrompts(
            f"{task}/{language}: no prompt survived; the main filter was {reason!r} "
            f"({count} of {report.total} candidates, e.g. {ex}); {report}"
        )
    shift = 0
    if bos is not None:
        shift, report.bos = 1, bos
        for r in rows:
            r["clean"], r["corrupt"] = [bos] + r["clean"], [bos] + r["corrupt"]
    pad_id = pad_token_id(tokenizer)
    names = list(rows[0]["positions"])
    meta = pd.DataFrame([r["meta"] for r in rows])
    return PromptSet(
        task=task,
        language=language,
        clean=pad_rows([r["clean"] for r in rows], pad_id),
        corrupt=pad_rows([r["corrupt"] for r in rows], pad_id),
        lengths=torch.tensor([len(r["clean"]) for r in rows], dtype=torch.long),
        answer=torch.tensor([r["answer"] for r in rows], dtype=torch.long),
        distractor=torch.tensor([r["distractor"] for r in rows], dtype=torch.long),
        positions={k: torch.tensor([r["positions"][k] + shift for r in rows], dtype=torch.long) for k in names},
        meta=meta,
        report=report,
        pad_id=pad_id,
        built_with=tokenizer_stamp(tokenizer),
    )


def _sample(rng: random.Random, n: int, report: DropReport, make) -> tuple[list[dict], dict[str, int]]:
    """Call ``make(rng)`` until ``n`` distinct prompts are kept or ``max(20 n, 200)`` candidates were tried.

    Returns the kept rows and the prompt-level drop counts (also added to ``report``).
    """
    rows, seen, dropped = [], set(), {}
    for _ in range(max(20 * n, 200)):
        if len(rows) >= n:
            break
        report.total += 1
        try:
            row = make(rng)
            key = row["meta"]["clean_text"]
            if key in seen:
                raise Drop("duplicate of an earlier prompt", key)
        except Drop as d:
            report.drop(d.reason, d.example)
            dropped[d.reason] = dropped.get(d.reason, 0) + 1
            continue
        seen.add(key)
        rows.append(row)
    return rows, dropped


# ---------------------------------------------------------------------------
# IOI
# ---------------------------------------------------------------------------


def _draw(rng: random.Random, names: list[str], width: dict[str, int], widths: list[int], exclude) -> list[str]:
    """Distinct names, none in ``exclude``, the k-th of ``widths[k]`` tokens; raises Drop when none is left.

    When every width is the same (always so for a word-level tokenizer) this is one
    ``rng.sample`` of the names of that width.
    """
    if len(set(widths)) == 1:
        pool = [x for x in names if x not in exclude and width[x] == widths[0]]
        if len(pool) < len(widths):
            raise Drop("too few counterfactual names of the same token length", f"{len(pool)} of {widths[0]} tokens")
        return rng.sample(pool, len(widths))
    out: list[str] = []
    for w in widths:
        pool = [x for x in names if x not in exclude and x not in out and width[x] == w]
        if not pool:
            raise Drop("too few counterfactual names of the same token length", f"none of {w} tokens left")
        out.append(rng.choice(pool))
    return out


def build_ioi(
    language: str,
    tokenizer,
    *,
    n: int | None = None,
    seed: int = 0,
    split: str = "all",
    variant: str | None = None,
    data: dict | None = None,
    prepend_bos: bool | None = None,
) -> PromptSet:
    """Indirect-object identification prompts with ABC counterfactuals.

    Clean: a template filled with IO, S (twice), a place and an object; answer = the
    first token of IO after the prompt, distractor = the first token of S (they must
    differ). Corrupt: IO, S1, S2 replaced by three distinct other names of the same
    token lengths. Positions ``IO``, ``S1``, ``S2`` (each name's last token), ``end``.
    A name may be up to :data:`MAX_WORD_TOKENS` tokens; failures are dropped and
    counted in ``prompts.report``.
    ``variant="context"`` puts a sentence about a third name C first (the data's
    ``contexts``: "Anna stayed at home. When Mary and John ..."), so "the name that
    is not repeated" no longer picks IO; its counterfactual replaces all four names
    and it adds the position ``C``.
    ``data`` overrides the loaded data dict (keys as in ``load_data``).
    ``prepend_bos``: None = when the tokenizer adds its BOS itself.

    >>> p = build_ioi("en", gpt2_tokenizer, n=8)   # doctest: +SKIP
    >>> p.clean.shape, p.positions["IO"]            # doctest: +SKIP
    """
    check_choice("language", language, LANGUAGES)
    check_choice("split", split, SPLITS)
    check_choice("variant", variant, (None, *VARIANTS["ioi"]))
    n, bos = prompt_count(n), bos_id(tokenizer, prepend_bos)
    data = load_data("ioi", language) if data is None else data
    ioi = _Ioi(language, tokenizer, split, variant, data, DropReport(requested=n))
    rows, dropped = _sample(random.Random(seed), n, ioi.report, ioi.make)
    used = {r["meta"][k] for r in rows for k in ("io", "s")}
    _warn_few(ioi.report, "ioi", language, "names", used, len(rows), len(ioi.names_in_data))
    return _finish("ioi", language, rows, dropped, ioi.report, tokenizer, bos)


class _Ioi:
    """IOI prompts one at a time (:meth:`make`) from what a tokenizer allows: the usable names, every name pair the
    split admits, the templates (checked here, each refusal in ``report``)."""

    SLOTS = ("IO", "S", "C")

    def __init__(self, language: str, tokenizer, split: str, variant: str | None, data: dict, report: DropReport):
        self.language, self.variant, self.data, self.report = language, variant, data, report
        self.space, self.tokens = _SPACE[language], Tokens(tokenizer)
        self.templates = _templates(data, split, "ioi")
        for t in self.templates:
            _check_template(t, "ioi", language)
        self.names_in_data = all_names(data)
        self.width = _word_widths(self.names_in_data, self.tokens, language, "names", report)
        names = self.names = list(self.width)
        if len(names) < 5:
            raise NoPrompts(
                f"ioi/{language}: only {len(names)} of {len(self.names_in_data)} names are usable for this tokenizer "
                f"(each must be one token or a span of up to {MAX_WORD_TOKENS} known, whole tokens; IOI needs 5: IO, "
                f"S and three counterfactual names); {report}"
            )
        self.pairs = [(a, b) for a in names for b in names if a != b and _pair_allowed(split, is_heldout(a, b))]
        if not self.pairs:
            raise NoPrompts(f"ioi/{language}: no name pair fits split={split!r} among {len(names)} names")
        self.places, self.objects = data.get("places") or [""], data.get("objects") or [""]
        self.context = variant == "context"
        if self.context and not data.get("contexts"):
            raise ValueError(f"ioi/{language}: variant 'context' needs a 'contexts' list in the data")
        if len(names) < 5 + 2 * self.context:
            raise NoPrompts(f"ioi/{language}: variant {variant!r} needs {5 + 2 * self.context} usable names")

    def _draw(self, rng: random.Random) -> dict:
        """The template and words of one prompt pair: IO, S, place, object, the counterfactual names (a for IO,
        b and c for S1 and S2, then with a context the clean and counterfactual C, as long as IO)."""
        t = rng.choice(self.templates)
        io, s = rng.choice(self.pairs)
        place, obj = rng.choice(self.places), rng.choice(self.objects)
        width = self.width
        others = _draw(
            rng, self.names, width, [width[io], width[s], width[s]] + [width[io]] * (2 * self.context), (io, s)
        )
        d = dict(t=t, text=t["text"], io=io, s=s, place=place, obj=obj, others=others)
        d["fixed"] = {"PLACE": place, "OBJECT": obj}
        d["clean"], d["corrupt"] = {"IO": io, "S": [s, s]}, {"IO": others[0], "S": others[1:3]}
        if self.context:
            ctx = rng.choice(self.data["contexts"]).replace("{PLACE}", "{C_PLACE}").replace("{OBJECT}", "{C_OBJECT}")
            d["text"] = ctx + self.space + d["text"]
            d["fixed"].update(C_PLACE=rng.choice(self.places), C_OBJECT=rng.choice(self.objects))
            d["clean"]["C"], d["corrupt"]["C"] = others[3], others[4]
        return d

    def make(self, rng: random.Random) -> dict:
        """One row of the prompt set (raises :class:`Drop` for a pair the tokenizer cannot align)."""
        d, tokens, space = self._draw(rng), self.tokens, self.space
        clean, clean_spans = _fill(d["text"], {**d["clean"], **d["fixed"]}, space)
        corrupt, corrupt_spans = _fill(d["text"], {**d["corrupt"], **d["fixed"]}, space)
        ids, cids = tokens(clean), tokens(corrupt)
        if tokens.unknown(ids, cids):
            raise Drop("prompt has tokens unknown to the tokenizer", clean if tokens.unknown(ids) else corrupt)
        if len(ids) != len(cids):
            raise Drop("clean/counterfactual lengths differ", f"{len(ids)} vs {len(cids)}: {corrupt!r}")
        pos = _locate(tokens, clean, ids, clean_spans, "clean", self.SLOTS)
        cpos = _locate(tokens, corrupt, cids, corrupt_spans, "counterfactual", self.SLOTS)
        if pos != cpos:
            raise Drop("clean/counterfactual name spans differ", f"{clean!r} / {corrupt!r}")
        answer, distractor = _continuations(tokens, clean, space + d["io"], space + d["s"])
        positions = {"IO": pos["IO#1"][1] - 1, "S1": pos["S#1"][1] - 1, "S2": pos["S#2"][1] - 1, "end": len(ids) - 1}
        if self.context:
            positions["C"] = pos["C#1"][1] - 1
        meta = self._meta(d, pos, clean, corrupt)
        return dict(clean=ids, corrupt=cids, answer=answer, distractor=distractor, positions=positions, meta=meta)

    def _meta(self, d: dict, pos: dict, clean: str, corrupt: str) -> dict:
        io, s, (a, b, c), space = d["io"], d["s"], d["others"][:3], self.space
        meta = {
            "template": d["t"]["id"],
            "split": d["t"].get("split", "train"),
            "variant": self.variant or "abc",
            "io": io,
            "s": s,
            "pair_heldout": is_heldout(io, s),
            "corrupt_io": a,
            "corrupt_s1": b,
            "corrupt_s2": c,
            "place": d["place"],
            "object": d["obj"],
            "clean_text": clean,
            "corrupt_text": corrupt,
            "answer_text": space + io,
            "distractor_text": space + s,
            "io_tokens": pos["IO#1"][1] - pos["IO#1"][0],
            "s_tokens": pos["S#1"][1] - pos["S#1"][0],
        }
        if self.context:
            meta.update(c=d["others"][3], corrupt_c=d["others"][4])
        return meta


# ---------------------------------------------------------------------------
# Past tense
# ---------------------------------------------------------------------------


def _verb_key(language: str, verb: dict) -> str:
    return verb["present"] if language == "en" else verb["verb"]


def _counterfactual(language: str, variant: str, counterfactual: str | None) -> str:
    """The counterfactual a past-tense set uses: "verb" for Chinese copy by default, else "adverb"."""
    check_choice("counterfactual", counterfactual, (None, *COUNTERFACTUALS))
    default = "verb" if (language, variant) == ("zh", "copy") else "adverb"
    if counterfactual not in (None, "adverb", default):
        raise ValueError(
            f"past_tense/{language} variant {variant!r} has no counterfactual {counterfactual!r}: another verb in "
            f"the context sentence changes which verb is copied, which only the Chinese copy metric (verb vs other "
            f"verb) reads; use counterfactual='adverb' (or None)"
        )
    return counterfactual or default


def build_past_tense(
    language: str,
    tokenizer,
    *,
    n: int | None = None,
    seed: int = 0,
    split: str = "all",
    variant: str | None = None,
    counterfactual: str | None = None,
    data: dict | None = None,
    prepend_bos: bool | None = None,
) -> PromptSet:
    """Past-tense prompts: a habitual context sentence, then a past adverb and the name again.

    ``variant="copy"`` (default): the answer is the verb's past form (English " walked",
    distractor the present " walks"; Chinese the verb itself "去", distractor a different
    verb). ``variant="marking"``: Chinese prompts end with the verb, answer "了", distractor
    the first token of the verb's complement ("公园"); in English copying and marking are
    the same token, so it gives the same prompts and answers as "copy".
    Answer and distractor are the first tokens of those words (they must differ).

    ``counterfactual`` (what the counterfactual prompt changes, so that its right answer
    is the distractor and the metric flips):

    - ``"adverb"`` (English, and Chinese marking): the past adverb replaced by a habitual
      adverb of equal token length ("Usually, Tom" -> " walks"; "每天，小明去" -> "公园").
    - ``"verb"`` (Chinese copy, the default there): the context sentence's verb and its
      complement replaced by the distractor verb's, of equal token lengths
      ("每天，小明吃午饭。昨天，小明" -> "吃"). An adverb swap does not flip the copy
      metric (the verb is copied after a habitual adverb too: Gemma 3, clean 6.02,
      counterfactual 6.24); ``counterfactual="adverb"`` still builds it, and
      normalising its effects is refused (:func:`lsa.metrics.normalized`).

    Positions ``verb`` (the verb in the context sentence, its last token), ``adverb``
    (the adverb's last token), ``name2`` (the repeated name's last token), ``end``.
    """
    check_choice("language", language, LANGUAGES)
    check_choice("split", split, SPLITS)
    check_choice("variant", variant, (None, *VARIANTS["past_tense"]))
    variant = variant or "copy"
    cf = _counterfactual(language, variant, counterfactual)
    n, bos = prompt_count(n), bos_id(tokenizer, prepend_bos)
    data = load_data("past_tense", language) if data is None else data
    past = _PastTense(language, tokenizer, split, variant, cf, data, DropReport(requested=n))
    rows, dropped = _sample(random.Random(seed), n, past.report, past.make)
    for label, key, n_data in (("names", "name", len(past.names_in_data)), ("verbs", "verb", len(data["verbs"]))):
        used = {r["meta"][key] for r in rows}
        _warn_few(past.report, "past_tense", language, label, used, len(rows), n_data)
    return _finish("past_tense", language, rows, dropped, past.report, tokenizer, bos)


class _PastTense:
    """Past-tense prompts one at a time (:meth:`make`) from what a tokenizer allows: the usable names and verbs,
    each past adverb with the habitual adverbs of its token length, every adverb x verb pair the split admits."""

    SLOTS = ("NAME", "PRESENT", "VERB", "ADVERB", "adverb")

    def __init__(self, language, tokenizer, split: str, variant: str, cf: str, data: dict, report: DropReport):
        self.language, self.variant, self.cf, self.data, self.report = language, variant, cf, data, report
        self.space, self.tokens = _SPACE[language], Tokens(tokenizer)
        self.templates = _templates(data, split, "past_tense")
        for t in self.templates:
            _check_template(t, "past_tense", language)
        self.names_in_data = all_names(data)
        self.names = list(_word_widths(self.names_in_data, self.tokens, language, "names", report))
        self.verbs, self.shape = self._usable_verbs()
        if not self.names:
            raise NoPrompts(
                f"past_tense/{language}: no name is usable for this tokenizer (each must be one token or a span of up "
                f"to {MAX_WORD_TOKENS} known, whole tokens); {report}"
            )
        if not self.verbs or (language == "zh" and variant == "copy" and len(self.verbs) < 2):
            raise NoPrompts(
                f"past_tense/{language}: too few verbs are usable for this tokenizer (each form must be one token or a "
                f"span of up to {MAX_WORD_TOKENS} known, whole tokens); {report}"
            )
        self.partners = self._adverb_partners()
        self.combos = [
            (a, v)
            for a in self.partners
            for v in self.verbs
            if _pair_allowed(split, is_heldout(a, _verb_key(language, v)))
        ]
        if not self.combos:
            raise NoPrompts(f"past_tense/{language}: no adverb x verb combination fits split={split!r}; {report}")

    def _usable_verbs(self) -> tuple[list[dict], dict]:
        """The verbs whose forms the tokenizer spells as words, and each one's shape: (tokens of the verb, tokens
        of verb + complement), for the verb counterfactual."""
        language, space, tokens = self.language, self.space, self.tokens
        verb_forms = ("present", "past") if language == "en" else ("verb",)
        verbs, shape = [], {}
        for v in self.data["verbs"]:
            found = [(f, tokens.after(_LEFT[language], space + v[f])) for f in verb_forms]
            bad = [(f, ids, problem) for f, ids in found if (problem := word_problem(tokens, ids))]
            if bad:  # one drop per verb, under its first form's problem
                shown = ", ".join(f"{space + v[f]!r} -> {[tokens.decode(i) for i in ids or []]}" for f, ids, _ in bad)
                self.report.drop(f"verbs: {bad[0][2]}", shown)
                continue
            verbs.append(v)
            whole = tokens.after(_LEFT[language], space + v[verb_forms[0]] + space + v["rest"])
            shape[_verb_key(language, v)] = (len(found[0][1]), None if whole is None else len(whole))
        self.report.vocabulary["verbs"] = (len(verbs), len(self.data["verbs"]))
        return verbs, shape

    def _adverb_partners(self) -> dict[str, list[str]]:
        """Each past adverb with the habitual adverbs of equal token length after a sentence end."""
        data, tokens = self.data, self.tokens
        stop = ". " if self.language == "en" else "。"
        length = {a: len(tokens(stop + a)) - len(tokens(stop)) for a in data["past_adverbs"] + data["habitual_adverbs"]}
        partners = {}
        for a in data["past_adverbs"]:
            same = [h for h in data["habitual_adverbs"] if length[h] == length[a]]
            if same:
                partners[a] = same
            else:
                self.report.drop(
                    "past adverb has no habitual adverb of equal token length", f"{a!r} is {length[a]} tokens"
                )
        self.report.vocabulary["past adverbs"] = (len(partners), len(data["past_adverbs"]))
        return partners

    def _draw(self, rng: random.Random) -> dict:
        """The template and words of one prompt pair; ``other``: Chinese copy's distractor verb (and, counterfactual
        ``"verb"``, the counterfactual's verb)."""
        t = rng.choice(self.templates)
        adverb, verb = rng.choice(self.combos)
        d = dict(t=t, adverb=adverb, verb=verb, habitual=rng.choice(self.partners[adverb]))
        d.update(context=rng.choice(self.data["habitual_adverbs"]), name=rng.choice(self.names), other=None)
        if self.language == "zh" and self.variant == "copy":
            pool = [v for v in self.verbs if v["verb"] != verb["verb"]]
            if self.cf == "verb":
                shape = self.shape
                pool = [v for v in pool if shape[v["verb"]] == shape[verb["verb"]] and shape[v["verb"]][1] is not None]
                if not pool:
                    raise Drop("no other verb of the same token lengths", f"{verb['verb'] + verb['rest']!r}")
            d["other"] = rng.choice(pool)
        return d

    def _texts(self, d: dict) -> tuple[str, list, str, list]:
        """``(clean, its spans, counterfactual, its spans)``."""
        verb, other, space, cf = d["verb"], d["other"], self.space, self.cf
        values = {
            "NAME": d["name"],
            "REST": verb["rest"],
            "HABITUAL": d["context"],
            "habitual": _lower_first(d["context"]),
        }
        if self.language == "en":
            values.update(PRESENT=verb["present"], PAST=verb["past"])
        else:
            values.update(VERB=verb["verb"])
        d["corrupt_adverb"] = corrupt_adverb = d["habitual"] if cf == "adverb" else d["adverb"]
        corrupt_values = {**values, "VERB": other["verb"], "REST": other["rest"]} if cf == "verb" else values
        adverb, text = d["adverb"], d["t"]["text"]
        clean, spans = _fill(text, {**values, "ADVERB": adverb, "adverb": _lower_first(adverb)}, space)
        corrupt, cspans = _fill(
            text, {**corrupt_values, "ADVERB": corrupt_adverb, "adverb": _lower_first(corrupt_adverb)}, space
        )
        if self.variant == "marking" and self.language == "zh":
            vform = verb["verb"]
            clean, corrupt = clean + vform, corrupt + vform
        return clean, spans, corrupt, cspans

    def _answers(self, d: dict) -> tuple[str, str]:
        verb = d["verb"]
        if self.variant == "marking" and self.language == "zh":
            return "了", verb["rest"]
        if self.language == "en":
            return self.space + verb["past"], self.space + verb["present"]
        return verb["verb"], d["other"]["verb"]

    def make(self, rng: random.Random) -> dict:
        """One row of the prompt set (raises :class:`Drop` for a pair the tokenizer cannot align)."""
        d, tokens = self._draw(rng), self.tokens
        clean, spans, corrupt, cspans = self._texts(d)
        ids, cids = tokens(clean), tokens(corrupt)
        if tokens.unknown(ids, cids):
            raise Drop("prompt has tokens unknown to the tokenizer", clean if tokens.unknown(ids) else corrupt)
        if len(ids) != len(cids):
            raise Drop("clean/counterfactual lengths differ", f"{clean!r} vs {corrupt!r}: {len(ids)} vs {len(cids)}")
        pos = _locate(tokens, clean, ids, spans, "clean", self.SLOTS)
        cpos = _locate(tokens, corrupt, cids, cspans, "counterfactual", self.SLOTS)
        if pos != cpos:
            raise Drop("clean/counterfactual spans differ", f"{clean!r} / {corrupt!r}")
        verb_slot = "PRESENT#1" if self.language == "en" else "VERB#1"
        name2 = max((k for k in pos if k.startswith("NAME#")), key=lambda k: int(k.split("#")[1]))
        adverb_slot = next(k for k in pos if k.lower().startswith("adverb#"))
        answer_text, distractor_text = self._answers(d)
        answer, distractor = _continuations(tokens, clean, answer_text, distractor_text)
        positions = {
            "verb": pos[verb_slot][1] - 1,
            "adverb": pos[adverb_slot][1] - 1,
            "name2": pos[name2][1] - 1,
            "end": len(ids) - 1,
        }
        texts = dict(clean_text=clean, corrupt_text=corrupt, answer_text=answer_text, distractor_text=distractor_text)
        meta = {**self._meta(d), **texts}
        return dict(clean=ids, corrupt=cids, answer=answer, distractor=distractor, positions=positions, meta=meta)

    def _meta(self, d: dict) -> dict:
        language, verb, cf = self.language, d["verb"], self.cf
        return {
            "template": d["t"]["id"],
            "split": d["t"].get("split", "train"),
            "variant": self.variant,
            "counterfactual": cf,
            "name": d["name"],
            "verb": _verb_key(language, verb),
            "past": verb.get("past", verb.get("verb")),
            "rest": verb["rest"],
            "adverb": d["adverb"],
            "habitual": d["habitual"],
            "context_adverb": d["context"],
            "corrupt_adverb": d["corrupt_adverb"],
            "corrupt_verb": d["other"]["verb"] if cf == "verb" else _verb_key(language, verb),
            "combo_heldout": is_heldout(d["adverb"], _verb_key(language, verb)),
        }


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------

_BUILDERS = {"ioi": build_ioi, "past_tense": build_past_tense}


def build(
    task: str,
    language: str,
    tokenizer,
    *,
    n: int | None = None,
    seed: int = 0,
    split: str = "all",
    variant: str | None = None,
    **kwargs,
) -> PromptSet:
    """Token-checked prompts for ``task`` in ``language`` (deterministic by ``seed``).

    ``split``: "all"; "train" (train templates, name pairs / adverb x verb combinations
    that ``lsa.splits.is_heldout`` keeps in training); "heldout_templates" (held-out
    templates); "heldout_pairs" (train templates with held-out pairs / combinations).
    ``n`` prompts are wanted (default 200); ``prompts.report`` says what was dropped and why.

    >>> prompts = build("ioi", "en", tokenizer, n=100, split="train")   # doctest: +SKIP
    >>> print(prompts.report)                                             # doctest: +SKIP
    """
    check_choice("task", task, TASKS)
    check_choice("variant", variant, (None, *VARIANTS[task]))
    return _BUILDERS[task](language, tokenizer, n=n, seed=seed, split=split, variant=variant, **kwargs)


def disjoint(prompts: PromptSet, sizes: Sequence[int]) -> list[PromptSet]:
    """Consecutive parts of ``prompts`` of at most ``sizes`` prompts each, no clean text in two parts.

    A prompt whose clean text an earlier part holds is left out (the builders draw with replacement), so
    a circuit found on one part is judged on prompts it has not seen.

    >>> train, heldout = disjoint(build("ioi", "en", tokenizer, n=128), [64, 64])   # doctest: +SKIP
    """
    seen: set = set()
    texts = prompts.meta["clean_text"].tolist() if "clean_text" in prompts.meta else prompts.clean.tolist()
    parts, row = [], 0
    for size in sizes:
        rows = []
        while len(rows) < size and row < len(prompts):
            key = str(texts[row])
            if key not in seen:
                rows.append(row)
            row += 1
        seen |= {str(texts[r]) for r in rows}
        if not rows:
            raise ValueError(f"no prompts left for a part of {size}: build more prompts than {sum(sizes)}")
        parts.append(prompts.subset(rows))
    return parts


def try_build(task: str, language: str, tokenizer, *, min_prompts: int = 2, **kwargs) -> tuple[PromptSet | None, str]:
    """:func:`build`, or ``(None, reason)`` where the tokenizer leaves nothing usable (:class:`NoPrompts`)
    or fewer than ``min_prompts`` prompts; any other error raises. ``kwargs`` go to :func:`build`."""
    try:
        prompts = build(task, language, tokenizer, **kwargs)
    except NoPrompts as err:
        return None, str(err)
    if len(prompts) < min_prompts:
        return None, f"only {len(prompts)} prompt(s), {min_prompts} needed; {prompts.report}"
    return prompts, ""


def build_sets(
    tasks: str | Iterable[str],
    languages: str | Iterable[str],
    tokenizer,
    *,
    n: int | None = None,
    seed: int = 0,
    min_prompts: int = 2,
    verbose: bool = True,
    **kwargs,
) -> dict[tuple[str, str], PromptSet]:
    """:func:`build` for every (task, language), skipping those the tokenizer cannot express: ``{(task, language): set}``.

    Prints each set's report (``verbose``). A (task, language) whose builder finds nothing
    usable (:class:`NoPrompts`, e.g. Chinese for a tokenizer that spells it in byte pieces),
    or that keeps fewer than ``min_prompts`` prompts, is left out with its reason printed;
    any other error raises. When every one is left out this raises :class:`NoPrompts`
    naming each reason. ``kwargs`` go to :func:`build` (``split``, ``variant``, ...).

    >>> sets = build_sets(["ioi", "past_tense"], ["en", "zh"], smollm2_tokenizer, n=16)  # doctest: +SKIP
          ioi en: kept 16 of 16; names: ...
          ioi zh: skipped: ioi/zh: only 1 of 339 names are usable for this tokenizer ...
    >>> sorted(sets)                                                                     # doctest: +SKIP
    [('ioi', 'en'), ('past_tense', 'en')]
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    languages = [languages] if isinstance(languages, str) else list(languages)
    built, skipped = {}, {}
    for task in tasks:
        for language in languages:
            prompts, why = try_build(task, language, tokenizer, n=n, seed=seed, min_prompts=min_prompts, **kwargs)
            if prompts is None:
                skipped[task, language] = why
            else:
                built[task, language] = prompts
            if verbose:
                print(f"{task:>10} {language}: {prompts.report if prompts is not None else f'skipped: {why}'}")
    if not built:
        reasons = "\n".join(f"  {t}/{lang}: {why}" for (t, lang), why in skipped.items())
        raise NoPrompts(f"no task and language has usable prompts for this tokenizer:\n{reasons}")
    return built


def describe(prompts: PromptSet, tokenizer=None, k: int = 5) -> pd.DataFrame:
    """The first ``k`` prompts as a table: template, texts, answer / distractor, the token at each position.

    A named position is its word's last token (Gemma 3: "旭" for 石旭); the answer is the word's first ("石").

    Token strings come from ``tokenizer`` when given (else only the texts in ``prompts.meta``).
    """
    rows = []
    for i in range(min(k, len(prompts))):
        m = prompts.meta.iloc[i]
        row = {
            "template": m.get("template"),
            "clean": m.get("clean_text"),
            "corrupt": m.get("corrupt_text"),
            "answer": m.get("answer_text"),
            "distractor": m.get("distractor_text"),
            "length": int(prompts.lengths[i]),
        }
        if tokenizer is not None:
            row["answer"] = tokenizer.decode([int(prompts.answer[i])])
            row["distractor"] = tokenizer.decode([int(prompts.distractor[i])])
            for name, p in prompts.positions.items():
                row[f"at {name}"] = tokenizer.decode([int(prompts.clean[i, int(p[i])])])
        rows.append(row)
    return pd.DataFrame(rows)
