"""The fast path computes the same network: folding, memory layout and bf16 checked against fp32."""
import contextlib
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine_helpers import needs_bf16

from seglab.data.synthetic import SyntheticShapes
from seglab.encoders.mit import EfficientSelfAttention, MixFFN
from seglab.engine.fastpath import (
    InferenceModel,
    autocast_context,
    fold_conv_bn,
    fuse_conv_relu,
    native_mix_ffn_pays,
    optimize_for_inference,
    optimizer_options,
    prepare_batch,
    to_channels_last,
    use_winograd,
)
from seglab.engine.onednn import FusedConv
from seglab.engine.precision import cpu_has, cpu_runs_bf16
from seglab.models import create_model
from seglab.models.semantic.segformer import AllMLPDecoder
from seglab.ops import native
from seglab.ops.token_attention import native_attention_available
from seglab.ops.winograd import winograd_conv3x3
from seglab.ops.winograd_nearest import winograd_conv3x3_of_nearest2x



def _randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial running statistics, so that a wrong fold shows in the outputs."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.rand(shape, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(shape, generator=generator) - 0.5)


def _small_unet() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("unet", num_classes=4, base_channels=8, depth=3).eval()
    _randomise_batchnorm(model)
    return model


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fold_conv_bn_keeps_outputs_within_1e_4():
    model = _small_unet()
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        expected = model(x)
    before = _batchnorms(model)
    folded = fold_conv_bn(model)
    assert folded == before > 0
    assert _batchnorms(model) == 0
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-4, rtol=1e-4)


def test_fuse_conv_relu_after_folding_keeps_outputs():
    model = _small_unet()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        expected = model(x)
    fold_conv_bn(model)
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    fused = fuse_conv_relu(model)
    assert fused == relus > 0  # every ReLU of this U-Net directly follows a convolution
    with torch.inference_mode():
        assert torch.allclose(model(x), expected, atol=1e-4, rtol=1e-4)


class _ReLUSharedWithSkip(nn.Module):
    """conv -> in-place ReLU, whose result is also kept as a skip: fusable (the skip reads the
    ReLU's result); the pre-ReLU output read by the sum in the second branch is not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.act(self.conv(x))
        y = self.conv2(skip)
        return self.act2(y) + y + skip


def test_fuse_conv_relu_respects_other_readers():
    torch.manual_seed(0)
    model = _ReLUSharedWithSkip().eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    assert fuse_conv_relu(model) == 1
    with torch.inference_mode():
        assert torch.allclose(model(x), expected, atol=1e-5)


class _ConvReadTwice(nn.Module):
    """conv -> bn, but the conv output is also added to the result: folding would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.conv2(x))


