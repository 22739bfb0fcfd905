"""HeadExplorer: one attention head on one prompt: where it looks, what it writes, what patching and routes say.

Pick a prompt (from prompt sets, or type one), a layer and a head, and a position:

- the head's attention pattern over the prompt's tokens (heatmap with token
  labels; the chosen query position outlined) and the sources it attends most
  from that position;
- its vocabulary projection at that position (:mod:`lsa.lens`: the tokens its
  write promotes and suppresses);
- its patching effect per language (from :class:`lsa.patching.PatchResult`\\ s)
  and its activation frequency per language (from :func:`lsa.flow.head_frequency`),
  when those results are given.

The model is needed only for what must run it (patterns and projections: one
forward per prompt, cached). The logic is in the plain functions below; the
class wires controls to them and keeps what it shows in ``current`` (and the
HTML values) so it can be tested without a kernel. Bad input (an out-of-range
head, a result for another model shape, an empty prompt) shows a message; prompt
sets built with another tokenizer than the model's are refused
(:class:`lsa.tasks.TokenizerMismatch`). A typed prompt is tokenized as the task
builders tokenize (:meth:`lsa.model.Model.to_tokens`: the BOS first where the tokenizer adds one).

>>> HeadExplorer(model, {"en": en, "zh": zh}, patching={"en": pe, "zh": pz}, frequency=freq)   # doctest: +SKIP
"""

from __future__ import annotations

import html
import numbers
from collections.abc import Mapping

import ipywidgets as w
import pandas as pd
import torch

from lsa import lens as L
from lsa.flow import Activations, capture
from lsa.tasks import check_tokenizer
from widgets.common import by_language, error_html, note_html, show_figure, table_html

TYPED = "typed"  # the prompt dropdown's value for the typed prompt
WRAP = dict(flex_flow="row wrap", align_items="flex-start")  # a layout for rows that may wrap


# ---------------------------------------------------------------------------- plain functions
def prompt_tokens(prompts, index: int) -> torch.Tensor:
    """The real tokens of prompt ``index`` of a :class:`lsa.tasks.PromptSet` (padding trimmed): ``[length]``."""
    if not 0 <= index < len(prompts):
        raise IndexError(f"prompt {index} out of range: the set has {len(prompts)} prompts")
    return prompts.clean[index, : int(prompts.lengths[index])].cpu()


def prompt_options(prompts: Mapping, tokenizer=None, width: int = 70) -> list[tuple[str, tuple[str, int]]]:
    """Dropdown options ``(label, (language, index))`` for every prompt of ``{language: PromptSet}``."""
    options = []
    for language, ps in prompts.items():
        texts = ps.meta["clean_text"].tolist() if "clean_text" in ps.meta else None
        for i in range(len(ps)):
            if texts is not None:
                text = str(texts[i])
            elif tokenizer is not None:
                text = tokenizer.decode(prompt_tokens(ps, i).tolist())
            else:
                text = " ".join(map(str, prompt_tokens(ps, i).tolist()))
            text = text if len(text) <= width else text[: width - 1] + "…"
            options.append((f"{language} #{i}: {text}", (language, i)))
    return options


def token_labels(tokenizer, tokens: torch.Tensor) -> list[str]:
    """``"i:token"`` labels for a 1-D token tensor (ids when there is no tokenizer)."""
    ids = tokens.tolist()
    words = [tokenizer.decode([t]) for t in ids] if tokenizer is not None else [str(t) for t in ids]
    return [f"{i}:{s}" for i, s in enumerate(words)]


def attention_pattern(acts: Activations, layer: int, head: int, index: int = 0) -> torch.Tensor:
    """Head ``layer.head``'s attention pattern ``[q, k]`` (query rows sum to 1) from captured activations."""
    n_layers = len(acts.pattern)
    if not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer!r} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    pattern = acts.pattern[layer]  # [batch, heads, q, k]
    if not 0 <= head < pattern.shape[1]:
        raise IndexError(
            f"head {head!r} out of range: each layer has {pattern.shape[1]} heads (0..{pattern.shape[1] - 1})"
        )
    return pattern[index, head].detach().float().cpu()


