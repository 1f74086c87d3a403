# Two commands do all the set-up on a fresh machine (Python 3.10+ with venv):
#   make study   downloads the data and GPT-2, and runs the main job
#   make test    runs the test suite (CPU, a few minutes)
# Each creates .venv and installs the pinned requirements the first time.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= gpt2
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
# sets. MODEL=gpt2-medium (or a checkpoint directory) and LIMIT=200 (pairs per split) are overridable.
study: $(VENV)/.runtime
	$(PY) -m data.download
	$(PY) eval.py --task paraphrase --checkpoint $(MODEL) --split dev $(LIMIT_ARG)
	$(PY) eval.py --task sonnet --checkpoint $(MODEL) --split dev

test: $(VENV)/.test
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
