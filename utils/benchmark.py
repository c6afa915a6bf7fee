"""Time meta-training steps of each implementation on the same synthetic episodes, in one process.

    python utils/benchmark.py                 # paper shapes on CUDA, small shapes on CPU
    python utils/benchmark.py --shapes small --repeats 5

For every configuration the reference loop and the fast paths run the same outer steps (same
seeds, same random 84x84 or small episodes) after warm-up, with the device synchronised around the
timed region. Prints tasks/s, the ratio to the reference loop, and peak memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_maml.config import load_config  # noqa: E402
from sparse_maml.data import Task  # noqa: E402
from sparse_maml.meta_learner import build_meta_learner  # noqa: E402
from sparse_maml.runtime import resolve_device  # noqa: E402

# name -> (overrides, image size, channels). "paper": the paper's training settings.
SHAPES = {
    "paper": {
        "conv4 sparse-MAML 5-shot": (["model.widths=[64,64,64,64]", "data.num_shots=5",
                                      "inner.steps=35", "outer.meta_batch_size=2"], 84, 3),
        "conv4 sparse-MAML 1-shot": (["model.widths=[64,64,64,64]", "data.num_shots=1",
                                      "inner.steps=35", "outer.meta_batch_size=2"], 84, 3),
        "conv4 sparse-MAML 5-shot mb8": (["model.widths=[64,64,64,64]", "data.num_shots=5",
                                          "inner.steps=35", "outer.meta_batch_size=8"], 84, 3),
        "resnet12 sparse-ReLU 5-shot": (["model.arch=resnet12", "model.widths=[64,128,256,512]",
                                         "inner.mask=relu_ste", "inner.mask_init=constant",
                                         "inner.adapt_batchnorm=false", "inner.step_size=0.05",
                                         "data.num_shots=5", "inner.steps=35",
                                         "outer.meta_batch_size=1"], 84, 3),
    },
    "small": {
        "conv4-w32 sparse-MAML 5-shot": (["model.widths=[32,32,32,32]", "data.num_shots=5",
                                          "inner.steps=5", "outer.meta_batch_size=4"], 28, 1),
        "conv4-w32 sparse-MAML 1-shot": (["model.widths=[32,32,32,32]", "data.num_shots=1",
                                          "inner.steps=5", "outer.meta_batch_size=4"], 28, 1),
        "resnet12-w8 sparse-ReLU 1-shot": (["model.arch=resnet12", "model.widths=[8,8,16,16]",
                                            "inner.mask=relu_ste", "inner.mask_init=constant",
                                            "inner.adapt_batchnorm=false", "data.num_shots=1",
                                            "inner.steps=3", "outer.meta_batch_size=2"], 28, 1),
    },
    "tiny": {  # a smoke test of the script itself (the test suite runs it)
        "conv4-w4 sparse-MAML 1-shot": (["model.widths=[4,4,4,4]", "data.num_shots=1",
                                         "data.num_query=2", "inner.steps=2",
                                         "outer.meta_batch_size=2"], 16, 1),
        "resnet12-w2 sparse-ReLU 1-shot": (["model.arch=resnet12", "model.widths=[2,2,2,2]",
                                            "inner.mask=relu_ste", "inner.mask_init=constant",
                                            "data.num_shots=1", "data.num_query=2", "inner.steps=1",
                                            "outer.meta_batch_size=2"], 16, 1),
    },
}
IMPLEMENTATIONS = ("reference", "loop", "vmap")


def random_batch(tasks: int, ways: int, shots: int, query: int, size: int, channels: int,
                 device: torch.device) -> Task:
    """Gaussian images with class-grouped labels (speed does not depend on the pixel values)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways)
    return Task(torch.randn(tasks, ways * shots, channels, size, size, generator=g),
                labels.repeat_interleave(shots).repeat(tasks, 1),
                torch.randn(tasks, ways * query, channels, size, size, generator=g),
                labels.repeat_interleave(query).repeat(tasks, 1)).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_implementation(overrides: list[str], size: int, channels: int, implementation: str,
                        device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(tasks per second, peak memory in GiB) of full outer steps (forward, backward, Adam)."""
    config = load_config(None, overrides + [f"outer.implementation={implementation}"])
    torch.manual_seed(0)
    learner = build_meta_learner(config, channels, size).to(device)
    optimizer = torch.optim.Adam(learner.parameters(), 1e-3)
    d = config.data
    batch = random_batch(config.outer.meta_batch_size, d.num_ways, d.num_shots, d.num_query, size,
                         channels, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = learner(batch, config.inner.steps)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # whole-process high-water mark: an upper bound shared by every row
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return repeats * config.outer.meta_batch_size / seconds, peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default=None,
                        help="paper (default on CUDA), small (default on CPU) or tiny (smoke test)")
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS),
                        choices=IMPLEMENTATIONS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    shapes = SHAPES[args.shapes or ("paper" if device.type == "cuda" else "small")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {args.repeats} timed outer steps after "
          f"{args.warmup} warm-up steps")
    header = f"{'config':<32} {'implementation':<14} {'tasks/s':>9} {'x reference':>12} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for config_name, (overrides, size, channels) in shapes.items():
        baseline = None
        for implementation in args.implementations:
            rate, peak = time_implementation(overrides, size, channels, implementation, device,
                                             args.warmup, args.repeats)
            baseline = rate if implementation == "reference" else baseline
            ratio = f"{rate / baseline:.2f}" if baseline else "-"
            print(f"{config_name:<32} {implementation:<14} {rate:9.2f} {ratio:>12} {peak:9.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
