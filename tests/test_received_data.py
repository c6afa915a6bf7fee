"""Received data, one row each: a dataset, archive, annotation or cache file crafted or damaged as
a shared copy can be, the exit status or exception it gives, a fragment of the message (naming the
file or key), and what must still exist, unchanged, afterwards.

A received file never writes outside its place, deletes what the user put there, makes the program
allocate what a few bytes declare, or yields a silently wrong number. Rows call the command-line
functions in process (train.cli, prepare_data.main) or the library; one runs train.py in its own
process, where only that shows a DataLoader worker's error. A second table pins how images deeper
than 8 bits are scaled.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from PIL import Image

import prepare_data
from sparse_maml.cli import train
from sparse_maml.config import DataConfig
from sparse_maml.data import DataError, build_split, normalization, open_split
from sparse_maml.data import download as dl
from sparse_maml.data.base import MAX_IMAGE_PIXELS, decode_image
from fixtures import make_miniimagenet, write_cub, write_miniimagenet
from sparse_maml.data.photos import class_split

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["model.widths=[2,2,2,2]", "data.num_ways=2", "data.num_shots=1", "data.num_query=1",
        "inner.steps=1", "inner.eval_steps=1", "outer.meta_batch_size=1", "train.epochs=1",
        "train.batches_per_epoch=1", "train.val_every=1", "train.num_val_tasks=1",
        "train.num_test_tasks=1", "train.eval_batch_size=1", "run.tensorboard=false",
        "run.progress=false", "run.device=cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Workspace:
    root: Path
    cub: Path  # a tiny extracted CUB (CUB_200_2011/images/...), shared by the rows
    monkeypatch: pytest.MonkeyPatch
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    """prepare(ws) sets the input up under ws.root and returns the call; `expect` is the exit
    status it returns, or the exception it raises (None: it returns normally)."""

    id: str
    prepare: Callable[[Workspace], Callable[[], Any]]
    expect: Optional[int | type[BaseException]]
    fragment: str
    keep: tuple[str, ...] = ()  # paths under ws.root that must still exist, unchanged
    after: Optional[Callable[[Workspace, Any, str], None]] = None  # (ws, result, output)
    one_line: bool = True  # an exit status other than 0 comes with a one-line "error: ..." message


# ---------------------------------------------------------------------------------------------
# Inputs

def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose valid header declares width x height grey pixels, with one empty data chunk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def checkerboard(mean: int, side: int = 8) -> np.ndarray:
    """(side, side, 3) uint8 pixels of mean `mean` and std 10: mean +- 10 in a checkerboard."""
    signs = np.indices((side, side)).sum(0) % 2 * 2 - 1
    return np.repeat((mean + 10 * signs)[:, :, None], 3, axis=2).astype(np.uint8)


def folder_dataset(root: Path, per_class: int = 3, classes: int = 3, side: int = 8,
                   mean: Optional[int] = None, suffix: str = ".png") -> Path:
    """root/{train,val,test}/c<k>/<i><suffix>: random RGB images (checkerboards of `mean`)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (checkerboard(mean, side) if mean is not None else
                          rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
                Image.fromarray(pixels).save(folder / f"{i}{suffix}")
    return root


def folder_args(root: Path, *extra: str) -> list[str]:
    return [*TINY, "data.name=folder", f"data.root={root}", "data.image_size=16", *extra]


def cub_archive(ws: Workspace, extra: dict[str, str]) -> Path:
    """CUB_200_2011.tgz of the tiny CUB plus `extra` {archive path: text} members."""
    path = ws.root / "downloads" / "CUB_200_2011.tgz"
    path.parent.mkdir(exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(ws.cub / "CUB_200_2011", arcname="CUB_200_2011")
        for name, text in extra.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    ws.monkeypatch.setitem(dl.ARCHIVES, "cub", [dl.Archive("CUB_200_2011.tgz", ())])  # unpinned
    return path


def prepare_cub(ws: Workspace, root: Path, archive: Path) -> Callable[[], int]:
    return lambda: prepare_data.main(["cub", "--root", str(root), "--from-archive", str(archive),
                                      "--no-progress"])


def tiered_pickles(root: Path, labels: list[int]) -> Path:
    """{split}_images_png.pkl + {split}_labels.pkl with one tiny PNG per label."""
    root.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buffer, format="PNG")
    png = np.frombuffer(buffer.getvalue(), np.uint8)
    for split in ("train", "val", "test"):
        (root / f"{split}_images_png.pkl").write_bytes(pickle.dumps([png] * len(labels)))
        (root / f"{split}_labels.pkl").write_bytes(pickle.dumps(
            {"label_specific": np.array(labels, np.int64)}, protocol=2))
    return root


def within_memory(call: Callable[[], Any], limit: int) -> Callable[[], Any]:
    """`call`, failing the test if it allocated more than `limit` bytes (traced) at its peak."""
    def run():
        tracemalloc.start()
        try:
            return call()
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < limit, f"allocated {peak:,} bytes"
    return run


def cars_annotations(root: Path, paths: list[str]) -> Path:
    """cars_annos.mat naming every shipped class, with one record per path (class 1), + car_ims/."""
    from scipy.io import savemat

    (root / "car_ims").mkdir(parents=True)
    names = sorted(n for split in ("train", "val", "test") for n in class_split("cars")[split])
    dtype = [("relative_im_path", object), ("bbox_x1", object), ("bbox_y1", object),
             ("bbox_x2", object), ("bbox_y2", object), ("class", object), ("test", object)]
    records = np.array([(p, 0, 0, 3, 3, 1, 0) for p in paths], dtype=dtype).reshape(1, -1)
    savemat(root / "cars_annos.mat", {"annotations": records,
                                      "class_names": np.array(names, dtype=object).reshape(1, -1)})
    return root


def recorded_statistics(ws: Workspace, root: Path, **changes) -> Callable[[], Any]:
    """Compute and record the train statistics of a folder dataset, then edit the 3x16 entry."""
    normalization.train_statistics(root, 3, 16)
    path = root / normalization.STATISTICS_FILE
    record = json.loads(path.read_text())
    record["3x16"].update(changes)
    path.write_text(json.dumps(record))  # json writes NaN and Infinity as such
    return lambda: train.cli(folder_args(root, f"run.dir={ws.root / 'run'}"))


def script(*args: str) -> Callable[[], int]:
    """train.py in its own process; its output goes to this process's stdout/stderr."""
    def run():
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=ENV,
                                capture_output=True, text=True, timeout=300)
        print(result.stdout)
        print(result.stderr, file=sys.stderr)
        return result.returncode
    return run


