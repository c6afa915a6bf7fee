"""Fetching, verifying, extracting and preparing datasets (utils/prepare_data.py, data.download).

`prepare(dataset, root)`: each archive comes from `--from-archive` or is downloaded into
`root/.downloads/` (resumed with HTTP Range from a `.part` file, retried with exponential backoff,
mirror by mirror) and checked against its pinned md5/sha256 (a mismatch deletes the file). It is
extracted into a temporary folder inside root and converted to the fastest form the loader reads
(MiniImageNet/tieredImageNet: memory-mapped `{split}_images.npy`); only then are the entries the
readers need (DATASET_ENTRIES) moved into root. An entry already in root is never replaced unless
an interrupted preparation of the same dataset put it there (`.preparing-<dataset>.json`, written
before anything moves); the marker `.prepared-<dataset>.json` (with the checksums) is written
last. A failure removes the temporary folder, so nothing half-written looks like a dataset.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..files import atomic_write
from .base import MAX_EXPANSION, DataError, FewShotSplit

CHUNK = 1 << 20
USER_AGENT = "sparse_maml-prepare/1.0"
SPLITS = ("train", "val", "test")
# A public Google Drive file's direct-download URL (confirm=t skips the virus-scan page).
GDRIVE = "https://drive.usercontent.google.com/download?id={}&export=download&confirm=t"


@dataclass(frozen=True)
class Archive:
    """One file to fetch: its name, mirrors in order, and its checksum where one is known."""

    filename: str
    urls: tuple[str, ...] = ()
    md5: Optional[str] = None
    sha256: Optional[str] = None
    manual: str = ""  # where to get a file that cannot be downloaded (then urls is empty)


# Checksums are pinned only where they are published and known; for the others the computed
# checksum is recorded in the marker file so later copies can be compared.
ARCHIVES: dict[str, list[Archive]] = {
    # Mirrors: torchmeta's copy (renmengye/few-shot-ssl), then learn2learn's.
    "miniimagenet": [Archive("mini-imagenet.tar.gz",
                             (GDRIVE.format("16V_ZlkW4SsnNDtnGmaBRq2OoPmUOc5mY"),
                              GDRIVE.format("1LLUjwSUpWGSWizl3JZxd08V30_dIaRBx")),
                             md5="b38f1eb4251fb9459ecc8e7febf9b2eb")],
    # renmengye/few-shot-ssl's copy; md5 not pinned.
    "tieredimagenet": [Archive("tiered-imagenet.tar",
                               (GDRIVE.format("1g1aIDy2Ar_MViF2gDXFYDBTR-HYecV07"),))],
    "cub": [Archive("CUB_200_2011.tgz",
                    ("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
                     "?download=1",), md5="97eceeb196236b17998738112f37df78")],
    # Stanford's links (ai.stanford.edu/~jkrause/car196/) are gone: --from-archive only.
    "cars": [Archive(name, manual=f"Stanford Cars has no download link any more (the Stanford URL "
                                  f"answers 404): get {name} from a copy you trust and pass "
                                  "--from-archive PATH (see docs/datasets.md)")
             for name in ("car_ims.tgz", "cars_annos.mat")],
    "omniglot": [Archive(f"{name}.zip", ("https://raw.githubusercontent.com/brendenlake/omniglot/"
                                         f"master/python/{name}.zip",), md5=md5)
                 for name, md5 in (("images_background", "68d2efa1b9178cc56df9314c21c6e718"),
                                   ("images_evaluation", "6b91aef0f799c5bb55b94e3f2daec811"))],
}

# Datasets converted to the memory-mapped npy form after extraction (their images share one size).
CONVERTED = ("miniimagenet", "tieredimagenet")
NATIVE_SIZE = 84
# The entries of an extracted archive the readers of each dataset use (photos.py's layouts); only
# these are moved into root. The converted datasets move the npy files they were converted to.
DATASET_ENTRIES = {
    "cub": ("CUB_200_2011", "images"),
    "cars": ("cars_annos.mat", "car_ims", "devkit", "cars_train", "cars_test",
             "cars_test_annos_withlabels.mat"),
    "omniglot": ("images_background", "images_evaluation", "omniglot-py", "omniglot"),
}


def marker_path(root: Path, dataset: str) -> Path:
    """The file whose presence says `dataset` was fully prepared in `root`."""
    return Path(root) / f".prepared-{dataset}.json"


def progress_path(root: Path, dataset: str) -> Path:
    """The record of the entries a preparation of `dataset` is moving into `root`."""
    return Path(root) / f".preparing-{dataset}.json"


def verify(path: Path, archive: Archive) -> dict[str, str]:
    """Check `path` against the pinned checksum(s) of `archive`; return its md5 and sha256."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            md5.update(block)
            sha.update(block)
    digests = {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}
    for kind in ("md5", "sha256"):
        expected = getattr(archive, kind)
        if expected and digests[kind] != expected.lower():
            raise DataError(f"checksum mismatch for {path}: {kind} is {digests[kind]}, expected "
                            f"{expected} for {archive.filename} (corrupt or a different file)")
    return digests


