"""Parameter counts against the papers and reference implementations (built on the meta
device: no memory, no time)."""
from __future__ import annotations

import pytest
import torch

import seglab
from seglab.encoders import create_encoder


def _params(name: str, **kwargs) -> int:
    with torch.device("meta"):
        model = seglab.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def _close(actual: int, expected: float, tolerance: float = 0.005) -> bool:
    return abs(actual - expected) <= tolerance * expected


def test_fcn8s_vgg16_matches_the_paper():
    # Long et al. 2015, Table 1 / Sec. 4.2: FCN-8s on VGG16 for PASCAL VOC (21 classes), 134M.
    assert _close(_params("fcn8s", num_classes=21), 134e6)


def test_segnet_matches_the_paper():
    # Badrinarayanan et al. 2017, Table 6: SegNet, 29.5M trainable parameters (CamVid, 12 classes).
    assert _close(_params("segnet", num_classes=12), 29.45e6)


def test_deconvnet_matches_the_paper():
    # Noh et al. 2015, Sec. 3.1: "252M parameters in total" (21 classes).
    assert _close(_params("deconvnet", num_classes=21), 252e6)


def test_original_unet_matches_the_reference_count():
    # Ronneberger et al. 2015 (no batch norm, 2 classes): 31.0M, the figure reported by
    # reference re-implementations (e.g. milesial/Pytorch-UNet) of the paper's network.
    assert _close(_params("unet", num_classes=2, norm=None), 31.03e6, tolerance=0.002)


def test_segformer_b0_matches_the_paper():
    # Xie et al. 2021, Table 1: MiT-B0 encoder 3.4M + decoder 0.4M; ~3.7M with 150 ADE20K classes.
    assert 3.6e6 < _params("segformer", num_classes=150) < 3.8e6


@pytest.mark.parametrize("variant, encoder_millions", [("mit_b0", 3.4), ("mit_b1", 13.1), ("mit_b2", 24.2),
                                                       ("mit_b3", 44.0), ("mit_b4", 60.8), ("mit_b5", 81.4)])
def test_mix_transformer_sizes_match_the_paper(variant, encoder_millions):
    # Xie et al. 2021, Table 1, encoder parameters.
    with torch.device("meta"):
        encoder = create_encoder(variant)
    assert _close(sum(p.numel() for p in encoder.parameters()), encoder_millions * 1e6, tolerance=0.03)


smp = pytest.importorskip("segmentation_models_pytorch", reason="reference counts come from segmentation_models_pytorch")


def _smp_params(cls, **kwargs) -> int:
    try:
        with torch.device("meta"):
            model = cls(encoder_weights=None, **kwargs)
    except RuntimeError:  # smp's Segformer reads tensor values while building: build it for real
        model = cls(encoder_weights=None, **kwargs)
    return sum(p.numel() for p in model.parameters())


def test_segformer_b0_equals_smp():
    assert _params("segformer", num_classes=150) == _smp_params(smp.Segformer, encoder_name="mit_b0", classes=150)


def test_deeplabv3plus_resnet50_equals_smp():
    ours = _params("deeplabv3plus", num_classes=21, encoder="resnet50", output_stride=16)
    assert ours == _smp_params(smp.DeepLabV3Plus, encoder_name="resnet50", classes=21)


def test_unet_decoder_on_resnet34_equals_smp():
    ours = _params("unet", num_classes=3, encoder="resnet34")
    assert ours == _smp_params(smp.Unet, encoder_name="resnet34", classes=3)


def test_fpn_resnet34_equals_smp():
    ours = _params("fpn", num_classes=21, encoder="resnet34")
    assert ours == _smp_params(smp.FPN, encoder_name="resnet34", classes=21)


def test_deeplabv3_resnet50_equals_torchvision():
    from torchvision.models.segmentation import deeplabv3_resnet50

    with torch.device("meta"):
        reference = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
    ours = _params("deeplabv3", num_classes=21, encoder="resnet50", output_stride=8)
    assert ours == sum(p.numel() for p in reference.parameters())
