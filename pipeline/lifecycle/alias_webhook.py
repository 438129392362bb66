"""Registry webhooks that tell serving an alias moved: the push path beside serving's polling.

MLflow (>= 3.3) POSTs a JSON event to a webhook's URL when a model version's alias is set or deleted. Pointed at
the Ray Serve app's admin refresh, ``POST <route>/-/refresh``, the event makes every replica re-resolve its alias
at once instead of within ``refresh_interval_s``. The refresh ignores the body and only re-reads the registry, so
an event for another model costs one registry read and a forged call can serve nothing but the registry's own
answer; the polling stays, so a lost delivery is caught up within the interval.

MLflow delivers only to ``https`` URLs that resolve to public addresses unless its *server* runs with
``MLFLOW_WEBHOOK_ALLOWED_SCHEMES`` naming ``http`` and ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true`` (an in-cluster
serving address is private): the local stack's loopback server sets both; for a production server see
``infra/README.md``. Webhooks need a database backend store (the local stack's SQLite, production's PostgreSQL).
"""

from __future__ import annotations

import urllib.parse

from pipeline.errors import one_line
from pipeline.tracking import mlflow_client

__all__ = ["ALIAS_EVENTS", "WEBHOOK_NAME", "check_refresh_url", "register_alias_webhook"]

WEBHOOK_NAME = "holefill-serving-refresh"
ALIAS_EVENTS = ("model_version_alias.created", "model_version_alias.deleted")


def check_refresh_url(url: str) -> None:
    """``ValueError`` unless ``url`` is an http(s) URL of a serving app's ``<route>/-/refresh``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"alias_webhook_url must be an http(s) URL with a host, got {url!r}")
    if not parts.path.rstrip("/").endswith("/-/refresh"):
        raise ValueError(f"alias_webhook_url must be the app's refresh endpoint (<route>/-/refresh), got {url!r}")


def register_alias_webhook(tracking_uri: str | None, refresh_url: str) -> str:
    """Make the registry at ``tracking_uri`` POST alias events to ``refresh_url``; returns the webhook's id.

    Idempotent: a webhook of this name already pointing at ``refresh_url`` is kept (re-activated and given both
    events if someone changed it), so every start of ``jobs/serve.py`` may call it.
    """
    check_refresh_url(refresh_url)
    from mlflow.exceptions import MlflowException  # lazy, as mlflow_client

    try:
        return _create_or_update(mlflow_client(tracking_uri), refresh_url)
    except MlflowException as exc:
        raise ValueError(f"the registry refused the alias webhook to {refresh_url}: {one_line(exc)} (an http or "
                         "private address needs MLFLOW_WEBHOOK_ALLOWED_SCHEMES=https,http and "
                         "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true on the MLflow server: infra/README.md)") from None


def _create_or_update(client, refresh_url: str) -> str:
    page_token = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=page_token)
        for webhook in page:
            if webhook.name == WEBHOOK_NAME and webhook.url == refresh_url:
                client.update_webhook(webhook.webhook_id, events=list(ALIAS_EVENTS), status="ACTIVE")
                return webhook.webhook_id
        page_token = page.token
        if not page_token:
            break
    description = "holefill serving: re-resolve the served alias at once when an alias moves"
    return client.create_webhook(name=WEBHOOK_NAME, url=refresh_url, events=list(ALIAS_EVENTS),
                                 description=description).webhook_id
