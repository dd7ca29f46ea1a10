"""Datasets and ensembles in object storage, against a real S3-protocol server (moto) on loopback."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pandas as pd
import pyarrow.fs as pafs
import pytest

from anomaly_data import storage
from anomaly_data.storage import StorageError, check_reachable, local_mirror, parse_location

BUCKET = "anomaly-data"
ACCESS_KEY, SECRET_KEY = "AKIAMOTOTESTKEY00001", "moto-secret-never-stored"  # searched for in every stored object


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
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
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


def test_ray_checkpoint_paths_become_locations_of_their_own_store():
    gcs, _ = storage.store(parse_location("gs://some-bucket/runs/a"))
    assert storage.location_of(gcs, "some-bucket/runs/a/tune/t/checkpoint_000001") == \
        "gs://some-bucket/runs/a/tune/t/checkpoint_000001"
    s3fs = pafs.S3FileSystem(region="us-east-1", anonymous=True)
    assert storage.location_of(s3fs, "b1/runs/a") == "s3://b1/runs/a"
    assert storage.location_of(pafs.LocalFileSystem(), "/tmp/run/tune") == Path("/tmp/run/tune")
    assert storage.join("gs://some-bucket/runs/a", "train", "train-x") == "gs://some-bucket/runs/a/train/train-x"


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


def keys_under(client, prefix: str) -> dict[str, int]:
    """``{key relative to prefix: size}`` of every object under ``prefix``."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        found.update({o["Key"][len(prefix) + 1:]: o["Size"] for o in page.get("Contents", [])})
    return found


