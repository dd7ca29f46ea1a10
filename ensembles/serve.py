"""The fused ensemble behind an HTTP endpoint: a Ray Serve application with dynamic batching.

    python -m ensembles.serve --ensemble RUN/ensemble [--host 127.0.0.1] [--port 8000]
        [--max-batch-size 8] [--batch-wait-ms 10] [--max-upload-mb 20] [--replicas 1] [--address auto]

or, with Ray Serve's own CLI (on a running cluster, say)::

    serve run ensembles.serve:build_app ensemble=s3://BUCKET/runs/a/ensemble

The interface:

- ``POST /predict?class=CLASS`` with the image file as the raw request body, or as the multipart
  field ``image``; ``&map=1`` adds the fused map. The answer (JSON): ``score``, ``anomalous``,
  ``threshold``, ``class``, ``members`` (member -> its normalised image score) and, when asked,
  ``map_png`` (the PNG that ``ensembles.query`` writes, base64): the same values as
  ``ensembles.query`` for the same image. ``class`` may be left out when the ensemble has one.
- ``GET /health``: ``{"status": "ok", "classes": [...], "device": ...}``.
- A body that is not an image (400), an unknown class (404), a missing class when there are
  several (400) and an upload over ``--max-upload-mb`` (413) are answered with a message and
  never take the replica down.

Requests that arrive together are scored together (``@serve.batch``): up to ``--max-batch-size``
images, waiting at most ``--batch-wait-ms`` for a batch to fill; a batch of several classes is
scored class by class. One replica holds every class's fusion and loads each member once; a
replica takes a GPU when the cluster has one.
"""


import argparse
import base64
import io
import os
import signal
import sys
import threading
from collections import defaultdict
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from anomaly_data.io import decode_image
from ensembles.ensemble import Ensemble, EnsembleError
from ensembles.runtime import map_png, result_row

APP_NAME = "anomaly-ensemble"
DEFAULTS = {"host": "127.0.0.1", "port": 8000, "max_batch_size": 8, "batch_wait_ms": 10.0, "max_upload_mb": 20.0,
            "replicas": 1}

