"""A run folder, checkpoint or config received from someone else is data, one row per case: no code
it names runs without --trust-code, nothing is written or downloaded outside the run folder, a tiny
input cannot make the program allocate without bound, a non-finite number is never reported, and
every refusal is one line naming the file or key with a non-zero exit, never a traceback.

Rows run the command-line functions in process, like tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import yaml

from helpers import SMALLEST
from sparse_maml import checkpoint
from sparse_maml.api import Learner
from sparse_maml.cli import test as test_script
from sparse_maml.cli import train
from sparse_maml.config import ConfigError, load_config
from sparse_maml.run_folder import UntrustedCode

ROOT = Path(__file__).resolve().parents[1]
# A backbone file that leaves a mark when it is imported: the mark must not appear unless trusted.
BACKBONE = '''
from pathlib import Path
Path(__file__).with_name("IMPORTED").touch()
import torch.nn as nn
from sparse_maml.models import Conv4
class Net(Conv4):
    def __init__(self, in_channels, num_ways, image_size):
        super().__init__(in_channels, num_ways, image_size, (2, 2, 2, 2))
'''

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory) -> Path:
    """A finished run whose backbone is a file of its own (named by absolute path)."""
    root = tmp_path_factory.mktemp("custom")
    (root / "nets.py").write_text(BACKBONE)
    run_dir = root / "run"
    assert train.cli([*SMALLEST, f"run.dir={run_dir}", f"model.arch={root / 'nets.py'}:Net"]) == 0
    return run_dir


@pytest.fixture
def forget_backbone(custom_run):
    """No import of nets.py yet in this process: an import would run it again and leave the mark."""
    for name in [n for n in sys.modules if n.startswith("sparse_maml_backbone_")]:
        del sys.modules[name]
    (custom_run.parent / "IMPORTED").unlink(missing_ok=True)


@dataclass
class Case:
    """One received input: prepare(tmp, run) returns the command's arguments."""

    id: str
    prepare: Callable[[Path, Path], list[str]]
    status: int
    fragment: str
    script: str = "test"
    after: Optional[Callable[[Path], None]] = None


def edit_config(run: Path, change: Callable[[dict], None]) -> None:
    path = run / "config.yaml"
    tree = yaml.safe_load(path.read_text())
    change(tree)
    path.write_text(yaml.safe_dump(tree))


def copy(run: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(run, tmp / "received"))


def _nan_best(tmp, run):
    run = copy(run, tmp)
    saved = torch.load(run / "best.pt", weights_only=True)
    saved["learner"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                        for k, v in saved["learner"].items()}
    torch.save(saved, run / "best.pt")
    return [str(run)]


def _damaged_state(field: str, value) -> Callable[[Path, Path], list[str]]:
    def prepare(tmp, run):
        run = copy(run, tmp)
        for _, path in checkpoint.list_checkpoints(run):
            saved = torch.load(path, weights_only=True)
            if field.startswith("state."):
                saved["state"][field[6:]] = value
            else:
                saved[field] = value
            torch.save(saved, path)
        return ["--resume", str(run), "train.epochs=2"]
    return prepare


def _wrong_adam_shape(tmp, run):
    run = copy(run, tmp)
    for _, path in checkpoint.list_checkpoints(run):
        saved = torch.load(path, weights_only=True)
        for per_param in saved["theta_optimizer"]["state"].values():
            per_param["exp_avg"] = torch.zeros(3)
        torch.save(saved, path)
    return ["--resume", str(run), "train.epochs=2"]


def _download_on_evaluation(tmp, run):
    run = copy(run, tmp)
    target = tmp / "elsewhere" / "cub"
    edit_config(run, lambda t: t["data"].update(name="cub", root=str(target), download=True))
    return [str(run)]


def _nowhere_written(tmp):
    assert not (tmp / "elsewhere").exists(), "evaluation created the dataset folder"


