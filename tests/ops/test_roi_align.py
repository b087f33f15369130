"""RoIAlign as a sparse product equals torchvision's roi_align (aligned=False), values and gradients."""
from __future__ import annotations

import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from seglab.ops.roi_align import SampledMultiScaleRoIAlign, roi_align_sampled


def _boxes(count: int, width: float, height: float, generator: torch.Generator) -> torch.Tensor:
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([width, height])
    size = torch.rand(count, 2, generator=generator) * 40 + 0.3  # some under a feature pixel
    return torch.cat([corner, torch.minimum(corner + size, torch.tensor([width, height]))], dim=1)


def test_values_and_gradients_match_torchvision_including_boxes_at_the_border():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 5, 20, 24, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    boxes = _boxes(60, 96, 80, g)
    boxes[:4] = torch.tensor([[95.5, 10, 96, 30], [10, 79.8, 30, 80], [0, 0, 96, 80], [50, 50, 50.1, 50.1]])
    image_index = torch.sort(torch.randint(0, 3, (60,), generator=g)).values
    for output_size, ratio in (((7, 7), 2), ((14, 14), 2), ((3, 5), 1)):
        ours = roi_align_sampled(features, boxes, image_index, output_size, 0.25, ratio)
        theirs = roi_align(features, torch.cat([image_index[:, None].float(), boxes], 1), output_size, 0.25, ratio)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        grad = torch.randn(theirs.shape, generator=g)
        (ours_grad,), (their_grad,) = torch.autograd.grad(ours, features, grad), torch.autograd.grad(theirs, features, grad)
        torch.testing.assert_close(ours_grad, their_grad, atol=1e-4, rtol=1e-4)


def test_multiscale_pooler_matches_torchvision_and_handles_empty_images():
    g = torch.Generator().manual_seed(1)
    features = {str(i): torch.randn(3, 8, 64 // 2**i, 64 // 2**i, generator=g) for i in range(4)}
    boxes = [_boxes(7, 256, 256, g), torch.zeros(0, 4), _boxes(5, 256, 256, g) * 0.3]
    names = list(features)
    ours = SampledMultiScaleRoIAlign(names, 7, 2)(features, boxes, [(256, 256)] * 3)
    theirs = MultiScaleRoIAlign(names, 7, 2)(features, boxes, [(256, 256)] * 3)
    assert ours.shape == (12, 8, 7, 7)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_pools_in_float32_and_returns_the_feature_dtype():
    features = torch.randn(1, 4, 16, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = roi_align_sampled(features, torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.zeros(1, dtype=torch.long), (2, 2), 1.0, 2)
    assert pooled.dtype == torch.bfloat16 and pooled.shape == (1, 4, 2, 2)
