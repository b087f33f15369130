"""Mask R-CNN and its keypoint variant on seglab encoders: parts, shapes, losses, learning."""
from __future__ import annotations

import pytest
import torch

import seglab
from seglab.data.instance import SyntheticInstances, collate_instances

TINY = {"encoder": "resnet10t", "fpn_channels": 32, "anchor_size": 8, "min_size": 0, "proposals": 30, "rois_per_image": 16, "detections_per_image": 10, "num_classes": 4}


def _batch(count: int = 2, size: int = 64):
    data = SyntheticInstances(num_samples=count, image_size=size, num_classes=4, seed=5)
    return collate_instances([data[i] for i in range(count)])


def test_registered_as_instance_models():
    assert {"mask_rcnn", "yolact"} <= set(seglab.list_models(task="instance"))
    assert "keypoint_rcnn" in seglab.list_models(task="keypoint")


def test_mask_head_gives_one_28x28_mask_per_class_from_14x14_roi_features():
    model = seglab.create_model("mask_rcnn", **TINY)
    heads = model.roi_heads
    assert heads.mask_roi_pool.output_size == (14, 14) and heads.box_roi_pool.output_size == (7, 7)
    assert heads.mask_roi_pool.sampling_ratio == 2  # RoIAlign: bilinear samples, no quantisation
    logits = heads.mask_predictor(heads.mask_head(torch.randn(3, TINY["fpn_channels"], 14, 14)))
    assert logits.shape == (3, TINY["num_classes"], 28, 28)
    # The RPN sees every pyramid level: P2..P5 and the pooled P6, one anchor size per level.
    assert len(model.rpn.anchor_generator.sizes) == 5


