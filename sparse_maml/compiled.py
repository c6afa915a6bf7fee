"""The compiled implementation: a task's first-order adaptation as two torch.compile graphs.

A first-order outer gradient needs two things from a task, and both are gradients at fixed weights:
the inner gradients g_t along the trajectory (they define the adapted weights p_T as a function of
theta and phi, e.g. p_T = theta - alpha*m*sum_t g_t) and the gradient G of the query loss at p_T.
So each comes from one compiled graph with no autograd graph kept between calls:

- `inner_step`: the support-loss gradient at the current fast weights and the masked update;
- `query_pass`: the query loss, its logits and G (all parameters: frozen ones get G directly).

The outer graph is then the small eager map (theta, phi) -> p_T, and `QueryLoss` attaches the
precomputed G to it, so backward() yields the outer gradients of the step-by-step chain.

Why two graphs and not one whole-task graph: the step graph does not grow with inner.steps (a
35-step unrolled graph takes minutes to compile), evaluation reuses it, and autograd never runs
through compiled code (the outer graph above is eager and small).

Accuracy: fp32 results differ from eager by rounding only (inductor's fused BatchNorm rounds about
2x more than eager's), but ReLU and max-pool make the inner gradient discontinuous in the weights.
Over a handful of support images a pre-activation can sit within rounding distance of zero
(3e-7 in a 1-shot Conv4 case), and one flipped unit moved an inner gradient by 1.6e-2 of its
largest entry, eager fp32 being on the other side by chance. So the exactness test runs the
compiled graphs in float64 against a float64 reference (tests/test_compiled.py), where no such flip
happens, and the fp32 equality tests use well-conditioned tasks.

On a multi-core CPU the tasks of a meta-batch run on worker threads, one core each (`task_pool`):
the graphs are compiled with inductor's C++ wrapper, which releases the GIL for the whole graph, so
tasks run truly in parallel. Small per-task kernels use one core better than they split over
several: on 2 cores the compiled step was 1.4x the reference with two intra-op threads per task,
2x with a task per core (and glibc kept from trimming freed memory, `keep_freed_memory`).

Graphs are keyed by structure, not by module instance: every model of the same architecture, inner
set, update rule and input shapes shares them (dynamo inlines nn.Modules), which also keeps the
test suite's compile time down. Compilation time is recorded per graph (`compile_events`); the
inductor's on-disk caches (`cache_dir`) make a second run with the same shapes compile in seconds.
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value

from .inner_loop import Params, UpdateRule, cross_entropy, first_order_adapted, run_trajectory
from .runtime import task_pool

# Variants, shapes and the train/eval query pass each add graphs to the same few functions; dynamo's
# default limit of 8 per function would silently fall back to eager in a test session.
RECOMPILE_LIMIT = 64
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def cache_dir() -> str:
    """Where inductor keeps compiled kernels between runs (set TORCHINDUCTOR_CACHE_DIR to move it)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    return inductor_cache_dir()


# -- the functions that are compiled --------------------------------------------------------


def inner_step(model: nn.Module, frozen: Params, fast: Params, masks: Params, x: torch.Tensor,
               y: torch.Tensor, rule: UpdateRule) -> tuple[Params, Params]:
    """(fast weights after one masked SGD step on (x, y), the support-loss gradients used)."""
    grads = grad(lambda inner: cross_entropy(model, {**frozen, **inner}, x, y))(fast)
    return {n: rule.step(p, grads[n], masks.get(n)) for n, p in fast.items()}, grads


