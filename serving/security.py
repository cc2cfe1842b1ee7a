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
# Every pattern is bounded: no `+`, `*` or `{n,}` (a test walks the parsed patterns to check), and every
# one that could start inside a run of its own characters begins with a lookbehind that refuses to. So
# each start position costs a bounded amount of work and masking is linear in the text length (the old
# unbounded email pattern was quadratic: 1.2 s for 40,000 "a"). re.ASCII: \d is [0-9] only.
_FLAGS = re.ASCII
# Patterns start with a character class and check what precedes that first character with a lookbehind
# placed after it (`\d(?<![0-9A-Za-z]\d)` = a digit not preceded by a letter or digit): a leading class
# lets the regex engine skip every position that cannot start a match without trying the pattern.
# Emails are found from their "@": the domain by regex, the local part by a bounded scan backwards.
_EMAIL_DOMAIN = re.compile(r"@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}(?![A-Za-z0-9-])", _FLAGS)
_EMAIL_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_EMAIL_LOCAL_MAX = 64
# IBAN: country, check digits, 11-30 alphanumerics, optionally in groups of 4; kept only if mod-97 valid.
_IBAN = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])", _FLAGS)
# Mainland China resident ID: 6-digit region, birth date 18xx-20xx, 3-digit sequence, check digit/X;
# the legacy 15-digit form: region, YYMMDD, 3-digit sequence.
_CN_ID = re.compile(r"[1-9](?<![0-9A-Za-z][1-9])\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]"
                    r"(?![0-9A-Za-z])", _FLAGS)
_CN_ID15 = re.compile(r"[1-9](?<![0-9A-Za-z][1-9])\d{7}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}(?![0-9A-Za-z])", _FLAGS)
# Mainland mobile: 1[3-9] + 9 digits, optional +86 / 86 prefix, optional 3-4-4 grouping.
_CN_MOBILE = re.compile(r"[+81](?<![0-9][+81])(?:(?<=\+)86[ -]?1|(?<=8)6[ -]?1|(?<=1))[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)", _FLAGS)
_OCTET_REST = r"(?:(?<=2)(?:5[0-5]|[0-4]\d|\d)?|(?<=1)(?:\d\d?)?|(?<=[3-9])\d?|(?<=0))"  # after the first digit
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"\d(?<![0-9.]\d){_OCTET_REST}(?:\.{_OCTET}){{3}}(?![0-9]|\.[0-9])", _FLAGS)
# Card numbers: 13-19 digits, optionally grouped by spaces or dashes; kept only if Luhn-valid.
_CARD = re.compile(r"\d(?<![\d-]\d)(?:[ -]?\d){12,18}(?![\d-])", _FLAGS)
# A bare 10-digit number (US-style phone without separators), not part of a longer word or number.
_PHONE10 = re.compile(r"\d(?<![0-9A-Za-z]\d)\d{9}(?![0-9A-Za-z])", _FLAGS)
# Other phone numbers: optional +country code, then 7-15 digits in groups separated by space, dot,
# dash or parentheses (e.g. +1 (415) 555-0132, 415-555-0132, 010-62345678, +44 20 7946 0958).
# ASCII classes, not \w: in Python \w matches CJK characters, and Chinese text puts digits right
# after words (座机010-62345678).
_PHONE = re.compile(
    r"[+(0-9](?<![A-Za-z0-9_+][+(0-9])"  # first character, and what may not precede it
    r"(?:(?<=\+)\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}"  # +country code, optional (area), first group
    r"|(?<=\()\d{1,4}\)[ .-]?\d{2,4}"  # (area) first group
    r"|(?<=[0-9])\d{1,3})"  # a first group of 2-4 digits
    r"(?:[ .-]\d{2,8}){1,3}(?![A-Za-z0-9_]|[.-]\d)", _FLAGS)
_DATE = re.compile(r"\d{4}([-./])\d{1,2}\1\d{1,2}", _FLAGS)
PII_PATTERNS = (_EMAIL_DOMAIN, _IBAN, _CN_ID, _CN_ID15, _CN_MOBILE, _IPV4, _CARD, _PHONE10, _PHONE, _DATE)

PII_PLACEHOLDERS = {"email": "[EMAIL]", "cn_id": "[CN_ID]", "card": "[BANK_CARD]", "phone": "[PHONE]",
                    "ip": "[IP]", "iban": "[IBAN]"}


_ANY_DIGIT = re.compile(r"\d", _FLAGS)


def _mask_emails(text: str) -> str:
    pieces, kept_until = [], 0
    for match in _EMAIL_DOMAIN.finditer(text):
        at = match.start()
        start = at
        while start > kept_until and at - start <= _EMAIL_LOCAL_MAX and text[start - 1] in _EMAIL_LOCAL_CHARS:
            start -= 1
        local = at - start
        if local == 0 or local > _EMAIL_LOCAL_MAX or (start > kept_until and text[start - 1] in _EMAIL_LOCAL_CHARS):
            continue  # no local part, or a run too long to be one
        pieces += [text[kept_until:start], PII_PLACEHOLDERS["email"]]
        kept_until = match.end()
    return "".join(pieces) + text[kept_until:] if pieces else text


def _luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_valid(text: str) -> bool:
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _mask_iban(match: re.Match) -> str:
    return PII_PLACEHOLDERS["iban"] if _iban_valid(match.group(0)) else match.group(0)


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
    """Replace emails, IBANs, Chinese ID-card numbers (18 and legacy 15 digits), Chinese mobiles, IPv4
    addresses, Luhn-valid bank cards, bare 10-digit and other phone numbers with placeholders like
    [EMAIL]. Linear in the text length. Order matters: an ID card would also look like a phone or a
    card, an IBAN holds digit groups, an IPv4 address looks like a dotted phone number."""
    if "@" in text:
        text = _mask_emails(text)
    if not _ANY_DIGIT.search(text):
        return text  # every other kind holds digits
    text = _IBAN.sub(_mask_iban, text)
    text = _CN_ID.sub(PII_PLACEHOLDERS["cn_id"], text)
    text = _CN_ID15.sub(PII_PLACEHOLDERS["cn_id"], text)
    text = _CN_MOBILE.sub(PII_PLACEHOLDERS["phone"], text)
    text = _IPV4.sub(PII_PLACEHOLDERS["ip"], text)
    text = _CARD.sub(_mask_cards, text)
    text = _PHONE10.sub(PII_PLACEHOLDERS["phone"], text)
    text = _PHONE.sub(_mask_phone, text)
    return text


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
