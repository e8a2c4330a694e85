# Thin layer over `python -m pipeline`. Every target sets up .venv on first use.
#   make demo                                 extract + train + report on the embedded digits
#   make extract CONFIG=configs/flowers5.toml  (also train, report)
#   make extract ENGINE=dask [ADDRESS=tcp://sched:8786]   the same extract on a Dask cluster (pip install -e '.[dask]')
#   make train SET="head.kind=dense head.dense.dropout=0.3"
#   make predict RUN=runs/flowers5/<run> INPUT=new_photos/ [THRESHOLD=0.6] [UNFAMILIAR=1]   (RUN: newest run)
#   make export RUN=runs/flowers5/<run>       .keras + SavedModel + TFLite in <run>/export, checked against the report
#   make sweep [VARY='head.dense.dropout=[0.2, 0.5]']   several heads on one cache, then the comparison table
#   make compare                              this dataset's runs side by side (terminal + runs/<dataset>/compare.html)
#   make baseline [EPOCHS=100 IMAGE_SIZE=96]  a small CNN from scratch on the raw images, for comparison
#   make finetune [RUN=runs/<dataset>/<head run>]  the top of the backbone trained with a head (default: the newest)
#   make bench [IMAGES=dir]                   extraction speed, memory and bf16 agreement (runs/bench.json)
#   make bench BIG_CACHE=1                    both heads on a synthetic 1,000,000 x 1,280 cache: time and peak memory
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/default.toml
SET    ?=
ARGS   := --config $(CONFIG) $(foreach s,$(SET),--set $(s))

.PHONY: demo extract train report predict export compare sweep baseline finetune bench test chromium clean

demo: extract train report

extract: $(VENV)/.installed
	$(PY) -m pipeline extract $(ARGS) $(if $(ENGINE),--engine $(ENGINE)) $(if $(ADDRESS),--address $(ADDRESS))

train: $(VENV)/.installed
	$(PY) -m pipeline train $(ARGS)

report: $(VENV)/.installed
	$(PY) -m pipeline report $(ARGS) $(if $(RUN),--run $(RUN))

predict: $(VENV)/.installed
	$(if $(INPUT),,$(error INPUT is missing: make predict INPUT=<image file, folder or glob> [RUN=<run dir>]))
	$(PY) -m pipeline predict $(ARGS) $(if $(RUN),--run $(RUN)) $(if $(THRESHOLD),--threshold $(THRESHOLD)) $(if $(UNFAMILIAR),--unfamiliar) $(INPUT)

export: $(VENV)/.installed
	$(PY) -m pipeline export $(ARGS) $(if $(RUN),--run $(RUN))

compare: $(VENV)/.installed
	$(PY) -m pipeline compare $(ARGS)

sweep: $(VENV)/.installed
	$(PY) -m pipeline sweep $(ARGS) $(if $(VARY),--vary '$(VARY)')

baseline: $(VENV)/.installed
	$(PY) -m pipeline baseline $(ARGS) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE))

finetune: $(VENV)/.installed
	$(PY) -m pipeline finetune $(ARGS) $(if $(RUN),--run $(RUN))

bench: $(VENV)/.installed
	$(PY) -m pipeline bench $(ARGS) $(if $(IMAGES),--images $(IMAGES)) $(if $(BIG_CACHE),--big-cache)

test: $(VENV)/.installed chromium
	$(PY) -m pytest

# The HTML report is tested in a real browser: Debian's Chromium, installed when missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	if command -v apt-get >/dev/null; then \
		echo "installing Chromium (Debian's chromium), which the HTML report's tests open the report in"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; \
	else \
		echo "make test needs Chromium and apt-get is not here: install it yourself (dnf install chromium, brew install --cask chromium, ...) and run make test again" >&2; \
		exit 2; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf runs cache/*.h5 cache/*.lock cache/demo
