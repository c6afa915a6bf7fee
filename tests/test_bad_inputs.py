"""Bad inputs and faults, one row each: the exit status, a message naming the key, file or value,
no traceback, and no file changed outside the run's own folder.

Rows run the command-line functions in process (train.cli, test.cli; the same code as the scripts'
__main__) to stay fast; a few at the end run the real scripts in a subprocess where only that can
show the behaviour (a DataLoader worker's error, a file-size limit).
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from sparse_maml.cli import test as test_script
from sparse_maml.cli import train
from sparse_maml import checkpoint
from fixtures import make_miniimagenet, write_miniimagenet
from helpers import SMALLEST
from sparse_maml.run_lock import LOCK

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# A file a malicious pickle would create if it ran: it must never exist.
PAYLOAD = "PAYLOAD_RAN"

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this calls os.system: a stand-in for any code a crafted file could run."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


@pytest.fixture(scope="module")
def mini_data() -> dict:
    return make_miniimagenet(classes=(3, 2, 2), per_class=3, size=20)


@dataclass
class Row:
    """One bad input: prepare(ws) sets it up and returns the command's arguments."""

    id: str
    prepare: Callable[["Workspace"], list[str]]
    status: int
    fragment: str
    script: str = "train"  # or "test"
    after: Optional[Callable[["Workspace"], None]] = None  # further checks
    may_change: tuple[str, ...] = ("run",)  # top-level names under ws.root the command may change


@dataclass
class Workspace:
    root: Path
    finished: Path
    mini: dict
    notes: list[str] = field(default_factory=list)

    def run_copy(self) -> Path:
        """A copy of the finished run, at ws.root/run."""
        target = self.root / "run"
        shutil.copytree(self.finished, target)
        return target

    def mini_root(self, layout: str = "npy", splits=("train", "val", "test")) -> Path:
        data = {s: self.mini[s] for s in splits}
        return write_miniimagenet(self.root / "mini", layout, data)


def payload_pickle(path: Path, ws: Workspace, content=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(content if content is not None else
                                  {"image_data": Payload(ws.root / PAYLOAD), "class_dict": {}}))


def no_payload(ws: Workspace) -> None:
    assert not (ws.root / PAYLOAD).exists(), "the file's payload ran"


def malicious_checkpoint(path: Path, ws: Workspace) -> None:
    torch.save({"learner": {}, "state": Payload(ws.root / PAYLOAD)}, path)


# ---------------------------------------------------------------------------------------------
# The rows

def _malicious_best(ws):
    run = ws.run_copy()
    malicious_checkpoint(run / "best.pt", ws)
    return [str(run)]


def _malicious_resume(ws):
    run = ws.run_copy()
    for _, path in checkpoint.list_checkpoints(run):
        malicious_checkpoint(path, ws)
    return ["--resume", str(run), "train.epochs=2"]


def _malicious_mini_pickle(ws):
    root = ws.root / "mini"
    for split in ("train", "val", "test"):
        payload_pickle(root / f"mini-imagenet-cache-{split}.pkl", ws)
    return [*SMALLEST, "data.name=miniimagenet", f"data.root={root}", f"run.dir={ws.root / 'run'}"]


def _malicious_tiered_pickle(ws):
    root = ws.root / "tiered"
    for split in ("train", "val", "test"):
        payload_pickle(root / f"{split}_images_png.pkl", ws, [Payload(ws.root / PAYLOAD)])
        payload_pickle(root / f"{split}_labels.pkl", ws, {"label_specific": [0]})
    return [*SMALLEST, "data.name=tieredimagenet", f"data.root={root}", f"run.dir={ws.root / 'run'}"]


def _rows_out_of_range(ws):
    root = ws.mini_root("pickle")
    path = root / "mini-imagenet-cache-train.pkl"
    content = pickle.loads(path.read_bytes())
    first = sorted(content["class_dict"])[0]
    content["class_dict"][first] = [0, 1, 10_000]
    path.write_bytes(pickle.dumps(content))
    return [*SMALLEST, "data.name=miniimagenet", f"data.root={root}", f"run.dir={ws.root / 'run'}"]


def _empty_yaml(ws):
    (ws.root / "empty.yaml").write_text("")
    return ["-c", str(ws.root / "empty.yaml"), *SMALLEST]


