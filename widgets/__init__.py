"""Interactive explorers (ipywidgets 8) for lsa results: heads, patching maps, circuits, neurons."""