def query_pass(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor
               ) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """(gradient of the query loss w.r.t. every parameter, the loss, the logits)."""

    def loss_and_logits(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(model, p, (x,), strict=True)
        return F.cross_entropy(logits, y), logits

    grads, (loss, logits) = grad_and_value(loss_and_logits, has_aux=True)(params)
    return grads, loss, logits


def query_logits(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits of the adapted model on x (evaluation: no gradient)."""
    return functional_call(model, params, (x,), strict=True)


class QueryLoss(torch.autograd.Function):
    """A query loss whose gradient G w.r.t. the adapted weights was computed in the query pass.

    forward(loss, G_1..G_k, w_1..w_k) returns the loss value; backward sends G_i * grad_output to
    w_i, the differentiable adapted weights, so the outer graph continues from there.
    """

    @staticmethod
    def forward(ctx, loss: torch.Tensor, *grads_then_weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*grads_then_weights[:len(grads_then_weights) // 2])
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = ctx.saved_tensors
        return (None, *([None] * len(grads)), *(g * grad_output for g in grads))


# -- compilation -----------------------------------------------------------------------------


class CompiledGraph:
    """torch.compile(fn) that records how long each call that compiled a new graph took."""

    def __init__(self, fn: Callable, mode: str, device_type: str, events: list[tuple[str, float]]):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   RECOMPILE_LIMIT)
        self.name = fn.__name__
        self.events = events
        self.cuda_graphs = mode == "reduce-overhead"
        options = None
        if mode == "default" and device_type == "cpu":
            # Channels-last convolutions made these small convs 3-4x slower (torch 2.14,
            # measured): keep NCHW. The C++ wrapper runs the graph without the GIL (task_pool).
            options = {"layout_optimization": False, "cpp_wrapper": True}
        self.fn = torch.compile(fn, fullgraph=True, dynamic=False,
                                mode=None if mode == "default" else mode, options=options)

    def __call__(self, *args):
        if self.cuda_graphs:  # the caller copies what it keeps of the previous replay's outputs
            torch.compiler.cudagraph_mark_step_begin()
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        out = self.fn(*args)
        if torch._dynamo.utils.counters["stats"]["unique_graphs"] != before:
            self.events.append((self.name, time.perf_counter() - start))
        return out


@dataclass
class TaskPass:
    """What one task's compiled pass returns: query loss and logits and, for an outer gradient,
    the query gradient at the adapted weights and the inner gradients (summed or per step)."""

    loss: torch.Tensor
    logits: torch.Tensor
    query_grads: Optional[Params] = None
    summed: Optional[Params] = None
    trajectory: Optional[list[Params]] = None


class CompiledAdaptation:
    """Adapts and scores tasks with the compiled graphs (first-order outer gradients only)."""

    def __init__(self, mode: str = "default"):
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        self.mode = mode
        self.cuda_graphs = mode == "reduce-overhead"
        self.compile_events: list[tuple[str, float]] = []
        # the compiled functions per device type (their options depend on it), by name
        self._graphs: dict[str, dict[str, CompiledGraph]] = {}
        # call signatures (shapes, dtype, device, steps > 0, track_outer) already run: a new one
        # runs its first task alone, so that concurrent tasks never compile the same graph twice
        self._seen: set[tuple] = set()

    def take_compile_events(self) -> list[tuple[str, float]]:
        """(graph, seconds) for every graph compiled since the last call."""
        events = list(self.compile_events)
        self.compile_events.clear()
        return events

    def _kept(self, value):
        """Under CUDA graphs an output is overwritten by the next replay: keep a private copy
        (of a tensor, or of each tensor of a dict)."""
        if not self.cuda_graphs:
            return value
        if isinstance(value, dict):
            return {n: t.clone() for n, t in value.items()}
        return value.clone()

    def __call__(self, model: nn.Module, params: Params, inner_names: list[str],
                 masks: list[Params], rule: UpdateRule, support_x: torch.Tensor,
                 support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor, steps: int,
                 track_outer: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-task query losses, query logits (tasks, n, ways)) of a stack of tasks.

        masks[j] maps inner parameter names to task j's mask (differentiable w.r.t. phi). With
        track_outer the losses carry the first-order outer gradient to params and masks.
        """
        frozen = {n: p.detach() for n, p in params.items() if n not in inner_names}
        theta = {n: params[n].detach() for n in inner_names}
        device_type = support_x.device.type
        graphs = self._graphs_for(device_type)
        autocast_dtype = torch.get_autocast_dtype(device_type)
        autocast_enabled = torch.is_autocast_enabled(device_type)

        def run(j: int) -> TaskPass:
            # autocast is thread-local: a worker thread takes the caller's setting
            with torch.autocast(device_type, autocast_dtype, enabled=autocast_enabled):
                task_masks = {n: m.detach() for n, m in masks[j].items()}
                return self._task_pass(graphs, model, frozen, theta, task_masks, rule,
                                       support_x[j], support_y[j], query_x[j], query_y[j], steps,
                                       track_outer)

        signature = (support_x.shape, query_x.shape, support_x.dtype, support_x.device,
                     steps > 0, track_outer)
        passes = self._run_tasks(run, support_x.shape[0], support_x.device, signature)
        losses, logits = [], []
        for j, task in enumerate(passes):
            logits.append(task.logits)
            if not track_outer:
                losses.append(task.loss)
                continue
            task_masks = masks[j]
            adapted = first_order_adapted(
                params, inner_names, task_masks.get, rule, task.summed, task.trajectory,
                lambda: {n: rule.initial(params[n], task_masks.get(n)) for n in inner_names})
            names = [n for n in params if params[n].requires_grad or n in adapted]
            weights = [adapted.get(n, params[n]) for n in names]
            losses.append(QueryLoss.apply(task.loss, *[task.query_grads[n] for n in names],
                                          *weights))
        return torch.stack(losses), torch.stack(logits)

    def _graphs_for(self, device_type: str) -> dict[str, CompiledGraph]:
        if device_type not in self._graphs:
            self._graphs[device_type] = {
                fn.__name__: CompiledGraph(fn, self.mode, device_type, self.compile_events)
                for fn in (inner_step, query_pass, query_logits)}
        return self._graphs[device_type]

    def _run_tasks(self, run: Callable[[int], TaskPass], tasks: int, device: torch.device,
                   signature: tuple) -> list[TaskPass]:
        """run(j) for every task; on a CPU with several threads, on `task_pool`'s workers."""
        threads = torch.get_num_threads()
        if device.type != "cpu" or threads < 2 or tasks < 2:
            return [run(j) for j in range(tasks)]
        pool = task_pool(threads)

        def submit(j: int) -> Future:
            # torch's compiler settings are context variables: give the worker the caller's
            return pool.submit(contextvars.copy_context().run, run, j)

        first = []
        if signature not in self._seen:  # compiles, if anything does, happen in this one task
            first = [submit(0).result()]
            self._seen.add(signature)
        rest = [submit(j) for j in range(len(first), tasks)]
        return first + [future.result() for future in rest]

    @torch.no_grad()
    def _task_pass(self, graphs: dict[str, CompiledGraph], model: nn.Module, frozen: Params, theta: Params,
                   masks: Params, rule: UpdateRule, support_x: torch.Tensor,
                   support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor,
                   steps: int, track_outer: bool) -> TaskPass:
        """One task through the compiled graphs: inner steps, then the query (no autograd)."""

        def step(fast: Params) -> tuple[Params, Params]:
            new, grads = graphs["inner_step"](model, frozen, fast, masks, support_x, support_y, rule)
            return self._kept(new), self._kept(grads)

        start = {n: rule.initial(p, masks.get(n)) for n, p in theta.items()}
        fast, summed, trajectory = run_trajectory(
            step, start, steps, keep_steps=track_outer and not rule.linear_in_gradient)
        if not track_outer:
            logits = self._kept(graphs["query_logits"](model, {**frozen, **fast}, query_x))
            return TaskPass(F.cross_entropy(logits, query_y), logits)
        query_grads, loss, logits = graphs["query_pass"](model, {**frozen, **fast}, query_x, query_y)
        query_grads, loss, logits = map(self._kept, (query_grads, loss, logits))
        return TaskPass(loss, logits, query_grads, summed, trajectory)
