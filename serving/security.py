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
# Linear by construction, and cheap per character on any input (issue 11 item 4: the old unbounded
# email pattern took 1.2 s for 40,000 "a"; the next version, nine bounded patterns applied one after
# another, took 0.5 s per MB of "1 1 1 ..." because each of them was tried at every digit):
# - a few passes, each entered only at the characters its kinds can start with (a pattern that begins
#   with a character class or a literal lets the regex engine skip every other position in C): emails
#   (local-part characters, only when the text holds an "@"), IBANs (uppercase letters), "+86" mobiles,
#   the other digit kinds (digits), phone numbers (digits, "+" and "(");
# - within the digit pass, one attempt per digit run: the run's start tries only the kinds its first
#   group fits (10+ digits, 2-9 digits, a single digit before a separator), and when none matches the
#   rest of the run is consumed at once (every kind refuses to start right after a digit);
# - every repeat is bounded, and every repeat with a bound above 64 is possessive (a test walks the
#   parsed patterns to check), so no attempt costs more than a bounded number of steps.
# re.ASCII: \d is [0-9] only. Lookbehinds placed after the first character say what may not precede
# it (`[0-9](?<![0-9]\d)` = a digit that starts a run). ASCII classes, not \w: in Python \w matches
# CJK characters, and Chinese text puts digits right after words (座机010-62345678).
_FLAGS = re.ASCII
PII_PLACEHOLDERS = {"email": "[EMAIL]", "cn_id": "[CN_ID]", "card": "[BANK_CARD]", "phone": "[PHONE]",
                    "ip": "[IP]", "iban": "[IBAN]"}

# Emails: a local part of 1-64 characters that starts a run of local-part characters, "@", a domain;
# and the emails glued to it ("a@b.co+c@d.co": the next local part starts with the "+" or "." after
# the domain, which a local part that starts a run cannot) are masked with it.
_EMAIL_LOCAL = r"A-Za-z0-9._%+\-"
_EMAIL_DOMAIN = r"@[A-Za-z0-9-]{1,63}+(?:\.[A-Za-z0-9-]{1,63}+){0,8}\.[A-Za-z]{2,24}+(?![A-Za-z0-9-])"
_EMAIL = re.compile(rf"[{_EMAIL_LOCAL}](?<![{_EMAIL_LOCAL}][{_EMAIL_LOCAL}])[{_EMAIL_LOCAL}]{{0,63}}+{_EMAIL_DOMAIN}"
                    rf"(?:[._%+][{_EMAIL_LOCAL}]{{0,63}}+{_EMAIL_DOMAIN}){{0,100000}}+", _FLAGS)

# IBAN: country, check digits, 11-30 alphanumerics, optionally in groups of 4; kept only if mod-97
# valid. A run of letters in which no IBAN starts is consumed at once.
_IBAN = r"(?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])"
_IBAN_PASS = re.compile(rf"[A-Z](?:(?P<iban>{_IBAN})|[A-Za-z]{{7,4095}}+)", _FLAGS)

# Digit kinds, each written as what follows the run's first digit (already consumed).
# Mainland China resident ID: 6-digit region, birth date 18xx-20xx, 3-digit sequence, check digit/X;
# the legacy 15-digit form: region, YYMMDD, 3-digit sequence. Not preceded or followed by a letter.
_CN_ID = (r"(?<![A-Za-z]\d)(?<=[1-9])(?:\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]"
          r"|\d{7}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3})(?![0-9A-Za-z])")
# Mainland mobile: 1[3-9] + 9 digits, optional 86 prefix (+86: _PLUS86_MOBILE), optional 3-4-4 grouping.
_MOBILE = r"(?:(?<=8)6[ -]?1|(?<=1))[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)"
# IPv4: four octets 0-255, not inside a longer dotted number. Atomic octets: a shorter octet would
# leave a digit where a dot or the end must follow, so never giving one back loses no address.
_OCTET = r"(?>25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IP_TAIL = rf"(?:\.{_OCTET}){{3}}(?![0-9]|\.[0-9])"
_IP_MULTI = rf"(?<!\.\d)(?>(?<=2)(?:5[0-5]|[0-4]\d|\d)?|(?<=1)\d\d?|(?<=[3-9])\d){_IP_TAIL}"  # first octet 2-3 digits
_IP_SINGLE = rf"(?<!\.\d){_IP_TAIL}"  # first octet 1 digit
# Card numbers: 13-19 digits, optionally grouped by spaces or dashes; kept only if Luhn-valid.
_CARD = r"(?<!-\d)(?:[ -]?\d){12,18}(?![\d-])"
# A bare 10-digit number (US-style phone without separators), not part of a longer word or number.
_PHONE10 = r"(?<![A-Za-z]\d)\d{9}(?![0-9A-Za-z])"
# Other phone numbers: optional +country code, then 7-15 digits in groups separated by space, dot,
# dash or parentheses (e.g. +1 (415) 555-0132, 415-555-0132, 010-62345678, +44 20 7946 0958).
_PHONE_GROUPS = r"(?:[ .-]\d{2,8}+){1,3}(?![A-Za-z0-9_]|[.-]\d)"


