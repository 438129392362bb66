"""Serving overhead: the Ray Serve app (HTTP, JSON + base64, batching, alias following) against the same work
in-process (decode, generator, encode), at 256² and 512², side by side in one run.

A throwaway MLflow store (SQLite in a temp folder) gets a randomly initialised generator registered as
``champion``; a local Ray starts Serve on a free loopback port. Per size it prints requests/s, p50 and p99
latency for both, and the ratios (served / in-process). Compare ratios, not absolute times across machines.

    .venv/bin/python bench/serving.py                                  # RN, 16 requests, 4 in flight
    .venv/bin/python bench/serving.py --arch lbam --requests 64 --concurrency 8 --max-batch-size 8
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

# Run as a script, this file's folder leads sys.path and its name would shadow nothing, but keep bench/ out anyway.
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH_DIR]
_REPO = os.path.dirname(_BENCH_DIR)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from models.registry import get_architecture  # noqa: E402
from pipeline.lifecycle.packaging import HiresSettings, log_and_register_generator  # noqa: E402
from pipeline.lifecycle.serving import AliasFollowingInpainter, ServeJobConfig, build_app  # noqa: E402
from pipeline.tracking import RunTracker, mlflow_client  # noqa: E402

SIZES = (256, 512)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _payload(size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    hole = np.zeros((size, size), np.uint8)
    hole[size // 4: size // 2, size // 3: 2 * size // 3] = 255
    return {"image": base64.b64encode(_png(pixels)).decode(), "mask": base64.b64encode(_png(hole)).decode()}


def _stats(latencies: list[float], wall: float) -> dict[str, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"rps": len(latencies) / wall, "p50": statistics.median(ordered), "p99": p99}


def _in_process(inpainter: AliasFollowingInpainter, payloads: list[dict]) -> dict[str, float]:
    latencies = []
    started = time.perf_counter()
    for payload in payloads:
        t0 = time.perf_counter()
        inpainter.run_batch([inpainter.decode(payload)])
        latencies.append(time.perf_counter() - t0)
    return _stats(latencies, time.perf_counter() - started)


def _served(url: str, payloads: list[dict], concurrency: int) -> dict[str, float]:
    def call(payload: dict) -> float:
        t0 = time.perf_counter()
        request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            json.loads(response.read())
        return time.perf_counter() - t0

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(call, payloads))
    return _stats(latencies, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="rn", choices=("rn", "lbam"))
    parser.add_argument("--requests", type=int, default=16, help="requests per size and path")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight against Ray Serve")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.02)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in-process and per replica")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    torch.set_num_threads(args.threads)

    import ray
    from ray import serve

    with tempfile.TemporaryDirectory(prefix="holefill-bench-") as tmp:
        tracking_uri = f"sqlite:///{tmp}/mlflow.db"
        mlflow_client(tracking_uri).create_experiment("bench", artifact_location=f"{tmp}/artifacts")
        tracker = RunTracker.start_or_resume(tracking_uri, "bench", "serving")
        torch.manual_seed(0)
        generator = get_architecture(args.arch).generator().eval()
        example = torch.rand(1, 3, 128, 128)
        mask = torch.zeros(1, 1, 128, 128)
        mask[..., 32:96, 32:96] = 1
        version = log_and_register_generator(tracking_uri, tracker.run_id, generator, example, mask, "bench",
                                             arch=args.arch).version
        tracker.finish()
        mlflow_client(tracking_uri).set_registered_model_alias("bench", "champion", version)
        # Whole-image path at both sizes: the bench measures serving overhead, not the high-resolution strategy.
        config = ServeJobConfig(model="bench", tracking_uri=tracking_uri, max_batch_size=args.max_batch_size,
                             batch_wait_timeout_s=args.batch_wait_timeout_s, num_cpus=1, use_gpu="auto",
                             hires=HiresSettings(strategy="whole"))
        inpainter = AliasFollowingInpainter(config, "cuda" if torch.cuda.is_available() else "cpu")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # Replicas import this checkout's pipeline package, whatever else the interpreter has installed.
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": _REPO}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(config), name="bench", route_prefix="/inpaint")
            url = f"http://127.0.0.1:{port}/inpaint"
            print(f"{args.arch} on {'cuda' if torch.cuda.is_available() else 'cpu'}: {args.requests} requests per "
                  f"size, {args.concurrency} in flight to Ray Serve (max batch {args.max_batch_size}), "
                  f"in-process sequential")
            print(f"{'size':>6} {'path':>11} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9}")
            for size in SIZES:
                payloads = [_payload(size, seed) for seed in range(args.requests)]
                _served(url, payloads[:2], 2)  # warm-up: first batches pay lazy initialisation
                inpainter.run_batch([inpainter.decode(payloads[0])])
                local = _in_process(inpainter, payloads)
                served = _served(url, payloads, args.concurrency)
                for name, row in (("in-process", local), ("ray serve", served)):
                    print(f"{size:>5}² {name:>11} {row['rps']:>8.2f} {row['p50'] * 1e3:>9.1f} {row['p99'] * 1e3:>9.1f}")
                print(f"{size:>5}² {'ratio':>11} {served['rps'] / local['rps']:>7.2f}x "
                      f"{served['p50'] / local['p50']:>8.2f}x {served['p99'] / local['p99']:>8.2f}x   (served / in-process)")
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
