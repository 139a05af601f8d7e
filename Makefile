# The kit's commands. Every target installs .venv first when it is missing or older than requirements.txt;
# `make install` and `make test` also bring Debian's chromium (the HTML report's browser test) when it is missing.
VENV     := .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
WORK     := work
export PYTHONUNBUFFERED := 1

.PHONY: install test bench lint demo clean-demo

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

test: install
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	$(PY) -m demo --out $(WORK)/demo

clean-demo:
	rm -rf $(WORK)/demo
