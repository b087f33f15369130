"""The real CamVid copy, when the workspace has it (../shared/data/camvid): layout and statistics."""
from __future__ import annotations

from pathlib import Path

import pytest

from seglab.data import CamVid, open_dataset
from seglab.data.doctor import check_dataset

CAMVID = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "camvid"
pytestmark = pytest.mark.skipif(not CAMVID.is_dir(), reason=f"real CamVid not present at {CAMVID}")


def test_segnet_lists_are_rerooted_and_samples_decode():
    train, val = CamVid(CAMVID, "train"), CamVid(CAMVID, "val")
    assert (len(train), len(val)) == (367, 101) and not train.unpaired and not val.unpaired
    sample = open_dataset(CAMVID, "val", image_size=[180, 240])[0]
    assert sample["image"].shape == (3, 180, 240) and sample["mask"].shape == (180, 240)
    assert set(sample["mask"].unique().tolist()) <= set(range(11)) | {255}


def test_doctor_passes_the_validation_split():
    report = check_dataset(CAMVID, splits=["val"])
    assert report.ok and report.image_sizes == {(480, 360): 101}
    assert set(report.label_histogram) <= set(range(12))
