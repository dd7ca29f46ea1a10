"""The HTTP endpoint (ensembles.serve), started for real on loopback and hit by a real HTTP client."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
START_WAIT_S = 240.0
# A batch of another size sums in another order: the members' raw maps move by float32 rounding
# (measured: 7e-5 on PatchCore distances of about 20, so 3e-6 relative), the normalised scores by up
# to 2e-5. Equal to that, not bit for bit.
TOLERANCE = 1e-4
TOKEN = "test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """``python -m ensembles.serve`` on a free loopback port with a callers' token, polled until
    /health answers; yields its URL, the run and the server's log."""
    run, _ = tiny_run
    port = free_port()
    folder = tmp_path_factory.mktemp("serve")
    log, token_file = folder / "serve.log", folder / "token.txt"
    token_file.write_text(TOKEN + "\n")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ensembles.serve", "--ensemble", str(run / "ensemble"),
                                 "--port", str(port), "--max-batch-size", "4", "--batch-wait-ms", "50",
                                 "--max-upload-mb", "0.2", "--auth-token-file", str(token_file)],
                                cwd=REPO, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_WAIT_S
    while True:
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except requests.RequestException:  # not listening yet, or the proxy not routing yet
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the server did not answer /health within {START_WAIT_S:.0f} s: {log.read_text()[-3000:]}")
        time.sleep(1)
    yield url, run, log
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    finally:  # and whatever of its Ray instance is left in its session, so no later test finds two
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def query_cli(ensemble: Path, images: list[Path], out: Path) -> dict[str, dict]:
    done = subprocess.run([sys.executable, "-m", "ensembles.query", "--ensemble", str(ensemble), "--out", str(out),
                           *map(str, images)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return {row["path"]: row for row in map(json.loads, done.stdout.splitlines())}


def test_the_endpoint_answers_as_the_query_cli_under_concurrent_requests(server, synthetic_root, tmp_path):
    url, run, _ = server
    images = sorted((synthetic_root / "washer" / "test").rglob("*.png"))[:12]
    expected = query_cli(run / "ensemble", images, tmp_path / "maps")

    def post(k_path):
        k, path = k_path
        data = path.read_bytes()
        if k % 2:  # half as the raw body, half as a multipart upload
            return requests.post(f"{url}/predict", params={"class": "washer", "map": "1"}, data=data, timeout=120,
                                 headers=AUTH)
        return requests.post(f"{url}/predict", params={"class": "washer", "map": "1"},
                             files={"image": (path.name, data, "image/png")}, timeout=120, headers=AUTH)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, enumerate(images)))
    for path, answer in zip(images, answers):
        assert answer.status_code == 200, answer.text
        got, want = answer.json(), expected[str(path)]
        assert got["class"] == "washer" and got["anomalous"] == want["anomalous"]
        assert got["threshold"] == want["threshold"]
        assert got["score"] == pytest.approx(want["score"], abs=TOLERANCE)
        assert got["members"].keys() == want["members"].keys()
        for member, value in want["members"].items():
            assert got["members"][member] == pytest.approx(value, abs=TOLERANCE)
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["map_png"]))))
        written = np.asarray(Image.open(want["map"]))
        assert served.shape == written.shape and np.abs(served.astype(int) - written.astype(int)).max() <= 1


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_stays_up(server, synthetic_root):
    url, _, _ = server
    image = next((synthetic_root / "washer" / "test").rglob("*.png")).read_bytes()
    cases = [
        (dict(params={"class": "washer"}, data=b"this is not an image"), 400, "not an image"),
        (dict(params={"class": "bottle"}, data=image), 404, "unknown class 'bottle'"),
        (dict(params={"class": "washer"}, data=os.urandom(300_000)), 413, "more than the 200000"),
        (dict(params={"class": "washer"}, data=b""), 400, "has no image"),
        (dict(params={"class": "washer"}, files={"file": ("x.png", image, "image/png")}), 400, "field 'image'"),
    ]
    for kwargs, status, message in cases:
        answer = requests.post(f"{url}/predict", timeout=60, headers=AUTH, **kwargs)
        assert answer.status_code == status and message in answer.json()["error"], (status, answer.text)
    health = requests.get(f"{url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["classes"] == ["washer"]
    again = requests.post(f"{url}/predict", params={"class": "washer"}, data=image, timeout=60, headers=AUTH)
    assert again.status_code == 200 and "map_png" not in again.json()


def test_only_callers_with_the_token_are_answered_and_the_token_is_never_logged(server, synthetic_root):
    url, _, log = server
    image = next((synthetic_root / "washer" / "test").rglob("*.png")).read_bytes()

    def post(**headers):
        return requests.post(f"{url}/predict", params={"class": "washer"}, data=image, timeout=60, headers=headers)

    missing = post()
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["error"]
    assert post(Authorization=f"Basic {TOKEN}").status_code == 401
    assert post(Authorization="Bearer ").status_code == 401
    for wrong in ("Bearer not-the-token", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"):
        refused = post(Authorization=wrong)
        assert refused.status_code == 403 and "not this endpoint's" in refused.json()["error"], wrong
    assert requests.get(f"{url}/docs", timeout=10).status_code == 401       # every route but /health
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    answered = post(Authorization=f"bearer {TOKEN}")                      # the scheme is case-insensitive
    assert answered.status_code == 200 and answered.json()["class"] == "washer"
    assert TOKEN not in log.read_text()


def test_a_server_reachable_from_other_hosts_needs_a_token(tiny_run, tmp_path, capsys, monkeypatch):
    from ensembles.serve import TOKEN_ENV, TokenError, build_app, main

    run, _ = tiny_run
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    sessions = set(Path("/tmp/ray").glob("session_2*")) if Path("/tmp/ray").exists() else set()
    assert main(["--ensemble", str(run / "ensemble"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 without a token" in err and "--auth-token-file" in err and "--allow-anonymous" in err
    short = tmp_path / "short.txt"
    short.write_text("abc")
    assert main(["--ensemble", str(run / "ensemble"), "--auth-token-file", str(short)]) == 2
    assert f"--auth-token-file {short}: a token needs at least 16 characters" in capsys.readouterr().err
    assert main(["--ensemble", str(run / "ensemble"), "--auth-token-file", str(tmp_path / "none.txt")]) == 2
    assert "cannot read it" in capsys.readouterr().err
    monkeypatch.setenv(TOKEN_ENV, "short")
    assert main(["--ensemble", str(run / "ensemble"), "--host", "0.0.0.0"]) == 2
    assert f"${TOKEN_ENV}: a token needs" in capsys.readouterr().err
    assert (set(Path("/tmp/ray").glob("session_2*")) if Path("/tmp/ray").exists() else set()) == sessions
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(TokenError, match="auth_token_file=FILE .* or allow_anonymous=true"):
        build_app({"ensemble": str(run / "ensemble")})   # serve run: where Serve listens is not known here


def test_a_bad_ensemble_is_refused_before_ray_starts(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ensembles.serve", "--ensemble", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "ensemble.json is missing" in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr
