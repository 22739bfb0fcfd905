"""The toy world and its generated corpus, in English and Chinese.

The world's vocabulary is the task data in ``data/tasks/`` (names, places,
objects, verbs with their forms, time adverbs, IOI and past-tense templates);
this module writes documents (one to three sentences) about it:

- ``ioi``: a train IOI template completed with the IO name ("... gave a drink to Mary.");
- ``ioi_free``: IOI sentences from many more frames (an opening, a connector, an
  action: :data:`OPENINGS`, :data:`ACTIONS`), so IOI is learned beyond the templates;
- ``ioi_context``: a train template after a sentence about a third name, so "the
  name that is not repeated" is not enough to answer;
- ``tense``: a train past-tense template completed in the tense of its adverb
  (past: " walked" / "去了", habitual: " walks" / "去", future: " will walk" / "会去");
- ``tense_free``: the copy-then-inflect task from many more frames (a habitual
  sentence, then a time adverb and the name: :data:`TENSE_FIRST`,
  :data:`TENSE_SECOND`), so it is learned beyond the templates;
- ``tense_pair``: two sentences with one verb in two different tenses;
- ``tense_single``: one sentence with a time adverb;
- ``filler``: ordinary sentences from a small grammar over the same words;
- ``chunk``: short windows (3-6 units) of any template, filled in, so every word
  of every template (held-out ones included) is seen in some other arrangement.

Held-out data never occurs in a document (checked while generating, and
independently in ``tests/test_zoo.py``): no held-out template matches, no two
names whose pair :func:`lsa.splits.is_heldout` meet in one document, and no
adverb meets a verb with which it is held out (key: English present form,
Chinese verb).

>>> world = World.load("en")                               # doctest: +SKIP
>>> docs = generate(world, n=3, seed=0)                    # doctest: +SKIP
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from lsa.splits import is_heldout

TASK_DIR = Path(__file__).resolve().parents[2] / "data" / "tasks"
LANGUAGES = ("en", "zh")
SLOT = re.compile(r"\{([A-Za-z]+)\}")

# Future adverbs are the zoo's own (the task data has past and habitual ones only).
FUTURE_ADVERBS = {"en": ["Tomorrow", "Next week", "Next year", "Tonight"], "zh": ["明天", "下周", "明年", "今晚"]}

# The share of each document kind in the corpus.
MIX = {
    "ioi": 0.24,
    "ioi_free": 0.30,
    "ioi_context": 0.06,
    "tense": 0.09,
    "tense_free": 0.06,
    "tense_pair": 0.05,
    "tense_single": 0.03,
    "filler": 0.08,
    "chunk": 0.07,
}

# Filler grammar: {A}, {B} names; {P}, {Q} places; {O} object; {V} a verb phrase in
# the present, {VP} in the past, {VF} in the future.
FILLERS = {
    "en": [
        "{A} {V}.",
        "{A} {VP}.",
        "{A} {VF}.",
        "{A} and {B} went to the {P}.",
        "{A} gave a {O} to {B}.",
        "The {O} is at the {P}.",
        "{A} likes the {O}.",
        "{A} saw {B} at the {P}.",
        "{A} has a {O}.",
        "{A} went to the {P}.",
        "At the {P}, {A} found a {O}.",
        "{A} and {B} are friends.",
        "{A} met {B} at the {P}.",
        "The {P} is near the {Q}.",
        "{A} lost the {O} at the {P}.",
        "{A} and {B} like the {P}.",
        "{B} asked {A} about the {O}.",
        "There is a {O} in the {P}.",
    ],
    "zh": [
        "{A}{V}。",
        "{A}{VP}。",
        "{A}{VF}。",
        "{A}和{B}去了{P}。",
        "{A}把{O}给了{B}。",
        "{O}在{P}里。",
        "{A}喜欢{O}。",
        "{A}在{P}看见了{B}。",
        "{A}有{O}。",
        "{A}去了{P}。",
        "{A}在{P}找到了{O}。",
        "{A}和{B}是朋友。",
        "{A}在{P}遇到了{B}。",
        "{P}在{Q}旁边。",
        "{A}在{P}丢了{O}。",
        "{A}和{B}都喜欢{P}。",
        "{B}问{A}关于{O}的事。",
        "{P}里有{O}。",
    ],
}
# Free IOI sentences (``ioi_free``): an opening with {A} and {B} (IO and S in either
# order), an optional connector, then an action of {S} towards the IO name. Many
# frames and endings, so that IOI is learned as an algorithm, not per template;
# a combination that matches a held-out template is dropped like any other document.
OPENINGS = {
    "en": [
        "When {A} and {B} went to the {P},",
        "When {A} and {B} got to the {P},",
        "After {A} and {B} visited the {P},",
        "While {A} and {B} were at the {P},",
        "As {A} and {B} walked to the {P},",
        "Before {A} and {B} went home,",
        "At the {P}, {A} and {B} talked for a while, and",
        "{A} and {B} met at the {P}.",
        "{A} and {B} had lunch at the {P}.",
        "Yesterday {A} and {B} went to the {P}.",
        "Later, {A} and {B} stayed at the {P}.",
        "{A} and {B} were at the {P} all day.",
        "In the morning, {A} and {B} arrived at the {P}.",
        "{A} and {B} found a {O} at the {P}.",
        "It was late when {A} and {B} left the {P}, so",
        "It started to rain when {A} and {B} got to the {P}, so",
        "{A} and {B} were tired after the {P}, so",
        "The {P} was quiet, so {A} and {B} sat down, and",
        "After a long day at the {P}, {A} and {B} went home, and",
    ],
    "zh": [
        "当{A}和{B}去{P}时，",
        "当{A}和{B}到{P}的时候，",
        "{A}和{B}在{P}见面，",
        "{A}和{B}一起去了{P}，",
        "在{P}里，{A}和{B}聊了很久，",
        "{A}和{B}在{P}吃饭。",
        "昨天{A}和{B}去了{P}。",
        "{A}和{B}到了{P}以后，",
        "周末{A}和{B}在{P}玩，",
        "{A}和{B}在{P}找到了{O}，",
        "下课后，{A}和{B}去了{P}，",
        "{A}和{B}从{P}回来以后，",
    ],
}
# Openings composed from a conjunction and what the two did, so the frames vary word by word.
_CONJUNCTIONS = ["When", "After", "While", "As", "Before", "As soon as"]
_DID = {
    "en": [
        "went to the {P}",
        "got to the {P}",
        "arrived at the {P}",
        "visited the {P}",
        "left the {P}",
        "walked to the {P}",
        "came back from the {P}",
        "were at the {P}",
    ],
    "zh": ["去{P}", "到了{P}", "离开{P}", "在{P}", "从{P}回来"],
}
for _conj in _CONJUNCTIONS:
    OPENINGS["en"] += [f"{_conj} {{A}} and {{B}} {did}," for did in _DID["en"]]
for _did in _DID["zh"]:
    OPENINGS["zh"] += [f"当{{A}}和{{B}}{_did}时，", f"{{A}}和{{B}}{_did}以后，", f"{{A}}和{{B}}{_did}的时候，"]
OPENINGS = {lang: list(dict.fromkeys(frames)) for lang, frames in OPENINGS.items()}  # each frame once

CONNECTORS = {"en": ["", "Then ", "Later ", "Afterwards ", "There "], "zh": ["", "然后", "后来", "接着"]}
ACTIONS = {
    "en": [
        "{S} gave a {O} to",
        "{S} gave the {O} to",
        "{S} gave",
        "{S} handed a {O} to",
        "{S} handed",
        "{S} sent a {O} to",
        "{S} sent",
        "{S} showed the {O} to",
        "{S} showed",
        "{S} passed the {O} to",
        "{S} threw the {O} to",
        "{S} brought a {O} for",
        "{S} bought a {O} for",
        "{S} made a {O} for",
        "{S} lent a {O} to",
        "{S} offered a {O} to",
        "{S} offered",
        "{S} said hello to",
        "{S} said goodbye to",
        "{S} talked to",
        "{S} spoke to",
        "{S} smiled at",
        "{S} waved at",
        "{S} looked at",
        "{S} told",
        "{S} asked",
        "{S} called",
        "{S} thanked",
        "{S} helped",
        "{S} hugged",
        "{S} wrote a letter to",
        "{S} left a {O} for",
    ],
    "zh": [
        "{S}把{O}给了",
        "{S}把{O}送给了",
        "{S}把{O}交给了",
        "{S}把{O}递给了",
        "{S}把{O}借给了",
        "{S}把{O}寄给了",
        "{S}给",
        "{S}对",
        "{S}向",
        "{S}送给",
        "{S}递给",
        "{S}交给",
        "{S}打电话给",
        "{S}告诉了",
        "{S}问了",
        "{S}感谢",
        "{S}帮助了",
        "{S}看着",
        "{S}跟",
        "{S}拿了{O}给",
        "{S}买了{O}给",
        "{S}写信给",
        "{S}笑着对",
    ],
}
# Free copy-then-inflect documents (``tense_free``): a sentence with the verb in the
# present ({H}: a habitual adverb, {h}: the same in lower case, {N}: the name, {V}: the
# verb phrase), then a second sentence that starts like a prompt ({A} / {a}: a time adverb)
# and ends in the adverb's tense. Combinations matching a held-out template are dropped.
TENSE_FIRST = {
    "en": [
        "{H}, {N} {V}.",
        "{N} {V} on most days.",
        "{N} often {V}.",
        "{N} usually {V}.",
        "Everyone knows that {N} {V}.",
        "People say that {N} {V} {h}.",
        "It is true that {N} {V}.",
        "My neighbour {N} {V} {h}.",
        "{H}, my friend {N} {V}.",
        "As always, {N} {V}.",
        "{N} and the {O} are at the {P}. {H}, {N} {V}.",
    ],
    "zh": [
        "{H}，{N}{V}。",
        "{N}{H}{V}。",
        "{H}，{N}都{V}。",
        "大家都知道{N}{H}{V}。",
        "我觉得{N}{H}{V}。",
        "我的邻居{N}{H}{V}。",
        "{N}总是{V}。",
        "{N}在{P}。{H}，{N}{V}。",
    ],
}
# (No "also" / 也 endings here: the train templates have one each, and more would make
# "also" a likely next word wherever a prompt ends with the name.)
TENSE_SECOND = {
    "en": ["{A}, {N}", "But {a}, {N}", "And {a}, {N}", "{A} {N}"],
    "zh": ["{A}，{N}", "{N}{A}", "但是{A}，{N}"],
}
# A sentence about the third name of an ``ioi_context`` document.
CONTEXT = {
    "en": ["{C} was at the {P}.", "{C} stayed at home.", "{C} likes the {O}.", "{C} has a {O}."],
    "zh": ["{C}在{P}。", "{C}待在家里。", "{C}喜欢{O}。", "{C}有{O}。"],
}


@dataclass
class Verb:
    """One verb: ``key`` is its held-out key (English present form, Chinese verb)."""

    key: str
    present: str
    past: str
    future: str
    rest: str
    verb: str = ""


@dataclass
class World:
    """One language's world, read from the task data files."""

    language: str
    names: list[str]
    places: list[str]
    objects: list[str]
    verbs: list[Verb]
    past_adverbs: list[str]
    habitual_adverbs: list[str]
    future_adverbs: list[str]
    ioi_templates: list[dict]
    tense_templates: list[dict]
    heldout_regex: re.Pattern | None = field(default=None, repr=False)

    @classmethod
    def load(cls, language: str, root: str | Path | None = None) -> World:
        if language not in LANGUAGES:
            raise ValueError(f"unknown language {language!r}; the zoo's world has {LANGUAGES}")
        root = Path(root) if root is not None else TASK_DIR
        names = [n.strip() for n in (root / f"names_{language}.txt").read_text(encoding="utf-8").splitlines()]
        names = list(dict.fromkeys(n for n in names if n and not n.startswith("#")))
        ioi = json.loads((root / f"ioi_{language}.json").read_text(encoding="utf-8"))
        tense = json.loads((root / f"past_tense_{language}.json").read_text(encoding="utf-8"))
        verbs = [_verb(v, language) for v in tense["verbs"]]
        world = cls(
            language=language,
            names=names,
            places=list(ioi["places"]),
            objects=list(ioi["objects"]),
            verbs=verbs,
            past_adverbs=list(tense["past_adverbs"]),
            habitual_adverbs=list(tense["habitual_adverbs"]),
            future_adverbs=[a for a in FUTURE_ADVERBS[language] if a not in tense["past_adverbs"]],
            ioi_templates=list(ioi["templates"]),
            tense_templates=list(tense["templates"]),
        )
        world.heldout_regex = heldout_pattern(world.ioi_templates + world.tense_templates)
        return world

    @property
    def space(self) -> str:
        """What separates words (English) or nothing (Chinese)."""
        return " " if self.language == "en" else ""

    @property
    def stop(self) -> str:
        return "." if self.language == "en" else "。"

    def templates(self, split: str = "train") -> list[dict]:
        return [t for t in self.ioi_templates + self.tense_templates if t.get("split", "train") == split]

    def adverbs(self) -> list[str]:
        return self.past_adverbs + self.habitual_adverbs + self.future_adverbs

    def words(self) -> list[str]:
        """Every word or phrase of the world (for the tokenizer)."""
        out = self.names + self.places + self.objects + self.adverbs()
        out += [a[0].lower() + a[1:] for a in self.adverbs()]
        for v in self.verbs:  # Chinese past / future forms (去了, 会去) are two words
            out += [v.key, v.present, v.rest] + ([v.past, v.future] if self.language == "en" else [v.verb])
        return [w for w in out if w]


