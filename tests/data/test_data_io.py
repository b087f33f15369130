"""Image reading shared by the data sets and the predictor."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from seglab.data.io import decode_rgb, images_in, list_images, read_image


def test_read_image_channels_and_range(tmp_path):
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb = read_image(tmp_path / "a.png")
    assert rgb.shape == (3, 4, 5) and rgb.dtype == torch.float32
    assert torch.equal(rgb, decode_rgb(tmp_path / "a.png").float() / 255)
    assert torch.all(rgb[0] == 1.0) and torch.all(rgb[1:] == 0.0)
    grey = read_image(tmp_path / "a.png", channels=1)
    assert grey.shape == (1, 4, 5) and 0 < float(grey.max()) < 1  # L = 0.299 R
    alpha = read_image(tmp_path / "a.png", channels=4)[3]
    assert torch.allclose(alpha, torch.full((4, 5), 128 / 255))
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        read_image(tmp_path / "a.png", channels=2)


def test_bad_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg is not a readable image"):
        decode_rgb(tmp_path / "broken.jpg")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        list_images([tmp_path / "missing.png"])


def test_listing_folders_and_files(tmp_path):
    for name in ("b.png", "a.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()  # a folder named like an image is not an image
    assert [p.name for p in images_in(tmp_path)] == ["a.JPG", "b.png"]
    assert [p.name for p in list_images([tmp_path / "notes.txt", tmp_path])] == ["notes.txt", "a.JPG", "b.png"]
