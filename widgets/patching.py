"""PatchingMap: any patching result as a clickable map; a cell opens that component's details.

A :class:`lsa.patching.PatchResult` (activation or path patching) laid out on its
grid: ``layer x head``, ``layer x pos``, ``layer x neuron``, ``layer`` alone
(one column), or ``layer x head x pos`` (a third control picks the position).
Select a cell by clicking it in the map (a grid of coloured buttons: it works in
JupyterLab and Colab without extensions) or with the row / column dropdowns, and
see:

- that component's mean metric, effect and normalised effect in every language;
- its per-prompt effects (``PatchResult.to_frame(per_prompt=True)``);
- with ``model=`` and a head grid, a :class:`widgets.heads.HeadExplorer` on that head.

The map and its HeadExplorer share the language and the prompt: switching the map's
language moves the explorer to the same prompt number in that language (a typed prompt
stays), picking a prompt of another language in the explorer switches the map, and the
per-prompt table marks the prompt the explorer shows (``shown``).

Results for several languages (``{"en": res_en, "zh": res_zh}``) get a language
toggle and a side-by-side switch (the static figure shows every language).
What is shown is kept in ``current`` (and the HTML values) for headless tests.

>>> PatchingMap({"en": res_en, "zh": res_zh}, model=model, prompts={"en": en, "zh": zh})   # doctest: +SKIP
"""

from __future__ import annotations

import ipywidgets as w
import pandas as pd
import torch

from lsa.plotting.patching import ONE, VALUES, axis_labels, diverging_limits, map_dims, map_figure, map_grid
from widgets.common import (
    by_language,
    cell_colour,
    error_html,
    note_html,
    show_figure,
    table_html,
)
from widgets.heads import TYPED, HeadExplorer, grid_extent


# ---------------------------------------------------------------------------- plain functions
def cell_of(result, row_label, col_label, extra=None) -> dict:
    """The component labels ``{dim: label}`` of a cell (what selects its rows in ``result.frame``)."""
    row, col, third = map_dims(result)
    cell = {row: row_label}
    if col != "-":
        cell[col] = col_label
    if third is not None:
        cell[third] = extra
    return cell


def _select(frame: pd.DataFrame, cell: dict) -> pd.DataFrame:
    mask = pd.Series(True, index=frame.index)
    for dim, label in cell.items():
        if dim not in frame:
            return frame.iloc[0:0]
        mask &= frame[dim] == label
    return frame[mask]


def cell_summary(results: dict, cell: dict) -> pd.DataFrame:
    """One row per language whose result has the cell: ``language``, the cell's labels, ``metric, effect, normalized``."""
    frames = []
    for language, res in results.items():
        rows = _select(res.frame, cell).drop(columns=["site"], errors="ignore").copy()
        rows.insert(0, "language", language)
        frames.append(rows)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def cell_prompts(result, cell: dict, language: str | None = None) -> pd.DataFrame:
    """Per-prompt ``metric, effect, normalized`` of a cell (``PatchResult.to_frame(per_prompt=True)`` rows)."""
    rows = _select(result.to_frame(per_prompt=True), cell).drop(columns=["site"], errors="ignore").copy()
    if language is not None:
        rows.insert(0, "language", language)
    return rows.reset_index(drop=True)


def pos_labels(result, prompts=None, tokenizer=None) -> dict:
    """``{pos label: display label}``: absolute positions get the first prompt's token (``"3:Mary"``)."""
    labels = list(getattr(result, "axes", {}).get("pos", []))
    shown = (getattr(result, "meta", None) or {}).get("pos_labels")
    if shown and len(shown) == len(labels):  # a sweep's own labels: the tokens of the prompts it patched
        return dict(zip(labels, shown))
    out = {p: str(p) for p in labels}
    if prompts is None or tokenizer is None:
        return out
    for p in labels:
        if isinstance(p, int) and 0 <= p < prompts.clean.shape[1]:
            out[p] = f"{p}:{tokenizer.decode([int(prompts.clean[0, p])])}"
    return out