# ---------------------------------------------------------------------------------------------
# The rows

def _archive_has_notes(ws):
    (ws.root / "cub" / "notes").mkdir(parents=True)
    (ws.root / "cub" / "notes" / "mine.txt").write_text("the user's")
    archive = cub_archive(ws, {"notes/readme.txt": "the archive's", "attributes.txt": "x"})
    return prepare_cub(ws, ws.root / "cub", archive)


def _only_the_dataset_moved(ws, result, out):
    root = ws.root / "cub"
    assert sorted(p.name for p in (root / "notes").iterdir()) == ["mine.txt"]
    assert not (root / "attributes.txt").exists(), "an entry the dataset does not need was moved"
    assert (root / "CUB_200_2011" / "images").is_dir() and dl.marker_path(root, "cub").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith((".tmp", ".preparing"))]


def _user_folder_in_the_way(ws):
    (ws.root / "cub" / "CUB_200_2011").mkdir(parents=True)
    (ws.root / "cub" / "CUB_200_2011" / "mine.txt").write_text("the user's")
    return prepare_cub(ws, ws.root / "cub", cub_archive(ws, {}))


def _interrupted_preparation(ws):
    root = ws.root / "cub"
    (root / "CUB_200_2011" / "images").mkdir(parents=True)  # half moved by an earlier run
    dl.progress_path(root, "cub").write_text(json.dumps({"entries": ["CUB_200_2011"]}))
    return prepare_cub(ws, root, cub_archive(ws, {}))


def _root_is_a_file(ws):
    (ws.root / "afile").write_text("the user's")
    return prepare_cub(ws, ws.root / "afile", cub_archive(ws, {}))


