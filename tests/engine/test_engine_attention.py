"""The training route of SegFormer's attention heads (seglab.engine.attention): the context
switches every attention module and restores them, a bf16 training step through it computes
what PyTorch's attention computes to bf16's rounding, and the trainer takes it when asked."""
from __future__ import annotations

import contextlib
import copy
from unittest import mock

import pytest
import torch
from engine_helpers import quiet_console, tiny_options

from seglab.encoders.mit import EfficientSelfAttention
from seglab.engine.attention import TrainingAttention, training_attention
from seglab.engine.config import TrainConfig
from seglab.engine.trainer import Trainer
from seglab.models.registry import create_model
from seglab.ops.token_attention import native_attention_available, native_training_attention

needs_pairs = pytest.mark.skipif(not native_attention_available(),
                                 reason="the route needs the native kernels with AVX-512 BF16's pair products")


def _segformer() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("segformer", num_classes=3, variant="b0", drop_path_rate=0.0).train()


def test_the_context_switches_every_attention_module_and_restores_them():
    model = _segformer()
    attentions = [m for m in model.modules() if isinstance(m, EfficientSelfAttention)]
    attentions[0].native_attention = True  # as the inference fast path may have left one
    with TrainingAttention(model):
        assert len(attentions) == 8 and all(m.native_attention for m in attentions)
    assert [m.native_attention for m in attentions] == [True] + [False] * 7


def test_training_attention_only_for_bf16_on_the_cpu_with_pair_products_and_segformer_attention():
    model = _segformer()
    assert isinstance(training_attention(model, "cpu", "bf16"), TrainingAttention) == native_attention_available()
    assert not isinstance(training_attention(model, "cpu", "bf16", enabled=False), TrainingAttention)
    assert not isinstance(training_attention(model, "cpu", "32"), TrainingAttention)
    assert not isinstance(training_attention(model, "cuda", "bf16"), TrainingAttention)
    unet = create_model("unet", num_classes=3, base_channels=4, depth=2)
    assert not isinstance(training_attention(unet, "cpu", "bf16"), TrainingAttention)  # no attention to route


@needs_pairs
def test_a_bf16_training_step_through_the_route_matches_pytorchs_attention():
    model = _segformer()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 96)
    results = []
    for network, context in ((model, TrainingAttention(model)), (twin, contextlib.nullcontext())):
        with mock.patch("seglab.encoders.mit.native_training_attention", wraps=native_training_attention) as route:
            torch.manual_seed(1)  # the same dropout masks
            with context, torch.autocast("cpu", dtype=torch.bfloat16):
                out = network(x)
            out.float().square().mean().backward()
        results.append((route.call_count, out.detach().float(),
                        {name: p.grad.float() for name, p in network.named_parameters() if p.grad is not None}))
    (calls, out, grads), (twin_calls, twin_out, twin_grads) = results
    assert (calls, twin_calls) == (8, 0)
    assert ((out - twin_out).norm() / twin_out.norm()).item() < 0.02
    assert grads.keys() == twin_grads.keys()
    for name in ("encoder.stages.0.blocks.0.attn.q.weight", "encoder.stages.3.blocks.1.attn.kv.weight"):
        assert name in grads
    for name, grad in grads.items():
        # bf16 autocast's two runs differ by their roundings only: the parameters' gradients agree
        # to a few per cent of their size (a flipped rounding early on moves them that much)
        assert ((grad - twin_grads[name]).norm() / twin_grads[name].norm().clamp_min(1e-12)).item() < 0.1, name


@needs_pairs
def test_the_trainer_takes_the_route_by_default_in_bf16_unless_told_not_to(tmp_path):
    def trainer(**overrides) -> Trainer:
        options = tiny_options(out=str(tmp_path), device="cpu", model="segformer", **overrides)
        options["model_kwargs"] = {"variant": "b0"}
        return Trainer(TrainConfig.from_dict(options), console=quiet_console())

    assert isinstance(trainer(precision="bf16", native_attention=True).attention, TrainingAttention)
    assert isinstance(trainer(precision="bf16").attention, TrainingAttention)  # the default since the 32nd session
    assert not isinstance(trainer(precision="bf16", native_attention=False).attention, TrainingAttention)
    assert not isinstance(trainer(precision="32", native_attention=True).attention, TrainingAttention)
    with pytest.raises(ValueError, match="native_attention must be true, false or null"):
        trainer(precision="bf16", native_attention="yes")