def attended(pattern: torch.Tensor, labels: list[str], position: int, k: int = 5) -> pd.DataFrame:
    """The ``k`` source positions the query at ``position`` attends to most: ``source, token, weight``."""
    row = pattern[position, : position + 1]
    vals, idx = row.topk(min(k, row.shape[0]))
    return pd.DataFrame(
        {"source": idx.tolist(), "token": [labels[i].split(":", 1)[1] for i in idx.tolist()], "weight": vals.tolist()}
    )


def projection(
    model, acts: Activations, layer: int, head: int, position: int, *, index: int = 0, k: int = 10, norm: str = "frozen"
) -> pd.DataFrame:
    """Tokens head ``layer.head``'s write at ``position`` promotes / suppresses (:func:`lsa.lens.top_tokens` columns).

    The same as :func:`lsa.lens.head_projection` on the captured run (no new forward).
    """
    write = L.head_write(acts, model, layer, head, index, position)
    logits = L.write_logits(model, write, acts.resid_post[-1][index, position], norm=norm)
    return L.top_tokens(model, logits, k)


def grid_extent(result) -> dict[str, int]:
    """The ``layer`` / ``head`` extent a patching result covers (``max label + 1``; integer axes only)."""
    out = {}
    for dim in ("layer", "head"):
        labels = getattr(result, "axes", {}).get(dim)
        if labels and all(isinstance(x, int) for x in labels):
            out[dim] = max(labels) + 1
    return out


def shape_problems(n_layers: int, n_heads: int, patching: Mapping, frequency: pd.DataFrame | None) -> list[str]:
    """Messages for results that do not fit a model of ``n_layers x n_heads`` (empty when all fit)."""
    problems = []
    for language, res in patching.items():
        ext = grid_extent(res)
        if ext.get("layer", 0) > n_layers or ext.get("head", 0) > n_heads:
            problems.append(
                f"patching result {language!r} covers {ext.get('layer', '?')} layers x {ext.get('head', '?')} heads, "
                f"but the model has {n_layers} x {n_heads}: it is from another model; not shown"
            )
        elif "head" not in getattr(res, "dims", ()):
            problems.append(
                f"patching result {language!r} is not per head (its grid is {' x '.join(res.dims)}); "
                "use PatchingMap for it"
            )
    if frequency is not None and len(frequency):
        fl, fh = int(frequency["layer"].max()) + 1, int(frequency["head"].max()) + 1
        if fl > n_layers or fh > n_heads:
            problems.append(
                f"head frequencies cover {fl} layers x {fh} heads, but the model has {n_layers} x {n_heads}: "
                "they are from another model; not shown"
            )
    return problems


def head_effects(patching: Mapping, layer: int, head: int) -> pd.DataFrame:
    """Patching effect of ``layer.head`` per language: ``language`` + the result's frame columns for that head.

    ``patching`` is ``{language: PatchResult}`` with a ``head`` axis; results without
    one are skipped. Several rows per language when the sweep had positions.
    """
    frames = []
    for language, res in patching.items():
        if "head" not in res.dims:
            continue
        frame = res.frame
        rows = frame[(frame["layer"] == layer) & (frame["head"] == head)].copy()
        rows.insert(0, "language", language)
        frames.append(rows.drop(columns=["site"], errors="ignore"))
    if not frames:
        return pd.DataFrame(columns=["language", "layer", "head", "metric", "effect", "normalized"])
    return pd.concat(frames, ignore_index=True)


def head_frequency(frequency: pd.DataFrame, layer: int, head: int) -> pd.DataFrame:
    """Rows of a :func:`lsa.flow.head_frequency` frame for ``layer.head`` (one per language)."""
    rows = frequency[(frequency["layer"] == layer) & (frequency["head"] == head)]
    return rows.reset_index(drop=True)


