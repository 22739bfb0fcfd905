"""lsa: language structure analysis, a workbook for multilingual mechanistic interpretability.

>>> import lsa                                               # doctest: +SKIP
>>> model = lsa.load_model("toy-bilingual")                   # doctest: +SKIP
>>> prompts = lsa.tasks.build("ioi", "en", model.tokenizer)   # doctest: +SKIP
"""

from lsa import metrics, tasks
from lsa.adapter import SUPPORTED, Adapter, UnsupportedArchitecture
from lsa.model import Model, load_model, wrap

__all__ = ["SUPPORTED", "Adapter", "Model", "UnsupportedArchitecture", "load_model", "metrics", "tasks", "wrap"]
