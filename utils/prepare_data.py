"""Fetch, verify, extract and convert a few-shot dataset into the form the loader reads fastest.

    python utils/prepare_data.py miniimagenet --root data/miniimagenet
    python utils/prepare_data.py cars --root data/cars \
        --from-archive ~/car_ims.tgz --from-archive ~/cars_annos.mat

How downloads resume, what is checked and what is moved into --root: sparse_maml/data/download.py
and docs/datasets.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

from sparse_maml.data import DataError, open_split
from sparse_maml.data.download import ARCHIVES, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(ARCHIVES))
    parser.add_argument("--root", required=True, help="folder the dataset is prepared in")
    parser.add_argument("--from-archive", action="append", default=[], metavar="PATH",
                        help="an archive you already have (or a folder holding the archives); "
                             "repeat for datasets made of several files")
    parser.add_argument("--retries", type=int, default=4,
                        help="retries per mirror (backoff 2s, 4s, ...)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    try:
        marker = prepare(args.dataset, args.root, partial(open_split, args.dataset),
                         args.from_archive, progress=not args.no_progress, retries=args.retries)
        for split in ("train", "val", "test"):
            print(open_split(args.dataset, args.root, split).describe())
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a folder that cannot be created or written, a full disk
        print(f"error: {err.strerror or err}: {err.filename or args.root}", file=sys.stderr)
        return 1
    record = json.loads(marker.read_text())
    if record.get("found"):
        print(f"{args.dataset}: {record['found']}")
    for archive in record["archives"]:
        pinned = "verified" if archive["pinned"] else "not pinned; recorded"
        print(f"{archive['file']}: md5 {archive['md5']} ({pinned})")
    print(f"prepared {args.dataset} in {args.root} (marker {marker})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
