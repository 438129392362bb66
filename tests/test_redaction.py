"""Secrets never leave the process: every form :func:`pipeline.redaction.redact` masks, listed one by one, what it
leaves alone, and that it stays linear on hostile input (a quadratic pattern once took 19 s on 10,000 characters)."""

from __future__ import annotations

import signal

import pytest

from pipeline.data.shardjob.config import ShardJobConfig
from pipeline.redaction import REDACTED, redact

FORMS = [
    # URL user-info, DSNs, token users
    ("https://bob:p4ssw0rd@example.com/list.txt", f"https://bob:{REDACTED}@example.com/list.txt"),
    ("postgresql://mlflow:pw@db:5432/mlflow", f"postgresql://mlflow:{REDACTED}@db:5432/mlflow"),
    ("redis://:hunter2@cache:6379/0", f"redis://:{REDACTED}@cache:6379/0"),
    ("https://0123456789abcdef0123456789abcdef@o1.ingest.sentry.io/2", f"https://{REDACTED}@o1.ingest.sentry.io/2"),
    # credential query parameters (presigned S3 / GCS / Azure SAS / OAuth)
    ("https://b.s3.amazonaws.com/l.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20240101"
     "&X-Amz-Date=20240101T000000Z&X-Amz-Signature=abc123&X-Amz-Security-Token=FQo",
     f"https://b.s3.amazonaws.com/l.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={REDACTED}"
     f"&X-Amz-Date=20240101T000000Z&X-Amz-Signature={REDACTED}&X-Amz-Security-Token={REDACTED}"),
    ("https://h/o?AWSAccessKeyId=AKIA&Signature=s%2Bg&Expires=1", f"https://h/o?AWSAccessKeyId={REDACTED}&Signature={REDACTED}&Expires=1"),
    ("https://a.blob.core.windows.net/c/x?sv=2020&sig=abc%3D&se=2024", f"https://a.blob.core.windows.net/c/x?sv=2020&sig={REDACTED}&se=2024"),
    ("https://api.example.com/x?access_token=ya29.a0&token=t&page=2", f"https://api.example.com/x?access_token={REDACTED}&token={REDACTED}&page=2"),
    # assignments: quoted values, spaces around the separator
    ('AWS_SECRET_ACCESS_KEY="abc def"', f'AWS_SECRET_ACCESS_KEY="{REDACTED}"'),
    ("aws_secret_access_key = abc", f"aws_secret_access_key = {REDACTED}"),
    ("password : 'q w'", f"password : '{REDACTED}'"),
    ("--aws_secret_access_key=xyz --steps=3", f"--aws_secret_access_key={REDACTED} --steps=3"),
    # JSON and repr keys
    ('{"secret": "s3cr3t", "n": 1}', f'{{"secret": "{REDACTED}", "n": 1}}'),
    ("{'password': 'pw', 'steps': 3}", f"{{'password': '{REDACTED}', 'steps': 3}}"),
    ('{"api_token":12345}', f'{{"api_token":{REDACTED}}}'),
    # headers
    ("Authorization: Bearer eyJhbGciOi.x.y", f"Authorization: Bearer {REDACTED}"),
    ("authorization=Basic dXNlcjpwYXNz", f"authorization=Basic {REDACTED}"),
    ("X-Api-Key: k-123", f"X-Api-Key: {REDACTED}"),
    # command-line flags
    ("run --password hunter2 --steps 3", f"run --password {REDACTED} --steps 3"),
    ("--api-token 'x y' --verbose", f"--api-token '{REDACTED}' --verbose"),
    # secrets in the URL path
    ("https://hooks.slack.com/services/T000/B000/XXXXXXXX", f"https://hooks.slack.com/services/{REDACTED}"),
    ("https://discord.com/api/webhooks/123456/abcDEF-ghi", f"https://discord.com/api/webhooks/123456/{REDACTED}"),
    ("https://api.telegram.org/bot123:AAHx/sendMessage", f"https://api.telegram.org/bot{REDACTED}"),
    ("https://acme.webhook.office.com/webhookb2/abc@def/IncomingWebhook/x/y",
     f"https://acme.webhook.office.com/webhookb2/{REDACTED}"),
]


@pytest.mark.parametrize("text,expected", FORMS, ids=[f"form{i}" for i in range(len(FORMS))])
def test_each_secret_form_is_masked(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent: a redacted line stays as it is


@pytest.mark.parametrize("text", [
    "s3://bucket/places2/v1/shard-000000.tar", "/data/places365_train_standard.txt", "a/abbey/00000000.jpg",
    "https://user@example.com/x", "lr=0.0001 steps=3", "--steps 3 --verbose", "http://127.0.0.1:8265",
])
def test_what_holds_no_secret_is_left_alone(text):
    assert redact(text) == text


def test_hostile_inputs_are_redacted_in_linear_time():
    """Each string is built to make a backtracking pattern quadratic; linear patterns take milliseconds, a quadratic
    one minutes, which the alarm turns into a failure (a bound on a hang, not a timing)."""
    hostile = [
        "x" * 200_000, "password=\"" * 20_000, "a=" * 100_000, " " * 200_000 + "=", "--" * 100_000,
        "a://:" * 40_000, '"' * 200_000, "key" + " " * 200_000 + "x", "'k'" * 60_000, "token:" * 30_000,
        "https://" + "a" * 200_000, "--password " * 20_000, "Authorization: Bearer " * 10_000,
        "hooks.slack.com/services/" * 8_000,
    ]

    def alarm(signum, frame):
        raise TimeoutError("redaction backtracks: a hostile string took more than 30 s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(30)
    try:
        for text in hostile:
            redact(text)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_shard_job_records_its_source_without_credentials():
    config = ShardJobConfig.model_validate({
        "source": {"url": "https://bob:p4ssw0rd@h/list.txt?X-Amz-Signature=abc&X-Amz-Credential=AKIA", "stat": False,
                   "root": "https://bob:p4ssw0rd@h/images"},
        "out": "/tmp/out", "parent": "https://h/v1/manifest.json?sig=zzz",
    })
    recorded = config.recorded()
    assert recorded["source"]["url"] == f"https://bob:{REDACTED}@h/list.txt?X-Amz-Signature={REDACTED}&X-Amz-Credential={REDACTED}"
    assert recorded["source"]["root"] == f"https://bob:{REDACTED}@h/images"
    assert recorded["parent"] == f"https://h/v1/manifest.json?sig={REDACTED}"
    assert "max_input_bytes" not in recorded  # at its default a version keeps the identity it always had
    assert ShardJobConfig.model_validate({**config.model_dump(), "max_input_bytes": 1024}).recorded()["max_input_bytes"] == 1024
