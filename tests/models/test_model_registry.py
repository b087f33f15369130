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


def test_task_filter():
    semantic = seglab.list_models("semantic")
    assert "unet" in semantic and "mask_rcnn" not in semantic


def test_unknown_model_names_the_model_and_lists_known_ones():
    with pytest.raises(UnknownModelError, match="unknown model 'not_a_model'.*unet"):
        seglab.create_model("not_a_model", num_classes=2)


def test_an_option_the_builder_does_not_take_is_a_clear_error():
    with pytest.raises(ValueError, match="'segnet' does not take the option\\(s\\) encoder"):
        seglab.create_model("segnet", num_classes=2, encoder="resnet18")


def test_names_are_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        register_model("unet")(lambda **kwargs: torch.nn.Identity())
