"""The training route of BatchNorms (seglab.engine.norms): which norms take a ReLU or a block's
shortcut along, the same training as the modules' own (values, gradients, running statistics),
what falls back, and that leaving the context restores the modules."""
from __future__ import annotations

import contextlib
import copy

import pytest
import timm
import torch
import torch.nn as nn
from engine_helpers import needs_bf16, quiet_console, tiny_options

import seglab.engine.norms as norms_module
import seglab.ops.batch_norm as batch_norm_module
from seglab.engine.config import TrainConfig
from seglab.engine.fastpath import to_channels_last
from seglab.engine.norms import TrainingNorms, norm_relu_pairs, training_norms
from seglab.engine.trainer import Trainer
from seglab.models.registry import create_model
from seglab.ops import native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"the native kernels are not available: {native.unavailable_reason()}")


def _train_step(model: nn.Module, x: torch.Tensor, context, bf16: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks
    with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    out = out["out"] if isinstance(out, dict) else out
    (out.float().square().mean()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach().float(), grads


def _routed_calls(monkeypatch) -> list[bool]:
    """Counts the native calls (True: with a shortcut) made after this, the block ends whose
    output goes on twice (`batch_norm_act_twice`) among them."""
    calls: list[bool] = []
    original, twice = norms_module.batch_norm_act, norms_module.batch_norm_act_twice

    def counted(x, norm, *, relu=False, shortcut=None):
        calls.append(shortcut is not None)
        return original(x, norm, relu=relu, shortcut=shortcut)

    def counted_twice(x, norm, *, shortcut):
        calls.append(True)
        return twice(x, norm, shortcut=shortcut)

    monkeypatch.setattr(norms_module, "batch_norm_act", counted)
    monkeypatch.setattr(norms_module, "batch_norm_act_twice", counted_twice)
    return calls


@pytest.mark.parametrize("name, kwargs", [("unet", {"encoder": "resnet18"}), ("fcn8s", {"encoder": "resnet50"}),
                                          ("deeplabv3plus", {"encoder": "resnet18"})])
def test_trains_as_the_modules_do(name, kwargs, monkeypatch):
    # In float32 (the kernels compute it; the route takes it here only because the test asks)
    # the rerouted model must train as the modules do, to float32 rounding.
    monkeypatch.setattr(batch_norm_module, "_ROUTED_DTYPES", (torch.float32, torch.bfloat16))
    calls = _routed_calls(monkeypatch)
    torch.manual_seed(0)
    model = to_channels_last(create_model(name, num_classes=3, **kwargs).train())
    twin = copy.deepcopy(model)
    x = to_channels_last(torch.randn(2, 3, 64, 64))
    out, grads = _train_step(model, x, TrainingNorms(model))
    want_out, want_grads = _train_step(twin, x, contextlib.nullcontext())
    blocks = sum(type(m).__name__ in ("BasicBlock", "Bottleneck") for m in model.modules())
    assert sum(calls) == blocks and len(calls) > blocks  # each block's end, and the other norms
    assert torch.allclose(out, want_out, rtol=1e-4, atol=1e-4)
    assert grads.keys() == want_grads.keys()
    for key, grad in grads.items():
        want = want_grads[key]
        assert torch.allclose(grad, want, rtol=1e-3, atol=1e-3 * want.abs().max().item() + 1e-7), key
    for (key, buffer), want in zip(model.named_buffers(), twin.buffers()):
        assert torch.allclose(buffer.float(), want.float(), rtol=1e-4, atol=1e-5), key


def test_bf16_autocast_takes_the_route_as_accurately(monkeypatch):
    calls = _routed_calls(monkeypatch)
    torch.manual_seed(0)
    model = to_channels_last(create_model("unet", num_classes=3, encoder="resnet18").train())
    twin, reference = copy.deepcopy(model), copy.deepcopy(model)
    x = to_channels_last(torch.randn(2, 3, 64, 64))
    out, grads = _train_step(model, x, TrainingNorms(model), bf16=True)
    assert sum(calls) == 8 and len(calls) > 8  # resnet18's 8 blocks, the stem and the decoder's norms
    pytorch_out, pytorch_grads = _train_step(twin, x, contextlib.nullcontext(), bf16=True)
    want, want_grads = _train_step(reference, x, contextlib.nullcontext())  # float32

    # bf16 rounds differently on the route (the norm, the sum and the ReLU's mask in float32,
    # then one rounding): against float32 it must be as accurate as PyTorch's bf16 operators.
    def error(value: torch.Tensor, expected: torch.Tensor) -> float:
        return ((value - expected).norm() / expected.norm()).item()

    def flat(gradients: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([gradients[key].flatten() for key in sorted(want_grads)])

    assert error(out, want) <= 1.2 * error(pytorch_out, want) + 1e-3
    assert error(flat(grads), flat(want_grads)) <= 1.2 * error(flat(pytorch_grads), flat(want_grads)) + 1e-3


def test_pairs_and_blocks_of_a_resnet():
    model = timm.create_model("resnet26", num_classes=0)
    norms = TrainingNorms(model)
    # Every Bottleneck's bn1 -> act1 and bn2 -> act2, and each block ends in one call; not the
    # stem's bn1 -> act1: timm's ResNet runs its children by a forward of its own.
    bottlenecks = [m for m in model.modules() if type(m).__name__ == "Bottleneck"]
    assert len(norms.blocks) == len(bottlenecks) == 8
    pairs = norm_relu_pairs(model)
    assert len(pairs) == 2 * len(bottlenecks)
    assert all(pair in pairs for block in bottlenecks for pair in ((block.bn1, block.act1), (block.bn2, block.act2)))
    paired = {id(norm) for norm, relu in norms.norms if relu is not None}
    assert id(model.bn1) not in paired and id(bottlenecks[0].bn3) not in paired


def test_sequential_pairs_only_where_children_run_in_order():
    class Reordered(nn.Sequential):
        def forward(self, x):  # the ReLU before the norm
            return self[1](self[2](self[0](x)))

    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    reordered = Reordered(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    assert norm_relu_pairs(plain) == [(plain[1], plain[2])]
    assert norm_relu_pairs(reordered) == []
    shared = nn.BatchNorm2d(4)  # registered twice: it may run after something else too
    twice = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.ReLU()), nn.Sequential(shared, nn.Conv2d(4, 4, 1)))
    assert norm_relu_pairs(twice) == []
    assert TrainingNorms(twice).norms == []


def test_blocks_with_squeeze_excitation_keep_their_forward():
    model = timm.create_model("seresnet18", num_classes=0)
    assert TrainingNorms(model).blocks == []


def test_the_context_restores_the_modules_and_evaluation_falls_back():
    torch.manual_seed(0)
    model = to_channels_last(create_model("unet", num_classes=3, encoder="resnet18"))
    x = to_channels_last(torch.randn(1, 3, 64, 64))
    model.eval()
    with torch.no_grad():
        want = model(x)
        with TrainingNorms(model) as norms:
            assert norms.norms
            got = model(x)  # eval mode: the modules' own computation
    assert torch.equal(got, want)
    assert not any("forward" in vars(m) for m in model.modules())


def test_nchw_maps_fall_back(monkeypatch):
    calls = _routed_calls(monkeypatch)
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, encoder="resnet18").train()  # NCHW
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    out, grads = _train_step(model, x, TrainingNorms(model), bf16=True)
    want, want_grads = _train_step(twin, x, contextlib.nullcontext(), bf16=True)
    assert calls == []
    assert torch.equal(out, want)
    for key, grad in grads.items():
        assert torch.equal(grad, want_grads[key]), key


@needs_bf16
def test_training_norms_only_for_bf16_on_the_cpu_when_enabled():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    assert isinstance(training_norms(model, "cpu", "bf16"), TrainingNorms)
    assert not isinstance(training_norms(model, "cpu", "bf16", enabled=False), TrainingNorms)
    assert not isinstance(training_norms(model, "cpu", "32"), TrainingNorms)  # float32 maps: PyTorch's
    assert not isinstance(training_norms(model, "cuda", "bf16"), TrainingNorms)


@needs_bf16
def test_the_trainer_takes_the_route_by_default_in_bf16_unless_told_not_to(tmp_path):
    def trainer(**overrides) -> Trainer:
        config = TrainConfig.from_dict(tiny_options(out=str(tmp_path), device="cpu", **overrides))
        return Trainer(config, console=quiet_console())

    assert isinstance(trainer(precision="bf16").norms, TrainingNorms)  # the default: docs/bench.md, 29th session
    assert isinstance(trainer(precision="bf16", native_norms=True).norms, TrainingNorms)
    assert not isinstance(trainer(precision="bf16", native_norms=False).norms, TrainingNorms)
    assert not isinstance(trainer(precision="32").norms, TrainingNorms)  # float32 maps: PyTorch's norms
    with pytest.raises(ValueError, match="native_norms must be true, false or null"):
        trainer(precision="bf16", native_norms="yes")


@needs_bf16
@pytest.mark.parametrize("name, kwargs", [("unet", {"encoder": "resnet34"}), ("fcn8s", {"encoder": "resnet50"})])
def test_a_blocks_output_handed_on_twice_gives_the_same_bits_as_autograds_sum(name, kwargs, monkeypatch):
    """Within a stage each block's output reaches the next block's first convolution and its
    shortcut as two tensors, whose gradients the norm's backward adds itself (bf16 autocast,
    the route as the trainer takes it): the same output and gradients, bit for bit, as with
    the stages' own forward (autograd adding the two gradients); every identity block's input
    after a stage's first comes that way."""
    torch.manual_seed(0)
    model = to_channels_last(create_model(name, num_classes=3, **kwargs).train())
    x = to_channels_last(torch.randn(2, 3, 64, 64))
    routed = TrainingNorms(model)
    seconds = []
    original = native.batch_norm_backward

    def counted(*args, **options):
        seconds.append(options.get("grad2") is not None)
        return original(*args, **options)

    monkeypatch.setattr(native, "batch_norm_backward", counted)
    out, grads = _train_step(model, x, routed, bf16=True)
    plain = TrainingNorms(model)
    plain.stages = []
    want_out, want_grads = _train_step(model, x, plain, bf16=True)
    # every identity block but a stage's first (ResNet-34's first takes the max pooling's output)
    fed_twice = sum(block.downsample is None for stage in routed.stages for block in list(stage)[1:])
    assert len(routed.stages) == 4 and sum(seconds) == fed_twice == 12  # ResNet-34 and ResNet-50 alike
    assert torch.equal(out, want_out) and grads.keys() == want_grads.keys()
    assert all(torch.equal(grads[key], want_grads[key]) for key in grads)
    assert all("forward" not in stage.__dict__ for stage in routed.stages)  # restored on exit
