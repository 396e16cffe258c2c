"""`ray_cluster.yaml`, the cluster-launcher config the cluster section of docs/guides/sweeps.md starts: it passes
Ray's own schema, and the schema check is real (a field no node type has is refused)."""
from __future__ import annotations

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


def test_ray_cluster_config_passes_rays_schema(repo_root):
    config = yaml.safe_load((repo_root / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))
    config["available_node_types"]["gpu_worker"]["gpus"] = 4  # not a field of a node type
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))
