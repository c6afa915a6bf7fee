"""The fast paths (loop, vmap, compiled) give the same outer gradients as the plain reference loop.

`compiled` runs first-order variants only (second-order ones are refused at load time, see
test_compiled.py); its graphs are shared by every learner of the same structure, so the variants
that differ only in mask init or loss reduction reuse one compilation.
"""

from __future__ import annotations

import pytest
import torch

from sparse_maml.config import load_config
from sparse_maml.meta_learner import build_meta_learner

from helpers import random_tasks

# Every inner-loop variant on Conv4; the last rows on a narrow ResNet-12.
VARIANTS = {
    "maml-first-order": ["inner.mask=none"],
    "maml-second-order": ["inner.mask=none", "inner.first_order=false"],
    "anil": ["inner.mask=none", "inner.adapt=head"],
    "boil": ["inner.mask=none", "inner.adapt=body"],
    "boil-second-order": ["inner.mask=none", "inner.adapt=body", "inner.first_order=false"],
    "sparse-maml": ["inner.mask=binary_ste"],
    "sparse-maml-shifted-uniform": ["inner.mask=binary_ste", "inner.mask_init=uniform",
                                    "inner.mask_init_shift=0.2"],
    "sparse-maml-second-order": ["inner.mask=binary_ste", "inner.first_order=false"],
    "sparse-maml-no-batchnorm": ["inner.mask=binary_ste", "inner.adapt_batchnorm=false"],
    "sparse-relu-maml": ["inner.mask=relu_ste", "inner.mask_init=constant"],
    "relu-lr": ["inner.mask=relu", "inner.mask_init=uniform"],
    "meta-sgd": ["inner.mask=linear", "inner.mask_init=meta_sgd"],
    "meta-sgd-second-order": ["inner.mask=linear", "inner.mask_init=meta_sgd",
                              "inner.first_order=false"],
    "exp-lr": ["inner.mask=exp", "inner.mask_init=uniform", "inner.mask_init_shift=-3"],
    "weight-mask": ["inner.mask=binary_ste", "inner.mask_target=weight"],
    "sparse-maml-plus": ["inner.mask=binary_ste", "inner.mask_generator=true"],
    "sparse-maml-mean-loss": ["inner.mask=binary_ste", "outer.loss_reduction=mean"],
    "resnet12-sparse-relu": ["model.arch=resnet12", "model.widths=[4,4,8,8]",
                             "inner.mask=relu_ste", "inner.mask_init=constant",
                             "inner.adapt_batchnorm=false"],
    "resnet12-sparse-maml-no-shortcut": ["model.arch=resnet12", "model.widths=[4,4,8,8]",
                                         "inner.adapt_shortcut=false"],
}


def outer_gradients(overrides: list[str], implementation: str) -> tuple[float, dict[str, torch.Tensor]]:
    config = load_config(None, ["model.widths=[6,6,6,6]", "inner.step_size=0.05", "inner.steps=3",
                                f"outer.implementation={implementation}", *overrides])
    torch.manual_seed(0)
    learner = build_meta_learner(config, in_channels=1, image_size=16)
    torch.manual_seed(1)  # the generator's noise (sparse-MAML+) is drawn from this state
    loss, _, _ = learner(random_tasks(), config.inner.steps)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


FIRST_ORDER = [v for v, overrides in VARIANTS.items() if "inner.first_order=false" not in overrides]
CASES = ([(v, i) for v in VARIANTS for i in ("loop", "vmap")]
         + [(v, "compiled") for v in FIRST_ORDER])


@pytest.mark.parametrize("variant, implementation", CASES)
def test_fast_paths_equal_reference(variant, implementation):
    ref_loss, ref = outer_gradients(VARIANTS[variant], "reference")
    fast_loss, fast = outer_gradients(VARIANTS[variant], implementation)
    assert fast.keys() == ref.keys()
    assert any(n.startswith("model.") for n in ref)
    if "inner.mask=none" not in VARIANTS[variant]:
        assert any(not n.startswith("model.") for n in ref), "phi received no gradient"
    assert fast_loss == pytest.approx(ref_loss, rel=1e-5)
    # Conv biases in front of BatchNorm get gradients of ~1e-8 that are pure rounding noise, so
    # the tolerance is relative to the largest gradient entry of the whole model.
    scale = max(g.abs().max().item() for g in ref.values())
    for name in ref:
        err = (fast[name] - ref[name]).abs().max().item()
        assert err <= 1e-5 * scale, f"{variant}: {name} differs by {err:.2e} (scale {scale:.2e})"
