"""Semantic properties of the inner loop, each pinned on a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_maml.config import load_config
from sparse_maml.inner_loop import UpdateRule, adapt_reference, inner_parameter_names
from sparse_maml.masks import BinarySTE, ReluSTE
from sparse_maml.meta_learner import MetaLearner, build_meta_learner
from sparse_maml.models import build_model

from helpers import random_tasks


class LinearClassifier(nn.Module):
    """logits = x W^T: small enough to derive MAML's gradients by hand."""

    def __init__(self, features: int, ways: int):
        super().__init__()
        self.head = nn.Linear(features, ways, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def softmax_ce_grad(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dL/dW of the mean cross-entropy of softmax(x W^T): (P - Y)^T X / n."""
    p = torch.softmax(x @ w.T, -1)
    return (p - F.one_hot(y, w.shape[0]).to(x.dtype)).T @ x / x.shape[0]


def softmax_ce_hessian_vector(w: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """H v for the mean cross-entropy: per sample (diag(p) - p p^T) (v x_i) x_i^T, averaged."""
    p = torch.softmax(x @ w.T, -1)  # (n, ways)
    u = x @ v.T  # (n, ways): v x_i
    jvp = p * u - p * (p * u).sum(-1, keepdim=True)  # (diag(p) - p p^T) u_i
    return jvp.T @ x / x.shape[0]


def test_second_order_maml_gradient_matches_hand_derivation():
    """One inner step W' = W - a g_s(W). The MAML outer gradient is (I - a H_s(W)) g_q(W'),
    with g the softmax cross-entropy gradient and H_s the support-loss Hessian (symmetric)."""
    torch.manual_seed(0)
    model = LinearClassifier(4, 3).double()
    xs, ys = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    xq, yq = torch.randn(9, 4, dtype=torch.float64), torch.arange(3).repeat(3)
    alpha = 0.7
    params = dict(model.named_parameters())
    fast = adapt_reference(model, params, ["head.weight"], {}, UpdateRule(alpha), xs, ys, 1,
                           first_order=False)
    F.cross_entropy(xq @ fast["head.weight"].T, yq).backward()
    w = params["head.weight"].detach()
    w_fast = w - alpha * softmax_ce_grad(w, xs, ys)
    g_q = softmax_ce_grad(w_fast, xq, yq)
    expected = g_q - alpha * softmax_ce_hessian_vector(w, xs, g_q)
    torch.testing.assert_close(params["head.weight"].grad, expected, rtol=1e-10, atol=1e-12)


def test_first_order_gradients_equal_detached_formula():
    """First order: dL_q/dtheta = g_q(p_T), and dL_q/dphi = -a * sum_t g_t * g_q(p_T) * 1/2."""
    torch.manual_seed(0)
    model = LinearClassifier(4, 3).double()
    xs, ys = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    xq, yq = torch.randn(9, 4, dtype=torch.float64), torch.arange(3).repeat(3)
    alpha, steps = 0.3, 3
    phi = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    params = dict(model.named_parameters())
    masks = {"head.weight": BinarySTE.apply(phi)}
    fast = adapt_reference(model, params, ["head.weight"], masks, UpdateRule(alpha), xs, ys, steps,
                           first_order=True)
    F.cross_entropy(xq @ fast["head.weight"].T, yq).backward()

    w, m = params["head.weight"].detach(), (phi.detach() > 0).double()
    grads = []
    for _ in range(steps):  # the same trajectory, written out without autograd
        grads.append(softmax_ce_grad(w, xs, ys))
        w = w - alpha * (m * grads[-1])
    g_q = softmax_ce_grad(w, xq, yq)
    torch.testing.assert_close(params["head.weight"].grad, g_q)
    torch.testing.assert_close(phi.grad, -alpha * sum(grads) * g_q * 0.5)


def test_straight_through_functions_are_exact():
    phi = torch.tensor([-2.0, -1e-9, 0.0, 1e-9, 3.0], requires_grad=True)
    m = BinarySTE.apply(phi)
    assert m.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]  # exactly the step, no rounding
    m.backward(torch.arange(5.0))
    assert phi.grad.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]  # dm/dphi = 1/2
    phi.grad = None
    lr = ReluSTE.apply(phi)
    assert torch.equal(lr, torch.relu(phi.detach()))
    lr.backward(torch.ones(5))
    assert phi.grad.tolist() == [1.0] * 5  # identity backward, also where ReLU is flat


def adapted(overrides: list[str], steps: int = 2):
    config = load_config(None, ["model.widths=[4,4,4,4]", "inner.mask=none", *overrides])
    torch.manual_seed(0)
    learner = build_meta_learner(config, in_channels=1, image_size=16)
    task = random_tasks(tasks=1).select(0)
    params = {n: p.detach() for n, p in learner.model.named_parameters()}
    shared, _ = learner.draw_masks(1)
    fast = adapt_reference(learner.model, params, learner.inner_names, shared, learner.rule,
                           task.support_x, task.support_y, steps, first_order=True,
                           track_outer=False)
    return learner, params, fast


def test_anil_adapts_only_the_head():
    learner, before, after = adapted(["inner.adapt=head"])
    assert learner.inner_names == ["head.weight", "head.bias"]
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == name.startswith("head."), name


def test_boil_freezes_the_head():
    learner, before, after = adapted(["inner.adapt=body"])
    assert not any(n.startswith("head.") for n in learner.inner_names)
    assert torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before["body.block1.conv.weight"], after["body.block1.conv.weight"])


def test_batchnorm_and_shortcut_selection_follow_module_structure():
    model = build_model("resnet12", 3, 5, 16, (2, 2, 2, 2))
    names = inner_parameter_names(model, "all", adapt_batchnorm=False, adapt_shortcut=False)
    norms = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
             for p in ("weight", "bias")}
    assert names and not set(names) & norms
    assert not any(".shortcut." in n for n in names)
    assert "body.block1.conv1.weight" in names and "head.weight" in names


def test_binary_mask_zeros_freeze_exactly_those_entries():
    learner, before, after = adapted(["inner.mask=binary_ste"], steps=3)
    masks = learner.mask()
    for name in learner.inner_names:
        moved = before[name] != after[name]
        off = masks[name] == 0
        assert not (moved & off).any(), f"{name}: a masked-off entry moved"
        # Most unmasked entries move (conv biases in front of BatchNorm have ~0 gradient).
        if name.endswith("weight"):
            assert moved[~off].float().mean() > 0.9, name


def test_learning_rate_masks_ignore_step_size():
    """sparse-ReLU-MAML: the mask is the learning rate, so alpha must not change the update.
    (phi comes from the same seeded uniform init in both runs; constant init would copy alpha.)"""
    learner_a, before, fast_a = adapted(["inner.mask=relu_ste", "inner.mask_init=uniform",
                                         "inner.step_size=0.01"])
    learner_b, _, fast_b = adapted(["inner.mask=relu_ste", "inner.mask_init=uniform",
                                    "inner.step_size=0.5"])
    for name in learner_a.inner_names:
        assert torch.equal(fast_a[name], fast_b[name]), name
    assert any(not torch.equal(fast_a[n], before[n]) for n in learner_a.inner_names)


def test_meta_sgd_learning_rates_can_be_negative():
    """With lr = phi < 0 a Meta-SGD step goes up the gradient: the support loss rises."""
    config = load_config(None, ["model.widths=[4,4,4,4]", "inner.mask=linear",
                                "inner.mask_init=meta_sgd"])
    torch.manual_seed(0)
    learner = build_meta_learner(config, in_channels=1, image_size=16)
    with torch.no_grad():
        for phi in learner.mask.phi.values():
            phi.fill_(-0.05)
    assert all(v.lt(0).all() for v in learner.mask().values())  # no clipping of the rates
    task = random_tasks(tasks=1).select(0)
    params = {n: p.detach() for n, p in learner.model.named_parameters()}
    fast = adapt_reference(learner.model, params, learner.inner_names, learner.mask(), learner.rule,
                           task.support_x, task.support_y, 1, first_order=True, track_outer=False)
    loss = lambda p: F.cross_entropy(torch.func.functional_call(learner.model, p, (task.support_x,)),
                                     task.support_y)
    assert loss(fast) > loss(params)


def test_adaptation_lowers_the_support_loss():
    learner, before, after = adapted(["inner.mask=none", "inner.step_size=0.1"], steps=5)
    task = random_tasks(tasks=1).select(0)
    loss = lambda p: F.cross_entropy(torch.func.functional_call(learner.model, p, (task.support_x,)),
                                     task.support_y)
    assert loss(after) < loss(before)


def test_generator_masks_are_drawn_per_task_for_conv_weights_only():
    config = load_config(None, ["model.widths=[4,4,4,4]", "inner.mask_generator=true"])
    learner = build_meta_learner(config, in_channels=1, image_size=16)
    shared, per_task = learner.draw_masks(3)
    convs = [n for n in learner.inner_names if n.endswith("conv.weight")]
    assert sorted(per_task) == sorted(convs)
    assert all(m.shape[0] == 3 for m in per_task.values())
    assert not torch.equal(per_task[convs[0]][0], per_task[convs[0]][1])  # fresh mask per task
    # Conv biases adapt without a mask; BatchNorm and head keep learned phi.
    assert not any(n.endswith("conv.bias") for n in shared)
    assert "head.weight" in shared
    generated = sum(learner.model.get_parameter(n).numel() for n in convs)
    assert learner.generator.logits.out_features == generated


def test_mask_exists_exactly_for_the_inner_set():
    config = load_config(None, ["model.arch=resnet12", "model.widths=[2,2,2,2]",
                                "inner.adapt_batchnorm=false"])
    learner = MetaLearner(build_model("resnet12", 3, 5, 16, (2, 2, 2, 2)), config)
    assert set(learner.mask()) == set(learner.inner_names)


@pytest.mark.parametrize("init,shift,low,high", [("uniform", 0.0, 0.4, 0.6),
                                                  ("kaiming", 0.0, 0.4, 0.6),
                                                  ("uniform", 0.3, 0.0, 0.3)])
def test_mask_init_shift_sets_initial_sparsity(init, shift, low, high):
    config = load_config(None, ["model.widths=[16,16,16,16]", f"inner.mask_init={init}",
                                f"inner.mask_init_shift={shift}"])
    torch.manual_seed(0)
    learner = build_meta_learner(config, in_channels=1, image_size=16)
    assert low < learner.mask_sparsity()["mean"] < high
