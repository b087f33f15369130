import pytest
import torch

import seglab
from seglab.models import UnknownModelError, get_model_entry, register_model


def test_every_listed_model_has_an_entry_with_a_task_and_paper():
    names = seglab.list_models()
    assert {"unet", "fcn8s", "segnet", "deeplabv3plus", "segformer", "mask_rcnn", "yolact"} <= set(names)
    for name in names:
        entry = get_model_entry(name)
        assert entry.task in ("semantic", "instance", "keypoint", "image2image")
        assert entry.paper


def test_recipes_name_training_options_and_are_read_only():
    import dataclasses

    from seglab.engine.config import TrainConfig

    options = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in seglab.list_models():
        recipe = get_model_entry(name).recipe
        assert set(recipe) <= options, f"{name}'s recipe names an option TrainConfig lacks"
    assert get_model_entry("segformer").recipe == {"warmup_epochs": 1.0}
    with pytest.raises(TypeError):
        get_model_entry("segformer").recipe["warmup_epochs"] = 0.0  # type: ignore[index]


def test_task_filter():
    semantic = seglab.list_models("semantic")
    assert "unet" in semantic and "mask_rcnn" not in semantic


def test_unknown_model_names_the_model_and_lists_known_ones():
    with pytest.raises(UnknownModelError, match="unknown model 'not_a_model'.*unet"):
        seglab.create_model("not_a_model", num_classes=2)


def test_an_option_the_builder_does_not_take_is_a_clear_error():
    with pytest.raises(ValueError, match="'segnet' does not take the option\\(s\\) encoder"):
        seglab.create_model("segnet", num_classes=2, encoder="resnet18")


def test_an_option_of_the_wrong_type_is_a_clear_error():
    # Scalar options are checked against the builder's type hints before any layer is built.
    with pytest.raises(ValueError, match="'yolact' option proto_width must be int, got 'abc'"):
        seglab.create_model("yolact", num_classes=3, proto_width="abc")
    with pytest.raises(ValueError, match="option output_stride must be int, got '8'"):
        seglab.create_model("deeplabv3plus", num_classes=3, encoder="resnet18", output_stride="8")
    with pytest.raises(ValueError, match="option detections_per_image must be int, got 2.5"):
        seglab.create_model("yolact", num_classes=3, detections_per_image=2.5)
    # An int is a float; None where the hint allows it; lists for tuple options are not checked.
    seglab.create_model("yolact", num_classes=3, encoder="resnet10t", fpn_channels=16, semantic_weight=2, encoder_weights=None)
    seglab.create_model("unet", num_classes=3, encoder="resnet18", decoder_channels=[64, 32, 16, 8, 4])


def test_integer_sizes_below_one_are_a_clear_error():
    # Before the check: "negative dimension" or "weight of size [0, ...]" RuntimeErrors from a layer.
    with pytest.raises(ValueError, match="'yolact' option proto_width must be at least 1, got -1"):
        seglab.create_model("yolact", num_classes=3, proto_width=-1)
    with pytest.raises(ValueError, match="option num_prototypes must be at least 1, got 0"):
        seglab.create_model("yolact", num_classes=3, num_prototypes=0)
    with pytest.raises(ValueError, match="'unet' option num_classes must be at least 1, got 0"):
        seglab.create_model("unet", num_classes=0)
    with pytest.raises(ValueError, match="option min_size must be at least 0, got -1"):
        seglab.create_model("mask_rcnn", num_classes=3, min_size=-1)
    seglab.create_model("mask_rcnn", num_classes=3, encoder="resnet10t", fpn_channels=16, min_size=0)  # 0: no resizing


def test_names_are_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        register_model("unet")(lambda **kwargs: torch.nn.Identity())
