"""The inner loop: which parameters adapt, the masked update rule, and its eager implementations.

`adapt_reference` is the plain per-task loop, written to mirror the reference code step by step.
`adapt_batched` adapts all tasks of a meta-batch in a loop or in one torch.func.vmap call and, for
first-order runs, builds the outer graph in closed form (see its docstring). The compiled
implementation lives in compiled.py. Tests check that all give the same outer gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

Params = dict[str, torch.Tensor]


def inner_parameter_names(model: nn.Module, adapt: str, adapt_batchnorm: bool,
                          adapt_shortcut: bool) -> list[str]:
    """Names of the parameters that adapt in the inner loop, decided from module structure."""
    head = {f"head.{n}" for n, _ in model.head.named_parameters()}
    excluded: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if not adapt_batchnorm and isinstance(module, nn.modules.batchnorm._BatchNorm):
            excluded |= {prefix + n for n, _ in module.named_parameters()}
        shortcut = getattr(module, "shortcut", None)
        if not adapt_shortcut and isinstance(shortcut, nn.Module):
            excluded |= {f"{prefix}shortcut.{n}" for n, _ in shortcut.named_parameters()}
    wanted = {"all": lambda name: True, "head": head.__contains__,
              "body": lambda name: name not in head}[adapt]
    return [name for name, _ in model.named_parameters() if wanted(name) and name not in excluded]


@dataclass(frozen=True)
class UpdateRule:
    """How one inner step changes a parameter, given its gradient g and its mask m (or None)."""

    step_size: float
    mask_is_learning_rate: bool = False
    mask_on_weight: bool = False

    def initial(self, theta: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Starting point of the inner loop: theta, or theta*m for the weight-mask variant."""
        return theta * mask if (self.mask_on_weight and mask is not None) else theta

    def step(self, p: torch.Tensor, g: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """p <- p - alpha*g, masked as configured (operation order as in the reference)."""
        if mask is None:
            return p - self.step_size * g
        if self.mask_on_weight:
            return (p - self.step_size * g) * mask
        if self.mask_is_learning_rate:
            return p - g * mask  # the mask is the learning rate: alpha does not multiply it
        return p - self.step_size * (g * mask)

    @property
    def linear_in_gradient(self) -> bool:
        """True when T steps with fixed mask equal one step with the summed gradients."""
        return not self.mask_on_weight


def cross_entropy(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model with `params` on (x, y)."""
    return F.cross_entropy(functional_call(model, params, (x,), strict=True), y)


def adapt_reference(model: nn.Module, params: Params, inner_names: list[str], masks: Params,
                    rule: UpdateRule, x: torch.Tensor, y: torch.Tensor, steps: int,
                    first_order: bool, track_outer: bool = True,
                    checkpoint_steps: bool = False) -> Params:
    """Adapt one task: `steps` masked SGD steps on (x, y), starting from `params`.

    With track_outer the result stays differentiable w.r.t. theta and phi (first-order: through
    the update chain only; second-order: also through the inner gradients). Without it, every step
    is detached (evaluation). checkpoint_steps (second-order only) keeps no activation of an inner
    step for the outer backward pass; they are recomputed there, one step at a time.
    """
    if checkpoint_steps and track_outer and not first_order:
        return _adapt_second_order_checkpointed(model, params, inner_names, masks, rule, x, y, steps)
    fast = dict(params)
    for name in inner_names:
        fast[name] = rule.initial(fast[name], masks.get(name))
    for _ in range(steps):
        if not track_outer:
            fast = {n: (p.detach().requires_grad_() if n in inner_names else p.detach())
                    for n, p in fast.items()}
        with torch.enable_grad():
            loss = cross_entropy(model, fast, x, y)
            grads = torch.autograd.grad(loss, [fast[n] for n in inner_names],
                                        create_graph=track_outer and not first_order)
        with torch.set_grad_enabled(track_outer):
            for name, g in zip(inner_names, grads):
                fast[name] = rule.step(fast[name], g, masks.get(name))
    return fast if track_outer else {n: p.detach() for n, p in fast.items()}


def _adapt_second_order_checkpointed(model: nn.Module, params: Params, inner_names: list[str],
                                     masks: Params, rule: UpdateRule, x: torch.Tensor,
                                     y: torch.Tensor, steps: int) -> Params:
    """Second-order adaptation with each inner step under activation checkpointing.

    The graph of one step (forward, backward with create_graph) is what a 35-step second-order run
    keeps 35 times; here only each step's input weights are kept, and the backward pass recomputes
    the step before differentiating through it: about one more forward and backward per step.
    """
    frozen = {n: p for n, p in params.items() if n not in inner_names}

    def one_step(*inner: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss = cross_entropy(model, {**frozen, **dict(zip(inner_names, inner))}, x, y)
        grads = torch.autograd.grad(loss, inner, create_graph=True)
        return tuple(rule.step(p, g, masks.get(n)) for n, p, g in zip(inner_names, inner, grads))

    fast = tuple(rule.initial(params[n], masks.get(n)) for n in inner_names)
    for _ in range(steps):
        fast = checkpoint(one_step, *fast, use_reentrant=False)
    return {**frozen, **dict(zip(inner_names, fast))}


def adapt_batched(model: nn.Module, params: Params, inner_names: list[str], shared_masks: Params,
                  task_masks: Params, rule: UpdateRule, x: torch.Tensor, y: torch.Tensor,
                  steps: int, first_order: bool, track_outer: bool = True,
                  vectorize: bool = True, checkpoint_steps: bool = False) -> Params:
    """Adapt a stack of tasks; x is (tasks, n, C, H, W), y is (tasks, n).

    With `vectorize` the inner gradients of all tasks come from one torch.func.vmap call (one
    grouped convolution per layer); without it, from a loop over tasks. Which is faster depends on
    the device: CPU convolution kernels are slow for grouped weight gradients.

    `shared_masks` apply to every task; `task_masks` carry a leading task dimension (sparse-MAML+).
    Returns adapted weights with a leading task dimension for the inner parameters (the others are
    returned as they are, shared). First-order runs build the outer graph in closed form
    (first_order_adapted).
    """
    tasks = x.shape[0]
    frozen = {n: p for n, p in params.items() if n not in inner_names}

    def masks_for(name: str, task: Optional[int] = None) -> Optional[torch.Tensor]:
        if name in task_masks:
            return task_masks[name] if task is None else task_masks[name][task]
        return shared_masks.get(name)

    if track_outer and not first_order:
        # vmap's rule for the double backward of batch_norm gives wrong second derivatives
        # (torch 2.14: O(1e-2) off on Conv4), so second-order adaptation runs task by task.
        per_task = [
            adapt_reference(model, params, inner_names, {n: masks_for(n, j) for n in inner_names
                                                          if masks_for(n, j) is not None},
                            rule, x[j], y[j], steps, first_order=False,
                            checkpoint_steps=checkpoint_steps)
            for j in range(tasks)]
        return {**frozen, **{n: torch.stack([f[n] for f in per_task]) for n in inner_names}}

    one_task_grad = grad(lambda inner, xs, ys: cross_entropy(model, {**frozen, **inner}, xs, ys))

    def task_grad(inner: Params, xs: torch.Tensor, ys: torch.Tensor) -> Params:
        """Support-loss gradients of every task; every argument carries the task dimension."""
        if vectorize:
            return vmap(one_task_grad)(inner, xs, ys)
        per_task = [one_task_grad({n: p[j] for n, p in inner.items()}, xs[j], ys[j])
                    for j in range(xs.shape[0])]
        return {n: torch.stack([g[n] for g in per_task]) for n in inner}

    def initial() -> Params:
        return {n: rule.initial(params[n], masks_for(n)).expand(tasks, *params[n].shape)
                for n in inner_names}

    masks = {n: masks_for(n) for n in inner_names}

    def step(fast: Params) -> tuple[Params, Params]:
        grads = task_grad(fast, x, y)
        return {n: rule.step(fast[n], grads[n], masks[n]) for n in inner_names}, grads

    with torch.no_grad():
        start = initial()
    fast, summed, trajectory = run_trajectory(step, start, steps,
                                              keep_steps=track_outer and not rule.linear_in_gradient)
    if not track_outer:
        return {**frozen, **fast}
    # Broadcasting theta (and shared masks) over the task dimension sums their gradients.
    return {**frozen, **first_order_adapted(params, inner_names, masks_for, rule, summed, trajectory,
                                            initial)}


def run_trajectory(step: Callable[[Params], tuple[Params, Params]], start: Params, steps: int,
                   keep_steps: bool) -> tuple[Params, Params, list[Params]]:
    """A first-order inner loop without autograd: `steps` calls of step(fast) -> (next fast
    weights, the gradients used) from `start`. Returns the adapted weights, the summed gradients
    and, with keep_steps, each step's gradients (see first_order_adapted)."""
    fast = dict(start)
    summed = {n: torch.zeros_like(p) for n, p in fast.items()}
    trajectory: list[Params] = []
    with torch.no_grad():
        for _ in range(steps):
            fast, grads = step(fast)
            torch._foreach_add_(list(summed.values()), [grads[n] for n in summed])
            if keep_steps:
                trajectory.append(grads)
    return fast, summed, trajectory


def first_order_adapted(params: Params, inner_names: list[str],
                        masks_for: Callable[[str], Optional[torch.Tensor]], rule: UpdateRule,
                        summed: Params, trajectory: list[Params],
                        start: Callable[[], Params]) -> Params:
    """The adapted inner weights as a differentiable function of theta and the masks, given the
    inner gradients of a first-order trajectory (which carry no graph).

    With a rule linear in g the weights are theta - alpha*m*sum_t g_t: one update with the summed
    gradients gives the outer gradients of the step-by-step chain, with one elementwise op per
    tensor instead of `steps`. The weight mask multiplies every step, so there the chain is
    replayed from start() with the recorded gradients.
    """
    if rule.linear_in_gradient:
        return {n: rule.step(params[n], summed[n], masks_for(n)) for n in inner_names}
    fast = start()
    for grads in trajectory:
        fast = {n: rule.step(fast[n], grads[n], masks_for(n)) for n in inner_names}
    return fast


def query_logits_batched(model: nn.Module, fast: Params, inner_names: list[str],
                         x: torch.Tensor, vectorize: bool = True) -> torch.Tensor:
    """Logits (tasks, n, ways) of per-task adapted weights on per-task inputs x (tasks, n, ...)."""
    frozen = {n: p for n, p in fast.items() if n not in inner_names}
    inner = {n: fast[n] for n in inner_names}

    def logits(inner_p: Params, xs: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**frozen, **inner_p}, (xs,), strict=True)

    if vectorize:
        return vmap(logits)(inner, x)
    return torch.stack([logits({n: p[j] for n, p in inner.items()}, x[j]) for j in range(x.shape[0])])
