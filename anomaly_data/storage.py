"""Where files live: a local path, or an object-store URI (``s3://bucket/prefix``, ``gs://…``).

A location the user gives is parsed by ``parse_location``: a URI stays a string (``Path``
would turn ``s3://a/b`` into ``s3:/a/b``), anything else is a local ``Path``. File systems are
pyarrow's, made by ``FileSystem.from_uri``: credentials come from the standard chain (the
``AWS_*`` variables, ``~/.aws``, an instance profile; for ``gs://`` the Google application
default credentials), and ``AWS_ENDPOINT_URL`` points S3 at a compatible store (MinIO, Ceph, a
local test server). No key is ever passed explicitly, so none can end up in a log, an error or
a pickled file system.

``local_mirror`` gives the node-local copy of the objects under a URI: each object is
downloaded once per node and again only when its size or last-modified time changed; a
download goes to a temporary name and is renamed into place when complete, so a partial file
never counts as cached; processes on one node that need the same mirror wait for the one
downloading it (a file lock, bounded).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterable

import pyarrow.fs as pafs

from anomaly_data.cache import DEFAULT_CACHE_ROOT, bounded_lock
from anomaly_data.records import DatasetError

log = logging.getLogger(__name__)

SCHEMES = ("s3", "gs", "gcs")
MIRROR_ROOT = DEFAULT_CACHE_ROOT / "objects"
MIRROR_WAIT_S = 3600.0   # how long a process waits for another one's download of the same mirror
MANIFEST = ".manifest.json"


class StorageError(DatasetError):
    """A bad URI, a missing bucket, refused credentials or an unreachable store."""


def is_uri(location) -> bool:
    return isinstance(location, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", location) is not None


def parse_location(text: str | os.PathLike) -> str | Path:
    """A command-line location: an object-store URI (normalised, kept a string) or a local path."""
    if not is_uri(text):
        return Path(text).expanduser()
    scheme, rest = str(text).split("://", 1)
    if scheme.lower() not in SCHEMES:
        raise StorageError(f"{text}: unknown scheme {scheme + '://'!r}; give s3://BUCKET/PREFIX, gs://BUCKET/PREFIX "
                           "or a local path")
    bucket = rest.split("/", 1)[0]
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]", bucket):
        raise StorageError(f"{text}: {bucket!r} is not a bucket name (3-63 lower-case letters, digits, '.', '-'); "
                           f"give {scheme}://BUCKET/PREFIX")
    return f"{scheme.lower()}://{rest.strip('/')}"


def join(location: str | Path, *parts: str) -> str | Path:
    """``location / parts``, for a URI as for a path."""
    if isinstance(location, Path):
        return location.joinpath(*parts)
    return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts)])


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def store(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow file system, "bucket/prefix")`` of a parsed URI."""
    scheme, rest = uri.split("://", 1)
    try:
        return _filesystem(scheme, rest.split("/", 1)[0]), rest
    except (OSError, ValueError) as err:
        raise StorageError(f"{uri}: cannot open the {scheme}:// store ({_reason(err)})") from None


def _reason(err: Exception) -> str:
    """What went wrong, in words that name what to check (never the credentials themselves)."""
    text = str(err)
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return "the bucket does not exist: create it or fix the URI"
    if any(code in text for code in ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY", "InvalidAccessKeyId",
                                     "SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch", "403")):
        return ("the store refused the credentials: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws or "
                "the node's instance profile (for gs:// the Google application default credentials)")
    if "curlCode" in text or "Couldn't connect" in text or "resolve host" in text.lower():
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default endpoint")
        return f"cannot reach the store at {endpoint}: check the network and AWS_ENDPOINT_URL"
    return text.splitlines()[0][:200]


