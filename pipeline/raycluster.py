"""Connecting to Ray: the cluster a job was submitted to, else an embedded local one."""

from __future__ import annotations

from typing import Any

__all__ = ["ensure_ray"]


def ensure_ray(address: str | None = None) -> Any:
    """Initialise Ray once per process and return the ``ray`` module.

    ``address=None`` lets Ray follow its own convention: ``RAY_ADDRESS`` (set by ``ray job submit``) when
    present, else a fresh local instance. Workers' logs reach the driver's log.
    """
    # lazy: importing Ray takes seconds, paid only by the callers that start or join a cluster
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)
    return ray
