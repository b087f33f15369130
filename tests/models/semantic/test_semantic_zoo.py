"""Every semantic architecture honours the model contract: logits N x K x H x W at the input
size for odd sizes, batch 1 and > 1, train and eval; gradients reach every parameter."""
from __future__ import annotations

import pytest
import torch

import seglab
from conftest import TINY, build_tiny, main_output


def test_every_registered_semantic_model_has_a_tiny_config():
    names = {cfg.get("model", key) for key, cfg in TINY.items()}
    assert set(seglab.list_models(task="semantic")) <= names


@pytest.mark.parametrize("key", sorted(TINY))
def test_logits_at_input_size_and_gradients_reach_every_parameter(key):
    model = build_tiny(key, num_classes=3)
    # timm zero-initialises the last norm of each residual branch (and FCN its skip scores),
    # which by design blocks the gradient to that branch at step 0; wake them up so that the
    # check below sees every path.
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.fill_(0.5)

    model.train()
    output = model(torch.rand(2, 3, 37, 29))
    logits = main_output(output)
    assert logits.shape == (2, 3, 37, 29)
    aux = output["aux"] if isinstance(output, dict) else []
    for extra in aux:
        assert extra.shape == (2, 3, 37, 29)
    loss = logits.square().mean() + sum(a.square().mean() for a in aux)
    loss.backward()
    unreached = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not unreached, f"no gradient reaches {unreached[:5]}"
    # the one fixed filter: FCN's final upsampling, bilinear interpolation (Long et al., Sec. 4.3)
    fixed = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert fixed == (["final_up.conv.weight"] if key.startswith("fcn") else []), fixed

    model.eval()
    with torch.no_grad():
        single = model(torch.rand(1, 3, 33, 47))
    assert torch.is_tensor(single) and single.shape == (1, 3, 33, 47)
    assert torch.isfinite(single).all()


@pytest.mark.parametrize("key", ["unet_resnet", "pspnet"])
def test_any_number_of_input_channels(key):
    model = build_tiny(key, num_classes=2, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 40, 40)).shape == (1, 2, 40, 40)


def test_eval_output_does_not_depend_on_the_rest_of_the_batch():
    # A padded-and-cropped model must predict an image the same alone or in a batch.
    model = build_tiny("deeplabv3plus").eval()
    images = torch.rand(3, 3, 35, 45)
    with torch.no_grad():
        together = model(images)
        alone = model(images[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match="not_a_backbone"):
        seglab.create_model("fpn", num_classes=2, encoder="not_a_backbone")


@pytest.mark.parametrize("model", ["fpn", "unet"])
def test_decoders_on_a_swin_encoder(model):
    # timm gives Swin's maps channels-last (N x H x W x C); the decoders read them as any other
    net = seglab.create_model(model, num_classes=3, encoder="swin_tiny_patch4_window7_224")
    logits = net(torch.rand(1, 3, 64, 96))
    assert logits.shape == (1, 3, 64, 96)
    logits.mean().backward()
    # the first block's (Swin's stochastic depth may drop a later block's branch in training)
    first = next(p for name, p in net.encoder.named_parameters() if name.endswith("attn.qkv.weight"))
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_unet_image2image_regression_head():
    model = build_tiny("unet_resnet", num_classes=5, task="image2image")
    assert model.task == "image2image"
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5, 32, 32)
    with pytest.raises(ValueError, match="task"):
        seglab.create_model("unet", num_classes=2, task="depth")