def base_form(present: str) -> str:
    """English third person singular -> base form ("walks" -> "walk", "carries" -> "carry")."""
    if present.endswith("ies"):
        return present[:-3] + "y"
    if present.endswith(("ches", "shes", "xes", "sses", "zzes", "oes")):
        return present[:-2]
    return present[:-1]


def _verb(entry: dict, language: str) -> Verb:
    if language == "en":
        return Verb(
            key=entry["present"],
            present=entry["present"],
            past=entry["past"],
            future="will " + base_form(entry["present"]),
            rest=entry["rest"],
        )
    v = entry["verb"]
    return Verb(key=v, present=v, past=v + "了", future="会" + v, rest=entry["rest"], verb=v)


def heldout_pattern(templates: list[dict]) -> re.Pattern | None:
    """One regex matching any filled-in held-out template (slots match within a sentence)."""
    parts = []
    for t in templates:
        if t.get("split") != "heldout":
            continue
        pieces = SLOT.split(t["text"])  # literal, slot, literal, slot, ...
        rx = "".join(re.escape(p) if i % 2 == 0 else r"[^.。]+?" for i, p in enumerate(pieces))
        parts.append(f"(?:{rx})")
    return re.compile("|".join(parts)) if parts else None


def heldout_names(names: list[str]) -> bool:
    """Whether any two of ``names`` form a held-out pair."""
    uniq = sorted(set(names))
    return any(is_heldout(a, b) for i, a in enumerate(uniq) for b in uniq[i + 1 :])


