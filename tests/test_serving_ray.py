"""The Ray Serve application: follows `champion` (periodically and on the admin call) without a restart, names the
version in every answer, batches same-size requests into one generator call, answers bad requests with 400."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn as nn

from models.registry import get_architecture
from pipeline.lifecycle.packaging import MODEL_FORMAT, HiresSettings, LoadedModel, ServingDefaults
from pipeline.lifecycle.alias_webhook import ALIAS_EVENTS, register_alias_webhook
from pipeline.lifecycle.serving import AliasFollowingInpainter, ServeJobConfig, build_app
from support.serving_helpers import (
    TINY_MAX_WHOLE_PIXELS,
    TINY_RN,
    decode,
    encode,
    hole_mask,
    hostile_bodies,
    photo,
    register_tiny_rn,
    scattered_holes,
    small_windows,
)

MODEL = "ray-rn"
BODY_LIMIT = 2_500_000
INFLIGHT_LIMIT = 6_000_000


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
def served(ray_head, mlflow_server, tmp_path_factory):
    import ray
    from mlflow import MlflowClient
    from ray import serve

    # The versions' own serving defaults (200 000 pixels, 64-px windows) are what the app applies.
    first = register_tiny_rn(mlflow_server, MODEL, seed=1, serving=small_windows(200_000)).version
    second = register_tiny_rn(mlflow_server, MODEL, seed=2, serving=small_windows(200_000)).version
    client = MlflowClient(mlflow_server)
    client.set_registered_model_alias(MODEL, "champion", first)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Two replicas: the admin refresh reaches both whichever the proxy picks. The periodic one is slow enough
    # (6 s; the checks after the admin call take milliseconds) that only the broadcast can explain the second
    # replica catching up at once.
    # Small replica bounds (what a request may hold) so that the hostile cases cost a few MB.
    config = ServeJobConfig(model=MODEL, tracking_uri=mlflow_server, refresh_interval_s=6, max_batch_size=4,
                            batch_wait_timeout_s=0.5, num_cpus=0.5, num_replicas=2, port=port,
                            max_body_bytes=BODY_LIMIT, max_inflight_bytes=INFLIGHT_LIMIT,
                            cache_dir=str(tmp_path_factory.mktemp("replica-cache")))
    ray.init(address=ray_head.address, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="holefill-test", route_prefix="/inpaint")
        yield {"url": f"http://127.0.0.1:{port}/inpaint", "client": client, "versions": (first, second),
               "tracking_uri": mlflow_server}
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
    status, body = _call(f"{url}/-/refresh", {})
    assert status == 200 and (body["model"], body["model_version"]) == (MODEL, second)
    assert len(body["replicas"]) == 2 and set(body["replicas"].values()) == {second}  # every replica, not one
    for _ in range(6):  # whichever replica the proxy picks
        assert _call(url, _request(pixels, hole))[1]["model_version"] == second
        version = _call(f"{url}/-/version")[1]
        assert version["model_version"] == second and version["replica"] in body["replicas"]
    assert _call(f"{url}/-/refresh")[0] == 405  # refresh is POST only

    client.set_registered_model_alias(MODEL, "champion", first)  # no admin call: the periodic refresh sees it
    deadline = time.monotonic() + 90
    while set(_call(f"{url}/-/version")[1]["replicas"].values()) != {first}:
        assert time.monotonic() < deadline, "the replicas did not follow the alias within 90 s"
        time.sleep(0.5)
    assert _call(url, _request(pixels, hole))[1]["model_version"] == first


@pytest.mark.e2e
def test_the_registry_calls_the_refresh_endpoint_through_the_alias_webhook_serve_registers(served):
    url, client, (first, second) = served["url"], served["client"], served["versions"]
    webhook = register_alias_webhook(served["tracking_uri"], f"{url}/-/refresh")  # what jobs/serve.py does
    assert register_alias_webhook(served["tracking_uri"], f"{url}/-/refresh") == webhook  # every start: the same one
    registered = client.get_webhook(webhook)
    assert {f"{event.entity}.{event.action}" for event in registered.events} == set(ALIAS_EVENTS)
    assert registered.url == f"{url}/-/refresh"

    serving = set(_call(f"{url}/-/version")[1]["replicas"].values())
    moved_to = second if serving == {first} else first
    client.set_registered_model_alias(MODEL, "champion", moved_to)  # delivers model_version_alias.created
    # MLflow's own test delivery of that event, answered by the refresh: every replica on the moved alias
    delivery = client.test_webhook(webhook, "model_version_alias.created")
    assert delivery.success and delivery.response_status == 200, delivery
    answer = json.loads(delivery.response_body)
    assert answer["model_version"] == moved_to and set(answer["replicas"].values()) == {moved_to}


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


def _raw(url: str, body: bytes, chunked: bool = False, timeout: float = 120) -> tuple[int, dict, dict]:
    """POST raw bytes (with Content-Length, or chunked without it): status, headers, JSON body."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        try:
            if chunked:
                conn.request("POST", parts.path, body=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                             headers={"Content-Type": "application/json"}, encode_chunked=True)
            else:
                conn.request("POST", parts.path, body=body, headers={"Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before reading it all: its answer is still there
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.e2e
def test_hostile_requests_get_json_4xx_or_503_and_a_good_request_keeps_its_bytes(served):
    url = served["url"]
    pixels, hole = photo(300, 451), hole_mask(300, 451)
    status, before = _call(url, _request(pixels, hole))
    assert status == 200
    mask = _request(pixels, hole)["mask"]
    cases = [(_raw(url, json.dumps({"image": base64.b64encode(data).decode(), "mask": mask}).encode()),
              400, "image is " + ("over" if name == "bomb" else "not a readable image (PNG, JPEG or WebP only)"))
             for name, data in hostile_bodies(200_000).items()]
    cases[-1] = (cases[-1][0], 400, "image is 497x497 = 247009 pixels, over the limit of 200000")
    junk = json.dumps({"image": "A" * (BODY_LIMIT + 100_000), "mask": mask}).encode()
    cases += [
        (_raw(url, b"[" * 200_000), 400, "request body is not JSON this server reads: nested too deeply"),
        (_raw(url, b'{"image": "'), 400, "request body is not JSON"),
        (_raw(url, junk), 413, f"request body of {len(junk)} bytes is over the limit of {BODY_LIMIT} bytes"),
        (_raw(url, junk, chunked=True), 413, f"request body is over the limit of {BODY_LIMIT} bytes"),
        # Under the body limit, but its copies would take more than the replica may hold at once.
        (_raw(url, json.dumps({"image": "A" * (BODY_LIMIT - 100_000), "mask": mask}).encode()), 503,
         "replica busy"),
        (_raw(url, json.dumps({**_request(pixels, hole), "strategy": "whole"}).encode()), 400,
         f"strategy whole is limited to {TINY_MAX_WHOLE_PIXELS} pixels, the image is 451x300"),
    ]
    for (status, headers, body), expected, reason in cases:
        assert (status, body["error"][:len(reason)]) == (expected, reason) and "\n" not in body["error"]
        if status == 503:
            assert headers.get("retry-after") == "1"
    # Holes everywhere: at most max_windows windows, answered like any photo.
    many = scattered_holes(300, 451)
    status, body = _call(url, _request(pixels, many))
    assert status == 200 and np.array_equal(decode(base64.b64decode(body["image"]))[many == 0], pixels[many == 0])
    status, after = _call(url, _request(pixels, hole))
    assert status == 200 and after["image"] == before["image"] and after["model_version"] == before["model_version"]


class Recording(nn.Module):
    def __init__(self, inner: nn.Module, poison: float | None = None):
        super().__init__()
        self.inner, self.batches, self.poison = inner, [], poison

    def forward(self, image, mask):
        self.batches.append(tuple(image.shape))
        # A request that breaks the generator: its (unique) top-left pixel value makes the whole call fail.
        if self.poison is not None and bool((image[:, 0, 0, 0] == self.poison).any()):
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line")
        return self.inner(image, mask)


def _inpainter(generator: nn.Module, config: ServeJobConfig | None = None, serving: ServingDefaults | None = None,
               version: str = "3") -> AliasFollowingInpainter:
    loaded = LoadedModel(generator, "rn", {"arch": "rn"}, MODEL_FORMAT, serving or ServingDefaults())
    return AliasFollowingInpainter(config or ServeJobConfig(model="m"), loader=lambda uri, _: loaded,
                                   resolver=lambda: version)


def test_a_batch_runs_same_size_requests_in_one_generator_call_and_large_ones_in_windows():
    generator = Recording(get_architecture("rn").generator(**TINY_RN).eval())
    serving = ServingDefaults(hires=HiresSettings(strategy="crop", margin=8, trigger=100, limit=64))
    inpainter = _inpainter(generator, serving=serving)
    small = [inpainter.decode(_request(photo(40, 48, seed), hole_mask(40, 48))) for seed in range(3)]
    large = inpainter.decode(_request(photo(120, 160), hole_mask(120, 160)))
    answers = inpainter.run_batch([small[0], large, small[1], small[2]])
    assert [(a.status, a.version) for a in answers] == [(200, "3")] * 4
    assert generator.batches[0] == (3, 3, 40, 48) and len(generator.batches) == 2  # one call for the three
    assert max(generator.batches[1][-2:]) <= 64  # the large one went through a downscaled window
    assert decode(answers[1].png).shape == (120, 160, 3)


def test_one_failing_request_fails_alone_and_its_batch_mates_get_their_own_answers():
    generator = Recording(get_architecture("rn").generator(**TINY_RN).eval(), poison=1.0)
    inpainter = _inpainter(generator)
    pixels = [photo(40, 48, seed) for seed in range(3)]
    pixels[1][0, 0] = 255  # this one breaks the generator
    items = [inpainter.decode(_request(p, hole_mask(40, 48))) for p in pixels]
    alone = [inpainter.run_batch([item])[0] for item in items]
    answers = inpainter.run_batch(items)
    assert [a.status for a in answers] == [200, 500, 200]
    assert answers[1].error == "internal error: CUDA out of memory (simulated)" and answers[1].png is None
    assert answers[0].png == alone[0].png and answers[2].png == alone[2].png
    # A bad input is the client's: 400 with the one-line reason, the others still answered.
    windowed = _inpainter(Recording(get_architecture("rn").generator(**TINY_RN).eval()),
                          serving=ServingDefaults(hires=HiresSettings(margin=8, trigger=32, limit=64)))
    bad = windowed.decode(_request(photo(40, 48), hole_mask(40, 48)))
    bad = type(bad)(bad.image, bad.mask, "sideways")  # got past decode somehow: still refused alone
    answers = windowed.run_batch([bad, windowed.decode(_request(photo(40, 48), hole_mask(40, 48)))])
    assert (answers[0].status, answers[0].error) == (400, "strategy must be crop or whole, got 'sideways'")
    assert answers[1].status == 200


def test_each_answer_becomes_its_own_http_response():
    from pipeline.lifecycle.serving import Answer, InpaintRequest, _response

    item = InpaintRequest(torch.zeros(1, 3, 40, 48), torch.zeros(1, 1, 40, 48))
    failed = _response(Answer("3", status=500, error="internal error: boom", batch_size=4), item, "m")
    assert failed.status_code == 500 and json.loads(failed.body) == {
        "error": "internal error: boom", "model": "m", "model_version": "3", "batch_size": 4}
    done = json.loads(_response(Answer("3", png=b"png", batch_size=4), item, "m").body)
    assert (done["image"], done["width"], done["height"], done["batch_size"]) == ("cG5n", 48, 40, 4)


def test_a_request_asking_for_crop_gets_windows_under_a_whole_default():
    generator = Recording(get_architecture("rn").generator(**TINY_RN).eval())
    serving = ServingDefaults(hires=HiresSettings(strategy="whole", margin=8, trigger=100, limit=64))
    inpainter = _inpainter(generator, serving=serving)
    request = _request(photo(120, 160), hole_mask(120, 160))
    inpainter.run_batch([inpainter.decode(request)])  # the default: the whole photo
    assert generator.batches == [(1, 3, 120, 160)]
    inpainter.run_batch([inpainter.decode({**request, "strategy": "crop"})])
    assert len(generator.batches) == 2 and max(generator.batches[1][-2:]) <= 64  # a downscaled window


def test_serving_applies_the_versions_own_limits_unless_the_config_overrides_them():
    generator = get_architecture("rn").generator(**TINY_RN).eval()
    inpainter = _inpainter(generator, serving=ServingDefaults(max_pixels=1000))
    with pytest.raises(ValueError, match="over the limit of 1000"):
        inpainter.decode(_request(photo(40, 48), hole_mask(40, 48)))
    overriding = _inpainter(generator, ServeJobConfig(model="m", max_pixels=5000), ServingDefaults(max_pixels=1000))
    assert overriding.current.serving.max_pixels == 5000
    assert overriding.decode(_request(photo(40, 48), hole_mask(40, 48))).image.shape == (1, 3, 40, 48)


def test_a_replica_takes_two_batches_and_the_admin_calls_at_once():
    # Ray Serve's default (5 requests per replica) would cap every batch at 5, whatever max_batch_size says.
    assert ServeJobConfig(max_batch_size=8).ongoing_requests() == 18
    assert ServeJobConfig(max_batch_size=8, max_ongoing_requests=9).ongoing_requests() == 9


def test_the_alias_is_followed_by_refresh_and_a_failing_registry_keeps_the_current_version():
    versions = iter(["1", "1", "2"])
    loads = []

    def loader(uri, _):
        loads.append(uri)
        return LoadedModel(get_architecture("rn").generator(**TINY_RN).eval(), "rn", {}, MODEL_FORMAT,
                           ServingDefaults())

    inpainter = AliasFollowingInpainter(ServeJobConfig(model="m"), loader=loader, resolver=lambda: next(versions))
    assert inpainter.refresh() == "1" and loads == ["models:/m/1"]  # unchanged: not loaded again
    assert inpainter.refresh() == "2" and loads == ["models:/m/1", "models:/m/2"]
    with pytest.raises(StopIteration):
        inpainter.refresh()
    assert inpainter.current.version == "2"


@pytest.mark.e2e
def test_a_replica_restarts_from_its_local_copy_while_the_registry_is_down_then_follows_the_alias(
        mlflow_server, tmp_path, monkeypatch, caplog):
    from mlflow import MlflowClient

    from pipeline.lifecycle.serving import LocalCopies
    from support.fault_proxy import Fault, FaultProxy

    name = "restart-rn"
    first = register_tiny_rn(mlflow_server, name, seed=3).version
    second = register_tiny_rn(mlflow_server, name, seed=4).version
    client = MlflowClient(mlflow_server)
    client.set_registered_model_alias(name, "champion", first)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a registry that is down answers at once
    pixels, hole = photo(40, 48), hole_mask(40, 48)
    with FaultProxy(mlflow_server) as registry:
        config = ServeJobConfig(model=name, tracking_uri=registry.url)
        copies = LocalCopies(str(tmp_path / "cache"), name, "champion", registry.url)
        running = AliasFollowingInpainter(config, copies=copies)  # the replica before its restart
        expected = running.run_batch([running.decode(_request(pixels, hole))])[0].png
        assert copies.last() == first and (copies.folder(first) / "MLmodel").is_file()

        registry.set_faults(Fault("503", times=10 ** 9, match=lambda method, path: True))  # the registry goes down
        with pytest.raises(Exception):
            AliasFollowingInpainter(config)  # without a local copy a replica cannot start
        with caplog.at_level("WARNING", logger="holefill.serve"):
            restarted = AliasFollowingInpainter(config, copies=LocalCopies(str(tmp_path / "cache"), name, "champion",
                                                                           registry.url))
        assert restarted.current.version == first and restarted.from_local_copy
        assert f"starting {name} from the local copy of version {first}" in caplog.text
        assert restarted.run_batch([restarted.decode(_request(pixels, hole))])[0].png == expected

        client.set_registered_model_alias(name, "champion", second)  # moved while this replica cannot see it
        with pytest.raises(Exception):
            restarted.refresh()
        assert restarted.current.version == first
        registry.clear()  # the registry is back: the alias is followed again
        assert restarted.refresh() == second and not restarted.from_local_copy
        assert copies.last() == second
