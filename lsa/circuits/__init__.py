"""Circuits as data: discover them, compare them across languages and models, test their faithfulness.

One module per concept, their public names re-exported here:

- :mod:`lsa.circuits.data`: :class:`Circuit` (components, edges, evidence; saved as JSON);
- :mod:`lsa.circuits.discovery`: :func:`discover`: edge attribution (EAP-IG) with the smallest
  circuit that reaches a faithfulness target (:func:`edge_discovery`), or the paper's iterated path
  patching from the logits backwards with one explicit selection rule (:func:`path_patching_discovery`,
  :func:`select`);
- :mod:`lsa.circuits.ioi_roles`: roles of IOI heads suggested from how a head was
  found, its attention pattern and its vocabulary projection (:func:`suggest_roles`);
- :mod:`lsa.circuits.comparison`: :func:`compare` matches components by identity
  within one model and by role and relative depth across models; :func:`edge_overlap` sets two
  edge circuits' overlap beside chance and resampling, and :func:`verdict` applies
  :data:`VERDICT_RULE`;
- :mod:`lsa.circuits.faithful`: :func:`faithfulness` of a circuit (with its ablation and interval),
  faithfulness curves (:func:`edge_curve`, :func:`node_curve`) and MIB's areas;

Notebook steps that load models by name (:func:`lsa.workbook.discover_each`,
:func:`lsa.workbook.cross_faithfulness`) live in :mod:`lsa.workbook`.

>>> found = discover(model, train, "eap-ig", target=0.8)       # doctest: +SKIP
>>> faithfulness(model, found.circuit, heldout).ci             # doctest: +SKIP
>>> found.circuit.table()                                      # doctest: +SKIP
>>> found.circuit.to_json("circuit.json")                      # doctest: +SKIP
>>> compare(en_circuit, zh_circuit).summary                    # doctest: +SKIP
"""

from lsa.circuits.comparison import (
    VERDICT_RULE,
    Comparison,
    chance_overlaps,
    compare,
    edge_overlap,
    jaccard,
    logit_effect_correlation,
    overlap_matrix,
    overlaps,
    stability,
    verdict,
)
from lsa.circuits.data import EDGE_KINDS, KINDS, LEVELS, LOGITS, ROLES, Circuit, Component, Edge, component_name
from lsa.circuits.discovery import (
    METHODS,
    TARGET,
    Discovery,
    discover,
    edge_discovery,
    path_patching_discovery,
    path_step,
    select,
)
from lsa.circuits.faithful import (
    FAITHFULNESS_COLUMNS,
    MIB_SHARES,
    Curve,
    check_model,
    edge_curve,
    edge_curves,
    faithfulness,
    faithfulness_table,
    node_curve,
    record,
)
from lsa.circuits.ioi_roles import attention_scores, effect_sign, head_scores, suggest_role, suggest_roles

__all__ = [
    "EDGE_KINDS",
    "FAITHFULNESS_COLUMNS",
    "KINDS",
    "LEVELS",
    "LOGITS",
    "METHODS",
    "MIB_SHARES",
    "ROLES",
    "TARGET",
    "VERDICT_RULE",
    "Circuit",
    "Comparison",
    "Component",
    "Curve",
    "Discovery",
    "Edge",
    "attention_scores",
    "chance_overlaps",
    "check_model",
    "compare",
    "component_name",
    "discover",
    "edge_curve",
    "edge_curves",
    "edge_discovery",
    "edge_overlap",
    "effect_sign",
    "faithfulness",
    "faithfulness_table",
    "head_scores",
    "jaccard",
    "logit_effect_correlation",
    "node_curve",
    "overlap_matrix",
    "overlaps",
    "path_patching_discovery",
    "path_step",
    "record",
    "select",
    "suggest_role",
    "stability",
    "suggest_roles",
    "verdict",
]
