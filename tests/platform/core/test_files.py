"""`core.files`: SHA-256 fingerprints of files and folders (atomic writes are exercised by every
writer's test: datasets, checkpoints, leaderboards)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from msa.platform.core.files import sha256_path


def test_sha256_path_matches_hashlib(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 5000  # > 1 MiB, so it is hashed in several blocks
    path = tmp_path / "weights.bin"
    path.write_bytes(payload)
    assert sha256_path(path) == hashlib.sha256(payload).hexdigest()
    assert sha256_path(str(path)) == hashlib.sha256(payload).hexdigest()


def test_sha256_path_of_a_folder_hashes_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.bin").write_bytes(b"second")
    (tmp_path / "a.bin").write_bytes(b"first")
    assert sha256_path(tmp_path) == hashlib.sha256(b"firstsecond").hexdigest()