class _Writer:
    """Documents of one world, drawn from one random stream."""

    def __init__(self, world: World, rng: random.Random, subject_first: float = 0.5):
        self.w, self.rng, self.subject_first = world, rng, subject_first
        self.train_ioi = [t["text"] for t in world.ioi_templates if t.get("split", "train") == "train"]
        self.train_tense = [t["text"] for t in world.tense_templates if t.get("split", "train") == "train"]
        self.all_templates = [t["text"] for t in world.ioi_templates + world.tense_templates]
        self.ioi_texts = {t["text"] for t in world.ioi_templates}

    # -- pieces -------------------------------------------------------------
    def names(self, k: int) -> list[str]:
        while True:
            picked = self.rng.sample(self.w.names, k)
            if not heldout_names(picked):
                return picked

    def verb_for(self, adverbs: list[str]) -> Verb:
        while True:
            v = self.rng.choice(self.w.verbs)
            if not any(is_heldout(a, v.key) for a in adverbs):
                return v

    def tense_of(self, adverb: str) -> str:
        if adverb in self.w.past_adverbs:
            return "past"
        if adverb in self.w.future_adverbs:
            return "future"
        return "present"

    def phrase(self, v: Verb, tense: str) -> str:
        """Verb phrase: " walked to the park" / "去了公园" (leading space in English)."""
        form = getattr(v, tense)
        return f"{self.w.space}{form}{self.w.space}{v.rest}"

    def pick_adverb(self, weights=(0.5, 0.35, 0.15)) -> str:
        group = self.rng.choices([self.w.past_adverbs, self.w.habitual_adverbs, self.w.future_adverbs], weights)[0]
        return self.rng.choice(group)

    # -- documents ----------------------------------------------------------
    def ioi(self, context: bool = False) -> str:
        text = self.rng.choice(self.train_ioi)
        io, s, c = self.names(3)
        filled = _fill(text, IO=io, S=s, PLACE=self.rng.choice(self.w.places), OBJECT=self.rng.choice(self.w.objects))
        doc = filled + self.w.space + io + self.w.stop
        if context:
            pre = _fill(
                self.rng.choice(CONTEXT[self.w.language]),
                C=c,
                P=self.rng.choice(self.w.places),
                O=self.rng.choice(self.w.objects),
            )
            doc = pre + self.w.space + doc
        return doc

    def ioi_free(self) -> str:
        io, s, c = self.names(3)
        a, b = (io, s) if self.rng.random() < 0.5 else (s, io)
        lang = self.w.language
        opening = self.rng.choice(OPENINGS[lang])
        connector = self.rng.choice(CONNECTORS[lang]) if opening.endswith((".", "。")) else ""
        text = opening + self.w.space + connector + self.rng.choice(ACTIONS[lang])
        place, obj = self.rng.choice(self.w.places), self.rng.choice(self.w.objects)
        doc = _fill(text, A=a, B=b, S=s, P=place, O=obj) + self.w.space + io + self.w.stop
        if self.rng.random() < 0.15:  # a third name before, which is not the answer
            pre = _fill(self.rng.choice(CONTEXT[lang]), C=c, P=self.rng.choice(self.w.places), O=obj)
            doc = pre + self.w.space + doc
        return doc

    def tense(self) -> str:
        text = self.rng.choice(self.train_tense)
        habitual, adverb = self.rng.choice(self.w.habitual_adverbs), self.pick_adverb()
        v = self.verb_for([habitual, adverb])
        name = self.names(1)[0]
        prompt = _fill(
            text,
            HABITUAL=habitual,
            ADVERB=adverb,
            adverb=adverb[0].lower() + adverb[1:],
            NAME=name,
            PRESENT=v.present,
            VERB=v.present,
            REST=v.rest,
        )
        return prompt + self.phrase(v, self.tense_of(adverb)) + self.w.stop

    def tense_free(self) -> str:
        lang, sp = self.w.language, self.w.space
        habitual, adverb = self.rng.choice(self.w.habitual_adverbs), self.pick_adverb()
        v, name = self.verb_for([habitual, adverb]), self.names(1)[0]
        values = dict(
            H=habitual,
            h=habitual[0].lower() + habitual[1:],
            N=name,
            V=self.phrase(v, "present").lstrip(),
            A=adverb,
            a=adverb[0].lower() + adverb[1:],
            P=self.rng.choice(self.w.places),
            O=self.rng.choice(self.w.objects),
        )
        first = _fill(self.rng.choice(TENSE_FIRST[lang]), **values)
        second = _fill(self.rng.choice(TENSE_SECOND[lang]), **values)
        return first + sp + second + self.phrase(v, self.tense_of(adverb)) + self.w.stop

    def sentence(self, adverb: str, name: str, v: Verb) -> str:
        phrase = self.phrase(v, self.tense_of(adverb))
        if self.w.language == "en":
            return f"{adverb}, {name}{phrase}."
        if self.subject_first and self.rng.random() < self.subject_first:  # time word after the subject
            return f"{name}{adverb}{phrase}。"
        return f"{adverb}，{name}{phrase}。"

    def tense_pair(self) -> str:
        a1 = self.pick_adverb((1, 1, 1))
        while True:
            a2 = self.pick_adverb((1, 1, 1))
            if self.tense_of(a2) != self.tense_of(a1):
                break
        v, name = self.verb_for([a1, a2]), self.names(1)[0]
        return self.sentence(a1, name, v) + self.w.space + self.sentence(a2, name, v)

    def tense_single(self) -> str:
        adverb = self.pick_adverb((1, 1, 1))
        return self.sentence(adverb, self.names(1)[0], self.verb_for([adverb]))

    def filler(self) -> str:
        a, b = self.names(2)
        p, p2 = self.rng.sample(self.w.places, 2)
        v = self.rng.choice(self.w.verbs)
        strip = str.lstrip
        return _fill(
            self.rng.choice(FILLERS[self.w.language]),
            A=a,
            B=b,
            P=p,
            Q=p2,
            O=self.rng.choice(self.w.objects),
            V=strip(self.phrase(v, "present")),
            VP=strip(self.phrase(v, "past")),
            VF=strip(self.phrase(v, "future")),
        )

    def chunk(self) -> str:
        """A window of 3-6 units (words / characters / slots) of any template, filled in."""
        template = self.rng.choice(self.all_templates)
        units = _units(template, self.w.language)
        sentences = _split_sentences(units, self.w.stop)
        which = self.rng.randrange(len(sentences))
        sent = sentences[which]
        k = min(len(sent), self.rng.randint(3, 6))
        start = self.rng.randint(0, len(sent) - k)
        window = sent[start : start + k]
        at_end = which == len(sentences) - 1 and start + k == len(sent) and not template.rstrip().endswith(".")
        while window and window[0] in (",", "，", " ,"):
            window = window[1:]
        io, s = self.names(2)
        adverb = self.pick_adverb()
        habitual = self.rng.choice(self.w.habitual_adverbs)
        v = self.verb_for([adverb, habitual])
        values = dict(
            IO=io,
            S=s,
            NAME=io,
            PLACE=self.rng.choice(self.w.places),
            OBJECT=self.rng.choice(self.w.objects),
            HABITUAL=habitual,
            ADVERB=adverb,
            adverb=adverb[0].lower() + adverb[1:],
            PRESENT=v.present,
            VERB=v.present,
            REST=v.rest,
        )
        # English windows keep the leading space of their first word (" and John went ..."):
        # every piece stays in the form it has in its template.
        text = _fill("".join(window), **values).rstrip(",，")
        if at_end and template in self.ioi_texts:  # a prompt's end wants a name ...
            text += self.w.space + self.names(1)[0]
        elif at_end:  # ... or a verb phrase in the adverb's tense
            text += self.phrase(v, self.tense_of(adverb))
        return text + self.w.stop

    def document(self, kind: str) -> str:
        if kind == "ioi":
            return self.ioi()
        if kind == "ioi_context":
            return self.ioi(context=True)
        return getattr(self, kind)()


