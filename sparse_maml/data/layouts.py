"""Finding a dataset on disk: layouts, their expected files, and the one error a user sees.

A layout is a named way a dataset is stored (`pickle`, `hdf5`, ...). Each has a `find(root, split)`
that returns the files it needs for a split when they are all present (else None), and an
`open(root, split, files)` that returns the FewShotSplit. `data.layout=auto` takes the first layout
that is complete for the split, in the order listed (the fastest to read first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .base import DataError, FewShotSplit

PREPARE_HINT = "python utils/prepare_data.py {name} --root {root}"


@dataclass(frozen=True)
class Layout:
    """One on-disk form of a dataset."""

    name: str
    expected: str  # the files it needs, for messages: "{split}.csv (filename,label) + images/"
    find: Callable[[Path, str], Optional[Any]]
    open: Callable[[Path, str, Any], FewShotSplit]


def missing_message(dataset: str, root: Path, split: str, layouts: list[Layout],
                    other_splits: dict[str, list[str]]) -> str:
    """The one message for a missing or incomplete dataset: folder, layouts, files, command."""
    lines = [f"{dataset}: no complete {split} split found in {root.resolve()}"]
    if other_splits:
        found = "; ".join(f"{name} has {', '.join(s)}" for name, s in other_splits.items())
        lines.append(f"  (incomplete: layout {found}, but not {split})")
    lines.append("  layouts accepted (expected files, relative to data.root):")
    lines += [f"    {lay.name:8s} {lay.expected.replace('{split}', split)}" for lay in layouts]
    lines.append(f"  prepare it with: {PREPARE_HINT.format(name=dataset, root=root)}  (or add "
                 "--from-archive FILE for an archive you already have), or set data.download=true")
    return "\n".join(lines)


def resolve(dataset: str, root: Path, split: str, layouts: list[Layout],
            forced: str = "auto") -> FewShotSplit:
    """Open `split` of `dataset` from `root` in the forced layout, or the first complete one."""
    layout, files = locate(dataset, root, split, layouts, forced)
    return layout.open(Path(root), split, files)


def locate(dataset: str, root: Path, split: str, layouts: list[Layout],
           forced: str = "auto") -> tuple[Layout, Any]:
    """The layout `split` of `dataset` is stored in under `root`, and its files; nothing is read.
    Raises DataError (the missing-dataset message) when no layout is complete."""
    root = Path(root)
    if forced != "auto" and forced not in [layout.name for layout in layouts]:
        raise DataError(f"data.layout={forced!r} is not a {dataset} layout; choose auto or one of "
                        f"{', '.join(layout.name for layout in layouts)}")
    tried = [layout for layout in layouts if forced in ("auto", layout.name)]
    for layout in tried if root.is_dir() else []:
        files = layout.find(root, split)
        if files is not None:
            return layout, files
    other: dict[str, list[str]] = {}
    for layout in tried if root.is_dir() else []:
        splits = [s for s in ("train", "val", "test") if s != split and layout.find(root, s)]
        if splits:
            other[layout.name] = splits
    raise DataError(missing_message(dataset, root, split, tried, other))
