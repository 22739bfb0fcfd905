"""Latent language: which language a model's middle layers work in (Wendler et al. 2024; Zhong et al.).

Word tasks with a one-word answer in a *target* language, built per tokenizer from
``data/tasks/latent_language.json`` (a bilingual word list, cloze sentences, prompt templates):

- ``translation``: few-shot lines ``English: "book" - 中文: "书"``, the last one cut after the
  target's opening quote; the *other* language is the source, whose word is in the prompt;
- ``repetition``: the same lines with source = target (``中文: "书" - 中文: "书"``); the other
  language's version of the word appears nowhere in the prompt;
- ``cloze``: few-shot definitions in the target language (``The ___ pumps blood through the
  body. Answer: "heart"``), nothing of the other language in the prompt.

A word is scored by its first token in each language, as it would continue the prompt. A
prompt is kept only where the two first tokens differ and neither occurs elsewhere in the
prompt (the query's own source word excepted); everything dropped is counted, with its
reason, in ``LatentSet.report`` (:class:`lsa.tasks.DropReport`), and a language the
tokenizer cannot spell is skipped with its reason by :func:`build_sets`.

The logit lens (:func:`lens`) applies the final norm and the unembedding, exactly as the
model applies them after its last block, to the residual stream at the last position
after each block (``layer = -1``: the embedding). Per prompt and layer it keeps the
probability and rank of the target-language and other-language first tokens, the
entropy of the lens distribution (bits), Wendler et al.'s *token energy* (how much of the
normalised residual lies along the unembedding's rows, relative to an average row; 1 =
as much as a typical token direction) and the top tokens. :func:`summarize` gives
per-layer medians with 95% intervals over prompts, :func:`overtaking` the layer from
which the target language leads for good and the layers where either language leads
beyond its interval.

Shapes: a :class:`LatentSet`'s ``tokens`` ``[n, pos]`` (right-padded), ``lengths``,
``target_id``, ``other_id`` ``[n]`` (``-1``: no other language).

Cost: one forward per batch of prompts, stopped after the last block, plus the
unembedding at each prompt's last position after every block (Gemma 3 270M: 168M
multiply-adds per prompt and layer, 19 layers). The lens is computed where the model
runs: inside the trace for a remote (NDIF) model, so only its statistics travel. The
token energy needs a pass over the unembedding (:func:`energy_gram`; about 4 s for Gemma 3
on one CPU thread) and is left out (NaN) for remote models, whose weights are not here.

>>> sets, skipped = build_sets(["translation", "repetition", "cloze"], ["en", "zh"], tokenizer)  # doctest: +SKIP
>>> result = lens(model, sets)                                                                  # doctest: +SKIP
>>> overtaking(result)[["set", "top1", "layer", "other_leads"]]                                 # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from itertools import permutations
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lsa import bootstrap, engine
from lsa.engine import Plan, Read
from lsa.tasks import (
    DATA_DIR,
    Drop,
    DropReport,
    NoPrompts,
    TokenizerMismatch,
    TokenizerStamp,
    Tokens,
    bos_id,
    check_choice,
    pad_rows,
    pad_token_id,
    prompt_count,
    tokenizer_stamp,
    word_problem,
)

TASKS = ("translation", "repetition", "cloze")
ROLES = ("target", "other")  # whose version of the answer: the target language's, or the other language's
DATA_FILE = DATA_DIR / "latent_language.json"
FLOOR = 0.01  # a median probability below this is noise, not a language the layer works in (overtaking)
AUTO = "auto"  # template: the first one of the data file whose fixed text the tokenizer spells


def load_data(path: str | Path | None = None) -> dict:
    """The data file: ``languages`` (label, answer label, word gap), ``shots``, ``templates``, ``words``.

    >>> load_data()["words"][0]["zh"]
    '水'
    """
    with open(Path(path) if path is not None else DATA_FILE, encoding="utf-8") as f:
        return json.load(f)


def set_name(task: str, source: str, target: str) -> str:
    """``"translation en->zh"``, ``"repetition zh"``, ``"cloze en"``: a set's name in tables and figures."""
    return f"{task} {source}->{target}" if task == "translation" else f"{task} {target}"


@dataclass
class LatentSet:
    """Prompts of one task whose answer is a word in ``target``, scored against its version in ``other``.

    ``tokens`` ``[n, pos]`` right-padded with ``pad_id``; ``lengths``, ``target_id``, ``other_id``
    ``[n]`` (first tokens; ``other_id = -1`` without another language). ``meta``: one row per
    prompt: ``word`` (the target word), ``other_word``, ``source_word`` (the query's source word; none in cloze), ``clean_text`` (the prompt).
    ``built_with``: the tokenizer the builder used (:func:`lsa.tasks.tokenizer_stamp`; None for a set made by hand).
    """

    task: str
    source: str
    target: str
    other: str | None
    tokens: torch.Tensor
    lengths: torch.Tensor
    target_id: torch.Tensor
    other_id: torch.Tensor
    meta: pd.DataFrame
    report: DropReport
    template: str
    pad_id: int = 0
    built_with: TokenizerStamp | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def name(self) -> str:
        return set_name(self.task, self.source, self.target)

    @property
    def end(self) -> torch.Tensor:
        """Position of each prompt's last token ``[n]``, where the answer is predicted."""
        return self.lengths - 1


# ---------------------------------------------------------------------------- building prompts
class _Prompts:
    """One set's lines in one template: ``line(word)`` for a demonstration, ``query(word)`` for the cut last line.

    ``task``, ``source``, ``target``, ``other`` (or None) and ``template`` name the set; ``text(word, language)``
    is how a word fills a slot."""

    def __init__(self, data: dict, template: str, task: str, source: str, target: str, other: str | None = None):
        spec = data["templates"][template]
        self.name = set_name(task, source, target)
        self.format = spec.get("cloze" if task == "cloze" else "pair")
        if self.format is None:
            raise NoPrompts(f"{self.name}: template {template!r} has no {task} format")
        self.template, self.task, self.source, self.target, self.other = template, task, source, target, other
        self.separator = spec["separator"]
        self.space = {lang: (v["space"] if spec["spaced"] else "") for lang, v in data["languages"].items()}
        labels = data["languages"]
        self.labels = {
            "SOURCE_LABEL": labels[source]["label"],
            "TARGET_LABEL": labels[target]["label"],
            "ANSWER_LABEL": labels[target]["answer"],
        }

    def text(self, word: dict, language: str) -> str:
        """How ``word`` in ``language`` fills a slot (with the language's gap before it in spaced templates)."""
        return self.space[language] + word[language]

    def _values(self, word: dict) -> dict:
        cloze = word.get("cloze", {}).get(self.target, "") if self.task == "cloze" else ""
        words = {"SOURCE": self.text(word, self.source), "TARGET": self.text(word, self.target), "CLOZE": cloze}
        return {**self.labels, **words}

    def fixed(self) -> str:
        """A line with empty words and its separator: the template's own text (labels, punctuation)."""
        return self.format.format_map({**self.labels, "SOURCE": "", "TARGET": "", "CLOZE": ""}) + self.separator

    def line(self, word: dict) -> str:
        return self.format.format_map(self._values(word)) + self.separator

    def query(self, word: dict) -> tuple[str, tuple[int, int] | None]:
        """The last line up to the target slot, and the character span of the source word in it (None: cloze)."""
        values = self._values(word)
        head = self.format[: self.format.index("{TARGET}")]
        if "{SOURCE}" not in head:
            return head.format_map(values), None
        start = len(head[: head.index("{SOURCE}")].format_map(values))
        return head.format_map(values), (start, start + len(values["SOURCE"]))


def pick_template(tokenizer, data: dict | None = None) -> str:
    """The first template of the data file whose fixed text (labels, punctuation) has no token unknown to
    ``tokenizer``: Wendler et al.'s ``"quoted"`` lines for real tokenizers, ``"plain"`` for the toy zoo's."""
    data = load_data() if data is None else data
    tokens = Tokens(tokenizer)
    for name, spec in data["templates"].items():
        lines = [
            _Prompts(data, name, task, source, target).fixed()
            for task in ("translation", "cloze")
            if task != "cloze" or "cloze" in spec
            for source, target in permutations(data["languages"], 2)
        ]
        if not any(tokens.unknown(tokens(line)) for line in lines):
            return name
    raise NoPrompts(f"every template has a token this tokenizer does not know: {', '.join(data['templates'])}")


def _first_tokens(tokens: Tokens, prompt: str, words: dict[str, str]) -> dict[str, int]:
    """``{role: first token}`` of each word after ``prompt``; raises Drop when one cannot be scored or two share it."""
    first = {}
    for role, word in words.items():
        ids = tokens.after(prompt, word)
        problem = word_problem(tokens, ids, max_tokens=None)  # only the first token is read
        if problem is not None:
            raise Drop(f"{role} word after the prompt: {problem}", f"{word!r} after {prompt[-30:]!r}")
        first[role] = ids[0]
    if len(set(first.values())) < len(first):
        raise Drop("target and other words share their first token", f"{list(words.values())}")
    return first


