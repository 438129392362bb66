"""Secret redaction: credentials masked as ``***`` in anything about to be logged, printed or recorded.

Used wherever text leaves the process (MLflow params and tags, job logs, error messages): URL passwords,
``name=value`` pairs whose name looks secret, and values under secret-looking keys of mappings.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = ["REDACTED", "is_secret_name", "redact"]

REDACTED = "***"


# Both patterns start a match only where a run of their name characters starts (the look-behinds). Matches are
# the same as without them (a match inside a run extends to the run's start), but a long run that matches nothing
# is scanned once instead of once per character: a 10,000-character parameter took 19 s to redact without them.
# scheme://user:password@host -> scheme://user:***@host
_URL_USERINFO = re.compile(r"(?<![A-Za-z])(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/@\s:]*):(?P<secret>[^/@\s]+)@")
# name=value pairs in query strings / command lines whose name looks secret
_SECRET_ASSIGNMENT = re.compile(
    r"(?<![A-Za-z0-9_\-.])(?P<name>[A-Za-z0-9_\-.]*(?:secret|password|passwd|pwd|token|key|signature|credential)[A-Za-z0-9_\-]*)"
    r"(?P<sep>=|:\s*)(?P<value>[^&\s,;'\"]+)",
    re.IGNORECASE,
)
# Word parts of a key name that make its value secret ("aws_access_key_id" -> aws/access/key/id).
_SECRET_WORDS = frozenset({
    "secret", "secrets", "password", "passwd", "pwd", "token", "tokens", "key", "apikey", "credential",
    "credentials", "auth", "authorization", "signature", "passphrase", "privatekey", "accesskey", "secretkey",
})


def is_secret_name(name: str) -> bool:
    """True when a key (``aws_access_key_id``, ``storage_options.secret``, ``MLFLOW_TRACKING_TOKEN``) names a secret.

    Matching is on word parts (split at ``_ - . /`` and camelCase), so ``sort_keys`` or ``monkey`` are not secret.
    """
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name))
    words = {w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w}
    return bool(words & _SECRET_WORDS)


def redact(obj: Any) -> Any:
    """Return ``obj`` with credentials masked as ``***``; containers are copied, never modified in place.

    Strings: the password part of ``scheme://user:password@host`` and values of ``name=value`` pairs whose
    name looks secret. Mappings: every value under a secret-looking key (see :func:`is_secret_name`).
    Lists, tuples and sets are walked; other objects are returned unchanged.
    """
    if isinstance(obj, str):
        text = _URL_USERINFO.sub(lambda m: f"{m.group('head')}:{REDACTED}@", obj)
        return _SECRET_ASSIGNMENT.sub(lambda m: f"{m.group('name')}{m.group('sep')}{REDACTED}", text)
    if isinstance(obj, Mapping):
        return {
            key: (REDACTED if is_secret_name(str(key)) and value not in (None, "") else redact(value))
            for key, value in obj.items()
        }
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(redact(v) for v in obj)
    return obj
