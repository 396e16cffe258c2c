"""The import scheme of ../shared/DESIGN.md: top-level folders are `msa` subpackages without
`__init__.py`, so the standard library's `platform` is never shadowed from the repository root."""
from __future__ import annotations

import subprocess
import sys

import pytest

PACKAGE_FOLDERS = ("platform", "models", "ensembles", "search_spaces")


@pytest.mark.parametrize("folder", PACKAGE_FOLDERS)
def test_no_init_file(folder, repo_root):
    assert not (repo_root / folder / "__init__.py").exists()


@pytest.mark.parametrize(
    "code",
    [
        "import platform; platform.system()",
        "import platform, torch, ray, deepspeed; platform.system()",
        "import msa.platform.cli, msa.models.registry; import platform; platform.machine()",
    ],
)
def test_imports_from_repository_root(code, repo_root):
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