def fetch_url(url: str, dest: Path, timeout: float = 30.0, progress: bool = True) -> None:
    """Download `url` to `dest`, resuming from `dest`.part (renamed only once complete)."""
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the .part already holds the whole file
            part.replace(dest)
            return
        raise
    with response:
        if have and response.status != 206:  # server ignored Range: start again
            have = 0
        if "text/html" in response.headers.get("Content-Type", "") and "drive" in url:
            raise DataError(f"{url} answered with a web page instead of the file (Google Drive "
                            "quota or permission); download it in a browser and pass "
                            "--from-archive")
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name,
                   disable=not progress, leave=False)
        with open(part, "ab" if have else "wb") as f, bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                f.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size < total:
        raise ConnectionError(f"transfer of {url} stopped at {size} of {total} bytes")
    part.replace(dest)


def download(archive: Archive, folder: Path, retries: int = 4, backoff: float = 2.0,
             progress: bool = True, sleep: Callable[[float], None] = time.sleep) -> Path:
    """Fetch `archive` into `folder` mirror by mirror, resuming and retrying; verify it."""
    if not archive.urls and archive.manual:
        raise DataError(archive.manual)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / archive.filename
    if dest.exists():
        try:
            verify(dest, archive)
            return dest
        except DataError:
            dest.unlink()
    errors = []
    for url in archive.urls:
        for attempt in range(retries + 1):
            try:
                fetch_url(url, dest, progress=progress)
                break
            except urllib.error.HTTPError as err:
                errors.append(f"{url}: HTTP {err.code}")
                if err.code in (403, 404, 410):  # permanent: next mirror
                    break
            except (http.client.HTTPException, OSError) as err:  # URLError, timeouts, resets
                errors.append(f"{url}: {err}")
            if attempt < retries:
                sleep(backoff * 2**attempt)
        if dest.exists():
            try:
                verify(dest, archive)
            except DataError:
                dest.unlink()
                raise
            return dest
    tried = "\n  ".join(errors) or "no mirror is known"
    raise DataError(f"could not download {archive.filename} into {folder}:\n  {tried}\n"
                    f"Download it yourself and pass it with --from-archive PATH")


def _match_local(archives: list[Archive], given: Sequence[Path]) -> dict[str, Path]:
    """Map archive file names to the user's files (a folder holding them, or the files)."""
    names = [a.filename for a in archives]
    files: list[Path] = []
    for item in map(Path, given):
        if item.is_dir():
            files += [item / name for name in names if (item / name).exists()]
        elif item.exists():
            files.append(item)
        else:
            raise DataError(f"--from-archive {item}: no such file or folder")
    found = {f.name: f for f in files if f.name in names}
    if len(archives) == 1 and not found and len(files) == 1:
        found[names[0]] = files[0]  # a renamed copy of the one archive
    return found


def _too_big(path: Path, unpacked: int) -> DataError:
    return DataError(f"archive {path} unpacks to more than {unpacked:,} bytes, over "
                     f"{MAX_EXPANSION} times its own size; refused as a decompression bomb")