class _ConvReturned(nn.Module):
    """The conv output is handed back untouched beside the normalised one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.conv(x)
        return [y, self.bn(y)]


@pytest.mark.parametrize("module_class, expected_folds", [(_ConvReadTwice, 1), (_ConvReturned, 0)])
def test_fold_conv_bn_leaves_convolutions_whose_output_is_read_elsewhere(module_class, expected_folds):
    torch.manual_seed(0)
    model = module_class().eval()
    _randomise_batchnorm(model)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        assert fold_conv_bn(model) == expected_folds
        got = model(x)
    for a, b in zip(expected if isinstance(expected, list) else [expected], got if isinstance(got, list) else [got]):
        assert torch.allclose(a, b, atol=1e-5)


def test_channels_last_and_fp32_fast_path_give_the_same_outputs():
    model = _small_unet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    layout_only = optimize_for_inference(model, "32", fold_bn=False)
    full_fp32 = optimize_for_inference(model, "32")
    assert torch.allclose(layout_only(x), expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(full_fp32(x), expected, atol=1e-4, rtol=1e-4)
    assert full_fp32(x).dtype == torch.float32
    # The argument model is left as it was (inplace=False).
    assert _batchnorms(model) > 0 and model.encoder[0][0][0].weight.requires_grad


@needs_bf16
def test_bf16_fast_path_agrees_with_fp32_on_a_trained_model():
    torch.manual_seed(0)
    data = SyntheticShapes(48, 32, num_classes=4, split="train", seed=0)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    masks = torch.stack([data[i]["mask"] for i in range(len(data))])
    model = create_model("unet", num_classes=4, base_channels=8, depth=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(24):
        index = torch.arange(step * 8, step * 8 + 8) % len(images)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images[index]), masks[index])
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        reference = model(images).argmax(1)
    fast = optimize_for_inference(model, "bf16")
    assert isinstance(fast, InferenceModel) and fast.dtype == torch.bfloat16
    prediction = fast(images).argmax(1)
    assert (reference == masks).float().mean() > 0.6  # the model did learn something
    assert (prediction == reference).float().mean() > 0.98


def test_inference_model_returns_float32_for_dict_outputs():
    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return {"out": self.conv(x), "aux": [self.conv(x)]}

    out = optimize_for_inference(DictModel(), "32")(torch.randn(1, 3, 8, 8))
    assert out["out"].dtype == torch.float32 and out["aux"][0].shape == (1, 2, 8, 8)


def test_autocast_context_and_precision_checks():
    assert isinstance(autocast_context("cpu", "32"), contextlib.nullcontext)
    with pytest.raises(ValueError, match="precision"):
        autocast_context("cpu", "8")
    with pytest.raises(ValueError, match="CUDA"):
        optimize_for_inference(nn.Conv2d(3, 3, 1), "16")
    if cpu_runs_bf16():
        conv = nn.Conv2d(3, 3, 1)
        with autocast_context("cpu", "bf16"):
            assert conv(torch.randn(1, 3, 4, 4)).dtype == torch.bfloat16


def test_fused_optimizer_options_train_like_the_plain_optimizer():
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 2, 3)
    fused = nn.Conv2d(3, 2, 3)
    fused.load_state_dict(plain.state_dict())
    options = optimizer_options("adamw", "cpu")
    assert options == {"fused": True}
    x = torch.randn(2, 3, 8, 8)
    for model, kwargs in ((plain, {}), (fused, options)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, **kwargs)
        for _ in range(3):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    assert torch.allclose(plain.weight, fused.weight, atol=1e-5)


def test_prepare_batch_normalises_uint8_and_float_alike():
    generator = torch.Generator().manual_seed(0)
    raw = [torch.randint(0, 256, (3, 6, 5), dtype=torch.uint8, generator=generator) for _ in range(3)]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    expected = (torch.stack(raw).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    from_uint8 = prepare_batch(raw, mean, std)
    from_float = prepare_batch(torch.stack(raw).float() / 255, mean, std, channels_last=False)
    assert torch.allclose(from_uint8, expected, atol=1e-5) and torch.allclose(from_float, expected, atol=1e-5)
    assert from_uint8.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="channels"):
        prepare_batch(raw, [0.5], [0.5, 0.5])


def test_to_channels_last_leaves_non_image_tensors_alone():
    vector = torch.randn(5)
    assert to_channels_last(vector) is vector
    assert to_channels_last(torch.randn(1, 3, 4, 4)).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dilation, bias, channels_last", [(6, True, False), (12, False, True), (30, True, True)])
def test_large_dilation_as_per_tap_gemms_equals_the_convolution(dilation, bias, channels_last):
    """Taps partly outside the 20x24 map (12) and entirely outside it (30, skipped) included;
    each tap multiplies only the pixels whose product lands inside the map."""
    from torch.utils.flop_counter import FlopCounterMode

    from seglab.engine.fastpath import DilatedConvAsGemm

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=dilation, dilation=dilation, bias=bias).eval()
    x = torch.randn(2, 16, 20, 24)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        ours = DilatedConvAsGemm(conv)(x)
    with torch.no_grad():
        torch.testing.assert_close(ours, conv(x), atol=1e-5, rtol=1e-5)
    rows = sum(max(0, 20 - abs(d)) for d in (-dilation, 0, dilation))
    columns = sum(max(0, 24 - abs(d)) for d in (-dilation, 0, dilation))
    assert flops.get_total_flops() == 2 * 16 * 8 * 2 * rows * columns


@pytest.mark.parametrize("dilation, all_taps", [(6, True), (18, False)])
def test_large_dilation_in_bf16_takes_one_product_where_most_taps_land_inside(dilation, all_taps):
    """On a 40 x 40 map dilation 6 keeps 0.81 of the products inside (one product over the whole
    map for all taps), 18 keeps 0.49 (per-tap windows); both equal the convolution."""
    from torch.utils.flop_counter import FlopCounterMode

    from seglab.engine.fastpath import ALL_TAPS_ABOVE_SHARE, DilatedConvAsGemm
    from seglab.ops.atrous_gemm import share_inside

    assert (share_inside(40, 40, (3, 3), (dilation, dilation)) > ALL_TAPS_ABOVE_SHARE) == all_taps
    assert share_inside(64, 64, (3, 3), (12, 12)) == pytest.approx(0.77, abs=0.01)
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=dilation, dilation=dilation).eval().to(torch.bfloat16)
    x = torch.randn(2, 16, 40, 40).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        ours = DilatedConvAsGemm(conv)(x)
    with torch.no_grad():
        expected = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=dilation, dilation=dilation)
    assert ours.dtype == torch.bfloat16 and ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours.float(), expected, atol=0.05, rtol=0.02)
    whole_map = 2 * 16 * 8 * 9 * 2 * 40 * 40
    assert (flops.get_total_flops() == whole_map) == all_taps


def test_dilated_rewrite_takes_only_same_padded_stride_1_convs_and_keeps_deeplab_outputs():
    from seglab import create_model
    from seglab.engine.fastpath import DilatedConvAsGemm, rewrite_dilated_convs

    assert not DilatedConvAsGemm.applies_to(nn.Conv2d(4, 4, 3, padding=1, dilation=8), 6)  # not "same"
    assert not DilatedConvAsGemm.applies_to(nn.Conv2d(4, 4, 3, stride=2, padding=8, dilation=8), 6)
    assert not DilatedConvAsGemm.applies_to(nn.Conv2d(4, 4, 3, padding=2, dilation=2), 6)  # small dilation: oneDNN is fast
    assert DilatedConvAsGemm.applies_to(nn.Conv2d(4, 4, 3, padding=8, dilation=8), 6)
    torch.manual_seed(0)
    model = create_model("deeplabv3", num_classes=3, encoder="resnet18", output_stride=8).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        assert rewrite_dilated_convs(model) == 3  # the ASPP's three atrous branches (12, 24, 36)
        torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dilation", [12, 30])
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_dilation_depthwise_as_shifted_windows_equals_the_convolution(dilation, channels_last):
    """The atrous depthwise half of a separable convolution: taps partly (12) and entirely (30)
    outside the 20x24 map; float32 and bf16 (whose sums stay in float32)."""
    from seglab.engine.fastpath import DilatedDepthwiseAsShifts

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=dilation, dilation=dilation, groups=16).eval()
    x = torch.randn(2, 16, 20, 24)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    shifts = DilatedDepthwiseAsShifts(conv)
    with torch.no_grad():
        torch.testing.assert_close(shifts(x), conv(x), atol=1e-5, rtol=1e-5)
        exact = conv.to(torch.bfloat16).float()(x.to(torch.bfloat16).float())  # bf16 inputs and weights, exact sums
        ours = shifts.to(torch.bfloat16)(x.to(torch.bfloat16))
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), exact, atol=0.02, rtol=0.01)  # one bf16 rounding of the result


def test_dilated_rewrite_takes_large_dilation_depthwise_convs_and_leaves_seglabs_own():
    from seglab import create_model
    from seglab.engine.fastpath import DilatedDepthwiseAsShifts, rewrite_dilated_convs
    from seglab.ops.atrous_depthwise import AtrousDepthwiseConv2d

    assert not DilatedDepthwiseAsShifts.applies_to(nn.Conv2d(4, 4, 3, padding=6, dilation=6, groups=4), 12)  # oneDNN is fast
    assert not DilatedDepthwiseAsShifts.applies_to(nn.Conv2d(4, 8, 3, padding=12, dilation=12, groups=4), 12)  # not depthwise
    assert DilatedDepthwiseAsShifts.applies_to(nn.Conv2d(4, 4, 3, padding=12, dilation=12, groups=4), 12)
    torch.manual_seed(0)
    plain = nn.Sequential(*(nn.Conv2d(8, 8, 3, padding=d, dilation=d, groups=8) for d in (6, 12, 18))).eval()
    x = torch.randn(1, 8, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = plain(x)
        assert rewrite_dilated_convs(plain) == 2  # 12 and 18
        assert sum(isinstance(m, DilatedDepthwiseAsShifts) for m in plain.modules()) == 2
        torch.testing.assert_close(plain(x), reference, atol=1e-5, rtol=1e-5)
    # DeepLab v3+'s separable ASPP branches run as shifted windows by themselves: nothing to rewrite
    model = create_model("deeplabv3plus", num_classes=3, encoder="resnet18").eval()  # ASPP rates 6, 12, 18
    assert sum(isinstance(m, AtrousDepthwiseConv2d) for m in model.modules()) == 3
    assert rewrite_dilated_convs(model) == 0


def test_encoder_unet_folds_the_batchnorm_after_its_low_resolution_convolutions():
    from seglab.ops.nearest_conv import NearestUpsampleConv

    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, encoder="resnet18", decoder_channels=[32, 16, 16, 8, 8]).eval()
    _randomise_batchnorm(model)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(x)
    before = _batchnorms(model)
    assert fold_conv_bn(model) == before
    fuse_conv_relu(model)  # leaves NearestUpsampleConv (two convolutions and a sum) and its ReLU alone
    assert sum(isinstance(m, NearestUpsampleConv) for m in model.modules()) == 5
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fuse_conv_relu_also_fuses_gelu(approximate):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.GELU(approximate=approximate), nn.Conv2d(6, 3, 1)).eval()
    x = torch.randn(2, 4, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
    assert fuse_conv_relu(model) == 1
    assert isinstance(model[1], nn.Identity)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def _model_and_outputs(name: str, x: torch.Tensor, **options) -> tuple[nn.Module, torch.Tensor]:
    """A seeded eval-mode model with non-trivial BatchNorm statistics, and its outputs for `x`."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **options).eval()
    _randomise_batchnorm(model)
    with torch.no_grad():
        return model, model(x)


