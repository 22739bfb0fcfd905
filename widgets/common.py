"""Shared bits of the explorers: messages, tables, figures in output widgets, results keyed by language.

Every explorer keeps what it currently shows in plain attributes (``current``,
``figure``, HTML values) so tests can check it without a kernel; these helpers
turn data into those HTML strings and figures.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import ipywidgets as w
import pandas as pd
from IPython.display import display

ERROR_STYLE = "color:#b00"


def error_html(message: str) -> str:
    """An error message for an ``HTML`` widget (escaped)."""
    return f"<b style='{ERROR_STYLE}'>{html.escape(str(message), quote=False)}</b>"


def note_html(message: str) -> str:
    """A grey hint (what to pass to see more)."""
    return f"<i style='color:#666'>{html.escape(str(message), quote=False)}</i>"


def table_html(df: pd.DataFrame | None, floats: str = "{:.3f}", title: str | None = None) -> str:
    """A DataFrame as a compact HTML table (index dropped, values escaped)."""
    head = f"<h4>{html.escape(title)}</h4>" if title else ""
    if df is None or not len(df):
        return head + note_html("nothing to show")
    return head + df.to_html(index=False, float_format=floats.format, escape=True, border=0)


def show_figure(output: w.Output, fig) -> None:
    """Replace what ``output`` shows with ``fig``, then close it (so it is not drawn twice in a cell)."""
    import matplotlib.pyplot as plt
    from IPython import get_ipython

    if get_ipython() is not None:  # outside a kernel an Output widget captures nothing (it would print)
        output.clear_output(wait=True)
        with output:
            display(fig)
    plt.close(fig)


def by_language(results, name: str = "result") -> dict[str, object]:
    """``{language: result}`` from one result (keyed ``"all"``) or a mapping; empty mapping is an error."""
    if results is None:
        return {}
    if isinstance(results, Mapping):
        if not results:
            raise ValueError(f"{name}: an empty mapping; pass a result or {{language: result}}")
        return {str(k): v for k, v in results.items()}
    language = getattr(results, "language", None)
    return {str(language) if isinstance(language, str) else "all": results}


def cell_colour(value: float, vmin: float, vmax: float, cmap: str = "RdBu") -> str:
    """A hex colour for ``value`` on ``cmap`` between ``vmin`` and ``vmax`` (grey for NaN)."""
    import math

    import matplotlib
    from matplotlib.colors import to_hex

    if value is None or math.isnan(value):
        return "#dddddd"
    t = 0.5 if vmax == vmin else (value - vmin) / (vmax - vmin)
    return to_hex(matplotlib.colormaps[cmap](min(max(t, 0.0), 1.0)))
