"""A few optimisation steps per architecture family on a tiny fixed batch: the loss must fall.

The batch: noisy images with a bright rectangle (class 1) and a dark disc (class 2) on a mid
grey background, so the classes are separable by local appearance.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny, main_output


def _batch(n: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.full((n, 3, size, size), 0.5) + 0.05 * torch.randn(n, 3, size, size, generator=generator)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        top, left = 3 + 4 * i, 4 + 3 * i
        masks[i, top : top + 10, left : left + 12] = 1
        disc = (rows - (22 - 2 * i)) ** 2 + (cols - (22 - i)) ** 2 < 36
        masks[i][disc] = 2
    images[:, :, :, :][masks[:, None].expand_as(images) == 1] = 0.95
    images[masks[:, None].expand_as(images) == 2] = 0.05
    return images, masks


def _loss(output, masks):
    loss = F.cross_entropy(main_output(output), masks)
    if isinstance(output, dict):
        loss = loss + 0.4 * sum(F.cross_entropy(aux, masks) for aux in output["aux"])
    return loss


FAMILIES = ["fcn8s", "segnet", "deconvnet", "unet", "unet_resnet", "fpn", "pspnet", "deeplabv2", "deeplabv3plus",
            "hrnet", "segformer", "hourglass"]
# Adam at 3e-3 unless listed. FCN (VGG without batch norm) is trained with SGD + momentum as in
# the paper, Adam being erratic on it; the narrowest nets take a larger step.
OPTIMISERS = {
    "fcn8s": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "deconvnet": lambda params: torch.optim.Adam(params, lr=1e-2),
    "unet": lambda params: torch.optim.Adam(params, lr=1e-2),
    "hourglass": lambda params: torch.optim.Adam(params, lr=1e-2),
}


@pytest.mark.parametrize("key", FAMILIES)
def test_loss_decreases(key):
    images, masks = _batch()
    model = build_tiny(key).train()
    make_optimiser = OPTIMISERS.get(key, lambda params: torch.optim.Adam(params, lr=3e-3))
    optimiser = make_optimiser(model.parameters())
    losses = []
    for _ in range(10):
        optimiser.zero_grad()
        loss = _loss(model(images), masks)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.8 * losses[0], losses


def test_image2image_unet_learns_to_invert_an_image():
    images, _ = _batch()
    model = build_tiny("unet", num_classes=3, task="image2image").train()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimiser.zero_grad()
        loss = F.l1_loss(model(images), 1 - images)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.7 * losses[0], losses
