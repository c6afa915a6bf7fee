"""Use a trained run from Python: load it, adapt it to new tasks, predict, read its masks, evaluate
(`Learner`; an example in README.md, "Python API", and examples/api_example.py).

Loading, the fixed test tasks and the scoring are the functions test.py uses (evaluation.py), so
the two report the same numbers for the same checkpoint and settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.func import functional_call

from . import checkpoint
from .checkpoint import rng_states, set_rng_states
from .config import Config
from .data import (EpisodeDataset, EpisodeTransform, FewShotSplit, Task, build_episodes,
                   check_input_record, input_record)
from .data.base import decode_image
from .evaluation import (EVAL_SEED, evaluate, evaluate_split, evaluation_split, load_checkpoint,
                         restore_learner)
from .inner_loop import Params, adapt_reference
from .meta_learner import MetaLearner
from .run_folder import load_run
from .runtime import mean_confidence_interval, resolve_device, seed_everything


@dataclass(frozen=True)
class Evaluation:
    """Query accuracy over a list of tasks: mean, half-width of the 95% interval, per task."""

    mean: float
    ci95: float
    accuracies: np.ndarray

    def __str__(self) -> str:
        return f"{self.mean:.2%} +- {self.ci95:.2%} (95% CI over {len(self.accuracies)} tasks)"


class TaskList(list):
    """Single tasks as the episode source evaluation.evaluate reads, kept on the CPU: the loader
    batches (and may pin) them, evaluate() moves each batch."""

    on_device = False


class Learner:
    """A trained meta-learner ready for new tasks: its config, theta, masks and input transform."""

    def __init__(self, meta: MetaLearner, config: Config, inputs: dict, device: torch.device,
                 state: Optional[dict] = None, source: str = ""):
        self.meta = meta
        self.config = config
        self.device = device
        self.inputs = inputs  # how the run reads its inputs (data.input_record)
        self.source = source  # the checkpoint the inputs record comes from
        self.channels, self.image_size = inputs["channels"], inputs["image_size"]
        # The training inputs' transform without augmentation: resize, scale, normalise.
        statistics = {"mean": inputs["mean"], "std": inputs["std"]} if inputs["normalize"] else {}
        self.transform = EpisodeTransform(self.image_size, self.channels, inputs["normalize"],
                                          False, **statistics)
        self.checkpoint_info = {k: v for k, v in (state or {}).items() if k != "learner"}

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = (), device: Optional[str] = None,
             trust_code: bool = False) -> "Learner":
        """A run folder (its best.pt) or a checkpoint file inside one, with its config.yaml plus
        dotted `overrides`; device defaults to run.device. The checkpoint records how inputs are
        read, so no data is needed (older checkpoints: the run's train split is opened; pass
        "data.root=..." if it moved). A backbone named as code is imported only with trust_code.
        The model is built under run.seed, as test.py builds it; the caller's RNGs are kept."""
        path = Path(path)
        run_dir, file = (path, path / checkpoint.BEST) if path.is_dir() else (path.parent, path)
        config = load_run(run_dir, overrides, trust_code)
        resolved = resolve_device(device or config.run.device)
        caller_rng = rng_states()
        try:
            seed_everything(config.run.seed, config.run.deterministic)  # test.py's init draws
            state = load_checkpoint(file, resolved)
            inputs = state.get("inputs")
            if inputs is None:
                train = evaluation_split(config, "train")
                inputs = input_record(train, config.data.image_size or train.native_size)
            else:
                check_input_record(inputs, str(file))
            meta = restore_learner(config, file, state, inputs["channels"], inputs["image_size"],
                                   resolved)
        finally:
            set_rng_states(caller_rng)
        return cls(meta, config, inputs, resolved, state, str(file))

    def __repr__(self) -> str:
        c = self.config
        return (f"Learner({c.model.arch}, {c.data.num_ways}-way, inputs {self.channels}x"
                f"{self.image_size}x{self.image_size}, mask {c.inner.mask}, "
                f"{len(self.meta.inner_names)} tensors adapt, {c.inner.eval_steps} inner steps "
                f"of {c.inner.step_size}, device {self.device})")

    @property
    def model(self) -> torch.nn.Module:
        """The backbone holding theta (use adapt/predict to run it with adapted weights)."""
        return self.meta.model

    @property
    def num_ways(self) -> int:
        """Classes per task the head was built for; task labels are 0..num_ways-1."""
        return self.config.data.num_ways

    def prepare(self, images: torch.Tensor | Sequence[torch.Tensor | str | Path]) -> torch.Tensor:
        """Model inputs (N, C, S, S) from uint8 pixels (N, C, H, W), or from a list of uint8
        (C, H, W) images of any sizes or image files: converted to the run's channels (files),
        resized and normalised as in training (no augmentation)."""
        pictures = []
        for i, image in enumerate(images):
            if not isinstance(image, torch.Tensor):
                image = decode_image(image, self.channels, str(image))
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != self.channels:
                raise ValueError(f"prepare: image {i} must be uint8 pixels ({self.channels}, H, "
                                 f"W), got {image.dtype} {tuple(image.shape)}")
            pictures.append(image.cpu())
        if not pictures:
            raise ValueError("prepare: no images")
        return torch.stack([self.transform.apply(p, None) for p in pictures]).to(self.device)

    def dataset(self, split: str = "test") -> FewShotSplit:
        """One split of the run's dataset: raw uint8 images by class (split.load(label, index))."""
        return evaluation_split(self.config, split, self.inputs, self.source)

    def episodes(self, split: str = "test") -> EpisodeDataset:
        """The fixed tasks test.py scores: episodes(split)[i] is task i, ready for adapt."""
        return build_episodes(self.config.data, self.dataset(split), EVAL_SEED, augment=False,
                              device=self.device, num_query=self.config.data.test_query)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor,
              steps: Optional[int] = None) -> Params:
        """Weights adapted to one task: `steps` (default inner.eval_steps) masked inner steps on
        the support set, prepared inputs (N, C, S, S) with labels (N,) in 0..num_ways-1."""
        x = self._check_inputs(support_x, "support_x")
        y = self._check_labels(support_y, x.shape[0], "support_y")
        steps, meta = self._steps(steps), self.meta
        params = {n: p.detach() for n, p in meta.model.named_parameters()}
        return adapt_reference(meta.model, params, meta.inner_names, self._task_masks(), meta.rule,
                               x, y, steps, meta.first_order, track_outer=False)

    def predict(self, weights: Params, query_x: torch.Tensor) -> torch.Tensor:
        """Logits (M, num_ways) of the adapted `weights` on prepared query inputs (M, C, S, S).
        BatchNorm uses batch statistics, as in training: pass a task's query images together."""
        x = self._check_inputs(query_x, "query_x")
        with torch.no_grad():
            return functional_call(self.meta.model, weights, (x,), strict=True)

    def _steps(self, steps: Optional[int]) -> int:
        """inner.eval_steps for None; 0 means no adaptation; any other non-count is refused."""
        if steps is None:
            return self.config.inner.eval_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"steps must be a number of inner steps >= 0 (or None for "
                             f"inner.eval_steps={self.config.inner.eval_steps}), got {steps!r}")
        return steps

    def _check_labels(self, y: torch.Tensor, count: int, name: str) -> torch.Tensor:
        """Labels (count,) of dtype int64 in 0..num_ways-1, on the device."""
        if not isinstance(y, torch.Tensor) or y.shape != (count,) or y.dtype != torch.int64:
            got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"{name} must be int64 labels of shape ({count},), got {got}")
        if count and (int(y.min()) < 0 or int(y.max()) >= self.num_ways):
            raise ValueError(f"{name} holds labels {int(y.min())}..{int(y.max())}; the head has "
                             f"{self.num_ways} classes (0..{self.num_ways - 1})")
        return y.to(self.device)

    def _check_inputs(self, x: torch.Tensor, name: str) -> torch.Tensor:
        c, s = self.channels, self.image_size
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor (see Learner.prepare), got "
                             f"{type(x).__name__}")
        if not torch.is_floating_point(x) or x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"{name} must be prepared float inputs of shape (N, {c}, {s}, {s}) "
                             f"(see Learner.prepare), got {x.dtype} {tuple(x.shape)}")
        return x.to(self.device)

    def _task_masks(self) -> dict[str, torch.Tensor]:
        """One task's masks (sparse-MAML+: a fresh draw)."""
        with torch.no_grad():
            shared, per_task = self.meta.draw_masks(1)
        return {**shared, **{n: m[0] for n, m in per_task.items()}}

    def masks(self) -> dict[str, torch.Tensor]:
        """m = f(phi) per masked parameter (CPU tensors, the parameter's shape): 0/1 for
        sparse-MAML, per-weight learning rates for the lr variants, one fresh draw for
        sparse-MAML+; empty without a mask."""
        values = self._task_masks()
        return {n: values[n].detach().cpu() for n in self.meta.inner_names if n in values}

    def sparsity(self) -> dict[str, float]:
        """Fraction of entries whose inner learning is off, per masked parameter and "mean"."""
        return self.meta.mask_sparsity()

    def evaluate(self, tasks: Sequence[Task], steps: Optional[int] = None) -> Evaluation:
        """Query accuracy of each task after adaptation (default inner.eval_steps steps), with
        the mean and 95% interval test.py reports. Tasks hold prepared inputs (see Task)."""
        tasks = TaskList(Task(*t).to(torch.device("cpu")) for t in tasks)
        if not tasks:
            raise ValueError("evaluate: no tasks")
        for i, task in enumerate(tasks):
            self._check_inputs(task.support_x, f"task {i}: support_x")
            self._check_inputs(task.query_x, f"task {i}: query_x")
            self._check_labels(task.support_y, task.support_x.shape[0], f"task {i}: support_y")
            self._check_labels(task.query_y, task.query_x.shape[0], f"task {i}: query_y")
        shapes = {tuple(tuple(t.shape) for t in task) for task in tasks}
        # Tasks of different sizes cannot be stacked: adapt them one at a time.
        per_batch = self.config.train.eval_batch_size if len(shapes) == 1 else 1
        accs = evaluate(self.meta, tasks, len(tasks), per_batch, self._steps(steps), self.device)
        return Evaluation(*mean_confidence_interval(accs), accuracies=accs)

    def test(self, split: str = "test", num_tasks: Optional[int] = None,
             steps: Optional[int] = None) -> Evaluation:
        """The fixed tasks of `split` scored exactly as `test.py RUN --split SPLIT` scores them
        (default train.num_test_tasks tasks, inner.eval_steps steps); reseeds with run.seed."""
        if num_tasks is not None and (not isinstance(num_tasks, int) or isinstance(num_tasks, bool)
                                      or num_tasks < 1):
            raise ValueError(f"num_tasks must be at least 1 (or None for train.num_test_tasks="
                             f"{self.config.train.num_test_tasks}), got {num_tasks!r}")
        accs = evaluate_split(self.meta, self.config, self.dataset(split), self.device, num_tasks,
                              self._steps(steps))
        return Evaluation(*mean_confidence_interval(accs), accuracies=accs)
