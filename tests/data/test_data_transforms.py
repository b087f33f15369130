"""Joint augmentation: image and mask stay aligned, masks keep their labels, padding is ignore."""
from __future__ import annotations

import pytest
import torch

from seglab.data.transforms import DEFAULT_TRAIN_AUGMENT, build_transform, image_size_pair


def _blocky_sample(height: int = 48, width: int = 64) -> dict[str, torch.Tensor]:
    """Blocks of labels 1..4 whose image encodes the label (red = 40 x label), so alignment is checkable."""
    rows = torch.arange(height)[:, None] * 2 // height
    cols = torch.arange(width)[None, :] * 2 // width
    mask = (1 + rows * 2 + cols).long()
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[0] = (40 * mask).to(torch.uint8)
    image[1] = 200
    return {"image": image, "mask": mask}


@pytest.mark.parametrize("augment", [{"scale": [0.5, 2.0], "hflip": 0.5, "vflip": 0.5}, {"rotation": 30, "hflip": 1.0}])
def test_geometry_moves_image_and_mask_together(augment):
    torch.manual_seed(0)
    transform = build_transform(augment, [32, 40], train=True)
    for _ in range(6):
        out = transform(_blocky_sample())
        image, mask = out["image"], out["mask"]
        assert image.dtype == torch.float32 and mask.dtype == torch.int64
        assert image.shape == (3, 32, 40) and mask.shape == (32, 40)
        assert set(mask.unique().tolist()) <= {1, 2, 3, 4, 255}  # nearest: no invented labels
        labelled = mask != 255
        red = image[0][labelled] * 255
        agree = (red - 40 * mask[labelled]).abs() < 6
        # only interpolated block borders may disagree; a mask moved apart from its image
        # (e.g. flipped alone) would disagree almost everywhere
        assert agree.float().mean() > 0.8
        padded = ~labelled
        if padded.any():  # padding is black in the image and ignore in the mask
            assert (image[1][padded] < 0.5).float().mean() > 0.9


def test_downscale_pads_with_ignore():
    torch.manual_seed(0)
    transform = build_transform({"scale": [0.25, 0.25]}, [48, 64], train=True)
    mask = transform(_blocky_sample())["mask"]
    assert (mask == 255).float().mean() > 0.8


def test_evaluation_only_resizes_and_keeps_native_size_without_target():
    sample = _blocky_sample()
    resized = build_transform(None, 24, train=False)(sample)
    assert resized["image"].shape == (3, 24, 24) and set(resized["mask"].unique().tolist()) <= {1, 2, 3, 4}
    native = build_transform(DEFAULT_TRAIN_AUGMENT, None, train=False)(sample)
    assert torch.equal(native["mask"], sample["mask"])
    assert torch.allclose(native["image"], sample["image"].float() / 255)


def test_default_training_augmentation_without_size_keeps_the_shape():
    torch.manual_seed(0)
    out = build_transform(None, None, train=True)(_blocky_sample())
    assert out["image"].shape == (3, 48, 64) and 0.0 <= out["image"].min() and out["image"].max() <= 1.0


def test_colour_jitter_changes_only_the_image():
    torch.manual_seed(0)
    sample = _blocky_sample()
    out = build_transform({"color_jitter": {"brightness": 0.5, "hue": 0.1}}, None, train=True)(sample)
    assert torch.equal(out["mask"], sample["mask"])
    assert not torch.allclose(out["image"], sample["image"].float() / 255)


@pytest.mark.parametrize(
    ("augment", "size", "message"),
    [
        ({"flip": 0.5}, 32, "unknown augment option"),
        ({"scale": [2.0, 1.0]}, 32, "'scale'"),
        ({"scale": [0.5, 2.0]}, None, "needs image_size"),
        ({"color_jitter": "strong"}, 32, "color_jitter"),
        ("heavy", 32, "mapping"),
        # torchvision takes these without a word: a flip "probability" of 2, a negative angle
        ({"hflip": 2}, 32, "'hflip' must be a probability between 0 and 1, not 2"),
        ({"vflip": True}, 32, "'vflip' must be a probability"),
        ({"rotation": -5}, 32, "'rotation' must be a number from 0 to 180"),
        ({"color_jitter": {"hue": 0.9}}, 32, "'color_jitter.hue' must be a number from 0 to 0.5"),
        ({"color_jitter": {"brightness": "x"}}, 32, "'color_jitter.brightness' must be a number of at least 0"),
        ({"scale": [0.5, "x"]}, 32, "'scale' must be \\[low, high\\]"),
    ],
)
def test_bad_configs_are_refused(augment, size, message):
    with pytest.raises(ValueError, match=message):
        build_transform(augment, size, train=True)(_blocky_sample())


def test_image_size_forms():
    assert image_size_pair(32) == (32, 32) and image_size_pair([18, 24]) == (18, 24) and image_size_pair(None) is None
    with pytest.raises(ValueError, match="image_size"):
        image_size_pair([1, 2, 3])
