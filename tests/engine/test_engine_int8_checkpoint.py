"""int8 ranges stored in a checkpoint: the record, `auto`'s choice, the trainer's step, the predictor."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from engine_helpers import train_tiny

import seglab.engine.int8_checkpoint as int8_checkpoint
from seglab.data import open_dataset
from seglab.engine.checkpoint import load_checkpoint
from seglab.engine.evaluator import Normalize, logits_of
from seglab.engine.fastpath import default_precision, optimize_for_inference
from seglab.engine.int8 import cpu_runs_int8, int8_input_ranges
from seglab.engine.int8_checkpoint import AUTO_TOLERANCE, Int8Record, auto_inference_precision, int8_share, stored_int8
from seglab.engine.predictor import Predictor
from seglab.models import create_model

needs_int8 = pytest.mark.skipif(not cpu_runs_int8(), reason="this CPU has no VNNI or AMX 8-bit products")
CPU = torch.device("cpu")


def _copy_with_int8_entry(tiny_run: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny run whose best.json's "int8" entry `edit(config)` has changed."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "best.json").read_text())
    edit(config)
    (run / "best.json").write_text(json.dumps(config))
    return run


def _record(miou_int8: float = 0.5) -> Int8Record:
    return Int8Record({"encoder.conv": (-1.5, 2.25), "head": (0.0, 3.0)}, 16, 0.5, miou_int8)


def test_a_record_goes_through_json_unchanged():
    record = _record(0.4995)
    config = json.loads(json.dumps({"int8": record.to_json()}))
    assert stored_int8(config) == record
    assert stored_int8({}) is None


@pytest.mark.parametrize("entry", [{"ranges": {"a": [0, 1]}}, {"ranges": [], "images": 1, "miou_float32": 0, "miou_int8": 0},
                                   {"ranges": {}, "images": 1, "miou_float32": 0.5, "miou_int8": 0.5},
                                   {"ranges": {"a": [0, "nan"]}, "images": 1, "miou_float32": 0.5, "miou_int8": 0.5}, "ranges"])
def test_a_malformed_record_is_one_error_naming_its_source(entry):
    with pytest.raises(ValueError, match=r"^runs/x/best.json: its \"int8\" entry"):
        stored_int8({"int8": entry}, "runs/x/best.json")


def test_the_command_line_calibrates_on_as_many_images_as_training_stores():
    from seglab.cli import INT8_CALIBRATION_IMAGES

    assert INT8_CALIBRATION_IMAGES == int8_checkpoint.CALIBRATION_IMAGES


def test_a_record_is_within_the_tolerance_in_either_direction():
    assert _record(0.5 - AUTO_TOLERANCE * 0.99).within() and _record(0.5 + AUTO_TOLERANCE * 0.99).within()
    assert not _record(0.5 - AUTO_TOLERANCE * 1.01).within() and not _record(0.5 + AUTO_TOLERANCE * 1.01).within()


@pytest.mark.parametrize("fast_default, runs_int8, record, expected", [
    ("32", True, _record(0.5), "int8"),
    ("32", True, _record(0.49), "32"),  # int8 lost a point on validation: float32 stays
    ("32", True, None, "32"),  # nothing stored
    ("32", False, _record(0.5), "32"),  # no 8-bit products on this CPU
    ("bf16", True, _record(0.5), "bf16"),  # native bfloat16 stays the choice
])
def test_auto_takes_int8_only_where_float32_would_run_and_the_record_allows(monkeypatch, fast_default, runs_int8, record, expected):
    monkeypatch.setattr(int8_checkpoint, "default_precision", lambda device: fast_default)
    monkeypatch.setattr(int8_checkpoint, "cpu_runs_int8", lambda: runs_int8)
    assert auto_inference_precision(CPU, record) == expected


class _ConvolutionsThenMlp(nn.Module):
    """Two 3x3 convolutions (3 -> 8 -> 8 channels), then at every pixel a transformer-like MLP of
    8 -> `hidden` -> 8 linears (which int8 leaves in float32)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.convolutions = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.mlp = nn.Sequential(nn.Linear(8, hidden), nn.GELU(), nn.Linear(hidden, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convolutions(x)
        return self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


CONVOLUTION_FLOPS = 2 * 8 * (3 * 9 + 8 * 9)  # per pixel, both convolutions of _ConvolutionsThenMlp


@pytest.mark.parametrize("amx, hidden, expected", [
    (False, 8, "int8"),  # mostly convolutions: byte products beat bf16's pairs (AVX-512 BF16 without AMX)
    (False, 256, "bf16"),  # mostly linears, which int8 leaves in float32
    (True, 8, "bf16"),  # AMX: unmeasured, bf16 stays
])
def test_auto_takes_int8_over_bf16_for_convolution_networks_without_amx(monkeypatch, amx, hidden, expected):
    monkeypatch.setattr(int8_checkpoint, "default_precision", lambda device: "bf16")
    monkeypatch.setattr(int8_checkpoint, "cpu_runs_int8", lambda: True)
    monkeypatch.setattr(int8_checkpoint, "cpu_has", lambda feature: amx and feature == "amx_tile")
    model = _ConvolutionsThenMlp(hidden)
    assert auto_inference_precision(CPU, _record(0.5), model) == expected
    assert auto_inference_precision(CPU, _record(0.49), model) == "bf16"  # the record decides first
    assert auto_inference_precision(CPU, None, model) == "bf16"


def test_the_int8_share_counts_one_group_convolutions_against_everything_else():
    mlp_flops = 2 * 2 * 8 * 64  # per pixel
    for size in (8, 32):
        assert int8_share(_ConvolutionsThenMlp(64), size=size) == pytest.approx(CONVOLUTION_FLOPS / (CONVOLUTION_FLOPS + mlp_flops))
    assert int8_share(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)), size=8) == 1.0


