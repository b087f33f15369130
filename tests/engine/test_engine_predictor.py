"""Predictor: input kinds, folders, sliding-window inference and test-time augmentation."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from seglab.engine.predictor import Predictor, output_stems
from seglab.engine.sliding import blend_window, sliding_window, tile_starts
from seglab.models import create_model

CONFIG = {"classes": ["a", "b", "c"], "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]], "mean": [0.5] * 3,
          "std": [0.25] * 3, "kwargs": {"in_channels": 3}}


class TinyConvNet(nn.Module):
    """One 3x3 convolution (receptive field 3x3): fully convolutional, fast on 12 megapixels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(3, 3, 3, padding=1)
        self.largest_input = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.largest_input = max(self.largest_input, x.numel())
        return self.body(x)


def test_file_numpy_pil_and_tensor_inputs_agree(tmp_path: Path) -> None:
    predictor = Predictor(TinyConvNet(), CONFIG, device="cpu")
    array = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    from_numpy = predictor.predict(array)
    assert from_numpy.shape == (20, 30) and from_numpy.dtype == torch.int64
    assert torch.equal(predictor.predict(Image.fromarray(array)), from_numpy)
    Image.fromarray(array).save(tmp_path / "photo.png")
    assert torch.equal(predictor.predict(tmp_path / "photo.png"), from_numpy)
    assert torch.equal(predictor.predict(str(tmp_path / "photo.png")), from_numpy)
    with pytest.raises(ValueError, match="cannot predict on a int; give an image file, a PIL image"):
        predictor.predict(3)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    assert torch.equal(predictor.predict(tensor), from_numpy)
    assert torch.equal(predictor.predict(tensor[None].repeat(2, 1, 1, 1))[1], from_numpy)
    probabilities = predictor.predict_proba(array)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(20, 30))
    with pytest.raises(ValueError, match="expected an image with 3 channels"):
        predictor.predict(torch.rand(1, 20, 30))


def test_every_pixel_type_is_read_on_its_own_scale_or_refused() -> None:
    predictor = Predictor(TinyConvNet(), CONFIG, device="cpu")
    array = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    probabilities = predictor.predict_proba(array)
    same = {
        "uint16": array.astype(np.uint16) * 257,  # 0..65535
        "uint8 tensor": torch.from_numpy(array).permute(2, 0, 1),
        "RGBA": np.concatenate([array, np.full((20, 30, 1), 255, np.uint8)], axis=2),
        "PIL RGBA": Image.fromarray(array).convert("RGBA"),
    }
    for name, image in same.items():
        torch.testing.assert_close(predictor.predict_proba(image), probabilities, msg=name)
    grey = array[..., 0]  # repeated for a colour model, as a grey file is read
    torch.testing.assert_close(predictor.predict_proba(grey), predictor.predict_proba(np.repeat(grey[..., None], 3, axis=2)))
    # 16-bit grey through PIL: scaled, not clipped at 255 as PIL's own convert would
    torch.testing.assert_close(predictor.predict_proba(Image.fromarray(grey.astype(np.uint16) * 257)),
                               predictor.predict_proba(grey))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\] \(got 0\.\.255\)"):
        predictor.predict(array.astype(np.float32))  # 0..255 floats: garbage before, refused now
    with pytest.raises(ValueError, match="not torch.int64"):
        predictor.predict(array.astype(np.int64))


def test_tiles_cover_the_image_and_the_window_ramps() -> None:
    assert tile_starts(100, 40, 30) == [0, 30, 60]
    assert tile_starts(30, 40, 30) == [0]
    window = blend_window(8, 8, 2, 2)
    assert float(window[4, 4]) == 1.0 and float(window[0, 0]) == pytest.approx(1 / 9)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window(lambda t: t, torch.rand(1, 3, 8, 8), 4, overlap=1.0)


def test_sliding_window_matches_whole_image_inference_of_a_unet() -> None:
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, in_channels=3, base_channels=4, depth=3).eval()
    image = torch.rand(3, 200, 260)
    whole = Predictor(model, CONFIG, device="cpu").predict_proba(image)
    tiled = Predictor(model, CONFIG, device="cpu", tile=96, overlap=0.5, tile_batch=3).predict_proba(image)
    agreement = float((whole.argmax(0) == tiled.argmax(0)).float().mean())
    assert agreement > 0.995, agreement
    assert float((whole - tiled).abs().mean()) < 0.01


