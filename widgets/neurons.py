"""NeuronExplorer: one FFN neuron across languages, and what steering it does.

Pick a layer and neuron (or a row of the LAPE table) and see:

- its activation probability and mean ± std per language (from :class:`lsa.neurons.NeuronStats`),
  and, with sample texts, the distribution of its activations per language;
- its top-activating tokens in context per language (needs the model and sample texts);
- the tokens its output weights promote and suppress through the unembedding;
- a button that generates from a prompt with the neuron (or a language's LAPE set)
  deactivated or activated, side by side with the unchanged generation.

It opens on the strongest neuron of the first language's set (:meth:`lsa.neurons.LapeResult.strongest`),
or on layer 0, neuron 0 without one.

All logic lives in :mod:`lsa.neurons` and :mod:`lsa.steering`; this class only
wires controls to those functions and keeps what it shows in attributes
(``profile``, ``top``, ``promoted``, ``generation``, ``message``) so it can be
tested headlessly. Bad input (a neuron out of range) shows a message, not a traceback.

>>> explorer = NeuronExplorer(stats, model=model, lape=result, texts=sample)   # doctest: +SKIP
>>> explorer                                                                   # doctest: +SKIP
"""

from __future__ import annotations

import html

import ipywidgets as w
import pandas as pd
from IPython.display import display

from lsa import neurons as N
from lsa import steering as S

SCOPES = ("this neuron", "LAPE set of the language")
MODES = ("deactivate (set 0)", "activate (language mean)", "scale")


def _table(df: pd.DataFrame, floats: str = "{:.3f}") -> str:
    if df is None or not len(df):
        return "<i>nothing to show</i>"
    return df.to_html(index=False, float_format=floats.format, escape=True, border=0)