def _tiered_huge_label(ws):
    root = tiered_pickles(ws.root / "tiered", [0])
    (root / "train_labels.pkl").write_bytes(pickle.dumps(
        {"label_specific": np.array([10**7], np.int64)}, protocol=2))
    ws.notes["size"] = (root / "train_labels.pkl").stat().st_size
    return within_memory(lambda: open_split("tieredimagenet", root, "train"), 20 * 2**20)


def _tiered_label_gap(ws):
    root = tiered_pickles(ws.root / "tiered", [0, 2, 2])
    return lambda: open_split("tieredimagenet", root, "train")


def _csv_climbs_out(ws):
    root = write_miniimagenet(ws.root / "mini", "csv", make_miniimagenet((2, 2, 2), 2, size=8))
    (ws.root / "outside.jpg").write_bytes((root / "images" / "n0000000000000001.jpg").read_bytes())
    lines = (root / "train.csv").read_text().splitlines()
    lines[1] = "../../outside.jpg," + lines[1].split(",")[1]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return lambda: train.cli([*TINY, "data.name=miniimagenet", f"data.root={root}",
                              "data.image_size=16", f"run.dir={ws.root / 'run'}"])


def _csv_absolute(ws):
    root = write_miniimagenet(ws.root / "mini", "csv", make_miniimagenet((2, 2, 2), 2, size=8))
    lines = (root / "test.csv").read_text().splitlines()
    lines[2] = f"{ws.root / 'outside.jpg'}," + lines[2].split(",")[1]
    (root / "test.csv").write_text("\n".join(lines) + "\n")
    return lambda: open_split("miniimagenet", root, "test")


def _cars_climbs_out(ws):
    root = cars_annotations(ws.root / "cars", ["car_ims/000001.jpg", "../secret.jpg"])
    return lambda: open_split("cars", root, "train")


