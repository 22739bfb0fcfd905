"""LatentExplorer: one word's logit lens, layer by layer, in the target and in the other language.

Pick a prompt set and a word and see, for the embedding and every layer, the lens's top tokens
and the probability and rank of the word's first token in the target language and in the other
one (:func:`lsa.latent.prompt_table`), with a figure of both curves
(:func:`lsa.plotting.latent.plot_prompt`) and the prompt itself. It shows a
:class:`lsa.latent.LatentLens` and needs no model; what it shows is kept in ``current`` (the
table), ``figure`` and the HTML values, for headless tests.

>>> LatentExplorer(result)   # doctest: +SKIP
"""

from __future__ import annotations

import html

import ipywidgets as w

from lsa import latent
from lsa.plotting import latent as latent_plots
from widgets.common import show_figure, table_html


class LatentExplorer(w.VBox):
    """Explore the lens of one prompt at a time: its set, its word, every layer's top tokens and probabilities.

    Args:
        result: :func:`lsa.latent.lens`'s result.
    """

    def __init__(self, result: latent.LatentLens):
        self.result = result
        self.current = None
        self.figure = None
        self.set = w.Dropdown(options=list(dict.fromkeys(result.prompts["set"])), description="set")
        self.word = w.Dropdown(options=[], description="word")
        self.prompt_html = w.HTML()
        self.table_html = w.HTML()
        self.plot = w.Output()
        super().__init__([w.HBox([self.set, self.word]), self.prompt_html, self.plot, self.table_html])
        self.set.observe(self._set_changed, names="value")
        self.word.observe(lambda change: None if self._switching else self.refresh(), names="value")
        self._switching = False
        self._set_changed()

    def _set_changed(self, change=None) -> None:
        """A new set: its words as the word options (the first selected), then one refresh."""
        prompts = self.result.prompts[self.result.prompts["set"] == self.set.value]
        options = [
            (f"{r.word} / {r.other_word}" if r.other_word else r.word, int(r.prompt)) for r in prompts.itertuples()
        ]
        self._switching = True
        self.word.options = options
        self.word.value = options[0][1] if options else None
        self._switching = False
        self.refresh()

    def refresh(self) -> None:
        """Show the selected set and word."""
        name, prompt = self.set.value, self.word.value
        if name is None or prompt is None:
            return
        row = self.result.prompts[(self.result.prompts["set"] == name) & (self.result.prompts["prompt"] == prompt)]
        self.prompt_html.value = f"<pre>{html.escape(row['clean_text'].iloc[0])}</pre>"
        self.current = latent.prompt_table(self.result, name, prompt)
        self.table_html.value = table_html(self.current)
        self.figure = latent_plots.plot_prompt(self.result, name, prompt)
        show_figure(self.plot, self.figure)
