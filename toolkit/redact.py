"""Secrets out of anything written: URLs with credentials, secret-looking query parameters.

One place, so recipe.yaml, manifests, MLflow params, log lines, error messages and the gateway all redact
the same way. Import cost: stdlib only.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Query parameters that carry credentials in the wild (OpenAI-compatible proxies, Azure, S3 presigned URLs, ...).
SECRET_PARAMS = frozenset({
    "api_key", "apikey", "api-key", "key", "token", "access_token", "auth", "authorization", "password",
    "passwd", "secret", "client_secret", "sig", "signature", "x-amz-signature", "x-amz-credential",
    "x-amz-security-token", "code",
})

# A URL with userinfo anywhere in free text (error lines, log messages).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """`http://user:pw@host/v1?api_key=x&a=1` -> `http://***@host/v1?api_key=***&a=1`; other strings unchanged."""
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port; then fall back to the regex below
    except ValueError:
        return re.sub(r"://\S*@", f"://{MASK}@", url)  # up to the last '@': a password may hold '/', '#', '?'
    netloc = parts.netloc
    if "@" in netloc:
        host = parts.hostname or ""
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        netloc = f"{MASK}@{host}" + (f":{port}" if port is not None else "")
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL inside a free-text line redacted (for error messages and log records)."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: _redact_match(m.group(0)), text)


def _redact_match(url: str) -> str:
    """Sentence punctuation after a URL ("...?x=1: error") is not part of it; keep it out of the query."""
    core = url.rstrip(".,;:!?)]}")
    return redact_url(core) + url[len(core):]


def redact_data(obj: Any) -> Any:
    """A copy of plain data (dict/list/scalars) with every string that holds a URL redacted."""
    if isinstance(obj, dict):
        return {k: redact_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_data(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj
