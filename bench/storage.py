"""What a trial spends on data from a bucket: the first on a node downloads, later ones hit the copy.

    python -m bench.storage --uri s3://BUCKET/mvtec --classes bottle

Credentials and endpoint as for a run (the ``AWS_*`` variables; ``AWS_ENDPOINT_URL`` for an
S3-compatible store such as a local ``moto_server``).

Prints, for the classes' objects: the first ``local_mirror`` (download into an empty cache) and
the second (every object's size and last-modified time unchanged: a cache hit).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from anomaly_data import storage
from bench.common import machine


def timed_mirror(uri: str, classes) -> tuple[float, int]:
    started = time.perf_counter()
    local = storage.local_root(uri, classes)
    return time.perf_counter() - started, sum(p.stat().st_size for p in local.rglob("*") if p.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", required=True, help="a dataset URI (s3://... or gs://...)")
    p.add_argument("--classes", default="brick", help="comma-separated classes to mirror")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    uri = storage.parse_location(a.uri)
    storage.MIRROR_ROOT = work / "cache"  # an empty node cache
    classes = a.classes.split(",")
    print(f"machine: {machine()}\n{uri}, classes {classes}")
    first, size = timed_mirror(uri, classes)
    second, _ = timed_mirror(uri, classes)
    print(f"first trial on the node (download): {first:.2f} s for {size / 1e6:.1f} MB")
    print(f"second trial (cache hit):           {second:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
