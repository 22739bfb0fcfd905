"""lsa: language structure analysis, a workbook for multilingual mechanistic interpretability.

>>> import lsa                                               # doctest: +SKIP
>>> model = lsa.load_model("toy-bilingual")                   # doctest: +SKIP
>>> prompts = lsa.tasks.build("ioi", "en", model.tokenizer)   # doctest: +SKIP
>>> lsa.patching.activation_patching(model, prompts, "head")  # doctest: +SKIP

The method modules (``lsa.patching``, ``lsa.circuits``, ``lsa.engine``, ``lsa.neurons``, ...)
are imported on first use (:func:`__getattr__`), so ``import lsa`` costs what loading a
model needs and no more.
"""

import importlib

import tqdm

from lsa import metrics, tasks
from lsa.adapter import SUPPORTED, Adapter, UnsupportedArchitecture
from lsa.model import Model, load_model, wrap

# Progress bars refresh only from the thread that advances them: tqdm's monitor thread would refresh a
# notebook bar (an ipywidget) from another thread, sending kernel messages off the kernel's main thread.
tqdm.tqdm.monitor_interval = 0

__all__ = ["SUPPORTED", "Adapter", "Model", "UnsupportedArchitecture", "load_model", "metrics", "tasks", "wrap"]


def __getattr__(name: str):
    """``lsa.<module>`` for any module of the package not imported yet (``lsa.patching``): imported now."""
    if name.startswith("_"):
        raise AttributeError(f"module 'lsa' has no attribute {name!r}")
    try:
        return importlib.import_module(f"lsa.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"lsa.{name}":
            raise  # the module exists but something it imports does not
        raise AttributeError(f"module 'lsa' has no attribute {name!r} (and no module lsa.{name})") from None
