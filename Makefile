# Two commands do all the set-up on a fresh machine (Python 3.10+ with venv):
#   make study   downloads the data and GPT-2, and runs the main job
#   make test    runs the test suite (CPU, a few minutes)
# Each creates .venv and installs the pinned requirements the first time.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= gpt2
DATA ?= data
LIMIT ?=
LIMIT_ARG := $(if $(LIMIT),--limit $(LIMIT),)

.PHONY: study test clean-venv

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

# The main job. Until the training scripts land, it scores pretrained GPT-2 (zero-shot) on both tasks' dev
# sets. Overridable: MODEL=gpt2-medium (or a model directory), DATA=path/to/data, LIMIT=200 (Quora pairs).
study: $(VENV)/.runtime
	$(PY) -m data.download --data-dir $(DATA)
	$(PY) eval.py --task paraphrase --checkpoint $(MODEL) --split dev --data-dir $(DATA) $(LIMIT_ARG)
	$(PY) eval.py --task sonnet --checkpoint $(MODEL) --split dev --data-dir $(DATA)

test: $(VENV)/.test
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
