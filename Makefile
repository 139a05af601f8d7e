# The kit's commands. Every target installs .venv first when it is missing or older than requirements.txt;
# `make install` and `make test` also bring Debian's chromium (the HTML report's browser test) when it is missing.
VENV     := .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
WORK     := work
export PYTHONUNBUFFERED := 1
# Kaggle's image (requirements-kaggle.txt) for `make kaggle-check`, on its Python 3.12: python3.12 on PATH or
# pyenv's, else python3 (said when it happens).
KAGGLE_VENV   := .venv-kaggle
KAGGLE_STAMP  := $(KAGGLE_VENV)/.installed
KAGGLE_PYTHON := 3.12
KAGGLE_BASES  := python$(KAGGLE_PYTHON) $(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/$(KAGGLE_PYTHON).*/bin/python$(KAGGLE_PYTHON))

.PHONY: install test test-backbones bench bench-scale lint demo clean-demo kaggle-check

install: $(STAMP) $(CHROMIUM)

$(STAMP): requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $(STAMP)

# Runs only while the browser is missing: as root through apt-get, quietly; elsewhere (or when apt-get fails,
# e.g. on a system without Debian's package) it says so, and the browser test skips (in CI, where CI=true, it fails).
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium (apt-get)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
			|| echo "warning: apt-get could not install chromium; the HTML report's browser test will skip"; \
	else \
		echo "note: $(CHROMIUM) is missing; 'sudo apt-get install chromium' lets the browser test run"; \
	fi

# Two pytest workers, a test file each at a time (a file's module fixtures are built once): one test process kept
# 1.2 of the 2 cores busy on average (subprocess starts, TensorFlow's tracing and imports are single-threaded).
TEST_WORKERS := -n 2 --dist loadfile

test: install
	$(PY) -m pytest tests $(TEST_WORKERS)

# The Keras backbone families end to end (train, SIGTERM, resume, export, submit): tens of minutes on 2 cores.
test-backbones: install
	$(PY) -m pytest tests/test_backbones.py -m slow

$(KAGGLE_STAMP): requirements-kaggle.txt
	@base=""; for candidate in $(KAGGLE_BASES); do \
		if "$$candidate" -c 'import sys; sys.exit(not sys.version.startswith("$(KAGGLE_PYTHON)."))' 2>/dev/null; \
		then base=$$candidate; break; fi; \
	done; \
	if [ -z "$$base" ]; then \
		base=python3; echo "note: no Python $(KAGGLE_PYTHON) (Kaggle's) here: $(KAGGLE_VENV) uses $$(python3 --version)"; \
	fi; \
	echo "building $(KAGGLE_VENV) with $$base ($$("$$base" --version))"; \
	rm -rf $(KAGGLE_VENV) && "$$base" -m venv $(KAGGLE_VENV)
	$(KAGGLE_VENV)/bin/pip install --quiet -r requirements-kaggle.txt
	touch $(KAGGLE_STAMP)

# The notebook on Kaggle's versions: models exported here (.venv) run by .venv-kaggle's Python in the end-to-end
# tests, and one tiny replay of each task under both, which must predict the same.
kaggle-check: $(STAMP) $(KAGGLE_STAMP)
	KIT_SCRIPT_PYTHON=$(abspath $(KAGGLE_VENV))/bin/python $(PY) -m pytest tests/test_kaggle_stack.py \
		tests/test_submission_e2e.py $(TEST_WORKERS)

bench: $(STAMP)
	$(PY) -m bench

# The cost model's projection from a small run against measurement at growing sizes (docs/fitting-the-server.md).
bench-scale: $(STAMP)
	$(PY) -m bench scale

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: $(STAMP)
	$(PY) -m demo --out $(WORK)/demo

clean-demo:
	rm -rf $(WORK)/demo
