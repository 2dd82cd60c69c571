# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv on first use
# and installs requirements.txt into it; the stamp file makes the second run install nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean-demo

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps ultralytics==8.4.190 ultralytics-thop==2.2.3
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) demo.py $(DEMO_ARGS)

# Test files are spread over TEST_JOBS processes (pytest-xdist; a file's tests stay together, so
# its fixtures are built once). TEST_JOBS=0 runs everything in this process.
TEST_JOBS ?= 2
XDIST = $(if $(filter 0,$(TEST_JOBS)),-p no:xdist,-n $(TEST_JOBS) --dist loadfile)

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

clean-demo:
	rm -rf runs/demo datasets/synthetic
