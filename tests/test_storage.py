"""Datasets and ensembles in object storage, against a real S3-protocol server (moto) on loopback."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest

from anomaly_data import storage
from anomaly_data.storage import StorageError, check_reachable, local_mirror, parse_location

BUCKET = "anomaly-data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(extra_env=None, wait_s: float = 60.0):
    """A moto S3 server on a free loopback port, polled until it answers."""
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the moto S3 server did not answer on {url} within {wait_s:.0f} s "
                                   f"(exit code {proc.poll()}); is moto[server] installed?")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A running S3 server with one bucket; AWS_* variables point this process and its children at it."""
    proc, url = start_moto()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    storage._filesystem.cache_clear()
    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket=BUCKET)
    yield client
    proc.terminate()
    proc.wait(timeout=30)
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    storage._filesystem.cache_clear()


def upload_tree(client, folder: Path, prefix: str) -> int:
    n = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
        n += 1
    return n


@pytest.mark.parametrize("text, expected", [
    ("data/mvtec", Path("data/mvtec")), ("s3://my-bucket/mvtec/", "s3://my-bucket/mvtec"),
    ("S3://my-bucket", "s3://my-bucket"), ("gs://my-bucket/a/b", "gs://my-bucket/a/b")])
def test_locations_are_paths_or_uris_never_a_mangled_path(text, expected):
    assert parse_location(text) == expected
    assert str(Path("s3://a/b")) == "s3:/a/b"  # the trap a URI must not fall into


@pytest.mark.parametrize("text, message", [
    ("ftp://host/x", "unknown scheme 'ftp://'"), ("s3://My_Bucket/x", "not a bucket name"), ("s3:///x", "not a bucket")])
def test_bad_uris_are_refused_with_what_to_give(text, message):
    with pytest.raises(StorageError, match=message):
        parse_location(text)


def test_an_ensemble_uri_must_name_a_folder():
    from ensembles.ensemble import Ensemble, EnsembleError

    with pytest.raises(EnsembleError, match="give the ensemble folder's URI"):
        Ensemble.load("s3://some-bucket")


def test_gs_goes_through_the_same_file_system_choice():
    fs, path = storage.store(parse_location("gs://some-bucket/runs/a"))
    assert isinstance(fs, pafs.GcsFileSystem) and path == "some-bucket/runs/a"


def test_a_mirror_downloads_once_refetches_a_changed_object_and_never_keeps_a_partial_one(s3, tmp_path, monkeypatch):
    for name, body in {"a/x.txt": b"one", "a/y.txt": b"two", "b/z.txt": b"three"}.items():
        s3.put_object(Bucket=BUCKET, Key=f"m1/{name}", Body=body)
    fetched = []
    real = storage._download
    monkeypatch.setattr(storage, "_download", lambda fs, src, dst: (fetched.append(src), real(fs, src, dst)))
    local = local_mirror(f"s3://{BUCKET}/m1", ["a"])
    assert sorted(fetched) == [f"{BUCKET}/m1/a/x.txt", f"{BUCKET}/m1/a/y.txt"]    # only the prefix asked for
    assert (local / "a" / "x.txt").read_bytes() == b"one" and not (local / "b").exists()
    fetched.clear()
    local_mirror(f"s3://{BUCKET}/m1", ["a"])
    assert fetched == []                                                          # a cache hit
    time.sleep(1.1)  # a new last-modified time
    s3.put_object(Bucket=BUCKET, Key="m1/a/x.txt", Body=b"ONE!")
    local_mirror(f"s3://{BUCKET}/m1", ["a"])
    assert fetched == [f"{BUCKET}/m1/a/x.txt"] and (local / "a" / "x.txt").read_bytes() == b"ONE!"

    def broken(fs, src, dst):
        dst.write_bytes(b"half")
        raise OSError("connection reset")
    monkeypatch.setattr(storage, "_download", broken)
    with pytest.raises(StorageError, match="b/z.txt: cannot download it"):
        local_mirror(f"s3://{BUCKET}/m1")
    assert not (local / "b" / "z.txt").exists() and not list(local.rglob("*.part"))
    manifest = json.loads((local / storage.MANIFEST).read_text())
    assert "b/z.txt" not in manifest