def check_reachable(uri: str, must_exist: bool) -> bool:
    """Raise ``StorageError`` when the bucket is missing or refuses us; return whether ``uri``
    holds anything (``must_exist``: raise when it does not)."""
    fs, path = store(uri)
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: the bucket {bucket!r} does not exist: create it or fix the URI")
        found = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as err:
        raise StorageError(f"{uri}: {_reason(err)}") from None
    if must_exist and not found:
        raise StorageError(f"{uri}: nothing is stored under this prefix; check the URI")
    return bool(found)


def object_stamps(uri: str, prefixes: Iterable[str] | None = None,
                  exclude: Iterable[str] = ()) -> dict[str, tuple[int, int]]:
    """``{key relative to uri: (size, last-modified ns)}`` of every object under ``prefixes``
    (relative to ``uri``; all objects when None), but those under the top-level ``exclude`` folders."""
    fs, base = store(uri)
    tops = [base] if prefixes is None else [f"{base}/{p.strip('/')}" for p in prefixes]
    skipped = tuple(f"{e.strip('/')}/" for e in exclude)
    stamps = {}
    try:
        for top in tops:
            for info in fs.get_file_info(pafs.FileSelector(top, recursive=True, allow_not_found=True)):
                key = info.path[len(base) + 1:]
                if info.type == pafs.FileType.File and not key.startswith(skipped):
                    stamps[key] = (int(info.size), int(info.mtime_ns or 0))
    except OSError as err:
        raise StorageError(f"{uri}: {_reason(err)}") from None
    return stamps


def mirror_folder(uri: str) -> Path:
    scheme, rest = uri.split("://", 1)
    return MIRROR_ROOT / scheme / rest


def local_mirror(uri: str, prefixes: Iterable[str] | None = None, wait_s: float = MIRROR_WAIT_S,
                 exclude: Iterable[str] = ()) -> Path:
    """The node-local folder holding the objects under ``uri`` (those under ``prefixes`` only,
    when given; none under the top-level ``exclude`` folders), up to date with the store; see
    the module's docstring."""
    fs, base = store(uri)
    local = mirror_folder(uri)
    local.mkdir(parents=True, exist_ok=True)
    with bounded_lock(local / ".lock", wait_s, f"another process on this node downloading {uri}"):
        manifest_path = local / MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        wanted = object_stamps(uri, prefixes, exclude)
        stale = [k for k, stamp in wanted.items() if manifest.get(k) != list(stamp) or not (local / k).is_file()]
        started, size = time.perf_counter(), 0
        for i, key in enumerate(stale):
            target = local / key
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            try:
                _download(fs, f"{base}/{key}", partial)
            except OSError as err:
                partial.unlink(missing_ok=True)
                raise StorageError(f"{uri}/{key}: cannot download it ({_reason(err)})") from None
            os.replace(partial, target)
            manifest[key] = list(wanted[key])
            size += wanted[key][0]
            if i % 200 == 199:  # an interrupted mirror keeps what it has fetched
                _write_json(manifest_path, manifest)
        if stale:
            _write_json(manifest_path, manifest)
            log.info("fetched %d object(s), %.1f MB, from %s in %.1f s", len(stale), size / 1e6, uri,
                     time.perf_counter() - started)
    return local


def _download(fs: pafs.FileSystem, source: str, target: Path) -> None:
    with fs.open_input_stream(source) as src, open(target, "wb") as out:
        while chunk := src.read(8 << 20):
            out.write(chunk)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def dataset_prefixes(classes: Iterable[str] | None) -> list[str] | None:
    """The keys a dataset's classes need: each class's folder and VisA's split files (every
    key when the classes are not known yet)."""
    return None if classes is None else [*classes, "split_csv"]


def resolve_root(text: str | os.PathLike, classes: Iterable[str] | None = None) -> tuple[str | Path, Path]:
    """``(location, local folder)`` of a dataset root the user gave: a resolved path (both), or a
    URI checked for reachability and mirrored on this node (only ``classes``'s objects, when given)."""
    location = parse_location(text)
    if not is_uri(location):
        return location.resolve(), location.resolve()
    check_reachable(location, must_exist=True)
    return location, local_root(location, classes)