def _binary_yaml(ws):
    (ws.root / "model.yaml").write_bytes(b"PK\x03\x04\xff\xfe\x00binary")
    return ["-c", str(ws.root / "model.yaml")]


def _run_dir_under_file(ws):
    (ws.root / "afile").write_text("user data")
    return [*SMALLEST, f"run.dir={ws.root / 'afile' / 'run'}"]


def _missing_test_split(ws):
    root = ws.mini_root("npy", splits=("train", "val"))
    return [*SMALLEST, "data.name=miniimagenet", f"data.root={root}", f"run.dir={ws.root / 'run'}"]


def _no_run_folder(ws):
    assert not (ws.root / "run").exists(), "the run folder was made before the data was checked"


def _missing_cross_domain(ws):
    return [*SMALLEST, f"cross_domain.cub={ws.root / 'no_cub'}", f"run.dir={ws.root / 'run'}"]


def _locked_by_live_process(ws):
    run = ws.run_copy()
    holder = {"host": os.uname().nodename, "pid": os.getppid(), "since": "earlier"}
    (run / LOCK).write_text(json.dumps(holder))
    return ["--resume", str(run), "train.epochs=2"]


def _locked_elsewhere(ws):
    run = ws.run_copy()
    (run / LOCK).write_text(json.dumps({"host": "other-host", "pid": 1, "since": "earlier"}))
    return ["--resume", str(run), "train.epochs=2"]


def _stale_lock(ws):
    run = ws.run_copy()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    return ["--resume", str(run), "train.epochs=2"]


def _lock_released(ws):
    assert not (ws.root / "run" / LOCK).exists()


def _edited_config(ws):
    run = ws.run_copy()
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("step_size: 0.25", "step_size: 0.5"))
    return ["--resume", str(run), "train.epochs=2"]


def _huge_image(ws):
    return [*SMALLEST, "data.image_size=4096", "outer.meta_batch_size=256", f"run.dir={ws.root / 'run'}"]


def _no_cuda(ws):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return [*SMALLEST, "run.device=cuda", f"run.dir={ws.root / 'run'}"]


def _lr_as_written(ws):
    return [*SMALLEST, "outer.lr=1e-3", "outer.mask_lr=5e-3", f"run.dir={ws.root / 'run'}"]


def _lr_overflow(ws):
    return [*SMALLEST, "outer.lr=1e300", "outer.max_bad_steps=2", "train.batches_per_epoch=4",
            f"run.dir={ws.root / 'run'}"]


def _lr_huge(ws):
    return [*SMALLEST, "outer.lr=1e30", "outer.max_bad_steps=2", "train.batches_per_epoch=4",
            f"run.dir={ws.root / 'run'}"]


def _stop_checkpoint_is_sane(ws):
    """1e30 weights are finite but give no finite loss: the stop checkpoint must not hold them."""
    _, path = checkpoint.list_checkpoints(ws.root / "run")[-1]
    saved = checkpoint.load(path)
    assert max(float(t.abs().max()) for t in saved["learner"].values() if t.is_floating_point()) < 1e3


def _stop_checkpoint_is_finite(ws):
    # The loss was finite: the message says the optimizer step overflowed, not that the loss did.
    assert "finite outer loss (" in ws.out and "optimizer step that overflowed" in ws.out, ws.out
    assert "non-finite outer loss" not in ws.out, ws.out
    _, path = checkpoint.list_checkpoints(ws.root / "run")[-1]
    saved = checkpoint.load(path)
    assert all(bool(t.isfinite().all()) for t in saved["learner"].values() if t.is_floating_point())


def _test_args_intermixed(ws):
    run = ws.run_copy()
    return [str(run), "--split", "val", "inner.eval_steps=2"]


def _train_args_intermixed(ws):
    run = ws.run_copy()
    return ["train.epochs=2", "--resume", str(run), "run.progress=false"]


def _test_no_run(ws):
    (ws.root / "notes").mkdir()
    return [str(ws.root / "notes")]


def _hidden_class_folder(ws):
    root = ws.mini_root("folder")
    hidden = root / "train" / ".ipynb_checkpoints"
    hidden.mkdir()
    (hidden / "x.jpg").write_bytes(b"not an image")
    return [*SMALLEST, "data.name=miniimagenet", f"data.root={root}", "data.image_size=16",
            f"run.dir={ws.root / 'run'}", "--check-data"]


