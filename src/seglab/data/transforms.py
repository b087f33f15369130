"""Joint image + mask augmentation on torchvision.transforms.v2, built from a YAML/dict config.

Samples travel as dicts of tv_tensors, so every geometric step moves the image, the mask (and
any boxes or instance masks a sample carries) together; masks are resized with nearest
neighbour, and areas padded by a crop or uncovered by a rotation get the ignore index, so the
loss never learns from pixels that were invented. Images stay float in [0, 1]: the engine
normalises batches, so training, evaluation and prediction share one normalisation.

Config keys (all optional)::

    scale: [0.5, 2.0]      # random rescale range around image_size, then a random crop of it
    hflip: 0.5             # probability of a horizontal flip
    vflip: 0.0             # probability of a vertical flip
    rotation: 0            # maximum rotation in degrees (uniform in [-r, r])
    color_jitter: 0.2      # brightness/contrast/saturation strength, or a dict with
                           # brightness, contrast, saturation, hue

The scale-and-crop step follows the common recipe of DeepLab and PSPNet (random scale in
[0.5, 2], random crop with padding); torchvision's ScaleJitter (Ghiasi et al. 2021) does the
aspect-preserving rescale.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["DEFAULT_TRAIN_AUGMENT", "build_transform", "image_size_pair", "number_option", "range_option"]

DEFAULT_TRAIN_AUGMENT: dict[str, Any] = {"scale": [0.5, 2.0], "hflip": 0.5, "rotation": 0, "color_jitter": 0.2}
_KEYS = {"scale", "hflip", "vflip", "rotation", "color_jitter"}
_JITTER_KEYS = {"brightness", "contrast", "saturation", "hue"}


def image_size_pair(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """An int means a square; a pair is (height, width)."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be a positive int or [height, width], not {image_size!r}")
    return size  # type: ignore[return-value]


def build_transform(
    augment: Mapping[str, Any] | bool | None,
    image_size: int | Sequence[int] | None,
    train: bool,
    ignore_index: int = 255,
) -> Callable[[dict], dict]:
    """The joint transform for one split.

    Args:
        augment: the config dict; ``None`` means the default for training and nothing for
            evaluation; ``False`` or ``{}`` means no augmentation.
        image_size: training crop / evaluation resize target (int or [h, w]); ``None`` keeps
            the native size.
        train: whether random augmentation applies at all.
        ignore_index: label written into padded areas of the mask.

    Returns:
        A callable taking ``{"image": uint8 3xHxW, "mask": int64 HxW, ...}`` and returning
        ``{"image": float32 in [0, 1], "mask": int64, ...}`` as plain tensors.
    """
    size = image_size_pair(image_size)
    config = _resolve(augment, train, size)
    steps: list[v2.Transform] = [_Wrap()]
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}
    if config.get("scale"):
        low, high = range_option(config["scale"], "scale")
        steps += [v2.ScaleJitter(size, scale_range=(low, high)), v2.RandomCrop(size, pad_if_needed=True, fill=fill)]
    elif size is not None:
        steps.append(v2.Resize(size))
    if config.get("hflip"):
        steps.append(v2.RandomHorizontalFlip(number_option(config["hflip"], "hflip", 0, 1)))
    if config.get("vflip"):
        steps.append(v2.RandomVerticalFlip(number_option(config["vflip"], "vflip", 0, 1)))
    if config.get("rotation"):
        steps.append(v2.RandomRotation(number_option(config["rotation"], "rotation", 0, 180), fill=fill))
    if config.get("color_jitter"):
        steps.append(v2.ColorJitter(**_jitter(config["color_jitter"])))
    steps += [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True), _Unwrap()]
    return v2.Compose(steps)


def _resolve(augment: Mapping[str, Any] | bool | None, train: bool, size: tuple[int, int] | None) -> dict[str, Any]:
    if not train or augment is False:
        return {}
    if augment is None or augment is True:
        config = dict(DEFAULT_TRAIN_AUGMENT)
        if size is None:  # rescale + crop needs a target size; keep the rest of the defaults
            config.pop("scale")
        return config
    if not isinstance(augment, Mapping):
        raise ValueError(f"augment must be a mapping of options, not {augment!r}")
    unknown = set(augment) - _KEYS
    if unknown:
        raise ValueError(f"unknown augment option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_KEYS))}")
    if augment.get("scale") and size is None:
        raise ValueError("augment option 'scale' needs image_size (the crop size); set image_size or drop scale")
    return dict(augment)


def range_option(value: Any, name: str) -> tuple[float, float]:
    """An augment option [low, high] (0 < low <= high) as two floats; one error line otherwise."""
    numbers = isinstance(value, Sequence) and len(value) == 2 and all(_is_number(v) for v in value)
    if not numbers or not 0 < float(value[0]) <= float(value[1]):
        raise ValueError(f"augment option {name!r} must be [low, high] with 0 < low <= high, not {value!r}")
    return float(value[0]), float(value[1])


def number_option(value: Any, name: str, low: float, high: float | None = None) -> float:
    """An augment option that is one number in [low, high] (a probability, an angle; no upper
    bound without `high`), as a float; one error line otherwise (torchvision would take a flip
    probability of 2)."""
    if not _is_number(value) or not low <= value <= (high if high is not None else float("inf")):
        kind = ("a probability between 0 and 1" if (low, high) == (0, 1) else
                f"a number from {low:g} to {high:g}" if high is not None else f"a number of at least {low:g}")
        raise ValueError(f"augment option {name!r} must be {kind}, not {value!r}")
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _jitter(value: Any) -> dict[str, float]:
    if _is_number(value) and value >= 0:
        return {"brightness": float(value), "contrast": float(value), "saturation": float(value)}
    if isinstance(value, Mapping) and set(value) <= _JITTER_KEYS:
        return {key: number_option(v, f"color_jitter.{key}", 0, 0.5 if key == "hue" else None) for key, v in value.items()}
    raise ValueError(f"augment option 'color_jitter' must be a number or a mapping of {sorted(_JITTER_KEYS)}, not {value!r}")


class _Wrap(v2.Transform):
    """Tag the plain tensors so v2 knows which is the image and which the mask."""

    def forward(self, sample: dict) -> dict:  # type: ignore[override]
        out = dict(sample)
        out["image"] = tv_tensors.Image(sample["image"])
        out["mask"] = tv_tensors.Mask(sample["mask"])
        return out


class _Unwrap(v2.Transform):
    """Plain image and mask tensors out; other tv_tensors (boxes, instance masks) stay typed."""

    def forward(self, sample: dict) -> dict:  # type: ignore[override]
        out = dict(sample)
        out["image"] = sample["image"].as_subclass(torch.Tensor)
        out["mask"] = sample["mask"].as_subclass(torch.Tensor)
        return out
