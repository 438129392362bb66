"""Load test of the Ray Serve app: concurrent clients on 127.0.0.1 with good requests of several sizes and bad ones,
run against two per-replica request limits side by side (Ray Serve's default of 5, and holefill's 2 x batch + 2).

A throwaway MLflow store (SQLite in a temp folder) gets a randomly initialised RN registered as ``champion`` with
its serving defaults (a 200 000-pixel limit); a local Ray starts Serve on a free loopback port. Each client sends a
fixed, seeded sequence: good requests (distinct photos at 64, 96 and 128 px) and bad ones (not an image, a mask of
the wrong size, an image over the pixel limit). Printed per limit: requests/s, p50/p99 latency of the good
requests, the batch sizes the good requests were served in, and two checks: every good answer is byte-identical
to the same request served alone (sent one at a time afterwards), and every bad one got HTTP 400 with its reason.
Bounded in count (clients x requests) and time (per-request timeout); loopback only.

    .venv/bin/python bench/serving_load.py                       # tiny RN, 8 clients x 25 requests
    .venv/bin/python bench/serving_load.py --clients 4 --requests 10 --residual-blocks 8

Measured (defaults; a 2-core AVX2 CPU shared with other jobs, so compare the rows, not the absolute times):

    max_ongoing_requests   req/s   p50 ms   p99 ms    max  batch sizes of good requests         checks
    5 (Ray Serve default)   2.23     3667     9844      3  {1: 97, 2: 48, 3: 9}                 154/154 identical, 46/46 400
    18 (2 x batch + 2)      2.15     4522     6631      7  {1: 91, 2: 32, 3: 6, 5: 5, 6: 6, 7: 14}  154/154 identical, 46/46 400

At Ray Serve's default limit a batch never exceeded 3 (bad requests and the admin calls hold slots too); at the
derived limit batches reach 7 of the 8 clients in flight and p99 drops by a third. On a CPU a batch costs what
its images cost one by one, so requests/s stay flat; on a GPU the larger batches are the throughput.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH_DIR]
_REPO = os.path.dirname(_BENCH_DIR)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from models.registry import get_architecture  # noqa: E402
from pipeline.lifecycle.packaging import HiresSettings, ServingDefaults, log_and_register_generator  # noqa: E402
from pipeline.lifecycle.serving import ServeJobConfig, build_app  # noqa: E402
from pipeline.tracking import RunTracker, mlflow_client  # noqa: E402

SIZES = (64, 96, 128)
MAX_PIXELS = 200_000
TIMEOUT_S = 300


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _photo(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 / (size - 1), y * 255 / (size - 1), (x * y + seed * 37) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 15, base.shape), 0, 255).astype(np.uint8)


def _hole(height: int, width: int, seed: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    top, left = 4 + seed % 7, 6 + seed % 5
    mask[top: top + height // 3, left: left + width // 3] = 255
    return mask


def _requests() -> tuple[list[dict], list[tuple[dict, str]]]:
    """Distinct good payloads (3 sizes x 4 photos) and bad ones with the reason each must get."""
    good = [{"image": _b64(_png(_photo(size, seed))), "mask": _b64(_png(_hole(size, size, seed)))}
            for size in SIZES for seed in range(4)]
    big = 500  # 250 000 pixels > MAX_PIXELS
    bad = [
        ({"image": _b64(b"not an image at all"), "mask": good[0]["mask"]}, "image is not a readable image"),
        ({"image": good[0]["image"], "mask": _b64(_png(_hole(32, 48, 0)))}, "mask is 48x32, image is 64x64"),
        ({"image": _b64(_png(_photo(big, 0))), "mask": _b64(_png(_hole(big, big, 0)))},
         f"image is {big}x{big} = {big * big} pixels, over the limit of {MAX_PIXELS}"),
    ]
    return good, bad


def _call(url: str, payload: dict) -> tuple[int, dict, float]:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            status, body = response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        status, body = err.code, json.loads(err.read() or b"{}")
    return status, body, time.perf_counter() - started


def _load(url: str, good: list[dict], bad: list[tuple[dict, str]], clients: int, per_client: int,
          bad_share: float, seed: int) -> dict:
    """Every client's sequence, concurrently; returns what was answered."""
    plans = []
    for client in range(clients):
        rng = random.Random(seed * 1000 + client)
        plans.append([("bad", rng.randrange(len(bad))) if rng.random() < bad_share else ("good", rng.randrange(len(good)))
                      for _ in range(per_client)])

    def run(plan):
        out = []
        for kind, index in plan:
            payload = good[index] if kind == "good" else bad[index][0]
            out.append((kind, index, *_call(url, payload)))
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for client in pool.map(run, plans) for r in client]
    return {"results": results, "wall": time.perf_counter() - started}


