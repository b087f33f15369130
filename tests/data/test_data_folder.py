"""The folder format: index, palette and RGB colour-coded masks, split lists, hold-out split."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from seglab.data import FolderDataset, detect_format, open_dataset
from seglab.data.files import UNDEFINED, LabelDecoder, equal_size_batches, index_lookup
from seglab.data.io import decode_rgb


def _folder(tmp_path, helpers, rng, count=3, palette=False):
    labels_by_stem = {}
    for k in range(count):
        image, labels = helpers.pair(rng, values=(0, 1, 2, 255))
        helpers.rgb(tmp_path / "images" / f"img{k}.jpg", image)
        helpers.index(tmp_path / "masks" / f"img{k}.png", labels, palette=palette)
        labels_by_stem[f"img{k}"] = labels
    return labels_by_stem


@pytest.mark.parametrize("palette", [False, True])
def test_index_and_palette_masks_keep_their_values(tmp_path, helpers, rng, palette):
    labels = _folder(tmp_path, helpers, rng, palette=palette)
    (tmp_path / "classes.yaml").write_text("classes: [background, cat, dog]\n")
    (tmp_path / "train.txt").write_text("img0\nimg2\n")
    dataset = open_dataset(tmp_path, "train", augment=False)
    assert isinstance(dataset, FolderDataset)
    assert dataset.classes == ("background", "cat", "dog")
    assert [p[0].stem for p in dataset.pairs] == ["img0", "img2"]
    sample = dataset[1]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 12, 16)
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    assert sample["mask"].dtype == torch.int64
    assert torch.equal(sample["mask"], torch.from_numpy(labels["img2"]).long())


def test_rgb_masks_decode_through_the_colour_table(tmp_path, helpers, rng):
    colours = {"sky": (128, 128, 128), "road": (128, 64, 128), "car": (64, 0, 128)}
    (tmp_path / "classes.yaml").write_text(
        "classes:\n" + "".join(f"  {name}: [{r}, {g}, {b}]\n" for name, (r, g, b) in colours.items())
        + "ignore_colors: [[0, 0, 0]]\n"
    )
    labels = rng.integers(0, 4, size=(12, 16))  # 3 = the ignore colour
    table = np.array(list(colours.values()) + [(0, 0, 0)])
    helpers.rgb(tmp_path / "images" / "a.png", rng.integers(0, 256, size=(12, 16, 3)))
    helpers.rgb(tmp_path / "masks" / "a.png", table[labels])
    dataset = FolderDataset(tmp_path, "train")
    expected = np.where(labels == 3, 255, labels)
    assert dataset.palette == list(colours.values())
    assert torch.equal(dataset.load_mask(0), torch.from_numpy(expected))


def test_rgb_masks_without_table_are_refused(tmp_path, helpers, rng):
    helpers.rgb(tmp_path / "images" / "a.png", rng.integers(0, 256, size=(8, 8, 3)))
    helpers.rgb(tmp_path / "masks" / "a.png", rng.integers(0, 256, size=(8, 8, 3)))
    with pytest.raises(ValueError, match="classes.yaml"):
        FolderDataset(tmp_path)


def test_class_count_is_inferred_without_a_table(tmp_path, helpers, rng):
    helpers.rgb(tmp_path / "images" / "a.png", rng.integers(0, 256, size=(8, 8, 3)))
    helpers.index(tmp_path / "masks" / "a.png", np.array([[0, 4, 255, 1]] * 8)[:, :4])
    dataset = FolderDataset(tmp_path)
    assert dataset.num_classes == 5 and len(dataset.palette) == 5


def test_holdout_split_is_disjoint_and_covers_everything(tmp_path, helpers, rng):
    _folder(tmp_path, helpers, rng, count=12)
    train = {p[0].stem for p in FolderDataset(tmp_path, "train").pairs}
    val = {p[0].stem for p in FolderDataset(tmp_path, "val").pairs}
    in_name_order = sorted(f"img{k}" for k in range(12))  # img0, img1, img10, img11, img2, ...
    assert val == {in_name_order[0], in_name_order[10]} == {"img0", "img8"}
    assert not train & val and len(train | val) == 12


def test_split_subfolders_and_missing_partners(tmp_path, helpers, rng):
    for split in ("train", "val"):
        image, labels = helpers.pair(rng)
        helpers.rgb(tmp_path / "images" / split / "a.png", image)
        helpers.index(tmp_path / "masks" / split / "a.png", labels)
    helpers.rgb(tmp_path / "images" / "val" / "orphan.png", rng.integers(0, 256, size=(12, 16, 3)))
    val = FolderDataset(tmp_path, "val")
    assert len(val) == 1
    assert [p.name for p, _ in val.unpaired] == ["orphan.png"]
    with pytest.raises(FileNotFoundError, match="split list"):
        (tmp_path / "splits").mkdir()
        (tmp_path / "splits" / "train.txt").write_text("a\n")
        FolderDataset(tmp_path, "test")


def test_one_folder_per_split_is_the_folder_format_with_classes_from_every_split(tmp_path, helpers, rng):
    """root/train/images + root/train/masks, root/val/...: each split whole (no hold-out), and a
    class count inferred from all splits' masks, so train and val agree."""
    for split, count, values in (("train", 12, (0, 1)), ("val", 2, (0, 3))):
        for k in range(count):
            image, labels = helpers.pair(rng, values=values)
            helpers.rgb(tmp_path / split / "images" / f"{split}{k}.png", image)
            helpers.index(tmp_path / split / "masks" / f"{split}{k}.png", labels)
    assert detect_format(tmp_path) == "folder"
    train, val = FolderDataset(tmp_path, "train"), FolderDataset(tmp_path, "val")
    assert len(train) == 12 and len(val) == 2
    assert {p.parent.parent.name for p, _ in train.pairs} == {"train"} and {p.parent.parent.name for p, _ in val.pairs} == {"val"}
    assert train.num_classes == val.num_classes == 4
    (tmp_path / "val" / "classes.yaml").write_text("classes: [ground, a, b, c, d]\n")
    assert list(FolderDataset(tmp_path, "train").classes) == ["ground", "a", "b", "c", "d"]  # one table for all splits
    with pytest.raises(FileNotFoundError, match=r"one folder per split \(train/, val/\), none for split 'test'"):
        FolderDataset(tmp_path, "test")
    sample = open_dataset(tmp_path, split="val", image_size=8)[0]
    assert sample["image"].shape == (3, 8, 8) and set(sample["mask"].unique().tolist()) <= {0, 3}