def extract(path: Path, dest: Path) -> None:
    """Unpack a tar/zip archive into `dest` (a .mat or other plain file is copied). Members stay
    inside `dest` (zipfile's path cleaning, tarfile's `data` filter: no absolute paths, `..`, links
    out or device files), and the unpacked size is bounded by MAX_EXPANSION."""
    limit = MAX_EXPANSION * max(path.stat().st_size, 1)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                # Declared sizes bound what zipfile writes: it stops each member at its file_size.
                unpacked = sum(info.file_size for info in z.infolist())
                if unpacked > limit:
                    raise _too_big(path, unpacked)
                z.extractall(dest)
        elif tarfile.is_tarfile(path):
            if not hasattr(tarfile, "data_filter"):
                raise DataError(f"archive {path}: this Python's tarfile cannot extract safely (no "
                                "data filter); use Python 3.11.4 or later")
            unpacked = 0

            def bounded(member: tarfile.TarInfo, where: str) -> Optional[tarfile.TarInfo]:
                nonlocal unpacked  # a compressed tar's sizes are known member by member only
                unpacked += member.size + tarfile.BLOCKSIZE  # a header each: empty files count
                if unpacked > limit:
                    raise _too_big(path, unpacked)
                return tarfile.data_filter(member, where)

            with tarfile.open(path) as t:
                t.extractall(dest, filter=bounded)
        else:
            shutil.copy2(path, dest / path.name)
    except tarfile.FilterError as err:
        raise DataError(f"archive {path}: {err}; refused (a member would land outside the folder "
                        "it is extracted into, or is a device or link out of it)") from err
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise DataError(f"archive {path} is corrupt or truncated ({err})") from err


def _open_error(folder: Path, open_split: Callable[[Path, str], FewShotSplit]
                ) -> Optional[DataError]:
    """Why the three splits do not all open from `folder`; None when they do."""
    try:
        for split in SPLITS:
            open_split(folder, split)
    except DataError as err:
        return err
    return None


def _find_dataset_root(tree: Path, dataset: str, open_split: Callable[[Path, str], FewShotSplit]
                       ) -> Path:
    """The folder under `tree` (depth <= 2) from which all three splits of `dataset` open."""
    candidates, level = [tree], [tree]
    for _ in range(2):
        level = [d for folder in level for d in sorted(folder.iterdir()) if d.is_dir()]
        candidates += level
    for folder in candidates:
        error = _open_error(folder, open_split)
        if error is None:
            return folder
    raise DataError(f"the archive does not hold a complete {dataset} dataset:\n{error}")


def write_npy_split(split: FewShotSplit, out: Path, progress: bool, before: int,
                    archives: list[Path]) -> int:
    """Write `split` in the prepared npy form (uint8 (N, 84, 84, C)), resizing odd-sized images;
    returns the bytes converted so far, `before` included. Refused first when over MAX_EXPANSION
    times the archives: a small pickle can list one image a million times (84 x 84 x C bytes)."""
    from PIL import Image
    from tqdm import tqdm

    from .imagenet import write_npy

    total = sum(split.class_size(c) for c in range(split.num_classes))
    converted = before + total * NATIVE_SIZE**2 * split.channels
    limit = MAX_EXPANSION * sum(max(p.stat().st_size, 1) for p in archives)
    if converted > limit:
        raise DataError(f"{', '.join(str(p) for p in archives)}: its {split.split} split lists "
                        f"{total:,} images, {converted:,} bytes once converted with those before, "
                        f"over {MAX_EXPANSION} times the archive's size; refused")

    def arrays():
        for label in tqdm(range(split.num_classes), desc=f"{split.name}/{split.split}",
                          disable=not progress, leave=False):
            rows = []
            for im in split.load_many(label, list(range(split.class_size(label)))):
                array = im.permute(1, 2, 0).numpy()  # (H, W, C)
                if array.shape[:2] != (NATIVE_SIZE, NATIVE_SIZE):
                    mode = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
                    array = np.asarray(mode.resize((NATIVE_SIZE, NATIVE_SIZE), Image.BILINEAR))
                    array = array.reshape(NATIVE_SIZE, NATIVE_SIZE, -1)
                rows.append(array)
            yield np.stack(rows)

    names = [split.class_name(c) for c in range(split.num_classes)]
    write_npy(out, split.split, names, arrays(), total, (NATIVE_SIZE, NATIVE_SIZE, split.channels))
    return converted


