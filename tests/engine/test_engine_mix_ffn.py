"""The training route of SegFormer's Mix-FFN (seglab.engine.mix_ffn): the context switches every
Mix-FFN and restores them, a bf16 training step through it computes what PyTorch's operators
compute to bf16's rounding, and the trainer takes it by default in bf16 on the CPU."""
from __future__ import annotations

import contextlib
import copy
from unittest import mock

import pytest
import torch
from engine_helpers import quiet_console, tiny_options

from seglab.encoders.mit import MixFFN
from seglab.engine.config import TrainConfig
from seglab.engine.mix_ffn import TrainingMixFFN, training_mix_ffn
from seglab.engine.trainer import Trainer
from seglab.models.registry import create_model
from seglab.ops import native
from seglab.ops.depthwise_gelu import native_depthwise_gelu

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"the route needs the native kernels: {native.unavailable_reason()}")


def _segformer() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("segformer", num_classes=3, variant="b0", drop_path_rate=0.0).train()


def test_the_context_switches_every_mix_ffn_and_restores_them():
    model = _segformer()
    blocks = [m for m in model.modules() if isinstance(m, MixFFN)]
    blocks[0].native_training = True
    with TrainingMixFFN(model):
        assert len(blocks) == 8 and all(m.native_training for m in blocks)
    assert [m.native_training for m in blocks] == [True] + [False] * 7


@needs_native
def test_training_mix_ffn_only_for_bf16_on_the_cpu_and_models_with_mix_ffn():
    model = _segformer()
    assert isinstance(training_mix_ffn(model, "cpu", "bf16"), TrainingMixFFN)
    assert not isinstance(training_mix_ffn(model, "cpu", "bf16", enabled=False), TrainingMixFFN)
    assert not isinstance(training_mix_ffn(model, "cpu", "32"), TrainingMixFFN)
    assert not isinstance(training_mix_ffn(model, "cuda", "bf16"), TrainingMixFFN)
    unet = create_model("unet", num_classes=3, base_channels=4, depth=2)
    assert not isinstance(training_mix_ffn(unet, "cpu", "bf16"), TrainingMixFFN)


@needs_native
def test_a_bf16_training_step_through_the_route_is_as_close_to_float32_as_pytorchs_bf16_operators():
    model = _segformer()
    twin, reference = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 96)
    results = []
    for network, context, bf16 in ((model, TrainingMixFFN(model), True), (twin, contextlib.nullcontext(), True),
                                   (reference, contextlib.nullcontext(), False)):
        with mock.patch("seglab.encoders.mit.native_depthwise_gelu", wraps=native_depthwise_gelu) as route:
            torch.manual_seed(1)  # the same dropout masks
            with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = network(x)
            out.float().square().mean().backward()
        results.append((route.call_count, out.detach().float(),
                        {name: p.grad.float() for name, p in network.named_parameters() if p.grad is not None}))
    (calls, out, grads), (twin_calls, twin_out, twin_grads), (_, exact_out, exact) = results
    assert (calls, twin_calls) == (8, 0)
    assert ((out - exact_out).norm() / exact_out.norm()).item() < 0.02
    assert grads.keys() == twin_grads.keys() == exact.keys()
    assert "encoder.stages.0.blocks.0.ffn.dwconv.weight" in grads
    largest = max(g.norm() for g in exact.values())
    checked = 0
    for name, grad in exact.items():
        if grad.norm() < 1e-6 * largest:  # zero but for rounding (biases before a BatchNorm)
            continue
        error = ((grads[name] - grad).norm() / grad.norm()).item()
        pytorch_error = ((twin_grads[name] - grad).norm() / grad.norm()).item()
        assert error < 2 * pytorch_error + 0.02, name
        checked += 1
    assert checked > 100


@needs_native
def test_the_trainer_takes_the_route_by_default_in_bf16_unless_told_not_to(tmp_path):
    def trainer(**overrides) -> Trainer:
        options = tiny_options(out=str(tmp_path), device="cpu", model="segformer", **overrides)
        options["model_kwargs"] = {"variant": "b0"}
        return Trainer(TrainConfig.from_dict(options), console=quiet_console())

    assert isinstance(trainer(precision="bf16").mix_ffn, TrainingMixFFN)
    assert not isinstance(trainer(precision="bf16", native_mix_ffn=False).mix_ffn, TrainingMixFFN)
    assert not isinstance(trainer(precision="32").mix_ffn, TrainingMixFFN)
    with pytest.raises(ValueError, match="native_mix_ffn must be true, false or null"):
        trainer(precision="bf16", native_mix_ffn="yes")