def test_a_4000x3000_image_is_predicted_in_tiles_with_bounded_model_input() -> None:
    torch.set_num_threads(1)
    model = TinyConvNet().eval()
    predictor = Predictor(model, CONFIG, device="cpu", tile=512, overlap=0.125, tile_batch=2)
    image = torch.rand(3, 3000, 4000)
    mask = predictor.predict(image)
    assert mask.shape == (3000, 4000)
    assert model.largest_input <= 2 * 3 * 512 * 512  # the model never saw more than one tile batch
    # Tiles differ from the whole image only where a tile's zero padding enters its 3x3 field,
    # and those edge pixels carry little weight in the blend.
    crop = image[:, 900:1500, 1200:2000]
    reference = Predictor(model, CONFIG, device="cpu").predict(crop)
    assert float((mask[900:1500, 1200:2000] == reference)[1:-1, 1:-1].float().mean()) > 0.999


def test_tta_averages_probabilities_of_flipped_and_scaled_views() -> None:
    model = TinyConvNet().eval()
    image = torch.rand(3, 32, 48)
    plain = Predictor(model, CONFIG, device="cpu")
    flipped = plain.predict_proba(image.flip(-1)).flip(-1)
    tta = Predictor(model, CONFIG, device="cpu", tta_flips=["h"]).predict_proba(image)
    torch.testing.assert_close(tta, (plain.predict_proba(image) + flipped) / 2)
    multi = Predictor(model, CONFIG, device="cpu", tta_flips=["h", "v"], tta_scales=[0.5, 1.0]).predict_proba(image)
    assert multi.shape == (3, 32, 48)
    torch.testing.assert_close(multi.sum(0), torch.ones(32, 48))
    with pytest.raises(ValueError, match="tta-flips"):
        Predictor(model, CONFIG, device="cpu", tta_flips=["x"])


def test_predict_files_batches_a_folder_and_names_duplicates_apart(tmp_path: Path) -> None:
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        for index, size in enumerate([(20, 30), (20, 30), (24, 16)]):
            array = np.random.default_rng(index).integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / folder / f"img{index}.png")
    predictor = Predictor(TinyConvNet(), CONFIG, device="cpu", batch_size=2)
    written = predictor.predict_files([tmp_path / "one", tmp_path / "two"], tmp_path / "out")
    assert len(written) == len(set(written)) == 12
    mask = np.asarray(Image.open(tmp_path / "out" / "two_img2_mask.png"))
    assert mask.shape == (24, 16)
    expected = predictor.predict(Image.open(tmp_path / "two" / "img2.png"))
    assert np.array_equal(mask, expected.numpy())
    assert output_stems([Path("a/x.png"), Path("b/x.png"), Path("a/y.png")]) == ["a_x", "b_x", "y"]


def test_a_large_image_predicted_whole_gets_one_warning_naming_tile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import seglab.engine.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "WHOLE_IMAGE_PIXELS", 20 * 30 - 1)  # the 20 x 30 images are "large"
    for index, size in enumerate([(20, 30), (20, 30), (10, 10)]):
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(tmp_path / f"img{index}.png")
    with pytest.warns(UserWarning, match=r"img0.png is 30 x 20 pixels, predicted whole: .*--tile 1024") as caught:
        Predictor(TinyConvNet(), CONFIG, device="cpu").predict_files([tmp_path], tmp_path / "out", overlays=False)
    assert sum("predicted whole" in str(w.message) for w in caught) == 1  # once per job, not per image
    with warnings.catch_warnings(record=True) as tiled:  # tiled: no warning of the size
        warnings.simplefilter("always")
        Predictor(TinyConvNet(), CONFIG, device="cpu", tile=16).predict_files([tmp_path], tmp_path / "tiled", overlays=False)
    assert not any("predicted whole" in str(w.message) for w in tiled)


def test_ranks_predict_disjoint_shards_that_cover_the_folder(tmp_path: Path) -> None:
    for index in range(7):
        Image.fromarray(np.full((8, 8, 3), index * 30, np.uint8)).save(tmp_path / f"{index}.png")
    predictor = Predictor(TinyConvNet(), CONFIG, device="cpu")
    shards = [set(predictor.predict_files([tmp_path], tmp_path / "out", rank=r, world_size=3)) for r in range(3)]
    assert all(not (a & b) for i, a in enumerate(shards) for b in shards[i + 1 :])
    assert set().union(*shards) == set((tmp_path / "out").iterdir())
    assert len(set().union(*shards)) == 2 * 7
