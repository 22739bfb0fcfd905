"""Small builders every test uses: tiny random models of each family and a word tokenizer."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lsa.configs import TINY, random_hf_model
from lsa.model import Model, wrap

FAMILIES = tuple(TINY)  # gpt2, bloom, qwen2 (grouped-query), llama, mistral (1 kv head), gpt_neox


def word_tokenizer(vocab_size: int = 97) -> PreTrainedTokenizerFast:
    """Whitespace tokenizer over the words ``w0 .. w{n-1}`` (``w0`` unknown, ``w1`` pad, ``w2`` eos)."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w1", eos_token="w2")


def tiny_model(family: str = "gpt2", seed: int = 0) -> Model:
    """A random tiny model of a family, wrapped for lsa (eval mode, float32, eager attention)."""
    hf = random_hf_model(TINY[family], seed=seed)
    return wrap(hf, word_tokenizer(TINY[family]["vocab_size"]), name=f"tiny-{family}")


def random_tokens(batch: int = 3, pos: int = 7, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, pos), generator=g)
