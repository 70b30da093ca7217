"""Atomic outputs: all or nothing, and readable by others like any ordinary file."""

import os

import pytest

from paperlib.atomic import atomic_path, write_text


def test_written_file_has_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}" and (path.stat().st_mode & 0o777) == 0o644


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text(tmp_path / "numbers.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["numbers.json"]
