"""The Ray side of the shard job: one task per plan, bounded concurrency, progress, and failures in one line.

Tasks are retried by Ray as a whole (``task_retries``) when their worker dies or their reads kept failing
transiently (:class:`pipeline.fsutil.TransientReadError`); each task has already retried every read with
backoff and jitter. When a task still fails, the tasks still queued or running are cancelled and the job
stops with :class:`ShardJobError`: one line naming the object, the error and that a re-run resumes. Nothing
is published at that point (the manifest comes last), no input is recorded as rejected and no watermark moves.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from pipeline.errors import one_line
from pipeline.redaction import redact
from pipeline.fsutil import TransientReadError
from pipeline.raycluster import ensure_ray
from pipeline.data.shardjob.config import ShardJobConfig
from pipeline.data.shardjob.plan import FillPlan, ShardPlan, ShardResult

__all__ = ["Progress", "ShardJobError", "failure_line", "run_tasks"]


class ShardJobError(RuntimeError):
    """The shard job could not finish (storage kept failing); nothing was published. ``str()`` is one line."""


def failure_line(cause: BaseException, where: str) -> str:
    """The one-line message of a job stopped by ``cause`` while working on ``where``."""
    if isinstance(cause, TransientReadError):
        return (f"{cause} while writing {where}; nothing published, no input rejected: "
                f"re-run resumes (finished shards are reused)")
    return (f"{type(cause).__name__} while writing {where}: {redact(one_line(cause, 300))}; nothing published, "
            f"no input rejected: re-run resumes once the storage is readable")


class Progress:
    """Samples done, samples/s and ETA in the job log, updated as shard tasks complete."""

    def __init__(self, total_items: int, emit: Callable[[str], None]):
        self.total = total_items
        self.done = 0
        self.fresh = 0
        self.started = time.monotonic()
        self.emit = emit

    def update(self, result: ShardResult, shards_done: int, shards_total: int) -> None:
        self.done += result.planned
        if not result.reused:
            self.fresh += result.planned
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.fresh / elapsed
        remaining = self.total - self.done
        eta = f"{remaining / rate:.0f}s" if rate > 0 else "?"
        state = "reused" if result.reused else f"{result.samples} samples, {len(result.rejected)} rejected"
        self.emit(
            f"shard {result.name} {state} | shards {shards_done}/{shards_total} | "
            f"items {self.done}/{self.total} | {rate:.1f} samples/s | ETA {eta}"
        )


def run_tasks(
    plans: Sequence[ShardPlan | FillPlan], config: ShardJobConfig, progress: Progress, shards_total: int,
    shards_done_before: int, writer: Callable[..., ShardResult], *extra_args: Any,
) -> list[ShardResult]:
    """Run one Ray task ``writer(plan, *extra_args, config)`` per plan, bounded concurrency; results in plan order.

    A task that fails after its retries stops the job with :class:`ShardJobError` (I/O failures) or re-raises
    its error (anything else is a bug, and keeps its traceback); the other tasks are cancelled first.
    """
    if not plans:
        return []
    ray = ensure_ray()
    task = ray.remote(writer).options(num_cpus=config.num_cpus, max_retries=config.task_retries,
                                      retry_exceptions=[TransientReadError])
    extra_refs = [ray.put(arg) for arg in extra_args]
    config_ref = ray.put(config)
    limit = config.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1) / config.num_cpus))
    pending: dict[Any, ShardPlan | FillPlan] = {}
    results: dict[int, ShardResult] = {}
    queue = list(plans)
    done = shards_done_before
    while queue or pending:
        while queue and len(pending) < limit:
            plan = queue.pop(0)
            pending[task.remote(plan, *extra_refs, config_ref)] = plan
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            plan = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                for other in pending:
                    ray.cancel(other)
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                if isinstance(cause, (OSError, EOFError)):
                    raise ShardJobError(failure_line(cause, plan.name)) from None
                raise
            results[result.index] = result
            done += 1
            progress.update(result, done, shards_total)
    return [results[plan.index] for plan in plans]