def _digit_pass(long_run: list[str], short_run: list[str], single: list[str]) -> re.Pattern:
    """A digit pass over named kinds, chosen by the length of the run's first group."""
    return re.compile(
        r"[0-9](?:(?<![0-9]\d)(?:"
        rf"(?=\d{{9}})(?:{'|'.join(long_run)}|\d{{9,4095}}+)"  # a run of 10+ digits
        rf"|(?=\d)(?:{'|'.join(short_run)})"  # 2-9 digits
        rf"|(?=[ .-])(?:{'|'.join(single)}))"  # one digit, then a separator
        r"|\d{7,4095}+)",  # the rest of a run in which nothing started
        _FLAGS)


# Kinds in the order the masking applied them one pass each; phone numbers come last, in their own
# pass, so that the placeholders of the other kinds bound them ("834-593-2689-[CN_ID]").
_DIGIT_PASS = _digit_pass(
    [f"(?P<cn_id>{_CN_ID})", f"(?P<mobile>{_MOBILE})", f"(?P<card>{_CARD})", f"(?P<phone10>{_PHONE10})"],
    [f"(?P<mobile_>{_MOBILE})", f"(?P<ip>{_IP_MULTI})", f"(?P<card_>{_CARD})"],
    [f"(?P<ip_>{_IP_SINGLE})", f"(?P<card__>{_CARD})"])
# Kinds that may start inside a card-shaped span that failed the Luhn check ("55 13812345678"), or at
# its start ("4155550132 123"), or run on past its end ("... 0071 888-242.164.166.171"), and the quick
# test for one: 10 digits, a mobile's 1[3-9] / 86 after a separator, 10 digits and a separator at the
# start, or a dot right after the span (an IPv4 address).
_INSIDE_CARD = _digit_pass([f"(?P<cn_id>{_CN_ID})", f"(?P<mobile>{_MOBILE})", f"(?P<phone10>{_PHONE10})"],
                           [f"(?P<mobile_>{_MOBILE})", f"(?P<ip>{_IP_MULTI})"], [f"(?P<ip_>{_IP_SINGLE})"])
_MAY_HOLD_ANOTHER = re.compile(r"[ -](?:\d{10}|1[3-9]|86)", _FLAGS)
_CARD_DIGITS = re.compile(r"\d(?:[ -]?\d){12,18}", _FLAGS)
_PLUS86_MOBILE = re.compile(r"\+86(?<![0-9]\+86)[ -]?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)", _FLAGS)
_PHONE_PASS = re.compile(
    r"[+(0-9](?:(?<![A-Za-z0-9_+][+(0-9])(?P<phone>"
    r"(?:(?<=\+)\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}"  # +country code, optional (area), first group
    r"|(?<=\()\d{1,4}\)[ .-]?\d{2,4}"  # (area) first group
    rf"|(?<=[0-9])\d{{1,3}}+){_PHONE_GROUPS})"  # a first group of 2-4 digits
    r"|(?<=[0-9])\d{4,4095}+)",  # a run of 5+ digits: no phone starts in it
    _FLAGS)
_DATE = re.compile(r"\d{4}([-./])\d{1,2}\1\d{1,2}", _FLAGS)
_ANY_DIGIT = re.compile(r"\d", _FLAGS)
PII_PATTERNS = (_EMAIL, _IBAN_PASS, _PLUS86_MOBILE, _DIGIT_PASS, _INSIDE_CARD, _MAY_HOLD_ANOTHER,
                _PHONE_PASS)  # the scanners

