# Two commands do all the set-up on a fresh machine (Python 3.10+ with venv):
#   make study   downloads the data and GPT-2, and runs the study (study.py: 12 conditions, one table)
#   make test    runs the test suite (CPU, about 5 minutes on 2 cores: 257 s measured in a fresh clone)
# Each creates .venv and installs the pinned requirements the first time.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= gpt2
DATA ?= data
SEEDS ?=
JOBS ?=
PRESET ?= auto
OUT ?=

.PHONY: study test clean-venv

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

# The main job: the study, 2 tasks x {SFT only, DPO only, SFT->DPO} x {FFT, LoRA}, one table in
# out/study*/study.md (study.py says what each column means). With a CUDA GPU it is the full study; without one,
# PRESET=auto runs the reduced preset (fewer training pairs and epochs, a dev subset: about an hour on a
# 4-core laptop), and the table's header says so. Started again, it trains only what is not finished.
# Overridable: MODEL=gpt2-medium (or a model directory), DATA=path/to/data, SEEDS=N (runs per condition:
# default 3 on a CUDA GPU, 1 elsewhere), JOBS=N (runs at once, each its own process),
# PRESET=full (the whole study, even on a CPU) or reduced, OUT=out/my-study (default out/study...).
# python study.py --smoke is the same study with a tiny random GPT-2 on a few dozen examples (minutes).
study: $(VENV)/.runtime
	$(PY) -m data.download --data-dir $(DATA)
	$(PY) study.py --model $(MODEL) --data_dir $(DATA) --preset $(PRESET) $(if $(SEEDS),--seeds $(SEEDS),) \
		$(if $(JOBS),--jobs $(JOBS),) $(if $(OUT),--out_dir $(OUT),)

test: $(VENV)/.test
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
