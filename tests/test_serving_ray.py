"""The Ray Serve application: follows `champion` (periodically and on the admin call) without a restart, names the
version in every answer, batches same-size requests into one generator call, answers bad requests with 400."""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch.nn as nn

from models.registry import get_architecture
from pipeline.lifecycle.packaging import HiresConfig
from pipeline.lifecycle.serving import AliasFollowingInpainter, ServeConfig, build_app
from serving_helpers import TINY_RN, decode, encode, hole_mask, photo, register_tiny_rn

MODEL = "ray-rn"


def _call(url: str, payload: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="GET" if payload is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _request(pixels: np.ndarray, hole: np.ndarray) -> dict:
    return {"image": base64.b64encode(encode(pixels)).decode(), "mask": base64.b64encode(encode(hole)).decode()}


@pytest.fixture(scope="module")
def served(ray_head, mlflow_server):
    import ray
    from mlflow import MlflowClient
    from ray import serve

    first = register_tiny_rn(mlflow_server, MODEL, seed=1).version
    second = register_tiny_rn(mlflow_server, MODEL, seed=2).version
    client = MlflowClient(mlflow_server)
    client.set_registered_model_alias(MODEL, "champion", first)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServeConfig(model=MODEL, tracking_uri=mlflow_server, refresh_interval_s=2, max_batch_size=4,
                         batch_wait_timeout_s=0.5, num_cpus=0.5, max_pixels=200_000, port=port,
                         hires=HiresConfig(strategy="crop", margin=8, trigger=128, limit=64))
    ray.init(address=ray_head.address, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="holefill-test", route_prefix="/inpaint")
        yield {"url": f"http://127.0.0.1:{port}/inpaint", "client": client, "versions": (first, second)}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.e2e
def test_served_version_follows_the_alias_on_the_admin_call_and_on_its_own(served):
    url, client, (first, second) = served["url"], served["client"], served["versions"]
    pixels, hole = photo(300, 451), hole_mask(300, 451)
    status, body = _call(url, _request(pixels, hole))
    assert status == 200 and body["model_version"] == first and body["model"] == MODEL
    result = decode(base64.b64decode(body["image"]))
    assert result.shape == (300, 451, 3) and np.array_equal(result[hole == 0], pixels[hole == 0])

    client.set_registered_model_alias(MODEL, "champion", second)  # a promotion in the MLflow UI
    assert _call(f"{url}/-/refresh", {}) == (200, {"model": MODEL, "model_version": second})
    assert _call(url, _request(pixels, hole))[1]["model_version"] == second

    client.set_registered_model_alias(MODEL, "champion", first)  # no admin call: the periodic refresh sees it
    deadline = time.monotonic() + 60
    while _call(f"{url}/-/version")[1]["model_version"] != first:
        assert time.monotonic() < deadline, "the served version did not follow the alias within 60 s"
        time.sleep(0.5)
    assert _call(url, _request(pixels, hole))[1]["model_version"] == first


@pytest.mark.e2e
def test_concurrent_requests_are_answered_by_one_version_each(served):
    pixels, hole = photo(64, 80), hole_mask(64, 80)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _call(served["url"], _request(pixels, hole)), range(4)))
    assert [status for status, _ in answers] == [200] * 4
    assert {body["model_version"] for _, body in answers} <= set(served["versions"])
    for _, body in answers:
        assert np.array_equal(decode(base64.b64decode(body["image"]))[hole == 0], pixels[hole == 0])


@pytest.mark.e2e
@pytest.mark.parametrize("payload,reason", [
    ({"image": "bm90IGFuIGltYWdl", "mask": "bm90IGFuIGltYWdl"}, "image is not a readable image"),
    ({"image": base64.b64encode(encode(photo(20, 30))).decode()}, "request field mask is missing"),
    ("[1, 2]", "request body must be a JSON object"),
    (_request(photo(500, 500), hole_mask(500, 500)), "image is 500x500 = 250000 pixels, over the limit of 200000"),
])
def test_bad_requests_get_http_400_with_a_one_line_reason(served, payload, reason):
    status, body = _call(served["url"], json.loads(payload) if isinstance(payload, str) else payload)
    assert status == 400 and body["error"].startswith(reason) and "\n" not in body["error"]


class Recording(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, image, mask):
        self.batches.append(tuple(image.shape))
        return self.inner(image, mask)


def test_a_batch_runs_same_size_requests_in_one_generator_call_and_large_ones_in_windows():
    generator = Recording(get_architecture("rn").generator(**TINY_RN).eval())
    config = ServeConfig(model="m", hires=HiresConfig(strategy="crop", margin=8, trigger=100, limit=64))
    inpainter = AliasFollowingInpainter(config, loader=lambda uri, _: (generator, "rn"), resolver=lambda: "3")
    small = [inpainter.decode(_request(photo(40, 48, seed), hole_mask(40, 48))) for seed in range(3)]
    large = inpainter.decode(_request(photo(120, 160), hole_mask(120, 160)))
    answers = inpainter.run_batch([small[0], large, small[1], small[2]])
    assert [version for _, version in answers] == ["3"] * 4
    assert generator.batches[0] == (3, 3, 40, 48) and len(generator.batches) == 2  # one call for the three
    assert max(generator.batches[1][-2:]) <= 64  # the large one went through a downscaled window
    assert decode(answers[1][0]).shape == (120, 160, 3)


def test_the_alias_is_followed_by_refresh_and_a_failing_registry_keeps_the_current_version():
    versions = iter(["1", "1", "2"])
    loads = []

    def loader(uri, _):
        loads.append(uri)
        return get_architecture("rn").generator(**TINY_RN).eval(), "rn"

    inpainter = AliasFollowingInpainter(ServeConfig(model="m"), loader=loader, resolver=lambda: next(versions))
    assert inpainter.refresh() == "1" and loads == ["models:/m/1"]  # unchanged: not loaded again
    assert inpainter.refresh() == "2" and loads == ["models:/m/1", "models:/m/2"]
    with pytest.raises(StopIteration):
        inpainter.refresh()
    assert inpainter.current.version == "2"
