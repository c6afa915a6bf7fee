"""What a GPU user touches, on CUDA: skipped on a machine without one (utils/gpu_check.sh runs them).

A debug run end to end, an exact resume, on-device episodes, the compiled implementation against
the reference over several inner steps (with and without CUDA graphs, with deterministic and
non-deterministic cuDNN: a captured multi-step loop has been seen to replay wrongly with the
latter), and bf16 autocast within the fp32 run's interval.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparse_maml import checkpoint
from sparse_maml.config import load_config
from sparse_maml.data import build_episodes, build_split
from sparse_maml.meta_learner import build_meta_learner
from sparse_maml.run_folder import read_metrics

from helpers import TINY, random_tasks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = torch.device("cuda")
CUDA = ["run.device=cuda"]


def final_weights(run_dir):
    _, path = checkpoint.list_checkpoints(run_dir)[-1]
    return checkpoint.load(path)["learner"]


def test_debug_run_end_to_end_then_exact_resume(tmp_path):
    """train.py's main on CUDA; a 1-epoch run extended to 2 epochs equals the 2-epoch run."""
    from sparse_maml.cli import train

    def config(run_dir, epochs):
        return load_config(None, [*TINY, *CUDA, "run.deterministic=true", f"run.dir={run_dir}",
                                  f"train.epochs={epochs}", "train.val_every=1"])

    full, cut = tmp_path / "full", tmp_path / "cut"
    train.main(config(full, 2))
    train.main(config(cut, 1))
    train.main(*train.load_run_config(None, ["train.epochs=2"], str(cut)))
    a, b = final_weights(full), final_weights(cut)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_on_device_episodes_equal_host_episodes():
    cfg = load_config(None, ["data.image_size=28"]).data
    split = build_split(cfg, "val")
    host = build_episodes(cfg, split, seed=3, augment=False)
    device = build_episodes(dataclasses.replace(cfg, on_device=True), split, seed=3, augment=False,
                            device=DEVICE)
    for i in range(3):
        a, b = host[i], device.batch([i])
        assert b.support_x.device.type == DEVICE.type
        torch.testing.assert_close(b.support_x[0].cpu(), a.support_x)
        assert torch.equal(b.query_y[0].cpu(), a.query_y)


def outer_gradients(overrides, deterministic):
    torch.backends.cudnn.deterministic = deterministic
    try:
        config = load_config(None, ["model.widths=[16,16,16,16]", "inner.step_size=0.05",
                                    "inner.steps=5", *overrides])
        torch.manual_seed(0)
        learner = build_meta_learner(config, in_channels=1, image_size=28).to(DEVICE)
        results = []
        for _ in range(2):  # a second outer step replays what the first one captured
            learner.zero_grad(set_to_none=True)
            loss, _, _ = learner(random_tasks(size=28).to(DEVICE), config.inner.steps)
            loss.backward()
            results.append({n: p.grad.clone() for n, p in learner.named_parameters()})
        return results
    finally:
        torch.backends.cudnn.deterministic = False


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("variant", [["inner.mask=binary_ste"],
                                     ["inner.mask=relu_ste", "inner.mask_init=constant"],
                                     ["inner.mask=binary_ste", "inner.mask_target=weight"]])
def test_compiled_equals_reference_on_cuda(variant, mode, deterministic):
    reference = outer_gradients([*variant, "outer.implementation=reference"], deterministic)
    compiled = outer_gradients([*variant, "outer.implementation=compiled",
                                f"outer.compile_mode={mode}"], deterministic)
    for ref, fast in zip(reference, compiled):
        scale = max(g.abs().max().item() for g in ref.values())
        for name in ref:
            err = (fast[name] - ref[name]).abs().max().item()
            assert err <= 1e-4 * scale, f"{name} differs by {err:.2e} (scale {scale:.2e})"


def test_bf16_autocast_accuracy_within_the_fp32_interval(tmp_path):
    """A shortened demo in bf16 tests within the fp32 run's and its own 95% intervals."""
    from sparse_maml.cli import train

    results = {}
    for precision in ("fp32", "bf16"):
        config = load_config(None, [*CUDA, f"run.dir={tmp_path / precision}", "train.epochs=4",
                                    "run.tensorboard=false", "run.progress=false",
                                    f"outer.precision={precision}"])
        run_dir = train.main(config)
        test = [r for r in read_metrics(run_dir) if r["kind"] == "test"][-1]
        results[precision] = (test["accuracy"], test["ci95"])
    (a, ca), (b, cb) = results["fp32"], results["bf16"]
    assert abs(a - b) <= ca + cb, results