def _outside(tokens: Tokens, text: str, ids: list[int], span: tuple[int, int] | None) -> list[int]:
    """The prompt's tokens without the query's source word (all of them for cloze); raises Drop if it merges."""
    if span is None:
        return ids
    where = tokens.span(text, *span, ids)
    if where is None:
        raise Drop("the source word merges with its neighbours", repr(text[span[0] : span[1]]))
    return ids[: where[0]] + ids[where[1] :]


def _candidate(p: _Prompts, tokens: Tokens, word: dict, demos: list[dict]) -> dict:
    """One prompt for ``word`` after the ``demos`` lines: its tokens, first tokens and meta; raises Drop."""
    if p.task == "cloze" and not word.get("cloze", {}).get(p.target):
        raise Drop(f"no cloze sentence in {p.target}", word[p.target])
    prefix = "".join(p.line(d) for d in demos)
    query, span = p.query(word)
    text, ids = prefix + query, tokens(prefix + query)
    if tokens.unknown(ids):
        raise Drop("prompt has tokens unknown to the tokenizer", text[-60:])
    roles = {"target": p.target} if p.other is None else {"target": p.target, "other": p.other}
    first = _first_tokens(tokens, text, {role: p.text(word, lang) for role, lang in roles.items()})
    outside = _outside(tokens, text, ids, None if span is None else (len(prefix) + span[0], len(prefix) + span[1]))
    for role, token in first.items():
        if token in outside:
            raise Drop(f"{role} word's first token occurs elsewhere in the prompt", f"{tokens.decode(token)!r}")
    meta = {
        "word": word[p.target],
        "other_word": word[p.other] if p.other is not None else "",
        "source_word": word[p.source] if p.task != "cloze" else "",
        "clean_text": text,
    }
    return {"ids": ids, "target": first["target"], "other": first.get("other", -1), "meta": meta}


def _usable(p: _Prompts, tokens: Tokens, words: list[dict], report: DropReport) -> list[dict]:
    """The words that make a prompt of their own (no demonstrations); the others dropped as ``words: <reason>``."""
    kept = []
    for word in words:
        try:
            _candidate(p, tokens, word, [])
            kept.append(word)
        except Drop as d:
            report.drop(f"words: {d.reason}", d.example)
    report.vocabulary["words"] = (len(kept), len(words))
    return kept


def _draw(p: _Prompts, tokens: Tokens, words: list[dict], n: int, shots: int, seed: int, report) -> list[dict]:
    """Up to ``n`` prompts, one per word in a seeded order, each after ``shots`` other words' lines."""
    rng, rows = random.Random(seed), []
    for word in rng.sample(words, len(words)):
        if len(rows) == n:
            break
        report.total += 1
        try:
            rows.append(_candidate(p, tokens, word, rng.sample([w for w in words if w is not word], shots)))
        except Drop as d:
            report.drop(d.reason, d.example)
    report.kept = len(rows)
    return rows


def _languages(task: str, target: str, source: str | None, other: str | None, known) -> tuple[str, str | None]:
    """``(source, other)`` of a set, checked: translation has a source other than the target, the other tasks none."""
    check_choice("task", task, TASKS)
    for language in (target, source, other):
        check_choice("language", language, (None, *known))
    source = source or target
    if (task == "translation") == (source == target):
        raise ValueError(f"{task}: source {source!r} and target {target!r} must differ only for translation")
    other = source if task == "translation" and other is None else other
    if other == target:
        raise ValueError(f"the other language must differ from the target {target!r}")
    return source, other


