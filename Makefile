# Thin layer over `python -m pipeline`. Every target sets up .venv on first use.
#   make demo                                 extract + train + report on the embedded digits
#   make extract CONFIG=configs/flowers5.toml  (also train, report)
#   make train SET="head.kind=dense head.dense.dropout=0.3"
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/default.toml
SET    ?=
ARGS   := --config $(CONFIG) $(foreach s,$(SET),--set $(s))

.PHONY: demo extract train report test clean

demo: extract train report

extract: $(VENV)/.installed
	$(PY) -m pipeline extract $(ARGS)

train: $(VENV)/.installed
	$(PY) -m pipeline train $(ARGS)

report: $(VENV)/.installed
	$(PY) -m pipeline report $(ARGS) $(if $(RUN),--run $(RUN))

test: $(VENV)/.installed
	$(PY) -m pytest

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf runs cache/*.h5 cache/*.lock cache/demo
