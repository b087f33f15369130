"""SegFormer's all-MLP decoder runs in a re-associated order (upsample the stage maps, then one
composed 1x1 convolution): it must be the paper's function, forward and backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seglab


def papers_order(decoder, features: list[torch.Tensor]) -> torch.Tensor:
    """Fig. 2 as drawn: project each stage, upsample to stride 4, concatenate, fuse, classify."""
    size = features[0].shape[-2:]
    maps = [F.interpolate(project(f), size=size, mode="bilinear", align_corners=False) for project, f in zip(decoder.project, features)]
    return decoder.classifier(decoder.dropout(decoder.fuse(torch.cat(maps, dim=1))))


def _model_and_features(batch: int, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = seglab.create_model("segformer", num_classes=5, variant="b0", drop_path_rate=0.0).to(dtype)
    with torch.no_grad():
        features = model.encoder(torch.rand(batch, 3, 64, 96, dtype=dtype))
    return model, [f.detach() for f in features]


def test_decoder_equals_the_papers_order_in_eval_and_training():
    model, features = _model_and_features(batch=2)
    decoder = model.decoder
    decoder.eval()
    # Running statistics and affine parameters away from the identity: in eval mode the decoder
    # folds the BatchNorm into its composed weights (and the constants into one bias).
    norm = decoder.fuse[1]
    generator = torch.Generator().manual_seed(1)
    for tensor, low, high in ((norm.running_mean, -1, 1), (norm.running_var, 0.5, 2), (norm.weight.data, 0.5, 1.5), (norm.bias.data, -1, 1)):
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    with torch.no_grad():
        torch.testing.assert_close(decoder(features), papers_order(decoder, features), rtol=1e-5, atol=1e-5)

    # Gradients in float64: training-mode BatchNorm amplifies float32 rounding (0.3% here).
    model, features = _model_and_features(batch=2, dtype=torch.float64)
    decoder = model.decoder
    decoder.train()
    decoder.dropout.p = 0.0  # the same function: no random channel drops
    gradients = []
    for forward in (decoder, lambda f: papers_order(decoder, f)):
        decoder.zero_grad()
        output = forward(features)
        (output * torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)).sum().backward()
        gradients.append({name: p.grad.clone() for name, p in decoder.named_parameters()})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], rtol=1e-8, atol=1e-9, msg=name)


def test_stage_maps_are_canonical_channels_last_even_for_one_image():
    # A batch stride other than C*H*W on a one-image map makes torch treat it as NCHW
    # (upsampling then returns NCHW and every later op copies layouts).
    _, features = _model_and_features(batch=1)
    for f in features:
        n, c, h, w = f.shape
        assert f.stride() == (c * h * w, 1, w * c, c)


def test_token_maps_are_canonical_channels_last_even_for_one_image():
    from seglab.encoders.mit import tokens_to_map

    tokens = torch.rand(1, 6 * 10, 8)
    grid = tokens_to_map(tokens, 6, 10)
    assert grid.stride() == (8 * 6 * 10, 1, 10 * 8, 8)
    torch.testing.assert_close(grid, tokens.transpose(1, 2).reshape(1, 8, 6, 10))
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert conv(grid).is_contiguous(memory_format=torch.channels_last)  # not a fall-back to NCHW


def test_eval_decoder_sums_the_shares_and_the_relu_in_one_native_pass(monkeypatch):
    from seglab.ops import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    model, features = _model_and_features(batch=2)
    decoder = model.decoder.eval()
    calls = []
    add = native.add_upsampled_

    def counted(out, parts, *, relu=False):
        calls.append((tuple(out.shape), [tuple(p.shape) for p in parts], relu))
        return add(out, parts, relu=relu)

    monkeypatch.setattr(native, "add_upsampled_", counted)
    with torch.no_grad():
        torch.testing.assert_close(decoder(features), papers_order(decoder, features), rtol=1e-5, atol=1e-5)
    # Stage 1's share (stride 4, 64 x 96 input) receives the three smaller ones, then the ReLU.
    assert calls == [((2, 16, 24, 256), [(2, 8, 12, 256), (2, 4, 6, 256), (2, 2, 3, 256)], True)]


def test_eval_decoder_computes_the_head_in_one_native_pass_where_the_fast_path_asks(monkeypatch):
    from seglab.ops import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    model, features = _model_and_features(batch=2)
    decoder = model.decoder.eval()
    norm = decoder.fuse[1]  # statistics away from the identity: the folded norm is in the head's weights
    generator = torch.Generator().manual_seed(2)
    for tensor in (norm.running_mean, norm.weight.data, norm.bias.data):
        tensor.copy_(torch.rand(tensor.shape, generator=generator) - 0.5)
    calls = []
    head = native.mlp_head

    def counted(nhwc, first_weight, first_bias, parts, classifier_weight, classifier_bias):
        calls.append((tuple(nhwc.shape), [tuple(p.shape) for p in parts], tuple(classifier_weight.shape)))
        return head(nhwc, first_weight, first_bias, parts, classifier_weight, classifier_bias)

    monkeypatch.setattr(native, "mlp_head", counted)
    decoder.native = True
    with torch.no_grad():
        result = decoder(features)
        torch.testing.assert_close(result, papers_order(decoder, features), rtol=1e-5, atol=1e-5)
    assert result.shape == (2, 5, 16, 24) and result.is_contiguous(memory_format=torch.channels_last)
    assert calls == [((2, 16, 24, 32), [(2, 8, 12, 256), (2, 4, 6, 256), (2, 2, 3, 256)], (256, 5))]
    decoder.train()  # training (BatchNorm's batch statistics, gradients) keeps the operators
    decoder(features).sum().backward()
    assert len(calls) == 1 and decoder.classifier.weight.grad is not None


def test_bf16_decoder_computes_the_head_in_one_native_pass_where_bf16_multiplies_by_pairs(monkeypatch):
    """bf16 eval with the fast path's switch: the head by `native.mlp_head`'s pair products where
    the processor has them, as close to the float32 head as PyTorch's bf16 operators come."""
    from seglab.ops import native

    if not native.bf16_pairs():
        pytest.skip("bf16 pair products need AVX-512 BF16 and the native kernels")
    model, features = _model_and_features(batch=2)
    decoder = model.decoder.eval()
    with torch.no_grad():
        expected = decoder(features)
    decoder.bfloat16()
    halves = [f.bfloat16() for f in features]
    calls = []
    head = native.mlp_head

    def counted(nhwc, *weights):
        calls.append(nhwc.dtype)
        return head(nhwc, *weights)

    monkeypatch.setattr(native, "mlp_head", counted)
    with torch.no_grad():
        operators = decoder(halves)
        decoder.native = True
        result = decoder(halves)
    assert calls == [torch.bfloat16]
    assert result.dtype == torch.bfloat16 and result.shape == (2, 5, 16, 24)
    assert result.is_contiguous(memory_format=torch.channels_last)
    def error(scores: torch.Tensor) -> float:
        return ((scores.float() - expected).norm() / expected.norm()).item()

    assert error(result) < 1.5 * error(operators) + 1e-3