def build(
    task: str,
    target: str,
    tokenizer,
    *,
    source: str | None = None,
    other: str | None = None,
    n: int | None = None,
    seed: int = 0,
    template: str = AUTO,
    shots: int | None = None,
    data: dict | None = None,
    prepend_bos: bool | None = None,
) -> LatentSet:
    """Prompts of ``task`` answered in ``target``, one per word (at most ``n``, drawn in a seeded order).

    ``source``: the prompt's language (translation: required, another language; else ``target``).
    ``other``: the language whose version of the answer is scored against it (translation: the
    source; else ``None`` unless given). ``shots``: demonstration lines before the query (default
    from the data file), drawn from the usable words other than the query. ``template``: a name in
    the data file, or ``"auto"`` (:func:`pick_template`). The tokenizer's BOS goes first when it
    adds one itself (``prepend_bos=None``). Raises :class:`lsa.tasks.NoPrompts` when nothing is usable.

    >>> s = build("translation", "zh", tokenizer, source="en", n=50)   # doctest: +SKIP
    >>> print(s.report)                                                 # doctest: +SKIP
    """
    data = load_data() if data is None else data
    source, other = _languages(task, target, source, other, data["languages"])
    template = pick_template(tokenizer, data) if template == AUTO else template
    check_choice("template", template, tuple(data["templates"]))
    p, tokens = _Prompts(data, template, task, source, target, other), Tokens(tokenizer)
    n, shots = prompt_count(n), data["shots"][task] if shots is None else int(shots)
    report = DropReport(requested=n)
    spelled = [w for w in data["words"] if all(w.get(lang) for lang in (source, target, other) if lang)]
    words = _usable(p, tokens, spelled, report)
    if len(words) <= shots:
        raise NoPrompts(f"{p.name}: {len(words)} usable words, {shots + 1} needed; {report}")
    rows = _draw(p, tokens, words, n, shots, seed, report)
    if not rows:
        raise NoPrompts(f"{p.name}: no prompt survived; {report}")
    return _finish(p, rows, report, tokenizer, bos_id(tokenizer, prepend_bos))


def _finish(p: _Prompts, rows: list[dict], report: DropReport, tokenizer, bos: int | None) -> LatentSet:
    """Stack kept rows into a :class:`LatentSet` (BOS first where asked)."""
    report.bos = bos
    ids = [([bos] if bos is not None else []) + r["ids"] for r in rows]
    pad_id = pad_token_id(tokenizer)
    return LatentSet(
        task=p.task,
        source=p.source,
        target=p.target,
        other=p.other,
        tokens=pad_rows(ids, pad_id),
        lengths=torch.tensor([len(i) for i in ids]),
        target_id=torch.tensor([r["target"] for r in rows]),
        other_id=torch.tensor([r["other"] for r in rows]),
        meta=pd.DataFrame([r["meta"] for r in rows]),
        report=report,
        template=p.template,
        pad_id=pad_id,
        built_with=tokenizer_stamp(tokenizer),
    )


def _combinations(task: str, languages: list[str]) -> list[tuple[str, str, str | None]]:
    """``(source, target, other)`` of each set ``task`` makes with ``languages`` (translation: none with one)."""
    check_choice("task", task, TASKS)
    if task == "translation":
        return [(source, target, source) for source, target in permutations(languages, 2)]
    return [(target, target, next((x for x in languages if x != target), None)) for target in languages]


