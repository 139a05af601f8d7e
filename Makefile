# The kit's commands. Every target installs .venv first when it is missing or older than requirements.txt.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORK   := work
export PYTHONUNBUFFERED := 1

.PHONY: install test bench lint demo clean-demo

install: $(STAMP)

$(STAMP): requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	$(PY) -m local_eval demo --out $(WORK)/demo

clean-demo:
	rm -rf $(WORK)/demo
