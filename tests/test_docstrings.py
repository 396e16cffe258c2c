"""Every `>>>` example in the docstrings of `platform/`, `models/` and `ensembles/` runs and prints
what it shows. Modules are imported by their `msa.*` names (collecting the folders themselves
would import `platform/` as a top-level package, the shadowing the import scheme avoids)."""
from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"platform": "msa.platform", "models": "msa.models", "ensembles": "msa.ensembles"}


def module_names() -> list[str]:
    names = []
    for folder, package in FOLDERS.items():
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            names.append(".".join([package, *path.relative_to(REPO_ROOT / folder).with_suffix("").parts]))
    return names


def examples(name: str) -> list[doctest.DocTest]:
    return [test for test in doctest.DocTestFinder().find(importlib.import_module(name)) if test.examples]


WITH_EXAMPLES = [name for name in module_names() if examples(name)]


def test_the_docstrings_carry_examples():
    assert len(WITH_EXAMPLES) >= 10, WITH_EXAMPLES


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in examples(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0 and result.attempted > 0, f"{result.failed} of {result.attempted} examples of {name} failed"