def _fill(text: str, **values: str) -> str:
    return SLOT.sub(lambda m: values[m.group(1)], text)


def _units(text: str, language: str) -> list[str]:
    """A template as units: slots, English words with their leading space, punctuation, Chinese literal runs."""
    rx = r" ?\{[A-Za-z]+\}| ?[A-Za-z]+|[^\s]" if language == "en" else r"\{[A-Za-z]+\}|[，。]|[^{，。]+"
    return re.findall(rx, text)


def _split_sentences(units: list[str], stop: str) -> list[list[str]]:
    out, cur = [], []
    for u in units:
        if u.strip() == stop:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(u)
    if cur:
        out.append(cur)
    return out


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=lambda w: (-len(w), w)))


class Checker:
    """Finds held-out data in a document: held-out templates, name pairs, adverb x verb pairs.

    Names and adverbs are found as words (English) or substrings (Chinese); a verb is
    found by any of its phrases (form + rest: " walked to the park", "去了公园").
    """

    def __init__(self, world: World):
        self.world = world
        b = r"\b" if world.language == "en" else ""
        self.names = re.compile(f"{b}(?:{_alternation(world.names)}){b}")
        adverbs = world.adverbs() + [a[0].lower() + a[1:] for a in world.adverbs()]
        self.adverbs = re.compile(f"{b}(?:{_alternation(adverbs)}){b}")
        sp = world.space
        self.phrase_verb = {}
        for v in world.verbs:
            for form in (v.present, v.past, v.future):
                self.phrase_verb.setdefault(f"{form}{sp}{v.rest}", set()).add(v.key)
        self.phrases = re.compile(f"{b}(?:{_alternation(self.phrase_verb)}){b}")

    def problems(self, doc: str) -> list[str]:
        out = []
        if self.world.heldout_regex is not None and self.world.heldout_regex.search(doc):
            out.append("held-out template")
        names = sorted(set(self.names.findall(doc)))
        if heldout_names(names):
            out.append(f"held-out name pair among {names}")
        adverbs = {a[0].upper() + a[1:] for a in self.adverbs.findall(doc)}
        keys = {k for p in self.phrases.findall(doc) for k in self.phrase_verb[p]}
        bad = [(a, k) for a in sorted(adverbs) for k in sorted(keys) if is_heldout(a, k)]
        if bad:
            out.append(f"held-out adverb x verb {bad}")
        return out

    def __call__(self, doc: str) -> bool:
        """True when the document is free of held-out data."""
        return not self.problems(doc)


