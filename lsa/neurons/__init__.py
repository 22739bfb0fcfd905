"""Language-specific FFN neurons: activation statistics, LAPE, PLND importance, masks.

A *neuron* is one unit of a block's MLP activation module (the adapter's
``mlp_act``): ``act(c_fc(x))`` in GPT-2 / GPT-NeoX / BLOOM, the gate
activation ``act_fn(gate_proj(x))`` in SwiGLU models (Qwen2, Llama, Mistral),
as in Tang et al. 2024 (LAPE) who hook the same value.

Steps, each one call:

1. :func:`collect_stats` streams texts of each language through the model once
   and keeps per-language counts and sums of every neuron's activation
   (:class:`NeuronStats`, ``[lang, layer, neuron]``); on a remote model each
   batch is one nnsight trace that reduces inside the trace.
2. :func:`lape` picks language-specific neurons from the activation
   probabilities exactly as the published ``identify.py`` does;
   :func:`plnd_importance` gives a second, PLND-style score.
3. Masks are ``masks[language][layer] -> LongTensor`` of neuron indices, saved
   and loaded in the published mask-file format (:func:`save_masks`, :func:`load_masks`).

Steering (set / scale / add on any neuron set during a forward or generation)
is in :mod:`lsa.steering`; :func:`language_report` runs the whole study.

One module per concept (every public name is re-exported here):

- :mod:`~lsa.neurons.sets`: one neuron's address, neuron sets and their algebra, mask files;
- :mod:`~lsa.neurons.stats`: :class:`NeuronStats`, the per-language statistics;
- :mod:`~lsa.neurons.collect`: token batches, collection of the statistics, one layer's activations;
- :mod:`~lsa.neurons.selection`: LAPE and PLND selection (:class:`LapeResult`);
- :mod:`~lsa.neurons.inspect`: inspecting one neuron (profile, top tokens, promoted tokens);
- :mod:`~lsa.neurons.corpus`: the shipped corpora, the zoo's texts and your own text files;
- :mod:`~lsa.neurons.study`: the whole study (:func:`language_report`);

Cost: one forward pass per batch plus four reductions over the MLP activations
(a few percent of the forward; see ``benchmarks/neurons.py``).
"""

from lsa.neurons.collect import (
    LayerActivations,
    activation_totals,
    as_language_dict,
    collect_stats,
    from_weights,
    record_activations,
    token_batches,
)
from lsa.neurons.corpus import CORPUS_DIR, SHIPPED, load_corpus, read_texts, study_texts, zoo_texts
from lsa.neurons.inspect import neuron_profile, promoted_tokens, top_activating
from lsa.neurons.selection import LapeResult, lape, plnd_importance, plnd_neurons
from lsa.neurons.sets import (
    NeuronSet,
    as_neuron_set,
    check_masks,
    check_neuron,
    load_masks,
    neuron_count,
    random_like,
    save_masks,
    union,
)
from lsa.neurons.stats import NeuronStats
from lsa.neurons.study import LanguageReport, ReportSettings, language_report

__all__ = [
    "CORPUS_DIR",
    "SHIPPED",
    "LanguageReport",
    "LapeResult",
    "LayerActivations",
    "NeuronSet",
    "NeuronStats",
    "ReportSettings",
    "activation_totals",
    "as_language_dict",
    "as_neuron_set",
    "check_masks",
    "check_neuron",
    "collect_stats",
    "from_weights",
    "language_report",
    "lape",
    "load_corpus",
    "load_masks",
    "neuron_count",
    "neuron_profile",
    "plnd_importance",
    "plnd_neurons",
    "promoted_tokens",
    "random_like",
    "read_texts",
    "record_activations",
    "save_masks",
    "study_texts",
    "token_batches",
    "top_activating",
    "union",
    "zoo_texts",
]
