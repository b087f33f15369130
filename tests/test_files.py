"""Atomic writes: readers see the old file or the whole new one, with the permissions a plain
open() would give it."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from seglab.files import atomic_write, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_permissions_of_the_umask_not_the_temporary_files(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        written = atomic_write_text(tmp_path / "a.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o666 & ~umask


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "result.txt", "old")

    def fail(temporary: Path) -> None:
        temporary.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_a_file_that_cannot_be_written_is_one_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"^cannot write .*a-file/out\.json: .*a-file is not a folder$"):
        atomic_write_text(blocker / "out.json", "{}")
    with pytest.raises(ValueError, match=r"^cannot write .*a-file/deeper/out\.json: Not a directory$"):
        atomic_write_text(blocker / "deeper" / "out.json", "{}")
