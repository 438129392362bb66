"""No request can hurt a server: every read, decode and piece of work a client causes is bounded before it starts,
and every refusal is a one-line reason. These are the bounds themselves (the codec, the windows, the serving
inpainter and the pyfunc model in-process); tests/test_serving_ray.py and tests/test_serving_mlflow.py send the
same hostile requests through the two HTTP servers."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from models.codec import ALLOWED_FORMATS, decode_request, decode_request_uint8, max_encoded_bytes, to_float
from models.inpaint import CropStrategy, DeadlineExceeded, hole_windows, inpaint_tensor
from models.registry import get_architecture
from pipeline.lifecycle.packaging import MODEL_FORMAT, PYFUNC_MODEL_FILE, HiresSettings, LoadedModel, ServingDefaults
from pipeline.lifecycle.serving import (
    AliasFollowingInpainter,
    InflightBytes,
    LocalCopies,
    Overloaded,
    ServeJobConfig,
    default_body_bytes,
)
from support.serving_helpers import TINY_RN, encode, hole_mask, photo


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _saved(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


EXOTIC = [("TGA", "RGB"), ("SGI", "RGB"), ("PCX", "RGB"), ("IM", "RGB"), ("MSP", "1"), ("BMP", "RGB"), ("GIF", "RGB"),
          ("TIFF", "RGB"), ("ICO", "RGB"), ("PPM", "RGB"), ("SPIDER", "F"), ("ICNS", "RGB")]


@pytest.mark.parametrize("fmt,mode", EXOTIC)
def test_formats_outside_png_jpeg_webp_are_refused_before_their_decoder_runs(fmt, mode):
    buffer = io.BytesIO()
    Image.fromarray(photo(16, 16)).convert(mode).save(buffer, format=fmt)
    with pytest.raises(ValueError, match=r"^image is not a readable image \(PNG, JPEG or WebP only\)") as err:
        decode_request(buffer.getvalue(), _saved(hole_mask(16, 16), "PNG"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^mask is not a readable image"):  # masks alike
        decode_request(_saved(photo(16, 16), "PNG"), buffer.getvalue())


def test_postscript_never_reaches_ghostscript_and_dds_never_reaches_its_decoder():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n(/etc/passwd) (r) file\nshowpage\n%%EOF\n"
    dds = b"DDS " + (124).to_bytes(4, "little") + bytes(120)
    for data in (eps, dds, b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64)):  # EPS, DDS, JPEG 2000
        with pytest.raises(ValueError, match="not a readable image"):
            decode_request(data, _saved(hole_mask(16, 16), "PNG"))
    assert ALLOWED_FORMATS == ("PNG", "JPEG", "WEBP")
    # The three allowed formats decode, image and mask alike.
    for fmt in ("PNG", "JPEG", "WEBP"):
        image, mask = decode_request(_saved(photo(16, 20), fmt), _saved(hole_mask(16, 20), "PNG"))
        assert image.shape == (1, 3, 16, 20) and mask.shape == (1, 1, 16, 20)


def test_fields_over_their_byte_limit_are_refused_before_they_are_read():
    limit = max_encoded_bytes(100)
    with pytest.raises(ValueError, match=f"^image is {limit + 1} bytes, over the limit of {limit} for 100 pixels$"):
        decode_request(b"\x89PNG" + bytes(limit - 3), b"x", max_pixels=100)


def test_a_decode_bomb_is_refused_from_its_header_and_a_truncated_image_in_one_line():
    bomb = _saved(np.zeros((6000, 6000), np.uint8), "PNG")  # 36 MP, a few KB
    assert len(bomb) < 100_000
    with pytest.raises(ValueError, match="^image is 6000x6000 = 36000000 pixels, over the limit of 1000000$"):
        decode_request(bomb, bomb, max_pixels=1_000_000)
    png = _saved(photo(64, 64), "PNG")
    with pytest.raises(ValueError, match="^image (could not be decoded|is not a readable image)") as err:
        decode_request(png[: len(png) // 2], _saved(hole_mask(64, 64), "PNG"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="^mask is 20x10, image is 64x64: sizes must match$"):
        decode_request(png, _saved(np.full((10, 20), 255, np.uint8), "PNG"))


def test_requests_decode_to_uint8_and_become_the_same_floats_per_batch():
    image, mask = decode_request_uint8(_saved(photo(30, 40), "PNG"), _saved(hole_mask(30, 40), "PNG"))
    assert (image.dtype, mask.dtype) == (torch.uint8, torch.uint8) and set(mask.unique().tolist()) == {0, 1}
    floats = decode_request(_saved(photo(30, 40), "PNG"), _saved(hole_mask(30, 40), "PNG"))
    assert all(torch.equal(a, b) for a, b in zip(to_float(image, mask), floats))


def test_windows_per_image_are_bounded_however_the_mask_scatters_its_holes():
    mask = torch.zeros(1500, 1500)
    mask[::60, ::60] = 1  # 625 one-pixel holes
    started = time.perf_counter()
    windows = hole_windows(mask, margin=8, max_windows=16)
    assert 1 <= len(windows) <= 16 and time.perf_counter() - started < 30
    covered = torch.zeros_like(mask)
    for top, left, bottom, right in windows:
        covered[top:bottom, left:right] = 1
    assert bool((covered[mask > 0] == 1).all())  # every hole pixel still in a window
    few = torch.zeros(1500, 1500)
    few[100:120, 100:120] = few[900:920, 1200:1230] = 1
    assert len(hole_windows(few, margin=8, max_windows=16)) == 2  # a few holes keep their own windows


class Counting(torch.nn.Module):
    def __init__(self, inner, delay: float = 0.0):
        super().__init__()
        self.inner, self.calls, self.delay = inner, [], delay

    def forward(self, image, mask):
        self.calls.append(tuple(image.shape))
        time.sleep(self.delay)
        return self.inner(image, mask)


def _tiny():
    torch.manual_seed(0)
    return get_architecture("rn").generator(**TINY_RN).eval()


def test_a_window_explosion_mask_costs_at_most_max_windows_generator_calls_and_a_deadline_stops_it():
    generator = Counting(_tiny())
    image, mask = torch.rand(1, 3, 600, 600), torch.zeros(1, 1, 600, 600)
    mask[..., ::40, ::40] = 1
    out = inpaint_tensor(generator, "rn", image, mask, strategy=CropStrategy(margin=4, trigger=64, limit=64,
                                                                             max_windows=4))
    assert 1 <= len(generator.calls) <= 4 and torch.equal(out[mask.expand_as(out) == 0], image[mask.expand_as(out) == 0])
    with pytest.raises(DeadlineExceeded):
        inpaint_tensor(generator, "rn", image, mask, strategy=CropStrategy(margin=4, trigger=64, limit=64),
                       deadline=time.monotonic() - 1)


def _inpainter(generator, serving: ServingDefaults, config: ServeJobConfig | None = None):
    loaded = LoadedModel(generator, "rn", {"arch": "rn"}, MODEL_FORMAT, serving)
    return AliasFollowingInpainter(config or ServeJobConfig(model="m", cache_dir=None), loader=lambda uri, _: loaded,
                                   resolver=lambda: "3")


def _payload(height, width, **extra):
    return {"image": _b64(encode(photo(height, width))), "mask": _b64(encode(hole_mask(height, width))), **extra}


def test_whole_above_the_cap_is_refused_naming_its_key_and_whole_calls_hold_at_most_the_cap():
    generator = Counting(_tiny())
    serving = ServingDefaults(max_whole_pixels=5000, hires=HiresSettings(margin=8, trigger=1000, limit=64))
    inpainter = _inpainter(generator, serving)
    with pytest.raises(ValueError, match="^strategy whole is limited to 5000 pixels, the image is 120x100 = 12000: "
                                         "send strategy crop, or raise max_whole_pixels"):
        inpainter.decode(_payload(100, 120, strategy="whole"))
    assert generator.calls == []  # refused before decoding, let alone inpainting
    # Not asked for whole: under the trigger but over the cap, it goes through windows instead.
    answer = inpainter.run_batch([inpainter.decode(_payload(100, 120))])[0]
    assert answer.status == 200 and all(h * w <= 64 * 64 for _, _, h, w in generator.calls)
    # Same-size whole requests share calls of at most 5000 pixels in all: 40x48 = 1920 -> two a call.
    generator.calls.clear()
    items = [inpainter.decode(_payload(40, 48)) for _ in range(5)]
    alone = [inpainter.run_batch([item])[0].png for item in items]
    generator.calls.clear()
    answers = inpainter.run_batch(items)
    assert [c[0] for c in generator.calls] == [2, 2, 1] and [a.png for a in answers] == alone


def test_a_request_past_its_deadline_gets_504_and_the_next_one_is_served():
    generator = Counting(_tiny(), delay=0.3)
    inpainter = _inpainter(generator, ServingDefaults(request_timeout_s=0.2, hires=HiresSettings(
        margin=4, trigger=64, limit=64, max_windows=16)))
    mask = np.zeros((300, 300), np.uint8)
    mask[::40, ::40] = 255
    slow = inpainter.decode({"image": _b64(encode(photo(300, 300))), "mask": _b64(encode(mask))},
                            deadline=time.monotonic() + 0.2)
    answer = inpainter.run_batch([slow])[0]
    assert answer.status == 504 and "deadline" in answer.error and len(generator.calls) <= 2
    late = inpainter.decode(_payload(40, 48), deadline=time.monotonic() - 1)
    fine = inpainter.decode(_payload(40, 48), deadline=time.monotonic() + 60)
    assert [a.status for a in inpainter.run_batch([late, fine])] == [504, 200]


@pytest.mark.parametrize("body,reason", [
    (b"[" * 200_000, "request body is not JSON this server reads: nested too deeply"),
    (b"{\"image\": ", "request body is not JSON"),
    (b"\xff\xfe", "request body is not JSON"),
    (json.dumps({"image": 1, "mask": 2}).encode(), "request field image is missing"),
    (json.dumps({"image": "eA==", "mask": "eA==", "strategy": ["x"]}).encode(), "strategy must be crop or whole"),
])
def test_malformed_bodies_are_one_line_value_errors(body, reason):
    inpainter = _inpainter(_tiny(), ServingDefaults())
    with pytest.raises(ValueError) as err:
        inpainter.parse(body)
    assert str(err.value).startswith(reason) and "\n" not in str(err.value)


def test_the_replica_accounts_for_request_bytes_before_decoding_them():
    inpainter = _inpainter(_tiny(), ServingDefaults())
    account = InflightBytes(10 * 40 * 48 + 100)
    item = inpainter.parse(json.dumps(_payload(40, 48)).encode(), admit=lambda p: account.take(10 * p))
    assert item.image.dtype == torch.uint8 and account.used == 10 * 40 * 48
    with pytest.raises(Overloaded, match="max_inflight_bytes"):
        inpainter.parse(json.dumps(_payload(40, 48)).encode(), admit=lambda p: account.take(10 * p))
    account.give(10 * 40 * 48)
    assert account.used == 0


def test_limits_and_the_memory_a_replica_declares_follow_the_config():
    config = ServeJobConfig(max_pixels=1_000_000, max_whole_pixels=250_000)
    assert config.body_limit(config.serving_for(ServingDefaults())) == default_body_bytes(1_000_000)
    assert ServeJobConfig(max_body_bytes=1234).body_limit(ServingDefaults()) == 1234
    small, large = ServeJobConfig(max_pixels=1_000_000), ServeJobConfig(max_pixels=24_000_000)
    assert 1 << 30 < small.replica_memory() < large.replica_memory()
    assert ServeJobConfig(max_whole_pixels=4 << 20).replica_memory() > ServeJobConfig().replica_memory()
    assert ServeJobConfig(memory_bytes=5 << 30).replica_memory() == 5 << 30
    serving = ServeJobConfig(max_whole_pixels=7, request_timeout_s=3).serving_for(ServingDefaults())
    assert (serving.max_whole_pixels, serving.request_timeout_s) == (7, 3)
    # The version's limits travel in its model_config and come back.
    defaults = ServingDefaults(max_whole_pixels=99, request_timeout_s=5, hires=HiresSettings(max_windows=3))
    assert ServingDefaults.from_model_config(defaults.model_config_dict()) == defaults


def test_a_replica_starts_from_its_local_copy_when_the_registry_is_down(tmp_path, caplog):
    copies = LocalCopies(str(tmp_path), "m", "champion", None)
    (copies.folder("4") / "MLmodel").parent.mkdir(parents=True)
    (copies.folder("4") / "MLmodel").write_text("flavors: {}\n")
    copies.remember("4")
    loaded = LoadedModel(_tiny(), "rn", {"arch": "rn"}, MODEL_FORMAT, ServingDefaults())
    seen = []

    def down():
        raise ConnectionError("registry unreachable\nsecond line")

    with caplog.at_level(logging.WARNING, logger="holefill.serve"):
        inpainter = AliasFollowingInpainter(ServeJobConfig(model="m"), loader=lambda uri, _: seen.append(uri) or loaded,
                                            resolver=down, copies=copies)
    assert inpainter.current.version == "4" and seen == [str(copies.folder("4"))]
    assert "starting m from the local copy of version 4" in caplog.text
    with pytest.raises(ValueError, match="registry unreachable|no copy"):  # no copy at all: the start fails
        AliasFollowingInpainter(ServeJobConfig(model="m"), loader=lambda uri, _: loaded,
                                resolver=lambda: (_ for _ in ()).throw(ValueError("registry unreachable")),
                                copies=LocalCopies(str(tmp_path / "empty"), "m", "champion", None))


def _pyfunc(tmp_path, **config):
    spec = importlib.util.spec_from_file_location("holefill_pyfunc_limits", PYFUNC_MODEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # what MLflow executes for a model from code
    generator = _tiny()
    torch.save(generator.state_dict(), tmp_path / "generator.pt")
    (tmp_path / "generator.json").write_text(json.dumps({"arch": "rn", "generator_kwargs": TINY_RN}))
    model = module.HolefillInpainter()
    serving = ServingDefaults(**config).model_config_dict()
    model.load_context(SimpleNamespace(artifacts={"generator_weights": str(tmp_path / "generator.pt"),
                                                  "generator_spec": str(tmp_path / "generator.json")},
                                       model_config=serving))
    return model


def test_the_pyfunc_applies_the_same_limits_to_encoded_and_tensor_inputs(tmp_path):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    model = _pyfunc(tmp_path, max_pixels=5000, max_whole_pixels=1000,
                    hires=HiresSettings(margin=4, trigger=32, limit=32, max_windows=2))
    with pytest.raises(MlflowException, match="tensor input: image is 100x100 = 10000 pixels, over the limit of 5000"):
        model.predict(None, {"image": np.zeros((1, 3, 100, 100), np.float32), "mask": np.ones((1, 1, 100, 100))})
    with pytest.raises(MlflowException, match="strategy whole is limited to 1000 pixels"):
        model.predict(None, {"image": np.zeros((1, 3, 40, 40), np.float32), "mask": np.ones((1, 1, 40, 40))},
                      params={"strategy": "whole"})
    with pytest.raises(MlflowException, match="not a readable image"):
        model.predict(None, pd.DataFrame({"image": [_saved(photo(16, 16), "TGA")], "mask": [encode(hole_mask(16, 16))]}))
    with pytest.raises(MlflowException, match="over the limit of"):
        model.predict(None, pd.DataFrame({"image": [bytes(max_encoded_bytes(5000) + 1)], "mask": [b"x"]}))
    out = model.predict(None, pd.DataFrame({"image": [encode(photo(40, 48))], "mask": [encode(hole_mask(40, 48))]}))
    assert np.asarray(Image.open(io.BytesIO(out["image"][0]))).shape == (40, 48, 3)
    slow = _pyfunc(tmp_path, request_timeout_s=1e-6)
    with pytest.raises(MlflowException, match="deadline") as err:
        slow.predict(None, pd.DataFrame({"image": [encode(photo(40, 48))], "mask": [encode(hole_mask(40, 48))]}))
    assert err.value.get_http_status_code() == 504
