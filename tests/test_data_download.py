"""The download path against a local HTTP server: checksums, resume, from-archive, clean failure."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from functools import partial
from pathlib import Path

import pytest
import torch

from sparse_maml.data import DataError, EpisodeDataset, EpisodeTransform, open_split
from sparse_maml.data import download as dl
from fixtures import make_miniimagenet, write_cub, write_miniimagenet

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_archive(tmp_path_factory) -> bytes:
    """A tiny mini-imagenet.tar.gz holding mini-imagenet-cache-{train,val,test}.pkl."""
    folder = write_miniimagenet(tmp_path_factory.mktemp("pickles") / "mini-imagenet", "pickle",
                                make_miniimagenet(classes=(5, 5, 5), per_class=4))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname="mini-imagenet")
    return buffer.getvalue()


class _Server:
    """Serves `files` on 127.0.0.1 with Range support; paths in `cut` break their first transfer."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range", "")))
                if self.path not in server.files:
                    self.send_error(404)
                    return
                body = server.files[self.path]
                start = 0
                if self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][6:].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if self.path in server.cut:  # send half, then drop the connection
                    server.cut.discard(self.path)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def data_server():
    server = _Server()
    yield server
    server.close()


def _use_archive(monkeypatch, urls, md5):
    archive = dl.Archive("mini-imagenet.tar.gz", tuple(urls), md5=md5)
    monkeypatch.setitem(dl.ARCHIVES, "miniimagenet", [archive])


def _prepare(root, **kwargs):
    return dl.prepare("miniimagenet", root, partial(open_split, "miniimagenet"), progress=False,
                      backoff=0.0, **kwargs)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_download_verifies_converts_and_marks(tmp_path, data_server, data_archive, monkeypatch):
    data_server.files["/mini.tar.gz"] = data_archive
    md5 = hashlib.md5(data_archive).hexdigest()
    _use_archive(monkeypatch, [data_server.url + "/missing.tar.gz", data_server.url + "/mini.tar.gz"],
                 md5)
    root = tmp_path / "mini"
    marker = _prepare(root)
    record = json.loads(marker.read_text())
    assert record["archives"][0]["md5"] == md5 and record["archives"][0]["pinned"]
    assert not [n for n in _leftovers(root) if n.startswith(".tmp")]
    for split in ("train", "val", "test"):
        assert (root / f"{split}_images.npy").is_file()
    converted = open_split("miniimagenet", root, "val")
    assert converted.num_classes == 5 and converted.class_size(0) == 4
    # The converted split gives the same episodes as the pickles in the archive.
    extracted = tmp_path / "x"
    with tarfile.open(fileobj=io.BytesIO(data_archive)) as tar:
        tar.extractall(extracted)
    original = open_split("miniimagenet", extracted / "mini-imagenet", "val")
    transform = EpisodeTransform(84, 3, True, True)
    a = EpisodeDataset(converted, 5, 1, 3, 0, transform)[2]
    b = EpisodeDataset(original, 5, 1, 3, 0, transform)[2]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # A second call finds the marker and fetches nothing.
    count = len(data_server.requests)
    assert _prepare(root) == marker and len(data_server.requests) == count


def test_wrong_checksum_is_a_clear_error_and_leaves_nothing(tmp_path, data_server, data_archive,
                                                            monkeypatch):
    data_server.files["/mini.tar.gz"] = data_archive
    _use_archive(monkeypatch, [data_server.url + "/mini.tar.gz"], "0" * 32)
    root = tmp_path / "mini"
    with pytest.raises(DataError, match=r"checksum mismatch .*md5 is [0-9a-f]{32}, expected 0{32}"):
        _prepare(root)
    assert _leftovers(root) == []


def test_interrupted_transfer_resumes_with_range(tmp_path, data_server, data_archive, monkeypatch):
    data_server.files["/mini.tar.gz"] = data_archive
    data_server.cut.add("/mini.tar.gz")
    _use_archive(monkeypatch, [data_server.url + "/mini.tar.gz"], hashlib.md5(data_archive).hexdigest())
    root = tmp_path / "mini"
    _prepare(root, retries=2)
    ranges = [r for path, r in data_server.requests if path == "/mini.tar.gz"]
    assert ranges == ["", f"bytes={len(data_archive) // 2}-"]
    assert open_split("miniimagenet", root, "train").num_classes == 5


