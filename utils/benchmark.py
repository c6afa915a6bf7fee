"""Time meta-training steps of each implementation on the same synthetic episodes, side by side.

    python utils/benchmark.py                 # paper shapes on CUDA, small shapes on CPU
    python utils/benchmark.py --shapes small --rounds 9
    python utils/benchmark.py --configs "conv4-w32 sparse-MAML 1-shot" --implementations reference compiled

For every configuration, one learner per implementation is built from the same seed and given the
same episodes; each is warmed up (the compiled one compiles then: the "compile s" column), and then
the implementations take turns, one outer step each (forward, backward, Adam), for --rounds rounds.
Interleaving makes the ratios robust to a machine whose load changes; tasks/s is the median over
rounds, with the device synchronised around every timed step. "peak MiB" is, for each row on its
own, the most memory allocated during one outer step beyond what was allocated before it
(activations, graphs, gradients): the CUDA allocator's counters, or on CPU the torch profiler's
memory timeline of a step run with one thread (the profiler sees the calling thread only, so the
compiled implementation's tasks then run one after another instead of on worker threads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from sparse_maml import meta_learner
from sparse_maml.config import load_config
from sparse_maml.data import Task
from sparse_maml.meta_learner import build_meta_learner
from sparse_maml.runtime import resolve_device

FIRST_ORDER = tuple(meta_learner.IMPLEMENTATIONS)  # every implementation runs first order
WITH_CUDA_GRAPHS = (*FIRST_ORDER, "compiled+cudagraphs")
SECOND_ORDER = ("reference", "loop", "loop+checkpoint")  # compiled is first-order only
# row label -> config overrides: each implementation, and two variants of one
IMPLEMENTATIONS = {
    **{name: [f"outer.implementation={name}"] for name in meta_learner.IMPLEMENTATIONS},
    "compiled+cudagraphs": ["outer.implementation=compiled", "outer.compile_mode=reduce-overhead"],
    "loop+checkpoint": ["outer.implementation=loop", "outer.checkpoint_inner_steps=true"],
}
CONV4_64 = "model.widths=[64,64,64,64] inner.steps=35"
RESNET_RELU = ("model.arch=resnet12 inner.mask=relu_ste inner.mask_init=constant "
               "inner.adapt_batchnorm=false")
# --shapes -> (image size, channels, {configuration: (overrides, implementations)}). "paper": the
# paper's settings (on CUDA; CUDA graphs are timed on Conv4 only, where launch overhead matters
# most and they compile in a minute).
SHAPES = {
    "paper": (84, 3, {
        "conv4 sparse-MAML 5-shot":
            (f"{CONV4_64} data.num_shots=5 outer.meta_batch_size=2", WITH_CUDA_GRAPHS),
        "conv4 sparse-MAML 1-shot":
            (f"{CONV4_64} data.num_shots=1 outer.meta_batch_size=2", WITH_CUDA_GRAPHS),
        "conv4 sparse-MAML 5-shot mb8":
            (f"{CONV4_64} data.num_shots=5 outer.meta_batch_size=8", WITH_CUDA_GRAPHS),
        "resnet12 sparse-ReLU 5-shot": (f"{RESNET_RELU} model.widths=[64,128,256,512] "
                                        "inner.step_size=0.05 data.num_shots=5 inner.steps=35 "
                                        "outer.meta_batch_size=1", FIRST_ORDER),
        "conv4 MAML 2nd-order 5-shot": (f"{CONV4_64} inner.mask=none inner.first_order=false "
                                        "data.num_shots=5 outer.meta_batch_size=2", SECOND_ORDER),
    }),
    "small": (28, 1, {
        "conv4-w32 sparse-MAML 5-shot": ("model.widths=[32,32,32,32] data.num_shots=5 "
                                         "inner.steps=5 outer.meta_batch_size=4", FIRST_ORDER),
        "conv4-w32 sparse-MAML 1-shot": ("model.widths=[32,32,32,32] data.num_shots=1 "
                                         "inner.steps=5 outer.meta_batch_size=4", FIRST_ORDER),
        "resnet12-w8 sparse-ReLU 1-shot": (f"{RESNET_RELU} model.widths=[8,8,16,16] "
                                           "data.num_shots=1 inner.steps=3 "
                                           "outer.meta_batch_size=2", FIRST_ORDER),
        "conv4-w32 MAML 2nd-order 5-shot": ("model.widths=[32,32,32,32] inner.mask=none "
                                            "inner.first_order=false data.num_shots=5 "
                                            "inner.steps=10 outer.meta_batch_size=2", SECOND_ORDER),
    }),
    "tiny": (16, 1, {  # a smoke test of the script itself (the test suite runs it)
        "conv4-w4 sparse-MAML 1-shot": ("model.widths=[4,4,4,4] data.num_shots=1 data.num_query=2 "
                                        "inner.steps=2 outer.meta_batch_size=2", FIRST_ORDER),
        "resnet12-w2 sparse-ReLU 1-shot": (f"{RESNET_RELU} model.widths=[2,2,2,2] data.num_shots=1 "
                                           "data.num_query=2 inner.steps=1 "
                                           "outer.meta_batch_size=2", FIRST_ORDER),
    }),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Row:
    """One implementation of one configuration: its learner, optimizer and episodes."""

    def __init__(self, overrides: str, size: int, channels: int, implementation: str,
                 device: torch.device):
        self.config = load_config(None, overrides.split() + IMPLEMENTATIONS[implementation])
        torch.manual_seed(0)
        self.learner = build_meta_learner(self.config, channels, size).to(device)
        self.optimizer = torch.optim.Adam(self.learner.parameters(), 1e-3)
        # Gaussian images with class-grouped labels (speed does not depend on the pixel values).
        tasks, d = self.config.outer.meta_batch_size, self.config.data
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(d.num_ways)
        self.batch = Task(
            torch.randn(tasks, d.num_ways * d.num_shots, channels, size, size, generator=g),
            labels.repeat_interleave(d.num_shots).repeat(tasks, 1),
            torch.randn(tasks, d.num_ways * d.num_query, channels, size, size, generator=g),
            labels.repeat_interleave(d.num_query).repeat(tasks, 1)).to(device)
        self.device = device
        self.seconds: list[float] = []

    def step(self) -> float:
        """One outer step; returns its wall-clock seconds."""
        synchronize(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss, _, _ = self.learner(self.batch, self.config.inner.steps)
        loss.backward()
        self.optimizer.step()
        synchronize(self.device)
        return time.perf_counter() - start

    def warm_up(self, steps: int) -> float:
        """Run `steps` untimed outer steps; returns the seconds spent compiling graphs."""
        for _ in range(steps):
            self.step()
        return sum(seconds for _, seconds in self.learner.compile_events())

    @property
    def tasks_per_second(self) -> float:
        return self.config.outer.meta_batch_size / statistics.median(self.seconds)


@contextlib.contextmanager
def native_stderr_silenced():
    """Discard what native code writes to file descriptor 2 inside the block: the profiler's
    library prints `USDT:`/`STAGE:` lines there at every start and stop, whatever its log level."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_peak_memory(row: Row) -> float:
    """Most memory (MiB) allocated during one outer step beyond what was allocated before it (see
    the module docstring: on CPU the profiler sees the calling thread only, hence one thread)."""
    if row.device.type == "cuda":
        synchronize(row.device)
        torch.cuda.reset_peak_memory_stats(row.device)
        before = torch.cuda.memory_allocated(row.device)
        row.step()
        return (torch.cuda.max_memory_allocated(row.device) - before) / 2**20
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with native_stderr_silenced(), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                record_shapes=True, with_stack=True) as prof:
            row.step()
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(), \
            native_stderr_silenced():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA; the CPU way in 2.x
        path = Path(folder) / "memory.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())  # per time point: bytes per memory category
    return max(map(sum, sizes), default=0) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default=None,
                        help="paper (default on CUDA), small (default on CPU) or tiny (smoke test)")
    parser.add_argument("--configs", nargs="+", default=None, help="only these configurations")
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS),
                        choices=list(IMPLEMENTATIONS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    shapes = args.shapes or ("paper" if device.type == "cuda" else "small")
    size, channels, table = SHAPES[shapes]
    unknown = set(args.configs or []) - set(table)
    if unknown:
        parser.error(f"unknown configuration(s) {sorted(unknown)}; "
                     f"--shapes {shapes} has {sorted(table)}")
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    print(f"device: {hardware}; torch {torch.__version__}; median of {args.rounds} "
          f"interleaved outer steps after {args.warmup} warm-up steps")
    header = (f"{'config':<34} {'implementation':<16} {'tasks/s':>9} {'x reference':>12} "
              f"{'compile s':>10} {'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for name, (overrides, implementations) in table.items():
        if args.configs and name not in args.configs:
            continue
        rows = {i: Row(overrides, size, channels, i, device)
                for i in implementations if i in args.implementations}
        compile_seconds = {i: row.warm_up(args.warmup) for i, row in rows.items()}
        for r in range(args.rounds):  # rotate the order so no implementation always runs first
            for implementation in list(rows)[r % len(rows):] + list(rows)[:r % len(rows)]:
                rows[implementation].seconds.append(rows[implementation].step())
        baseline = rows["reference"].tasks_per_second if "reference" in rows else None
        for implementation, row in rows.items():
            rate = row.tasks_per_second
            ratio = f"{rate / baseline:.2f}" if baseline else "-"
            compiled = (f"{compile_seconds[implementation]:.1f}" if implementation == "compiled"
                        else "-")
            peak = "-" if args.no_memory else f"{step_peak_memory(row):.1f}"
            print(f"{name:<34} {implementation:<16} {rate:9.2f} {ratio:>12} {compiled:>10} "
                  f"{peak:>9}", flush=True)
        del rows


if __name__ == "__main__":
    main()
