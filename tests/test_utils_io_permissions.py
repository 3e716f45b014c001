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


def test_atomic_writes_never_set_the_process_umask(tmp_path, monkeypatch):
    """os.umask sets the mask for every thread: a file another thread creates meanwhile would be world-writable."""

    def forbidden(mask):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", forbidden)
    write_json_atomic(tmp_path / "a.json", {"a": 1})
    save_tensors_atomic(tmp_path / "b.safetensors", {})
    assert (tmp_path / "a.json").is_file() and (tmp_path / "b.safetensors").is_file()


def test_a_temporary_file_removed_by_a_recovery_before_its_lock_is_made_again(tmp_path, monkeypatch):
    """recover_folder deletes unlocked temporary files (a dead writer's); between a temporary file's creation and its
    lock a live one looks the same: the writer must notice, not fail at the rename (FileNotFoundError)."""
    import hf_kadapter.utils.io as shared_io

    real_flock, removed = shared_io.fcntl.flock, []

    def flock_after_a_recovery(handle, operation):
        if not removed:  # the first temporary file, not locked yet: a concurrent recovery gets there first
            removed.extend(tmp_path.glob(".a.json-*.tmp"))
            shared_io._clean_stagings(tmp_path)
            assert not removed[0].exists()
        return real_flock(handle, operation)

    monkeypatch.setattr(shared_io.fcntl, "flock", flock_after_a_recovery)
    write_json_atomic(tmp_path / "a.json", {"a": 1})
    assert removed and (tmp_path / "a.json").read_text().strip().startswith("{")
    assert not list(tmp_path.glob("*.tmp"))