def build_sets(
    tasks: str | Iterable[str],
    languages: str | Iterable[str],
    tokenizer,
    *,
    min_prompts: int = 8,
    verbose=True,
    **kwargs,
) -> tuple[dict[str, LatentSet], dict[str, str]]:
    """Every set ``tasks`` make with ``languages``: ``({name: set}, {name: why it was skipped})``.

    Translation runs each ordered pair of languages (one language: skipped, with that reason);
    repetition and cloze run each language, scored against the other language given (if any).
    A set the tokenizer cannot express (:class:`lsa.tasks.NoPrompts`, e.g. Chinese for SmolLM2),
    or with fewer than ``min_prompts`` prompts (or ``n``, if fewer were asked for: its intervals would
    span the data), is skipped with its reason; when every set is, this raises naming each reason.
    Prints each set's report (``verbose``). ``kwargs`` go to :func:`build` (``n``, ``seed``, ``template``, ...).
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    languages = [languages] if isinstance(languages, str) else list(languages)
    if kwargs.get("template", AUTO) == AUTO:
        kwargs["template"] = pick_template(tokenizer)
    need = min(min_prompts, prompt_count(kwargs.get("n")))
    built, skipped = {}, {}
    for task in tasks:
        combinations = _combinations(task, languages)
        if not combinations:
            skipped[task] = f"{task}: needs two languages, got {languages}"
        for source, target, other in combinations:
            name = set_name(task, source, target)
            try:
                made = build(task, target, tokenizer, source=source, other=other, **kwargs)
            except NoPrompts as err:
                skipped[name] = str(err)
                continue
            if len(made) < need:
                skipped[name] = f"{name}: only {len(made)} prompts, {need} needed; {made.report}"
            else:
                built[name] = made
    if verbose:
        for name in [*built, *skipped]:
            print(f"{name:>22}: {built[name].report}" if name in built else f"{'skipped':>22}: {skipped[name]}")
    if not built:
        raise NoPrompts("no latent-language set can be built for this tokenizer:\n" + "\n".join(skipped.values()))
    return built, skipped


# ---------------------------------------------------------------------------- the logit lens
@dataclass
class LatentLens:
    """The logit lens on latent-language sets, as tidy frames:

    - ``answers``: prompt x layer x role: ``set, prompt, word, layer, role, language, token_id, token,
      prob, rank`` (``layer = -1``: the embedding; ``rank`` 0 = the top token; roles without a
      language, such as ``other`` in an English-only run, have no rows);
    - ``layers``: prompt x layer: ``set, prompt, layer, entropy`` (bits), ``energy`` (NaN where not computed);
    - ``top``: prompt x layer x rank: ``set, prompt, layer, rank, token_id, token, prob``;
    - ``prompts``: one row per prompt: ``set, task, source, target, other, prompt`` and the set's meta.
    """

    answers: pd.DataFrame
    layers: pd.DataFrame
    top: pd.DataFrame
    prompts: pd.DataFrame


@torch.no_grad()
def energy_gram(model) -> tuple[torch.Tensor, int, bool]:
    """What token energy needs: ``G = U^T U`` ``[d_model, d_model]`` (float64), ``U`` the unembedding's
    rows times the final norm's gain, each scaled to unit length; ``d_vocab``; and whether the final
    norm centres (LayerNorm). One pass over ``W_U`` in chunks of rows."""
    from lsa.lens import final_norm

    norm = final_norm(model)
    w_u = model.adapter.unembed_weight(model.hf)  # [d_vocab, d_model]
    gram = torch.zeros(w_u.shape[1], w_u.shape[1], dtype=torch.float64, device=w_u.device)
    for rows in w_u.detach().split(16384):
        u = rows.float() * norm.gamma.float().to(rows.device)
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        gram += (u.T @ u).double()
    return gram, w_u.shape[0], norm.centred


def _energy(h: torch.Tensor, basis: tuple | None) -> torch.Tensor:
    """Token energy of residuals ``h`` ``[b, d_model]`` -> ``[b, 1]`` (Wendler et al.): with ``x`` the residual
    (centred for LayerNorm) at unit length and ``u_v`` the rows of :func:`energy_gram`,
    ``sqrt(mean_v (u_v . x)^2)`` over its value for an average row, ``|G|_F / d_vocab``. NaN without a basis."""
    if basis is None:
        return torch.full((h.shape[0], 1), float("nan"), device=h.device)
    gram, vocab, centred = basis
    x = h.double()
    x = x - x.mean(-1, keepdim=True) if centred else x
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    mean_square = ((x @ gram.to(x.device)) * x).sum(-1, keepdim=True) / vocab
    return (mean_square.clamp_min(0).sqrt() / (gram.norm() / vocab)).float()


def _stats(h: torch.Tensor, ids: torch.Tensor, k: int, parts, basis) -> torch.Tensor:
    """The lens on residuals ``h`` ``[m, d_model]`` -> ``[m, 6 + 2k]``: the probabilities and ranks of ``ids``
    ``[m, 2]`` (target, other; ``-1``: none), the entropy in bits, the token energy, then the top ``k`` token
    ids and their probabilities. ``parts``: the final norm and the unembedding (modules, or nnsight envoys
    inside a trace)."""
    norm, unembed = parts
    logp = unembed(norm(h)).float().log_softmax(-1)  # [m, d_vocab]
    at = logp.gather(1, ids.clamp(min=0).to(logp.device))
    rank = (logp[:, None, :] > at[:, :, None]).sum(-1)
    entropy = -torch.einsum("mv,mv->m", logp.exp(), logp)[:, None] / math.log(2)
    top = logp.topk(k)
    return torch.cat([at.exp(), rank.float(), entropy, _energy(h, basis), top.indices.float(), top.values.exp()], 1)


def _at_end(x: torch.Tensor, rows: torch.Tensor, end: torch.Tensor, lens=None) -> torch.Tensor:
    """Residuals ``x`` ``[b, pos, d_model]`` at each row's ``end`` ``[b, d_model]``, or ``lens(them)``."""
    h = x[rows, end]
    return h if lens is None else lens(h)


