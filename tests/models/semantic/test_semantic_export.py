"""ONNX (checked with onnxruntime) and TorchScript exports of the semantic models.

Exported at 64x64 and run at another batch and an odd size, so the dynamic axes are real.
Which exporter handles what is documented in seglab.export: the fast TorchScript-based ONNX
exporter is used where it works; PSPNet needs the torch.export-based one (checked here at a
fixed size, the dynamic export taking too long for this suite). The unpadded U-Net exports to
ONNX at a fixed size only; a free size is refused.
"""
from __future__ import annotations

import pytest
import torch

from conftest import build_tiny
from seglab.export import export_onnx, export_torchscript

ort = pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (dev extra)")


def _onnx_matches(model, path, image, **options):
    export_onnx(model, path, image_size=64, **options)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        expected = model(image)
    assert logits.shape == tuple(expected.shape)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("key", ["fcn8s", "segnet", "unet_resnet", "deeplabv3plus", "segformer", "hourglass"])
def test_onnx_dynamic_size_matches_pytorch(tmp_path, key):
    model = build_tiny(key).eval()
    _onnx_matches(model, tmp_path / "model.onnx", torch.rand(2, 3, 45, 61), dynamo=False)


def test_onnx_pyramid_pooling_with_the_torch_export_exporter(tmp_path):
    model = build_tiny("pspnet").eval()
    _onnx_matches(model, tmp_path / "pspnet.onnx", torch.rand(1, 3, 64, 64), dynamo=True, dynamic=False)


def test_fcn_exports_with_the_torch_export_exporter_at_any_batch_and_size(tmp_path):
    # FCN's fixed bilinear upsampling reads its weight eagerly (torch.export's hold no values),
    # and a batch traced at 1 had been fixed to 1 in the graph.
    model = build_tiny("fcn8s").eval()
    _onnx_matches(model, tmp_path / "fcn.onnx", torch.rand(3, 3, 45, 61), dynamo=True)
    session = ort.InferenceSession(str(tmp_path / "fcn.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    assert session.get_outputs()[0].shape[:2] == ["batch", 3]


def test_a_graph_that_does_not_hold_at_other_sizes_is_refused_and_not_written(tmp_path):
    # The unpadded U-Net computes its overlap-tile margins in Python: traced, they are constants.
    with pytest.raises(ValueError, match=r"with a free image size: at batch 3, 35 x 35 it failed .* \(--static\)$"):
        export_onnx(build_tiny("unet_valid").eval(), tmp_path / "unet.onnx", image_size=64, dynamo=False)
    assert list(tmp_path.iterdir()) == []


def test_the_original_unet_centres_its_padding_in_a_graph_that_holds_at_odd_sizes(tmp_path):
    # Its pads had been Python integers, which the trace froze: 19 x 23 came out 1 x 3 (depth 4).
    _onnx_matches(build_tiny("unet").eval(), tmp_path / "unet.onnx", torch.rand(3, 3, 19, 23), dynamo=False)


def test_original_unet_exports_at_a_fixed_size(tmp_path):
    model = build_tiny("unet").eval()
    _onnx_matches(model, tmp_path / "unet.onnx", torch.rand(1, 3, 64, 64), dynamo=False, dynamic=False)


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
@pytest.mark.parametrize("key", ["deconvnet", "segformer"])
def test_torchscript_trace_serves_other_sizes(tmp_path, key):
    # SegFormer's decoder sums its stages by a native kernel without gradients; the trace, taken
    # under no_grad, had recorded the first stage's share alone (logits off by 0.25 at any size).
    model = build_tiny(key).eval()
    path = export_torchscript(model, tmp_path / f"{key}.pt", image_size=64)
    loaded = torch.jit.load(str(path))
    for image in (torch.rand(1, 3, 64, 64), torch.rand(2, 3, 37, 50)):
        with torch.no_grad():
            torch.testing.assert_close(loaded(image), model(image))


def test_a_torchscript_trace_that_holds_at_its_size_only_is_written_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"holds at the traced size \(64 x 64\) only: at batch 3, 35 x 35 it failed"):
        path = export_torchscript(build_tiny("unet_valid").eval(), tmp_path / "unet.pt", image_size=64)
    assert path.exists()


def test_export_to_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        export_onnx(build_tiny("fcn32s"), tmp_path / "nowhere" / "m.onnx", image_size=32)
    with pytest.raises(ValueError, match="image_size"):
        export_torchscript(build_tiny("fcn32s"), tmp_path / "m.pt", image_size=(0, 32))