def test_broken_transfer_keeps_only_the_part_file(tmp_path, data_server, data_archive, monkeypatch):
    data_server.files["/mini.tar.gz"] = data_archive
    data_server.cut.add("/mini.tar.gz")
    _use_archive(monkeypatch, [data_server.url + "/mini.tar.gz"], hashlib.md5(data_archive).hexdigest())
    root = tmp_path / "mini"
    with pytest.raises(DataError, match="could not download mini-imagenet.tar.gz"):
        _prepare(root, retries=0)
    assert _leftovers(root) == [".downloads"]
    assert [p.name for p in (root / ".downloads").iterdir()] == ["mini-imagenet.tar.gz.part"]
    with pytest.raises(DataError, match="no complete train split"):
        open_split("miniimagenet", root, "train")
    _prepare(root)  # the next run resumes from the .part file
    assert data_server.requests[-1][1] == f"bytes={len(data_archive) // 2}-"


def test_from_archive_with_unpinned_checksum_records_it(tmp_path, data_archive, monkeypatch):
    _use_archive(monkeypatch, [], None)
    archive = tmp_path / "my-copy.tgz"
    archive.write_bytes(data_archive)
    marker = _prepare(tmp_path / "mini", from_archive=[archive])
    entry = json.loads(marker.read_text())["archives"][0]
    assert not entry["pinned"] and entry["sha256"] == hashlib.sha256(data_archive).hexdigest()


def test_archive_without_a_complete_dataset_leaves_nothing(tmp_path, monkeypatch):
    _use_archive(monkeypatch, [], None)
    folder = write_miniimagenet(tmp_path / "src", "pickle",
                                {"train": make_miniimagenet((5, 5, 5), 4)["train"]})
    archive = tmp_path / "partial.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="mini")
    root = tmp_path / "root"
    with pytest.raises(DataError, match="does not hold a complete miniimagenet"):
        _prepare(root, from_archive=[archive])
    assert _leftovers(root) == []


def test_prepare_script_extracts_cub_from_a_local_archive(tmp_path):
    source = write_cub(tmp_path / "src", per_class=1, size=8)
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "CUB_200_2011", arcname="CUB_200_2011")
    root = tmp_path / "cub"
    result = subprocess.run([sys.executable, str(REPO / "utils" / "prepare_data.py"), "cub",
                             "--root", str(root), "--from-archive", str(archive), "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    # The tiny archive is not the real one: the pinned md5 refuses it, naming the file.
    assert result.returncode == 1 and "checksum mismatch" in result.stderr
    assert str(archive) in result.stderr and _leftovers(root) == []


def test_prepare_script_main_prepares_cub(tmp_path, monkeypatch, capsys):
    source = write_cub(tmp_path / "src", per_class=1, size=8)
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "CUB_200_2011", arcname="CUB_200_2011")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(dl.ARCHIVES, "cub", [dl.Archive("CUB_200_2011.tgz", (), md5=md5)])
    import prepare_data as script

    root = tmp_path / "cub"
    assert script.main(["cub", "--root", str(root), "--from-archive", str(tmp_path),
                        "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "cub/test: 50 classes, 50 images" in out and f"md5 {md5} (verified)" in out
    assert (root / "CUB_200_2011" / "images").is_dir() and dl.marker_path(root, "cub").is_file()


def test_config_download_true_prepares_on_first_use(tmp_path, data_server, data_archive, monkeypatch):
    from sparse_maml.config import DataConfig
    from sparse_maml.data import build_split

    data_server.files["/mini.tar.gz"] = data_archive
    _use_archive(monkeypatch, [data_server.url + "/mini.tar.gz"], hashlib.md5(data_archive).hexdigest())
    real = dl.prepare  # the same preparation, without backoff sleeps or progress bars
    monkeypatch.setattr(dl, "prepare", lambda name, root, open_split:
                        real(name, root, open_split, progress=False, backoff=0.0))
    cfg = DataConfig(name="miniimagenet", root=str(tmp_path / "mini"), download=True)
    assert build_split(cfg, "test").num_classes == 5
    assert dl.marker_path(tmp_path / "mini", "miniimagenet").is_file()
