"""Load a trained run, adapt it to new tasks, predict, read its masks and evaluate.

    python examples/api_example.py runs/my_run   # after pip install -r requirements.txt

The README's "Python API" section walks through the same steps.
"""

from __future__ import annotations

import sys

import torch

from sparse_maml.api import Learner


def main(run_dir: str) -> None:
    learner = Learner.load(run_dir, device="cpu")  # config.yaml + best.pt
    print(learner)

    # A 1-shot task built by hand from raw images: uint8 (C, H, W) pixels of any size, or files.
    images = learner.dataset("test")  # the run's test classes, as stored
    classes = range(learner.num_ways)
    support = [images.load(c, 0) for c in classes]
    query = [images.load(c, i) for c in classes for i in range(1, 6)]
    query_y = torch.arange(learner.num_ways).repeat_interleave(5)
    weights = learner.adapt(learner.prepare(support), torch.arange(learner.num_ways))
    predicted = learner.predict(weights, learner.prepare(query)).argmax(-1)
    print(f"hand-made task: {(predicted == query_y).float().mean():.0%} of {len(query_y)} query "
          f"images right after {learner.config.inner.eval_steps} inner steps")

    # The masks, one tensor per adapted parameter (1 = learns in the inner loop, 0 = frozen).
    for name, mask in list(learner.masks().items())[:3]:
        print(f"mask {name}: shape {tuple(mask.shape)}, {(mask <= 0).float().mean():.1%} off")

    # A list of tasks (here the first 10 fixed test tasks) scored as test.py scores them.
    episodes = learner.episodes("test")
    tasks = [episodes[i] for i in range(10)]
    print(f"10 tasks: {learner.evaluate(tasks)}")
    print(f"test.py's tasks: {learner.test(num_tasks=10)}")


if __name__ == "__main__":
    main(sys.argv[1])
