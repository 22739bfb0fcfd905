"""Architecture adapters: where each model family keeps its parts.

Every method in lsa reaches a model's internals through one :class:`Adapter`, so
no analysis file ever asks which architecture it is looking at. An adapter names,
relative to the Hugging Face model object:

- the embedding, the list of blocks, the final norm and the unembedding;
- per block (relative to the block): the attention module, its output
  projection (whose *input* is the concatenation of the heads' outputs,
  ``[batch, pos, n_heads * d_head]``), the MLP, the MLP activation module
  (output = what LAPE calls a neuron's activation) and the MLP output projection
  (whose *input* is the neuron values ``[batch, pos, d_mlp]``);
- the head geometry, including grouped-query attention (``n_kv_heads``).

The *write* of a sublayer is what it adds to the residual stream; the adapter
names it as the virtual parts ``attn_write`` and ``mlp_write``. In most families
it is the output of the output projection (``o_proj`` / ``mlp_out``). BLOOM adds
the residual inside its attention and MLP forwards, so their module outputs are
not writes; the projections' outputs are. Gemma 3 has *sandwich norms*: an
RMSNorm on each sublayer's output before it joins the residual
(``post_attention_layernorm``, ``post_feedforward_layernorm``), so there the
write is that norm's output, ``o * g / rms(o)``. The norm is linear once its
per-position scale ``1 / rms(o)`` is fixed; :meth:`Adapter.write_scale` gives
that factor from a run, so methods that split a write into parts (heads,
source tokens, neurons) multiply each part by it and the parts still sum to
the write. GPT-NeoX with ``use_parallel_residual`` reads attention and MLP from
the same residual, so it has no "mid" residual.

A family's :class:`Layout` lists the config attributes its code does not
implement, with the only value it accepts (``requires``); a config with any
other value is refused by name (Gemma 3: logit soft-capping, bidirectional
attention), so no method silently computes something the model does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Layout:
    """Module paths of one architecture family (dotted, ``[i]`` for the block index)."""

    family: str
    embed: str
    blocks: str
    final_norm: str
    unembed: str
    attn: str
    o_proj: str
    ln1: str
    ln2: str
    mlp: str
    mlp_act: str
    mlp_out: str
    # True where o_proj / mlp_out store weights as [in, out] (GPT-2's Conv1D).
    conv1d: bool = False
    # Query/key/value projections (their outputs, before any rotary embedding):
    # "separate": three modules q, k, v, each output [..., heads * d_head] (kv heads for k, v);
    # "concat": one module, output [..., q | k | v], each n_heads * d_head wide (GPT-2's c_attn);
    # "interleaved": one module, output viewed [..., n_heads, 3, d_head] (BLOOM, GPT-NeoX).
    qkv: tuple[str, ...] = ()
    qkv_layout: str = "separate"
    # Sandwich norms (Gemma 3): the norm each sublayer's output passes through before it
    # joins the residual. Where set, its output is the sublayer's write (attn_write / mlp_write).
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    # RMSNorm gain = weight + norm_offset (Gemma stores w and scales by 1 + w).
    norm_offset: float = 0.0
    # Config attributes this family's code does not implement: (name, the only value accepted).
    requires: tuple[tuple[str, object], ...] = ()


LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout(
        family="gpt2",
        embed="transformer.wte",
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn="attn",
        o_proj="attn.c_proj",
        ln1="ln_1",
        ln2="ln_2",
        mlp="mlp",
        mlp_act="mlp.act",
        mlp_out="mlp.c_proj",
        conv1d=True,
        qkv=("attn.c_attn",),
        qkv_layout="concat",
    ),
    "bloom": Layout(
        family="bloom",
        embed="transformer.word_embeddings",
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn="self_attention",
        o_proj="self_attention.dense",
        ln1="input_layernorm",
        ln2="post_attention_layernorm",
        mlp="mlp",
        mlp_act="mlp.gelu_impl",
        mlp_out="mlp.dense_4h_to_h",
        qkv=("self_attention.query_key_value",),
        qkv_layout="interleaved",
    ),
    "llama": Layout(
        family="llama",
        embed="model.embed_tokens",
        blocks="model.layers",
        final_norm="model.norm",
        unembed="lm_head",
        attn="self_attn",
        o_proj="self_attn.o_proj",
        ln1="input_layernorm",
        ln2="post_attention_layernorm",
        mlp="mlp",
        mlp_act="mlp.act_fn",
        mlp_out="mlp.down_proj",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        qkv_layout="separate",
    ),
    "gpt_neox": Layout(
        family="gpt_neox",
        embed="gpt_neox.embed_in",
        blocks="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        attn="attention",
        o_proj="attention.dense",
        ln1="input_layernorm",
        ln2="post_attention_layernorm",
        mlp="mlp",
        mlp_act="mlp.act",
        mlp_out="mlp.dense_4h_to_h",
        qkv=("attention.query_key_value",),
        qkv_layout="interleaved",
    ),
    # Gemma 3 text models (Gemma3ForCausalLM): sandwich norms, q/k norms, gated GELU MLP,
    # scaled embeddings (inside the embedding module), tied unembedding. ln2 is the MLP's
    # input norm (pre_feedforward_layernorm); post_attention_layernorm is a sandwich norm.
    "gemma3": Layout(
        family="gemma3",
        embed="model.embed_tokens",
        blocks="model.layers",
        final_norm="model.norm",
        unembed="lm_head",
        attn="self_attn",
        o_proj="self_attn.o_proj",
        ln1="input_layernorm",
        ln2="pre_feedforward_layernorm",
        mlp="mlp",
        mlp_act="mlp.act_fn",
        mlp_out="mlp.down_proj",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        qkv_layout="separate",
        attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
        norm_offset=1.0,
        # lsa unembeds with lm_head alone (no tanh cap) and reads causal attention patterns.
        requires=(
            ("final_logit_softcapping", None),
            ("attn_logit_softcapping", None),
            ("use_bidirectional_attention", False),
        ),
    ),
}

# Virtual parts: the module whose output a sublayer adds to the residual stream
# (its sandwich norm where the family has one, else its output projection).
WRITE_PARTS = {"attn_write": ("attn_post_norm", "o_proj"), "mlp_write": ("mlp_post_norm", "mlp_out")}

# Hugging Face ``config.model_type`` -> layout key. CPM-Generate is model_type "gpt2".
MODEL_TYPES: dict[str, str] = {
    "gpt2": "gpt2",
    "bloom": "bloom",
    "qwen2": "llama",
    "llama": "llama",
    "mistral": "llama",
    "gpt_neox": "gpt_neox",
    "gemma3_text": "gemma3",
}

SUPPORTED = tuple(sorted(MODEL_TYPES))

# The query / key / value projections as parts (one module each, or the fused one for all three).
QKV_PARTS = ("q_proj", "k_proj", "v_proj")


class UnsupportedArchitecture(ValueError):
    """Raised for a model whose ``config.model_type`` has no adapter."""


def check_supported(model_type: str | None) -> Layout:
    """The layout of a model type, or :class:`UnsupportedArchitecture` naming the supported ones."""
    if model_type not in MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"no adapter for architecture {model_type!r}; supported model types: {', '.join(SUPPORTED)}"
        )
    return LAYOUTS[MODEL_TYPES[model_type]]


def check_config(config) -> Layout:
    """:func:`check_supported`, then refuse any config attribute the family's code does not implement.

    >>> check_config(AutoConfig.for_model("gemma3_text", final_logit_softcapping=30.0))  # doctest: +SKIP
    UnsupportedArchitecture: gemma3_text config has final_logit_softcapping=30.0; lsa implements only None ...
    """
    model_type = getattr(config, "model_type", None)
    layout = check_supported(model_type)
    for name, accepted in layout.requires:
        value = getattr(config, name, accepted)
        if value != accepted:
            raise UnsupportedArchitecture(
                f"{model_type} config has {name}={value!r}; lsa implements only {name}={accepted!r} for this family "
                f"(its analyses would not match the model's forward): set it to {accepted!r} or add it to the adapter"
            )
    return layout


def _get(obj: object, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def _cfg(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class Adapter:
    """One model's geometry plus its family's :class:`Layout`.

    >>> adapter = Adapter.for_model(hf_model)        # doctest: +SKIP
    >>> adapter.n_layers, adapter.n_heads, adapter.d_head  # doctest: +SKIP
    (12, 12, 64)
    """

    layout: Layout
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    d_vocab: int
    parallel_residual: bool = False
    # what the engine has probed of this model's forward ("blocks" / "attn" -> returns a tuple; "cache" -> its argument name)
    probed: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def for_model(cls, model: nn.Module) -> Adapter:
        """Build the adapter of a Hugging Face causal LM (raises for unknown families)."""
        config = model.config
        model_type = getattr(config, "model_type", None)
        layout = check_config(config)
        n_layers = _cfg(config, "num_hidden_layers", "n_layer")
        n_heads = _cfg(config, "num_attention_heads", "n_head")
        d_model = _cfg(config, "hidden_size", "n_embd")
        n_kv_heads = _cfg(config, "num_key_value_heads", default=n_heads)
        d_head = _cfg(config, "head_dim", default=d_model // n_heads)
        d_mlp = _cfg(config, "intermediate_size", "n_inner", default=4 * d_model)
        d_vocab = _get(model, layout.unembed).weight.shape[0]
        parallel = bool(layout.family == "gpt_neox" and getattr(config, "use_parallel_residual", False))
        return cls(
            layout=layout,
            model_type=model_type,
            n_layers=int(n_layers),
            n_heads=int(n_heads),
            n_kv_heads=int(n_kv_heads),
            d_head=int(d_head),
            d_model=int(d_model),
            d_mlp=int(d_mlp),
            d_vocab=int(d_vocab),
            parallel_residual=parallel,
        )

    # ----------------------------------------------------------------- modules
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layout.blocks)  # type: ignore[return-value]

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        self.check_layer(layer)
        return self.blocks(model)[layer]

    def module(self, model: nn.Module, part: str, layer: int | None = None) -> nn.Module:
        """A named part: ``"o_proj"``, ``"mlp_out"``, ... of a block, or a model-level part.

        Model-level parts: ``embed``, ``final_norm``, ``unembed``. Block parts:
        ``attn``, ``o_proj``, ``ln1``, ``ln2``, ``mlp``, ``mlp_act``, ``mlp_out``, the query,
        key and value projections ``q_proj`` / ``k_proj`` / ``v_proj`` (the same fused module
        where the family has one), and the writes ``attn_write`` / ``mlp_write`` (see the
        module docstring).
        """
        path = self._part_path(part)
        if part in ("embed", "final_norm", "unembed", "blocks"):
            return _get(model, path)
        if layer is None:
            raise ValueError(f"part {part!r} needs a layer")
        return _get(self.block(model, layer), path)

    def path(self, part: str, layer: int | None = None) -> str:
        """Dotted path of a part from the model root (``transformer.h.3.attn.c_proj``)."""
        path = self._part_path(part)
        if layer is None:
            return path
        self.check_layer(layer)
        return f"{self.layout.blocks}.{layer}.{path}"

    def resolve_part(self, part: str) -> str:
        """A write part's real part (``attn_write`` -> ``attn_post_norm`` or ``o_proj``); others unchanged."""
        if part in WRITE_PARTS:
            norm, proj = WRITE_PARTS[part]
            return norm if getattr(self.layout, norm) else proj
        return part

    def _part_path(self, part: str) -> str:
        if part in QKV_PARTS:  # one module per kind, or one for all three
            which = QKV_PARTS.index(part)
            return self.layout.qkv[which if self.layout.qkv_layout == "separate" else 0]
        path = getattr(self.layout, self.resolve_part(part), None)
        if not isinstance(path, str):
            raise ValueError(f"the {self.layout.family} adapter has no part {part!r}")
        return path

    # ----------------------------------------------------------------- writes
    def post_norm(self, model: nn.Module, sublayer: str, layer: int) -> nn.Module | None:
        """The sandwich norm on ``sublayer``'s output (``"attn"`` or ``"mlp"``), or ``None`` where the family has none."""
        if sublayer not in ("attn", "mlp"):
            raise ValueError(f"sublayer must be 'attn' or 'mlp', got {sublayer!r}")
        path = self.layout.attn_post_norm if sublayer == "attn" else self.layout.mlp_post_norm
        return None if path is None else _get(self.block(model, layer), path)

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """An RMSNorm's or LayerNorm's per-channel gain ``[d]``: ``weight + norm_offset`` (Gemma: ``1 + w``)."""
        weight = getattr(norm, "weight", None)
        if weight is None:
            raise ValueError(f"norm {type(norm).__name__} has no weight: lsa cannot read its gain")
        return weight.detach().float() + self.layout.norm_offset

    def write_gain(self, model: nn.Module, sublayer: str, layer: int) -> torch.Tensor | None:
        """The position-independent part of :meth:`write_scale`: the sandwich norm's gain ``[d_model]``, or ``None``."""
        norm = self.post_norm(model, sublayer, layer)
        return None if norm is None else self.norm_gain(norm)

    def write_scale(self, model: nn.Module, sublayer: str, layer: int, raw: torch.Tensor) -> torch.Tensor | None:
        """Factor ``[..., d_model]`` (float32) with ``write = raw * factor`` in this run, or ``None`` where ``write = raw``.

        ``raw`` is the sublayer's projection output (``o_proj`` / ``mlp_out``) ``[..., d_model]``
        from the run itself. With a sandwich RMSNorm the factor is ``gain / rms(raw)``, i.e.
        ``gain * rsqrt(mean(raw**2) + eps)`` per position: the norm with its scale frozen at
        this run's value, a linear map under which any split of ``raw`` into parts splits the
        write into parts ``part * factor`` that sum to it.
        """
        found = self.write_norm(model, sublayer, layer)
        if found is None:
            return None
        gain, eps = found
        x = raw.float()
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain.to(x.device)

    def write_norm(self, model: nn.Module, sublayer: str, layer: int) -> tuple[torch.Tensor, float] | None:
        """The sandwich RMSNorm on ``sublayer``'s output as ``(gain [d_model], eps)``: ``norm(o) = o * gain / sqrt(mean(o**2) + eps)``;
        ``None`` where the family has none."""
        norm = self.post_norm(model, sublayer, layer)
        if norm is None:
            return None
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
        if eps is None or getattr(norm, "bias", None) is not None:
            raise ValueError(f"sandwich norm {type(norm).__name__} is not an RMSNorm with eps: cannot freeze its scale")
        return self.norm_gain(norm), float(eps)

    # ----------------------------------------------------------------- weights
    def o_proj_by_head(self, model: nn.Module, layer: int) -> torch.Tensor:
        """Rows of the attention output projection per head: ``[n_heads, d_head, d_model]``.

        A head's write is ``z[..., h, :] @ W[h]`` where ``z`` is the projection
        input viewed as ``[batch, pos, n_heads, d_head]``.
        """
        weight = self.module(model, "o_proj", layer).weight
        w_in_out = weight if self.layout.conv1d else weight.T  # [n_heads*d_head, d_model]
        return w_in_out.reshape(self.n_heads, self.d_head, self.d_model)

    def qkv_columns(self, model: nn.Module, kind: str, layer: int, head: int) -> tuple[nn.Module, slice]:
        """Where one head's query, key or value is made: ``(projection module, columns of its output)``.

        ``kind`` is ``"q"``, ``"k"`` or ``"v"``; ``head`` is a query head for ``"q"`` and
        a key/value head (a group under grouped-query attention) for ``"k"`` / ``"v"``.
        The columns index the projection's output ``[..., out]`` before any rotary
        embedding, so calling the module on another input and copying these columns
        gives that head the other input.
        """
        columns = self._qkv_slice(kind, head)  # checks kind and head first
        return self.module(model, f"{kind}_proj", layer), columns

    def qkv_index(self, kind: str) -> torch.Tensor:
        """The output columns of ``kind``'s projection (:meth:`qkv_columns`) for every head, ``[n, d_head]`` (long)."""
        n = self.n_heads if kind == "q" else self.n_kv_heads
        return torch.stack([torch.arange(s.start, s.stop) for s in (self._qkv_slice(kind, h) for h in range(n))])

    def _qkv_slice(self, kind: str, head: int) -> slice:
        if kind not in ("q", "k", "v"):
            raise ValueError(f"kind must be 'q', 'k' or 'v', got {kind!r}")
        which = "qkv".index(kind)
        n = self.n_heads if kind == "q" else self.n_kv_heads
        if not isinstance(head, int) or not 0 <= head < n:
            what = "query heads" if kind == "q" else "key/value heads"
            raise IndexError(f"{kind} head {head!r} out of range: each layer has {n} {what} (0..{n - 1})")
        d = self.d_head
        if self.layout.qkv_layout == "separate":
            return slice(head * d, (head + 1) * d)
        if self.layout.qkv_layout == "concat":
            start = which * self.n_heads * d + head * d
            return slice(start, start + d)
        if self.layout.qkv_layout == "interleaved":
            start = head * 3 * d + which * d
            return slice(start, start + d)
        raise ValueError(f"unknown qkv layout {self.layout.qkv_layout!r}")

    def o_proj_bias(self, model: nn.Module, layer: int) -> torch.Tensor | None:
        return self.module(model, "o_proj", layer).bias

    def value_weights(self, model: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Value projection per key/value head: ``W [n_kv_heads, d_model, d_head]``, ``b [n_kv_heads, d_head]``.

        A head's value vector at a position is ``x @ W[g] + b[g]`` where ``x`` is the
        attention input (the output of ``ln1``) and ``g = kv_head(head)``. Fused
        QKV projections are sliced through :meth:`qkv_columns`, so no method needs
        to know their layout.
        """
        self.check_layer(layer)
        ws, bs = [], []
        for g in range(self.n_kv_heads):
            module, cols = self.qkv_columns(model, "v", layer, g)
            weight = module.weight.T if self.layout.conv1d else module.weight  # [out, d_model]
            ws.append(weight[cols].T)
            if module.bias is not None:
                bs.append(module.bias[cols])
        return torch.stack(ws), (torch.stack(bs) if bs else None)

    def mlp_out_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """Neuron output directions: ``[d_mlp, d_model]``."""
        weight = self.module(model, "mlp_out", layer).weight
        return weight if self.layout.conv1d else weight.T

    def mlp_out_bias(self, model: nn.Module, layer: int) -> torch.Tensor | None:
        return self.module(model, "mlp_out", layer).bias

    def unembed_weight(self, model: nn.Module) -> torch.Tensor:
        """``[d_vocab, d_model]``."""
        return self.module(model, "unembed").weight

    def unembed(self, model: nn.Module, resid: torch.Tensor) -> torch.Tensor:
        """Logits of residual-stream vectors ``[..., d_model] -> [..., d_vocab]`` (final norm first)."""
        return self.module(model, "unembed")(self.module(model, "final_norm")(resid))

    # ----------------------------------------------------------------- checks
    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The key/value group a query head reads (grouped-query attention)."""
        self.check_head(head)
        return head // self.group_size

    def check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise IndexError(
                f"layer {layer!r} out of range: the model has {self.n_layers} layers (0..{self.n_layers - 1})"
            )

    def check_head(self, head: int, layer: int | None = None) -> None:
        if layer is not None:
            self.check_layer(layer)
        if not isinstance(head, int) or not 0 <= head < self.n_heads:
            raise IndexError(f"head {head!r} out of range: each layer has {self.n_heads} heads (0..{self.n_heads - 1})")

    def check_neuron(self, neuron: int, layer: int | None = None) -> None:
        if layer is not None:
            self.check_layer(layer)
        if not isinstance(neuron, int) or not 0 <= neuron < self.d_mlp:
            raise IndexError(f"neuron {neuron!r} out of range: each MLP has {self.d_mlp} neurons (0..{self.d_mlp - 1})")

    def describe(self) -> dict[str, object]:
        """Geometry as a plain dict (for provenance and model cards)."""
        return {
            "model_type": self.model_type,
            "family": self.layout.family,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_head": self.d_head,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "d_vocab": self.d_vocab,
            "parallel_residual": self.parallel_residual,
            "sandwich_norms": self.layout.attn_post_norm is not None,
        }