def tune_cli(*args, timeout=900, **popen):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "distributed.tune", *args]
    if popen:
        return subprocess.Popen(command, env=env, **popen)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_search_in_a_bucket_reads_its_data_writes_its_run_and_answers_from_there(s3, tmp_path, synthetic_root):
    upload_tree(s3, synthetic_root, "data")
    missing = tune_cli("--dataset", "mvtec", "--root", "s3://no-such-bucket/data", "--run-dir", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr + missing.stdout
    run = f"s3://{BUCKET}/runs/r1"
    out = tune_cli("--dataset", "mvtec", "--root", f"s3://{BUCKET}/data", "--classes", "brick",
                   "--models", "patchcore,hvq_trans", "--trials", "1", "--epochs", "1", "--image-size", "64",
                   "--run-dir", run)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"[data] s3://{BUCKET}/data (local copy" in out.stdout and f"results in {run}" in out.stdout

    keys = keys_under(s3, "runs/r1")
    for key in ("config.json", "trials.csv", "studies.json", "best.json", "optuna.journal", "progress.json",
                "best/patchcore/brick/model.safetensors", "best/hvq_trans/brick/model.safetensors", "best/hvq_trans/brick/best.json",
                "ensemble/ensemble.json", "results.csv", "results.md", "report.html", "times.json"):
        assert key in keys, (key, sorted(keys))
    assert f"[tune] report: {run}/report.html" in out.stdout
    report = s3.get_object(Bucket=BUCKET, Key="runs/r1/report.html")["Body"].read().decode()
    # the search history comes from Tune's trial results, which Ray wrote to the bucket itself
    assert 'alt="hvq_trans-brick search history"' in report and 'alt="patchcore-brick search history"' in report
    assert any(k.startswith("overlays/brick/") for k in keys)
    assert any(k.startswith("tune/search/") for k in keys)                 # Tune's own state, written by Ray
    assert not [k for k in keys if "/checkpoint_" in k]                     # trial checkpoints dropped after export
    config = json.loads(s3.get_object(Bucket=BUCKET, Key="runs/r1/config.json")["Body"].read())
    assert config["args"]["root"] == f"s3://{BUCKET}/data" and config["args"]["run_dir"] == run
    for key in keys:                                                        # no secret in any stored object
        body = s3.get_object(Bucket=BUCKET, Key=f"runs/r1/{key}")["Body"].read()
        assert SECRET_KEY.encode() not in body and ACCESS_KEY.encode() not in body, key

    again = tune_cli("--dataset", "mvtec", "--root", f"s3://{BUCKET}/data", "--run-dir", run)
    assert again.returncode == 2 and f"continue it with --resume {run}" in again.stderr

    # a query straight from the bucket's ensemble, on a machine that never saw the run
    shutil.rmtree(storage.mirror_folder(run))
    image = next((synthetic_root / "brick" / "test").rglob("*.png"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    remote = subprocess.run([sys.executable, "-m", "ensembles.query", "--ensemble", f"{run}/ensemble",
                             "--out", str(tmp_path / "maps-remote"), str(image)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stderr[-2000:]
    local = subprocess.run([sys.executable, "-m", "ensembles.query", "--ensemble",
                            str(storage.mirror_folder(run) / "ensemble"), "--out", str(tmp_path / "maps-local"),
                            str(image)], env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0 and json.loads(remote.stdout)["score"] == json.loads(local.stdout)["score"]


def test_a_run_in_a_bucket_resumes_from_the_bucket_on_another_machine(s3, tmp_path, synthetic_root):
    upload_tree(s3, synthetic_root / "pill", "data2/pill")
    run = f"s3://{BUCKET}/runs/r2"
    proc = tune_cli("--dataset", "mvtec", "--root", f"s3://{BUCKET}/data2", "--classes", "pill", "--models",
                    "hvq_trans", "--trials", "3", "--epochs", "4", "--max-concurrent", "1", "--no-ensemble",
                    "--image-size", "64", "--run-dir", run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True)
    deadline, finished = time.time() + 300, None
    while time.time() < deadline and finished is None:   # the first trial's final result, in the bucket
        for key in keys_under(s3, "runs/r2"):
            if key.endswith("result.json") and b'"done": true' in s3.get_object(
                    Bucket=BUCKET, Key=f"runs/r2/{key}")["Body"].read():
                finished = key
        time.sleep(1)
    assert finished is not None, "no trial finished in time"
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) != 0
    assert "trials.csv" not in keys_under(s3, "runs/r2") and "config.json" in keys_under(s3, "runs/r2")

    shutil.rmtree(storage.mirror_folder(run))   # another machine: nothing of the run on this disk
    out = tune_cli("--resume", run)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trials = pd.read_csv(io.BytesIO(s3.get_object(Bucket=BUCKET, Key="runs/r2/trials.csv")["Body"].read()))
    assert len(trials) == 3 and (trials["status"] == "ok").all()
    assert "best/hvq_trans/pill/model.safetensors" in keys_under(s3, "runs/r2")


@pytest.mark.parametrize("option, value, message", [
    ("--run-dir", "s3://no-such-bucket/runs/x", "the bucket 'no-such-bucket' does not exist"),
    ("--run-dir", "ftp://host/runs/x", "unknown scheme 'ftp://'"),
    ("--resume", f"s3://{BUCKET}/runs/never-made", "no config.json there")])
def test_a_bad_run_uri_is_refused_before_ray_starts(s3, synthetic_root, option, value, message):
    out = tune_cli("--dataset", "mvtec", "--root", str(synthetic_root), "--classes", "brick", option, value,
                   timeout=300)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert "Started a local Ray instance" not in out.stdout + out.stderr


def test_run_files_are_uploaded_once_each_and_the_index_files_last(s3, tmp_path, monkeypatch):
    run = tmp_path / "run"
    for name in ("best.json", "config.json", "best/m/a/model.safetensors", "ensemble/ensemble.json", "ensemble/x.txt",
                 "tune/search/state.json", ".uploaded.json.tmp"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    put = []
    real = storage.store

    class Spy:
        def __init__(self, fs):
            self.fs = fs

        def open_output_stream(self, path):
            put.append(path.split("/runs/up/", 1)[1])
            return self.fs.open_output_stream(path)

    monkeypatch.setattr(storage, "store", lambda uri: (Spy(real(uri)[0]), real(uri)[1]))
    uri = f"s3://{BUCKET}/runs/up"
    assert storage.upload_folder(run, uri, exclude=("tune",), last=("best.json", "ensemble/ensemble.json")) == 5
    assert put[-2:] == ["best.json", "ensemble/ensemble.json"]
    assert sorted(put) == ["best.json", "best/m/a/model.safetensors", "config.json", "ensemble/ensemble.json", "ensemble/x.txt"]
    put.clear()
    assert storage.upload_folder(run, uri, exclude=("tune",)) == 0 and put == []   # nothing changed
    (run / "config.json").write_text("changed")
    assert storage.upload_folder(run, uri, exclude=("tune",)) == 1 and put == ["config.json"]
    assert keys_under(s3, "runs/up")["config.json"] == len("changed")
