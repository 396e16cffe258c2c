"""Every private API of Ray, Optuna, MLflow, DeepSpeed and transformers that msa touches, each
behind one function, with the version it was checked on. When an upgrade breaks one, it breaks here.

Each function imports its library when called (this module sits in `core`, below the layers
that import those libraries). Checked on Ray 2.60.0, Optuna 5.0.0, MLflow 3.17.2, DeepSpeed 0.19.8,
transformers 5.24.0.
"""
from __future__ import annotations

import functools
import importlib
from pathlib import Path

# --- Ray 2.60.0 -----------------------------------------------------------------------------

def ray_train_session_dir() -> Path:
    """The driver's Ray Train session folder, where Tune stages a fit's driver artifacts (a
    failed trial's error.txt lands there before the searcher hears of the failure)."""
    from ray.train.constants import _get_ray_train_session_dir

    return Path(_get_ray_train_session_dir())


def ray_logs_dir() -> Path:
    """The log folder of the Ray session this process started (every Ray process's output)."""
    from ray._private.worker import _global_node

    return Path(_global_node.get_logs_dir_path())


def restored_run_config(tuner):
    """The RunConfig a `Tuner.restore`d tuner will run with (Tuner.restore takes no callbacks,
    so the restored run config is edited in place)."""
    return tuner._local_tuner.get_run_config()


def present_cluster_token() -> None:
    """Send this machine's Ray auth token, as `ray start` does (a driver sends none unless
    RAY_AUTH_MODE=token is set)."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def forget_missing_checkpoint(trial) -> str | None:
    """Make a restored Tune trial start over when the checkpoint its saved state names is gone;
    returns that checkpoint's path (None when it exists, or the trial has none).

    Tune deletes a trial's previous checkpoint (``num_to_keep``) the moment a new one registers,
    and saves the experiment state naming the new one a moment later (about 1% of a sweep's
    time lies in between, measured): a driver killed in between leaves a state naming a deleted
    checkpoint, and restoring from it fails on every retry ("does not exist on storage anymore")."""
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.storage import _exists_at_fs_path

    manager = trial.run_metadata.checkpoint_manager
    latest = manager.latest_checkpoint_result
    if latest is None or _exists_at_fs_path(latest.checkpoint.filesystem, latest.checkpoint.path):
        return None
    trial.run_metadata.checkpoint_manager = _CheckpointManager(checkpoint_config=manager.checkpoint_config)
    trial.run_metadata.invalidate_cache()
    return latest.checkpoint.path


def unregistered_checkpoints(trial) -> list[Path]:
    """The ``checkpoint_*`` folders of a Tune trial newer than the last one Tune registered: what
    an upload that failed half-way (a full disk) leaves. Tune never reads them; a retry would
    upload into the same folder over what is there."""
    manager = trial.run_metadata.checkpoint_manager
    latest = manager.latest_checkpoint_result
    newest = Path(latest.checkpoint.path).name if latest is not None else ""
    folder = Path(trial.storage.trial_fs_path)
    return sorted(path for path in folder.glob("checkpoint_*") if path.is_dir() and path.name > newest)


def autoscaler_node_groups() -> list:
    """The node groups of the cluster config the autoscaler registered (empty when none)."""
    from ray._private.state import state

    config = state.get_cluster_config()
    return list(config.node_group_configs) if config is not None else []


# --- Ray Tune's OptunaSearch (Ray 2.60.0) and Optuna 5.0.0 -----------------------------------

def searcher_trials(searcher) -> dict:
    """OptunaSearch's Ray trial id -> `optuna.trial.Trial` it asked for."""
    return searcher._ot_trials


def searcher_study(searcher):
    """The `optuna.Study` an OptunaSearch drives."""
    return searcher._ot_study


def searcher_completed(searcher) -> set:
    """The Ray trial ids OptunaSearch has already told the study about."""
    return searcher._completed_trials


def storage_id(trial) -> int:
    """A trial's id in its study's storage (a `FrozenTrial` or a live `Trial`)."""
    return trial._trial_id


def stored_trial(study, trial_id: int):
    """The storage's current record of trial `trial_id` (fresh, not the study's cached copy)."""
    return study._storage.get_trial(trial_id)


def live_trial(study, trial_id: int):
    """A live `optuna.trial.Trial` for a trial already in the storage (Optuna documents the
    constructor as internal: trials come from `study.ask`)."""
    import optuna

    return optuna.trial.Trial(study, trial_id)


# --- MLflow 3.17.2 --------------------------------------------------------------------------

@functools.cache
def untyped_python_model() -> type:
    """A `PythonModel` base whose subclasses' `predict` MLflow does not wrap for type-hint
    validation: their signature describes the input, and MLflow would warn that type hints
    are missing. Importable as ``msa.platform.core.compat.UntypedPythonModel`` (see
    `__getattr__`), so a pickled model names it instead of carrying a copy."""
    import mlflow.pyfunc

    base = type("UntypedPythonModel", (mlflow.pyfunc.PythonModel,), {"_skip_type_hint_validation": True})
    base.__module__ = __name__
    return base


def __getattr__(name: str):
    """`UntypedPythonModel`, made (with MLflow imported) on first use."""
    if name == "UntypedPythonModel":
        return untyped_python_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def forget_artifact_repositories() -> None:
    """Drop MLflow's process-wide cache of each run's artifact repository. Each entry keeps the
    server address it was made with, so a process that meets a run again through a server on
    another port (a sweep resumed in the same process, its own server restarted on a new free
    port) would upload that run's artifacts to the old address, retrying for minutes."""
    from mlflow.tracking._tracking_service import utils

    utils._artifact_repos_cache.clear()


# --- DeepSpeed 0.19.8 -----------------------------------------------------------------------

def skip_shared_memory_op() -> None:
    """Stop every `init_distributed` from JIT-compiling DeepSpeed's inference-only shared-memory
    op (about 40 s on a new machine). `import deepspeed.comm.torch as m` would bind another
    module of that name, hence importlib."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


# --- transformers 5.24.0 --------------------------------------------------------------------

def bidirectional_attention_mask(config, hidden, attention_mask):
    """The mask a BERT-family layer takes, from a ``(B, L)`` 0/1 attention mask: what the
    model's own forward builds before its first layer, needed to run its layers one by one
    (the frozen-prefix cache runs the lower ones once and the upper ones in training)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
