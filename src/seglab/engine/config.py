"""Training configuration: one flat, documented set of options.

A YAML file (`--config`) and the command line fill the same fields; the command line wins.
The defaults are the main job: a U-Net on the built-in synthetic shapes.
"""
from __future__ import annotations

import dataclasses
import types
import warnings
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MAIN_JOB_UNET", "TrainConfig", "load_yaml"]

MAIN_JOB_UNET = {"base_channels": 16, "depth": 4}


@dataclass
class TrainConfig:
    name: str | None = None  # run name; default: <model>-<data>
    out: str = "runs"  # runs are written to <out>/<name>/
    task: str = "semantic"
    model: str = "unet"
    encoder: str | None = None
    model_kwargs: dict[str, Any] | None = None  # default: the main job's small U-Net for a plain "unet", else none
    data: str = "synthetic"
    format: str | None = None
    num_classes: int | None = None  # synthetic only; real data sets know their classes
    image_size: int | list[int] | None = None  # synthetic: 64; real data: native size unless given
    train_samples: int = 3000  # synthetic only
    val_samples: int = 200  # synthetic only
    augment: dict[str, Any] | bool | None = None  # None: the task's default; false: none
    epochs: int = 12
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    # linear learning-rate warm-up; None: the model's or its encoder's recipe (SegFormer, the Mix
    # Transformer encoders: 1 epoch), else 0
    warmup_epochs: float | None = None
    loss: str = "ce+dice"
    class_weights: list[float] | str | None = None
    aux_weight: float = 0.4
    max_minutes: float | None = None  # stop after the epoch that crosses this budget
    fit_to_budget: bool = False  # end the learning-rate schedule with the last epoch that fits max_minutes
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 where native), 32, bf16 (CPU with native support, or CUDA) or 16 (CUDA, with loss scaling)
    # bf16 on the CPU: BatchNorm with the ReLU (or a ResNet block's shortcut and ReLU) by one native
    # kernel, 2-4.5% faster steps (docs/bench.md: ten seeds of the synthetic recipe, twenty-ninth
    # session). None: on where the run trains in bf16 on the CPU; false: PyTorch's norms
    native_norms: bool | None = None
    # bf16 on the CPU (AVX-512 BF16): SegFormer's attention heads by the native kernel forward,
    # which keeps its softmax, and its own backward (seglab.engine.attention), 1.16-1.17x faster
    # steps. None: on where training runs so (ten seeds of the warmed-up SegFormer recipe: +0.81
    # points against PyTorch's attention, -0.11 with the fused backward, docs/bench.md); false:
    # PyTorch's flash attention
    native_attention: bool | None = None
    # bf16 on the CPU: SegFormer's Mix-FFN depthwise convolution and GELU by one native kernel
    # forward and one backward (seglab.engine.mix_ffn). None: on where training runs so (docs/bench.md,
    # thirty-third session); false: PyTorch's operators
    native_mix_ffn: bool | None = None
    direct_convolutions: bool = False  # float32 on the CPU: eager convolutions, no Winograd, no tuned weight gradients
    # float32 on a CPU with VNNI or AMX: the large 1x1 convolutions' forward and input gradient as
    # int8 products with one scale per row (seglab.ops.int8_products); weight gradients stay float32.
    # None: --precision auto's choice (on where auto trains in float32 on such a CPU: no native bf16)
    int8_products: bool | None = None
    # CPU runs on a CPU with VNNI or AMX: end by storing int8 input ranges in the best
    # checkpoint, with the int8 mIoU they give (seglab.engine.int8_checkpoint)
    int8_calibration: bool = True
    deterministic: bool = False  # the same bits every run: fixed CPU weight-gradient kernels, cuDNN's deterministic ones
    accumulate: int = 1  # gradient accumulation: optimiser step every N batches
    clip_grad_norm: float | None = None  # clip the global gradient norm to this value
    ema_decay: float | None = None  # evaluate and save an exponential moving average of the weights
    patience: int | None = None  # early stopping: stop after this many epochs without a better mIoU
    sync_bn: bool = False  # multi-process runs: BatchNorm statistics over the global batch
    tensorboard: bool = False  # also log to <run>/tensorboard (needs the tensorboard package)
    num_overlays: int = 4
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def __post_init__(self) -> None:
        if self.model_kwargs is None:
            # The main job's narrow U-Net; these options mean nothing to other models, and on an
            # encoder U-Net `depth` would silently cut the encoder short (R34 without its 512-channel stage).
            plain_unet = str(self.model).lower() == "unet" and not self.encoder
            self.model_kwargs = dict(MAIN_JOB_UNET) if plain_unet else {}
        if self.warmup_epochs is None:
            self.warmup_epochs = float(_recipe_option(self.model, self.encoder, "warmup_epochs", 0.0))
        if self.data != "synthetic" and Path(self.data).exists():
            # The run records its data by absolute path: --resume and `seglab eval --checkpoint`
            # find it from any folder, not only from the one training started in.
            self.data = str(Path(self.data).resolve())
        self.validate()

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be a positive number, not {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive number, not {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, not {self.lr}")
        if not self.warmup_epochs >= 0:
            raise ValueError(f"--warmup-epochs must be 0 or more, not {self.warmup_epochs}")
        if self.warmup_epochs > self.epochs:
            warnings.warn(f"--warmup-epochs {self.warmup_epochs:g} is longer than the run ({self.epochs} epoch"
                          f"{'s' if self.epochs != 1 else ''}): the learning rate never reaches --lr")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must lie in 0 .. 2**32 - 1, not {self.seed}")
        if self.format is not None and self.data == "synthetic":
            raise ValueError(f"--format {self.format} describes a --data folder; the built-in synthetic set has no layout to name")
        if self.num_classes is not None and self.data != "synthetic":
            raise ValueError(f"--num-classes sets the synthetic set's classes; {self.data}'s come from the data set "
                             "(its classes.yaml or its masks' values)")
        if self.workers < 0:
            raise ValueError(f"--workers must be 0 or more, not {self.workers}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"--optimizer must be adamw or sgd, not {self.optimizer!r}")
        if self.scheduler not in ("cosine", "poly", "constant"):
            raise ValueError(f"--scheduler must be cosine, poly or constant, not {self.scheduler!r}")
        self.precision = str(self.precision).lower()
        if self.precision not in ("auto", "32", "bf16", "16"):
            raise ValueError(f"--precision must be auto, 32, bf16 or 16, not {self.precision!r}")
        if self.int8_products is not None and not isinstance(self.int8_products, bool):
            raise ValueError(f"int8_products must be true, false or null (auto), not {self.int8_products!r}")
        for name in ("native_norms", "native_attention", "native_mix_ffn"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true, false or null (auto), not {getattr(self, name)!r}")
        if self.accumulate < 1:
            raise ValueError(f"--accumulate must be a positive number, not {self.accumulate}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"--clip-grad-norm must be positive, not {self.clip_grad_norm}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"--ema-decay must lie strictly between 0 and 1, not {self.ema_decay}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"--patience must be a positive number of epochs, not {self.patience}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"--max-minutes must be positive, not {self.max_minutes}")
        if self.fit_to_budget and self.max_minutes is None:
            raise ValueError("--fit-to-budget needs a time budget: give --max-minutes too")
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(f"mean and std must give one value per channel each, not {self.mean} and {self.std}")
        if any(not deviation > 0 for deviation in self.std):
            raise ValueError(f"std must be positive (images are divided by it), not {self.std}")
        size = self.image_size
        if size is not None:
            sizes = [size] if isinstance(size, int) else list(size)
            if len(sizes) not in (1, 2) or any(not isinstance(s, int) or s < 8 for s in sizes):
                raise ValueError(f"--image-size must be one or two integers of at least 8, not {size}")
        self._check_augment()

    def _check_augment(self) -> None:
        """Refuse a bad augment option now, in one line, rather than when the data set opens
        (or never: the synthetic set is not augmented)."""
        if self.augment is None or isinstance(self.augment, bool):
            return
        # Imported here: the data package is not needed by a config without augment options.
        if self.task in ("instance", "keypoint"):
            from seglab.data.instance import instance_augment_options

            instance_augment_options(self.augment)
        else:
            from seglab.data.transforms import build_transform

            build_transform(self.augment, self.image_size or 64, train=True)

    @property
    def run_name(self) -> str:
        data = "synthetic" if self.data == "synthetic" else Path(self.data).name
        return self.name or f"{self.model}-{data}"

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _typed(value, hints[name], f"{source}: option {name}") for name, value in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _typed(value: Any, annotation: Any, where: str) -> Any:
    """`value` as the field's type wants it, or one error line naming the option.

    The command line's values arrive typed; a YAML file's may not: `lr: 1e-3` is a string to
    YAML 1.1 (no decimal point), `precision: 32` a number. So numbers written as strings are
    read as numbers, and numbers given for a string option as strings; anything else of the
    wrong kind (`lr: fast`, `epochs: 2.5`, `model_kwargs: [1]`) is refused here, where it
    would otherwise end in a traceback or run with a nonsense setting.
    """
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for kind in kinds:
        converted = _as_kind(value, kind)
        if converted is not _NOT_THIS_KIND:
            return converted
    names = [name for kind in kinds for name in (("true", "false") if kind is bool else (_kind_name(kind),))]
    wanted = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    raise ValueError(f"{where} must be {wanted}, not {value!r}")


_NOT_THIS_KIND = object()


def _as_kind(value: Any, kind: Any) -> Any:
    if kind is Any:
        return value
    if kind is type(None):
        return None if value is None else _NOT_THIS_KIND
    if isinstance(value, bool):  # a bool is an int to Python, never a number of epochs here
        return value if kind is bool else _NOT_THIS_KIND
    if kind is int:
        return value if isinstance(value, int) else _NOT_THIS_KIND
    if kind is float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value) if isinstance(value, str) else _NOT_THIS_KIND
        except ValueError:
            return _NOT_THIS_KIND
    if kind is str:
        return str(value) if isinstance(value, (str, int, float)) else _NOT_THIS_KIND
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin is list and isinstance(value, (list, tuple)):
        items = [_as_kind(item, arguments[0]) for item in value]
        return _NOT_THIS_KIND if any(item is _NOT_THIS_KIND for item in items) else items
    if origin is dict and isinstance(value, dict):
        return value
    return _NOT_THIS_KIND


def _kind_name(kind: Any) -> str:
    if kind is type(None):
        return "null"
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(arguments[0], str(arguments[0]))
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def _recipe_option(model: str, encoder: str | None, option: str, fallback: Any) -> Any:
    """The default for a training option that the model's recipe (its registry entry's `recipe`)
    gives, else its encoder's (`seglab.encoders.encoder_recipe`), else `fallback`."""
    # Imported here: the registry imports every model, which a config with its options given never needs.
    from seglab.encoders import encoder_recipe
    from seglab.models.registry import UnknownModelError, get_model_entry

    try:
        recipe = get_model_entry(str(model)).recipe
    except UnknownModelError:  # the trainer names the unknown model in its own error
        recipe = {}
    return recipe.get(option, encoder_recipe(encoder).get(option, fallback))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    return values
