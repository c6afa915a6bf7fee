"""outer.implementation=compiled: exact in float64, the same evaluation, shared graphs, refusals.

The fp32 equality with the reference for every first-order variant is in test_equivalence.py.
"""

from __future__ import annotations

import threading

import pytest
import torch

from tqdm import tqdm

from sparse_maml.compiled import CompiledAdaptation
from sparse_maml.config import ConfigError, load_config
from sparse_maml.meta_learner import build_meta_learner
from sparse_maml.training import announce_compilation

from helpers import random_tasks

# The setting where a compiled fp32 step landed 1e-2 away from float64 (a ReLU unit within rounding
# distance of zero, see sparse_maml/compiled.py): Conv4 width 32, 28x28, 5-way 1-shot, 5 steps.
ONE_SHOT = ["model.widths=[32,32,32,32]", "inner.step_size=0.1", "inner.steps=5",
            "data.num_shots=1", "outer.meta_batch_size=2"]


def outer_gradients(overrides: list[str], implementation: str, tasks, dtype=torch.float32,
                    image_size: int = 28) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    config = load_config(None, [*overrides, f"outer.implementation={implementation}"])
    torch.manual_seed(0)
    learner = build_meta_learner(config, in_channels=1, image_size=image_size).to(dtype)
    tasks = type(tasks)(tasks.support_x.to(dtype), tasks.support_y, tasks.query_x.to(dtype),
                        tasks.query_y)
    loss, _, _ = learner(tasks, config.inner.steps)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in learner.named_parameters()}


def test_compiled_equals_reference_in_float64():
    """The compiled graphs compute the reference's math: in float64, where rounding cannot flip a
    ReLU unit, the outer gradients agree to 1e-10 of the largest entry (fp32: 1e-2 here)."""
    tasks = random_tasks(tasks=2, ways=5, shots=1, query=15, size=28)
    ref_loss, ref = outer_gradients(ONE_SHOT, "reference", tasks, torch.float64)
    loss, fast = outer_gradients(ONE_SHOT, "compiled", tasks, torch.float64)
    assert fast.keys() == ref.keys()
    assert any(not n.startswith("model.") for n in ref), "phi received no gradient"
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    scale = max(g.abs().max().item() for g in ref.values())
    for name in ref:
        err = (fast[name] - ref[name]).abs().max().item()
        assert err <= 1e-10 * scale, f"{name} differs by {err:.2e} (scale {scale:.2e})"


def test_compiled_evaluation_equals_reference():
    """Evaluation (no outer graph) adapts and scores the query set as the reference does."""
    results = {}
    for implementation in ("reference", "compiled"):
        config = load_config(None, ["model.widths=[6,6,6,6]", "inner.step_size=0.05",
                                    f"outer.implementation={implementation}"])
        torch.manual_seed(0)
        learner = build_meta_learner(config, in_channels=1, image_size=16)
        results[implementation] = learner(random_tasks(), 3, track_outer=False)
    for ref, fast in zip(results["reference"], results["compiled"]):
        assert not fast.requires_grad
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_graphs_are_compiled_once_per_structure():
    """A second learner of the same structure reuses the graphs: no compile event, same result.
    (Training runs report compile_events in the log.)"""
    overrides = ["model.widths=[6,6,6,6]", "inner.step_size=0.05", "outer.implementation=compiled",
                 "inner.mask=relu_ste", "inner.mask_init=constant"]
    events, losses = [], []
    for _ in range(2):
        torch.manual_seed(0)
        learner = build_meta_learner(load_config(None, overrides), in_channels=1, image_size=16)
        loss, _, _ = learner(random_tasks(), 2)
        loss.backward()
        events.append(learner.compile_events())
        losses.append(loss.item())
    first, second = events
    assert {name for name, _ in first} <= {"inner_step", "query_pass"}
    assert all(seconds > 0 for _, seconds in first)
    assert second == []
    assert losses[0] == losses[1]


