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


def test_sixteen_bit_images_are_scaled_to_eight_bits(tmp_path):
    # torchvision decodes 16-bit PNGs as uint16 and PIL's convert clips 16-bit grey at 255:
    # either way the network saw values far outside [0, 1] before
    cv2 = pytest.importorskip("cv2")
    grey = (np.arange(60 * 70).reshape(60, 70) * 15).astype(np.uint16)
    expected = torch.from_numpy(np.round(grey.astype(np.float64) * 255 / 65535).astype(np.uint8))
    Image.fromarray(grey).save(tmp_path / "grey16.png")  # torchvision's decoder
    Image.fromarray(grey).save(tmp_path / "grey16.tif")  # PIL's, mode I;16
    colour = np.stack([grey, grey // 2, 65535 - grey], axis=-1)
    cv2.imwrite(str(tmp_path / "rgb16.png"), colour[..., ::-1])  # 48-bit PNG (OpenCV writes BGR)
    for name in ("grey16.png", "grey16.tif"):
        pixels = decode_rgb(tmp_path / name)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 60, 70), name
        assert all(torch.equal(plane, expected) for plane in pixels), name
        assert torch.equal(read_image(tmp_path / name, channels=1)[0], expected.float() / 255), name
    pixels = decode_rgb(tmp_path / "rgb16.png")
    assert pixels.dtype == torch.uint8
    assert torch.equal(pixels[0], expected) and torch.equal(pixels[2], 255 - expected)
    assert float(read_image(tmp_path / "rgb16.png").max()) <= 1.0


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


def test_a_folder_without_images_of_its_own_is_an_error_that_names_the_subfolders_with_some(tmp_path):
    for city in ("berlin", "bonn"):
        (tmp_path / "val" / city).mkdir(parents=True)
        (tmp_path / "val" / city / f"{city}_0.png").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"folder .*val holds no image files .*its subfolders berlin, bonn do: give them"):
        list_images([tmp_path / "val"])
    with pytest.raises(FileNotFoundError, match=r"folder .*empty holds no image files \(\.png"):
        list_images([tmp_path / "val" / "berlin", tmp_path / "empty"])
    assert [p.name for p in list_images(sorted((tmp_path / "val").iterdir()))] == ["berlin_0.png", "bonn_0.png"]


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])  # torchvision's decoders, and PIL's
def test_images_are_read_as_shown_with_their_exif_orientation_applied(tmp_path, suffix):
    from seglab.data.files import FileDataset
    from seglab.data.io import shown_size

    # stored 24 wide, 12 high, left half black, right half white; orientation 6: shown turned a
    # quarter clockwise, 12 wide and 24 high, the white half at the bottom
    stored = np.zeros((12, 24, 3), np.uint8)
    stored[:, 12:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(stored).save(path, exif=exif, **({"quality": 100} if suffix != ".png" else {}))
    image = read_image(path)
    assert image.shape == (3, 24, 12)
    assert image[:, :10].mean() < 0.05 and image[:, 14:].mean() > 0.95
    assert read_image(path, channels=1).shape == (1, 24, 12)
    with Image.open(path) as picture:
        assert shown_size(picture) == (12, 24)
    assert FileDataset([(path, path)], ["a", "b"], [(0, 0, 0), (1, 1, 1)], None).image_sizes() == [(12, 24)]
    plain = tmp_path / f"plain{suffix}"
    Image.fromarray(stored).save(plain)
    assert read_image(plain).shape == (3, 12, 24)
