"""Checkpoints: save/load round trip and clear errors for files that are not seglab checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seglab.engine.checkpoint import load_checkpoint, read_checkpoint_config, resolve_checkpoint, save_checkpoint
from seglab.models import create_model


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("unet", num_classes=3, in_channels=3, base_channels=4, depth=2).eval()


def test_round_trip_gives_the_same_outputs(tmp_path: Path) -> None:
    model = _model()
    with torch.no_grad():  # move BatchNorm statistics away from their defaults
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
    config = {"model": "unet", "kwargs": {"num_classes": 3, "in_channels": 3, "base_channels": 4, "depth": 2},
              "classes": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.2] * 3}
    save_checkpoint(tmp_path / "ckpt", model, config)
    loaded, loaded_config = load_checkpoint(tmp_path / "ckpt.safetensors")
    image = torch.rand(2, 3, 24, 40)
    with torch.no_grad():
        assert torch.equal(model(image), loaded(image))
    assert loaded_config["classes"] == ["a", "b", "c"] and not loaded.training
    # A run directory resolves to its best checkpoint.
    save_checkpoint(tmp_path / "run" / "best", model, config)
    assert resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "best"


def test_missing_checkpoint_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "empty-run")


def test_foreign_files_are_rejected_with_one_sentence(tmp_path: Path) -> None:
    weights = save_checkpoint(tmp_path / "ok", _model(), {"model": "unet", "kwargs": {"num_classes": 3, "base_channels": 4, "depth": 2}})
    (tmp_path / "ok.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="is not a seglab checkpoint config"):
        read_checkpoint_config(weights)
    (tmp_path / "lonely.safetensors").write_bytes(weights.read_bytes())
    with pytest.raises(ValueError, match="is missing beside it"):
        load_checkpoint(tmp_path / "lonely.safetensors")
    save_checkpoint(tmp_path / "broken", _model(), {"model": "unet", "kwargs": {"num_classes": 3, "base_channels": 4, "depth": 2}})
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "broken")
    # weights of another size than the config builds (an edited JSON): one sentence, not torch's list
    save_checkpoint(tmp_path / "edited", _model(), {"model": "unet", "kwargs": {"num_classes": 5, "base_channels": 4, "depth": 2}})
    with pytest.raises(ValueError, match=r"edited.safetensors does not match model 'unet' as edited.json builds it: "
                                         r"2 tensors of other shapes \(e.g. head.bias: \(3,\) in the file, \(5,\) in the model\)"):
        load_checkpoint(tmp_path / "edited")
    (tmp_path / "photo.png").write_bytes(b"an image, not a checkpoint")  # exists: not "does not exist"
    with pytest.raises(ValueError, match="photo.png is not a seglab checkpoint: give a run directory"):
        load_checkpoint(tmp_path / "photo.png")


def test_dots_in_a_checkpoint_name_belong_to_the_name(tmp_path: Path) -> None:
    weights = save_checkpoint(tmp_path / "model.v2", _model(), {"model": "unet", "kwargs": {"num_classes": 3, "base_channels": 4, "depth": 2}})
    assert weights == tmp_path / "model.v2.safetensors" and (tmp_path / "model.v2.json").is_file()
    for given in ("model.v2", "model.v2.safetensors", "model.v2.json"):
        model, config = load_checkpoint(tmp_path / given)
        assert config["model"] == "unet" and not model.training


def test_a_checkpoint_loads_without_the_weights_file_it_started_from(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from seglab.encoders import create_encoder

    start = tmp_path / "resnet18.safetensors"
    save_file(create_encoder("resnet18").model.state_dict(), str(start))  # timm's names
    kwargs = {"num_classes": 3, "encoder": "resnet18", "encoder_weights": str(start)}
    model = create_model("unet", **kwargs).eval()
    save_checkpoint(tmp_path / "ckpt", model, {"model": "unet", "kwargs": kwargs})
    start.unlink()  # the run's own tensors are in the checkpoint; the starting file is not needed
    loaded, config = load_checkpoint(tmp_path / "ckpt")
    assert config["kwargs"]["encoder_weights"] == str(start)  # still recorded: where the run began
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(image), loaded(image))


def test_a_module_reachable_under_two_names_saves_and_loads(tmp_path: Path) -> None:
    """Tied weights list one tensor under two names; safetensors refuses shared memory."""
    from safetensors.torch import load_file

    model = _model()
    model.tied = model.head  # the same module, a second name in the state dict
    config = {"model": "unet", "kwargs": {"num_classes": 3, "in_channels": 3, "base_channels": 4, "depth": 2}}
    weights = save_checkpoint(tmp_path / "tied", model, config)
    saved = load_file(str(weights))
    assert torch.equal(saved["tied.weight"], saved["head.weight"])
    fresh = create_model("unet", num_classes=3, in_channels=3, base_channels=4, depth=2)
    fresh.tied = fresh.head
    fresh.load_state_dict(saved)  # strict: every name is there
    assert torch.equal(fresh.head.weight, model.head.weight)
