"""Saved files get the permissions of any file the user writes (umask), not mkstemp's private 0600."""

from __future__ import annotations

import os
import stat

from hf_kadapter.utils.io import save_tensors_atomic, write_json_atomic


def test_atomic_writes_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"a": 1})
        save_tensors_atomic(tmp_path / "b.safetensors", {})
    finally:
        os.umask(previous)
    for name in ("a.json", "b.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