def _corrupt_image_check(ws):
    root = ws.mini_root("folder")
    bad = sorted((root / "val").rglob("*.jpg"))[1]
    bad.write_bytes(b"\xff\xd8 truncated")
    ws.notes.append(bad.name)
    return [*SMALLEST, "data.name=miniimagenet", f"data.root={root}", "--check-data"]


def _names_bad_file(ws):
    assert ws.notes[0] in ws.out


def _overwrite_spares_user_files(ws):
    run = ws.run_copy()
    for name in ("checkpoint-mine.pt", ".draft.tmp", "notes.txt"):
        (run / name).write_text("the user's")
    (run / ".best.pt.k1ll3d.tmp").write_text("left by a killed save of the run")
    return [*SMALLEST, f"run.dir={run}", "run.overwrite=true"]


def _user_files_kept(ws):
    for name in ("checkpoint-mine.pt", ".draft.tmp", "notes.txt"):
        assert (ws.root / "run" / name).read_text() == "the user's", name
    assert not (ws.root / "run" / ".best.pt.k1ll3d.tmp").exists()


def _overwrite_without_record(ws):
    run = ws.run_copy()
    (run / ".run-files").unlink()  # as a folder written by an older version
    return [*SMALLEST, f"run.dir={run}", "run.overwrite=true"]


def _old_run_untouched(ws):
    assert (ws.root / "run" / "best.pt").is_file() and checkpoint.list_checkpoints(ws.root / "run")


ROWS = [
    Row("malicious best.pt (test.py)", _malicious_best, 1, "refused global", script="test",
        after=no_payload),
    Row("malicious checkpoint (--resume)", _malicious_resume, 1, "no loadable checkpoint",
        after=no_payload),
    Row("malicious mini-imagenet pickle", _malicious_mini_pickle, 1, "asks for posix.system",
        after=no_payload),
    Row("malicious tieredImageNet pickle", _malicious_tiered_pickle, 1, "was refused",
        after=no_payload),
    Row("pickle class rows out of range", _rows_out_of_range, 1, "lists row 10000"),
    Row("empty config file", _empty_yaml, 1, "empty.yaml is empty"),
    Row("config file not UTF-8", _binary_yaml, 1, "model.yaml is not UTF-8"),
    Row("run.dir under a file", _run_dir_under_file, 1, "(run.dir, or under run.out_dir) cannot be created"),
    Row("missing test split", _missing_test_split, 1, "no complete test split", after=_no_run_folder),
    Row("missing cross_domain root", _missing_cross_domain, 1, "cross_domain.cub=",
        after=_no_run_folder),
    Row("second writer (live process)", _locked_by_live_process, 1, f"in use by process {os.getppid()}"),
    Row("second writer (other host)", _locked_elsewhere, 1, "on host other-host"),
    Row("stale lock", _stale_lock, 0, "taking over the lock", after=_lock_released),
    Row("config.yaml edited by hand", _edited_config, 1, "inner.step_size: 0.25 -> 0.5"),
    Row("image size beyond memory", _huge_image, 1, "data.image_size=4096"),
    Row("image size beyond any use", lambda ws: [*SMALLEST, "data.image_size=300000"], 1,
        "data.image_size: 300,000 is beyond any usable value"),
    Row("run.device=cuda without a GPU", _no_cuda, 1, "CUDA is not available"),
    Row("outer.lr=1e-3 as written", _lr_as_written, 0, "test accuracy"),
    Row("optimizer overflow outer.lr=1e300", _lr_overflow, 4, "outer.max_bad_steps=2",
        after=_stop_checkpoint_is_finite),
    Row("finite but huge update outer.lr=1e30", _lr_huge, 4, "are the last good ones",
        after=_stop_checkpoint_is_sane),
    Row("test.py options after overrides", _test_args_intermixed, 0, "synthetic/val", script="test"),
    Row("train.py overrides before and after --resume", _train_args_intermixed, 0,
        "resume: train.epochs: 1 -> 2"),
    Row("test.py on a folder without a run", _test_no_run, 1, "holds no config.yaml", script="test",
        may_change=()),
    Row("hidden folder is not a class", _hidden_class_folder, 0, "every image decodes",
        may_change=()),
    Row("--check-data lists a corrupt image", _corrupt_image_check, 1, "1 bad image",
        after=_names_bad_file, may_change=()),
    Row("run.overwrite spares the user's files", _overwrite_spares_user_files, 0, "test accuracy",
        after=_user_files_kept),
    Row("run.overwrite on a folder without a record", _overwrite_without_record, 1,
        "no record of the files it wrote", after=_old_run_untouched),
]