def _native_blocks_expected() -> bool:
    return native.available() and cpu_has("avx512")


def _natively(model: nn.Module) -> tuple[int, int, int]:
    """(Mix-FFNs, attentions, decoders) the fast path runs natively."""
    return tuple(sum(m.native for m in model.modules() if isinstance(m, kind))
                 for kind in (MixFFN, EfficientSelfAttention, AllMLPDecoder))


def test_segformer_fast_path_runs_its_blocks_natively_or_fuses_their_gelu_and_keeps_outputs():
    x = torch.randn(1, 3, 64, 96)
    model, expected = _model_and_outputs("segformer", x, variant="b0")
    fast = optimize_for_inference(model, "32")
    # MiT-B0's first three stages' Mix-FFNs (2 blocks each, up to 160 -> 640 channels), every
    # attention's projections and the decoder, where the native kernels run on AVX-512 (the kind
    # measured)
    mix_ffns, attentions, decoders = _natively(fast)
    assert (mix_ffns, attentions, decoders) == ((6, 8, 1) if _native_blocks_expected() else (0, 0, 0))
    fused = [m for m in fast.modules() if isinstance(m, FusedConv) and isinstance(m.activation, nn.GELU)]
    assert len(fused) == 8 - mix_ffns  # the others' depthwise conv + GELU (2 blocks x 4 stages in all)
    torch.testing.assert_close(fast(x), expected, atol=1e-4, rtol=1e-4)