def test_two_processes_needing_one_mirror_wait_for_a_single_download(s3, monkeypatch):
    for i in range(6):
        s3.put_object(Bucket=BUCKET, Key=f"m2/c/{i}.bin", Body=os.urandom(1000))
    fetched = []
    real = storage._download

    def slow(fs, src, dst):
        fetched.append(src)
        time.sleep(0.1)
        real(fs, src, dst)
    monkeypatch.setattr(storage, "_download", slow)
    threads = [threading.Thread(target=local_mirror, args=(f"s3://{BUCKET}/m2",)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(fetched) == sorted(f"{BUCKET}/m2/c/{i}.bin" for i in range(6))  # each object once


def test_a_missing_bucket_and_an_empty_prefix_are_clear_errors(s3):
    with pytest.raises(StorageError, match="the bucket 'no-such-bucket' does not exist"):
        check_reachable("s3://no-such-bucket/x", must_exist=True)
    with pytest.raises(StorageError, match="nothing is stored under this prefix"):
        check_reachable(f"s3://{BUCKET}/not/there", must_exist=True)


def test_wrong_credentials_are_a_clear_error_that_shows_no_secret(tmp_path):
    proc, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # this server checks every request
    env = {**os.environ, "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1",
           "AWS_SECRET_ACCESS_KEY": "very-secret-value", "AWS_DEFAULT_REGION": "us-east-1", "RAY_AUTH_MODE": "disabled"}
    try:
        out = subprocess.run([sys.executable, "-m", "distributed.tune", "--dataset", "mvtec", "--root",
                              f"s3://{BUCKET}/data", "--run-dir", str(tmp_path / "run")],
                             env=env, capture_output=True, text=True, timeout=300)
    finally:
        proc.terminate()
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-2000:]
    assert "refused the credentials" in text and "very-secret-value" not in text and "AKIAWRONG" not in text
    assert "Started a local Ray instance" not in text and not (tmp_path / "run" / "config.json").exists()


def test_a_search_reads_its_data_from_the_bucket_and_its_ensemble_answers_from_the_bucket(s3, tmp_path, synthetic_root):
    upload_tree(s3, synthetic_root, "data")
    run = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    missing = subprocess.run([sys.executable, "-m", "distributed.tune", "--dataset", "mvtec", "--root",
                              "s3://no-such-bucket/data", "--run-dir", str(tmp_path / "nope")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "does not exist" in missing.stderr + missing.stdout
    out = subprocess.run([sys.executable, "-m", "distributed.tune", "--dataset", "mvtec", "--root",
                          f"s3://{BUCKET}/data", "--classes", "brick", "--models", "patchcore,hvq_trans",
                          "--trials", "1", "--epochs", "1", "--image-size", "64", "--run-dir", str(run)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"[data] s3://{BUCKET}/data (local copy" in out.stdout
    assert json.loads((run / "config.json").read_text())["args"]["root"] == f"s3://{BUCKET}/data"
    assert (run / "results.csv").is_file() and (run / "ensemble" / "ensemble.json").is_file()

    # the run folder copied to the bucket: a query straight from the bucket's ensemble
    shutil.rmtree(run / "tune", ignore_errors=True)
    upload_tree(s3, run, "runs/r1")
    image = next((synthetic_root / "brick" / "test").rglob("*.png"))
    local = subprocess.run([sys.executable, "-m", "ensembles.query", "--ensemble", str(run / "ensemble"),
                            "--out", str(tmp_path / "maps-local"), str(image)],
                           env=env, capture_output=True, text=True, timeout=300)
    remote = subprocess.run([sys.executable, "-m", "ensembles.query", "--ensemble", f"s3://{BUCKET}/runs/r1/ensemble",
                             "--out", str(tmp_path / "maps-remote"), str(image)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr[-2000:]
    assert json.loads(remote.stdout)["score"] == json.loads(local.stdout)["score"]
