"""Encoders: the contract (list of maps, `.channels`, `.strides`), output stride by dilation,
any number of input channels, VGG16's pooling indices and fc6/fc7, MiT, and local weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from seglab.encoders import create_encoder, encoder_recipe
from seglab.encoders.mit import DropPath
from seglab.encoders.vgg import VGG16Encoder


def _check_contract(encoder, x):
    features = encoder(x)
    assert isinstance(features, list) and len(features) == len(encoder.channels) == len(encoder.strides)
    for feature, channels, stride in zip(features, encoder.channels, encoder.strides):
        assert feature.shape[1] == channels
        assert feature.shape[-2:] == (-(-x.shape[-2] // stride), -(-x.shape[-1] // stride))
    return features


@pytest.mark.parametrize("output_stride, strides", [(32, [2, 4, 8, 16, 32]), (16, [2, 4, 8, 16, 16]), (8, [2, 4, 8, 8, 8])])
def test_timm_output_stride_trades_striding_for_dilation(output_stride, strides):
    encoder = create_encoder("resnet18", output_stride=output_stride)
    assert encoder.strides == strides
    assert encoder.channels == [64, 64, 128, 256, 512]
    _check_contract(encoder, torch.rand(1, 3, 64, 64))


def test_timm_depth_and_in_channels():
    encoder = create_encoder("resnet18", in_channels=4, depth=3)
    assert encoder.strides == [2, 4, 8]
    _check_contract(encoder, torch.rand(2, 4, 32, 32))


def test_timm_encoder_with_four_stages_caps_depth():
    encoder = create_encoder("convnext_atto")
    assert encoder.strides == [4, 8, 16, 32]


def test_vgg16_exposes_pooling_indices_and_fc_as_convolutions():
    vgg = VGG16Encoder(with_fc=True, width=0.125)
    x = torch.rand(1, 3, 64, 64)
    features, indices, sizes = vgg.forward_with_indices(x)
    assert [f.shape[-1] for f in features] == [32, 16, 8, 4, 2]
    assert [s[-1] for s in sizes] == [64, 32, 16, 8, 4]
    assert all(i.shape == f.shape for i, f in zip(indices, features))
    assert isinstance(vgg.fc[0], torch.nn.Conv2d) and vgg.fc[0].kernel_size == (7, 7)
    assert vgg.fc[3].kernel_size == (1, 1)
    assert vgg.fc.eval()(features[-1]).shape == (1, vgg.fc_channels, 2, 2)


def test_vgg16_has_the_papers_13_convolutions_and_14_7m_weights():
    with torch.device("meta"):
        plain = create_encoder("vgg16")
    convs = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13
    # Simonyan & Zisserman, configuration D: 14,714,688 convolution weights and biases.
    assert sum(p.numel() for p in plain.parameters()) == 14_714_688


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn", "mit_b0"])
def test_own_encoders_follow_the_contract(name):
    encoder = create_encoder(name)
    _check_contract(encoder, torch.rand(2, 3, 64, 64))


def test_mit_strides_and_widths():
    encoder = create_encoder("mit_b0")
    assert encoder.strides == [4, 8, 16, 32]
    assert encoder.channels == [32, 64, 160, 256]


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(0)
    drop = DropPath(0.5).train()
    y = drop(torch.ones(4000, 3))
    per_sample = y[:, 0]
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(y, per_sample[:, None].expand_as(y))
    assert abs(y.mean().item() - 1.0) < 0.1
    assert torch.equal(drop.eval()(torch.ones(3, 3)), torch.ones(3, 3))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file_is_loaded(tmp_path, suffix):
    torch.manual_seed(1)
    source = create_encoder("resnet18", depth=3)
    path = tmp_path / f"encoder{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    torch.manual_seed(2)
    loaded = create_encoder("resnet18", depth=3, weights=str(path))
    x = torch.rand(1, 3, 32, 32)
    source.eval(), loaded.eval()
    for a, b in zip(source(x), loaded(x)):
        torch.testing.assert_close(a, b)


def test_rgb_weights_adapt_to_a_grayscale_first_convolution(tmp_path):
    source = create_encoder("vgg16", depth=2)
    path = tmp_path / "vgg.safetensors"
    save_file(source.state_dict(), str(path))
    gray = create_encoder("vgg16", depth=2, in_channels=1, weights=str(path))
    first = gray.stages[0][0][0].weight
    torch.testing.assert_close(first, source.stages[0][0][0].weight.sum(dim=1, keepdim=True))
    # A gray image through the summed filters equals the RGB net on the image repeated 3 times.
    x = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(gray(x)[0], source(x.repeat(1, 3, 1, 1))[0])


def test_weights_errors_name_the_culprit(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        create_encoder("resnet18", weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="'imagenet' are neither .* give 'timm'"):  # smp's name: the hint says ours
        create_encoder("resnet18", weights="imagenet")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(wrong))
    with pytest.raises(ValueError, match="wrong.safetensors"):
        create_encoder("resnet18", weights=str(wrong))


def test_bad_names_and_strides_are_clear_errors():
    with pytest.raises(ValueError, match="no_such_net"):
        create_encoder("no_such_net")
    with pytest.raises(ValueError, match="output_stride"):
        create_encoder("resnet18", output_stride=4)
    with pytest.raises(ValueError, match="mit_b0"):
        create_encoder("mit_b0", output_stride=16)


def test_transformers_recipes_warm_up_and_the_others_set_nothing():
    assert all(encoder_recipe(f"mit_b{i}") == {"warmup_epochs": 1.0} for i in range(6))
    # timm's transformers, found by their attention layers (built on the meta device)
    for name in ("pvt_v2_b0", "swin_tiny_patch4_window7_224", "vit_tiny_patch16_224"):
        assert encoder_recipe(name) == {"warmup_epochs": 1.0}, name
    # convolution networks, ResNeSt's split-attention gate included
    for name in ("resnet34", "convnext_atto", "resnest14d", "vgg16", None, "no_such_net"):
        assert encoder_recipe(name) == {}, name


def test_swin_maps_come_channels_first_like_every_encoders():
    # timm hands Swin's maps over as N x H x W x C; the encoder gives N x C x H x W views
    encoder = create_encoder("swin_tiny_patch4_window7_224")
    assert encoder.strides == [4, 8, 16, 32] and encoder.channels == [96, 192, 384, 768]
    features = _check_contract(encoder, torch.rand(1, 3, 64, 64))
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features)


def test_vision_transformers_read_other_sizes_than_their_own():
    # built for 224 x 224; as an encoder it reads a 64 x 48 crop (position embeddings interpolated)
    encoder = create_encoder("vit_tiny_patch16_224", depth=3)
    assert encoder.strides == [16, 16, 16]
    _check_contract(encoder, torch.rand(2, 3, 64, 48))


def test_an_encoder_without_a_dilated_form_says_how_to_do_without():
    with pytest.raises(ValueError, match="pvt_v2_b0.*output_stride=16.*output_stride=32"):
        create_encoder("pvt_v2_b0", output_stride=16)