# ---------------------------------------------------------------------------- widget
class PatchingMap(w.VBox):
    """A patching result (or one per language) as an interactive map.

    Args:
        results: a :class:`lsa.patching.PatchResult` or ``{language: PatchResult}``.
        model: optional; with a head grid, a HeadExplorer follows the selected head.
        prompts: the prompt sets the results were computed on (``PromptSet`` or
            ``{language: PromptSet}``): token labels for positions, prompts for the HeadExplorer.
        value: ``"normalized"`` (default), ``"effect"`` or ``"metric"``.
        max_cells: largest map drawn as clickable buttons (bigger maps: dropdowns and figure only).

    ``current``: ``language``, ``value``, ``extra``, ``grid [rows, cols]`` (active
    language), ``rows``, ``cols``, ``cell`` (``{dim: label}``), ``cell_value``,
    ``summary`` (every language), ``per_prompt`` (shown languages; ``shown`` marks the
    explorer's prompt), ``prompt`` (the explorer's: ``(language, index)`` or ``"typed"``).
    """

    def __init__(self, results, *, model=None, prompts=None, value: str = "normalized", max_cells: int = 1600):
        self.model = model
        self.results = by_language(results, "results")
        if not self.results:
            raise ValueError("PatchingMap needs a patching result")
        self.prompts = by_language(prompts, "prompts")
        self.max_cells = max_cells
        self.current: dict = {}
        self.figure = None
        self.error = ""
        self._busy = False
        self._buttons: list[list[w.Button]] = []
        self._grid_shape = None

        self.problems = self._problems()
        languages = list(self.results)
        self.language = w.ToggleButtons(options=languages, value=languages[0], description="language")
        self.side_by_side = w.Checkbox(value=False, description="side by side", indent=False)
        self.value = w.Dropdown(options=VALUES, value=value if value in VALUES else VALUES[0], description="value")
        self.row = w.Dropdown(description="row", layout=w.Layout(width="200px"))
        self.col = w.Dropdown(description="column", layout=w.Layout(width="220px"))
        self.extra = w.Dropdown(description="slice", layout=w.Layout(width="200px"))
        self.message = w.HTML()
        self.grid_box = w.VBox()
        self.plot = w.Output()
        self.summary_html = w.HTML()
        self.prompts_html = w.HTML()
        self.explorer = self._make_explorer()
        if self.explorer is not None:
            self.explorer.prompt.observe(self._on_explorer_prompt, names="value")

        for control in (self.language, self.side_by_side, self.value, self.extra):
            control.observe(self._on_view, names="value")
        for control in (self.row, self.col):
            control.observe(self._on_cell, names="value")
        if len(languages) == 1:
            self.language.layout.display = "none"
            self.side_by_side.layout.display = "none"
        details = [w.HBox([self.summary_html, self.prompts_html])]
        if self.explorer is not None:
            details.append(w.HTML("<h4>the selected head</h4>"))
            details.append(self.explorer)
        super().__init__(
            [
                w.HBox([self.language, self.side_by_side]),
                w.HBox([self.value, self.row, self.col, self.extra]),
                self.message,
                w.HBox([self.grid_box, self.plot]),
                *details,
            ]
        )
        self._set_axes(keep=False)
        self.refresh()

    # ------------------------------------------------------------ public
    @property
    def result(self):
        """The active language's result."""
        return self.results[self.language.value]

    def select(self, row=None, col=None, *, language: str | None = None, extra=None) -> None:
        """Select a cell by its labels (e.g. ``select(3, 2)`` = layer 3, head 2); bad labels show a message."""
        try:
            if language is not None and language not in self.results:
                raise ValueError(f"no result for language {language!r}; have {list(self.results)}")
        except ValueError as err:
            self._fail(str(err))
            return
        self._busy = True
        try:
            if language is not None and language != self.language.value:
                self.language.value = language
                self._set_axes(keep=True)
            row_dim, col_dim, third = map_dims(self.result)
            checks = [(row_dim, row, self.row), (col_dim, col, self.col), (third, extra, self.extra)]
            for dim, label, control in checks:
                if label is None:
                    continue
                allowed = [v for _, v in control.options]
                if label not in allowed:
                    shown = allowed if len(allowed) <= 12 else [*allowed[:5], "...", *allowed[-5:]]
                    raise IndexError(f"{dim} {label!r} is not in this result's grid; it has {shown}")
            for _dim, label, control in checks:
                if label is not None:
                    control.value = label
        except IndexError as err:
            self._busy = False
            self.refresh()
            self._fail(str(err))
            return
        finally:
            self._busy = False
        self.refresh()

    def click(self, i: int, j: int) -> None:
        """What clicking the map's cell at row index ``i``, column index ``j`` does."""
        rows = [v for _, v in self.row.options]
        cols = [v for _, v in self.col.options]
        if not (0 <= i < len(rows) and 0 <= j < len(cols)):
            self._fail(f"cell ({i}, {j}) is outside the {len(rows)} x {len(cols)} map")
            return
        self.select(rows[i], cols[j])

    def refresh(self) -> None:
        """Redraw the map and the selected cell's details."""
        self.error = ""
        language, value = self.language.value, self.value.value
        res = self.result
        row_dim, col_dim, third = map_dims(res)
        extra = self.extra.value if third is not None else None
        grid, rows, cols = map_grid(res, value, extra)
        r, c = self.row.value, self.col.value
        i, j = rows.index(r), cols.index(c)
        cell = cell_of(res, r, c, extra)
        shown = self._shown_languages()
        summary = cell_summary(self.results, cell)
        per_prompt = pd.concat(
            [cell_prompts(self.results[lang], cell, lang) for lang in shown if self._has_grid(lang)], ignore_index=True
        )
        follow = self._explorer_prompt()
        self.current = {
            "language": language,
            "value": value,
            "extra": extra,
            "grid": grid,
            "rows": rows,
            "cols": cols,
            "cell": cell,
            "cell_value": float(grid[i, j]),
            "summary": summary,
        }
        name = ", ".join(f"{d} {lab}" for d, lab in cell.items())
        self.summary_html.value = table_html(summary, title=f"{name}: mean over prompts")
        self._show_prompts(per_prompt, follow or (self.explorer.prompt.value if self.explorer is not None else None))
        self._paint(grid, (i, j), row_dim, col_dim)
        grids = {}
        for lang in shown:
            if self._has_grid(lang):
                g, rs, cs = map_grid(self.results[lang], value, extra)
                lang_res = self.results[lang]
                grids[lang] = (g, axis_labels(lang_res, row_dim, rs), axis_labels(lang_res, col_dim, cs))
        title = f"{res.method} ({res.direction}): {value}" + (f", {third} {extra}" if third else "")
        self.figure = map_figure(grids, row_dim, col_dim, value, (i, j), title)
        show_figure(self.plot, self.figure)
        if self.explorer is not None and row_dim == "layer" and col_dim == "head":
            self.explorer.select(layer=int(r), head=int(c), prompt=follow)
        self._show_message()

    # ------------------------------------------------------------ internals
    def _problems(self) -> list[str]:
        problems = []
        dims = {lang: tuple(r.dims) for lang, r in self.results.items()}
        if len(set(dims.values())) > 1:
            problems.append(f"the results have different grids {dims}: side by side shows those like the active one")
        if self.model is not None:
            a = self.model.adapter
            for lang, res in self.results.items():
                ext = grid_extent(res)
                if ext.get("layer", 0) > a.n_layers or ext.get("head", 0) > a.n_heads:
                    problems.append(
                        f"result {lang!r} covers {ext.get('layer', '?')} layers x {ext.get('head', '?')} heads but the "
                        f"model has {a.n_layers} x {a.n_heads}: it is from another model (no head details for it)"
                    )
        return problems

    def _make_explorer(self):
        if self.model is None:
            return None
        heads = {
            lang: r
            for lang, r in self.results.items()
            if map_dims(r)[:2] == ("layer", "head") and not any(f"result {lang!r} covers" in p for p in self.problems)
        }
        if not heads:
            return None
        prompts = self.prompts or None
        return HeadExplorer(self.model, prompts, patching=heads)

    def _explorer_prompt(self) -> tuple[str, int] | None:
        """Where the explorer must go to show the map's language: the same prompt number in that language's set
        (``None``: it is there already, shows a typed prompt, or has no prompts of that language)."""
        ex, language = self.explorer, self.language.value
        if ex is None or ex.prompt.value == TYPED or language not in ex.prompts:
            return None
        shown, index = ex.prompt.value
        return None if shown == language else (language, min(index, len(ex.prompts[language]) - 1))

    def _on_explorer_prompt(self, change) -> None:
        """A prompt of another language picked in the explorer switches the map to that language; any other
        prompt is marked in the per-prompt table."""
        new = change["new"]
        if self._busy or not self.current:
            return
        if new != TYPED and new[0] in self.results and new[0] != self.language.value:
            self.select(language=new[0])
        else:
            self._show_prompts(self.current["per_prompt"], new)

    def _show_prompts(self, per_prompt: pd.DataFrame, prompt) -> None:
        """The selected cell's per-prompt table, ``shown`` marking the explorer's prompt (none for a typed one)."""
        per_prompt = per_prompt.drop(columns="shown", errors="ignore")
        if prompt not in (None, TYPED) and len(per_prompt):
            per_prompt["shown"] = (per_prompt["language"] == prompt[0]) & (per_prompt["prompt"] == prompt[1])
        self.current.update(per_prompt=per_prompt, prompt=prompt)
        name = ", ".join(f"{d} {lab}" for d, lab in self.current["cell"].items())
        self.prompts_html.value = table_html(per_prompt, title=f"{name}: per prompt")

    def _has_grid(self, language: str) -> bool:
        return tuple(self.results[language].dims) == tuple(self.result.dims)

    def _shown_languages(self) -> list[str]:
        if self.side_by_side.value:
            return [lang for lang in self.results if self._has_grid(lang)]
        return [self.language.value]

    def _labels(self, dim: str, labels: list) -> list[tuple[str, object]]:
        if dim == "pos":
            ps = self.prompts.get(self.language.value) or (next(iter(self.prompts.values())) if self.prompts else None)
            names = pos_labels(self.result, ps, getattr(self.model, "tokenizer", None))
            return [(names.get(x, str(x)), x) for x in labels]
        return [(str(x), x) for x in labels]

    def _set_axes(self, keep: bool) -> None:
        """Fill the row / column / slice dropdowns from the active result's axes (keeping a still-valid choice)."""
        res = self.result
        row_dim, col_dim, third = map_dims(res)
        self._busy = True
        try:
            for control, dim, labels in (
                (self.row, row_dim, res.axes[row_dim]),
                (self.col, col_dim, res.axes[col_dim] if col_dim != "-" else [ONE]),
                (self.extra, third, res.axes[third] if third else []),
            ):
                old = control.value
                control.description = dim or "slice"
                control.options = self._labels(dim, list(labels)) if dim else []
                values = [v for _, v in control.options]
                control.value = old if keep and old in values else (values[0] if values else None)
            self.extra.layout.display = None if third else "none"
        finally:
            self._busy = False

    def _paint(self, grid: torch.Tensor, selected: tuple[int, int], row_dim: str, col_dim: str) -> None:
        """Colour the clickable map (rebuilt only when its shape changes)."""
        n_rows, n_cols = grid.shape
        if n_rows * n_cols > self.max_cells:
            self.grid_box.children = [w.HTML(note_html(f"{n_rows} x {n_cols} cells: pick a cell with the dropdowns"))]
            self._buttons, self._grid_shape = [], None
            return
        if self._grid_shape != (n_rows, n_cols, row_dim, col_dim):
            self._build_grid(n_rows, n_cols, row_dim, col_dim)
        vmin, vmax = diverging_limits(grid)
        for i in range(n_rows):
            for j in range(n_cols):
                b = self._buttons[i][j]
                v = float(grid[i, j])
                b.style.button_color = cell_colour(v, vmin, vmax)
                b.tooltip = f"{row_dim} {self.row.options[i][0]}, {col_dim} {self.col.options[j][0]}: {v:.3f}"
                b.layout.border = "2px solid black" if (i, j) == selected else "1px solid #eee"

    def _build_grid(self, n_rows: int, n_cols: int, row_dim: str, col_dim: str) -> None:
        head = [w.HTML(f"<small>{row_dim} \\ {col_dim}</small>", layout=w.Layout(width="90px"))]
        head += [w.Label(label[:3], layout=w.Layout(width="24px")) for label, _ in self.col.options]
        rows = [w.HBox(head)]
        self._buttons = []
        for i in range(n_rows):
            line = []
            for j in range(n_cols):
                b = w.Button(description="", layout=w.Layout(width="24px", height="20px", padding="0px", margin="0px"))
                b.on_click(lambda _b, i=i, j=j: self.click(i, j))
                line.append(b)
            self._buttons.append(line)
            label = w.Label(str(self.row.options[i][0]), layout=w.Layout(width="90px"))
            rows.append(w.HBox([label, *line]))
        self.grid_box.children = rows
        self._grid_shape = (n_rows, n_cols, row_dim, col_dim)

    def _show_message(self) -> None:
        parts = [error_html(self.error)] if self.error else []
        parts += [note_html(p) for p in self.problems]
        self.message.value = "<br>".join(parts)

    def _fail(self, message: str) -> None:
        self.error = message
        self._show_message()

    def _on_view(self, change) -> None:
        if self._busy:
            return
        if change["owner"] is self.language:
            self._set_axes(keep=True)
        self.refresh()

    def _on_cell(self, change) -> None:
        if not self._busy:
            self.refresh()
