import copy

import pytest
import timm
import torch
from engine_helpers import needs_bf16

from seglab.engine.fastpath import fold_conv_bn, optimize_for_inference, to_channels_last
from seglab.engine.onednn import FusedConv, onednn_available
from seglab.engine.residual import BasicBlockShortcutInConv, BottleneckShortcutInConv, fuse_residual_additions
from seglab.models.registry import create_model

pytestmark = pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")


def _folded(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0, global_pool="")
    with torch.no_grad():  # BatchNorm statistics other than the identity, so the folding matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    model.eval().requires_grad_(False)
    fold_conv_bn(model)
    return model


@pytest.mark.parametrize("name, block_type, blocks", [("resnet18", BasicBlockShortcutInConv, 8),
                                                      ("resnet26", BottleneckShortcutInConv, 8)])
def test_blocks_add_the_shortcut_in_their_last_convolution_and_compute_the_same(name, block_type, blocks):
    model = _folded(name)
    rewritten = copy.deepcopy(model)
    assert fuse_residual_additions(rewritten) == blocks
    assert sum(type(m) is block_type for m in rewritten.modules()) == blocks
    assert list(rewritten.state_dict()) == list(model.state_dict())  # same names, same tensors
    last = rewritten.layer4[-1].conv2 if name == "resnet18" else rewritten.layer4[-1].conv3
    assert isinstance(last, FusedConv) and last.post_op[0] == "relu"
    x = to_channels_last(torch.randn(2, 3, 96, 96))
    with torch.inference_mode():
        torch.testing.assert_close(to_channels_last(rewritten)(x), to_channels_last(model)(x), atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # NCHW, outside inference mode: step by step, same values
        torch.testing.assert_close(rewritten(x.contiguous()), model(x.contiguous()), atol=1e-4, rtol=1e-4)


def test_blocks_with_a_batchnorm_before_the_addition_are_left_alone():
    model = timm.create_model("resnet18", num_classes=0).eval()
    assert fuse_residual_additions(model) == 0
    assert not any(type(m) is BasicBlockShortcutInConv for m in model.modules())


@pytest.mark.parametrize("precision, atol", [("32", 1e-4), pytest.param("bf16", 0.15, marks=needs_bf16)])
def test_fast_path_gives_the_same_scores_with_and_without_the_fusion(precision, atol):
    torch.manual_seed(0)
    model = create_model("fpn", num_classes=5, encoder="resnet18").eval()
    x = torch.randn(1, 3, 128, 128)
    fused = optimize_for_inference(model, precision)
    plain = optimize_for_inference(model, precision, fuse_residual=False)
    assert sum(type(m) is BasicBlockShortcutInConv for m in fused.modules()) == 8
    assert not any(type(m) is BasicBlockShortcutInConv for m in plain.modules())
    torch.testing.assert_close(fused(x), plain(x), atol=atol, rtol=0.05)
