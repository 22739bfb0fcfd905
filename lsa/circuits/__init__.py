"""Circuits as data: discover them, compare them across languages and models, test their faithfulness.

One module per concept, their public names re-exported here:

- :mod:`lsa.circuits.data`: :class:`Circuit` (components, edges, evidence; saved as JSON);
- :mod:`lsa.circuits.discovery`: :func:`discover`, iterated path patching from the
  logits backwards with one explicit selection rule (:func:`select`);
- :mod:`lsa.circuits.ioi_roles`: roles of IOI heads suggested from how a head was
  found, its attention pattern and its vocabulary projection (:func:`suggest_roles`);
- :mod:`lsa.circuits.comparison`: :func:`compare` matches components by identity
  within one model and by role and relative depth across models;
- :mod:`lsa.circuits.faithful`: :func:`faithfulness` of a circuit per language.

Notebook steps that load models by name (:func:`lsa.workbook.discover_each`,
:func:`lsa.workbook.cross_faithfulness`) live in :mod:`lsa.workbook`.

>>> found = discover(model, prompts, k=1.5, floor=0.05)       # doctest: +SKIP
>>> found.circuit.table()                                      # doctest: +SKIP
>>> found.circuit.to_json("circuit.json")                      # doctest: +SKIP
>>> compare(en_circuit, zh_circuit).summary                    # doctest: +SKIP
"""

from lsa.circuits.comparison import Comparison, compare, jaccard, logit_effect_correlation, overlap_matrix
from lsa.circuits.data import EDGE_KINDS, KINDS, LOGITS, ROLES, Circuit, Component, Edge, component_name
from lsa.circuits.discovery import Discovery, discover, path_step, select
from lsa.circuits.faithful import FAITHFULNESS_COLUMNS, faithfulness, faithfulness_table
from lsa.circuits.ioi_roles import attention_scores, effect_sign, head_scores, suggest_role, suggest_roles

__all__ = [
    "EDGE_KINDS",
    "FAITHFULNESS_COLUMNS",
    "KINDS",
    "LOGITS",
    "ROLES",
    "Circuit",
    "Comparison",
    "Component",
    "Discovery",
    "Edge",
    "attention_scores",
    "compare",
    "component_name",
    "discover",
    "effect_sign",
    "faithfulness",
    "faithfulness_table",
    "head_scores",
    "jaccard",
    "logit_effect_correlation",
    "overlap_matrix",
    "path_step",
    "select",
    "suggest_role",
    "suggest_roles",
]
