"""BehaviourExplorer: one prompt at a time, what the model predicts and how its two answers compare.

Pick a prompt of any task's set (IOI, past tense, each language), or type one, and see:

- the answer's and the distractor's logits, probabilities and ranks, and their logit
  difference (the metric every analysis reads);
- the model's top predictions, the answer and the distractor marked.

A set's prompt brings its own answer and distractor (as tokens, filled into the answer
fields); for a typed prompt, type them as they continue the text (``" Mary"`` in English,
with its space; ``"小红"`` in Chinese). Typed text is tokenized as the builders tokenize
(:meth:`lsa.model.Model.to_tokens`: the BOS first where the tokenizer adds one). One
forward per prompt (:func:`lsa.behaviour.predict`), cached. ``current`` holds what is
shown, for headless tests; bad input shows a message.

>>> BehaviourExplorer(model, lsa.tasks.build_sets(["ioi", "past_tense"], ["en", "zh"], model.tokenizer))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping

import ipywidgets as w
import pandas as pd
import torch

from lsa import behaviour
from lsa.tasks import check_tokenizer, first_token
from widgets.common import error_html, note_html, table_html
from widgets.heads import TYPED, prompt_options, prompt_tokens


def set_label(key) -> str:
    """A prompt set's label: ``("ioi", "en")`` (a :func:`lsa.tasks.build_sets` key) -> ``"ioi/en"``."""
    return "/".join(map(str, key)) if isinstance(key, tuple) else str(key)


def logit_diff(answers: pd.DataFrame) -> float | None:
    """logit(answer) - logit(distractor) from :func:`lsa.behaviour.predict`'s answers (``None`` without both)."""
    logits = answers.set_index("answer")["logit"]
    if not {"answer", "distractor"} <= set(logits.index):
        return None
    return float(logits["answer"] - logits["distractor"])


def answers_html(answers: pd.DataFrame, diff: float | None) -> str:
    """The answers' table and their logit difference."""
    if not len(answers):
        return note_html("type an answer and a distractor to score them")
    line = "" if diff is None else f"<b>logit(answer) − logit(distractor) = {diff:+.3f}</b>"
    return table_html(answers, title="the two answers") + line


class BehaviourExplorer(w.VBox):
    """What the model predicts after one prompt, beside the prompt's answer and distractor.

    Args:
        model: a :class:`lsa.model.Model`.
        prompts: a :class:`lsa.tasks.PromptSet` or ``{label: PromptSet}`` (e.g. :func:`lsa.tasks.build_sets`' result).
        k: how many top predictions to show.
        text: an initial typed prompt.

    ``current``: ``prompt`` (``(label, index)`` or ``"typed"``), ``tokens [pos]``, ``top`` and ``answers``
    (:func:`lsa.behaviour.predict`), ``logit_diff`` (``None`` without both answers).
    """

    def __init__(self, model, prompts=None, *, k: int = 10, text: str = ""):
        self.model, self.k = model, k
        sets = prompts if isinstance(prompts, Mapping) else {} if prompts is None else {prompts.language: prompts}
        self.prompts = {set_label(key): ps for key, ps in sets.items()}
        for ps in self.prompts.values():
            check_tokenizer(ps, model.tokenizer, model.name)
        self._runs: dict[tuple, tuple] = {}
        self.current: dict = {}
        self.error = ""

        options = [*prompt_options(self.prompts, model.tokenizer), ("(typed prompt)", TYPED)]
        first = TYPED if text else options[0][1]
        self.prompt = w.Dropdown(options=options, value=first, description="prompt", layout=w.Layout(width="80%"))
        self.text = w.Text(
            value=text, description="typed", continuous_update=False, placeholder="type a prompt, press enter"
        )
        self.text.layout.width = "80%"
        self.answer = w.Text(description="answer", continuous_update=False, layout=w.Layout(width="220px"))
        self.distractor = w.Text(description="distractor", continuous_update=False, layout=w.Layout(width="220px"))
        self.message = w.HTML()
        self.answers_html = w.HTML()
        self.top_html = w.HTML()

        self.prompt.observe(self._on_prompt, names="value")
        for control in (self.text, self.answer, self.distractor):
            control.observe(self._on_typed, names="value")
        super().__init__(
            [
                self.prompt,
                self.text,
                w.HBox([self.answer, self.distractor]),
                self.message,
                w.HBox([self.answers_html, self.top_html], layout=w.Layout(grid_gap="2em", flex_flow="row wrap")),
            ]
        )
        self._on_prompt()

    def refresh(self) -> None:
        """Run (or take from the cache) the shown prompt and show its answers and top predictions."""
        self.error = ""
        try:
            tokens, answers = self._inputs()
        except ValueError as err:
            self._fail(str(err))
            return
        key = (tuple(tokens.tolist()), tuple(answers.items()))
        if key not in self._runs:
            self._runs[key] = behaviour.predict(self.model, tokens, answers, k=self.k)
        top, scored = self._runs[key]
        ids = dict(zip(scored["token_id"], scored["answer"]))
        top = top.assign(answer=[ids.get(i, "") for i in top["token_id"]])
        diff = logit_diff(scored)
        self.current = {
            "prompt": self.prompt.value,
            "tokens": tokens,
            "top": top,
            "answers": scored,
            "logit_diff": diff,
        }
        self.answers_html.value = answers_html(scored, diff)
        self.top_html.value = table_html(top, title=f"top {self.k} predictions")
        self.message.value = ""

    # ------------------------------------------------------------ internals
    def _inputs(self) -> tuple[torch.Tensor, dict[str, int]]:
        """The shown prompt's tokens ``[pos]`` and ``{"answer": id, "distractor": id}`` (typed ones checked)."""
        key = self.prompt.value
        if key != TYPED:
            ps, index = self.prompts[key[0]], key[1]
            return prompt_tokens(ps, index), {"answer": int(ps.answer[index]), "distractor": int(ps.distractor[index])}
        text = self.text.value
        if not text.strip():
            raise ValueError("type a prompt in the 'typed' box (and press enter)")
        answers = {}
        for name, control in (("answer", self.answer), ("distractor", self.distractor)):
            if control.value:
                answers[name] = first_token(self.model.tokenizer, text, control.value)
        return self.model.to_tokens(text)[0].cpu(), answers

    def _fail(self, message: str) -> None:
        self.error = message
        self.message.value = error_html(message)

    def _on_prompt(self, change=None) -> None:
        key = self.prompt.value
        if key != TYPED:  # the set's answers, as they continue its text, for typing a variant of it
            ps, index = self.prompts[key[0]], key[1]
            decode = self.model.tokenizer.decode
            for control, token in ((self.answer, ps.answer[index]), (self.distractor, ps.distractor[index])):
                control.unobserve(self._on_typed, names="value")
                control.value = decode([int(token)])
                control.observe(self._on_typed, names="value")
        self.refresh()

    def _on_typed(self, change) -> None:
        if change["owner"] is self.text and self.prompt.value != TYPED:
            self.prompt.value = TYPED  # runs refresh through _on_prompt
            return
        if self.prompt.value == TYPED:
            self.refresh()
