"""describe_model: parameters and GFLOPs (2 FLOPs per multiply-add) without allocating the model."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from seglab.models.profile import count_flops, count_parameters, describe_model


def test_flops_of_a_single_convolution_are_twice_its_multiply_adds():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    macs = 8 * 3 * 3 * 3 * 16 * 16
    assert count_flops(conv, 16) == 2 * macs
    assert count_parameters(conv) == 8 * 3 * 9


def test_describe_model_reports_params_and_gflops_at_the_size_asked():
    small = describe_model("fcn8s", num_classes=21, image_size=256)
    large = describe_model("fcn8s", num_classes=21, image_size=512)
    assert small["name"] == "fcn8s" and small["params"] == large["params"]
    assert abs(small["params"] - 134e6) < 1e6
    # Convolutions dominate: 4x the pixels, about 4x the FLOPs.
    assert 3.8 < large["gflops"] / small["gflops"] < 4.2
    # VGG16's 13 convolutions alone cost 2 x 15.3 GMACs at 224x224; at 512x512 that is ~160 GFLOPs.
    assert 150 < large["gflops"] < 260


def test_describe_model_passes_builder_options():
    rect = describe_model("segformer", num_classes=19, image_size=(256, 512), variant="b1")
    assert rect["image_size"] == [256, 512]
    assert 13e6 < rect["params"] < 14.5e6


def test_profiling_leaves_the_mode_alone():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)).train()
    count_flops(model, 8, in_channels=1)
    assert model.training


def test_unknown_model_is_an_error():
    with pytest.raises(KeyError, match="nonexistent"):
        describe_model("nonexistent")


def test_roi_align_counts_as_torchvisions_op_not_as_a_dense_product():
    """seglab's RoIAlign is a sparse product; the FLOP count must not see it as a dense one."""
    from torch.utils.flop_counter import FlopCounterMode

    from seglab.models.profile import counting_roi_align_as_torchvision
    from seglab.ops.roi_align import SampledMultiScaleRoIAlign

    pooler = SampledMultiScaleRoIAlign(["0"], 7, 2)
    features = {"0": torch.randn(1, 8, 32, 32)}
    boxes = [torch.tensor([[0.0, 0.0, 60.0, 60.0]])]
    with counting_roi_align_as_torchvision(pooler), FlopCounterMode(display=False) as counter:
        counted = pooler(features, boxes, [(128, 128)])
    assert counter.get_total_flops() == 0
    torch.testing.assert_close(counted, pooler(features, boxes, [(128, 128)]), atol=1e-5, rtol=1e-5)  # restored afterwards
    assert "forward" not in vars(pooler)
