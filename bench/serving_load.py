"""Load test of the Ray Serve app under a hostile mix: concurrent clients on 127.0.0.1 sending good requests of
several sizes beside hostile ones, against a clean run (good requests only) of the same replica, side by side.

A throwaway MLflow store (SQLite in a temp folder) gets a randomly initialised RN registered as ``champion`` with
small serving limits (200 000 pixels, whole up to 100 000, 4 windows an image); a local Ray starts Serve on a free
loopback port with a 2 MB body limit. Each client sends a fixed, seeded sequence. Good requests: distinct photos at
64, 96 and 128 px. Hostile ones (``--hostile-share``, 30 % by default): an oversized body (413), exotic formats
(TGA, EPS, DDS: 400), ``strategy: whole`` on an image over the whole cap (400), a window-explosion mask (a hole
every 12 px of a 440x440 image: served, in at most 4 windows), a decode bomb (a flat 6000x6000 PNG of a few KB:
400), malformed JSON (200 000 ``[``, a truncated body: 400). Printed per run: requests/s, the good requests'
p50/p99, the replica's peak memory (RSS, sampled every 50 ms) over its idle size, the hostile answers by status,
and the checks: every good answer byte-identical to the same request served alone (sent one at a time first),
every hostile one answered with its expected status within its deadline, and the replica process unchanged (no
restart). Bounded in count (clients x requests) and time (per-request timeout); loopback only.

    .venv/bin/python bench/serving_load.py                       # tiny RN, 8 clients x 25 requests
    .venv/bin/python bench/serving_load.py --clients 4 --requests 10 --residual-blocks 8

Targets: peak growth under 2 GiB with 8 clients, good p99 within 2x the clean run's, all good answers identical,
every hostile one a 4xx/503 (the window explosion: 200 within its deadline), no restart.

Measured (``--clients 8 --requests 10``, tiny RN, a quiet 2-core x86 VM):

         run   req/s   p50 ms   p99 ms   peak-idle  hostile by status   checks
       clean    6.96     1119     1780     465 MiB  {}                  80/80 identical, no restart
     hostile    7.65     1246     1660     620 MiB  {400: 15, 413: 4}   61/61 identical, 19/19 as expected

good p99 hostile / clean 0.93x (target <= 2x), peak growth 620 MiB (target < 2 GiB).

(Before this, the bench compared per-replica request limits: at Ray Serve's default of 5 a batch never exceeded
3; at holefill's 2 x batch + 2 batches reached 7 of the 8 clients in flight and p99 dropped by a third.)
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
import threading
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
MAX_WHOLE_PIXELS = 100_000
MAX_WINDOWS = 4
BODY_LIMIT = 2_000_000
TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 60.0


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
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


def _body(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def _requests() -> tuple[list[bytes], list[tuple[str, bytes, tuple[int, ...]]]]:
    """Distinct good bodies (3 sizes x 4 photos) and hostile ones: (name, body, the statuses it may get)."""
    good = [_body({"image": _b64(_png(_photo(size, seed))), "mask": _b64(_png(_hole(size, size, seed)))})
            for size in SIZES for seed in range(4)]
    mask64 = _b64(_png(_hole(64, 64, 0)))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n(/etc/passwd) (r) file\nshowpage\n%%EOF\n"
    dds = b"DDS " + (124).to_bytes(4, "little") + bytes(120)
    big = 440  # 193 600 pixels: under the pixel limit, over the whole cap
    scattered = np.zeros((big, big), np.uint8)
    scattered[::12, ::12] = 255
    flat = _png(np.zeros((6000, 6000), np.uint8))  # 36 MP in a few KB
    hostile = [
        ("oversized body", _body({"image": "A" * (BODY_LIMIT + 1000), "mask": mask64}), (413,)),
        ("TGA", _body({"image": _b64(_encoded(_photo(64, 0), "TGA")), "mask": mask64}), (400,)),
        ("EPS", _body({"image": _b64(eps), "mask": mask64}), (400,)),
        ("DDS", _body({"image": _b64(dds), "mask": mask64}), (400,)),
        ("whole on a large image", _body({"image": _b64(_png(_photo(big, 1))), "mask": _b64(_png(_hole(big, big, 1))),
                                          "strategy": "whole"}), (400,)),
        ("window explosion", _body({"image": _b64(_png(_photo(big, 2))), "mask": _b64(_png(scattered))}), (200,)),
        ("decode bomb", _body({"image": _b64(flat), "mask": _b64(flat)}), (400,)),
        ("deep JSON", b"[" * 200_000, (400,)),
        ("truncated JSON", b'{"image": "', (400,)),
    ]
    return good, hostile


def _call(url: str, body: bytes) -> tuple[int, dict, float]:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            status, answer = response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        raw = err.read() or b"{}"
        try:
            status, answer = err.code, json.loads(raw)
        except ValueError:
            status, answer = err.code, {"error": "NOT JSON: " + raw[:80].decode("latin-1")}
    except (ConnectionError, OSError) as exc:  # a body the server refused before reading it all
        status, answer = -1, {"error": f"connection: {exc}"}
    return status, answer, time.perf_counter() - started


def _replica_process():
    """The inpainter replica's process (Ray titles it ``ray::ServeReplica:<app>:inpainter``)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any("ServeReplica:bench:inpainter" in part for part in proc.info["cmdline"] or ()):
            return proc
    raise RuntimeError("no inpainter replica process found")