_LUHN_DOUBLED = bytes.maketrans(b"0123456789", bytes([0, 2, 4, 6, 8, 1, 3, 5, 7, 9]))
_IBAN_LETTERS = {ord(letter): str(value) for value, letter in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ", start=10)}


def _luhn_valid(digits: str, separators: bytes = b"") -> bool:
    """Luhn check of a string of ASCII digits and `separators` (sums in C: masking calls it once per
    card-shaped span)."""
    data = digits.encode("ascii").translate(None, separators)
    kept, doubled = data[-1::-2], data[-2::-2]
    return (sum(kept) - 48 * len(kept) + sum(doubled.translate(_LUHN_DOUBLED))) % 10 == 0


def _iban_valid(text: str) -> bool:
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    return int((compact[4:] + compact[:4]).translate(_IBAN_LETTERS)) % 97 == 1


def _phone_or_kept(text: str) -> str:
    digits = len(text.encode("ascii").translate(None, b" .-()+"))
    # Dates, versions and small numbers share the grouped-digits shape; real numbers have 7-15 digits.
    if not 7 <= digits <= 15 or (digits <= 8 and _DATE.fullmatch(text)):
        return text
    return PII_PLACEHOLDERS["phone"]


_FIXED = {"cn_id": PII_PLACEHOLDERS["cn_id"], "mobile": PII_PLACEHOLDERS["phone"], "mobile_": PII_PLACEHOLDERS["phone"],
          "phone10": PII_PLACEHOLDERS["phone"], "ip": PII_PLACEHOLDERS["ip"], "ip_": PII_PLACEHOLDERS["ip"]}


def _mask_match(match: re.Match) -> str:
    kind = match.lastgroup
    if kind is None:
        return match.group()  # a run consumed because nothing starts inside it
    text = match.group()
    if kind == "phone":
        return _phone_or_kept(text)
    return PII_PLACEHOLDERS["iban"] if _iban_valid(text) else text


class _PastTheSpan(Exception):
    """A kind found inside a card-shaped span runs on past its end (a sub callback cannot replace that)."""


def _mask_digit_match(match: re.Match) -> str:
    """re.sub callback of the digit pass (the common case: nothing runs on past a card-shaped span)."""
    kind = match.lastgroup
    if kind is None:
        return match.group()  # a run in which nothing starts
    placeholder = _FIXED.get(kind)
    if placeholder is not None:
        return placeholder
    replacement, stop = _mask_card_shaped(match.string, match.start(), match.end())
    if stop != match.end():
        raise _PastTheSpan
    return replacement


def _mask_digit_kinds(text: str) -> str:
    """The digit pass: ID cards, mobiles, IPv4 addresses, cards and bare 10-digit phones, leftmost
    first, in that order at one position. A card-shaped span may end inside another kind; then the
    scan resumes after that kind."""
    try:
        return _DIGIT_PASS.sub(_mask_digit_match, text)
    except _PastTheSpan:
        pass
    pieces, kept, pos = [], 0, 0
    while pos is not None:
        resume = None
        for match in _DIGIT_PASS.finditer(text, pos):
            kind = match.lastgroup
            if kind is None:
                continue
            start, end = match.span()
            placeholder = _FIXED.get(kind)
            if placeholder is None:
                placeholder, end = _mask_card_shaped(text, start, end)
            pieces += [text[kept:start], placeholder]
            kept = end
            if end > match.end():
                resume = end
                break
        pos = resume
    return "".join(pieces) + text[kept:]


def _mask_card_shaped(text: str, start: int, end: int) -> tuple[str, int]:
    """The masked text of a card-shaped span text[start:end] and where it stops (past `end` when a kind
    inside it runs on). The kinds masked before cards may start inside it (after a separator, or at its
    end: "0071 888-242.164.166.171"), a bare 10-digit phone at its start ("4155550132 123"); they are
    looked for in the full text, so lookarounds see the real neighbours."""
    span = text[start:end]
    if not (text.startswith(".", end) or (not span.isdigit() and (
            _MAY_HOLD_ANOTHER.search(span) or (span[10:11] in (" ", "-") and span[:10].isdigit())))):
        return (PII_PLACEHOLDERS["card"] if _luhn_valid(span, b" -") else span), end
    # What starts inside the span is at most 18 characters long; lookarounds need 2 more.
    inner = [found for found in _INSIDE_CARD.finditer(text, start, min(end + 20, len(text)))
             if found.lastgroup is not None and found.start() < end]
    pieces, kept = [], start
    if all(found.lastgroup == "phone10" for found in inner):  # nothing masked before cards
        if _luhn_valid(span, b" -"):
            return PII_PLACEHOLDERS["card"], end
    elif _is_card(before := text[start:inner[0].start()].rstrip(" -")):  # a card, then an ID card ...
        pieces.append(PII_PLACEHOLDERS["card"])
        kept = start + len(before)
    for found in inner:
        pieces += [text[kept:found.start()], _FIXED[found.lastgroup]]
        kept = found.end()
    return "".join(pieces) + text[kept:end], max(kept, end)


def _is_card(text: str) -> bool:
    return bool(_CARD_DIGITS.fullmatch(text)) and _luhn_valid(text, b" -")


def mask_pii(text: str) -> str:
    """Replace emails, IBANs, Chinese ID-card numbers (18 and legacy 15 digits), Chinese mobiles, IPv4
    addresses, Luhn-valid bank cards, bare 10-digit and other phone numbers with placeholders like
    [EMAIL]. Linear in the text length with a small constant on any input (benchmarks/pii_masking.py).
    Order matters: an IBAN holds digit groups, an ID card would also look like a phone or a card, an
    IPv4 address looks like a dotted phone number."""
    if "@" in text:
        text = _EMAIL.sub(PII_PLACEHOLDERS["email"], text)
    if not _ANY_DIGIT.search(text):
        return text  # every other kind holds digits
    text = _IBAN_PASS.sub(_mask_match, text)
    if "+86" in text:
        text = _PLUS86_MOBILE.sub(PII_PLACEHOLDERS["phone"], text)
    text = _mask_digit_kinds(text)
    return _PHONE_PASS.sub(_mask_match, text)


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
