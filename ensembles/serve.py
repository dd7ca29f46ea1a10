"""The fused ensemble behind an HTTP endpoint: a Ray Serve application with dynamic batching.

    python -m ensembles.serve --ensemble RUN/ensemble [--host 127.0.0.1] [--port 8000]
        [--auth-token-file FILE | --allow-anonymous] [--max-batch-size 8] [--batch-wait-ms 10]
        [--max-upload-mb 20] [--replicas 1] [--address auto]

or, with Ray Serve's own CLI (on a running cluster, say)::

    serve run ensembles.serve:build_app ensemble=s3://BUCKET/runs/a/ensemble auth_token_file=FILE

Callers: with a token (``--auth-token-file FILE``, or the environment variable
``ANOMALY_ENSEMBLE_TOKEN``), every route but ``/health`` needs ``Authorization: Bearer TOKEN``:
401 without it, 403 with another token (compared in constant time; the token is never logged).
Without a token the server listens on a loopback address only, unless ``--allow-anonymous`` (a
proxy in front checks the callers); ``build_app`` has no way to know where Serve's proxy listens,
so it needs a token or ``allow_anonymous=true``. The token travels in clear over HTTP: put a TLS
proxy in front of a server that is reached over a network (README, serving).

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
import hashlib
import hmac
import io
import ipaddress
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

TOKEN_ENV = "ANOMALY_ENSEMBLE_TOKEN"  # the token itself, when no --auth-token-file is given
TOKEN_DIGEST_ENV = "ANOMALY_ENSEMBLE_TOKEN_SHA256"  # set in each replica's process: what callers must match
MIN_TOKEN_CHARS = 16
OPEN_ROUTES = ("/health",)  # answered without a token (load balancers' probes)
NEW_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))' > token.txt"

api = FastAPI(title="anomaly-ensemble", description="Scores images with a fused anomaly-detection ensemble.")


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class TokenError(ValueError):
    """No usable token, or none where one is needed."""


def read_token(path: str | None) -> str | None:
    """The callers' token: the file's content (stripped), else ``$ANOMALY_ENSEMBLE_TOKEN``, else None."""
    if path:
        try:
            token = open(path, encoding="utf-8").read().strip()
        except OSError as err:
            raise TokenError(f"--auth-token-file {path}: cannot read it ({err.strerror})") from None
        where = f"--auth-token-file {path}"
    else:
        token, where = os.environ.get(TOKEN_ENV, "").strip(), f"${TOKEN_ENV}"
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise TokenError(f"{where}: a token needs at least {MIN_TOKEN_CHARS} characters and no spaces; make one "
                         f"with {NEW_TOKEN}")
    return token


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# helpers the service calls are defined above it: serve.ingress copies the class by value when it
# is decorated, with the module globals that exist at that moment
def caller_refusal(authorization: str | None, digest: str) -> tuple[int, str] | None:
    """None when ``authorization`` carries the token of ``digest``; else (401 or 403, why). The
    digests are compared, in constant time: neither the token's length nor its content leaks."""
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return 401, "this endpoint needs a token: send the header 'Authorization: Bearer TOKEN'"
    if not hmac.compare_digest(token_digest(presented.strip()), digest):
        return 403, "the token is not this endpoint's"
    return None


