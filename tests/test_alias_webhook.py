"""Registering serving's alias webhook: only the app's refresh endpoint, and a registry's refusal in one line.

The delivery itself (a real MLflow server calling a real Ray Serve app) is in tests/test_serving_ray.py."""

from __future__ import annotations

import pytest

from pipeline.lifecycle.alias_webhook import register_alias_webhook
from pipeline.lifecycle.serving import ServeJobConfig

pytest.importorskip("mlflow")


@pytest.mark.parametrize("url", ["http://serve.internal:8000/inpaint", "ftp://serve.internal/inpaint/-/refresh",
                                 "/inpaint/-/refresh"])
def test_only_an_http_url_of_the_refresh_endpoint_is_registered(url):
    with pytest.raises(ValueError, match="alias_webhook_url must be"):
        register_alias_webhook("sqlite:///unused.db", url)
    with pytest.raises(ValueError, match="alias_webhook_url must be"):  # refused where the serve config is read
        ServeJobConfig(alias_webhook_url=url)
    assert ServeJobConfig(alias_webhook_url="http://serve.internal:8000/inpaint/-/refresh").alias_webhook_url


def test_a_registry_that_refuses_http_targets_says_which_server_settings_allow_them(tmp_path, monkeypatch):
    # MLflow's defaults (https only, public addresses only) hold in this process's own store
    monkeypatch.delenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", raising=False)
    monkeypatch.delenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", raising=False)
    with pytest.raises(ValueError) as refused:
        register_alias_webhook(f"sqlite:///{tmp_path / 'mlflow.db'}", "http://127.0.0.1:8000/inpaint/-/refresh")
    message = str(refused.value)
    assert "\n" not in message and "refused the alias webhook" in message
    assert "MLFLOW_WEBHOOK_ALLOWED_SCHEMES=https,http" in message and "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true" in message