api = FastAPI(title="anomaly-ensemble", description="Scores images with a fused anomaly-detection ensemble.")


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# helpers the service calls are defined above it: serve.ingress copies the class by value when it
# is decorated, with the module globals that exist at that moment
def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@serve.deployment(name="EnsembleService", max_ongoing_requests=64)
@serve.ingress(api)
class EnsembleService:
    """One replica: the ensemble loaded once, requests scored in batches."""

    def __init__(self, ensemble: str, max_batch_size: int = DEFAULTS["max_batch_size"],
                 batch_wait_ms: float = DEFAULTS["batch_wait_ms"], max_upload_mb: float = DEFAULTS["max_upload_mb"]):
        self.ensemble = Ensemble.load(ensemble)
        self.max_upload_bytes = int(max_upload_mb * 1e6)
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "classes": self.ensemble.class_names, "device": str(self.ensemble.device)}

    @api.post("/predict")
    async def predict(self, request: Request):
        try:
            class_name = self.class_of(request.query_params.get("class"))
            image = decode_image(await self.upload(request))
        except BadRequest as err:
            return JSONResponse({"error": err.message}, status_code=err.status)
        except ValueError as err:  # not an image
            return JSONResponse({"error": f"the uploaded file is {err}; send a PNG, JPEG, BMP or TIFF image"},
                                status_code=400)
        want_map = request.query_params.get("map", "0").lower() in ("1", "true", "yes")
        return await self.score_batch((class_name, image, want_map))

    def class_of(self, name: str | None) -> str:
        classes = self.ensemble.class_names
        if name is None:
            if len(classes) == 1:
                return classes[0]
            raise BadRequest(400, f"say which class the image is: POST /predict?class=CLASS, one of {classes}")
        if name not in classes:
            raise BadRequest(404, f"unknown class {name!r}; this ensemble covers {classes}")
        return name

    async def upload(self, request: Request) -> bytes:
        """The image bytes: the raw body, or the multipart field ``image``; bounded in size."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_upload_bytes:
            raise BadRequest(413, f"the upload has {int(declared)} bytes, more than the {self.max_upload_bytes} "
                                  "this server takes (--max-upload-mb)")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            field = form.get("image")
            if field is None or not hasattr(field, "read"):
                raise BadRequest(400, "a multipart request needs the image file in the field 'image'")
            data = await field.read()
        else:
            data = await request.body()
        if len(data) > self.max_upload_bytes:
            raise BadRequest(413, f"the upload has {len(data)} bytes, more than the {self.max_upload_bytes} "
                                  "this server takes (--max-upload-mb)")
        if not data:
            raise BadRequest(400, "the request has no image: send the file as the body or as the multipart field 'image'")
        return data

    @serve.batch(max_batch_size=DEFAULTS["max_batch_size"], batch_wait_timeout_s=DEFAULTS["batch_wait_ms"] / 1000)
    async def score_batch(self, requests: list[tuple[str, np.ndarray, bool]]) -> list[dict[str, Any]]:
        """Requests that arrived together, scored class by class; answers in request order."""
        answers: list[dict[str, Any] | None] = [None] * len(requests)
        by_class = defaultdict(list)
        for i, (class_name, _, _) in enumerate(requests):
            by_class[class_name].append(i)
        for class_name, indices in by_class.items():
            result = self.ensemble.predict([requests[i][1] for i in indices], class_name)
            fusion = self.ensemble.fusion_for(class_name)
            for k, i in enumerate(indices):
                answers[i] = result_row(result, k)
                if requests[i][2]:
                    answers[i]["map_png"] = png_base64(map_png(result["maps"][k], requests[i][1].shape[:2],
                                                               fusion.map_range))
        return answers


def build_app(args: dict[str, str]):
    """The application ``serve run ensembles.serve:build_app ensemble=...`` deploys; keys as the
    CLI's options (``max_batch_size``, ``batch_wait_ms``, ``max_upload_mb``, ``replicas``)."""
    if "ensemble" not in args:
        raise ValueError("give the ensemble: serve run ensembles.serve:build_app ensemble=RUN/ensemble")
    gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    service = EnsembleService.options(num_replicas=int(args.get("replicas", DEFAULTS["replicas"])),
                                      ray_actor_options={"num_cpus": 1 if gpus == 0 else 0, "num_gpus": gpus})
    return service.bind(args["ensemble"], int(args.get("max_batch_size", DEFAULTS["max_batch_size"])),
                        float(args.get("batch_wait_ms", DEFAULTS["batch_wait_ms"])),
                        float(args.get("max_upload_mb", DEFAULTS["max_upload_mb"])))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensembles.serve", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensemble", required=True, help="an ensemble folder (RUN/ensemble), or its s3:// / gs:// URI")
    p.add_argument("--host", default=DEFAULTS["host"], help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=DEFAULTS["port"])
    p.add_argument("--max-batch-size", type=int, default=DEFAULTS["max_batch_size"], help="images scored together")
    p.add_argument("--batch-wait-ms", type=float, default=DEFAULTS["batch_wait_ms"],
                   help="how long a request waits for others to fill its batch")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULTS["max_upload_mb"], help="larger uploads get 413")
    p.add_argument("--replicas", type=int, default=DEFAULTS["replicas"])
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local Ray instance)")
    args = p.parse_args(argv)
    for option in ("max_batch_size", "replicas", "port"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be >= 1")
    if args.batch_wait_ms < 0 or args.max_upload_mb <= 0:
        p.error("--batch-wait-ms must be >= 0 and --max-upload-mb > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        Ensemble.load(args.ensemble, "cpu")  # a bad folder is an error here, before Ray starts
    except EnsembleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_SERVE_ENABLE_TASK_EVENTS", "0")
    # a local instance without the dashboard: it would take port 8265 from a search running beside it
    ray.init(address=args.address, log_to_driver=False, configure_logging=False,
             **({} if args.address else {"include_dashboard": False}))
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app({"ensemble": args.ensemble, "max_batch_size": args.max_batch_size,
                         "batch_wait_ms": args.batch_wait_ms, "max_upload_mb": args.max_upload_mb,
                         "replicas": args.replicas}), name=APP_NAME, route_prefix="/")
    print(f"[serve] {args.ensemble} on http://{args.host}:{args.port}: POST /predict?class=CLASS, GET /health",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