def test_losses_in_training_and_native_size_detections_in_eval():
    torch.manual_seed(0)
    model = seglab.create_model("mask_rcnn", **TINY)
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
    model.eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        outputs = model([torch.rand(3, 64, 64), torch.rand(3, 40, 72)])
    for output, size in zip(outputs, [(64, 64), (40, 72)]):
        count = len(output["scores"])
        assert count > 0
        assert output["masks"].shape == (count, 1, *size)  # min_size=0: no resizing
        assert output["boxes"].shape == (count, 4) and output["labels"].min() >= 1


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = seglab.create_model("mask_rcnn", **TINY)
    images, targets = _batch(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(6):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(float(loss.detach()))
    assert totals[-1] < 0.7 * totals[0], totals


def test_another_encoder_family_serves_as_backbone():
    model = seglab.create_model("mask_rcnn", **{**TINY, "encoder": "mit_b0"})
    model.eval()
    with torch.no_grad():
        output = model([torch.rand(3, 64, 64)])[0]
    assert output["masks"].shape[1:] == (1, 64, 64)


def test_keypoint_variant_predicts_one_heat_map_per_keypoint():
    torch.manual_seed(0)
    num_keypoints = 3
    model = seglab.create_model(
        "keypoint_rcnn", **{**TINY, "num_classes": 2}, num_keypoints=num_keypoints, head_channels=16
    )
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    keypoints = torch.tensor([[[10.0, 10.0, 1.0], [24.0, 24.0, 1.0], [38.0, 30.0, 1.0]]])
    losses = model([torch.rand(3, 64, 64)], [{"boxes": boxes, "labels": torch.tensor([1]), "keypoints": keypoints}])
    assert "loss_keypoint" in losses and torch.isfinite(losses["loss_keypoint"])
    heat_maps = model.roi_heads.keypoint_predictor(model.roi_heads.keypoint_head(torch.randn(2, TINY["fpn_channels"], 14, 14)))
    assert heat_maps.shape == (2, num_keypoints, 56, 56)
    model.eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        output = model([torch.rand(3, 64, 64)])[0]
    assert output["keypoints"].shape[1:] == (num_keypoints, 3)


def test_bad_encoder_name_is_a_clear_error():
    with pytest.raises(ValueError, match="encoder"):
        seglab.create_model("mask_rcnn", **{**TINY, "encoder": "no_such_backbone"})


def test_boxes_are_decoded_in_float32_under_bf16_autocast():
    # torchvision's BoxCoder casts anchors and proposals to the deltas' dtype; with bf16 deltas
    # every box would sit on bf16's grid (steps of 0.5 px between 64 and 128 px).
    torch.manual_seed(0)
    model = seglab.create_model("mask_rcnn", **{**TINY, "detections_per_image": 30}).eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        objectness, deltas = model.rpn.head([torch.randn(1, TINY["fpn_channels"], 8, 8)])
        scores, box_deltas = model.roi_heads.box_predictor(torch.randn(5, 1024))
        output = model([torch.rand(3, 128, 128)])[0]
    assert {objectness[0].dtype, deltas[0].dtype, scores.dtype, box_deltas.dtype} == {torch.float32}
    boxes = output["boxes"]
    assert boxes.dtype == torch.float32 and len(boxes) > 0
    off_grid = boxes[(boxes > 64) & (boxes < 128)]
    assert len(off_grid) > 0 and (off_grid != off_grid.bfloat16().float()).any()


def _assert_same_detections(ours, theirs, keys, tolerance):
    """Both models in eval mode keep every box (score threshold 0) of one random 96x96 image."""
    ours.eval().roi_heads.score_thresh = 0.0
    image = torch.rand(3, 96, 96)
    with torch.no_grad():
        expected, got = theirs([image])[0], ours([image])[0]
    assert len(got["boxes"]) == len(expected["boxes"]) > 0
    for key in keys:
        torch.testing.assert_close(got[key], expected[key], rtol=tolerance, atol=tolerance)


def test_torchvision_weights_give_torchvision_detections(tmp_path):
    """torchvision's maskrcnn_resnet50_fpn weights, saved as a file, load into seglab's
    Mask R-CNN (timm ResNet-50 encoder) and give the same detections: same network, renamed."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    sizes = {"min_size": 96, "max_size": 96}
    theirs = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5, box_score_thresh=0.0, **sizes).eval()
    with torch.no_grad():  # BatchNorm statistics away from their defaults, so a lost tensor shows
        for module in theirs.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    file = tmp_path / "maskrcnn.pth"
    torch.save(theirs.state_dict(), file)
    ours = seglab.create_model("mask_rcnn", num_classes=5, torchvision_weights=str(file), **sizes)
    _assert_same_detections(ours, theirs, ("boxes", "scores", "labels", "masks"), tolerance=1e-4)
    # Another class count: everything but the class-specific predictors is taken.
    other = seglab.create_model("mask_rcnn", num_classes=3, **sizes)
    kept = seglab.models.instance.mask_rcnn.load_torchvision_weights(other, theirs.state_dict())
    assert sorted(kept) == sorted(
        f"roi_heads.{part}.{p}" for part in ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_predictor.mask_fcn_logits")
        for p in ("weight", "bias")
    )
    assert torch.equal(other.rpn.head.conv[0][0].weight, theirs.rpn.head.conv[0][0].weight)
    # Another backbone: one sentence naming the first tensor that does not fit.
    with pytest.raises(ValueError, match=r"torchvision weights file .*maskrcnn.pth' have backbone.encoder.* encoder resnet50"):
        seglab.create_model("mask_rcnn", num_classes=5, encoder="resnet18", torchvision_weights=str(file), **sizes)


def test_torchvision_keypoint_weights_give_torchvision_keypoints():
    from torchvision.models.detection import keypointrcnn_resnet50_fpn

    from seglab.models.instance.mask_rcnn import load_torchvision_weights

    torch.manual_seed(0)
    sizes = {"min_size": 96, "max_size": 96}
    theirs = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, box_score_thresh=0.0, **sizes).eval()
    ours = seglab.create_model("keypoint_rcnn", **sizes)
    assert load_torchvision_weights(ours, theirs.state_dict()) == []  # same classes and keypoints: all taken
    _assert_same_detections(ours, theirs, ("boxes", "scores", "keypoints", "keypoints_scores"), tolerance=1e-3)
    # Another keypoint count: the keypoint predictor starts fresh, the rest is taken.
    other = seglab.create_model("keypoint_rcnn", num_keypoints=5, **sizes)
    assert load_torchvision_weights(other, theirs.state_dict()) == [
        "roi_heads.keypoint_predictor.kps_score_lowres.weight", "roi_heads.keypoint_predictor.kps_score_lowres.bias"
    ]