def test_grouped_and_transposed_convolutions_are_not_int8s():
    one_group = 2 * 16 * 16 * 4 * 3
    depthwise = 2 * 16 * 16 * 4 * 9
    transposed = 2 * 8 * 8 * 4 * 4 * 4  # as torch.utils.flop_counter counts a 2x2 stride-2 transposed convolution
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.MaxPool2d(2),
                          nn.ConvTranspose2d(4, 4, 2, stride=2))
    assert int8_share(model, size=16) == pytest.approx(one_group / (one_group + depthwise + transposed))


def test_the_int8_share_probe_leaves_the_model_as_it_was_and_gives_up_quietly():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).train()
    running_mean = model[1].running_mean.clone()
    assert int8_share(model) == 1.0
    assert model.training and torch.equal(model[1].running_mean, running_mean)
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
    assert int8_share(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))) is None
    assert int8_share(nn.Sequential(nn.Flatten(), nn.Linear(3, 2))) is None


@needs_int8
@pytest.mark.parametrize("name, options", [("unet", {"encoder": "resnet18"}), ("deeplabv3plus", {"encoder": "resnet18"})])
def test_stored_ranges_rebuild_the_calibrated_int8_model_bit_for_bit(name, options):
    model = create_model(name, num_classes=3, **options).eval()
    calibrated = optimize_for_inference(model, "int8", calibration=[torch.randn(2, 3, 64, 64)])
    ranges = json.loads(json.dumps(int8_input_ranges(calibrated.model)))  # as a checkpoint keeps them
    assert len(ranges) > 10
    rebuilt = optimize_for_inference(model, "int8", int8_ranges={k: tuple(v) for k, v in ranges.items()})
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(logits_of(calibrated(images)), logits_of(rebuilt(images)))
    with pytest.raises(ValueError, match="'no.such.conv'"):
        optimize_for_inference(model, "int8", int8_ranges={"no.such.conv": (0.0, 1.0)})
    with pytest.raises(ValueError, match="one of them"):
        optimize_for_inference(model, "int8", calibration=[images], int8_ranges=ranges)


def test_int8_ranges_need_int8():
    model = create_model("unet", num_classes=2, base_channels=4, depth=2).eval()
    with pytest.raises(ValueError, match="only with precision int8"):
        optimize_for_inference(model, "32", int8_ranges={"x": (0.0, 1.0)})


