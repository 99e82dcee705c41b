# Two commands do everything on a fresh machine (see README):
#   make demo   set up .venv and run the demo on a fresh embedded SQLite registry
#   make test   set up .venv and run every test (SQLite and PostgreSQL)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

# constraints.txt pins torch to the CPU wheel on this machine's disk (an unpinned torch
# pulls several GB of CUDA packages) and the other versions the project is tested with.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python examples/demo.py

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
