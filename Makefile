# Two commands on a fresh machine:  make test  |  make quickstart
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
SHAPES ?= data/shapes

.PHONY: install test test-all quickstart lint format bench clean shapes-models smoke-paper

# The venv is (re)built when pyproject.toml changes. torch comes first, pinned, from the local
# wheel cache (see README, "Install"); then the package with its dev and app (gradio, ~30 s)
# extras.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,app]"
	touch $@

install: $(VENV)/.installed

# The default suite: CPU, no real weights, under 15 minutes on 2 cores.
test: install
	$(PY) -m ruff check .
	OMP_NUM_THREADS=2 $(PY) -m pytest -q $(PYTEST_ARGS)

# The notebooks extra (matplotlib, ipykernel, nbclient) that tests/test_notebook.py needs.
$(VENV)/.installed-notebooks: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,notebooks]"
	touch $@

# Everything, including tests marked slow (they skip with a reason when weights are absent),
# the notebook run (tests/test_notebook.py, a few minutes) and the app in Chromium
# (tests/test_app_browser.py: the browser extra and Debian's chromium are installed where
# missing; when that fails, e.g. no root, the test skips with its reason).
test-all: $(VENV)/.installed-notebooks
	-$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q -e ".[browser]"
	-command -v chromium >/dev/null || for as in "sudo -n" ""; do \
	  $$as apt-get update -q && $$as env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q chromium && break; done
	$(PY) -m ruff check .
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m "" $(PYTEST_ARGS)

# The main job on the embedded default (scripts/shapes_models.py --preset quickstart): make
# ShapesWorld, train the smallest set of ShapesWorld models an entity-level SeMani-Diff edit
# needs (two stages side by side, one thread each; each command printed before it runs; rerun
# to resume), then find a named entity on held-out images and recolour it with the trained and
# the untrained models: logs/quickstart/report.{md,json} and edits.png.
QUICKSTART_ARGS ?=
quickstart: install
	OMP_NUM_THREADS=1 $(PY) scripts/shapes_models.py --preset quickstart --data $(SHAPES) \
	  $(QUICKSTART_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: install
	$(PY) scripts/bench/trans_sampling.py
	$(PY) scripts/bench/trans_train_step.py
	$(PY) scripts/bench/alignment.py
	$(PY) scripts/bench/diff_editor.py
	$(PY) scripts/bench/ovseg_start.py

clean:
	rm -rf .pytest_cache .ruff_cache outputs multirun

# Every ShapesWorld model in dependency order, each export installed under pretrained/ where the
# eval and app configs read it (scripts/shapes_models.py; hours on CPU; rerun to resume).
# SHAPES_MODELS_ARGS, e.g. "--dry-run", "--only clip_shapes,mask_prompt_shapes",
# "--steps-scale 0.01 --pretrained-dir /tmp/smoke/pretrained --logs-dir /tmp/smoke/logs".
SHAPES_MODELS_ARGS ?=
shapes-models: install
	OMP_NUM_THREADS=1 $(PY) scripts/shapes_models.py --data $(SHAPES) $(SHAPES_MODELS_ARGS)

# Every paper experiment once at full architecture size on CPU (scripts/smoke_paper.py): random
# weights at real size in the real file layouts, generated data in the CUB / COCO / CC12M
# layouts, one training step of each paper run, one Table-I image per method, one
# manipulate.py edit per editor; prints peak memory, time and parameters. 16 minutes on 2
# cores, up to 45 GB of disk under logs/smoke_paper (28 GB at the end), 21 GB of memory at its
# peak; rerun to resume.
# SMOKE_PAPER_ARGS, e.g. "--only weights,semani_diff_coco", "--out /scratch/smoke".
SMOKE_PAPER_ARGS ?=
smoke-paper: install
	$(PY) scripts/smoke_paper.py $(SMOKE_PAPER_ARGS)
