"""`mlflow models serve` of a registered holefill model, from a process that has no holefill: only the model's
bundled code. A real server on 127.0.0.1 answers POST /invocations with a PNG, and bad requests with HTTP 400."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from support.serving_helpers import (
    TINY_CHAMPION,
    TINY_MAX_PIXELS,
    TINY_MAX_WHOLE_PIXELS,
    decode,
    encode,
    environment_without_holefill,
    hole_mask,
    hostile_bodies,
    photo,
    scattered_holes,
)

REPO = Path(__file__).resolve().parents[1]
MLFLOW = Path(sys.executable).with_name("mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict | bytes) -> tuple[int, dict]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _request(image: bytes, mask: bytes) -> dict:
    return {"dataframe_split": {"columns": ["image", "mask"],
                                "data": [[base64.b64encode(image).decode(), base64.b64encode(mask).decode()]]}}


@pytest.fixture(scope="module")
def served_champion(mlflow_server, tiny_champion, tmp_path_factory):
    """`mlflow models serve -m models:/tiny-rn@champion` in an interpreter where holefill cannot be imported."""
    cwd = tmp_path_factory.mktemp("no-holefill")
    env = environment_without_holefill(cwd / "site", REPO)
    env.update(MLFLOW_TRACKING_URI=mlflow_server, OMP_NUM_THREADS="2")
    port = _free_port()
    log = open(cwd / "serve.log", "wb")
    proc = subprocess.Popen([str(MLFLOW), "models", "serve", "-m", f"models:/{TINY_CHAMPION}@champion", "--env-manager",
                             "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow models serve did not start: {(cwd / 'serve.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield {"url": url, "env": env, "cwd": cwd}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


@pytest.mark.e2e
def test_the_serving_process_cannot_import_holefill(served_champion):
    for name in ("pipeline", "models", "holefill", "jobs"):
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=served_champion["cwd"],
                               env=served_champion["env"], capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, (name, probe.stderr[-500:])


@pytest.mark.e2e
def test_post_a_300x451_photo_and_mask_returns_a_same_size_png_unchanged_outside_the_hole(served_champion):
    pixels, hole = photo(300, 451), hole_mask(300, 451)
    status, body = _post(f"{served_champion['url']}/invocations", _request(encode(pixels), encode(hole)))
    assert status == 200, body
    result = decode(base64.b64decode(body["predictions"][0]["image"]))
    assert result.shape == (300, 451, 3)
    assert np.array_equal(result[hole == 0], pixels[hole == 0])
    assert not np.array_equal(result[hole > 0], pixels[hole > 0])


@pytest.mark.e2e
@pytest.mark.parametrize("case,reason", [
    ("not an image", "image is not a readable image"),
    ("mask size", "mask is 20x10, image is 451x300: sizes must match"),
    ("empty mask", "mask has no hole"),
    ("too large", f"image is 500x500 = 250000 pixels, over the limit of {TINY_MAX_PIXELS}"),
    ("strategy", "param strategy must be one of crop, whole, got 'stretch'"),
])
def test_bad_requests_get_http_400_with_a_one_line_reason(served_champion, case, reason):
    pixels, hole = photo(300, 451), hole_mask(300, 451)
    image, mask = encode(pixels), encode(hole)
    payload = _request(image, mask)
    if case == "not an image":
        payload = _request(b"GIF89a? no, just text", mask)
    elif case == "mask size":
        payload = _request(image, encode(np.full((10, 20), 255, np.uint8)))
    elif case == "empty mask":
        payload = _request(image, encode(np.zeros((300, 451), np.uint8)))
    elif case == "too large":
        payload = _request(encode(photo(500, 500)), encode(hole_mask(500, 500)))
    elif case == "strategy":
        payload["params"] = {"strategy": "stretch"}
    status, body = _post(f"{served_champion['url']}/invocations", payload)
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert body["reason"].startswith(reason) and "\n" not in body["reason"]
    assert "Traceback" not in json.dumps(body)


@pytest.mark.e2e
def test_hostile_requests_get_json_4xx_with_one_line_and_a_good_request_keeps_its_bytes(served_champion):
    url = f"{served_champion['url']}/invocations"
    pixels, hole = photo(300, 451), hole_mask(300, 451)
    good = _request(encode(pixels), encode(hole))
    status, before = _post(url, good)
    assert status == 200
    cases = [(_request(data, encode(hole)), 400, "image is not a readable image (PNG, JPEG or WebP only)")
             for name, data in hostile_bodies(TINY_MAX_PIXELS).items() if name != "bomb"]
    cases += [
        (_request(hostile_bodies(TINY_MAX_PIXELS)["bomb"], encode(hole)), 400,
         f"image is 497x497 = 247009 pixels, over the limit of {TINY_MAX_PIXELS}"),
        ({**good, "params": {"strategy": "whole"}}, 400,
         f"strategy whole is limited to {TINY_MAX_WHOLE_PIXELS} pixels, the image is 451x300"),
        (_request(bytes(4 * TINY_MAX_PIXELS + (1 << 20) + 1), encode(hole)), 400,
         f"image is {4 * TINY_MAX_PIXELS + (1 << 20) + 1} bytes, over the limit of {4 * TINY_MAX_PIXELS + (1 << 20)}"),
        (b" " * 6_000_000, 413, "request body of 6000000 bytes is over the limit of"),
        (b"[" * 200_000, 400, "request body is not JSON this server reads: nested too deeply"),
        (b'{"dataframe_split": ', 400, "request body is not valid JSON"),
    ]
    for payload, expected, reason in cases:
        status, body = _post(url, payload)
        assert (status, body.get("reason", "")[:len(reason)]) == (expected, reason), body
        assert "\n" not in body["reason"] and "Traceback" not in json.dumps(body)
    many = scattered_holes(300, 451)
    status, body = _post(url, _request(encode(pixels), encode(many)))
    assert status == 200 and np.array_equal(decode(base64.b64decode(body["predictions"][0]["image"]))[many == 0],
                                            pixels[many == 0])
    status, after = _post(url, good)
    assert status == 200 and after == before
