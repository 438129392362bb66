"""MLflow's own asynchronous logging vs holefill's RunTracker: cost on the training thread, and an outage.

    python bench/tracking.py                 # 400 steps x 8 metrics, outage of 40 steps

Both write to a real MLflow server on 127.0.0.1 (started here, SQLite store in a temp dir):

* ``mlflow async`` - ``MlflowClient.log_batch(run_id, metrics, synchronous=False)`` once per step (what
  ``mlflow.log_metrics(..., synchronous=False)`` does), then waiting on every returned operation;
* ``RunTracker`` - :meth:`pipeline.tracking.RunTracker.log_metrics` once per step, then ``flush``;
* ``mlflow sync`` - ``log_batch`` once per step, for reference.

Printed: microseconds per step spent on the calling (training) thread, and seconds until everything was on the
server. Then the outage: the same loggers point at a port where the server is down for the first steps and
comes up part way; printed is how many of the steps logged during the outage reach the server. (MLflow's HTTP
retries are set to 1 here, as a production client would find out after its retries ran out - minutes later.)
Numbers are from whatever machine runs this; the ratios are the point.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

from infra.local.mlflow_server import MlflowServerSettings, start_mlflow_server, stop_mlflow_server  # noqa: E402
from infra.local.ray_node import find_free_port_block  # noqa: E402


def _points(step: int, n: int):
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(f"m{k}", float(step * k), stamp, step) for k in range(n)]


def timed_loggers(uri: str, steps: int, n: int) -> dict[str, tuple[float, float]]:
    """name -> (caller µs per step, seconds until all delivered)."""
    from mlflow import MlflowClient

    from pipeline.tracking import RunTracker

    client = MlflowClient(uri)
    experiment = client.create_experiment(f"bench-{time.time_ns()}")
    results = {}
    for name in ("mlflow sync", "mlflow async", "RunTracker"):
        run_id = client.create_run(experiment).info.run_id
        tracker = RunTracker(MlflowClient(uri), run_id) if name == "RunTracker" else None
        operations = []
        started = time.perf_counter()
        caller = 0.0
        for step in range(steps):
            clock = time.perf_counter()
            if name == "RunTracker":
                tracker.log_metrics({f"m{k}": float(step * k) for k in range(n)}, step)
            else:
                op = client.log_batch(run_id, metrics=_points(step, n), synchronous=name == "mlflow sync")
                if op is not None:
                    operations.append(op)
            caller += time.perf_counter() - clock
        if tracker is not None:
            tracker.finish()
        for op in operations:
            op.wait()
        results[name] = (caller / steps * 1e6, time.perf_counter() - started)
        assert len(client.get_metric_history(run_id, "m1")) == steps, name
    return results


def outage(spec: MlflowServerSettings, workdir: Path, steps: int, outage_steps: int, n: int) -> dict[str, int]:
    """Points of metric ``m1`` on the server per logger when the first ``outage_steps`` steps hit a dead server."""
    from mlflow import MlflowClient

    from pipeline.tracking import RunTracker

    leader = start_mlflow_server(spec, workdir / "server.log", timeout_s=300)
    client = MlflowClient(spec.tracking_uri)
    experiment = client.create_experiment("outage")
    runs = {name: client.create_run(experiment).info.run_id for name in ("mlflow async", "RunTracker")}
    tracker = RunTracker(MlflowClient(spec.tracking_uri), runs["RunTracker"], flush_interval_s=0.5)
    stop_mlflow_server(leader)
    operations = []
    for step in range(steps):
        if step == outage_steps:
            leader = start_mlflow_server(spec, workdir / "server2.log", timeout_s=300)
        operations.append(client.log_batch(runs["mlflow async"], metrics=_points(step, n), synchronous=False))
        tracker.log_metrics({f"m{k}": float(step * k) for k in range(n)}, step)
        time.sleep(0.02)
    for op in operations:
        try:
            op.wait()
        except Exception:  # the failed batches of the outage
            pass
    tracker.finish()
    try:
        return {name: len(client.get_metric_history(run_id, "m1")) for name, run_id in runs.items()}
    finally:
        stop_mlflow_server(leader)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--metrics", type=int, default=8)
    parser.add_argument("--outage-steps", type=int, default=40)
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("mlflow.utils.async_logging").setLevel(logging.CRITICAL)  # one error per lost batch
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "0"
    with tempfile.TemporaryDirectory(prefix="hf-bench-tracking-") as tmp:
        workdir = Path(tmp)
        (port,) = find_free_port_block(1)
        spec = MlflowServerSettings(data_dir=workdir / "store", port=port)
        leader = start_mlflow_server(spec, workdir / "server0.log", timeout_s=300)
        try:
            timed = timed_loggers(spec.tracking_uri, args.steps, args.metrics)
        finally:
            stop_mlflow_server(leader)
        print(f"{args.steps} steps x {args.metrics} metrics to a local MLflow server")
        print(f"{'logger':<16}{'us/step on caller':>20}{'s to delivered':>16}")
        for name, (micro, total) in timed.items():
            print(f"{name:<16}{micro:>20.1f}{total:>16.2f}")
        print(f"ratio caller cost mlflow async / RunTracker: {timed['mlflow async'][0] / timed['RunTracker'][0]:.1f}x; "
              f"delivery time mlflow async / RunTracker: {timed['mlflow async'][1] / timed['RunTracker'][1]:.2f}x")
        arrived = outage(spec, workdir, args.steps // 4, args.outage_steps, args.metrics)
        total = args.steps // 4
        print(f"outage: server down for the first {args.outage_steps} of {total} steps, then up")
        for name, count in arrived.items():
            print(f"{name:<16}{count:>5} of {total} steps on the server ({total - count} lost)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
