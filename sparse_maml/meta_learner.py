"""The meta-learner: the backbone (theta), its masks (phi or a generator), and the outer loss."""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .compiled import CompiledAdaptation
from .config import Config
from .data import Task
from .inner_loop import (Params, UpdateRule, adapt_batched, adapt_reference, inner_parameter_names,
                         query_logits_batched)
from .masks import MASK_FUNCTIONS, LearnedMask, MaskGenerator, sparsity
from .models import build_model, check_generator, conv_weight_names


class MetaLearner(nn.Module):
    """theta (`model`), the inner-loop masks, and the outer loss of a meta-batch of tasks."""

    def __init__(self, model: nn.Module, config: Config):
        super().__init__()
        inner = config.inner
        self.model = model
        self.inner_names = inner_parameter_names(model, inner.adapt, inner.adapt_batchnorm,
                                                 inner.adapt_shortcut)
        if not self.inner_names:
            raise ValueError("no parameter adapts in the inner loop: check inner.adapt, "
                             "inner.adapt_batchnorm and inner.adapt_shortcut")
        masked = inner.mask != "none"
        self.rule = UpdateRule(
            step_size=inner.step_size,
            mask_is_learning_rate=masked and MASK_FUNCTIONS[inner.mask].is_learning_rate,
            mask_on_weight=inner.mask_target == "weight",
        )
        shapes = {n: p.shape for n, p in model.named_parameters() if n in self.inner_names}
        self.generator: MaskGenerator | None = None
        if masked and inner.mask_generator:
            conv_modules = {n.rsplit(".", 1)[0] for n in conv_weight_names(model)}
            generated = {n: shapes[n] for n in conv_weight_names(model) if n in shapes}
            if not generated:
                raise ValueError("inner.mask_generator: no adapted conv weight to mask")
            self.generator = MaskGenerator(generated, model.feature_size, inner.mask,
                                           inner.mask_init_shift)
            # As in the reference, the conv biases then adapt without a mask.
            shapes = {n: s for n, s in shapes.items() if n.rsplit(".", 1)[0] not in conv_modules}
        self.mask: LearnedMask | None = None
        if masked and shapes:
            self.mask = LearnedMask(shapes, inner.mask, inner.mask_init, inner.mask_init_shift,
                                    inner.step_size)
        self.first_order = inner.first_order
        self.loss_reduction = config.outer.loss_reduction
        self.implementation = config.outer.implementation
        self.checkpoint_inner_steps = config.outer.checkpoint_inner_steps
        self.precision = config.outer.precision
        self.compiled = (CompiledAdaptation(config.outer.compile_mode)
                         if self.implementation == "compiled" else None)
        self._adapt_and_score = partial(IMPLEMENTATIONS[self.implementation], self)

    # -- parameter groups ------------------------------------------------------------------

    def theta_parameters(self) -> list[nn.Parameter]:
        """The initialisation theta (the backbone's weights)."""
        return list(self.model.parameters())

    def mask_parameters(self) -> list[nn.Parameter]:
        """phi and the generator's weights (empty for plain MAML, ANIL and BOIL)."""
        return [p for m in (self.mask, self.generator) if m is not None for p in m.parameters()]

    # -- masks -----------------------------------------------------------------------------

    def draw_masks(self, num_tasks: int, first: int = 0, total: Optional[int] = None
                   ) -> tuple[Params, Params]:
        """(masks shared by all tasks, masks with a leading task dimension) for one meta-batch.

        For tasks first..first+num_tasks-1 of a meta-batch of `total` (default num_tasks) tasks:
        the generator's noise is drawn for all `total` tasks and sliced, so a task's mask does not
        depend on how the meta-batch is split across processes.
        """
        shared = self.mask() if self.mask is not None else {}
        per_task = {}
        if self.generator is not None:
            noise = self.generator.draw_noise(total or num_tasks)  # (total, features)
            per_task = self.generator(noise[first:first + num_tasks])
        return shared, per_task

    def skip_masks(self, num_tasks: int) -> None:
        """Draw and drop the generator noise of `num_tasks` tasks, as forward() would: keeps the
        random stream in step with a process that adapts those tasks."""
        if self.generator is not None:
            self.generator.draw_noise(num_tasks)

    @torch.no_grad()
    def current_masks(self) -> dict[str, torch.Tensor]:
        """m = f(φ) per masked adapted tensor (one fresh draw for a generator), in inner order."""
        shared, per_task = self.draw_masks(1)
        values = {**shared, **{n: m[0] for n, m in per_task.items()}}
        return {n: values[n] for n in self.inner_names if n in values}

    @torch.no_grad()
    def mask_sparsity(self, masks: Optional[dict[str, torch.Tensor]] = None) -> dict[str, float]:
        """Fraction of entries with inner learning switched off, per masked parameter and overall.

        The key "mean" is the fraction over all masked entries. Generated masks (sparse-MAML+) are
        measured on one fresh draw, or on `masks` (from current_masks) when given.
        """
        values = self.current_masks() if masks is None else masks
        if not values:
            return {}
        result = {n: sparsity(m) for n, m in values.items()}
        total = sum(m.numel() for m in values.values())
        result["mean"] = sum(result[n] * m.numel() for n, m in values.items()) / total
        return result

    # -- the outer loss --------------------------------------------------------------------

    def forward(self, batch: Task, steps: int, track_outer: bool = True,
                share: Optional[tuple[int, int]] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adapt every task of `batch` and score its query set.

        Returns (outer loss reduced over tasks, per-task query losses, per-task query accuracies).
        With track_outer=False nothing is kept for an outer backward pass (evaluation). `share` =
        (first task, tasks in the whole meta-batch) when `batch` is one process's part of a larger
        meta-batch (see draw_masks).
        """
        tasks = batch.num_tasks
        params = dict(self.model.named_parameters())
        if not track_outer:
            params = {n: p.detach() for n, p in params.items()}
        first, total = share if share is not None else (0, None)
        shared, per_task = self.draw_masks(tasks, first, total)
        with torch.autocast(batch.support_x.device.type, torch.bfloat16,
                            enabled=self.precision == "bf16"):
            losses, query_logits = self._adapt_and_score(params, shared, per_task, batch, steps,
                                                         track_outer)
        losses, query_logits = losses.float(), query_logits.float()
        with torch.set_grad_enabled(track_outer):
            loss = losses.sum() if self.loss_reduction == "sum" else losses.mean()
        accuracies = (query_logits.argmax(-1) == batch.query_y).float().mean(1)
        return loss, losses.detach(), accuracies.detach()

    # -- the implementations (outer.implementation) -----------------------------------------
    # Each returns (per-task query losses, query logits (tasks, ways*query, ways)); the losses
    # carry the outer graph when track_outer is set. tests/test_equivalence.py checks that all
    # give the outer gradients of `reference`.

    def _task_masks(self, shared: Params, per_task: Params, task: int) -> Params:
        return {**shared, **{n: m[task] for n, m in per_task.items()}}

    def _adapt_reference(self, params: Params, shared: Params, per_task: Params, batch: Task,
                         steps: int, track_outer: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain step-by-step chain of the reference code, task after task."""
        logits = []
        for j in range(batch.num_tasks):
            fast = adapt_reference(self.model, params, self.inner_names,
                                   self._task_masks(shared, per_task, j), self.rule,
                                   batch.support_x[j], batch.support_y[j], steps,
                                   self.first_order, track_outer, self.checkpoint_inner_steps)
            with torch.set_grad_enabled(track_outer):
                logits.append(functional_call(self.model, fast, (batch.query_x[j],), strict=True))
        return self._query_losses(torch.stack(logits), batch, track_outer)

    def _adapt_batched(self, params: Params, shared: Params, per_task: Params, batch: Task,
                       steps: int, track_outer: bool, vectorize: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """First-order closed form, tasks in a Python loop (loop) or in one vmap call (vmap)."""
        fast = adapt_batched(self.model, params, self.inner_names, shared, per_task, self.rule,
                             batch.support_x, batch.support_y, steps, self.first_order,
                             track_outer, vectorize, self.checkpoint_inner_steps)
        with torch.set_grad_enabled(track_outer):
            logits = query_logits_batched(self.model, fast, self.inner_names, batch.query_x,
                                          vectorize)
        return self._query_losses(logits, batch, track_outer)

    def _adapt_compiled(self, params: Params, shared: Params, per_task: Params, batch: Task,
                        steps: int, track_outer: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Inner step and query pass as torch.compile graphs (sparse_maml/compiled.py)."""
        masks = [self._task_masks(shared, per_task, j) for j in range(batch.num_tasks)]
        return self.compiled(self.model, params, self.inner_names, masks, self.rule,
                             batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                             steps, track_outer)

    @staticmethod
    def _query_losses(logits: torch.Tensor, batch: Task, track_outer: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(track_outer):
            losses = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten(),
                                     reduction="none").view(batch.num_tasks, -1).mean(1)
        return losses, logits

    def compile_events(self) -> list[tuple[str, float]]:
        """(graph, seconds) for every graph compiled since the last call (compiled only)."""
        return self.compiled.take_compile_events() if self.compiled is not None else []


# outer.implementation: name -> how a meta-batch is adapted and scored, (learner, params, shared
# masks, per-task masks, batch, steps, track_outer) -> (per-task query losses, query logits).
IMPLEMENTATIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "reference": MetaLearner._adapt_reference,
    "loop": partial(MetaLearner._adapt_batched, vectorize=False),
    "vmap": partial(MetaLearner._adapt_batched, vectorize=True),
    "compiled": MetaLearner._adapt_compiled,
}


def build_meta_learner(config: Config, in_channels: int, image_size: int) -> MetaLearner:
    """Backbone and masks as configured (seed torch first for a reproducible init)."""
    model = build_model(config.model.arch, in_channels, config.data.num_ways, image_size,
                        config.model.widths)
    if config.inner.mask_generator:
        check_generator(model, config.model.arch)
    learner = MetaLearner(model, config)
    learner.in_channels, learner.image_size = in_channels, image_size  # the inputs it was built for
    return learner
