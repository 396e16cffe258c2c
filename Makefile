# One-command entry points. Both create .venv and install the pinned stack first.
#   make demo   install, then run the main job end to end: the sweep in sweeps/demo.yaml
#   make test   install, then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Strict editable installs link each module file; a new module needs a re-install.
SOURCES := pyproject.toml constraints.txt $(shell find platform models ensembles search_spaces -name '*.py' -o -name '*.yaml' 2>/dev/null)

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt \
		--config-settings editable_mode=strict -e '.[test]'
	touch $@

demo: install
	$(BIN)/msa sweep sweeps/demo.yaml

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