class NeuronExplorer(w.VBox):
    """Explore one neuron at a time: per-language statistics, top tokens, promoted tokens, steering.

    Args:
        stats: :class:`lsa.neurons.NeuronStats` (required: the shape and per-language numbers).
        model: a :class:`lsa.model.Model`, needed for top tokens, promoted tokens and generation.
        lape: a :class:`lsa.neurons.LapeResult` (from :func:`~lsa.neurons.lape` or
            :func:`~lsa.neurons.plnd_neurons`) to pick rows from, and to steer whole sets.
        texts: ``{language: texts}`` sample for top-activating tokens and distributions.
        max_texts: texts per language recorded for the sample (per layer, cached).
    """

    def __init__(self, stats: N.NeuronStats, *, model=None, lape=None, texts=None, max_texts: int = 64, k: int = 8):
        self.stats, self.model, self.lape, self.texts = stats, model, lape, texts
        self.max_texts, self.k = max_texts, k
        self._records: dict[int, N.LayerActivations] = {}
        self.profile: pd.DataFrame | None = None
        self.top: pd.DataFrame | None = None
        self.promoted: pd.DataFrame | None = None
        self.generation: dict | None = None
        self.figure = None

        rows = [("(pick a language-specific neuron)", None)]
        if lape is not None:
            for r in lape.table.itertuples():
                score = f"  H={r.entropy:.3f}" if hasattr(r, "entropy") else ""
                rows.append((f"L{r.layer} N{r.neuron}  [{r.language}]{score}", (r.layer, r.neuron)))
        self.row = w.Dropdown(options=rows, value=None, description="neuron set")
        self.layer = w.IntText(value=0, description="layer")
        self.neuron = w.IntText(value=0, description="neuron")
        self.message = w.HTML()
        self.profile_html = w.HTML()
        self.top_html = w.HTML()
        self.promoted_html = w.HTML()
        self.plot = w.Output()

        self.prompt = w.Text(value="", description="prompt", layout=w.Layout(width="60%"))
        self.scope = w.Dropdown(options=SCOPES, value=SCOPES[0], description="steer")
        self.mode = w.Dropdown(options=MODES, value=MODES[0], description="how")
        self.language = w.Dropdown(options=list(stats.languages), value=stats.languages[0], description="language")
        self.factor = w.FloatText(value=1.0, description="strength")
        self.max_new = w.IntText(value=20, description="new tokens")
        self.button = w.Button(description="generate", button_style="primary", disabled=model is None)
        self.generation_html = w.HTML()

        self.row.observe(self._on_row, names="value")
        self.layer.observe(self._on_change, names="value")
        self.neuron.observe(self._on_change, names="value")
        self.button.on_click(self._on_generate)

        steer_box = w.VBox(
            [
                w.HBox([self.prompt, self.max_new]),
                w.HBox([self.scope, self.mode, self.language, self.factor]),
                self.button,
                self.generation_html,
            ]
        )
        tabs = w.Tab(
            children=[
                w.VBox([self.profile_html, self.plot]),
                self.top_html,
                self.promoted_html,
                steer_box,
            ]
        )
        for i, title in enumerate(["per language", "top tokens", "promoted tokens", "steer"]):
            tabs.set_title(i, title)
        super().__init__([w.HBox([self.row, self.layer, self.neuron]), self.message, tabs])
        start = lape.strongest() if lape is not None else None
        if start is None:
            self.show(0, 0)
        else:
            self.row.value = start  # opens on the strongest neuron of the first language's set (its row shown)

    @classmethod
    def from_report(cls, report: N.LanguageReport, model=None, texts=None, *, method: str = "lape", **kwargs):
        """An explorer over a :func:`lsa.neurons.language_report` result (``method``: ``"lape"`` or ``"plnd"``)."""
        result = report.lape if method == "lape" else report.plnd
        if result is None:
            raise ValueError(f"the report has no {method!r} neurons")
        return cls(report.stats, model=model, lape=result, texts=texts, **kwargs)

    # ------------------------------------------------------------ logic hooks
    def _on_row(self, change):
        if change["new"] is not None:
            layer, neuron = change["new"]
            self.show(layer, neuron)

    def _on_change(self, change):
        self.show(self.layer.value, self.neuron.value)

    def _record(self, layer: int) -> N.LayerActivations | None:
        if self.model is None or self.texts is None:
            return None
        if layer not in self._records:
            self._records[layer] = N.record_activations(self.model, self.texts, layer, max_texts=self.max_texts)
        return self._records[layer]

    def show(self, layer: int, neuron: int) -> None:
        """Point the explorer at ``(layer, neuron)`` and refresh everything it shows."""
        try:
            N.check_neuron(self.stats, layer, neuron)
        except IndexError as err:
            self.message.value = f"<b style='color:#b00'>{html.escape(str(err))}</b>"
            return
        self.message.value = ""
        with self.layer.hold_trait_notifications(), self.neuron.hold_trait_notifications():
            self._silent(self.layer, layer)
            self._silent(self.neuron, neuron)
        self.current = (layer, neuron)
        self.profile = N.neuron_profile(self.stats, layer, neuron)
        self.profile_html.value = f"<h4>layer {layer}, neuron {neuron}</h4>" + _table(self.profile)
        record = self._record(layer)
        self.top = N.top_activating(record, neuron, k=self.k) if record is not None else None
        self.top_html.value = (
            _table(self.top) if self.top is not None else "<i>pass model= and texts= to see top-activating tokens</i>"
        )
        self.promoted = N.promoted_tokens(self.model, layer, neuron, k=self.k) if self.model is not None else None
        self.promoted_html.value = (
            _table(self.promoted) if self.promoted is not None else "<i>pass model= to project the neuron's output</i>"
        )
        self._draw(record)

    def _silent(self, control, value):
        if control.value != value:
            control.unobserve(self._on_change, names="value")
            control.value = value
            control.observe(self._on_change, names="value")

    def _draw(self, record) -> None:
        import matplotlib.pyplot as plt

        layer, neuron = self.current
        fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
        prof = self.profile
        axes[0].bar(prof["language"], prof["prob"], color="tab:blue")
        axes[0].set_ylim(0, 1)
        axes[0].set_ylabel("P(activation > 0)")
        if record is not None and len(record.tokens):
            values = record.neuron(neuron).numpy()
            for lang in record.tokens["language"].unique():
                axes[1].hist(values[(record.tokens["language"] == lang).to_numpy()], bins=30, alpha=0.5, label=lang)
            axes[1].set_xlabel("activation (sample)")
            axes[1].legend()
        else:
            axes[1].errorbar(prof["language"], prof["mean"], yerr=prof["std"], fmt="o")
            axes[1].set_ylabel("mean ± std activation")
        fig.suptitle(f"layer {layer}, neuron {neuron}")
        fig.tight_layout()
        self.figure = fig
        self.plot.clear_output(wait=True)
        with self.plot:
            display(fig)
        plt.close(fig)  # shown once, in the output widget (not again at the end of the cell)

    # ------------------------------------------------------------ steering
    def edits(self) -> list[S.NeuronEdit]:
        """The edits the steering controls describe (raises ``ValueError`` for an impossible choice)."""
        layer, neuron = self.current
        lang = self.language.value
        if self.scope.value == SCOPES[0]:
            neurons = {layer: [neuron]}
        else:
            if self.lape is None:
                raise ValueError("no LAPE result given: pass lape= to steer a language's neuron set")
            neurons = self.lape.mask(lang)
            if N.neuron_count(neurons) == 0:
                raise ValueError(f"the LAPE set of {lang!r} is empty")
        if self.mode.value == MODES[0]:
            return [S.deactivate(neurons)]
        if self.mode.value == MODES[1]:
            return [S.activate(neurons, self.stats, lang, strength=self.factor.value)]
        return [S.scale(neurons, self.factor.value)]

    def _on_generate(self, _button=None) -> None:
        if self.model is None:
            self.message.value = "<b style='color:#b00'>generation needs a model (pass model=)</b>"
            return
        if not self.prompt.value.strip():
            self.message.value = "<b style='color:#b00'>type a prompt first</b>"
            return
        try:
            edits = self.edits()
        except (ValueError, IndexError) as err:
            self.message.value = f"<b style='color:#b00'>{html.escape(str(err))}</b>"
            return
        self.message.value = ""
        n = max(1, int(self.max_new.value))
        base = S.generate(self.model, self.prompt.value, max_new_tokens=n)[0]
        steered = S.generate(self.model, self.prompt.value, edits=edits, max_new_tokens=n)[0]
        self.generation = {"prompt": self.prompt.value, "baseline": base, "steered": steered}
        p = html.escape(self.prompt.value)
        self.generation_html.value = (
            "<table><tr><th>unchanged</th><th>steered</th></tr>"
            f"<tr><td>{p}<b>{html.escape(base)}</b></td><td>{p}<b>{html.escape(steered)}</b></td></tr></table>"
        )