def test_segformer_b2_fast_path_runs_its_narrow_mix_ffns_natively_and_keeps_outputs():
    """MiT-B2 (64, 128, 320, 512 channels; 3, 4, 6, 3 blocks; a 768-wide decoder): the first two
    stages' Mix-FFNs fit the rule, the wider ones keep their operators."""
    x = torch.randn(1, 3, 64, 64)
    model, expected = _model_and_outputs("segformer", x, variant="b2")
    fast = optimize_for_inference(model, "32")
    assert _natively(fast) == ((7, 16, 1) if _native_blocks_expected() else (0, 0, 0))
    torch.testing.assert_close(fast(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:--precision bf16")
def test_segformer_fast_path_keeps_its_operators_when_asked():
    x = torch.randn(1, 3, 64, 64)
    model, expected = _model_and_outputs("segformer", x, variant="b0")
    for fast in (optimize_for_inference(model, "32", native_segformer=False),
                 optimize_for_inference(model, "bf16", native_segformer=False)):
        assert _natively(fast) == (0, 0, 0)
        assert not any(getattr(m, "native_attention", False) for m in fast.modules())
        assert sum(isinstance(m, FusedConv) and isinstance(m.activation, nn.GELU) for m in fast.modules()) == 8
    torch.testing.assert_close(optimize_for_inference(model, "32", native_segformer=False)(x), expected,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:--precision bf16")
def test_segformer_bf16_fast_path_takes_the_native_kernels_where_bf16_multiplies_by_pairs():
    """bf16 CPU inference: every attention module's heads, the first three stages' Mix-FFNs and
    the decoder's head by the native kernels where the processor has AVX-512 BF16's pair products
    (PyTorch's elsewhere; in float32 the attention keeps PyTorch's), the same scores as PyTorch's
    operators to bf16's rounding."""
    x = torch.randn(2, 3, 64, 96)
    model, _ = _model_and_outputs("segformer", x, variant="b0")
    expected = optimize_for_inference(model, "32")(x)
    fast = optimize_for_inference(model, "bf16")
    attentions = [m for m in fast.modules() if isinstance(m, EfficientSelfAttention)]
    assert len(attentions) == 8
    assert [m.native_attention for m in attentions] == [native_attention_available()] * 8
    assert _natively(fast) == ((6, 0, 1) if native_attention_available() else (0, 0, 0))
    fused = [m for m in fast.modules() if isinstance(m, FusedConv) and isinstance(m.activation, nn.GELU)]
    assert len(fused) == 8 - _natively(fast)[0]  # the fourth stage's depthwise conv + GELU
    assert not any(m.native_attention for m in optimize_for_inference(model, "32").modules()
                   if isinstance(m, EfficientSelfAttention))
    assert not any(m.native_attention for m in optimize_for_inference(model, "bf16", native_segformer=False).modules()
                   if isinstance(m, EfficientSelfAttention))
    with mock.patch("seglab.encoders.mit.native.attention", wraps=native.attention) as kernel, \
            mock.patch("seglab.ops.mix_ffn.native.mix_ffn", wraps=native.mix_ffn) as mix_ffn, \
            mock.patch("seglab.models.semantic.segformer.native.mlp_head", wraps=native.mlp_head) as head:
        natively = fast(x).float()
    calls = (kernel.call_count, mix_ffn.call_count, head.call_count)
    assert calls == ((8, 6, 1) if native_attention_available() else (0, 0, 0))
    pytorchs = optimize_for_inference(model, "bf16", native_segformer=False)(x).float()
    def error(result: torch.Tensor) -> float:
        return ((result - expected).norm() / expected.norm()).item()

    assert error(natively) < 1.5 * error(pytorchs) + 1e-3


def test_native_mix_ffn_pays_up_to_mit_b0s_third_stage():
    widths = (32, 64, 160, 256)  # MiT-B0's, 4x as many hidden channels each
    with mock.patch("seglab.engine.fastpath.native.available", return_value=True), \
            mock.patch("seglab.engine.fastpath.cpu_has", return_value=True):
        assert [native_mix_ffn_pays(MixFFN(w, 4 * w)) for w in widths] == [True, True, True, False]
    with mock.patch("seglab.engine.fastpath.cpu_has", return_value=False):  # unmeasured: the operators
        assert not native_mix_ffn_pays(MixFFN(32, 128))


def _instance_model(name: str, **extra) -> nn.Module:
    """A small random instance model in eval mode that returns detections from random weights."""
    torch.manual_seed(0)
    options = {"encoder": "resnet10t", "fpn_channels": 32, "num_classes": 4, "detections_per_image": 10, **extra}
    options.update({"anchor_size": 12} if name == "yolact" else {"anchor_size": 8, "min_size": 0, "proposals": 30})
    model = create_model(name, **options).eval()
    _randomise_batchnorm(model)
    if name == "yolact":
        model.score_threshold = 0.0  # detections from random weights
    else:
        model.roi_heads.score_thresh = 0.0
    return model


def _assert_same_detections(got: dict, expected: dict) -> None:
    assert len(got["scores"]) == len(expected["scores"]) > 0
    # Matched by class and box, not by rank: near-equal scores of random weights may swap places.
    def keys(detections):
        return torch.cat([detections["boxes"], 1000.0 * detections["labels"][:, None].float()], 1)

    match = torch.cdist(keys(expected), keys(got)).argmin(1)
    torch.testing.assert_close(got["boxes"][match], expected["boxes"], atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(got["scores"][match], expected["scores"], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(got["labels"][match], expected["labels"])
    agree = (got["masks"][match] > 0.5).eq(expected["masks"] > 0.5).float().mean()
    assert agree > 0.999


@pytest.mark.parametrize("name", ["yolact", "mask_rcnn"])
def test_instance_models_keep_their_detections_on_the_fast_path(name):
    import copy

    from seglab.engine.fastpath import optimize_instance_model

    model = _instance_model(name)
    images = [torch.rand(3, 64, 80)]
    with torch.no_grad():
        expected = model(images)[0]
    fast = optimize_instance_model(copy.deepcopy(model))
    assert _batchnorms(fast) < _batchnorms(model)  # the backbone's BatchNorms are folded
    with torch.inference_mode():
        got = fast(images)[0]
    _assert_same_detections(got, expected)


def test_the_bf16_instance_fast_path_folds_but_keeps_the_convolutions_eager():
    # Under bf16 autocast float32's fused, prepacked and Winograd convolutions cost 1.4-1.7x
    # the time of eager ones; the bf16 path keeps only the folding and channels_last.
    import copy

    from seglab.engine.fastpath import optimize_instance_model

    model = _instance_model("mask_rcnn", fpn_channels=256, mask_head_width=256)
    images = [torch.rand(3, 96, 96)]
    with torch.no_grad():
        expected = model(images)[0]
    fast = optimize_instance_model(copy.deepcopy(model), precision="bf16")
    assert _batchnorms(fast) < _batchnorms(model) and _winograd_convs(fast) == 0
    assert not any(isinstance(m, FusedConv) for m in fast.modules())
    assert all(type(m) is nn.Conv2d for m in fast.modules() if isinstance(m, nn.Conv2d))  # no prepacked kinds
    with torch.inference_mode():
        got = fast(images)[0]  # in float32 it computes what the model does
    _assert_same_detections(got, expected)
    assert _winograd_convs(optimize_instance_model(copy.deepcopy(model), precision="32")) > 0


def test_instance_fast_path_runs_winograd_in_the_fpn_and_mask_head(winograd_transforms, separate_passes):
    import copy

    from seglab.engine.fastpath import optimize_instance_model

    # The papers' 256-channel FPN and mask head.
    model = _instance_model("mask_rcnn", fpn_channels=256, mask_head_width=256)
    images = [torch.rand(3, 128, 128)]
    with torch.no_grad():
        expected = model(images)[0]
    direct = optimize_instance_model(copy.deepcopy(model), winograd=False)
    fast = optimize_instance_model(copy.deepcopy(model))
    assert _winograd_convs(direct) == 0
    # The backbone's three wide 3x3 convs (ResNet-10t's stages 2-4), the FPN's four output
    # convs, the RPN head's conv and the mask head's four convs; with the native transforms
    # stage 1's two 64-channel convs as well.
    native = winograd_transforms == "native"
    assert _winograd_convs(fast) == (14 if native else 12)
    with torch.inference_mode():
        got, calls = _winograd_calls(fast, images)
    if native:
        # Every one of them on every level: the backbone's stages (32 x 32 down to 4 x 4), the
        # FPN's output convs on four levels, the RPN head on five, the mask head on the RoIs.
        assert sorted(calls) == [64] * 2 + [128] + [256] * 14 + [512]
    else:
        # The mask head's four convs on the 10 detections' 14 x 14 RoIs, and the FPN's output
        # conv and the RPN head on the stride-4 and stride-8 levels (32 x 32, 16 x 16); the
        # backbone's maps and the coarser levels are too small to pay.
        assert calls == [256] * 8
    _assert_same_detections(got[0], expected)
    with torch.inference_mode():
        _assert_same_detections(got[0], direct(images)[0])
    # At 128 channels the 14 x 14 RoIs, which fill 77% of their tiles, stay direct (they lose
    # there); the FPN and RPN convs still take Winograd: on the stride-4 level, and with the
    # native transforms on the stride-8 and -16 levels too, as does the backbone's stage 2.
    narrow = optimize_instance_model(_instance_model("mask_rcnn", fpn_channels=128, mask_head_width=128))
    with torch.inference_mode():
        narrow_calls = [c for c in _winograd_calls(narrow, images)[1] if c == 128]
    assert narrow_calls == [128] * (7 if native else 2)


def test_winograd_takes_only_many_channel_3x3_stride_1_convs(winograd_transforms, separate_passes):
    from seglab.engine.fastpath import winograd_pays

    assert winograd_pays(nn.Conv2d(128, 256, 3, padding=1))
    assert winograd_pays(FusedConv(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU()))
    # Too few channels to pay for the transforms of PyTorch's operators; enough for the native ones.
    assert winograd_pays(nn.Conv2d(64, 256, 3, padding=1)) == (winograd_transforms == "native")
    assert not winograd_pays(nn.Conv2d(32, 256, 3, padding=1))
    assert not winograd_pays(nn.Conv2d(128, 128, 3, stride=2, padding=1))
    assert winograd_pays(nn.Conv2d(128, 128, 3, padding=4, dilation=4))  # as 16 phases
    assert not winograd_pays(nn.Conv2d(128, 128, 3, padding=2, dilation=4))  # not "same"
    assert not winograd_pays(nn.Conv2d(128, 128, 3, padding=6, dilation=6))  # DilatedConvAsGemm's
    assert not winograd_pays(nn.Conv2d(128, 128, 3, padding=0))
    assert not winograd_pays(nn.Conv2d(128, 128, 3, padding=1, groups=2))
    assert not winograd_pays(nn.Conv2d(128, 128, (3, 1), padding=(1, 0)))
    assert not winograd_pays(nn.Conv2d(128, 128, 1))
    assert not winograd_pays(nn.Conv2d(128, 128, 3, padding=1, padding_mode="reflect"))


def _winograd_convs(model: nn.Module) -> int:
    return sum(isinstance(m, FusedConv) and m.winograd for m in model.modules())


def _winograd_calls(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The model's output for `x` and the input channels of each convolution that took Winograd."""
    import seglab.engine.onednn as onednn

    calls = []

    def counted(x: torch.Tensor, filters: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        calls.append(x.shape[1])
        return winograd_conv3x3(x, filters, *args, **kwargs)

    with mock.patch.object(onednn, "winograd_conv3x3", counted):
        return model(x), calls


def test_float32_fast_path_runs_winograd_within_the_stated_tolerance(winograd_transforms, separate_passes):
    x = torch.randn(1, 3, 256, 256)
    model, expected = _model_and_outputs("unet", x, encoder="resnet18")
    direct, winograd = optimize_for_inference(model, "32", winograd=False), optimize_for_inference(model, "32")
    assert _winograd_convs(direct) == 0
    # ResNet-18's stages 2-4 (the three convs after each stage's strided one; the blocks' last
    # convs take the shortcut and ReLU as well) and the second convs of the decoder's 256- and
    # 128-channel blocks; with the native transforms also stage 1's four 64-channel convs and
    # the decoder's 64-channel block.
    native = winograd_transforms == "native"
    assert _winograd_convs(winograd) == (16 if native else 11)
    import seglab.ops.nearest_conv as nearest_conv

    doubling = []

    def counted(x: torch.Tensor, *args) -> torch.Tensor:
        doubling.append(x.shape[1])
        return winograd_conv3x3_of_nearest2x(x, *args)

    with mock.patch.object(nearest_conv, "winograd_conv3x3_of_nearest2x", counted):
        output, calls = _winograd_calls(winograd, x)
    # Each input large enough to pay, and the decoder's first convs (NearestUpsampleConv): with
    # the native transforms the 256- and 128-channel blocks' whole convolutions on the upsampled
    # grid (from 512 and 256 channels), the 64-channel block's skip share; with PyTorch's
    # operators the 256- and 128-channel blocks' skip shares. The 32-channel block's stays direct.
    skips = [64] if native else [128, 256]
    assert sorted(calls) == sorted([64] * (5 if native else 0) + [128] * 4 + [256] * 4 + [512] * 3 + skips)
    assert sorted(doubling) == ([256, 512] if native else [])
    torch.testing.assert_close(output, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(output, direct(x), atol=1e-4, rtol=1e-4)
    # A small input: too few tiles for Winograd's products, every convolution direct but, with
    # the native transforms, the widest: 256 and 512 channels on 2 x 2 and 1 x 1 maps, and the
    # 256-channel decoder block's whole convolution from 512 channels on 1 x 1.
    small = x[:, :, :32, :32]
    doubling.clear()
    with mock.patch.object(nearest_conv, "winograd_conv3x3_of_nearest2x", counted):
        assert sorted(_winograd_calls(winograd, small)[1]) == ([256] * 4 + [512] * 3 if native else [])
    assert doubling == ([512] if native else [])


def test_float32_fast_path_runs_few_channel_convolutions_in_one_pass_on_avx512(fused_calls, monkeypatch):
    import seglab.engine.winograd as rule

    monkeypatch.setattr(rule, "_has_avx512", lambda: True)  # the processors measured (any runs the kernel)
    x = torch.randn(1, 3, 256, 256)
    model, expected = _model_and_outputs("unet", x, encoder="resnet18")
    fast = optimize_for_inference(model, "32")
    with torch.inference_mode():
        output = fast(x)
    # ResNet-18's stage 1 (four 64-channel convs on 64 x 64), the decoder's 64-channel block
    # (its skip's share and its second conv) and the 32-channel block (the same, 64 -> 32 and
    # 32 -> 32 on 128 x 128); the 16-channel block ties with the direct convolution and stays.
    assert sorted(fused_calls) == sorted([(64, 64)] * 6 + [(64, 32), (32, 32)])
    torch.testing.assert_close(output, expected, atol=1e-4, rtol=1e-4)


def test_float32_fast_path_takes_f2x2_where_the_filters_bound_f4x4s_products():
    import seglab.engine.onednn as onednn
    from seglab.ops import native
    from seglab.ops.winograd import tile_of

    if not native.available():
        pytest.skip(f"the native kernels are not available: {native.unavailable_reason()}")
    torch.manual_seed(0)
    conv = FusedConv(nn.Conv2d(512, 512, 3, padding=1), nn.ReLU()).requires_grad_(False)
    conv.winograd = True
    tiles = []

    def counted(x: torch.Tensor, filters: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        tiles.append(tile_of(filters))
        return winograd_conv3x3(x, filters, *args, **kwargs)

    for batch, tile in ((1, 2), (8, 4)):  # 16 and 128 of F(4x4)'s tiles
        x, residual = (torch.randn(batch, 512, 16, 16).contiguous(memory_format=torch.channels_last) for _ in range(2))
        tiles.clear()
        with mock.patch.object(onednn, "winograd_conv3x3", counted):
            output = conv(x, residual)
        assert tiles == [tile]
        expected = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1) + residual)
        torch.testing.assert_close(output, expected, atol=1e-4, rtol=1e-4)


def test_winograd_conv_keeps_the_direct_convolution_outside_float32_inference():
    torch.manual_seed(0)
    conv = FusedConv(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU())
    conv.winograd = True
    x = torch.randn(1, 128, 32, 32).contiguous(memory_format=torch.channels_last)
    direct = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert _winograd_calls(conv, x)[1] == []  # gradients enabled: the plain convolution
    conv.requires_grad_(False)
    output, calls = _winograd_calls(conv, x)
    assert calls == [128]
    torch.testing.assert_close(output, direct, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", torch.bfloat16):  # Winograd's transforms would lose bf16's few bits
        assert _winograd_calls(conv, x)[1] == []


def test_winograd_conv_takes_the_tile_the_map_fills_and_keeps_filters_for_each():
    import seglab.engine.onednn as onednn

    torch.manual_seed(0)
    conv = FusedConv(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU()).requires_grad_(False)
    conv.winograd = True
    sides = []

    def counted(x: torch.Tensor, filters: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        sides.append(filters.shape[0])
        return winograd_conv3x3(x, filters, *args, **kwargs)

    with mock.patch.object(onednn, "winograd_conv3x3", counted):
        for size in (64, 32, 64):  # 6 x 6 tiles fill 64 x 64 (94%), not 32 x 32 (79%)
            x = torch.randn(1, 128, size, size).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(conv(x), F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)),
                                       atol=1e-4, rtol=1e-4)
    assert sides == [64, 36, 64]


def test_float32_fast_path_runs_dilated_stages_as_winograd_phases(winograd_transforms):
    x = torch.randn(1, 3, 128, 128)
    model, expected = _model_and_outputs("pspnet", x, encoder="resnet18", aux=False)  # output stride 8
    fast = optimize_for_inference(model, "32")
    dilations = sorted(m.dilation[0] for m in fast.modules() if isinstance(m, FusedConv) and m.winograd)
    # Stage 2 (3), stage 3 (its first conv undilated, then 3 at dilation 2), stage 4 (its first
    # conv at 2, then 3 at 4) and the pyramid's fusion (1); with the native transforms stage 1's
    # four 64-channel convs too.
    native = winograd_transforms == "native"
    assert dilations == [1] * (9 if native else 5) + [2] * 4 + [4] * 3
    output, calls = _winograd_calls(fast, x)
    # On the 16 x 16 maps of stride 8, the convolutions that read 128 channels (stage 2's, stage
    # 3's first) are too small to pay for the transforms of PyTorch's operators; the rest do.
    expected_calls = [256] * 4 + [512] * 3 + [1024]
    assert sorted(calls) == ([64] * 4 + [128] * 4 + expected_calls if native else expected_calls)
    torch.testing.assert_close(output, expected, atol=1e-4, rtol=1e-4)


def test_bf16_fast_path_runs_the_wider_convolutions_by_f2x2_near_the_direct_ones(winograd_transforms,
                                                                                 monkeypatch):
    import seglab.engine.winograd as rule

    monkeypatch.setattr(rule, "_has_amx", lambda: False)  # the rule's processors; the path runs anywhere
    torch.manual_seed(1)
    x = torch.randn(1, 3, 128, 128)
    model, expected = _model_and_outputs("pspnet", x, encoder="resnet18", aux=False)  # output stride 8
    direct, fast = optimize_for_inference(model, "bf16", winograd=False), optimize_for_inference(model, "bf16")
    output, calls = _winograd_calls(fast, x)
    # `bf16_pays`: stage 2's three 128 -> 128 convolutions after its strided one (16 x 16: 64
    # tiles), stage 3 (128 -> 256, three 256 -> 256 at dilation 2), stage 4 (256 -> 512 at
    # dilation 2, then 512 -> 512 three times at 4) and the pyramid's fusion (1024 -> 512); not
    # stage 1's 64 channels; none without the native transforms.
    expected_calls = [128] * 4 + [256] * 4 + [512] * 3 + [1024]
    assert sorted(calls) == (expected_calls if winograd_transforms == "native" else [])
    assert output.dtype == torch.float32
    direct_error = (direct(x) - expected).abs()
    error = (output - expected).abs()
    assert error.mean() < 3 * direct_error.mean() + 1e-6 and error.max() < 3 * direct_error.max() + 1e-6


@pytest.mark.parametrize("dilation, tile", [(12, 6), (18, 4), (24, 3), (36, None)])
def test_large_dilation_takes_winograd_on_its_phases_where_that_saves_most(winograd_transforms, dilation, tile):
    """`use_winograd` lets a `DilatedConvAsGemm` compute a float32 convolution by F(6x6), F(4x4)
    or F(3x3) over the map's phases where `atrous_output_tile` says (64 x 64: 12, 18 and 24),
    and keeps the windows elsewhere (36), for input that records gradients and without the
    native transforms."""
    from seglab.engine.fastpath import DilatedConvAsGemm
    import seglab.engine.fastpath as fastpath

    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=dilation, dilation=dilation).eval()
    x = torch.randn(1, 64, 64, 64).contiguous(memory_format=torch.channels_last)
    module = DilatedConvAsGemm(conv)
    assert use_winograd(module) == 1 and module.winograd
    sides: list[int] = []

    def counted(x: torch.Tensor, filters: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        sides.append(filters.shape[0])
        return winograd_conv3x3(x, filters, *args, **kwargs)

    with mock.patch.object(fastpath, "winograd_conv3x3", counted):
        with torch.no_grad():
            expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=dilation,
                                dilation=dilation)
            out = module(x)
            torch.testing.assert_close(out.double(), expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
            module(x)
        taken = [] if tile is None or winograd_transforms != "native" else [(tile + 2) ** 2] * 2
        assert sides == taken
        module(x.requires_grad_())  # the windows (`DilatedConvAsGemm` is inference only)
        assert sides == taken


def test_a_bf16_large_dilation_takes_f2x2_on_its_phases_where_that_saves(winograd_transforms, monkeypatch):
    """In bf16 a `DilatedConvAsGemm` with `winograd` on computes F(2x2) over the map's phases
    where `atrous_bf16_pays` (dilation 12 on 64 x 64), near the float64 convolution as its own
    products are, and keeps its products at 24."""
    from seglab.engine.fastpath import DilatedConvAsGemm
    import seglab.engine.fastpath as fastpath
    import seglab.engine.winograd as rule

    monkeypatch.setattr(rule, "_has_amx", lambda: False)  # the rule's processors; the path runs anywhere
    torch.manual_seed(0)
    for dilation, takes in [(12, winograd_transforms == "native"), (24, False)]:
        conv = nn.Conv2d(128, 128, 3, padding=dilation, dilation=dilation)
        x = torch.randn(1, 128, 64, 64).bfloat16().contiguous(memory_format=torch.channels_last)
        module = DilatedConvAsGemm(conv).to(torch.bfloat16).eval()
        with torch.no_grad():
            windows = module(x)
        module.winograd = True
        sides: list[int] = []

        def counted(x: torch.Tensor, filters: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            sides.append(filters.shape[0])
            return winograd_conv3x3(x, filters, *args, **kwargs)

        with mock.patch.object(fastpath, "winograd_conv3x3", counted), torch.no_grad():
            out = module(x)
        assert sides == ([16] if takes else []) and out.dtype == torch.bfloat16
        expected = F.conv2d(x.double(), conv.weight.bfloat16().double(), conv.bias.bfloat16().double(),
                            padding=dilation, dilation=dilation)
        window_error = (windows.double() - expected).abs().mean()
        assert (out.double() - expected).abs().mean() < 3 * window_error + 1e-6


def test_a_3x3_head_to_few_classes_runs_with_vectors_along_the_pixels(monkeypatch):
    """U-Net's 16 -> 3 head (`use_planar_heads`): planar scores, the plain model's values; off
    with the switch, in bf16, and on processors not measured."""
    import seglab.engine.fastpath as fastpath

    x = torch.randn(2, 3, 64, 96)
    model, expected = _model_and_outputs("unet", x, encoder="resnet18")
    fast = optimize_for_inference(model, "32")
    planar = [m for m in fast.modules() if isinstance(m, FusedConv) and m.planar]
    assert len(planar) == (1 if _native_blocks_expected() else 0)
    assert all(m.out_channels == 3 and m.in_channels == 16 for m in planar)
    with torch.no_grad():
        output = fast(x)
    torch.testing.assert_close(output, expected, atol=1e-4, rtol=1e-4)
    if planar:
        assert output.is_contiguous()  # planar, where the other convolutions give channels last
    for off in (optimize_for_inference(model, "32", planar_heads=False), optimize_for_inference(model, "bf16")):
        assert not any(isinstance(m, FusedConv) and m.planar for m in off.modules())
    monkeypatch.setattr(fastpath, "_native_blocks_measured", lambda: False)
    assert not any(isinstance(m, FusedConv) and m.planar for m in optimize_for_inference(model, "32").modules())
