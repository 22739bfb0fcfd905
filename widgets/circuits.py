"""CircuitViewer: saved circuits overlaid, filtered by role, each component's evidence on selection.

Give it :class:`lsa.circuits.Circuit` objects or the JSON files they were saved
to (``Circuit.to_json``), e.g. the English and Chinese IOI circuits of one
model. It shows:

- the circuit diagram (:func:`lsa.plotting.circuits.draw`): circuits of one
  model overlaid, shared components ringed in every circuit's colour (circuits
  of different models side by side);
- a table of the shown components: which circuits hold each, its role and
  effect in each;
- for the selected component: its role, effect and evidence in each circuit,
  and the edges that touch it; with exactly two circuits shown, their
  :func:`lsa.circuits.compare` summary.

Controls: which circuits to show, a role filter (only components with those
roles, and the edges between them or to the logits), the component, and for edge
circuits how many of their strongest edges the diagram draws. Given a circuit's
edge scores and faithfulness curve (``scores=``, ``curves=``, by label), a slider moves
along the curve: the circuit of each measured size is shown with its faithfulness
on the curve's (held-out) prompts and its interval. What is shown is kept in
``current`` for headless tests; bad input (a missing file, an unknown component,
circuits that do not fit ``model=``) shows a message.

>>> CircuitViewer({"en": "runs/ioi_en/circuit.json", "zh": "runs/ioi_zh/circuit.json"})   # doctest: +SKIP
>>> CircuitViewer({"en": found.circuit}, curves={"en": heldout_curve}, scores={"en": found.edges})  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import ipywidgets as w
import pandas as pd

from lsa.circuits import LOGITS, Circuit, compare, component_name
from widgets.common import error_html, note_html, show_figure, table_html

ALL_ROLES = "(all roles)"
NO_ROLE = "(no role)"


# ---------------------------------------------------------------------------- plain functions
def load_circuits(circuits) -> dict[str, Circuit]:
    """``{label: Circuit}`` from a Circuit, a JSON path, a list of them, or a mapping (labels: language / model / file)."""
    if isinstance(circuits, (Circuit, str, Path)):
        circuits = [circuits]
    items = list(circuits.items()) if isinstance(circuits, Mapping) else [(None, c) for c in circuits]
    if not items:
        raise ValueError("no circuits given")
    out: dict[str, Circuit] = {}
    for label, c in items:
        if isinstance(c, (str, Path)):
            path = Path(c)
            if not path.is_file():
                raise FileNotFoundError(f"no circuit file at {path}")
            try:
                c = Circuit.from_json(path)
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"{path} is not a saved circuit: {err}") from None
            label = label or path.stem
        if not isinstance(c, Circuit):
            raise TypeError(f"expected a Circuit or the path of its JSON file, got {type(c).__name__}")
        label = str(label or c.language or c.model or f"circuit {len(out)}")
        while label in out:
            label += "'"
        out[label] = c
    return out


def along_curve(circuit: Circuit, scores, curve, size: int) -> tuple[Circuit, str]:
    """The edge circuit of one measured ``size`` of ``curve`` (its ranking of ``scores``), and its faithfulness in words."""
    row = curve.frame[curve.frame["size"] == size]
    if not len(row):
        raise ValueError(f"size {size} is not on the curve; sizes: {curve.frame['size'].tolist()}")
    row = row.iloc[0]
    kept = scores.circuit(int(size), curve.meta.get("rank", "absolute"))
    words = (
        f"{int(row['edges'])} edges ({row['share']:.1%}), {int(row['nodes'])} heads and MLPs: normalised faithfulness "
        f"{row['normalized']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}] on {curve.metric.shape[1]} prompts "
        f"({curve.ablation})"
    )
    return circuit.with_edges(scores.graph, kept, scores.scores), words


def role_of(role: str) -> str:
    return role or NO_ROLE


def filter_roles(circuit: Circuit, roles: Sequence[str] | None) -> Circuit:
    """A copy of ``circuit`` with only components whose role is in ``roles`` (``None``: all) and the edges among them.

    An edge is kept when its sender is kept and its receiver is kept or is the logits.
    ``"(no role)"`` matches components without a role.
    """
    if roles is None:
        return circuit
    roles = set(roles)
    comps = [c for c in circuit.components if role_of(c.role) in roles]
    keep = {c.key for c in comps} | {(LOGITS,)}
    edges = [e for e in circuit.edges if e.sender in keep and e.receiver in keep]
    return dataclasses.replace(circuit, components=comps, edges=edges)


def components_table(circuits: Mapping[str, Circuit]) -> pd.DataFrame:
    """One row per component in any circuit: ``component, kind, layer, index, in`` and ``role_<label>``, ``effect_<label>``."""
    rows: dict[tuple, dict] = {}
    for label, c in circuits.items():
        for comp in c.components:
            row = rows.setdefault(
                comp.key,
                {"component": comp.name, "kind": comp.kind, "layer": comp.layer, "index": comp.index, "in": []},
            )
            row["in"].append(label)
            row[f"role_{label}"] = comp.role
            row[f"effect_{label}"] = comp.effect
    frame = pd.DataFrame(list(rows.values()))
    if not len(frame):
        return pd.DataFrame(columns=["component", "kind", "layer", "index", "in"])
    frame["in"] = frame["in"].map(", ".join)
    frame["_key"] = list(rows)
    frame = frame.sort_values(["layer", "kind", "index"], na_position="first").reset_index(drop=True)
    return frame


def component_evidence(circuits: Mapping[str, Circuit], key) -> pd.DataFrame:
    """The component's ``role``, ``effect`` and ``evidence`` (JSON text) in each circuit holding it."""
    rows = []
    for label, c in circuits.items():
        if key in c:
            comp = c.get(key)
            rows.append(
                {
                    "circuit": label,
                    "role": comp.role,
                    "effect": comp.effect,
                    "evidence": json.dumps(comp.evidence, ensure_ascii=False, sort_keys=True),
                }
            )
    return pd.DataFrame(rows, columns=["circuit", "role", "effect", "evidence"])


def component_edges(circuits: Mapping[str, Circuit], key) -> pd.DataFrame:
    """Edges into or out of the component: ``circuit, sender, receiver, kind, effect``."""
    rows = []
    for label, c in circuits.items():
        for e in c.edges:
            if key in (e.sender, e.receiver):
                rows.append(
                    {
                        "circuit": label,
                        "sender": component_name(e.sender),
                        "receiver": component_name(e.receiver),
                        "kind": e.kind,
                        "effect": e.effect,
                    }
                )
    return pd.DataFrame(rows, columns=["circuit", "sender", "receiver", "kind", "effect"])


def evidence_html(key, evidence: pd.DataFrame, edges: pd.DataFrame) -> str:
    """The selected component's evidence per circuit (key: value lists) and its edges, as HTML."""
    parts = [f"<h4>{html.escape(component_name(key))}</h4>"]
    for row in evidence.itertuples():
        effect = "" if row.effect is None else f", effect {row.effect:.3f}"
        items = "".join(
            f"<li><code>{html.escape(str(k))}</code>: {html.escape(json.dumps(v, ensure_ascii=False))}</li>"
            for k, v in json.loads(row.evidence).items()
        )
        parts.append(
            f"<b>{html.escape(row.circuit)}</b>: role <i>{html.escape(row.role or NO_ROLE)}</i>{effect}<ul>{items}</ul>"
        )
    parts.append(table_html(edges, title="edges"))
    return "".join(parts)