def alias_bomb() -> str:
    """Under 500 bytes of YAML that would expand to 10^9 strings."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for k in range(1, 9):
        lines.append(f"{'abcdefghij'[k]}: &{'abcdefghij'[k]} [" + ",".join(
            [f"*{'abcdefghij'[k - 1]}"] * 10) + "]")
    return "\n".join([*lines, "run: {name: *i}"]) + "\n"


def _alias_bomb(tmp, run):
    run = copy(run, tmp)
    (run / "config.yaml").write_text(alias_bomb())
    return [str(run)]


def _deep_nesting(tmp, run):
    run = copy(run, tmp)
    (run / "config.yaml").write_text("run: " + "[" * 1000 + "]" * 1000 + "\n")
    return [str(run)]


def _config_text(text: str) -> Callable[[Path, Path], list[str]]:
    def prepare(tmp, run):
        run = copy(run, tmp)
        (run / "config.yaml").write_text(text)
        return [str(run)]
    return prepare


def _tiny_resnet(tmp, run):
    return [*SMALLEST, "model.arch=resnet12", "data.image_size=3", f"run.dir={tmp / 'new'}"]


def _no_run_folder_made(tmp):
    assert not (tmp / "new").exists()


CASES = [
    Case("best.pt with NaN weights is not scored", _nan_best, 1, "non-finite weights"),
    Case("negative step counter", _damaged_state("state.step", -5), 1, "state.step",
         script="train"),
    Case("string epoch", _damaged_state("state.epoch", "3"), 1, "state.epoch", script="train"),
    Case("list as the run state", _damaged_state("state", [1, 2]), 1, "`state` is not a mapping",
         script="train"),
    Case("damaged RNG states", _damaged_state("rng", {"python": [1]}), 1,
         "random-generator states are damaged", script="train"),
    Case("Adam state of the wrong shape", _wrong_adam_shape, 1, "has shape (3,)", script="train"),
    Case("string metrics_bytes", _damaged_state("metrics_bytes", "x"), 1, "metrics_bytes",
         script="train"),
    Case("evaluation never downloads", _download_on_evaluation, 1, "does not download",
         after=_nowhere_written),
    Case("YAML aliases", _alias_bomb, 1, "aliases (*name) are not accepted"),
    Case("1000 levels of nesting", _deep_nesting, 1, "nested deeper than 16 levels"),
    Case("a key given twice", _config_text("run: {seed: 1}\nrun: {seed: 2}\n"), 1,
         "'run' is given twice"),
    Case("a key that is not a name", _config_text("run: {1: x, seed: 1}\n"), 1,
         "run: key 1 is not a name"),
    Case("a list as a key", _config_text("run: {[1]: x}\n"), 1, "key [1] is not a name or a number"),
    Case("sexagesimal epochs", _config_text("train: {epochs: 1:30}\n"), 1,
         "train.epochs: expected int, got '1:30'"),
    Case("octal-looking steps", _config_text("inner: {steps: 010}\n"), 1,
         "inner.steps: expected int, got '010'"),
    Case("a long value is cut", _config_text("run: {name: [" + "1," * 100_000 + "1]}\n"), 1,
         "characters)"),
    Case("ResNet-12 on images it cannot pool", _tiny_resnet, 1, "needs at least 4 pixels",
         script="train", after=_no_run_folder_made),
]
for override in ("run.name=*x", 'run.name="x', "run.name=[1", "run.name=\tx:"):
    CASES.append(Case(f"override {override!r}", lambda tmp, run, o=override: [*SMALLEST, o], 1,
                      "the value is not valid YAML", script="train"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_received_input(case: Case, tmp_path, finished_run, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = case.prepare(tmp_path, finished_run)
    capsys.readouterr()
    status = (train.cli if case.script == "train" else test_script.cli)(argv)
    out, err = capsys.readouterr()
    assert status == case.status, out + err
    assert case.fragment in err, out + err
    assert "Traceback" not in out + err
    assert len(err.splitlines()) <= 8 and len(err) < 2000, err  # short, whatever the input
    if case.after is not None:
        case.after(tmp_path)


# ---------------------------------------------------------------------------------------------
# Code named by a received run folder


def test_received_backbone_is_not_imported_without_trust(custom_run, forget_backbone, tmp_path,
                                                        capsys):
    """test.py, --resume and Learner.load refuse, naming the file and the flag; nothing ran."""
    run = copy(custom_run, tmp_path)
    mark = custom_run.parent / "IMPORTED"
    assert test_script.cli([str(run)]) == 1
    assert train.cli(["--resume", str(run), "train.epochs=2"]) == 1
    err = capsys.readouterr().err
    assert err.count("nets.py") >= 2 and err.count("--trust-code") == 2 and "Traceback" not in err
    with pytest.raises(UntrustedCode, match="trust_code=True"):
        Learner.load(run)
    assert not mark.exists(), "the backbone's code ran"


def test_trusted_backbone_is_imported(custom_run, forget_backbone, tmp_path):
    run = copy(custom_run, tmp_path)
    assert test_script.cli([str(run), "--trust-code"]) == 0
    assert (custom_run.parent / "IMPORTED").exists()
    assert Learner.load(run, trust_code=True).num_ways == 2


def test_plot_of_a_received_run_imports_nothing(custom_run, forget_backbone, tmp_path):
    import plot_sparsity

    run = copy(custom_run, tmp_path)
    assert plot_sparsity.main([str(run), "--out", str(tmp_path / "figures")]) == 0
    assert not (custom_run.parent / "IMPORTED").exists()


def test_checkpoint_with_nan_is_passed_over_on_resume(finished_run, tmp_path, capsys):
    """The newest checkpoint holds NaN weights: the resume names it and uses the previous one;
    best.pt is never replaced by NaN weights."""
    run = copy(finished_run, tmp_path)
    assert train.cli(["--resume", str(run), "train.epochs=2", "run.keep_checkpoints=3"]) == 0
    newest = checkpoint.list_checkpoints(run)[-1][1]
    saved = torch.load(newest, weights_only=True)
    saved["learner"] = {k: v * float("nan") if v.is_floating_point() else v
                        for k, v in saved["learner"].items()}
    torch.save(saved, newest)
    capsys.readouterr()
    assert train.cli(["--resume", str(run), "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "non-finite weights" in out and newest.name in out
    best = checkpoint.load(run / "best.pt")
    assert all(v.isfinite().all() for v in best["learner"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------
# The Python API: zero means zero, bad arguments are named


def test_api_counts_mean_what_they_say(finished_run):
    learner = Learner.load(finished_run)
    task = learner.episodes("val")[0]
    theta = {n: p.detach() for n, p in learner.model.named_parameters()}
    same = learner.adapt(task.support_x, task.support_y, steps=0)
    assert all(torch.equal(same[n], theta[n]) for n in theta)
    assert len(learner.test("val", num_tasks=3, steps=0).accuracies) == 3
    for bad in (-3, 1.5, True):
        with pytest.raises(ValueError, match="steps must be a number of inner steps"):
            learner.adapt(task.support_x, task.support_y, steps=bad)
    with pytest.raises(ValueError, match="num_tasks must be at least 1"):
        learner.test("val", num_tasks=0)
    with pytest.raises(ValueError, match="support_y must be int64 labels"):
        learner.adapt(task.support_x, task.support_y.float())
    with pytest.raises(ValueError, match="holds labels 0..7"):
        learner.adapt(task.support_x, task.support_y * 7)
    with pytest.raises(ValueError, match="support_x must be a tensor"):
        learner.adapt(task.support_x.numpy(), task.support_y)


def test_api_load_leaves_the_callers_random_generators_alone(finished_run):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Learner.load(finished_run)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------
# The environment and the run folder's lock


@pytest.mark.parametrize("env, fragment", [
    ({"RANK": "1"}, "RANK=1 does not fit WORLD_SIZE=(unset)"),
    ({"WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT not"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a number"),
])
def test_half_set_torchrun_environment_is_named(env, fragment, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert train.cli(SMALLEST) == 1
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_lock_with_an_absurd_pid_is_refused_by_name(finished_run, tmp_path, capsys):
    run = copy(finished_run, tmp_path)
    (run / ".lock").write_text(json.dumps({"host": "h", "pid": 10**30}))
    assert train.cli(["--resume", str(run), "train.epochs=2"]) == 1
    assert "which is unreadable" in capsys.readouterr().err


def test_ctrl_c_outside_training_is_exit_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "main", interrupted)
    assert train.cli(SMALLEST) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_config_limits_name_the_key():
    with pytest.raises(ConfigError, match="data.num_ways: 100,000,000 is beyond"):
        load_config(None, ["data.num_ways=100000000"])
    with pytest.raises(ConfigError, match="model.widths"):
        load_config(None, ["model.widths=[1000000,2,2,2]"])


def test_a_run_moved_without_its_training_data_is_tested_and_loaded(tmp_path, capsys):
    """The checkpoints record the inputs (channels, size, train statistics): with the train split
    gone, test.py and Learner.load still read the test split as the run was trained."""
    from fixtures import make_miniimagenet, write_miniimagenet

    root = write_miniimagenet(tmp_path / "data", "folder", make_miniimagenet((3, 2, 2), 3, 20))
    run = tmp_path / "run"
    assert train.cli([*SMALLEST, "data.name=folder", f"data.root={root}", "data.image_size=16",
                      f"run.dir={run}"]) == 0
    trained = capsys.readouterr().out
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(run, moved)
    shutil.rmtree(root / "train")
    (root / "train_statistics.json").unlink()
    assert test_script.cli([str(moved)]) == 0
    out = capsys.readouterr().out
    # the same tasks, weights and normalisation: the number train.py printed
    assert out.split(":")[1].split("(")[0].strip() in trained
    learner = Learner.load(moved)
    assert learner.inputs["statistics_key"] and len(learner.inputs["mean"]) == 3
    assert not (root / "train").exists()


def test_collect_results_goes_on_past_a_damaged_run_and_spares_the_users_files(finished_run,
                                                                               tmp_path, capsys):
    import collect_results

    runs = tmp_path / "runs"
    good, bomb = (Path(shutil.copytree(finished_run, runs / name)) for name in "ab")
    (bomb / "config.yaml").write_text(alias_bomb())
    (runs / "results.md").write_text("my own notes\n")
    assert collect_results.main([str(runs)]) == 1
    err = capsys.readouterr().err
    assert f"{bomb}: left out" in err and "aliases" in err
    assert "results.md exists and was not written by collect_results.py" in err
    assert (runs / "results.md").read_text() == "my own notes\n"
    out = tmp_path / "table"
    assert collect_results.main([str(runs), "--out", str(out)]) == 0
    assert (out / "results.md").read_text().startswith(collect_results.MARK)
    assert str(good) in (out / "results.csv").read_text()
    assert collect_results.main([str(runs), "--out", str(out)]) == 0  # its own files: replaced


def test_resume_refuses_train_images_that_changed(tmp_path, capsys):
    """The normalisation statistics a run trained with are keyed on the train images' content:
    after an image is replaced by another of the same size, a resume is refused by name."""
    from fixtures import make_miniimagenet, write_miniimagenet

    root = write_miniimagenet(tmp_path / "data", "folder", make_miniimagenet((3, 2, 2), 3, 20))
    run = tmp_path / "run"
    assert train.cli([*SMALLEST, "data.name=folder", f"data.root={root}", "data.image_size=16",
                      f"run.dir={run}"]) == 0
    first, second = sorted((root / "train").rglob("*.jpg"))[:2]
    first.write_bytes(second.read_bytes())
    capsys.readouterr()
    assert train.cli(["--resume", str(run), "train.epochs=2"]) == 1
    assert "not those the run was normalised with" in capsys.readouterr().err
