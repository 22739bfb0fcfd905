"""Training the zoo's GPT-2-architecture models on the generated corpus (CPU, one thread).

1) load the worlds of the recipe's languages and build their tokenizer;
2) generate ``docs_per_language`` documents per language (held-out data excluded);
3) pack documents into ``[n, seq_len]`` rows, each starting with a document at
   position 0 (prompts in analyses start there too), documents separated by
   ``<|endoftext|>``, right-padded (padding carries no loss);
4) train a randomly initialised ``GPT2LMHeadModel`` with AdamW (linear warm-up,
   constant, linear decay over the last 20%) on random batches of rows for a fixed number of ``steps``.

Everything is drawn from generators seeded by ``recipe.seed``, so a run is
deterministic for a fixed step count on one thread. ``minutes`` caps wall time
(the run then stops early, and the step count it reached is recorded).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from lsa.zoo.corpus import MIX, World, generate
from lsa.zoo.tokenizer import build_tokenizer


@dataclass(frozen=True)
class Recipe:
    """What one zoo model is trained on and how (all defaults are the shipped recipe)."""

    name: str
    languages: tuple[str, ...]
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 6_000
    lr: float = 3e-3
    warmup: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    docs_per_language: int = 120_000
    seed: int = 0
    mix: dict = field(default_factory=lambda: dict(MIX))
    # Share of Chinese tense sentences with the time word after the subject (see ``corpus.generate``).
    zh_subject_first: float = 0.5
    # Word-class initialisation of the token embeddings (0 turns it off): see ``class_init``.
    class_init: float = 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["languages"] = list(self.languages)
        return d


RECIPES: dict[str, Recipe] = {
    "toy-bilingual": Recipe("toy-bilingual", ("en", "zh"), steps=18_000, docs_per_language=100_000),
    "toy-en": Recipe("toy-en", ("en",), steps=18_000),
    "toy-zh": Recipe("toy-zh", ("zh",)),
}


@dataclass
class TrainResult:
    """A trained model, its tokenizer and what happened (``log``: one row per logged step)."""

    model: torch.nn.Module
    tokenizer: object
    recipe: Recipe
    steps: int
    seconds: float
    final_loss: float
    log: list[dict]
    corpus_docs: int
    corpus_tokens: int


def pack(docs_ids: list[list[int]], seq_len: int, eos_id: int, pad_id: int, open_rows: int = 16) -> torch.Tensor:
    """Documents (token ids) -> rows ``[n, seq_len]``: docs end with eos, a row never splits a doc.

    First fit: each document goes into the first of the last ``open_rows`` rows with room
    for it, else starts a new row; rows are right-padded.
    """
    rows: list[list[int]] = []
    for ids in docs_ids:
        piece = list(ids[: seq_len - 1]) + [eos_id]
        for row in rows[-open_rows:]:
            if len(row) + len(piece) <= seq_len:
                row.extend(piece)
                break
        else:
            rows.append(piece)
    return torch.tensor([r + [pad_id] * (seq_len - len(r)) for r in rows], dtype=torch.long)


def make_model(recipe: Recipe, tokenizer) -> torch.nn.Module:
    """A random GPT-2 of the recipe's shape for the tokenizer (no dropout; seeded by ``recipe.seed``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=recipe.seq_len,
        n_embd=recipe.n_embd,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(recipe.seed)
    return GPT2LMHeadModel(config)


def word_groups(worlds: list[World], tokenizer) -> dict[str, list[int]]:
    """Token ids by word class ("en:name", "zh:verb", ...) and by identity ("en:id:Mary" holds "Mary" and " Mary",
    "en:id:walk" holds " walks", " walked", " walk")."""
    vocab = tokenizer.get_vocab()
    groups: dict[str, set[int]] = {}

    def add(key, word):
        for form in (word, " " + word) if key.startswith("en:") else (word,):
            if form in vocab:
                groups.setdefault(key, set()).add(vocab[form])

    for w in worlds:
        lang = w.language
        for name in w.names:
            add(f"{lang}:name", name)
            add(f"{lang}:id:{name}", name)
        for place in w.places:
            add(f"{lang}:place", place)
        for obj in w.objects:
            add(f"{lang}:object", obj)
        for group, adverbs in (("past", w.past_adverbs), ("habitual", w.habitual_adverbs)):
            for a in adverbs:
                add(f"{lang}:adverb_{group}", a)
        for v in w.verbs:
            lemma = v.future.split()[-1] if lang == "en" else v.verb
            if lang == "en":
                add(f"{lang}:verb_present", v.present)
                add(f"{lang}:verb_past", v.past)
                add(f"{lang}:verb_base", lemma)
                for form in (v.present, v.past, lemma):
                    add(f"{lang}:id:{lemma}", form)
            else:
                add(f"{lang}:verb", v.verb)
    return {k: sorted(v) for k, v in groups.items()}


