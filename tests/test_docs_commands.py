"""Every fenced command of README.md and docs/*.md runs as written, in order, on a fresh copy of
the checkout, and the test fails on the first one that fails.

What the test changes, each by a rule written here:
- A command that trains (`python train.py` without --resume) gets configs/debug.overrides appended
  (synthetic data, a two-channel network, one step), except the keys the command sets itself.
- A launcher command that would train (`./run_sparse_MAML.sh` without --dry-run) runs with
  --dry-run; the commands any launcher prints are each checked with `train.py --print-config`,
  which resolves their config without training.
- Placeholders (PLACEHOLDERS) name the run folder and config file made by the commands above.
- A command that needs what a CPU-only test cannot have (GPUs, a Slurm cluster, a download, a
  dataset that is not on disk) is skipped by one of SKIP_RULES; the skips are printed, and the
  test checks that each rule is used by some command, so a rule cannot outlive its reason.

`python ...` commands without shell syntax run in this process (runpy), which saves the torch
import per command; the rest run in bash with `python` meaning this interpreter.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


from sparse_maml.cli.train import cli as train_cli

REPO = Path(__file__).resolve().parents[1]
DEBUG_OVERRIDES = [line.strip() for line in (REPO / "configs/debug.overrides").read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
PLACEHOLDERS = {  # placeholder in the docs -> what the commands above them made
    "RUN_DIR": "runs/sparse_maml_conv4_5shot",
    "runs/my_run": "runs/sparse_maml_conv4_5shot",
    "my.yaml": "configs/demo.yaml",
}
SHELL_SYNTAX = re.compile(r"[|<>;&$*`]")


@dataclass
class Command:
    source: str  # file:line
    text: str
    kind: str  # "shell", "python" (a script to run), "file" (a file to write), "script" (a job file)
    name: str = ""  # the file a "file" block writes


def missing_root(text: str, work: Path) -> Optional[str]:
    """The dataset folder a command reads that is not on disk, if any."""
    for root in re.findall(r"(?:data\.root=|--root )(\S+)", text):
        if not (work / root).exists():
            return root
    return None


def check_data_root(text: str, work: Path) -> Optional[str]:
    """For `train.py --check-data`: the configured dataset folder, when it is not on disk."""
    if "--check-data" not in text:
        return None
    args = [a for a in shlex.split(text)[2:] if a != "--check-data"]
    with contextlib.chdir(work), contextlib.redirect_stdout(io.StringIO()) as out:
        train_cli([*args, "--print-config"])
    root = re.search(r"^  root: (.*)$", out.getvalue(), re.M).group(1).strip("'\"")
    return None if (work / root).exists() else root


# (reason, predicate(text, work) -> bool): the first that matches skips the command.
SKIP_RULES: list[tuple[str, Callable[[str, Path], bool]]] = [
    ("installs packages: the environment under test is set up already",
     lambda t, w: t.startswith("pip ")),
    ("the test suite itself", lambda t, w: "-m pytest" in t),
    ("several processes: tests/test_distributed.py runs train.py and test.py under torchrun",
     lambda t, w: t.startswith("torchrun")),
    ("needs a Slurm cluster: tests/test_slurm.py covers utils/slurm.py",
     lambda t, w: "utils/slurm.py" in t),
    ("needs GPUs", lambda t, w: bool(re.search(r"--gpus [0-9]", t))
     or ("utils/sweep.py" in t and "--gpus none" not in t)),
    ("downloads a dataset or reads an archive", lambda t, w: "utils/prepare_data.py" in t),
    ("needs a dataset that is not on disk", lambda t, w: missing_root(t, w) is not None),
    ("--check-data decodes the configured dataset, which is not on disk",
     lambda t, w: check_data_root(t, w) is not None),
    ("plots the runs of a launcher command that this test runs with --dry-run",
     lambda t, w: "plot_sparsity.py --sweep" in t),
    ("a job script for a cluster, shown, not a command", lambda t, w: t.startswith("#!")),
]


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # inside quotes stays)."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def documented_commands() -> list[Command]:
    """The fenced bash and python blocks of README.md, then docs/*.md, as commands in order."""
    commands = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^```(\w*)\s*$", lines[i])
            i += 1
            if not fence:
                continue
            start, block = i, []
            while not lines[i].startswith("```"):
                block.append(lines[i])
                i += 1
            i += 1
            where = f"{path.relative_to(REPO)}:{start + 1}"
            if fence.group(1) == "python":
                named = re.match(r"^# (\S+\.py)$", block[0])
                commands.append(Command(where, "\n".join(block) + "\n", "file" if named else "python",
                                        named.group(1) if named else ""))
            elif fence.group(1) in ("bash", "sh"):
                if block[0].startswith("#!"):
                    commands.append(Command(where, "\n".join(block), "script"))
                    continue
                logical = ""
                for n, line in enumerate(block):
                    logical += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
                    if line.rstrip().endswith("\\"):
                        continue
                    text = " ".join(strip_comment(logical).split())
                    logical = ""
                    if text:
                        commands.append(Command(f"{path.relative_to(REPO)}:{start + n + 1}", text,
                                                "shell"))
    return commands


def fill_placeholders(text: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        text = re.sub(rf"(?<![\w/.]){re.escape(placeholder)}(?![\w/])", value, text)
    return text


def with_debug_overrides(text: str) -> str:
    """A training command with the debug overrides it does not set itself appended."""
    words = text.split()
    if ("train.py" not in words or "--resume" in words or "--check-data" in words
            or "--print-config" in words or "debug.overrides" in text):
        return text
    own = {w.split("=")[0] for w in words if "=" in w and not w.startswith("-")}
    if "model.arch" in own:
        own.add("model.widths")  # the built-in backbones' widths
    extra = [o for o in DEBUG_OVERRIDES if o.split("=")[0] not in own]
    return " ".join([text, *(shlex.quote(o) for o in extra)])


def as_dry_run(text: str) -> str:
    if text.startswith("./run_sparse_MAML.sh") and "--dry-run" not in text:
        return text.replace("./run_sparse_MAML.sh", "./run_sparse_MAML.sh --dry-run", 1)
    return text


def run_in_process(argv: list[str], work: Path) -> tuple[int, str]:
    """`python SCRIPT ARGS` in this process, in `work`; (exit status, output)."""
    out = io.StringIO()
    saved = sys.argv
    sys.argv = argv
    try:
        with contextlib.chdir(work), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(argv[0], run_name="__main__")
        status = 0
    except SystemExit as done:
        status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            out.write(done.code)
    finally:
        sys.argv = saved
    return status, out.getvalue()


def check_printed_commands(output: str, work: Path) -> tuple[int, str]:
    """Each `python train.py ...` line a launcher printed resolves its config (--print-config)."""
    lines = [line for line in output.splitlines() if re.match(r"\S*python\S* train\.py ", line)]
    if not lines:
        return 1, output + "\n(no train.py command printed)"
    for line in lines:
        status, text = run_in_process(["train.py", *shlex.split(line)[2:], "--print-config"], work)
        if status != 0:
            return status, f"{line}\n{text}"
    return 0, f"{len(lines)} printed command(s) resolve their config"


def fresh_copy(dest: Path) -> Path:
    """The checkout's files (tracked and untracked, not ignored), without runs/ or data/."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True)
    if listed.returncode == 0:
        for name in listed.stdout.decode().split("\0"):
            source = REPO / name
            if name and source.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest / name)
    else:  # not a git checkout: everything but what git would ignore
        shutil.copytree(REPO, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", "runs", "data", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info"))
    return dest


def test_every_documented_command_runs(tmp_path, monkeypatch, one_thread):
    work = fresh_copy(tmp_path / "checkout")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(work))
    monkeypatch.setenv("MPLBACKEND", "Agg")

    ran, skipped, used_rules = [], [], set()
    for command in documented_commands():
        text = fill_placeholders(command.text)
        if command.kind == "file":
            (work / command.name).write_text(text)
            ran.append((command.source, f"write {command.name}", 0.0))
            continue
        if command.kind != "python":
            reason = next((r for r, matches in SKIP_RULES if matches(text, work)), None)
            if reason is not None:
                skipped.append((command.source, text.splitlines()[0], reason))
                used_rules.add(reason)
                continue
        text = as_dry_run(with_debug_overrides(text))
        start = time.perf_counter()
        if command.kind == "python":
            script = tmp_path / "block.py"
            script.write_text(text)
            status, output = run_in_process([str(script)], work)
        elif text.startswith("python ") and not SHELL_SYNTAX.search(text):
            status, output = run_in_process(shlex.split(text)[1:], work)
        else:
            done = subprocess.run(["bash", "-c", text], cwd=work, capture_output=True, text=True,
                                  timeout=300)
            status, output = done.returncode, done.stdout + done.stderr
            if status == 0 and text.startswith("./run_sparse_MAML.sh") and "|" not in text \
                    and ">" not in text:
                status, output = check_printed_commands(output, work)
        seconds = time.perf_counter() - start
        assert status == 0, (f"{command.source}: `{text}` exited with {status}:\n{output[-3000:]}")
        ran.append((command.source, text.splitlines()[0], seconds))

    print(f"\nran {len(ran)} documented commands:")
    for source, text, seconds in ran:
        print(f"  {seconds:5.1f} s  {source}  {text[:100]}")
    print(f"skipped {len(skipped)}:")
    for source, text, reason in skipped:
        print(f"  {source}  {text[:70]}  -- {reason}")
    assert used_rules == {reason for reason, _ in SKIP_RULES}, "a skip rule matches no command"
    assert len(ran) >= 20  # the documented workflow, not only skips
    check_run_folder_as_described(work / "runs/sparse_maml_conv4_5shot")


def check_run_folder_as_described(run_dir: Path) -> None:
    """The README's account of a run folder: what each metrics.jsonl record holds, provenance."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    described = {
        "train": {"loss", "accuracy", "skipped_steps", "seconds", "mask_sparsity", "layer_sparsity"},
        "val": {"accuracy", "ci95", "best"},
        "test": {"dataset", "accuracy", "ci95", "num_tasks", "steps", "sparsity"},
        "test.py": {"dataset", "split", "accuracy", "ci95", "num_tasks", "steps", "overrides"},
    }
    for kind, keys in described.items():
        of_kind = [r for r in records if r["kind"] == kind.removesuffix(".py")
                   and ("overrides" in r) == kind.endswith(".py")]
        assert of_kind and all(keys <= set(r) for r in of_kind), (kind, of_kind[:1])
    starts = [json.loads(line) for line in (run_dir / "provenance.jsonl").read_text().splitlines()]
    assert starts[0]["event"] == "start" and "train.py" in " ".join(starts[0]["command"])
