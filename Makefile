# qiotests: `make check` runs the cases against real QEMU, `make selftest` the harness's
# own tests. Both install what is missing first (scripts/setup.sh).
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV := .venv
PYTEST := $(VENV)/bin/pytest
JOBS ?= 2
QEMU_BUILD_DIR ?=
QEMU_VERSIONS_DIR ?= $(abspath ..)/qemu-versions
PLANTED_DIR ?= $(abspath ..)/qemu-planted
QEMU_MATRIX_DIR ?= $(abspath ..)/qemu-matrix
QEMU_MATRIX_ONLY ?=
QEMU_COVERAGE_DIR ?= $(abspath ..)/qemu-coverage
COVERAGE_SUITES ?=
BUILD ?=
# builds share the machine: compile at low priority (NICE= to turn it off)
NICE ?= nice -n 10
PYTEST_ARGS ?=
# REPORTS=DIR: what CI uploads, DIR/junit.xml and DIR/artifacts/<failed test>/
REPORTS ?=
SRC ?=
GOOD ?=
BAD ?=
BISECT_ARGS ?=
MINUTES ?= 5
EXPLORE_ARGS ?=
ifneq ($(QEMU_BUILD_DIR),)
QEMU_OPTS := --qemu-build $(QEMU_BUILD_DIR)
endif
ifneq ($(REPORTS),)
REPORT_OPTS := --junitxml=$(REPORTS)/junit.xml --artifacts=$(REPORTS)/artifacts
endif
export QEMU_BUILD_DIR

.PHONY: help setup check check-quick selftest bench bench-guest lint regen qemu-versions \
	check-versions doctor build-qemu qemu-matrix coverage planted-bugs bisect explore clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'
	@echo "  variables: QEMU_BUILD_DIR=DIR  JOBS=$(JOBS)  PYTEST_ARGS='...'  REPORTS=DIR  SRC=DIR BUILD=DIR"
	@echo "             QEMU_MATRIX_DIR=$(QEMU_MATRIX_DIR)  QEMU_MATRIX_ONLY='7.2 10.2'"

setup:  ## install QEMU (apt, when missing) and the .venv
	@scripts/setup.sh

check: setup  ## run every case against real QEMU (pytest -n JOBS)
	$(PYTEST) cases -n $(JOBS) $(QEMU_OPTS) $(REPORT_OPTS) $(PYTEST_ARGS)

check-quick: setup  ## run the cases marked quick
	$(PYTEST) cases -n $(JOBS) -m quick $(QEMU_OPTS) $(REPORT_OPTS) $(PYTEST_ARGS)

selftest: setup  ## run the harness's own tests
	$(PYTEST) tests -n $(JOBS) $(REPORT_OPTS) $(PYTEST_ARGS)

bench: setup  ## harness overhead vs a bare QEMU, as a ratio
	$(VENV)/bin/python bench/overhead.py $(QEMU_OPTS)

bench-guest: setup  ## guest boot to ready through the harness vs a bare QEMU, as a ratio
	$(VENV)/bin/python bench/guest.py $(QEMU_OPTS)

SHELL_SCRIPTS = $(shell find scripts -name '*.sh') .ci/run
WORKFLOWS = $(wildcard .github/workflows/*.yml)

lint:  ## ruff, mypy --strict, shellcheck, and the workflows (actionlint, JSON schema), offline
	@scripts/setup.sh --no-qemu --lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	shellcheck $(SHELL_SCRIPTS)
	$(VENV)/bin/actionlint $(WORKFLOWS)
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows $(WORKFLOWS)

regen: setup  ## rewrite golden sections of the cases that run (read the diff after!)
	$(PYTEST) cases -n $(JOBS) --regen $(QEMU_OPTS) $(PYTEST_ARGS)

doctor: setup  ## print the QEMU found, its version, accelerators and QMP commands
	$(VENV)/bin/qiotests doctor $(QEMU_OPTS)

qemu-versions:  ## unpack bookworm-backports' QEMU next to the repo (QEMU_VERSIONS_DIR)
	scripts/qemu-versions.sh $(QEMU_VERSIONS_DIR)

check-versions: setup qemu-versions  ## run the cases against the backports QEMU
	$(PYTEST) cases -n $(JOBS) --qemu-build $$(cat $(QEMU_VERSIONS_DIR)/latest) $(PYTEST_ARGS)

build-qemu: setup  ## build QEMU's programs for the harness from SRC=TREE [BUILD=DIR] (reused, ccache)
	@test -n "$(SRC)" || { echo "make build-qemu: say which QEMU source tree: SRC=DIR [BUILD=DIR]" >&2; exit 2; }
	$(NICE) $(VENV)/bin/qiotests build-qemu $(SRC) $(if $(BUILD),--build $(BUILD))

qemu-matrix: setup  ## fetch Debian's QEMU 7.2/10.0/10.2 sources, build, run the suite on each
	$(NICE) $(VENV)/bin/qiotests qemu-matrix --dir $(QEMU_MATRIX_DIR) --jobs $(JOBS) \
		$(foreach v,$(QEMU_MATRIX_ONLY),--only $(v)) $(if $(PYTEST_ARGS),-- $(PYTEST_ARGS))

coverage: setup  ## gcov build of QEMU 7.2; line/branch coverage of its bitmap code, ours vs upstream's iotests
	$(NICE) $(VENV)/bin/qiotests coverage --dir $(QEMU_COVERAGE_DIR) --matrix-dir $(QEMU_MATRIX_DIR) \
		--jobs $(JOBS) $(foreach s,$(COVERAGE_SUITES),--suite $(s)) $(if $(PYTEST_ARGS),-- $(PYTEST_ARGS))

planted-bugs: setup  ## build QEMU 7.2 pristine + each planted bitmap bug; each must be caught (~20 min first time)
	scripts/planted-bugs.sh $(PLANTED_DIR)

explore: setup  ## stateful exploration for MINUTES=N (Hypothesis, the oracle as invariant); prints a case on failure
	$(VENV)/bin/qiotests explore --minutes $(MINUTES) $(QEMU_OPTS) $(EXPLORE_ARGS)

bisect: setup  ## first bad QEMU commit: SRC=GIT_TREE GOOD=REV BAD=REV [BISECT_ARGS='--repeat 3']
	@if [ -z "$(SRC)" ] || [ -z "$(GOOD)" ] || [ -z "$(BAD)" ]; then \
	    echo "usage: make bisect SRC=QEMU_GIT_TREE GOOD=REV BAD=REV [BISECT_ARGS='--repeat N --build DIR'] [PYTEST_ARGS='-k 255']" >&2; exit 2; fi
	$(VENV)/bin/qiotests bisect --src $(SRC) --good $(GOOD) --bad $(BAD) $(BISECT_ARGS) -- -n $(JOBS) $(PYTEST_ARGS)

clean:  ## remove the venv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache
