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


def test_ray_cluster_config_passes_rays_schema(repo_root):
    import jsonschema
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((repo_root / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))
    config["available_node_types"]["gpu_worker"]["gpus"] = 4  # not a field of a node type
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))