def _report(name: str, load: dict, alone: list[bytes], bad: list[tuple[dict, str]]) -> None:
    results, wall = load["results"], load["wall"]
    good = [r for r in results if r[0] == "good"]
    latencies = sorted(r[4] for r in good)
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
    batches = collections.Counter(r[3].get("batch_size", 0) for r in good)
    identical = sum(1 for kind, index, status, body, _ in good
                    if status == 200 and base64.b64decode(body["image"]) == alone[index])
    bad_ok = sum(1 for kind, index, status, body, _ in results if kind == "bad" and status == 400
                 and body.get("error", "").startswith(bad[index][1]) and "\n" not in body["error"])
    n_bad = len(results) - len(good)
    print(f"{name:>22} {len(results) / wall:>7.2f} {statistics.median(latencies) * 1e3:>8.0f} {p99 * 1e3:>8.0f}  "
          f"{max(batches):>5}  {dict(sorted(batches.items()))!s:<34} {identical}/{len(good)} identical to alone, "
          f"{bad_ok}/{n_bad} bad got 400 + reason")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--bad-share", type=float, default=0.2, help="share of bad requests")
    parser.add_argument("--residual-blocks", type=int, default=1, help="RN residual blocks (8 = the paper's)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.05)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per replica")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

    import ray
    from ray import serve

    good, bad = _requests()
    with tempfile.TemporaryDirectory(prefix="holefill-bench-") as tmp:
        tracking_uri = f"sqlite:///{tmp}/mlflow.db"
        mlflow_client(tracking_uri).create_experiment("bench", artifact_location=f"{tmp}/artifacts")
        tracker = RunTracker.start_or_resume(tracking_uri, "bench", "serving-load")
        torch.manual_seed(0)
        kwargs = {"residual_blocks": args.residual_blocks}
        generator = get_architecture("rn").generator(**kwargs).eval()
        example, mask = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
        mask[..., 8:20, 8:20] = 1
        serving = ServingDefaults(max_pixels=MAX_PIXELS, hires=HiresSettings(strategy="crop"))
        version = log_and_register_generator(tracking_uri, tracker.run_id, generator, example, mask, "bench",
                                             arch="rn", generator_kwargs=kwargs, serving=serving).version
        tracker.finish()
        mlflow_client(tracking_uri).set_registered_model_alias("bench", "champion", version)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": _REPO}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}/inpaint"
            print(f"RN ({args.residual_blocks} residual block(s)) on {'cuda' if torch.cuda.is_available() else 'cpu'}: "
                  f"{args.clients} clients x {args.requests} requests ({args.bad_share:.0%} bad), sizes {SIZES}, "
                  f"max batch {args.max_batch_size}, batch wait {args.batch_wait_timeout_s * 1e3:.0f} ms")
            print(f"{'max_ongoing_requests':>22} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}  {'max':>5}  "
                  f"{'batch sizes of good requests':<34} checks")
            alone: list[bytes] | None = None
            default = ServeJobConfig(max_batch_size=args.max_batch_size).ongoing_requests()
            for name, limit in ((f"5 (Ray Serve default)", 5), (f"{default} (2 x batch + 2)", None)):
                config = ServeJobConfig(model="bench", tracking_uri=tracking_uri, max_batch_size=args.max_batch_size,
                                     batch_wait_timeout_s=args.batch_wait_timeout_s, num_cpus=1, use_gpu="auto",
                                     max_ongoing_requests=limit)
                serve.run(build_app(config), name="bench", route_prefix="/inpaint")
                for payload in good[:2]:  # warm-up: first calls pay lazy initialisation
                    _call(url, payload)
                if alone is None:  # each good request served alone, one at a time
                    alone = []
                    for payload in good:
                        status, body, _ = _call(url, payload)
                        assert status == 200 and body["batch_size"] == 1, (status, body.get("error"))
                        alone.append(base64.b64decode(body["image"]))
                _report(name, _load(url, good, bad, args.clients, args.requests, args.bad_share, seed=1), alone, bad)
                serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