def tree_state(root: Path, skip: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under root, except under the top-level names in `skip`."""
    state = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] in skip or not path.is_file():
            continue
        stat = path.stat()
        state[str(rel)] = (stat.st_size, stat.st_mtime_ns)
    return state


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path, finished_run, mini_data, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ws = Workspace(tmp_path, finished_run, mini_data)
    argv = row.prepare(ws)
    before = tree_state(tmp_path, row.may_change)
    capsys.readouterr()
    status = (train.cli if row.script == "train" else test_script.cli)(argv)
    out, err = capsys.readouterr()
    ws.out = out + err
    assert status == row.status, ws.out
    assert row.fragment in ws.out, ws.out
    assert "Traceback" not in ws.out
    if row.status == 1 and "--check-data" not in argv:
        assert err.startswith("error: "), err
    assert tree_state(tmp_path, row.may_change) == before, "a file outside the run folder changed"
    if row.after is not None:
        row.after(ws)


# ---------------------------------------------------------------------------------------------
# Faults that need more than one command, or the real script in its own process

def test_resume_of_a_finished_run_keeps_test_py_records(tmp_path, finished_run, capsys):
    """test.py's records survive a resume that cuts metrics.jsonl back to its checkpoint, and the
    resume says what it dropped."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert test_script.cli([str(run), "--split", "val"]) == 0
    evaluations = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   if r["kind"] == "test" and r["step"] == -1]
    assert len(evaluations) == 1
    capsys.readouterr()
    assert train.cli(["--resume", str(run), "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "resume: kept 1 test.py records" in out
    assert "resume: dropped 1 records of metrics.jsonl written after the checkpoint (test)" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["kind"] == "test" and r["step"] == -1] == evaluations
    assert [r["epoch"] for r in records if r["kind"] == "train"] == [1, 2]


def test_second_resume_of_a_running_run_is_refused(tmp_path, finished_run, capsys):
    """While one train.py resumes a run, a second is refused with a message naming the first."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--resume", str(run),
                              "train.epochs=400"], env=ENV, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            if (run / LOCK).exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert (run / LOCK).exists(), first.communicate()[0]
        size = (run / "metrics.jsonl").stat().st_size
        assert train.cli(["--resume", str(run), "train.epochs=400"]) == 1
        err = capsys.readouterr().err
        assert f"in use by process {first.pid}" in err and "Traceback" not in err
        for _ in range(1200):  # stop it once it trains (its signal handler is in place)
            if checkpoint.list_checkpoints(run)[-1][0] > 2 or first.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        first.terminate()
        out = first.communicate(timeout=120)[0]
    assert first.returncode == 3, out  # the first writer stopped cleanly, resumable
    assert not (run / LOCK).exists()
    assert (run / "metrics.jsonl").stat().st_size >= size


def test_same_second_runs_get_their_own_folders(tmp_path):
    """Two runs with the same name started in the same second never share a folder."""
    from sparse_maml.config import load_config
    from sparse_maml.run_folder import new_run_dir

    config = load_config(None, [f"run.out_dir={tmp_path}", "run.name=same"])
    folders = {new_run_dir(config) for _ in range(3)}
    assert len(folders) == 3 and all(f.is_dir() for f in folders)


def test_full_disk_while_saving_keeps_the_old_checkpoints(tmp_path, monkeypatch, capsys):
    """No space left while writing a checkpoint: a message, exit 1, the older checkpoint intact."""
    real_save = torch.save
    calls = []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter "
                               "failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    run = tmp_path / "run"
    status = train.cli([*SMALLEST, f"run.dir={run}", "run.checkpoint_every=1",
                        "train.batches_per_epoch=3"])
    err = capsys.readouterr().err
    assert status == 1 and "could not write checkpoint" in err and "previous checkpoints are intact" in err
    assert "Traceback" not in err
    (step, path), = checkpoint.list_checkpoints(run)
    assert step == 1 and checkpoint.load(path)["state"]["step"] == 1
    assert not list(run.glob(".*.tmp"))


def test_file_size_limit_through_train_py(tmp_path):
    """The real script under a file-size limit: a message naming the file, no traceback."""
    run = tmp_path / "run"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALLEST, f"run.dir={run}",
                             "model.widths=[16,16,16,16]"], env=ENV, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and str(run) in result.stderr


def test_corrupt_image_in_a_dataloader_worker(tmp_path, mini_data):
    """A corrupt image found by a worker process: its message (naming the file), not the worker's
    traceback."""
    root = write_miniimagenet(tmp_path / "mini", "folder", mini_data)
    for bad in sorted((root / "train").rglob("*.jpg")):
        bad.write_bytes(b"\xff\xd8 truncated")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALLEST, "data.name=miniimagenet",
                             f"data.root={root}", "data.num_workers=1", "data.image_size=16",
                             f"run.dir={tmp_path / 'run'}"], env=ENV, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "is corrupt or not an image" in result.stderr and str(root / "train") in result.stderr
    assert "(in a DataLoader worker)" in result.stderr


def test_malicious_pickle_through_the_real_script(tmp_path):
    """The crafted mini-imagenet pickle, through train.py in its own process: refused, not run."""
    root = tmp_path / "mini"
    ws = Workspace(tmp_path, tmp_path, {})
    for split in ("train", "val", "test"):
        payload_pickle(root / f"mini-imagenet-cache-{split}.pkl", ws)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALLEST,
                             "data.name=miniimagenet", f"data.root={root}"], env=ENV, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "was refused" in result.stderr
    assert "Traceback" not in result.stderr
    no_payload(ws)


LAUNCHER = ROOT / "run_sparse_MAML.sh"


def launch(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """The launcher, its runs on this interpreter (PYTHON) unless `env` says otherwise."""
    env = env or {**ENV, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(LAUNCHER), *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_restarted_launcher_continues_unfinished_runs_and_skips_finished_ones(tmp_path):
    """An interrupted row (trained, not yet tested) is continued by starting the script again;
    a finished one is skipped."""
    out = tmp_path / "runs"
    first = launch("--debug", "--out", str(out), "maml_conv4_5shot", "train.test_after_training=false")
    assert first.returncode == 0, first.stderr
    metrics = out / "maml_conv4_5shot" / "metrics.jsonl"
    assert '"kind": "test"' not in metrics.read_text()
    again = launch("--debug", "--out", str(out), "maml_conv4_5shot")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming" in again.stdout and '"kind": "test", "step": 1' in metrics.read_text()
    third = launch("--debug", "--out", str(out), "maml_conv4_5shot")
    assert third.returncode == 0 and "done already" in third.stdout


def test_launcher_reports_a_stopped_run_as_stopped(tmp_path):
    """train.py's exit 3 (stopped at a checkpoint) is 'stopped', not FAILED; no further row runs."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ran $3\"\nexit 3\n")
    fake.chmod(0o755)
    result = launch("--out", str(tmp_path / "runs"), "maml_conv4_5shot", "anil_conv4_5shot",
                    env={**ENV, "PYTHON": str(fake)})
    assert result.returncode == 3
    assert "maml_conv4_5shot stopped at a checkpoint" in result.stderr
    assert "FAILED" not in result.stderr + result.stdout
    assert "anil_conv4_5shot" not in result.stdout


def test_launcher_help_is_its_comment_block():
    help_text = launch("--help").stdout
    assert help_text.startswith("Reproduce the results table")
    assert "set -euo" not in help_text and "cd " not in help_text


def test_prepare_cars_without_archives_says_from_archive_at_once(tmp_path, capsys):
    """Stanford Cars has no live URL: a message pointing to --from-archive, no download tried."""
    import prepare_data

    assert prepare_data.main(["cars", "--root", str(tmp_path / "cars"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--from-archive" in err and "no download link" in err and "Traceback" not in err
    assert not (tmp_path / "cars").exists()


def test_prepare_finds_cub_already_extracted_in_root(tmp_path, monkeypatch, capsys):
    """A CUB folder already extracted into --root is used as it is; nothing is downloaded."""
    from sparse_maml.data import download
    from fixtures import write_cub

    import prepare_data

    def no_download(*args, **kwargs):
        raise AssertionError("a download was tried")

    monkeypatch.setattr(download, "download", no_download)
    root = write_cub(tmp_path / "cub", per_class=1)
    assert prepare_data.main(["cub", "--root", str(root), "--no-progress"]) == 0
    assert "already in root, not downloaded" in capsys.readouterr().out