def local_root(location: str | Path, classes: Iterable[str] | None = None) -> Path:
    """A dataset root to read from: a local path itself, or the node-local mirror of a URI
    (only the objects ``classes`` need, when given)."""
    return local_mirror(location, dataset_prefixes(classes)) if is_uri(location) else Path(location)


# ----- files of a run folder that may live in a bucket -------------------------------------------
def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow file system, path in it)`` of a local path or a parsed URI."""
    if is_uri(location):
        return store(str(location))
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def location_of(fs: pafs.FileSystem, path: str) -> str | Path:
    """The location (URI or local path) of ``path`` on ``fs``, e.g. a Ray checkpoint's."""
    scheme = {"s3": "s3", "gcs": "gs"}.get(fs.type_name)
    if scheme is None:
        return Path(path)
    return f"{scheme}://{path.split('://', 1)[-1].strip('/')}"


def is_file(location: str | Path) -> bool:
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError as err:
        raise StorageError(f"{location}: {_reason(err)}") from None


def read_bytes(location: str | Path) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as src:
            return src.read()
    except OSError as err:
        raise StorageError(f"{location}: cannot read it ({_reason(err)})") from None


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write ``data`` whole: a rename into place on a local disk, one PUT on an object store
    (readers see the old object or the new one, never a part)."""
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, path = filesystem(location)
    try:
        with fs.open_output_stream(path) as out:
            out.write(data)
    except OSError as err:
        raise StorageError(f"{location}: cannot write it ({_reason(err)})") from None


def subfolders(location: str | Path, pattern: str) -> list[str | Path]:
    """The folders directly under ``location`` whose names match the glob ``pattern``, sorted."""
    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as err:
        raise StorageError(f"{location}: {_reason(err)}") from None
    names = sorted(Path(i.path).name for i in infos if i.type == pafs.FileType.Directory)
    return [join(location, n) for n in names if fnmatch.fnmatch(n, pattern)]


def delete_folder(location: str | Path) -> None:
    fs, path = filesystem(location)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StorageError(f"{location}: cannot delete it ({_reason(err)})") from None


UPLOADED = ".uploaded.json"  # in a staged run folder: what upload_folder has already put in the bucket


def upload_folder(local: Path, uri: str, exclude: Iterable[str] = (), last: Iterable[str] = ()) -> int:
    """Put the files of ``local`` under ``uri``, one PUT each, those changed since the last upload
    only (size + modification time); none under the top-level ``exclude`` folders, no dot-file and no
    temporary file. The keys in ``last`` go after every other file: index files that point at the
    others, so that a reader who sees them finds what they name. Returns how many were put."""
    fs, base = store(uri)
    skipped = tuple(f"{e.strip('/')}/" for e in exclude)
    state_path = local / UPLOADED
    uploaded = json.loads(state_path.read_text()) if state_path.is_file() else {}
    last = list(last)
    todo = []
    for path in sorted(local.rglob("*")):
        key = path.relative_to(local).as_posix()
        if (not path.is_file() or key.startswith(skipped) or any(p.startswith(".") for p in key.split("/"))
                or path.suffix in (".tmp", ".part", ".lock")):
            continue
        stat = path.stat()
        if uploaded.get(key) != [stat.st_size, stat.st_mtime_ns]:
            todo.append((key, [stat.st_size, stat.st_mtime_ns]))
    todo.sort(key=lambda item: (item[0] in last, last.index(item[0]) if item[0] in last else 0))
    for key, stamp in todo:
        try:
            with open(local / key, "rb") as src, fs.open_output_stream(f"{base}/{key}") as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
        except OSError as err:
            raise StorageError(f"{uri}/{key}: cannot upload it ({_reason(err)})") from None
        uploaded[key] = stamp
    if todo:
        _write_json(state_path, uploaded)
    return len(todo)
