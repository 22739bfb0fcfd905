"""Interactive explorers (ipywidgets 8) for lsa results: behaviour, heads, patching maps, circuits, neurons.

Each widget takes results (and a model only where it must run one) and keeps the
data it currently shows in ``.current`` and its figure in ``.figure``.
"""

from widgets.behaviour import BehaviourExplorer
from widgets.circuits import CircuitViewer
from widgets.heads import HeadExplorer
from widgets.latent import LatentExplorer
from widgets.neurons import NeuronExplorer
from widgets.patching import PatchingMap

__all__ = ["BehaviourExplorer", "CircuitViewer", "HeadExplorer", "LatentExplorer", "NeuronExplorer", "PatchingMap"]
