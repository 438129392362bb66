"""Serve the champion over HTTP with Ray Serve, following the alias as it moves.

    python jobs/serve.py                                   # models:/lbam@champion on http://127.0.0.1:8000/inpaint
    python jobs/serve.py --model rn --set use_gpu=false --set port=8080
    serve run pipeline.lifecycle.serving:app_builder config=jobs/configs/serve.yaml   # Ray's own CLI, same app

Requests: ``POST /inpaint`` with JSON ``{"image": base64 PNG/JPEG, "mask": base64 PNG (255 = hole), "strategy":
"crop" | "whole" (optional)}``; the answer holds the inpainted PNG (base64) and the ``model_version`` that made
it; a refused request gets HTTP 400 (bad input, a format outside PNG/JPEG/WebP, over a pixel limit, ``whole`` over
``max_whole_pixels``), 413 (body over ``max_body_bytes``), 503 with ``Retry-After`` (replica full:
``max_inflight_bytes``) or 504 (past ``request_timeout_s``), each JSON with a one-line ``error`` (only that request:
the others batched with it are answered). The limits and the large-photo windows are the served version's own
serving defaults unless the config overrides them; README "Serving a model" lists them. A replica keeps a local
copy of the version it serves (``cache_dir``) and starts from it while the registry is down.
``POST /inpaint/-/refresh`` re-resolves the alias at once on every replica (it is re-resolved every
``refresh_interval_s`` anyway; ``alias_webhook_url`` makes the registry call it when an alias moves);
``GET /inpaint/-/version`` names the version of every replica. Connects to the
Ray cluster in ``RAY_ADDRESS`` (else starts a local one) and runs until interrupted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ray
from ray import serve

from pipeline.jobcli import Flag, run_job
from pipeline.lifecycle.alias_webhook import register_alias_webhook
from pipeline.lifecycle.serving import ServeJobConfig, build_app
from pipeline.tracking import check_tracking_server, resolve_tracking_uri

FLAGS = {
    "model": Flag("model", "registered model name to serve (default lbam)"),
    "alias": Flag("alias", "alias to follow (default champion)"),
    "port": Flag("port", "HTTP port of the Ray Serve proxy", options={"type": int}),
}


def serve_champion(config: ServeJobConfig) -> int:
    """Start Ray Serve and the application, then block until interrupted."""
    config.tracking_uri = resolve_tracking_uri(config.tracking_uri, os.environ)
    check_tracking_server(config.tracking_uri)
    if config.alias_webhook_url:
        webhook = register_alias_webhook(config.tracking_uri, config.alias_webhook_url)
        print(f"serve: the registry calls {config.alias_webhook_url} when an alias moves (webhook {webhook})")
    ray.init(log_to_driver=True)  # the cluster in RAY_ADDRESS (or the one `ray job submit` ran us on), else local
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    return run_job("serve", __doc__, ServeJobConfig, serve_champion, argv, FLAGS,
                   default_config=str(Path(__file__).resolve().parent / "configs" / "serve.yaml"))


if __name__ == "__main__":
    sys.exit(main())
