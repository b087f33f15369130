"""`seglab export` of instance checkpoints: ONNX graphs whose detections (count, boxes, labels,
scores, masks) match PyTorch's under onnxruntime at sizes other than the traced one."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seglab.cli import main
from seglab.engine.checkpoint import save_checkpoint
from seglab.engine.exporting import DETECTIONS
from seglab.models import create_model

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is in the [onnx] extra")


def _checkpoint(tmp_path: Path, name: str, **kwargs) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    if name == "yolact":  # class scores near 1/3 instead of the background prior: many detections
        torch.nn.init.zeros_(model.head.score.bias)
    path = tmp_path / name
    save_checkpoint(path, model, {"model": name, "task": "instance", "kwargs": kwargs, "classes": ["bg", "a", "b"],
                                  "image_size": 64})
    return path, model


def _compare(model: torch.nn.Module, onnx_file: Path, images: list[torch.Tensor]) -> list[int]:
    """Run both on each image (C x H x W); returns the detection counts."""
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(DETECTIONS)
    counts = []
    for image in images:
        with torch.no_grad():
            expected = model([image])[0]
        got = dict(zip(DETECTIONS, session.run(None, {"image": image[None].numpy()})))
        assert got["masks"].shape == (len(expected["scores"]), 1, *image.shape[-2:])
        for name in DETECTIONS:
            torch.testing.assert_close(torch.from_numpy(got[name]), expected[name], atol=1e-4, rtol=1e-4)
        counts.append(len(expected["scores"]))
    return counts


def _random_images(sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(3, height, width, generator=generator) for height, width in sizes]


def test_yolact_exports_with_its_detection_count_free(tmp_path: Path) -> None:
    # class scores near 1/3 (zero bias) against a threshold of 0.34: many detections on noise,
    # none on a flat grey image, from one graph
    path, model = _checkpoint(tmp_path, "yolact", encoder="resnet10t", num_classes=3, proto_width=32, num_prototypes=8,
                              detections_per_image=30, score_threshold=0.34)
    out = tmp_path / "yolact.onnx"
    assert main(["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(out)]) == 0
    images = _random_images([(64, 64), (48, 80), (300, 260)]) + [torch.full((3, 40, 40), 0.5)]
    counts = _compare(model, out, images)  # 64 x 64: the coarsest levels 1 x 1
    assert min(counts[:3]) > 0 and counts[3] == 0, counts


def test_mask_rcnn_exports_by_tracing_and_keeps_the_count_free(tmp_path: Path) -> None:
    path, model = _checkpoint(tmp_path, "mask_rcnn", encoder="resnet10t", fpn_channels=32, anchor_size=8, min_size=0,
                              proposals=30, detections_per_image=6, num_classes=3)
    out = tmp_path / "mask_rcnn.onnx"
    assert main(["export", "--checkpoint", str(path), "--out", str(out), "--image-size", "64"]) == 0
    counts = _compare(model, out, _random_images([(64, 64), (48, 80), (300, 260)]))
    assert max(counts) > 0


def test_instance_export_options_that_cannot_hold_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _ = _checkpoint(tmp_path, "yolact", encoder="resnet10t", num_classes=3, proto_width=16, num_prototypes=4)
    for options, fragment in ((["--format", "torchscript"], "instance models export to onnx only"),
                              (["--legacy-onnx"], "--legacy-onnx: yolact exports by torch.export only")):
        assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "x"), *options]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err


def test_keypoint_rcnn_exports_its_keypoints(tmp_path: Path) -> None:
    from seglab.engine.exporting import KEYPOINT_DETECTIONS

    torch.manual_seed(0)
    kwargs = dict(encoder="resnet10t", num_keypoints=5, min_size=0, anchor_size=8, fpn_channels=32, head_channels=32,
                  box_head_width=64, detections_per_image=10)
    model = create_model("keypoint_rcnn", **kwargs).eval()
    model.roi_heads.score_thresh = 0.0  # random weights: keep every detection, so there are keypoints to compare
    save_checkpoint(tmp_path / "kp", model, {"model": "keypoint_rcnn", "task": "keypoint", "kwargs": kwargs,
                                             "classes": ["bg", "figure"], "image_size": 64})
    out = tmp_path / "kp.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "kp"), "--out", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(KEYPOINT_DETECTIONS)
    for image in _random_images([(64, 64), (96, 80)]):
        with torch.no_grad():
            expected = model([image])[0]
        got = dict(zip(KEYPOINT_DETECTIONS, session.run(None, {"image": image[None].numpy()})))
        assert got["keypoints"].shape == (len(expected["scores"]), 5, 3) and len(expected["scores"]) > 0
        for name in KEYPOINT_DETECTIONS:
            torch.testing.assert_close(torch.from_numpy(got[name]), expected[name], atol=1e-3, rtol=1e-3)