def _run(model, prompts: LatentSet, rows: slice, k: int, basis, chunk: int = 64) -> np.ndarray:
    """:func:`_stats` after the embedding and every block for ``rows`` of a set: ``[n_layers + 1, b, 6 + 2k]``.

    Locally the residuals at the last positions are read in one forward (stopped after the last
    block) and the lens runs on ``chunk`` of them at a time (one pass over the unembedding for
    many layers); on a remote model it runs inside the trace, after each block."""
    tokens, end = prompts.tokens[rows], prompts.end[rows]
    ids = torch.stack([prompts.target_id[rows], prompts.other_id[rows]], 1)
    inside = None
    if not engine.can(model, "weights"):  # the lens runs where the weights are
        parts = (model.envoy("final_norm"), model.envoy("unembed"))
        inside = partial(_stats, ids=ids, k=k, parts=parts, basis=None)
    fn = partial(_at_end, rows=torch.arange(len(end)), end=end, lens=inside)
    n = model.adapter.n_layers
    reads = [Read("resid_pre", 0, fn)] + [Read("resid_post", layer, fn) for layer in range(n)]
    mask = (torch.arange(tokens.shape[1])[None] < prompts.lengths[rows][:, None]).long()
    plan = Plan(reads=reads, logits=None, stop_after=("resid_post", n - 1), attention_mask=mask)
    out = engine.run(model, tokens, plan)
    got = torch.stack([out[("resid_pre", 0)]] + [out[("resid_post", layer)] for layer in range(n)])
    if inside is None:  # [n + 1, b, d_model] residuals: the lens here, many layers per pass
        parts = (model.module("final_norm"), model.module("unembed"))
        flat, every = got.flatten(0, 1), ids.repeat(n + 1, 1).to(got.device)
        stats = [_stats(flat[i : i + chunk], every[i : i + chunk], k, parts, basis) for i in range(0, len(flat), chunk)]
        got = torch.cat(stats).view(n + 1, len(end), -1)
    return got.cpu().numpy()


def _frames(model, s: LatentSet, stats: np.ndarray, k: int) -> dict[str, pd.DataFrame]:
    """:class:`LatentLens`' frames for one set from :func:`_run`'s statistics ``[n_layers + 1, n, 6 + 2k]``."""
    n_points, n = stats.shape[:2]
    flat = stats.reshape(n_points * n, -1)
    layer, prompt = np.repeat(np.arange(-1, n_points - 1), n), np.tile(np.arange(n), n_points)
    names: dict[int, str] = {}

    def decode(ids) -> list[str]:
        return [names.setdefault(i, model.tokenizer.decode([i])) for i in map(int, ids)]

    answers = []
    for j, (role, language, ids) in enumerate((("target", s.target, s.target_id), ("other", s.other, s.other_id))):
        if language is not None:
            token_id = ids.numpy()[prompt]
            answers.append(
                pd.DataFrame(
                    {"set": s.name, "prompt": prompt, "word": s.meta["word"].to_numpy()[prompt], "layer": layer}
                    | {"role": role, "language": language, "token_id": token_id, "token": decode(token_id)}
                    | {"prob": flat[:, j], "rank": flat[:, 2 + j].astype(int)}
                )
            )
    top_ids = flat[:, 6 : 6 + k].astype(int).ravel()
    info = {"set": s.name, "task": s.task, "source": s.source, "target": s.target, "other": s.other or ""}
    return {
        "answers": pd.concat(answers, ignore_index=True),
        "layers": pd.DataFrame(
            {"set": s.name, "prompt": prompt, "layer": layer, "entropy": flat[:, 4], "energy": flat[:, 5]}
        ),
        "top": pd.DataFrame(
            {
                "set": s.name,
                "prompt": np.repeat(prompt, k),
                "layer": np.repeat(layer, k),
                "rank": np.tile(np.arange(k), len(flat)),
            }
            | {"token_id": top_ids, "token": decode(top_ids), "prob": flat[:, 6 + k :].ravel()}
        ),
        "prompts": pd.concat([pd.DataFrame(info | {"prompt": np.arange(n), "template": s.template}), s.meta], axis=1),
    }