@needs_int8
def test_training_stores_the_ranges_of_the_train_splits_first_images_and_their_validation_miou(tiny_run: Path):
    config = json.loads((tiny_run / "best.json").read_text())
    record = stored_int8(config)
    assert record is not None and record.images == 16
    assert "int8" not in json.loads((tiny_run / "last.json").read_text())  # the best checkpoint only
    assert record.miou_float32 == config["metrics"]["miou"]  # trained in float32: its own validation figure
    # The ranges are those `seglab eval --precision int8` calibrates on: the first 16 train images as evaluation sees them.
    model, _ = load_checkpoint(tiny_run)
    data = dict(config["data"])
    train_split = open_dataset(data.pop("source"), "train", **data)
    normalize = Normalize(config["mean"], config["std"])
    calibration = [normalize(train_split[i]["image"][None]) for i in range(16)]
    assert int8_input_ranges(optimize_for_inference(model, "int8", calibration=calibration).model) == record.ranges


@needs_int8
def test_training_without_int8_calibration_stores_nothing(tmp_path: Path):
    summary = train_tiny(tmp_path, name="no-int8", int8_calibration=False)
    assert "int8" not in json.loads((Path(summary["run_dir"]) / "best.json").read_text())


@needs_int8
def test_auto_predicts_with_the_stored_ranges_where_int8_is_the_choice(tiny_run: Path):
    images = torch.rand(3, 3, 32, 32)
    auto = Predictor.from_checkpoint(tiny_run, device="cpu", precision="auto")
    if default_precision(CPU) == "bf16" and int8_checkpoint.cpu_has("amx_tile"):
        assert auto.precision == "bf16"  # AMX's bfloat16 stays the choice
        return
    # float32 is the fast default, or bf16 without AMX for this U-Net of convolutions
    assert auto.precision == "int8" and auto.int8_ranges_used
    explicit = Predictor.from_checkpoint(tiny_run, device="cpu", precision="int8")
    assert explicit.int8_ranges_used
    assert torch.equal(auto.probabilities(images), explicit.probabilities(images))
    calibrated = Predictor.from_checkpoint(tiny_run, device="cpu", precision="int8", calibration=[images[0]])
    assert calibrated.precision == "int8" and not calibrated.int8_ranges_used
    assert Predictor.from_checkpoint(tiny_run, device="cpu", precision="32").precision == "32"


@needs_int8
def test_ranges_that_do_not_fit_the_model_fall_back_to_float32_under_auto_only(tiny_run: Path, tmp_path: Path):
    run = _copy_with_int8_entry(tiny_run, tmp_path, lambda config: config["int8"].update(ranges={"renamed.conv": [0.0, 1.0]}))
    if default_precision(CPU) == "32":
        with pytest.warns(RuntimeWarning, match="do not fit this model"):
            auto = Predictor.from_checkpoint(run, device="cpu", precision="auto")
        assert auto.precision == "32" and not auto.int8_ranges_used
    with pytest.raises(ValueError, match="'renamed.conv'"):
        Predictor.from_checkpoint(run, device="cpu", precision="int8")


def test_int8_without_calibration_or_stored_ranges_is_refused(tiny_run: Path, tmp_path: Path):
    run = _copy_with_int8_entry(tiny_run, tmp_path, lambda config: config.pop("int8", None))
    with pytest.raises(ValueError, match="stores no int8 ranges"):
        Predictor.from_checkpoint(run, device="cpu", precision="int8")


def test_a_malformed_record_stops_int8_but_auto_passes_it_over(tiny_run: Path, tmp_path: Path):
    run = _copy_with_int8_entry(tiny_run, tmp_path, lambda config: config.update(int8={"ranges": "not a mapping"}))
    assert Predictor.from_checkpoint(run, device="cpu", precision="32").precision == "32"  # not read at all
    with pytest.warns(RuntimeWarning, match="passed over"):
        auto = Predictor.from_checkpoint(run, device="cpu", precision="auto")
    assert auto.precision == default_precision(CPU) and auto.int8_record is None
    with pytest.raises(ValueError, match="run/best.json: its \"int8\" entry"):
        Predictor.from_checkpoint(run, device="cpu", precision="int8")


@needs_int8
def test_no_record_is_kept_for_weights_that_overflowed():
    model = create_model("unet", num_classes=2, base_channels=4, depth=2).eval()
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    validation = [{"image": torch.rand(1, 3, 32, 32), "mask": torch.zeros(1, 32, 32, dtype=torch.long)}]
    record = int8_checkpoint.measure_int8(model, [torch.rand(1, 3, 32, 32)], validation, num_classes=2, ignore_index=255,
                                          normalize=Normalize([0.5] * 3, [0.5] * 3), miou_float32=0.5)
    assert record is None
