"""YOLACT: mask crop and Fast NMS on hand-worked cases, box coding, shapes, losses, learning."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seglab
from seglab.data.instance import SyntheticInstances, collate_instances
from seglab.models.instance.yolact import (
    crop_masks,
    decode_boxes,
    encode_boxes,
    fast_nms,
    upsample_in_boxes,
)

TINY = {"encoder": "resnet10t", "fpn_channels": 32, "num_prototypes": 8, "anchor_size": 12, "num_classes": 4}


def _batch(count: int = 2, size: int = 64):
    data = SyntheticInstances(num_samples=count, image_size=size, num_classes=4, seed=3)
    return collate_instances([data[i] for i in range(count)])


def test_crop_keeps_exactly_the_pixels_whose_centres_lie_in_the_box():
    masks = torch.ones(2, 4, 5)
    boxes = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 2.0, 5.0, 2.9]])
    cropped = crop_masks(masks, boxes)
    expected_first = torch.zeros(4, 5)
    expected_first[1:3, 1:3] = 1  # rows 1-2, columns 1-2
    expected_second = torch.zeros(4, 5)
    expected_second[2, :] = 1  # only row 2's centre (2.5) lies within [2, 2.9]
    assert torch.equal(cropped[0], expected_first)
    assert torch.equal(cropped[1], expected_second)
    in_place = torch.rand(2, 4, 5)
    expected = crop_masks(in_place, boxes)
    assert crop_masks(in_place, boxes, in_place=True) is in_place and torch.equal(in_place, expected)


def _upsampled_then_cropped(masks: torch.Tensor, boxes: torch.Tensor, padded: tuple[int, int],
                            image: tuple[int, int]) -> torch.Tensor:
    whole = F.interpolate(masks[:, None], size=padded, mode="bilinear", align_corners=False)[:, 0]
    return crop_masks(whole[:, : image[0], : image[1]], boxes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("small", "padded", "image"), [((16, 16), (64, 64), (64, 64)), ((24, 20), (96, 80), (90, 77)),
                                                         ((13, 17), (40, 50), (40, 50))])
def test_upsampling_in_boxes_equals_whole_image_upsampling_then_crop(dtype, small, padded, image):
    generator = torch.Generator().manual_seed(4)
    masks = torch.rand(7, *small, generator=generator).to(dtype)
    height, width = image
    boxes = torch.tensor([[0.0, 0, width, height],        # the whole image
                          [3.2, 5.7, 30.1, 22.4],         # fractional edges
                          [10, 10, 10, 30],               # no width: empty
                          [-5, -3, 8, 9],                 # partly outside
                          [width - 4.0, height - 6.0, width + 10.0, height + 10.0],
                          [20, 2, 20.6, 3.4],             # holds one pixel centre at most
                          [7, 7, 7.2, 7.2]])              # holds none
    expected = _upsampled_then_cropped(masks, boxes, padded, image)
    got = upsample_in_boxes(masks, boxes, padded, image)
    assert got.shape == expected.shape == (7, height, width) and got.dtype == dtype
    assert torch.equal(got == 0, expected == 0)  # the same pixels kept
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-6 if dtype == torch.float32 else 0, rtol=0)
    empty = upsample_in_boxes(masks[:0], boxes[:0], padded, image)
    assert empty.shape == (0, height, width)


def test_traced_mask_assembly_is_the_eager_one():
    # Export records the whole-image upsampling and crop; eager inference on an image this
    # large upsamples within the boxes.
    model = seglab.create_model("yolact", **TINY).eval()
    generator = torch.Generator().manual_seed(1)
    prototypes = torch.rand(8, 72, 72, generator=generator)
    coefficients = torch.randn(5, 8, generator=generator)
    boxes = torch.tensor([[0.0, 0, 240, 240], [25, 19, 130, 231], [2, 2, 2, 9], [130, 1, 287, 264], [1, 1, 46, 46]])
    padded, image = (288, 288), (270, 287)

    def assemble(p, c, b):
        return model.assemble_masks(p, c, b, padded, image)

    eager = assemble(prototypes, coefficients, boxes)
    traced = torch.jit.trace(assemble, (prototypes, coefficients, boxes), check_trace=False)(prototypes, coefficients, boxes)
    assert eager.shape == traced.shape == (5, 1, *image)
    torch.testing.assert_close(eager, traced, atol=1e-6, rtol=0)


def test_fast_nms_lets_suppressed_boxes_suppress_unlike_greedy_nms():
    # B overlaps A (IoU 0.54) and C overlaps B (IoU 0.54) but not A (IoU 0.25). Greedy NMS keeps
    # A and C; Fast NMS also drops C, because the already suppressed B still counts.
    boxes = torch.tensor([[0.0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]])
    scores = torch.tensor([[0.7, 0.8, 0.9]])  # reversed order: NMS must sort by score itself
    classes, index = fast_nms(boxes[None], scores, iou_threshold=0.5)
    assert classes.tolist() == [0]
    assert index.tolist() == [2]  # the highest-scored box, the one at [6, 0, 16, 10]


def test_fast_nms_treats_classes_independently_and_respects_top_k():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]]).expand(2, -1, -1)
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.95, 0.2]])
    classes, index = fast_nms(boxes, scores, iou_threshold=0.5)
    kept = sorted(zip(classes.tolist(), index.tolist()))
    assert kept == [(0, 0), (0, 2), (1, 1), (1, 2)]  # box 1 suppressed in class 0 only
    classes, index = fast_nms(boxes, scores, iou_threshold=0.5, top_k=1)
    assert sorted(zip(classes.tolist(), index.tolist())) == [(0, 0), (1, 1)]


def test_box_encoding_round_trips_and_is_zero_for_the_anchor_itself():
    anchors = torch.tensor([[0.0, 0, 16, 16], [10, 20, 42, 36]])
    boxes = torch.tensor([[2.0, 1, 20, 15], [5, 25, 40, 30]])
    assert torch.allclose(decode_boxes(encode_boxes(boxes, anchors), anchors), boxes, atol=1e-4)
    assert torch.allclose(encode_boxes(anchors, anchors), torch.zeros(2, 4), atol=1e-6)


def test_every_ground_truth_claims_its_best_anchor():
    model = seglab.create_model("yolact", **TINY)
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 40, 40], [50, 50, 60, 60]])
    boxes = torch.tensor([[0.0, 0, 12, 12], [45, 45, 64, 64]])  # the second overlaps nothing by 0.5
    gt_index, state = model.match(anchors, boxes)
    assert state.tolist() == [1, 0, 1]
    assert gt_index[0] == 0 and gt_index[2] == 1


def test_training_returns_finite_losses_and_eval_returns_masks_per_image_size():
    torch.manual_seed(0)
    model = seglab.create_model("yolact", **TINY)
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box", "loss_mask", "loss_semantic"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    model.eval()
    model.score_threshold = 0.0  # random weights: let some detections through
    with torch.no_grad():
        outputs = model([torch.rand(3, 64, 64), torch.rand(3, 40, 72)])
    for output, (height, width) in zip(outputs, [(64, 64), (40, 72)]):
        count = len(output["scores"])
        assert 0 < count <= model.detections_per_image
        assert output["masks"].shape == (count, 1, height, width)
        assert output["boxes"].shape == (count, 4)
        assert output["labels"].min() >= 1 and output["labels"].max() < TINY["num_classes"]
        assert (output["boxes"][:, 2] <= width).all() and (output["boxes"][:, 3] <= height).all()
        # Masks are cropped: nothing outside a detection's box.
        outside = crop_masks(torch.ones_like(output["masks"][:, 0]), output["boxes"]) == 0
        assert (output["masks"][:, 0][outside] == 0).all()


def test_a_few_steps_reduce_the_loss_with_either_classification_loss():
    images, targets = _batch(1)
    for class_loss in ("ohem", "focal"):
        torch.manual_seed(0)
        model = seglab.create_model("yolact", **TINY, class_loss=class_loss)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        totals = []
        for _ in range(8):  # overfit one fixed batch
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            totals.append(float(loss.detach()))
        assert totals[-1] < 0.7 * totals[0], (class_loss, totals)


def test_bf16_autocast_training_keeps_every_gradient_finite():
    """Under CPU bf16 autocast, oneDNN's weight gradient of the stride-2 P6/P7 convs on 1-2 pixel
    maps came back NaN at random; those convs now run in float32 (backbone.Float32P6P7)."""
    import pytest

    from seglab.engine.precision import cpu_runs_bf16

    if not cpu_runs_bf16():
        pytest.skip("this CPU has no bfloat16 support")
    torch.manual_seed(0)
    model = seglab.create_model("yolact", num_classes=6, encoder="resnet18", anchor_size=10).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    data = SyntheticInstances(num_samples=16, image_size=64, seed=0)
    for step in range(4):
        images, targets = collate_instances([data[i] for i in range(4 * step, 4 * step + 4)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(images, targets)
        assert all(loss.dtype == torch.float32 for loss in losses.values())  # losses in float32
        optimizer.zero_grad()
        sum(losses.values()).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        assert torch.isfinite(norm), f"non-finite gradient at step {step}"
        optimizer.step()


def test_protonet_width_sets_its_convolutions_and_keeps_k_prototypes():
    model = seglab.create_model("yolact", **TINY, proto_width=16)
    convs = [m for m in model.protonet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 16, 16, TINY["num_prototypes"]]
    assert convs[0].in_channels == TINY["fpn_channels"]
    images, targets = _batch()
    assert all(torch.isfinite(v) for v in model(images, targets).values())


def test_semantic_loss_against_a_hand_computed_case():
    # 2 images, 3 object classes, P3 logits all zero except one pixel: the BCE is log 2 per
    # element, plus the difference at the one pixel whose logit is +4 where its class is present.
    model = seglab.create_model("yolact", **TINY)
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 1, 0, 0] = 4.0
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, :8, :8] = True  # the top-left P3 cell (of 4 x 4 over a 32-pixel padded image)
    targets = [{"labels": torch.tensor([2]), "masks": mask}, {"labels": torch.zeros(0, dtype=torch.long), "masks": mask[:0]}]
    loss = model.semantic_loss(logits, targets, (32, 32))
    log2 = torch.log(torch.tensor(2.0))
    one_pixel = torch.nn.functional.softplus(torch.tensor(-4.0))  # BCE of logit 4 with target 1
    expected = (2 * 3 * 16 * log2 - log2 + one_pixel) / (16 * 2)
    torch.testing.assert_close(loss, expected)


def test_semantic_head_is_training_only_and_optional_in_checkpoints():
    torch.manual_seed(0)
    with_head = seglab.create_model("yolact", **TINY)
    without = seglab.create_model("yolact", **TINY, semantic_weight=0)
    assert without.semantic is None
    images, targets = _batch()
    assert "loss_semantic" not in without(images, targets)
    # Either state dict loads into either model (the head only serves training).
    assert with_head.load_state_dict(without.state_dict()) is not None
    without.load_state_dict(with_head.state_dict())
    torch.testing.assert_close(without.head.box.weight, with_head.head.box.weight)
    with_head.eval(), without.eval()
    with torch.no_grad():
        a, b = with_head([images[0]]), without([images[0]])
    torch.testing.assert_close(a[0]["scores"], b[0]["scores"])
