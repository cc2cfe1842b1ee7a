"""API-key checks and PII masking for the serving endpoints."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

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


# ---- PII masking -----------------------------------------------------------------------------------
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Mainland China resident ID: 6-digit region, birth date 18xx-20xx, 3-digit sequence, check digit/X.
_CN_ID = re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![0-9A-Za-z])")
# Card numbers: 13-19 digits, optionally grouped by spaces or dashes; kept only if Luhn-valid.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# Mainland mobile: 1[3-9] + 9 digits, optional +86 / 86 prefix, optional 3-4-4 grouping.
_CN_MOBILE = re.compile(r"(?<!\d)(?:\+?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)")
# Other phone numbers: optional +country code, then 7-15 digits in groups separated by space, dot,
# dash or parentheses (e.g. +1 (415) 555-0132, 415-555-0132, 010-62345678, +44 20 7946 0958).
# ASCII classes, not \w: in Python \w matches CJK characters, and Chinese text puts digits right
# after words (座机010-62345678).
_PHONE = re.compile(r"(?<![A-Za-z0-9_+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,8}){1,3}(?![A-Za-z0-9_]|[.-]\d)")
_DATE = re.compile(r"\d{4}([-./])\d{1,2}\1\d{1,2}")

PII_PLACEHOLDERS = {"email": "[EMAIL]", "cn_id": "[CN_ID]", "card": "[BANK_CARD]", "phone": "[PHONE]"}


def _luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _mask_cards(match: re.Match) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return PII_PLACEHOLDERS["card"] if _luhn_valid(digits) else match.group(0)


def _mask_phone(match: re.Match) -> str:
    if _DATE.fullmatch(match.group(0)):
        return match.group(0)
    digits = re.sub(r"\D", "", match.group(0))
    # Dates, versions and small numbers share the grouped-digits shape; real numbers have 7-15 digits.
    return PII_PLACEHOLDERS["phone"] if 7 <= len(digits) <= 15 else match.group(0)


def mask_pii(text: str) -> str:
    """Replace emails, Chinese ID-card numbers, Luhn-valid bank cards, Chinese mobiles and other phone
    numbers with placeholders like [EMAIL]. Order matters: an ID card would also look like a phone,
    and a +86 mobile like a card number."""
    text = _EMAIL.sub(PII_PLACEHOLDERS["email"], text)
    text = _CN_ID.sub(PII_PLACEHOLDERS["cn_id"], text)
    text = _CN_MOBILE.sub(PII_PLACEHOLDERS["phone"], text)
    text = _CARD.sub(_mask_cards, text)
    text = _PHONE.sub(_mask_phone, text)
    return text


class PiiMaskingFilter(logging.Filter):
    """A logging filter that masks PII in log records (installed on the serving logger when enabled)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask_pii(record.getMessage())
        record.args = ()
        return True