def test_masks_named_with_a_suffix_pair_with_their_images(tmp_path, helpers, rng):
    """ISIC-style names: a.jpg with a_segmentation.png. Every mask carries the one suffix; a mask
    without it stays unpaired, and masks with their image's exact stem need no suffix."""
    for name in ("a", "b_1", "c"):
        image, labels = helpers.pair(rng)
        helpers.rgb(tmp_path / "images" / f"{name}.png", image)
        helpers.index(tmp_path / "masks" / f"{name}_segmentation.png", labels)
    dataset = FolderDataset(tmp_path, "val")
    everything = FolderDataset(tmp_path, "train").pairs + dataset.pairs
    assert sorted((i.name, m.name) for i, m in everything) == [
        ("a.png", "a_segmentation.png"), ("b_1.png", "b_1_segmentation.png"), ("c.png", "c_segmentation.png")]
    assert dataset[0]["mask"].shape == (12, 16)
    helpers.index(tmp_path / "masks" / "stray.png", helpers.pair(rng)[1])  # no suffix: the rule no longer holds
    assert FolderDataset(tmp_path, "train").pairs == [] and len(FolderDataset(tmp_path, "train").unpaired) == 7


def test_detects_folder_and_bad_class_tables(tmp_path, helpers, rng):
    _folder(tmp_path, helpers, rng, count=1)
    assert detect_format(tmp_path) == "folder"
    (tmp_path / "classes.yaml").write_text("classes: {a: [1, 2, 3], b: [1, 2, 3]}\n")
    with pytest.raises(ValueError, match="share a colour"):
        FolderDataset(tmp_path)
    (tmp_path / "classes.yaml").write_text("classes: {a: [1, 2], b: [1, 2, 4]}\n")
    with pytest.raises(ValueError, match="'a'"):
        FolderDataset(tmp_path)


def test_label_decoder_marks_unknown_values(tmp_path):
    decoder = LabelDecoder(index_lookup(3))
    raw = np.array([[0, 2, 3, 255], [1, 7, 0, 0]], np.uint8)
    assert decoder.labels(raw).tolist() == [[0, 2, UNDEFINED, 255], [1, UNDEFINED, 0, 0]]
    assert decoder.mask(raw).tolist() == [[0, 2, 255, 255], [1, 255, 0, 0]]
    wide = np.array([[1, 70000]], np.int32)
    assert decoder.labels(wide).tolist() == [[1, UNDEFINED]]


def test_read_image_turns_grey_and_rgba_into_rgb(tmp_path):
    Image.fromarray(np.full((5, 6), 200, np.uint8), "L").save(tmp_path / "grey.png")
    Image.fromarray(np.full((5, 6, 4), 100, np.uint8), "RGBA").save(tmp_path / "rgba.png")
    for name, value in (("grey.png", 200), ("rgba.png", 100)):
        image = decode_rgb(tmp_path / name)
        assert image.shape == (3, 5, 6) and image.dtype == torch.uint8 and int(image[0, 0, 0]) == value


def test_size_mismatch_is_a_clear_error_not_a_crash(tmp_path, helpers, rng):
    image, labels = helpers.pair(rng)
    helpers.rgb(tmp_path / "images" / "a.png", image)
    helpers.index(tmp_path / "masks" / "a.png", labels[:5])
    with pytest.raises(ValueError, match="seglab data check"):
        FolderDataset(tmp_path)[0]


def test_images_at_their_own_sizes_batch_by_size_and_score_without_augmentation(tmp_path, helpers, rng):
    sizes = [(12, 16), (20, 10), (12, 16), (12, 16), (20, 10)]  # H x W per image
    for k, (height, width) in enumerate(sizes):
        image, labels = helpers.pair(rng, height=height, width=width, values=(0, 1))
        helpers.rgb(tmp_path / "images" / f"img{k}.png", image)
        helpers.index(tmp_path / "masks" / f"img{k}.png", labels)
    dataset = open_dataset(tmp_path, "train", augment=False)  # the hold-out split's training part
    batches = equal_size_batches(dataset, 2)
    assert sorted(i for batch in batches for i in batch) == list(range(len(dataset)))
    shapes = [[tuple(dataset[i]["image"].shape) for i in batch] for batch in batches]
    assert len({s[0] for s in shapes}) == 2 and all(len(set(s)) == 1 and len(s) <= 2 for s in shapes)
    assert all(batch == sorted(batch) for batch in batches)  # in order within each size
    # the train split scored as it is: the same tensors every time (augment=None draws random ones)
    assert torch.equal(dataset[0]["image"], dataset[0]["image"])
    one_size = tmp_path / "one"
    for k in range(3):
        image, labels = helpers.pair(rng, values=(0, 1))
        helpers.rgb(one_size / "images" / f"img{k}.png", image)
        helpers.index(one_size / "masks" / f"img{k}.png", labels)
    assert equal_size_batches(open_dataset(one_size, "train"), 2) is None  # plain batches do
