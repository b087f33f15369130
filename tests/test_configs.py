"""Every recipe in configs/ reads as a training config and builds its model."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from seglab.engine.config import TrainConfig
from seglab.engine.instance import INSTANCE_DEFAULTS, model_kwargs_for
from seglab.models import create_model

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_reads_and_builds_its_model(path: Path) -> None:
    values = yaml.safe_load(path.read_text())
    if values.get("task") == "instance":
        values = {**INSTANCE_DEFAULTS, **values}
    config = TrainConfig.from_dict(values, source=str(path))
    kwargs = dict(config.model_kwargs)
    if config.task == "instance":
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
