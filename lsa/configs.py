"""Random models built from configs: tiny ones for tests, the paper's shapes for presets.

Nothing here downloads anything: a config is built in code (or read from a JSON
file) and the weights are initialised at random with a fixed seed.

>>> model = random_model("qwen2", seed=0)            # doctest: +SKIP
>>> model.adapter.n_kv_heads                          # doctest: +SKIP
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
}

# The paper's real models, by shape only (random weights; the layer, head and
# width counts of the published checkpoints).
PAPER_SHAPES: dict[str, dict] = {
    "bigscience/bloom-560m": dict(model_type="bloom", n_layer=24, n_head=16, hidden_size=1024, vocab_size=250880),
    "gpt2": dict(model_type="gpt2", n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257),
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
