# One-command entry points. Each creates .venv and installs the pinned stack first.
#   make demo       install, then run the main job end to end: sweep, ensembles, leaderboard (runs/demo/)
#   make test       install, then run the whole test suite, as CI does (with Debian's chromium, when it
#                   can be installed, for the tests that render the HTML leaderboard)
#   make test-fast  install, then run the fast tier: every test that starts no sweep, cluster,
#                   driver, MLflow server, browser or clean venv and loads no real weights
#   make docs       install, then serve the docs site (docs/) on http://127.0.0.1:8000
#   make docs-reference  regenerate docs/reference/ from the config dataclasses and the CLI
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Strict editable installs link each module file; a new module needs a re-install.
SOURCES := pyproject.toml constraints.txt $(shell find platform models ensembles search_spaces -name '*.py' -o -name '*.yaml' 2>/dev/null)

.PHONY: install browser demo test test-fast docs docs-reference clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt \
		--config-settings editable_mode=strict -e '.[test,docs]'
	touch $@

demo: install
	$(BIN)/msa run sweeps/demo.yaml --export runs/demo

# Headless Chromium renders the HTML leaderboard in a test; installed as root where apt-get exists,
# otherwise that test skips and says why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the HTML rendering test will skip"

# Two pytest-xdist workers: one runs every test that runs Ray, in order (tests/conftest.py), the
# other the rest beside it.
test: install browser
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=25

test-fast: install
	$(BIN)/python -m pytest -m "not slow" --durations=10

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

docs-reference: install
	$(BIN)/python -m msa.platform.reference

clean:
	rm -rf $(VENV) build *.egg-info