def _move_into(src: Path, names: Sequence[str], root: Path, dataset: str) -> list[str]:
    """Move the entries `names` of `src` (those present) into `root`; returns what was moved. An
    entry already in root that the record does not list is the user's: the move is refused."""
    record = progress_path(root, dataset)
    try:
        ours = set(json.loads(record.read_text())["entries"])
    except (OSError, ValueError, KeyError, TypeError):  # no record (or a broken one): none is ours
        ours = set()
    moved = [name for name in names if (src / name).exists()]
    for name in moved:
        if os.path.lexists(root / name) and name not in ours:
            raise DataError(f"{root / name} is already there and was not written by preparing "
                            f"{dataset}; move it away or choose another --root (nothing was "
                            "changed)")
    atomic_write(record, lambda f: json.dump({"dataset": dataset,
                                              "entries": sorted(ours | set(moved))}, f))
    # Index files (what makes an npy split visible) go last.
    for name in sorted(moved, key=lambda name: name.endswith("_index.json")):
        target = root / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # left by the interrupted preparation the record names
        elif os.path.lexists(target):
            target.unlink()
        os.replace(src / name, target)
    return moved


def prepare(dataset: str, root: str | Path, open_split: Callable[[Path, str], FewShotSplit],
            from_archive: Sequence[str | Path] = (), progress: bool = True, retries: int = 4,
            backoff: float = 2.0) -> Path:
    """Fetch (or take `from_archive`), verify, extract and convert `dataset` into `root`; returns
    the marker file, and leaves a prepared root alone. `open_split(folder, split)` opens a split
    from a folder (the caller passes the package's readers: this module imports none of them)."""
    if dataset not in ARCHIVES:
        raise DataError(f"no preparation known for {dataset!r}; choose one of "
                        f"{', '.join(ARCHIVES)}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"--root {root} is a file, not a folder; name a folder to prepare "
                        f"{dataset} in")
    marker = marker_path(root, dataset)
    if marker.exists():
        return marker
    if not from_archive and root.is_dir() and _open_error(root, open_split) is None:
        found = {"dataset": dataset, "archives": [], "found": "already in root, not downloaded"}
        atomic_write(marker, lambda f: json.dump(found, f, indent=1))  # extracted there by hand
        return marker
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-prepare-{dataset}-", dir=root))
    try:
        archives = ARCHIVES[dataset]
        local = _match_local(archives, list(from_archive)) if from_archive else {}
        record, paths = [], []
        for archive in archives:
            if archive.filename in local:
                path = local[archive.filename]
            elif from_archive:
                raise DataError(f"--from-archive does not include {archive.filename} (needed for "
                                f"{dataset}: {', '.join(a.filename for a in archives)})")
            else:
                path = download(archive, root / ".downloads", retries=retries, backoff=backoff,
                                progress=progress)
            paths.append(path)
            record.append({"file": archive.filename, "source": str(path),
                           "pinned": bool(archive.md5 or archive.sha256), **verify(path, archive)})
        extracted, out = work / "extracted", work / "out"
        extracted.mkdir()
        for path in paths:
            extract(path, extracted)
        found = _find_dataset_root(extracted, dataset, open_split)
        if dataset in CONVERTED:
            converted = 0  # one split open at a time: tieredImageNet's pickles are GBs
            for split in SPLITS:
                converted = write_npy_split(open_split(found, split), out, progress, converted,
                                            paths)
            moved = _move_into(out, sorted(p.name for p in out.iterdir()), root, dataset)
        else:
            moved = _move_into(found, DATASET_ENTRIES[dataset], root, dataset)
        atomic_write(marker, lambda f: json.dump({"dataset": dataset, "archives": record,
                                                  "entries": moved}, f, indent=1))
        progress_path(root, dataset).unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        downloads = root / ".downloads"
        if downloads.is_dir() and not any(downloads.iterdir()):
            downloads.rmdir()
        if created and not any(root.iterdir()):
            root.rmdir()  # leave no trace of a failed first preparation
    return marker