def pattern_figure(pattern: torch.Tensor, labels: list[str], layer: int, head: int, position: int | None = None):
    """Heatmap of an attention pattern ``[q, k]`` with token labels; the query row ``position`` outlined."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = pattern.shape[0]
    size = min(7.0, 2.2 + 0.25 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(pattern.numpy(), vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("source (key)")
    ax.set_ylabel("destination (query)")
    if position is not None:
        ax.add_patch(Rectangle((-0.5, position - 0.5), n, 1, fill=False, edgecolor="tab:red", lw=1.5))
    ax.set_title(f"attention of head {layer}.{head}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def projection_html(frame: pd.DataFrame, layer: int, head: int, position: int, token: str) -> str:
    """Promoted and suppressed tokens side by side, as HTML."""
    parts = []
    for direction in ("promoted", "suppressed"):
        part = frame[frame["direction"] == direction][["rank", "token", "token_id", "logit"]]
        parts.append(f"<td style='vertical-align:top;padding-right:1em'>{table_html(part, title=direction)}</td>")
    head_line = f"<b>head {layer}.{head} writes at position {position} ({html.escape(token)}):</b>"
    return f"{head_line}<table><tr>{''.join(parts)}</tr></table>"


# ---------------------------------------------------------------------------- widget
class HeadExplorer(w.VBox):
    """Explore one head at a time on one prompt.

    Args:
        model: a :class:`lsa.model.Model` (needed for patterns and projections).
        prompts: a :class:`lsa.tasks.PromptSet` or ``{language: PromptSet}`` to pick prompts from.
        patching: a :class:`lsa.patching.PatchResult` with a head axis, or ``{language: result}``.
        frequency: a :func:`lsa.flow.head_frequency` frame (``layer, head, language, frequency``).
        k: tokens per projection direction; norm: how :mod:`lsa.lens` applies the final norm.
        text: an initial typed prompt.

    ``current`` holds what is shown: ``prompt``, ``tokens``, ``labels``, ``layer``,
    ``head``, ``position``, ``pattern [q, k]``, ``attended``, ``projection``,
    ``effects``, ``frequency`` (``None`` where not available).
    """

    def __init__(
        self,
        model=None,
        prompts=None,
        *,
        patching=None,
        frequency: pd.DataFrame | None = None,
        k: int = 10,
        norm: str = "frozen",
        text: str = "",
    ):
        self.model, self.k, self.norm = model, k, norm
        self.prompts = by_language(prompts, "prompts")
        for ps in self.prompts.values() if model is not None else ():
            check_tokenizer(ps, model.tokenizer, model.name)
        self.patching = by_language(patching, "patching")
        self.frequency = frequency
        self._acts: dict[object, tuple[torch.Tensor, Activations]] = {}
        self._busy = False
        self.current: dict = {}
        self.figure = None
        self.error = ""

        if model is not None:
            n_layers, n_heads = model.adapter.n_layers, model.adapter.n_heads
        else:
            ext = [grid_extent(r) for r in self.patching.values()]
            if frequency is not None and len(frequency):
                ext.append({"layer": int(frequency["layer"].max()) + 1, "head": int(frequency["head"].max()) + 1})
            n_layers = max((e.get("layer", 0) for e in ext), default=0)
            n_heads = max((e.get("head", 0) for e in ext), default=0)
        self.n_layers, self.n_heads = n_layers, n_heads
        self.problems = shape_problems(n_layers, n_heads, self.patching, frequency)
        bad = {lang for lang, r in self.patching.items() if any(f"result {lang!r}" in p for p in self.problems)}
        self._patching_ok = {lang: r for lang, r in self.patching.items() if lang not in bad}
        self._frequency_ok = frequency is not None and not any(p.startswith("head frequencies") for p in self.problems)

        options = prompt_options(self.prompts, getattr(model, "tokenizer", None)) if self.prompts else []
        options.append(("(typed prompt)", TYPED))
        first = options[0][1]
        self.prompt = w.Dropdown(options=options, value=first, description="prompt", layout=w.Layout(width="70%"))
        self.text = w.Text(
            value=text, description="typed", continuous_update=False, placeholder="type a prompt, press enter"
        )
        self.layer = w.Dropdown(options=list(range(n_layers)), value=0 if n_layers else None, description="layer")
        self.head = w.Dropdown(options=list(range(n_heads)), value=0 if n_heads else None, description="head")
        self.position = w.Dropdown(options=[], description="position")
        for control in (self.layer, self.head, self.position):
            control.layout = w.Layout(width="180px")
        self.message = w.HTML()
        self.plot = w.Output()
        self.attention_html = w.HTML()
        self.projection_html = w.HTML()
        self.effects_html = w.HTML()
        self.frequency_html = w.HTML()

        for control in (self.prompt, self.layer, self.head, self.position):
            control.observe(self._on_change, names="value")
        self.text.observe(self._on_text, names="value")

        super().__init__(
            [
                w.HBox([self.prompt, self.text]),
                w.HBox([self.layer, self.head, self.position]),
                self.message,
                w.HBox([self.plot, w.VBox([self.projection_html, self.attention_html])], layout=w.Layout(**WRAP)),
                w.HBox([self.effects_html, self.frequency_html], layout=w.Layout(grid_gap="2em", **WRAP)),
            ]
        )
        if n_layers == 0 or n_heads == 0:
            self._fail("nothing to explore: pass model= (or patching= / frequency= results with heads)")
            return
        if first == TYPED and not text:
            self._reset_positions(None)
            self.refresh()
        else:
            self._prompt_changed()

    # ------------------------------------------------------------ public
    def select(self, layer: int | None = None, head: int | None = None, position: int | None = None, prompt=None):
        """Point the explorer at a head (and optionally a prompt and a position); bad values show a message."""
        layer, head, position = (int(x) if isinstance(x, numbers.Integral) else x for x in (layer, head, position))
        try:
            if layer is not None and not (isinstance(layer, int) and 0 <= layer < self.n_layers):
                raise IndexError(
                    f"layer {layer!r} out of range: the model has {self.n_layers} layers (0..{self.n_layers - 1})"
                )
            if head is not None and not (isinstance(head, int) and 0 <= head < self.n_heads):
                raise IndexError(
                    f"head {head!r} out of range: each layer has {self.n_heads} heads (0..{self.n_heads - 1})"
                )
            if prompt is not None and prompt not in [v for _, v in self.prompt.options]:
                raise ValueError(f"unknown prompt {prompt!r}; pick (language, index) from the prompt sets or 'typed'")
        except (IndexError, ValueError) as err:
            self._fail(str(err))
            return
        self._busy = True
        try:
            if prompt is not None and prompt != self.prompt.value:
                self.prompt.value = prompt
                self._reset_positions(self._tokens())
            if layer is not None:
                self.layer.value = layer
            if head is not None:
                self.head.value = head
            bad_position = None
            if position is not None:
                n = len(self.position.options)
                if isinstance(position, int) and 0 <= position < n:
                    self.position.value = position
                else:
                    bad_position = f"position {position!r} out of range: the prompt has {n} tokens (0..{n - 1})"
        finally:
            self._busy = False
        self.refresh()
        if bad_position:
            self._fail(bad_position)

    def refresh(self) -> None:
        """Recompute everything shown for the current controls."""
        layer, head = self.layer.value, self.head.value
        self.error = ""
        cur = {"prompt": self.prompt.value, "layer": layer, "head": head, "position": self.position.value}
        cur.update(tokens=None, labels=None, pattern=None, attended=None, projection=None)
        # patching and frequency: need no model
        if self._patching_ok:
            cur["effects"] = head_effects(self._patching_ok, layer, head)
            self.effects_html.value = table_html(cur["effects"], title=f"patching effect of {layer}.{head}")
        else:
            cur["effects"] = None
            self.effects_html.value = note_html("pass patching= (a head patching result per language) to see effects")
        if self._frequency_ok:
            cur["frequency"] = head_frequency(self.frequency, layer, head)
            self.frequency_html.value = table_html(cur["frequency"], title=f"route frequency of {layer}.{head}")
        else:
            cur["frequency"] = None
            self.frequency_html.value = note_html("pass frequency= (lsa.flow.head_frequency) to see route frequency")
        self.current = cur
        # pattern and projection: need the model and a prompt
        if self.model is None:
            self.attention_html.value = note_html("pass model= to see attention patterns and projections")
            self.projection_html.value = ""
            self._show_message()
            return
        try:
            tokens, acts = self._activations()
        except ValueError as err:
            self.attention_html.value = self.projection_html.value = ""
            self._fail(str(err))
            return
        labels = token_labels(self.model.tokenizer, tokens)
        position = self.position.value if self.position.value is not None else len(labels) - 1
        pattern = attention_pattern(acts, layer, head)
        cur.update(tokens=tokens, labels=labels, position=position, pattern=pattern)
        cur["attended"] = attended(pattern, labels, position)
        cur["projection"] = projection(self.model, acts, layer, head, position, k=self.k, norm=self.norm)
        token = labels[position].split(":", 1)[1]
        self.figure = pattern_figure(pattern, labels, layer, head, position)
        show_figure(self.plot, self.figure)  # first, so the text below never shows ahead of its figure
        self.attention_html.value = table_html(
            cur["attended"], title=f"head {layer}.{head} attends from position {position} ({token}) to"
        )
        self.projection_html.value = projection_html(cur["projection"], layer, head, position, token)
        self._show_message()

    # ------------------------------------------------------------ internals
    def _show_message(self) -> None:
        parts = [error_html(self.error)] if self.error else []
        parts += [note_html(p) for p in self.problems]
        self.message.value = "<br>".join(parts)

    def _fail(self, message: str) -> None:
        self.error = message
        self._show_message()

    def _tokens(self) -> torch.Tensor | None:
        key = self.prompt.value
        if key == TYPED:
            text = self.text.value
            if not text.strip() or self.model is None:
                return None
            return self.model.to_tokens(text)[0].cpu()
        language, index = key
        return prompt_tokens(self.prompts[language], index)

    def _activations(self) -> tuple[torch.Tensor, Activations]:
        key = self.prompt.value
        if key == TYPED:
            if not self.text.value.strip():
                raise ValueError("type a prompt in the 'typed' box (and press enter)")
            key = (TYPED, self.text.value)
        if key not in self._acts:
            tokens = self._tokens()
            if tokens is None or tokens.numel() == 0:
                raise ValueError("the prompt has no tokens")
            self._acts[key] = (tokens, capture(self.model, tokens[None]))
        return self._acts[key]

    def _reset_positions(self, tokens: torch.Tensor | None) -> None:
        tok = getattr(self.model, "tokenizer", None)
        labels = token_labels(tok, tokens) if tokens is not None else []
        self.position.options = [(label, i) for i, label in enumerate(labels)]
        self.position.value = len(labels) - 1 if labels else None

    def _prompt_changed(self) -> None:
        self._busy = True
        try:
            self._reset_positions(self._tokens())
        finally:
            self._busy = False
        self.refresh()

    def _on_change(self, change) -> None:
        if self._busy:
            return
        if change["owner"] is self.prompt:
            self._prompt_changed()
        else:
            self.refresh()

    def _on_text(self, change) -> None:
        if self._busy:
            return
        if self.prompt.value != TYPED:
            self._busy = True
            self.prompt.value = TYPED
            self._busy = False
        self._prompt_changed()