# ---------------------------------------------------------------------------- widget
class CircuitViewer(w.VBox):
    """Explore saved circuits.

    Args:
        circuits: a :class:`lsa.circuits.Circuit`, a JSON path, a list or a ``{label: circuit or path}`` mapping.
        model: optional; every circuit is checked against it (``Circuit.validate``) and misfits are reported.

    Edge circuits: ``most`` (a slider) strongest edges drawn; with ``curves`` and ``scores`` (by label:
    :class:`lsa.circuits.Curve`, :class:`lsa.attribution.EdgeScores`), ``size`` moves the first such
    circuit along its curve.

    ``current``: ``shown`` (labels), ``roles`` (``None`` = all), ``circuits``
    (filtered, by label), ``table``, ``component`` (key), ``evidence``, ``edges``,
    ``comparison`` (summary frame with two circuits shown, else ``None``), ``faithfulness``
    (the words shown for the circuit on its curve, else ``None``).
    """

    def __init__(self, circuits, *, model=None, curves=None, scores=None, most: int = 60):
        self.current: dict = {}
        self.figure = None
        self.error = ""
        self._busy = False
        self.message = w.HTML()
        try:
            self.circuits = load_circuits(circuits)
        except (ValueError, TypeError, FileNotFoundError) as err:
            self.circuits = {}
            super().__init__([self.message])
            self._fail(str(err))
            return
        self.problems = []
        if model is not None:
            for label, c in self.circuits.items():
                try:
                    c.validate(model)
                except IndexError as err:
                    self.problems.append(f"{label}: {err}")
        labels = list(self.circuits)
        roles = sorted({role_of(comp.role) for c in self.circuits.values() for comp in c.components})
        self.shown = w.SelectMultiple(
            options=labels, value=tuple(labels), description="circuits", rows=min(4, len(labels))
        )
        self.role = w.SelectMultiple(
            options=[ALL_ROLES, *roles], value=(ALL_ROLES,), description="roles", rows=min(6, len(roles) + 1)
        )
        self.component = w.Dropdown(description="component", layout=w.Layout(width="340px"))
        self.most = w.IntSlider(value=most, min=5, max=max(5, most * 4), step=5, description="edges drawn")
        self.along = next((lab for lab in self.circuits if lab in (curves or {}) and lab in (scores or {})), None)
        self.faithfulness_html = w.HTML()
        self.size = w.SelectionSlider(options=[0], description="size", layout=w.Layout(width="480px"))
        if self.along is not None:
            self.curve, self.scores, self.found = curves[self.along], scores[self.along], self.circuits[self.along]
            sizes = [int(x) for x in self.curve.frame["size"]]
            chosen = self.found.evidence.get("size", sizes[-1])
            self.size.options = [
                (f"{int(r.edges)} edges: {r.normalized:.2f}", int(r.size)) for r in self.curve.frame.itertuples()
            ]
            self.size.value = chosen if chosen in sizes else sizes[-1]
            self.size.observe(self._on_size, names="value")
        self.plot = w.Output()
        self.table_html = w.HTML()
        self.evidence_html = w.HTML()
        self.comparison_html = w.HTML()
        for control in (self.shown, self.role):
            control.observe(self._on_filter, names="value")
        self.component.observe(self._on_component, names="value")
        self.most.observe(self._on_component, names="value")
        edges = [self.most] if any(c.level == "edges" for c in self.circuits.values()) else []
        along = [w.HBox([self.size, self.faithfulness_html])] if self.along is not None else []
        super().__init__(
            [
                w.HBox([self.shown, self.role, self.component]),
                *[w.HBox(edges)] * bool(edges),
                *along,
                self.message,
                w.HBox([self.plot, w.VBox([self.evidence_html, self.comparison_html])]),
                self.table_html,
            ]
        )
        self._update_filter()

    # ------------------------------------------------------------ public
    def select(self, component) -> None:
        """Select a component: ``"2.1"``, ``("head", 2, 1)``, ``(2, 1)``, ``("mlp", 3)``; bad ones show a message."""
        keys = [k for _, k in self.component.options]
        names = {component_name(k): k for k in keys}
        key = names.get(component) if isinstance(component, str) else None
        try:
            for c in self.current.get("circuits", {}).values() if key is None else ():
                try:
                    key = c.get(component).key
                    break
                except KeyError:
                    continue
        except ValueError:
            key = None
        if key not in keys:
            shown = ", ".join(component_name(k) for k in keys) or "none"
            self._fail(f"{component!r} is not among the shown components ({shown})")
            return
        if key == self.component.value:
            self.refresh()  # no change event: clear any earlier message
        else:
            self.component.value = key

    def refresh(self) -> None:
        """Redraw the diagram, the table and the selected component's evidence."""
        self.error = ""
        from lsa.plotting.circuits import draw, strongest

        circuits = self.current["circuits"]
        key = self.component.value
        self.current["component"] = key
        if key is not None:
            self.current["evidence"] = component_evidence(circuits, key)
            self.current["edges"] = component_edges(circuits, key)
            self.evidence_html.value = evidence_html(key, self.current["evidence"], self.current["edges"])
        else:
            self.current["evidence"] = self.current["edges"] = None
            self.evidence_html.value = note_html("no component to show")
        if circuits:
            try:
                self.figure = draw([strongest(c, self.most.value) for c in circuits.values()], list(circuits))
                if key is not None and key[0] == "head" and len(self.figure.axes) == 1:  # ring the selected head
                    self.figure.axes[0].scatter(
                        [key[2]],
                        [key[1]],
                        s=1500,
                        facecolors="none",
                        edgecolors="red",
                        linewidths=1.5,
                        ls="--",
                        zorder=20,
                    )
                show_figure(self.plot, self.figure)
            except ValueError as err:
                self._fail(str(err))
                return
        self._show_message()

    # ------------------------------------------------------------ internals
    def _update_filter(self) -> None:
        roles = None if ALL_ROLES in self.role.value or not self.role.value else list(self.role.value)
        shown = [label for label in self.circuits if label in self.shown.value]
        faithfulness = None
        if self.along is not None:  # the circuit of the size chosen on its curve
            self.circuits[self.along], faithfulness = along_curve(self.found, self.scores, self.curve, self.size.value)
            self.faithfulness_html.value = note_html(faithfulness)
        circuits = {label: filter_roles(self.circuits[label], roles) for label in shown}
        table = components_table(circuits)
        self.current = {"shown": shown, "roles": roles, "circuits": circuits, "table": table, "comparison": None}
        self.current["faithfulness"] = faithfulness
        visible = table.drop(columns=["_key"], errors="ignore")
        self.table_html.value = table_html(visible, title="components")
        if len(circuits) == 2:
            a, b = circuits.values()
            try:
                self.current["comparison"] = compare(a, b, labels=tuple(circuits)).summary
                self.comparison_html.value = table_html(self.current["comparison"], title="comparison")
            except ValueError as err:
                self.comparison_html.value = note_html(f"no comparison: {err}")
        else:
            self.comparison_html.value = note_html("show exactly two circuits to compare them")
        options = []
        for row in table.to_dict("records"):
            roles_here = dict.fromkeys(
                role_of(row[f"role_{lab}"]) for lab in circuits if isinstance(row.get(f"role_{lab}"), str)
            )
            options.append((f"{row['component']}  [{' / '.join(roles_here)}]  ({row['in']})", row["_key"]))
        old = self.component.value
        self._busy = True
        try:
            self.component.options = options
            keys = [k for _, k in options]
            self.component.value = old if old in keys else (keys[0] if keys else None)
        finally:
            self._busy = False
        if not shown:
            self.plot.clear_output()
            self.figure = None
            self._fail("no circuit selected: pick one or more under 'circuits'")
            self.current.update(component=None, evidence=None, edges=None)
            return
        self.refresh()

    def _show_message(self) -> None:
        parts = [error_html(self.error)] if self.error else []
        parts += [note_html(p) for p in getattr(self, "problems", [])]
        self.message.value = "<br>".join(parts)

    def _fail(self, message: str) -> None:
        self.error = message
        self._show_message()

    def _on_filter(self, change) -> None:
        self._update_filter()

    def _on_component(self, change) -> None:
        if not self._busy:
            self.refresh()

    def _on_size(self, change) -> None:
        self._update_filter()
