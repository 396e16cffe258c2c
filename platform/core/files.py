"""Files written safely and fingerprinted: atomic writes, SHA-256 digests, JSON without NaN.

Every file msa writes for a user (datasets, checkpoints, leaderboards, summaries) goes through
`atomic_write` or a staged folder, so a crash or a Ctrl-C never leaves half a file.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` then rename onto `path`, so a failure leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        write(Path(tmp_name))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def sha256_path(path: str | Path) -> str:
    """SHA-256 of a file (of every file, in name order, for a folder): data fingerprints, weight hashes."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def finite_or_none(value: Any) -> Any:
    """`value` with NaN and infinite floats as None (JSON has no NaN) and numpy scalars made
    plain, recursively through mappings and sequences.

    Example:
        >>> finite_or_none({"mae": 0.5, "acc2_non0": float("nan"), "per_class": [1.0, float("inf")]})
        {'mae': 0.5, 'acc2_non0': None, 'per_class': [1.0, None]}
    """
    if isinstance(value, dict):
        return {str(k): finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if hasattr(value, "item"):  # a numpy scalar
        return finite_or_none(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def human_bytes(nbytes: float) -> str:
    """``512 B``, ``1.5 KiB``, ... ``3.2 GiB``."""
    units, power = ("B", "KiB", "MiB", "GiB"), 0
    while nbytes >= 1024 and power < len(units) - 1:
        nbytes, power = nbytes / 1024, power + 1
    return f"{nbytes:.0f} B" if power == 0 else f"{nbytes:.1f} {units[power]}"
