"""A split on the device, the task loss, and prediction over whole splits.

Runs wherever `train_loop` runs, and in the process that serves a registered model: the pyfunc
predicts through `predict` too, so it reproduces a checkpoint's stored predictions exactly.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from msa.platform.data.features import Split


class SplitTensors:
    """A split's arrays moved to the device once; batches are index selections, not copies from disk.

    On a CPU, float16 arrays (the text cache's memory-mapped prefixes) stay float16 and shared
    with the file: only the rows of a batch are read and cast to the run's precision, so a trial
    never holds a float32 copy of a prefix, and trials on one node share its pages."""

    def __init__(self, split: Split, device: torch.device, dtype: torch.dtype, task: str):
        label_dtype = torch.float32 if task == "regression" else torch.long
        self.dtype = dtype
        with warnings.catch_warnings():
            # Arrays from Ray's object store and the text cache are read-only; these tensors are
            # only ever indexed (a copy), never written, so sharing the memory is safe.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.features = {m: torch.as_tensor(a, device=device, dtype=_stored_dtype(a, dtype, device))
                             for m, a in split.features.items()}
            self.lengths = {m: torch.as_tensor(a, device=device) for m, a in split.lengths.items()}
            self.labels = torch.as_tensor(split.labels, device=device, dtype=label_dtype)
        self.size = len(split)

    def batch(self, index: torch.Tensor):
        return (
            {m: as_run_dtype(x[index], self.dtype) for m, x in self.features.items()},
            {m: n[index] for m, n in self.lengths.items()},
            self.labels[index],
        )


def _stored_dtype(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Token ids stay integers; features take the run's precision, but float16 stays float16 on a CPU."""
    if array.dtype.kind != "f":
        return torch.long
    return torch.float16 if array.dtype == np.float16 and device.type == "cpu" else dtype


def as_run_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if x.dtype == torch.float16 and dtype != torch.float16 else x


def task_loss(prediction: torch.Tensor, labels: torch.Tensor, task: str, regression_loss: str) -> torch.Tensor:
    prediction = prediction.float()
    if task == "classification":
        return F.cross_entropy(prediction, labels)
    return F.l1_loss(prediction, labels) if regression_loss == "l1" else F.mse_loss(prediction, labels)


@torch.no_grad()
def predict(engine, features: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor], task: str,
            batch_size: int, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Predictions for whole split arrays: ``(N,)`` scores or ``(N, C)`` class probabilities.

    `engine` is a DeepSpeed engine or a plain model in eval mode; float16 features are cast to
    `dtype`, the run's precision, batch by batch (see `SplitTensors`)."""
    engine.eval()
    outputs = []
    size = len(next(iter(features.values())))
    for start in range(0, size, batch_size):
        part = slice(start, start + batch_size)
        prediction = engine({m: as_run_dtype(x[part], dtype) for m, x in features.items()},
                            {m: n[part] for m, n in lengths.items()}).prediction.float()
        outputs.append(prediction.softmax(-1) if task == "classification" else prediction)
    return torch.cat(outputs).cpu().numpy()
