"""Mask functions m = f(phi), their initialisations, and the modules that hold phi.

Straight-through functions are written as autograd.Functions so their forward value is exactly the
step (or ReLU) value: `x + (f(x) - x).detach()` would round a binary mask to 1 +- 1e-8, and over a
few inner steps that moves outer gradients visibly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


class BinarySTE(torch.autograd.Function):
    """m = (sign(phi) + 1) / 2 in {0, 1/2, 1}; backward treats sign as the identity (dm/dphi = 1/2)."""

    @staticmethod
    def forward(ctx, phi: torch.Tensor) -> torch.Tensor:
        return 0.5 * (torch.sign(phi) + 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return 0.5 * grad


class ReluSTE(torch.autograd.Function):
    """lr = ReLU(phi) forward, identity backward (sparse-ReLU-MAML)."""

    @staticmethod
    def forward(ctx, phi: torch.Tensor) -> torch.Tensor:
        return torch.relu(phi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


@dataclass(frozen=True)
class MaskFunction:
    """f(phi), and whether its value is a per-weight learning rate (then alpha does not multiply it)."""

    apply: Callable[[torch.Tensor], torch.Tensor]
    is_learning_rate: bool


MASK_FUNCTIONS: dict[str, MaskFunction] = {
    "binary_ste": MaskFunction(BinarySTE.apply, is_learning_rate=False),  # sparse-MAML
    "relu_ste": MaskFunction(ReluSTE.apply, is_learning_rate=True),  # sparse-ReLU-MAML
    "relu": MaskFunction(torch.relu, is_learning_rate=True),
    "linear": MaskFunction(lambda phi: phi, is_learning_rate=True),  # Meta-SGD
    "exp": MaskFunction(torch.exp, is_learning_rate=True),
}


def _centred(phi: torch.Tensor, shift: float) -> torch.Tensor:
    # Centre, then shift: the shift sets the initial fraction of positive entries (sparsity).
    return phi - phi.mean() + shift


def _kaiming(phi: torch.Tensor) -> torch.Tensor:
    # Kaiming-uniform needs a fan-in: vectors (biases, BatchNorm) take uniform(-1/2, 1/2).
    return nn.init.kaiming_uniform_(phi) if phi.ndim > 1 else phi.uniform_(-0.5, 0.5)


# inner.mask_init: name -> (empty phi, shift, step size) -> phi, as the reference initialises it.
MASK_INITS: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "uniform": lambda phi, shift, step_size: _centred(phi.uniform_(-0.5, 0.5), shift),
    "kaiming": lambda phi, shift, step_size: _centred(_kaiming(phi), shift),
    "constant": lambda phi, shift, step_size: phi.fill_(step_size),
    "meta_sgd": lambda phi, shift, step_size: phi.uniform_(0.005, 0.1),
}


def sparsity(mask_value: torch.Tensor) -> float:
    """Fraction of entries that switch inner-loop learning off (mask 0, or learning rate <= 0)."""
    return (mask_value <= 0).float().mean().item()


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


class LearnedMask(nn.Module):
    """One phi per masked parameter, shared by every task (sparse-MAML and the lr variants)."""

    def __init__(self, shapes: dict[str, torch.Size], function: str, init: str, shift: float,
                 step_size: float):
        super().__init__()
        self.names = list(shapes)
        self.function = MASK_FUNCTIONS[function]
        self.phi = nn.ParameterDict({
            _key(n): nn.Parameter(MASK_INITS[init](torch.empty(s), shift, step_size))
            for n, s in shapes.items()})

    def forward(self) -> dict[str, torch.Tensor]:
        """parameter name -> mask value (same shape as the parameter)."""
        return {n: self.function.apply(self.phi[_key(n)]) for n in self.names}


class MaskGenerator(nn.Module):
    """sparse-MAML+: a fresh mask per task for the given conv weights.

    Noise x = eps * s + mu (eps ~ N(0, I), learned scale s and offset mu of size `features`); one
    linear layer maps x to one logit per masked weight; the mask is f(logits + shift).
    """

    def __init__(self, shapes: dict[str, torch.Size], features: int, function: str, shift: float):
        super().__init__()
        self.shapes = dict(shapes)
        self.function = MASK_FUNCTIONS[function]
        self.shift = shift
        self.noise_scale = nn.Parameter(torch.ones(features))
        self.noise_offset = nn.Parameter(torch.zeros(features))
        self.logits = nn.Linear(features, sum(s.numel() for s in self.shapes.values()))

    def draw_noise(self, num_tasks: int) -> torch.Tensor:
        """eps ~ N(0, I) of shape (tasks, features), from torch's global generator."""
        return torch.randn(num_tasks, self.noise_scale.numel(), device=self.noise_scale.device)

    def forward(self, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """(tasks, features) noise -> parameter name -> (tasks, *shape) mask."""
        logits = self.logits(noise * self.noise_scale + self.noise_offset) + self.shift
        chunks = logits.split([s.numel() for s in self.shapes.values()], dim=1)
        return {name: self.function.apply(chunk).reshape(-1, *shape)
                for (name, shape), chunk in zip(self.shapes.items(), chunks)}
