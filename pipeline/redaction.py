"""Secret redaction: credentials masked as ``***`` in anything about to be logged, printed or recorded.

Used wherever text leaves the process (MLflow params and tags, job logs, error messages, a manifest's recorded
config and source description). What a string loses (each form is listed in ``tests/test_redaction.py``):

* URL user-info: ``scheme://bob:p4ss@host`` -> ``scheme://bob:***@host`` (DSNs such as ``postgresql://u:p@db``
  included), and a user part that is itself a token (20+ token characters, e.g. ``https://<key>@sentry.io``);
* ``name=value`` / ``name: value`` pairs whose name looks secret (``X-Amz-Signature``, ``X-Amz-Credential``,
  ``X-Amz-Security-Token``, ``Signature``, ``sig``, ``token``, ``access_token``, ``AWS_SECRET_ACCESS_KEY``,
  ``password``, ``auth``...), with spaces around the separator, quoted values (``"..."`` / ``'...'``) and quoted
  keys (JSON ``{"secret": "..."}``, Python reprs ``{'password': '...'}``);
* ``Authorization: Bearer xyz`` (and ``Basic``, ``Token``, ``Digest``...) -> ``Authorization: Bearer ***``;
* command-line flags ``--password x`` / ``--api-token "x"`` (``--password=x`` is a pair);
* URLs whose path is the secret: Slack and Microsoft Teams webhooks, Discord webhooks, Telegram bot tokens.

Mappings lose every value under a secret-looking key (:func:`is_secret_name`). Every pattern runs in linear time:
each can start only where a run of its characters starts, and no two of its parts can take the same characters
(a 100,000-character parameter is redacted in milliseconds; a quadratic pattern once took 19 s on 10,000).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = ["REDACTED", "is_secret_name", "redact"]

REDACTED = "***"

# scheme://user:password@host -> scheme://user:***@host. Starts only where a run of letters starts (look-behind).
_URL_USERINFO = re.compile(r"(?<![A-Za-z])(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/@\s:]*):(?P<secret>[^/@\s]+)@")
# scheme://<token>@host: a user part long and token-like enough to be a key (Sentry DSNs, git tokens).
_URL_TOKEN_USER = re.compile(r"(?<![A-Za-z])(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://)[A-Za-z0-9_\-]{20,}@")
# URLs whose path is the credential: everything after the fixed prefix goes.
_SECRET_PATHS = re.compile(
    r"(?P<head>hooks\.slack\.com/(?:services|workflows|triggers)/"
    r"|discord(?:app)?\.com/api/webhooks/[0-9]+/"
    r"|api\.telegram\.org/(?:file/)?bot"
    r"|\.webhook\.office\.com/webhookb2/)"
    r"[^\s\"'<>]+",
    re.IGNORECASE,
)
# name=value, name: value, "name": "value", 'name' = 'value', Authorization: Bearer value. The name starts where a
# run of name characters starts; the value is quoted (to its closing quote on the same line) or bare. A URL's
# "scheme://" is no pair (it would swallow the query's first parameter).
_ASSIGNMENT = re.compile(
    r"(?<![A-Za-z0-9_\-.])(?P<quote>[\"']?)(?P<name>[A-Za-z0-9_\-.]+)(?P=quote)(?P<sep>[ \t]*(?:=|:(?!//))[ \t]*)"
    r"(?P<scheme>(?i:bearer|basic|token|digest|bot|negotiate|aws4-hmac-sha256)[ \t]+)?"
    r"(?P<value>\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'|[^&?\s,;'\"{}\[\]()]+)"
)
# --password value, --api-token "value" (a flag's value is the next word that is not itself a flag).
_FLAG = re.compile(
    r"(?<![A-Za-z0-9_\-.])(?P<flag>--[A-Za-z0-9][A-Za-z0-9_\-.]*)(?P<sep>[ \t]+)"
    r"(?P<value>\"[^\"\n]*\"|'[^'\n]*'|[^\s\-\"'][^\s]*)"
)
# Names whose value is secret in a string: any containing one of these (the rule strings always had), or whose word
# parts say so (is_secret_name: "sig", "auth", "Authorization", "apiKey", ...).
_SECRET_SUBSTRING = re.compile(r"secret|password|passwd|pwd|token|key|signature|credential", re.IGNORECASE)
# Word parts of a key name that make its value secret ("aws_access_key_id" -> aws/access/key/id).
_SECRET_WORDS = frozenset({
    "secret", "secrets", "password", "passwd", "pwd", "token", "tokens", "key", "apikey", "credential",
    "credentials", "auth", "authorization", "signature", "passphrase", "privatekey", "accesskey", "secretkey",
    "sig", "dsn", "cookie",
})


def is_secret_name(name: str) -> bool:
    """True when a key (``aws_access_key_id``, ``storage_options.secret``, ``MLFLOW_TRACKING_TOKEN``) names a secret.

    Matching is on word parts (split at ``_ - . /`` and camelCase), so ``sort_keys`` or ``monkey`` are not secret.
    """
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name))
    words = {w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w}
    return bool(words & _SECRET_WORDS)


def _secret_in_text(name: str) -> bool:
    return bool(_SECRET_SUBSTRING.search(name)) or is_secret_name(name)


def _masked(value: str) -> str:
    """``***``, inside the value's own quotes when it had them."""
    return f"{value[0]}{REDACTED}{value[0]}" if value[:1] in ("\"", "'") else REDACTED


def _assignment(match: re.Match[str]) -> str:
    if not _secret_in_text(match.group("name")):
        return match.group(0)
    quote = match.group("quote")
    return (f"{quote}{match.group('name')}{quote}{match.group('sep')}{match.group('scheme') or ''}"
            f"{_masked(match.group('value'))}")


def _flag(match: re.Match[str]) -> str:
    if not _secret_in_text(match.group("flag").lstrip("-")):
        return match.group(0)
    return f"{match.group('flag')}{match.group('sep')}{_masked(match.group('value'))}"


def _redact_text(text: str) -> str:
    text = _URL_USERINFO.sub(lambda m: f"{m.group('head')}:{REDACTED}@", text)
    text = _URL_TOKEN_USER.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)
    text = _SECRET_PATHS.sub(lambda m: f"{m.group('head')}{REDACTED}", text)
    text = _ASSIGNMENT.sub(_assignment, text)
    return _FLAG.sub(_flag, text)


def redact(obj: Any) -> Any:
    """Return ``obj`` with credentials masked as ``***``; containers are copied, never modified in place.

    Strings: every form in the module docstring. Mappings: every value under a secret-looking key (see
    :func:`is_secret_name`). Lists, tuples and sets are walked; other objects are returned unchanged.
    """
    if isinstance(obj, str):
        return _redact_text(obj)
    if isinstance(obj, Mapping):
        return {
            key: (REDACTED if is_secret_name(str(key)) and value not in (None, "") else redact(value))
            for key, value in obj.items()
        }
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(redact(v) for v in obj)
    return obj
