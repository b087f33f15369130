"""Exponential moving average of model weights (Polyak averaging), evaluated instead of the raw model."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """ema = decay * ema + (1 - decay) * weights after every optimiser step.

    The effective decay ramps up as min(decay, (1 + n) / (10 + n)) over the first n updates, so
    that a short run is not dominated by the random initial weights. Buffers (BatchNorm running
    statistics) are averaged the same way; integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema-decay must lie strictly between 0 and 1, not {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, current in zip(self.module.state_dict().values(), model.state_dict().values()):
            if average.is_floating_point():
                average.lerp_(current.detach().to(average.dtype), 1.0 - decay)
            else:
                average.copy_(current)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