def test_encoder_unet_first_decoder_convs_read_the_low_resolution_map():
    """The nearest decoder's first convolutions skip the upsampled map (seglab.ops.nearest_conv);
    the network is the one of the figure: upsample, concatenate, convolve."""
    import torch.nn.functional as F

    from seglab.ops.nearest_conv import NearestUpsampleConv

    torch.manual_seed(0)
    model = build_tiny("unet_resnet").double().train()
    assert all(isinstance(block.conv[0][0], NearestUpsampleConv) for block in model.blocks)
    images = torch.rand(2, 3, 37, 50, dtype=torch.float64)

    def plain_forward(x):
        from seglab.ops.padding import crop_to, pad_to_multiple

        size = x.shape[-2:]
        features = model.encoder(pad_to_multiple(x, model.multiple))
        skips = list(reversed(features[:-1]))
        y = features[-1]
        for i, block in enumerate(model.blocks):
            (conv, norm, act), second = block.conv
            up = F.interpolate(y, scale_factor=2, mode="nearest")
            joined = torch.cat([up, skips[i]], 1) if i < len(skips) else up
            y = second(act(norm(F.conv2d(joined, conv.weight, conv.bias, padding=1))))
        return crop_to(model.head(y), size)

    torch.manual_seed(1)
    ours = model(images)
    torch.manual_seed(1)
    expected = plain_forward(images)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad((ours * upstream).sum(), list(model.parameters()))
    reference = torch.autograd.grad((expected * upstream).sum(), list(model.parameters()))
    for a, b in zip(grads, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("rewrite", ["sum_at_stride8", "compose_stride4"])
def test_fpn_rewrites_compute_the_function_of_the_figure(rewrite):
    """Summing the deeper levels at stride 8 and upsampling once (bilinear is linear), and the
    stride-4 head's convolution read straight from C2 and P3 (the lateral composed into the
    kernel, up(P3) as a transposed convolution): the same function as building every map of
    the paper's figure. Values and gradients, float64."""
    torch.manual_seed(0)
    model = build_tiny("fpn").double().train()
    model.dropout.p = 0.0  # the same function in both forms, without random channel drops
    with torch.no_grad():
        for parameter in model.parameters():  # non-zero biases, so that the moved lateral bias shows
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.compose_stride4 = True  # the tiny encoder's C2 is as wide as its pyramid: off by cost
    assert model.sum_at_stride8
    images = torch.rand(2, 3, 37, 50, dtype=torch.float64)
    ours = model(images)
    ours_grads = torch.autograd.grad(ours.square().sum(), list(model.parameters()))
    setattr(model, rewrite, False)
    figure = model(images)
    figure_grads = torch.autograd.grad(figure.square().sum(), list(model.parameters()))
    torch.testing.assert_close(ours, figure, rtol=0, atol=1e-10)
    for a, b in zip(ours_grads, figure_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert not seglab.create_model("fpn", num_classes=2, encoder="test_efficientnet", upsample="transposed").sum_at_stride8
    # composed where it multiplies less: ResNet-34's 64-channel C2, not ResNet-50's 256
    assert seglab.create_model("fpn", num_classes=2, encoder="resnet34").compose_stride4
    assert not seglab.create_model("fpn", num_classes=2, encoder="resnet50").compose_stride4


def test_fpn_keeps_its_composed_stride4_kernels_in_inference_until_the_weights_change():
    import copy

    torch.manual_seed(0)
    model = build_tiny("fpn").eval()
    model.compose_stride4 = True
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        model(images)
        kept = model._stride4_kept.value
        model(images)
        assert model._stride4_kept.value is kept
        model.laterals[0].weight.mul_(1.5)  # an in-place change (an optimizer step) bumps the version
        ours = model(images)
        assert model._stride4_kept.value is not kept
        model.compose_stride4 = False
        torch.testing.assert_close(ours, model(images), rtol=1e-4, atol=1e-5)
    assert copy.deepcopy(model)._stride4_kept.value is None


def test_fcn_on_vgg_holds_each_parameter_once_so_its_checkpoint_saves(tmp_path):
    """fc6/fc7 belong to the encoder only: safetensors refuses tensors saved under two names."""
    from safetensors.torch import save_file

    from seglab.models.registry import create_model
    from seglab.ops.conv import PointwiseConv2d

    model = create_model("fcn8s", num_classes=3, width=0.125)
    state = model.state_dict()
    assert any(key.startswith("encoder.fc.") for key in state) and not any(key.startswith("fc.") for key in state)
    assert isinstance(model.score_fr, PointwiseConv2d)
    save_file({key: value.contiguous() for key, value in state.items()}, str(tmp_path / "fcn.safetensors"))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_fcn_keeps_its_final_upsampling_bilinear_and_learns_the_intermediate_ones():
    """Long et al., Sec. 4.3: "Final layer deconvolutional filters are fixed to bilinear
    interpolation, while intermediate upsampling layers are initialized to bilinear upsampling,
    and then learned"; `learn_final_upsampling=True` learns the final one as well."""
    from seglab.ops.upsample import bilinear_kernel

    torch.manual_seed(0)
    for learn in (False, True):
        model = seglab.create_model("fcn8s", num_classes=3, encoder="resnet18", learn_final_upsampling=learn)
        with torch.no_grad():
            for score in model.skip_scores.values():  # zero at the start: wake the skip paths
                score.weight.fill_(0.1)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(torch.rand(2, 3, 64, 64)).square().mean().backward()
        optimizer.step()
        final, intermediate = model.final_up.conv.weight, model.skip_ups["pool16"].conv.weight
        assert torch.equal(final, bilinear_kernel(3, 3, 16)) != learn
        assert not torch.equal(intermediate, bilinear_kernel(3, 3, 4))