@torch.no_grad()
def lens(
    model, sets: Mapping[str, LatentSet] | Iterable[LatentSet], *, k: int = 5, batch_size: int = 16, energy: bool = True
) -> LatentLens:
    """The logit lens at each prompt's last position, after the embedding and after every block (see module doc).

    ``k``: top tokens kept per prompt and layer. ``energy``: compute token energy (local models only;
    NaN for a remote one). Works on every supported family, and remotely (``model.remote``), where
    the lens runs inside the trace.

    >>> result = lens(model, sets)                          # doctest: +SKIP
    >>> result.answers.query("role == 'target'")            # doctest: +SKIP
    """
    sets = list(sets.values()) if isinstance(sets, Mapping) else list(sets)
    stamp = None if model.tokenizer is None else tokenizer_stamp(model.tokenizer)
    for s in sets:
        if None not in (s.built_with, stamp) and s.built_with != stamp:
            raise TokenizerMismatch(
                f"the {s.name} prompts were built with another tokenizer ({s.built_with}) than {model.name}'s "
                f"({stamp}): their token ids would stand for other text; build them with model.tokenizer"
            )
    basis = energy_gram(model) if energy and engine.can(model, "weights") else None
    frames = {"answers": [], "layers": [], "top": [], "prompts": []}
    for s in sets:
        stats = np.concatenate(
            [_run(model, s, slice(i, i + batch_size), k, basis) for i in range(0, len(s), batch_size)], 1
        )
        for name, frame in _frames(model, s, stats, k).items():
            frames[name].append(frame)
    return LatentLens(**{name: pd.concat(parts, ignore_index=True) for name, parts in frames.items()})


# ---------------------------------------------------------------------------- summaries
def median_interval(values, level: float = bootstrap.LEVEL) -> tuple[float, float, float]:
    """``(median, low, high)`` of ``values`` (NaN left out): the median and its bootstrap interval over them
    (:mod:`lsa.bootstrap`: the ``level`` percentile interval of the medians of seeded resamples). All NaN
    without values.

    >>> median_interval([0.1, 0.2, 0.3, 0.4, 0.9])[0]
    0.3
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if not len(x):
        return math.nan, math.nan, math.nan
    medians = np.median(x[bootstrap.resamples(len(x)).numpy()], axis=1)
    return (float(np.median(x)), *bootstrap.interval(medians, level))


def summarize(result: LatentLens, level: float = bootstrap.LEVEL) -> pd.DataFrame:
    """Per set, layer and role: the role's ``language``, the ``median`` probability with its ``low`` / ``high``
    interval over prompts (:func:`median_interval`), the median ``rank`` and ``n``. Role ``"difference"``
    (language ``""``): each prompt's ``p(target) - p(other)``, paired (sets with another language only)."""
    a = result.answers
    wide = a.pivot_table(index=["set", "layer", "prompt"], columns="role", values="prob", sort=False)
    if "other" in wide:
        wide["difference"] = wide["target"] - wide["other"]
    ranks = a.groupby(["set", "layer", "role"], sort=False)["rank"].median()
    language = a.groupby(["set", "role"], sort=False)["language"].first()
    rows = []
    for (name, layer), group in wide.groupby(level=["set", "layer"], sort=False):
        for role in group.columns:
            if group[role].notna().any():
                median, low, high = median_interval(group[role], level)
                rows.append(dict(set=name, layer=layer, role=role, language=language.get((name, role), "")))
                rows[-1] |= dict(median=median, low=low, high=high, rank=ranks.get((name, layer, role), math.nan))
                rows[-1]["n"] = int(group[role].notna().sum())
    return pd.DataFrame(rows, columns=["set", "layer", "role", "language", "median", "low", "high", "rank", "n"])


def _takeover(ahead: np.ndarray, layers: np.ndarray) -> float:
    """The first of ``layers`` from which ``ahead`` holds through the last one (NaN where the last is not ahead)."""
    if not ahead[-1]:
        return math.nan
    behind = np.flatnonzero(~ahead)
    return float(layers[behind[-1] + 1] if len(behind) else layers[0])