def _bomb_check_data(ws):
    root = folder_dataset(ws.root / "data")
    (root / "val" / "c1" / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    return lambda: train.cli(folder_args(root, "data.normalize=none", "--check-data"))


def _bomb_in_worker(ws):
    root = folder_dataset(ws.root / "data")
    for path in (root / "train").rglob("*.png"):
        path.write_bytes(png_header_only(100_000, 100_000))
    return script(*folder_args(root, "data.normalize=none", "data.num_workers=1",
                               f"run.dir={ws.root / 'run'}"))


def _decode(data: bytes):
    return lambda: decode_image(data, 3, "crafted.png")


def _many_bad_images(ws):
    root = folder_dataset(ws.root / "data", per_class=9)
    for path in sorted((root / "train").rglob("*.png"))[:25]:
        path.write_bytes(b"\x89PNG truncated")
    return lambda: train.cli(folder_args(root, "data.normalize=train", "--check-data"))


def _first_twenty_listed(ws, result, out):
    listed = [line for line in out.splitlines() if line.startswith("  bad: ")]
    assert len(listed) == 20 and len(set(listed)) == 20 and "... and 5 more" in out


def _same_size_new_content(ws):
    """BMP files of one size have one byte size: dark images replaced by bright ones."""
    root = folder_dataset(ws.root / "data", mean=30, suffix=".bmp")
    ws.notes["before"] = normalization.train_statistics(root, 3, 8)
    names = {p: p.stat().st_size for p in (root / "train").rglob("*.bmp")}
    for path in names:
        Image.fromarray(checkerboard(218)).save(path)
    assert {p: p.stat().st_size for p in names} == names
    return lambda: normalization.train_statistics(root, 3, 8)


def _statistics_of_the_new_images(ws, result, out):
    assert ws.notes["before"].mean == pytest.approx((30 / 255,) * 3)
    assert result.mean == pytest.approx((218 / 255,) * 3), "the old statistics were kept"
    assert result.content_key != ws.notes["before"].content_key


def _crafted_std(value):
    def prepare(ws):
        return recorded_statistics(ws, folder_dataset(ws.root / "data"), std=value)
    return prepare


def _statistics_not_json(ws):
    root = folder_dataset(ws.root / "data")
    (root / normalization.STATISTICS_FILE).write_text("{'3x8': ")
    return lambda: build_split(DataConfig(name="folder", root=str(root), image_size=8), "train")


def _index_negative_count(ws):
    root = write_miniimagenet(ws.root / "mini", "npy", make_miniimagenet((2, 2, 2), 2, size=8))
    (root / "val_index.json").write_text(json.dumps({"classes": ["a", "b"], "counts": [6, -2]}))
    return lambda: open_split("miniimagenet", root, "val")


def _index_huge(ws):
    root = write_miniimagenet(ws.root / "mini", "npy", make_miniimagenet((2, 2, 2), 2, size=8))
    with open(root / "val_index.json", "r+b") as f:
        f.truncate(65 * 2**20)  # sparse: no disk used, 65 MB to read
    return within_memory(lambda: open_split("miniimagenet", root, "val"), 2**20)


def _npy_header_huge(ws):
    root = write_miniimagenet(ws.root / "mini", "npy", make_miniimagenet((2, 2, 2), 2, size=8))
    with open(root / "val_images.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (10**9, 84, 84, 3)})
    (root / "val_index.json").write_text(json.dumps({"classes": ["a"], "counts": [10**9]}))
    return lambda: open_split("miniimagenet", root, "val")


def _hdf5(ws, shape, chunks=None) -> Callable[[], Any]:
    import h5py

    root = write_miniimagenet(ws.root / "mini", "hdf5", make_miniimagenet((2, 2, 2), 2, size=8))
    with h5py.File(root / "miniimagenet" / "train_data.hdf5", "a") as f:
        del f["datasets"]["n00000000"]
        f["datasets"].create_dataset("n00000000", shape=shape, dtype=np.uint8, chunks=chunks)
    return lambda: open_split("miniimagenet", root, "train")


def _hdf5_compressed_zeros(ws):
    import h5py

    root = write_miniimagenet(ws.root / "mini", "hdf5", make_miniimagenet((2, 2, 2), 2, size=8))
    with h5py.File(root / "miniimagenet" / "train_data.hdf5", "a") as f:
        del f["datasets"]["n00000000"]
        f["datasets"].create_dataset("n00000000", data=np.zeros((100, 64, 64, 3), np.uint8),
                                     chunks=(100, 64, 64, 3), compression="gzip")
    return lambda: open_split("miniimagenet", root, "train")


def _npz_as_npy(ws):
    root = write_miniimagenet(ws.root / "mini", "npy", make_miniimagenet((2, 2, 2), 2, size=8))
    np.savez(ws.root / "arrays.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    os.replace(ws.root / "arrays.npz", root / "val_images.npy")
    return lambda: open_split("miniimagenet", root, "val")


def _mat_declares_huge(ws):
    from scipy.io import savemat

    root = cars_annotations(ws.root / "cars", ["car_ims/000001.jpg"])
    savemat(root / "cars_annos.mat", {"annotations": np.zeros((1, 2 * 10**6), np.uint8)},
            do_compression=True)
    ws.notes["size"] = (root / "cars_annos.mat").stat().st_size
    return lambda: open_split("cars", root, "train")


def _zip_bomb(ws):
    path = ws.root / "images_background.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images_background/zeros.png", bytes(4 * 2**20))
    (ws.root / "out").mkdir()
    return lambda: dl.extract(path, ws.root / "out")


def _tar_bomb(ws):
    path = ws.root / "car_ims.tgz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("car_ims/zeros.jpg")
        info.size = 4 * 2**20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    (ws.root / "out").mkdir()
    return lambda: dl.extract(path, ws.root / "out")


def _pickle_doubling_bytes(ws):
    """mini-imagenet-cache pickles whose image_data is b'xx' hex-encoded 40 times over: 215 bytes
    of file asking for 2 TB."""
    call = b"c_codecs\nencode\n"
    data = b"C\x02xx"
    for _ in range(40):
        data = call + data + b"X\x03\x00\x00\x00hex\x86R"
    content = b"\x80\x02}(X\n\x00\x00\x00image_data" + data + b"X\n\x00\x00\x00class_dict}u."
    root = ws.root / "mini"
    root.mkdir()
    for split in ("train", "val", "test"):
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(content)
    return within_memory(lambda: open_split("miniimagenet", root, "train"), 2**20)


def _tiered_one_image_many_times(ws):
    """A tiered-imagenet.tar whose pickles list one PNG 100,000 times (a few bytes per listing)."""
    source = ws.root / "source" / "tiered"
    tiered_pickles(source, [0])
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buffer, format="PNG")
    png = np.frombuffer(buffer.getvalue(), np.uint8)
    (source / "train_images_png.pkl").write_bytes(pickle.dumps([png] * 100_000))
    (source / "train_labels.pkl").write_bytes(pickle.dumps(
        {"label_specific": np.zeros(100_000, np.int8)}, protocol=2))
    archive = ws.root / "tiered-imagenet.tar"
    with tarfile.open(archive, "w") as tar:  # uncompressed, as the real one
        tar.add(source, arcname="tiered")
    ws.monkeypatch.setitem(dl.ARCHIVES, "tieredimagenet", [dl.Archive("tiered-imagenet.tar", ())])
    return lambda: prepare_data.main(["tieredimagenet", "--root", str(ws.root / "data"),
                                      "--from-archive", str(archive), "--no-progress"])


def _nothing_prepared(ws, result, out):
    assert not (ws.root / "data").exists()


def _tar_member_climbs_out(ws):
    path = ws.root / "archive" / "CUB_200_2011.tgz"
    path.parent.mkdir()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("CUB_200_2011/../../notes.txt")
        info.size = 8
        tar.addfile(info, io.BytesIO(b"replaced"))
    (ws.root / "notes.txt").write_text("the user's")
    (ws.root / "archive" / "out").mkdir()
    return lambda: dl.extract(path, ws.root / "archive" / "out")


def _nothing_extracted_beyond_the_bound(ws, result, out):
    assert sum(p.stat().st_size for p in (ws.root / "out").rglob("*") if p.is_file()) < 2**20


ROWS = [
    # 1. Preparation moves only what the dataset needs and replaces nothing of the user's.
    Row("prepare: archive entry named like the user's notes/", _archive_has_notes, 0,
        "prepared cub", keep=("cub/notes/mine.txt",), after=_only_the_dataset_moved),
    Row("prepare: the user's folder where the dataset goes", _user_folder_in_the_way, 1,
        "CUB_200_2011 is already there and was not written by preparing cub",
        keep=("cub/CUB_200_2011/mine.txt",)),
    Row("prepare: rerun after an interrupted move replaces its own", _interrupted_preparation, 0,
        "prepared cub"),
    Row("prepare: --root is a file", _root_is_a_file, 1, "afile is a file, not a folder",
        keep=("afile",)),
    # 2. Sizes come from the data, not from a label.
    Row("tieredImageNet label 10**7 (a few bytes)", _tiered_huge_label, DataError,
        "label_specific runs from 10000000 to 10000000, but only 1 classes are present",
        keep=("tiered/train_labels.pkl",)),
    Row("tieredImageNet labels skip a class", _tiered_label_gap, DataError,
        "runs from 0 to 2, but only 2 classes are present"),
    # 3. Paths stay inside data.root.
    Row("csv row ../../outside.jpg (train.py)", _csv_climbs_out, 1,
        "train.csv, line 2: entry '../../outside.jpg' is not a path inside",
        keep=("outside.jpg", "mini/train.csv")),
    Row("csv row with an absolute path", _csv_absolute, DataError,
        "test.csv, line 3: entry '/"),
    Row("cars annotation ../secret.jpg", _cars_climbs_out, DataError,
        "cars_annos.mat, record 2: entry '../secret.jpg' is not a path inside"),
    # 4. Decompression bombs: our limit, our message, wherever the image is decoded.
    Row("100000x100000 PNG under --check-data", _bomb_check_data, 1,
        "bomb.png declares 10,000,000,000 pixels, more than the limit",
        keep=("data/val/c1/bomb.png",), one_line=False),
    Row("100000x100000 PNG in a DataLoader worker (train.py)", _bomb_in_worker, 1,
        "declares 10,000,000,000 pixels, more than the limit of 67,108,864 (8192 x 8192); "
        "refused before decoding (in a DataLoader worker)"),
    Row("PNG just over our limit, under PIL's", lambda ws: _decode(png_header_only(8193, 8192)),
        DataError, "crafted.png declares 8193 x 8192 pixels"),
    Row("PNG in PIL's warning range", lambda ws: _decode(png_header_only(10_000, 10_000)),
        DataError, "crafted.png declares 100,000,000 pixels"),
    Row("PNG beyond PIL's error size", lambda ws: _decode(png_header_only(50_000, 50_000)),
        DataError, "crafted.png declares 2,500,000,000 pixels"),
    # 6. --check-data lists every bad image (bounded), also with train statistics.
    Row("--check-data with data.normalize=train, 25 bad images", _many_bad_images, 1,
        "25 bad image(s)", after=_first_twenty_listed, one_line=False),
    # 7. The statistics cache: keyed on content, values checked when read back.
    Row("train images replaced by others of the same size", _same_size_new_content, None, "",
        after=_statistics_of_the_new_images),
    Row("recorded std 1e-300", _crafted_std([1e-300] * 3), 1,
        "train_statistics.json, entry '3x16': mean", keep=("data/train_statistics.json",)),
    Row("recorded std NaN", _crafted_std([float("nan")] * 3), 1, "std [nan, nan, nan]",
        keep=("data/train_statistics.json",)),
    Row("recorded std negative", _crafted_std([-0.2] * 3), 1, "std in [1e-06, 0.5]",
        keep=("data/train_statistics.json",)),
    Row("recorded std infinite", _crafted_std([float("inf")] * 3), 1, "entry '3x16'",
        keep=("data/train_statistics.json",)),
    Row("recorded std of the wrong length", _crafted_std([0.2]), 1, "are not 3 finite values",
        keep=("data/train_statistics.json",)),
    Row("statistics file not JSON", _statistics_not_json, DataError,
        "train_statistics.json is corrupt", keep=("data/train_statistics.json",)),
    # 8. Other sizes declared by small files.
    Row("npy index with a negative count", _index_negative_count, DataError,
        "val_index.json is corrupt: 2 classes but 2 counts, or a negative count"),
    Row("npy index of 65 MB", _index_huge, DataError, "val_index.json is 68,157,440 bytes"),
    Row("npy header declaring 10**9 images", _npy_header_huge, DataError,
        "val_images.npy is corrupt"),
    Row("hdf5 declaring a million unwritten images",
        lambda ws: _hdf5(ws, (10**6, 8, 8, 3), chunks=(1, 8, 8, 3)), DataError,
        "class 'n00000000': declares (1000000, 8, 8, 3) (192,000,000 bytes) but stores 0 bytes"),
    Row("hdf5 image of 100000x100000 pixels", lambda ws: _hdf5(ws, (1, 100_000, 100_000, 3),
                                                             chunks=(1, 64, 64, 3)),
        DataError, "images of shape (100000, 100000, 3) are not"),
    Row("hdf5 class of zeros compressed over 100-fold", _hdf5_compressed_zeros, DataError,
        "declares (100, 64, 64, 3) (1,228,800 bytes) but stores"),
    Row("npz archive under the .npy name", _npz_as_npy, DataError,
        "val_images.npy is an .npz archive, not one .npy array"),
    Row(".mat variable declaring 2 million elements", _mat_declares_huge, DataError,
        "variable 'annotations' declares shape (1, 2000000)"),
    Row("pickle doubling bytes with the hex codec", _pickle_doubling_bytes, DataError,
        "was refused: it calls _codecs.encode with bytes and codec 'hex'"),
    Row("tieredImageNet archive listing one image 100,000 times", _tiered_one_image_many_times, 1,
        "its train split lists 100,000 images, 2,116,800,000 bytes once converted",
        keep=("tiered-imagenet.tar",), after=_nothing_prepared),
    Row("tar member ../../notes.txt", _tar_member_climbs_out, DataError,
        "which is outside the destination; refused", keep=("notes.txt",)),
    Row("zip unpacking to 1000 times its size", _zip_bomb, DataError,
        "refused as a decompression bomb", after=_nothing_extracted_beyond_the_bound),
    Row("tar.gz unpacking to 1000 times its size", _tar_bomb, DataError,
        "refused as a decompression bomb", after=_nothing_extracted_beyond_the_bound),
]


@pytest.fixture(scope="module")
def cub_source(tmp_path_factory) -> Path:
    return write_cub(tmp_path_factory.mktemp("cub"), per_class=1, size=8)


def snapshot(root: Path, paths: tuple[str, ...]) -> dict[str, Any]:
    """The bytes of each kept file, the sorted listing of each kept folder."""
    state = {}
    for rel in paths:
        path = root / rel
        assert path.exists(), f"{rel} was not set up"
        state[rel] = path.read_bytes() if path.is_file() else sorted(os.listdir(path))
    return state


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_received_data(row: Row, tmp_path, cub_source, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ws = Workspace(tmp_path, cub_source, monkeypatch)
    call = row.prepare(ws)
    before = snapshot(tmp_path, row.keep)
    capsys.readouterr()
    result, message = None, ""
    if isinstance(row.expect, type):
        with pytest.raises(row.expect) as raised:
            call()
        message = str(raised.value)
    else:
        result = call()
    out, err = capsys.readouterr()
    output = message or out + err
    if isinstance(row.expect, int):
        assert result == row.expect, output
        if row.expect != 0 and row.one_line:
            assert err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert row.fragment in output, output
    assert "Traceback" not in output
    assert snapshot(tmp_path, row.keep) == before, "a kept file changed or went"
    if row.after is not None:
        row.after(ws, result, output)


# ---------------------------------------------------------------------------------------------
# Images deeper than 8 bits: how each is scaled (base._eight_bit)

def _tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


def _png16(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


RAMP = np.linspace(0, 1, 16).reshape(4, 4)
FLOATS = (RAMP * 0.8).astype(np.float32)  # x 255 = 13.6 k: no value halfway between two greys
DEEP_ROWS = [
    # (id, encoded file, expected uint8 grey pixels)
    ("16-bit PNG: 65535 -> 255", _png16(RAMP * 65535), np.round(RAMP * 65535 / 257)),
    ("32-bit float in [0, 1]: x 255", _tiff(FLOATS), np.round(FLOATS.astype(np.float64) * 255)),
    ("32-bit float outside [0, 1]: its own range", _tiff((RAMP * 1000 - 200).astype(np.float32)),
     np.round(RAMP * 255)),
    ("32-bit signed integer: the type's range",
     _tiff((RAMP * (2**32 - 1) - 2**31).round().astype(np.int32)), np.round(RAMP * 255)),
]


@pytest.mark.parametrize("data, expected", [r[1:] for r in DEEP_ROWS],
                         ids=[r[0] for r in DEEP_ROWS])
def test_deep_images_are_scaled_not_clipped(data, expected):
    image = decode_image(data, 1, "deep.tif")
    assert torch.equal(image[0], torch.from_numpy(expected.astype(np.uint8)))


def test_float_image_with_nan_is_refused():
    pixels = RAMP.astype(np.float32)
    pixels[1, 1] = np.nan
    with pytest.raises(DataError, match="deep.tif is a float image holding NaN"):
        decode_image(_tiff(pixels), 3, "deep.tif")


def test_statistics_record_its_content_key_and_are_exposed(tmp_path):
    """normalization_statistics gives what training normalises with, and the key of its images."""
    root = folder_dataset(tmp_path / "data")
    config = DataConfig(name="folder", root=str(root), image_size=8)
    statistics = normalization.normalization_statistics(config)
    split = build_split(config, "val")
    assert (split.mean, split.std) == (statistics.mean, statistics.std)
    record = json.loads((root / normalization.STATISTICS_FILE).read_text())
    assert record["3x8"]["content_key"] == statistics.content_key
    unnormalised = dataclasses.replace(config, normalize="none")
    assert normalization.normalization_statistics(unnormalised) is None
    assert MAX_IMAGE_PIXELS == 8192 * 8192