@api.middleware("http")
async def check_caller(request: Request, call_next):
    digest = os.environ.get(TOKEN_DIGEST_ENV)
    if digest and request.url.path not in OPEN_ROUTES:
        refusal = caller_refusal(request.headers.get("authorization"), digest)
        if refusal is not None:
            status, message = refusal
            return JSONResponse({"error": message}, status_code=status,
                                headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
    return await call_next(request)


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@serve.deployment(name="EnsembleService", max_ongoing_requests=64)
@serve.ingress(api)
class EnsembleService:
    """One replica: the ensemble loaded once, requests scored in batches."""

    def __init__(self, ensemble: str, max_batch_size: int = DEFAULTS["max_batch_size"],
                 batch_wait_ms: float = DEFAULTS["batch_wait_ms"], max_upload_mb: float = DEFAULTS["max_upload_mb"],
                 token_sha256: str | None = None):
        os.environ[TOKEN_DIGEST_ENV] = token_sha256 or ""  # this replica's process: check_caller reads it
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
    CLI's options (``max_batch_size``, ``batch_wait_ms``, ``max_upload_mb``, ``replicas``,
    ``auth_token_file``, ``allow_anonymous``). The token is read here, on the driver; replicas get
    its SHA-256 only."""
    if "ensemble" not in args:
        raise ValueError("give the ensemble: serve run ensembles.serve:build_app ensemble=RUN/ensemble")
    token = read_token(args.get("auth_token_file"))
    if token is None and str(args.get("allow_anonymous", "")).lower() not in ("1", "true", "yes"):
        raise TokenError(f"give the callers' token: auth_token_file=FILE (make one with {NEW_TOKEN}) or "
                         f"${TOKEN_ENV}; or allow_anonymous=true when a proxy in front checks the callers")
    gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    service = EnsembleService.options(num_replicas=int(args.get("replicas", DEFAULTS["replicas"])),
                                      ray_actor_options={"num_cpus": 1 if gpus == 0 else 0, "num_gpus": gpus})
    return service.bind(args["ensemble"], int(args.get("max_batch_size", DEFAULTS["max_batch_size"])),
                        float(args.get("batch_wait_ms", DEFAULTS["batch_wait_ms"])),
                        float(args.get("max_upload_mb", DEFAULTS["max_upload_mb"])),
                        token_digest(token) if token is not None else None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensembles.serve", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensemble", required=True, help="an ensemble folder (RUN/ensemble), or its s3:// / gs:// URI")
    p.add_argument("--host", default=DEFAULTS["host"], help="address to listen on (0.0.0.0 for every interface: "
                                                          "needs a token, or --allow-anonymous)")
    p.add_argument("--port", type=int, default=DEFAULTS["port"])
    p.add_argument("--auth-token-file", default=None, metavar="FILE",
                   help=f"a file holding the token callers send as 'Authorization: Bearer TOKEN' (default: "
                        f"${TOKEN_ENV}, if set)")
    p.add_argument("--allow-anonymous", action="store_true",
                   help="serve without a token on a non-loopback --host (a proxy in front checks the callers)")
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
    try:  # a bad token or folder is an error here, before Ray starts
        token = read_token(args.auth_token_file)
        if token is None and not is_loopback(args.host) and not args.allow_anonymous:
            raise TokenError(f"--host {args.host} without a token: anyone who reaches the port could score images "
                             f"on this machine's GPUs. Give --auth-token-file FILE (make one with {NEW_TOKEN}) or "
                             f"set ${TOKEN_ENV}; or --allow-anonymous when a proxy in front checks the callers")
        Ensemble.load(args.ensemble, "cpu")
    except (EnsembleError, TokenError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_SERVE_ENABLE_TASK_EVENTS", "0")
    # a local instance without the dashboard: it would take port 8265 from a search running beside it
    ray.init(address=args.address, log_to_driver=False, configure_logging=False,
             **({} if args.address else {"include_dashboard": False}))
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app({"ensemble": args.ensemble, "max_batch_size": args.max_batch_size,
                         "batch_wait_ms": args.batch_wait_ms, "max_upload_mb": args.max_upload_mb,
                         "replicas": args.replicas, "auth_token_file": args.auth_token_file,
                         "allow_anonymous": token is None}), name=APP_NAME, route_prefix="/")
    callers = "callers send 'Authorization: Bearer TOKEN'" if token is not None else "no token: anyone who reaches it"
    print(f"[serve] {args.ensemble} on http://{args.host}:{args.port}: POST /predict?class=CLASS, GET /health; "
          f"{callers}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