def test_cpu_tasks_run_on_worker_threads_with_the_callers_settings(monkeypatch):
    """With several CPU threads the tasks of a meta-batch run on worker threads, one intra-op
    thread each; a worker takes the caller's autocast and compiler settings, and the outer
    gradients are those of the tasks run one after another on the calling thread."""
    seen = []
    task_pass = CompiledAdaptation._task_pass

    def recording_task_pass(self, *args):
        seen.append((threading.current_thread().name, torch.get_num_threads(),
                     torch.is_autocast_enabled("cpu"), torch._dynamo.config.recompile_limit))
        return task_pass(self, *args)

    monkeypatch.setattr(CompiledAdaptation, "_task_pass", recording_task_pass)
    overrides = ["model.widths=[4,4,4,4]", "inner.step_size=0.05", "inner.steps=2"]
    tasks = random_tasks(tasks=4)
    threads = torch.get_num_threads()
    runs = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            seen.clear()
            runs[n] = outer_gradients(overrides, "compiled", tasks, image_size=16)[1], list(seen)
        seen.clear()
        outer_gradients([*overrides, "outer.precision=bf16"], "compiled", tasks, image_size=16)
        later = []  # a thread started after the workers keeps the process's thread count
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]
    finally:
        torch.set_num_threads(threads)
    limit = torch._dynamo.config.recompile_limit
    (alone, on_caller), (parallel, on_workers) = runs[1], runs[2]
    assert on_caller == [("MainThread", 1, False, limit)] * 4
    assert all(name.startswith("compiled-task") for name, *_ in on_workers), on_workers
    assert all(record[1:] == (1, False, limit) for record in on_workers), on_workers
    assert all(autocast for _, _, autocast, _ in seen) and len(seen) == 4, seen  # bf16 reached them
    for name in alone:
        torch.testing.assert_close(parallel[name], alone[name], rtol=1e-5, atol=1e-6)


def test_compiled_refuses_second_order_with_reason():
    with pytest.raises(ConfigError, match="first-order"):
        load_config(None, ["outer.implementation=compiled", "inner.first_order=false"])
    with pytest.raises(ConfigError, match="outer.compile_mode"):
        load_config(None, ["outer.compile_mode=reduce-overhead"])


def test_checkpointed_second_order_equals_plain():
    """outer.checkpoint_inner_steps recomputes each inner step in the backward pass: the second-
    order outer gradients are those of the plain path."""
    overrides = ["model.widths=[6,6,6,6]", "inner.step_size=0.05", "inner.steps=3",
                 "inner.first_order=false", "outer.implementation=loop"]
    tasks = random_tasks()
    _, plain = outer_gradients(overrides, "loop", tasks, image_size=16)
    _, checkpointed = outer_gradients([*overrides, "outer.checkpoint_inner_steps=true"], "loop",
                                      tasks, image_size=16)
    assert checkpointed.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="second-order"):
        load_config(None, ["outer.checkpoint_inner_steps=true"])


def test_a_run_may_switch_implementation_on_resume(tmp_path):
    """The implementations compute the same outer gradients, so a run saved with one resumes with
    another (e.g. continued on a GPU with compiled); the numerics (precision) may not change."""
    from sparse_maml.run_folder import check_resumable

    saved = load_config(None, ["outer.implementation=loop"])
    check_resumable(saved, load_config(None, ["outer.implementation=compiled",
                                              "outer.compile_mode=reduce-overhead"]), tmp_path)
    with pytest.raises(ConfigError, match="outer.precision"):
        check_resumable(saved, load_config(None, ["outer.precision=bf16"]), tmp_path)


def test_training_announces_compilation_before_the_first_compiling_call(capsys):
    """The first meta-batch (and the first validation) of a compiled run can sit silent for half a
    minute while its graphs compile: fit() says so before the call, once each; other
    implementations compile nothing and say nothing."""
    announced: set[str] = set()
    bar = tqdm(disable=True)
    for implementation in ("loop", "compiled", "compiled"):
        config = load_config(None, ["model.widths=[4,4,4,4]", f"outer.implementation={implementation}"])
        learner = build_meta_learner(config, in_channels=1, image_size=16)
        announce_compilation(learner, bar, "inner-step and query graphs", announced)
    announce_compilation(learner, bar, "evaluation graphs", announced)
    assert capsys.readouterr().out.splitlines() == [
        "compiling the inner-step and query graphs (first use; the time follows) ...",
        "compiling the evaluation graphs (first use; the time follows) ..."]