def overtaking(result: LatentLens, level: float = bootstrap.LEVEL, floor: float = FLOOR) -> pd.DataFrame:
    """Per set: does the model answer, and when does the target language take over? One row per set, with its
    ``task``, ``source``, ``target`` and ``other`` language (``""``: none) and:

    - ``top1``: the share of prompts whose target token is the top token at the last layer (the model's own
      prediction); ``n``: prompts;
    - ``layer``: the first layer from which the target's median probability is at least ``floor`` and above
      the other's through the last layer (NaN: not so at the last layer; ``-1``: the embedding);
    - ``prompt_layer``, ``prompt_low``, ``prompt_high``: that layer prompt by prompt, median and interval over
      the ``ahead`` prompts (those whose target ends at least ``floor`` and above the other);
    - ``target_leads`` / ``other_leads``: the layers where the paired difference's interval lies above / below
      0 and the leader's median probability is at least ``floor`` (below it both are noise: early layers
      of a real model put ~1e-20 on either word).

    Sets without another language have ``top1`` and ``n`` only.
    """
    summary = summarize(result, level)
    a = result.answers
    about = result.prompts.groupby("set", sort=False)[["task", "source", "target", "other"]].first()
    rows = []
    for name, group in a.groupby("set", sort=False):
        final = group[(group["layer"] == a["layer"].max()) & (group["role"] == "target")]
        row = dict(set=name, **about.loc[name], n=len(final), top1=float((final["rank"] == 0).mean()))
        if (group["role"] == "other").any():
            prob = group.pivot_table(index="prompt", columns=["role", "layer"], values="prob")
            row |= _phases(prob, summary[summary["set"] == name].pivot(index="layer", columns="role"), floor, level)
        rows.append(row)
    columns = ["set", "task", "source", "target", "other", "n", "top1", "layer", "prompt_layer", "prompt_low"]
    return pd.DataFrame(rows).reindex(columns=[*columns, "prompt_high", "ahead", "target_leads", "other_leads"])


def _phases(prob: pd.DataFrame, med: pd.DataFrame, floor: float, level: float) -> dict:
    """:func:`overtaking`'s columns for one set with another language, from its probabilities ``prob``
    ``[prompt, (role, layer)]`` and its :func:`summarize` rows ``med`` ``[layer, (statistic, role)]``."""
    layers = med.index.to_numpy()
    target, other = med["median", "target"].to_numpy(), med["median", "other"].to_numpy()
    ahead = (prob["target"] > prob["other"]) & (prob["target"] >= floor)
    each = [_takeover(ahead.loc[p].to_numpy(), layers) for p in prob.index]
    median, low, high = median_interval(each, level)
    return {
        "layer": _takeover((target > other) & (target >= floor), layers),
        "prompt_layer": median,
        "prompt_low": low,
        "prompt_high": high,
        "ahead": int(np.sum(~np.isnan(each))),
        "target_leads": layers[(med["low", "difference"].to_numpy() > 0) & (target >= floor)].tolist(),
        "other_leads": layers[(med["high", "difference"].to_numpy() < 0) & (other >= floor)].tolist(),
    }


def by_role(summary: pd.DataFrame, phases: pd.DataFrame) -> pd.DataFrame:
    """One row per set and role with a language: the set's ``task``, ``source``, ``target``, the role's
    ``language``, its per-layer ``medians`` and median ``ranks`` (lists, embedding first) and the layers
    where it ``leads`` (:func:`overtaking`; ``[]`` without another language)."""
    rows = []
    for phase in phases.itertuples():
        for role in ROLES:
            curve = summary[(summary["set"] == phase.set) & (summary["role"] == role)].sort_values("layer")
            if len(curve):
                leads = getattr(phase, f"{role}_leads")
                rows.append(
                    dict(set=phase.set, task=phase.task, source=phase.source, target=phase.target, role=role)
                    | dict(language=curve["language"].iloc[0], medians=curve["median"].tolist())
                    | dict(ranks=curve["rank"].tolist(), leads=leads if isinstance(leads, list) else [])
                )
    return pd.DataFrame(rows)


def prompt_table(result: LatentLens, name: str, prompt: int) -> pd.DataFrame:
    """One prompt of set ``name``, layer by layer: the lens's ``top`` tokens with their probabilities, the
    probability and rank of its word's first token in each role's language (``p_target``, ``rank_target``,
    ``p_other``, ``rank_other``), and the ``entropy``. Raises ``ValueError`` for an unknown set or prompt."""
    pick = lambda frame: frame[(frame["set"] == name) & (frame["prompt"] == prompt)]  # noqa: E731
    answers, top, layers = pick(result.answers), pick(result.top), pick(result.layers)
    if not len(answers):
        raise ValueError(f"no prompt {prompt!r} in set {name!r}; sets: {', '.join(result.prompts['set'].unique())}")
    table = answers.pivot(index="layer", columns="role", values=["prob", "rank"])
    table.columns = [f"{'p' if stat == 'prob' else stat}_{role}" for stat, role in table.columns]
    shown = top.sort_values("rank").groupby("layer")[["token", "prob"]]
    table.insert(0, "top", shown.apply(lambda t: ", ".join(f"{s!r} {p:.2f}" for s, p in zip(t["token"], t["prob"]))))
    table["entropy"] = layers.set_index("layer")["entropy"]
    return table.reset_index()
