# The two set-up commands of the README:
#   make repro   create/update .venv (pinned), install pathsynth, register the kernel, run `dvc repro`
#   make test    the same set-up, then the test suite
# Both are idempotent: the environment is rebuilt only when requirements.txt or pyproject.toml change.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pathsynth-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DVC_NO_ANALYTICS ?= 1
export MPLBACKEND ?= Agg
export PYTHONHASHSEED ?= 0

.PHONY: setup repro test profile results lab clean-outputs

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (pathsynth)" >/dev/null
	@touch $(STAMP)

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -ra -n auto --dist loadfile --no-loadscope-reorder --durations=10

# make profile PROFILE=pcam-subset   (tiny | pcam-subset | paper): rewrites params.yaml; DVC sees the change
profile: setup
	$(BIN)/python -m pathsynth.config use $(PROFILE)

# make results: keep this finished run (metrics, dvc.lock, params, REPORT.md, timings, key figures) under
# results/<profile>/ for reviewers to compare against, and regenerate the README's timing table from results/
results: setup
	$(BIN)/python -m pathsynth.report.compare --save results/$$($(BIN)/python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['profile'])")
	$(BIN)/python -m pathsynth.report.provenance readme

lab: setup
	$(BIN)/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean-outputs:
	rm -rf data/data_prep data/prototypes models/prototypes reports/executed reports/figures plots metrics
