"""DeepSpeed around a model: the import, the process group, the engine's config, its weights.

Runs wherever `train_loop` runs: the `msa train` process, a Tune trial actor (one-worker
trials) or a Ray Train worker. DeepSpeed is imported by `import_deepspeed` only, never at module
level: its accelerator is chosen at import from ``DS_ACCELERATOR``, which must be set first.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch

from msa.platform.core.compat import skip_shared_memory_op
from msa.platform.core.errors import MsaError
from msa.platform.training.config import TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(precision: str, use_cuda: bool) -> str:
    """``auto`` as bf16 on GPU and fp32 on CPU; bf16 without a GPU is refused."""
    resolved = precision if precision != "auto" else ("bf16" if use_cuda else "fp32")
    if resolved == "bf16" and not use_cuda:
        raise MsaError("precision bf16 needs a GPU here; use precision=fp32 (or auto) on CPU")
    return resolved


def import_deepspeed(use_cuda: bool):
    """Import DeepSpeed for this device, quietly, without its JIT-built shared-memory op."""
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    skip_shared_memory_op()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def ensure_process_group(deepspeed, use_cuda: bool) -> None:
    """Join the existing process group (Ray Train) or make a one-rank group for in-process runs.

    The one-rank group uses an in-memory store: no port, and no MASTER_* variables left in the
    environment for child processes to inherit."""
    if not torch.distributed.is_initialized():
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
        )
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)


def deepspeed_config(config: TrainConfig, precision: str) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """The whole model's weights as float32 CPU tensors (gathered from every rank under ZeRO-3)."""
    if zero_stage == 3:
        deepspeed = import_deepspeed(torch.cuda.is_available())
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            state = {k: v.clone() for k, v in engine.module.state_dict().items()}
    else:
        state = engine.module.state_dict()
    return {k: v.detach().float().cpu() for k, v in state.items()}