@pytest.mark.parametrize("encoder, first_map, dim", [("resnet18", 1, 256), ("pvt_v2_b0", 0, 256)])
def test_the_all_mlp_decoder_on_other_encoders(encoder, first_map, dim):
    # Fig. 2's decoder from the stride-4 map on: a ResNet's stride-2 map is left out
    torch.manual_seed(0)
    model = seglab.create_model("segformer", num_classes=4, encoder=encoder)
    assert model.first_map == first_map and model.decoder.project[0].out_channels == dim
    assert [p.in_channels for p in model.decoder.project] == model.encoder.channels[first_map:]
    x = torch.rand(2, 3, 64, 96)
    logits = model(x)
    assert logits.shape == (2, 4, 64, 96)
    logits.mean().backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    model.eval()
    with torch.no_grad():
        features = model.encoder(x)[first_map:]
        by_paper = F.interpolate(papers_order(model.decoder, features), size=x.shape[-2:], mode="bilinear",
                                 align_corners=False)
        torch.testing.assert_close(model(x), by_paper, rtol=1e-4, atol=1e-5)
        assert model(torch.rand(1, 3, 70, 90)).shape == (1, 4, 70, 90)  # padded to the encoder's stride, cropped


def test_segformer_names_a_bad_variant_or_encoder():
    with pytest.raises(ValueError, match="b9"):
        seglab.create_model("segformer", num_classes=2, variant="b9")
    with pytest.raises(ValueError, match="no_such_net"):
        seglab.create_model("segformer", num_classes=2, encoder="no_such_net")
