"""Serving and exported graphs: what a line running one image at a time gets.

    python -m bench.serve --ensemble RUN/ensemble [--ensemble RUN256/ensemble] [--images 64]
        [--clients 1,8,32] [--no-endpoint] [--no-export]

1. The HTTP endpoint (``ensembles.serve`` started on loopback): requests/s and p50 / p99 latency
   with 1, 8 and 32 concurrent clients each sending one image per request, against the query
   CLI on the same images (its wall time per image, model loading included, and in-process
   ``query_images`` alone).
2. Per ensemble (its input side): images/s of the torch ensemble, of its ONNX graph in ONNX
   Runtime and of its OpenVINO graph (float32), with every member or only those the fusion uses
   (``--members used``), batch 8, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch

from bench.common import machine, table, timed
from ensembles.ensemble import Ensemble
from ensembles.export import export_ensemble
from ensembles.query import query_images
from ensembles.runtime import ExportedEnsemble

BATCH = 8
START_WAIT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_images(ensemble: Ensemble, class_name: str, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` images at the class's input side: noisy copies of nothing in particular (the
    timing does not depend on content)."""
    side = ensemble.fusion_for(class_name).resolution
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count)]


def write_pngs(images: list[np.ndarray], folder: Path) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def start_server(ensemble_dir: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ensembles.serve", "--ensemble", ensemble_dir, "--port", str(port),
                             "--max-batch-size", str(max_batch), "--batch-wait-ms", "5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"error: the server did not answer /health within {START_WAIT_S} s")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def endpoint_rows(ensemble_dir: str, class_name: str, paths: list[Path], clients: list[int]) -> list[dict]:
    proc, url = start_server(ensemble_dir, max(clients + [BATCH]) if max(clients) > 1 else BATCH)
    bodies = [p.read_bytes() for p in paths]
    rows = []
    try:
        for n in clients:
            def one(body):
                t0 = time.perf_counter()
                answer = requests.post(f"{url}/predict", params={"class": class_name}, data=body, timeout=300)
                answer.raise_for_status()
                return time.perf_counter() - t0
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(one, bodies[:n]))  # warm-up
                t0 = time.perf_counter()
                latencies = list(pool.map(one, bodies))
                wall = time.perf_counter() - t0
            rows.append({"what": f"endpoint, {n} client(s)", "req/s": len(bodies) / wall,
                         "p50 ms": 1000 * float(np.percentile(latencies, 50)),
                         "p99 ms": 1000 * float(np.percentile(latencies, 99))})
    finally:
        stop_server(proc)
    return rows


def query_rows(ensemble_dir: str, class_name: str, paths: list[Path]) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ensembles.query", "--ensemble", ensemble_dir, "--class", class_name,
                        "--out", out, *map(str, paths)], check=True, stdout=subprocess.DEVNULL, timeout=1800)
        cli = time.perf_counter() - t0
    ensemble = Ensemble.load(ensemble_dir, "cpu")
    with tempfile.TemporaryDirectory() as out:
        one = timed(lambda: list(query_images(ensemble, paths[:1], class_name, out)), repeats=5)
        t0 = time.perf_counter()
        list(query_images(ensemble, paths, class_name, out))
        inproc = time.perf_counter() - t0
    return [{"what": "query CLI (one run, loading included)", "req/s": len(paths) / cli, "p50 ms": float("nan"),
             "p99 ms": float("nan")},
            {"what": "query_images in process, batch 8 / 1 image", "req/s": len(paths) / inproc,
             "p50 ms": 1000 * one, "p99 ms": float("nan")}]


def runtime_rows(ensemble_dir: str, class_name: str, out: Path) -> list[dict]:
    ensemble = Ensemble.load(ensemble_dir, "cpu")
    side = ensemble.fusion_for(class_name).resolution
    images = random_images(ensemble, class_name, BATCH)
    rows = [{"px": side, "runtime": "torch", "img/s": BATCH / timed(lambda: ensemble.predict(images, class_name), 3)}]
    for fmt in ("onnx", "openvino"):
        for members in ("all", "used"):
            folder = export_ensemble(ensemble, fmt, out / f"{fmt}-{side}-{members}", [class_name], members=members)
            exported = ExportedEnsemble.load(folder)
            rows.append({"px": side, "runtime": f"{fmt}, {members} members ({'+'.join(exported.classes[class_name].members)})",
                         "img/s": BATCH / timed(lambda: exported.predict(images, class_name), 3)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--ensemble", action="append", required=True, help="an ensemble folder (repeatable)")
    p.add_argument("--class", dest="class_name", default=None, help="default: each ensemble's first class")
    p.add_argument("--images", type=int, default=64, help="requests per client count")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--no-endpoint", action="store_true")
    p.add_argument("--no-export", action="store_true")
    a = p.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    clients = [int(c) for c in a.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not a.no_endpoint:
            first = a.ensemble[0]
            ensemble = Ensemble.load(first, "cpu")
            name = a.class_name or ensemble.class_names[0]
            paths = write_pngs(random_images(ensemble, name, a.images), tmp / "images")
            print(f"\nendpoint and query, {first} class {name}, {a.images} images "
                  f"at {ensemble.fusion_for(name).resolution} px:", flush=True)
            print(table(endpoint_rows(first, name, paths, clients) + query_rows(first, name, paths)), flush=True)
        if not a.no_export:
            rows = []
            for folder in a.ensemble:
                name = a.class_name or Ensemble.load(folder, "cpu").class_names[0]
                rows += runtime_rows(folder, name, tmp)
            print(f"\nimages/s, batch {BATCH}, CPU ({torch.get_num_threads()} torch threads):", flush=True)
            print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
