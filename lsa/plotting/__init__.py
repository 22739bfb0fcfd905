"""Figures of results, one module per method; each figure takes a result, never a model.

- :mod:`lsa.plotting.behaviour`: per-prompt behaviour (:mod:`lsa.behaviour`);
- :mod:`lsa.plotting.patching`: patching maps (:mod:`lsa.patching`);
- :mod:`lsa.plotting.attribution`: attribution against exact patching (:mod:`lsa.attribution`);
- :mod:`lsa.plotting.flow`: routes and head activation frequency (:mod:`lsa.flow`);
- :mod:`lsa.plotting.lens`: vocabulary projections and the logit lens (:mod:`lsa.lens`);
- :mod:`lsa.plotting.circuits`: circuit diagrams, discovery steps, overlap and faithfulness (:mod:`lsa.circuits`).

This module holds what they share: :func:`save` writes a figure beside the run, and
importing the package (any of its modules) adds the installed CJK fonts to
matplotlib's fallback list, so Chinese tokens render.

>>> from lsa.plotting import patching as patching_plots                      # doctest: +SKIP
>>> save(patching_plots.patching_map(results), output_dir, "head_patching")   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path


def save(fig, output_dir: str | Path, name: str) -> Path:
    """Write a figure as PNG (for reports) and SVG; returns the PNG path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    png = output_dir / f"{name}.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    fig.savefig(output_dir / f"{name}.svg", bbox_inches="tight")
    return png


def whiskers(value, low, high):
    """Error bar lengths ``[2, n]`` below and above ``value`` for an interval ``low`` to ``high``, never negative:
    a percentile interval can miss its own estimate (a ratio with a near-zero denominator; a skewed null
    whose mean lies above its 95th percentile), and matplotlib refuses a negative whisker."""
    import numpy as np

    value, low, high = (np.asarray(x, dtype=float) for x in (value, low, high))
    return np.stack([value - low, high - value]).clip(min=0)


# Fonts with Chinese glyphs, tried after DejaVu Sans (matplotlib falls back per glyph).
CJK_FONTS = (
    "WenQuanYi Micro Hei",
    "Noto Sans CJK SC",
    "Source Han Sans SC",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
)


def use_cjk_fonts() -> list[str]:
    """Add the installed CJK fonts to matplotlib's fallback list (so Chinese tokens render); returns them."""
    from matplotlib import font_manager, rcParams

    installed = {f.name for f in font_manager.fontManager.ttflist}
    found = [name for name in CJK_FONTS if name in installed]
    if found:
        rcParams["font.family"] = ["DejaVu Sans", *found]
    return found


use_cjk_fonts()