def generate(
    world: World, n: int, seed: int = 0, mix: dict[str, float] | None = None, subject_first: float = 0.5
) -> list[str]:
    """``n`` documents of one world, deterministic given ``seed``; kinds drawn by ``mix`` (default :data:`MIX`).

    ``subject_first``: the share of Chinese tense sentences that put the time word after
    the subject ("小明昨天去了公园。" rather than "昨天，小明去了公园。").
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    mix = dict(MIX if mix is None else mix)
    unknown = set(mix) - set(MIX)
    if unknown:
        raise ValueError(f"unknown document kinds {sorted(unknown)}; known: {sorted(MIX)}")
    rng = random.Random(f"{seed}-{world.language}")
    writer = _Writer(world, rng, subject_first if world.language == "zh" else 0.0)
    clean = Checker(world)
    kinds, weights = list(mix), list(mix.values())
    docs = []
    while len(docs) < n:
        doc = writer.document(rng.choices(kinds, weights)[0])
        if clean(doc):
            docs.append(doc)
    return docs


def corpus(languages=("en", "zh"), n: int = 1000, seed: int = 0, mix=None, root=None) -> list[str]:
    """``n`` documents per language, interleaved (a bilingual corpus when both languages are given)."""
    per = [generate(World.load(lang, root), n, seed=seed, mix=mix) for lang in languages]
    return [doc for group in zip(*per) for doc in group]
