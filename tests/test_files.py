"""Outputs are written atomically, and an unwritable output is refused before any work."""

from __future__ import annotations

import os

import pytest

from amortized.files import check_writable, write_atomic


def test_write_atomic_replaces_the_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "report.md"
    write_atomic(path, "old")
    write_atomic(path, "new ünïcode")
    assert path.read_text() == "new ünïcode"
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_atomic(path, "complete")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "x" * 10_000)
    assert path.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_check_writable_names_what_is_wrong(tmp_path):
    check_writable(tmp_path / "new.json")  # a new file in an existing directory
    with pytest.raises(ValueError, match="does not exist"):
        check_writable(tmp_path / "missing" / "x.json", "--output")
    with pytest.raises(ValueError, match="is a directory"):
        check_writable(tmp_path, "--output")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            check_writable(locked / "x.json")
