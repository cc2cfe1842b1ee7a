"""API-key checks for the serving endpoints, and the PII masking they use (serving/pii.py)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from serving.pii import PII_PATTERNS, PII_PLACEHOLDERS, mask_pii  # noqa: F401 (re-exported)
from serving.pii_patterns import _luhn_valid  # noqa: F401 (re-exported for tests)

logger = logging.getLogger("raylm.serving")


class ApiKeyConfigError(ValueError):
    """Keys are required but none were found; the message says where they are read from."""


@dataclass(frozen=True)
class AuthFailure:
    status: int  # 401: no credentials, 403: wrong credentials
    message: str


class ApiKeyGuard:
    """Bearer-token check against keys from an env var (comma-separated) and/or a file (one per line,
    '#' comments). Keys are kept only as SHA-256 digests and compared in constant time."""

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    @classmethod
    def from_sources(cls, env_var: str | None, file: str | None, required: bool) -> "ApiKeyGuard | None":
        """The guard, or None when no keys are configured and keys are not required."""
        keys: list[str] = []
        if env_var and os.environ.get(env_var):
            keys += [k.strip() for k in os.environ[env_var].split(",") if k.strip()]
        if file:
            path = Path(file).expanduser()
            if not path.is_file():
                raise ApiKeyConfigError(f"api_keys_file: {path} does not exist; create it or unset api_keys_file")
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    keys.append(line)
        if not keys:
            if required:
                raise ApiKeyConfigError(
                    f"no API keys found (env var {env_var!r}, file {file!r}) and require_api_key is true; "
                    f"set {env_var or 'api_keys_env'} to comma-separated keys, set api_keys_file, "
                    "or set require_api_key: false for a local-only endpoint"
                )
            return None
        return cls(keys)

    def check(self, authorization: str | None) -> AuthFailure | None:
        if not authorization:
            return AuthFailure(401, "missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return AuthFailure(401, "malformed Authorization header: expected 'Bearer <key>'")
        digest = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        return None if matched else AuthFailure(403, "invalid API key")


# ---- PII masking of streams and logs (what is masked: serving/pii.py) ---------------------------------
class StreamMasker:
    """Masks a text that arrives in pieces (a token stream): `feed` returns the masked text that is
    final so far. No pattern spans a newline, so masking line by line equals masking the whole text;
    the current line is held back until it ends or the stream does."""

    def __init__(self):
        self._held = ""

    def feed(self, piece: str, last: bool = False) -> str:
        self._held += piece
        cut = len(self._held) if last else self._held.rfind("\n") + 1
        ready, self._held = self._held[:cut], self._held[cut:]
        return mask_pii(ready) if ready else ""


class PiiMaskingFilter(logging.Filter):
    """A logging filter that masks PII in log records, exception tracebacks and stack info included
    (installed on the serving logger when pii_masking is on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask_pii(record.getMessage())
        record.args = ()
        if record.exc_info:
            # Exception messages carry inputs ("invalid literal ...: '13812345678'"): format the
            # traceback now, masked, so no handler formats the raw one later.
            record.exc_text = mask_pii(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = mask_pii(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_pii(record.stack_info)
        return True


def install_pii_log_filter(target: logging.Logger) -> None:
    """Add one PiiMaskingFilter to `target` (idempotent)."""
    if not any(isinstance(f, PiiMaskingFilter) for f in target.filters):
        target.addFilter(PiiMaskingFilter())
