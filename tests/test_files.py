"""Atomic writes: readers see the old file or the whole new one, with the permissions a plain
open() would give it."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglab.files import PICTURE_COMPRESS_LEVEL, atomic_write, atomic_write_png, atomic_write_text


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


def test_png_writes_take_arrays_and_images_and_read_back_the_same_pixels(tmp_path: Path) -> None:
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    labels = np.array([[0, 1], [300, 65535]], dtype=np.uint16)  # instance maps go past 255
    palette = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    for name, picture in (("rgb.png", rgb), ("labels.png", labels), ("palette.png", palette)):
        atomic_write_png(tmp_path / name, picture)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "rgb.png")), rgb)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "labels.png")), labels)
    with Image.open(tmp_path / "palette.png") as read:
        assert read.mode == "P" and np.array_equal(np.asarray(read), np.asarray(palette))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.png", "palette.png", "rgb.png"]


def test_pictures_are_written_losslessly_at_the_faster_level(tmp_path: Path) -> None:
    noisy = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)  # photographs barely compress
    default = atomic_write_png(tmp_path / "default.png", noisy)
    fast = atomic_write_png(tmp_path / "fast.png", noisy, compress_level=PICTURE_COMPRESS_LEVEL)
    assert PICTURE_COMPRESS_LEVEL < 6
    assert np.array_equal(np.asarray(Image.open(fast)), noisy) and np.array_equal(np.asarray(Image.open(default)), noisy)
