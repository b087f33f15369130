"""Every recipe in configs/ reads as a training config and builds its model."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from seglab.engine.config import TrainConfig
from seglab.engine.instance import INSTANCE_DEFAULTS, model_kwargs_for
from seglab.engine.keypoints import KEYPOINT_DEFAULTS
from seglab.models import create_model

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_reads_and_builds_its_model(path: Path) -> None:
    values = yaml.safe_load(path.read_text())
    defaults = {"instance": INSTANCE_DEFAULTS, "keypoint": KEYPOINT_DEFAULTS}.get(values.get("task"), {})
    config = TrainConfig.from_dict({**defaults, **values}, source=str(path))
    kwargs = dict(config.model_kwargs)
    if config.task in ("instance", "keypoint"):
        kwargs = model_kwargs_for(config.model, config.image_size, kwargs)
    if config.encoder:
        kwargs["encoder"] = config.encoder
    model = create_model(config.model, num_classes=3, **kwargs)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("model, encoder", [("unet", None), ("unet", "resnet34"), ("deeplabv3plus", "resnet18"),
                                            ("fpn", "resnet18"), ("segformer", None)])
def test_the_default_options_build_any_model_named_on_the_command_line(model: str, encoder: str | None) -> None:
    """`seglab train --model M [--encoder E]`: the main job's U-Net widths go to the plain U-Net only
    (on an encoder U-Net its depth 4 would drop the encoder's last stage)."""
    config = TrainConfig.from_dict({"model": model, **({"encoder": encoder} if encoder else {})})
    assert config.model_kwargs == ({"base_channels": 16, "depth": 4} if (model, encoder) == ("unet", None) else {})
    kwargs = {**config.model_kwargs, **({"encoder": encoder} if encoder else {})}
    model_built = create_model(model, num_classes=3, **kwargs)
    if encoder == "resnet34":
        assert model_built.encoder.channels[-1] == 512


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lr": "fast"}, "options: option lr must be a number, not 'fast'"),
        ({"epochs": 2.5}, "option epochs must be an integer, not 2.5"),
        ({"epochs": True}, "option epochs must be an integer"),
        ({"augment": [1]}, "option augment must be a mapping, true, false or null"),
        ({"image_size": [64, "x"]}, "option image_size must be an integer, a list of integers or null"),
        ({"model_kwargs": "big"}, "option model_kwargs must be a mapping or null"),
        ({"std": [0.2, 0.0, 0.2]}, "std must be positive"),
        ({"mean": [0.5], "std": [0.2, 0.2]}, "one value per channel"),
        ({"augment": {"hflip": 2}}, "'hflip' must be a probability"),
        ({"task": "instance", "augment": {"copy_paste": 2}}, "'copy_paste' must be a probability"),
        ({"seed": -1}, "--seed must lie in 0 .. 2\\*\\*32 - 1, not -1"),  # NumPy's words before, naming no option
        ({"format": "camvid"}, "--format camvid describes a --data folder"),  # ignored before
    ],
)
def test_a_config_file_of_wrong_kinds_is_refused_in_one_line(values: dict, message: str) -> None:
    # A YAML file's values arrive untyped; before, `lr: fast` ended in a TypeError traceback and
    # `augment: {hflip: 2}` trained.
    with pytest.raises(ValueError, match=message.replace("[", "\\[")):
        TrainConfig.from_dict(values, source="options")


def test_numbers_yaml_reads_as_strings_or_strings_as_numbers_are_taken() -> None:
    values = yaml.safe_load("lr: 1e-3\nweight_decay: 5e-5\nprecision: 32\nname: 7\nmean: [0.5, 0.5, 0.5]\naugment: false\n")
    assert values["lr"] == "1e-3"  # YAML 1.1: no decimal point, so a string
    config = TrainConfig.from_dict(values)
    assert config.lr == 0.001 and config.weight_decay == 5e-5 and config.precision == "32" and config.name == "7"
    assert config.mean == [0.5, 0.5, 0.5] and config.augment is False


def test_a_warm_up_longer_than_the_run_is_warned_about() -> None:
    with pytest.warns(UserWarning, match=r"--warmup-epochs 5 is longer than the run \(2 epochs\)"):
        TrainConfig(epochs=2, warmup_epochs=5)