class PeakRss:
    """Samples a process's RSS every 50 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, proc) -> None:
        self.proc, self.peak, self._stop = proc, proc.memory_info().rss, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:  # the process went away: a restart, reported by the caller
                return

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _load(url: str, good: list[bytes], hostile: list, clients: int, per_client: int, hostile_share: float,
          seed: int) -> dict:
    """Every client's sequence, concurrently; returns what was answered."""
    plans = []
    for client in range(clients):
        rng = random.Random(seed * 1000 + client)
        plans.append([("hostile", rng.randrange(len(hostile))) if rng.random() < hostile_share
                      else ("good", rng.randrange(len(good))) for _ in range(per_client)])

    def run(plan):
        out = []
        for kind, index in plan:
            body = good[index] if kind == "good" else hostile[index][1]
            out.append((kind, index, *_call(url, body)))
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for client in pool.map(run, plans) for r in client]
    return {"results": results, "wall": time.perf_counter() - started}


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _report(name: str, load: dict, alone: list[bytes], hostile: list, idle: int, peak: int, restarted: bool) -> dict:
    results, wall = load["results"], load["wall"]
    good = [r for r in results if r[0] == "good"]
    latencies = [r[4] for r in good]
    identical = sum(1 for kind, index, status, body, _ in good
                    if status == 200 and base64.b64decode(body["image"]) == alone[index])
    bad = [r for r in results if r[0] == "hostile"]
    by_status = collections.Counter(status for _, _, status, _, _ in bad)
    expected = sum(1 for _, index, status, body, seconds in bad
                   if status in hostile[index][2] and seconds <= REQUEST_TIMEOUT_S
                   and ("image" in body or "\n" not in body.get("error", "\n")))
    row = {"p50": statistics.median(latencies), "p99": _p(latencies, 0.99)}
    print(f"{name:>8} {len(results) / wall:>7.2f} {row['p50'] * 1e3:>8.0f} {row['p99'] * 1e3:>8.0f} "
          f"{(peak - idle) / 2**20:>10.0f} MiB  {dict(sorted(by_status.items()))!s:<28} "
          f"{identical}/{len(good)} identical, {expected}/{len(bad)} hostile as expected, "
          f"{'RESTARTED' if restarted else 'no restart'}")
    for index, (label, _, statuses) in enumerate(hostile):
        seen = collections.Counter(status for _, i, status, _, _ in bad if i == index)
        if seen and set(seen) - set(statuses):
            print(f"{'':>8}   {label}: {dict(seen)}, expected {statuses}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--hostile-share", type=float, default=0.3, help="share of hostile requests")
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

    good, hostile = _requests()
    with tempfile.TemporaryDirectory(prefix="holefill-bench-") as tmp:
        tracking_uri = f"sqlite:///{tmp}/mlflow.db"
        mlflow_client(tracking_uri).create_experiment("bench", artifact_location=f"{tmp}/artifacts")
        tracker = RunTracker.start_or_resume(tracking_uri, "bench", "serving-load")
        torch.manual_seed(0)
        kwargs = {"residual_blocks": args.residual_blocks}
        generator = get_architecture("rn").generator(**kwargs).eval()
        example, mask = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
        mask[..., 8:20, 8:20] = 1
        serving = ServingDefaults(max_pixels=MAX_PIXELS, max_whole_pixels=MAX_WHOLE_PIXELS,
                                  request_timeout_s=REQUEST_TIMEOUT_S,
                                  hires=HiresSettings(strategy="crop", trigger=128, limit=128, margin=16,
                                                      max_windows=MAX_WINDOWS))
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
            config = ServeJobConfig(model="bench", tracking_uri=tracking_uri, max_batch_size=args.max_batch_size,
                                    batch_wait_timeout_s=args.batch_wait_timeout_s, num_cpus=1, use_gpu="auto",
                                    max_body_bytes=BODY_LIMIT, cache_dir=f"{tmp}/replica-cache")
            serve.run(build_app(config), name="bench", route_prefix="/inpaint")
            print(f"RN ({args.residual_blocks} residual block(s)) on {'cuda' if torch.cuda.is_available() else 'cpu'}: "
                  f"{args.clients} clients x {args.requests} requests, sizes {SIZES}, max batch {args.max_batch_size}, "
                  f"replica declares {config.replica_memory() / 2**30:.1f} GiB to Ray, in flight at most "
                  f"{config.inflight_limit(serving) / 2**30:.1f} GiB")
            for body in good[:2]:  # warm-up: first calls pay lazy initialisation
                _call(url, body)
            alone = []  # each good request served alone, one at a time
            for body in good:
                status, answer, _ = _call(url, body)
                assert status == 200 and answer["batch_size"] == 1, (status, answer.get("error"))
                alone.append(base64.b64decode(answer["image"]))
            replica = _replica_process()
            pid, idle = replica.pid, replica.memory_info().rss
            print(f"{'run':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'peak-idle':>14}  {'hostile by status':<28} "
                  "checks")
            rows = {}
            for name, share in (("clean", 0.0), ("hostile", args.hostile_share)):
                with PeakRss(replica) as rss:
                    load = _load(url, good, hostile, args.clients, args.requests, share, seed=1)
                restarted = _replica_process().pid != pid
                rows[name] = _report(f"{name}", load, alone, hostile, idle, rss.peak, restarted)
            print(f"good p99 hostile / clean: {rows['hostile']['p99'] / rows['clean']['p99']:.2f}x (target <= 2x); "
                  f"p50: {rows['hostile']['p50'] / rows['clean']['p50']:.2f}x")
            serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
