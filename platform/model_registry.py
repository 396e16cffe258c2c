"""Where msa-sweep 0.1.0 defined the registered-model class: its pyfunc pickles name
``msa.platform.model_registry.CheckpointModel``, so the models it registered load through this
name. Nothing else lives here; the class is `msa.platform.tracking.registry.CheckpointModel`.
"""
from msa.platform.tracking.registry import CheckpointModel

__all__ = ["CheckpointModel"]
