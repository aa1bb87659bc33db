# Quick start: `make demo` (export -> engine for this CPU -> deploy -> verify) and `make test`.
# Both work on a fresh clone: they create .venv and install the pinned dependencies first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DOIT   := $(VENV)/bin/doit
STAMP  := $(VENV)/.installed

.PHONY: demo test bench venv sysdeps clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "enginekiln needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "enginekiln: installing the pinned dependencies into $(VENV) (torch 2.13.0 CPU, onnx, onnxruntime,"
	@echo "  onnxscript, transformers, boto3, fabric/paramiko, moto, pytest, rich, ...): about 90 s on the"
	@echo "  first run, a few seconds afterwards. pip shows each package (a progress bar on a terminal)."
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar $$([ -t 1 ] && echo on || echo off) -r requirements-dev.txt
	touch $@

# The SSH fleet simulator needs OpenSSH's server, the report page test Debian's chromium and its
# chromedriver (run as root in CI; tests skip with a reason elsewhere).
sysdeps:
	@if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing openssh-server for the fleet simulator"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null; \
	  else echo "note: no sshd and cannot install it; SSH fleet tests will be skipped"; fi; \
	fi
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium and chromium-driver for the report page test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "note: no chromium and cannot install it; the report page browser test will be skipped"; fi; \
	fi

demo: venv
	$(DOIT) deploy:local
	$(DOIT) status

test: venv sysdeps
	$(PY) -m pytest -q -n 2

bench: venv sysdeps
	$(PY) bench/run.py

clean:
	rm -rf artifacts