def class_init(model, groups: dict[str, list[int]], scale: float, seed: int) -> None:
    """Give the words of one class (and the forms of one word) a shared embedding component.

    Each token embedding becomes ``own * 0.7 + scale * sum(shared vectors of its groups)``,
    shared vectors drawn like GPT-2's own (normal, std 0.02). Names start out alike, and
    " walks" / " walked" start out sharing their lemma: the model still has to learn every
    algorithm from data, it learns it sooner.
    """
    wte = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        extra = torch.zeros_like(wte)
        for key in sorted(groups):
            vec = torch.randn(wte.shape[1], generator=g) * 0.02
            extra[groups[key]] += vec
        touched = sorted({i for ids in groups.values() for i in ids})
        wte[touched] = wte[touched] * 0.7 + scale * extra[touched]


def corpus_rows(recipe: Recipe, tokenizer, worlds: list[World]) -> tuple[torch.Tensor, int]:
    """The packed training rows of a recipe and its number of documents."""
    per = [
        generate(w, recipe.docs_per_language, seed=recipe.seed, mix=recipe.mix, subject_first=recipe.zh_subject_first)
        for w in worlds
    ]
    docs = [d for group in zip(*per) for d in group]  # languages interleaved
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    n_unk = sum(i.count(unk) for i in ids)
    if n_unk:
        raise ValueError(f"{n_unk} unknown tokens in the generated corpus; the tokenizer misses part of the world")
    return pack(ids, recipe.seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id), len(docs)


def _say(message: str) -> None:
    print(message, flush=True)


def _lr(step: int, recipe: Recipe) -> float:
    """Linear warm-up, constant, then linear decay to ``min_lr_ratio`` over the last 20% of the steps."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    decay_from = int(0.8 * recipe.steps)
    if step < decay_from:
        return recipe.lr
    t = (step - decay_from) / max(1, recipe.steps - decay_from)
    return recipe.lr * (1 - (1 - recipe.min_lr_ratio) * min(t, 1.0))


def train(
    recipe: Recipe,
    *,
    minutes: float | None = None,
    log_every: int = 200,
    progress=None,
    threads: int | None = 1,
    monitor=None,
    monitor_every: int = 500,
) -> TrainResult:
    """Train one model by its recipe (see the module docstring for the steps).

    ``monitor(model, tokenizer) -> dict`` is called every ``monitor_every`` steps (model in
    eval mode, no gradients) and its numbers join the log (e.g. held-out IOI accuracy).
    """
    progress = progress or _say
    if threads is not None:
        torch.set_num_threads(threads)
    worlds = [World.load(lang) for lang in recipe.languages]
    tokenizer = build_tokenizer(worlds, max_length=recipe.seq_len)
    rows, n_docs = corpus_rows(recipe, tokenizer, worlds)
    model = make_model(recipe, tokenizer)
    if recipe.class_init:
        class_init(model, word_groups(worlds, tokenizer), recipe.class_init, recipe.seed)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )
    g = torch.Generator().manual_seed(recipe.seed)
    pad = tokenizer.pad_token_id
    log, start, running, step = [], time.time(), None, 0
    for step in range(recipe.steps):
        if minutes is not None and time.time() - start > minutes * 60:
            progress(f"{recipe.name}: time cap of {minutes} min reached at step {step}")
            break
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe)
        batch = rows[torch.randint(len(rows), (recipe.batch_size,), generator=g)]
        labels = batch.masked_fill(batch == pad, -100)
        loss = model(input_ids=batch, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % log_every == 0 or step == 0:
            entry = {"step": step + 1, "loss": round(running, 4), "seconds": round(time.time() - start, 1)}
            if monitor is not None and (step + 1) % monitor_every == 0:
                model.eval()
                with torch.no_grad():
                    entry.update({k: round(float(v), 4) for k, v in monitor(model, tokenizer).items()})
                model.train()
            log.append(entry)
            extra = " ".join(f"{k} {v}" for k, v in entry.items() if k not in ("step", "loss", "seconds"))
            progress(f"{recipe.name}: step {entry['step']} loss {entry['loss']:.3f} ({entry['seconds']:.0f} s) {extra}")
    else:
        step = recipe.steps
    model.eval()
    return TrainResult(
        model=model,
        tokenizer=tokenizer,
        recipe=recipe,
        steps=step,
        seconds=time.time() - start,
        final_loss=float(running if running is not None else float("nan")),
        log=log,
        corpus_docs=n_docs,
        corpus_tokens=int((rows != pad).sum()),
    )


def recipe_for(name: str, **overrides) -> Recipe:
    """The shipped recipe of a zoo model, with fields overridden (``steps=2000``, ``n_layer=2``...)."""
    if name not in RECIPES:
        raise ValueError(f"unknown zoo model {name!r}; known: {sorted(RECIPES)}")
    return replace(RECIPES[name], **overrides)
