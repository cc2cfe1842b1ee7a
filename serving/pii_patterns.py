"""What PII masking looks for (serving/pii.py finds it): the patterns, over the byte view of the text
(one byte per character, digits in any script read as ASCII), and the checks of what they match (Luhn,
mod-97), for one span or for many at once.

Every repeat is bounded and every repeat above 64 is possessive (tests/test_serving_contract.py walks the
parsed patterns), so no attempt costs more than a bounded number of steps. ASCII classes, not \\w: in
Python \\w matches CJK characters, and Chinese text puts digits right after words (座机010-62345678).
"""

from __future__ import annotations

import re

import numpy as np

PII_PLACEHOLDERS = {"email": "[EMAIL]", "cn_id": "[CN_ID]", "card": "[BANK_CARD]", "phone": "[PHONE]",
                    "ip": "[IP]", "iban": "[IBAN]"}


def _compile(pattern: str) -> re.Pattern[bytes]:
    return re.compile(pattern.encode("ascii"))  # bytes: \d is [0-9], and the view is bytes


# Emails: a local part of 1-64 characters that starts a run of local-part characters, "@", a domain;
# and the emails glued to it ("a@b.co+c@d.co": the next local part starts with the "+" or "." after
# the domain, which a local part that starts a run cannot) are masked with it.
_EMAIL_LOCAL = r"A-Za-z0-9._%+\-"
_EMAIL_DOMAIN = r"@[A-Za-z0-9-]{1,63}+(?:\.[A-Za-z0-9-]{1,63}+){0,8}\.[A-Za-z]{2,24}+(?![A-Za-z0-9-])"
_EMAIL = _compile(rf"[{_EMAIL_LOCAL}](?<![{_EMAIL_LOCAL}][{_EMAIL_LOCAL}])[{_EMAIL_LOCAL}]{{0,63}}+{_EMAIL_DOMAIN}"
                  rf"(?:[._%+][{_EMAIL_LOCAL}]{{0,63}}+{_EMAIL_DOMAIN}){{0,100000}}+")
_EMAIL_SPLIT = re.compile(b"(%s)" % _EMAIL.pattern)  # split() gives the text between emails and each email

# IBAN: country, check digits, 11-30 alphanumerics, optionally in groups of 4; kept only if mod-97
# valid. A run of letters in which no IBAN starts is consumed at once.
_IBAN = r"(?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])"
_IBAN_PASS = _compile(rf"[A-Z](?:(?P<iban>{_IBAN})|(?P<rest>[A-Za-z]{{7,4095}}+))")
_IBAN_REACH = 45  # the longest IBAN match: 4 + 7 * 5 + 5 characters

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


def _digit_pass(long_run: list[str], short_run: list[str], single: list[str]) -> re.Pattern[bytes]:
    """A digit pass over named kinds, chosen by the length of the run's first group."""
    return _compile(
        r"[0-9](?:(?<![0-9]\d)(?:"
        rf"(?=\d{{9}})(?:{'|'.join(long_run)}|(?P<rest_long>\d{{9,4095}}+))"  # a run of 10+ digits
        rf"|(?=\d)(?:{'|'.join(short_run)})"  # 2-9 digits
        rf"|(?=[ .-])(?:{'|'.join(single)}))"  # one digit, then a separator
        r"|(?P<rest_run>\d{7,4095}+))")  # the rest of a run in which nothing started


# Kinds in the order the masking applied them one pass each; phone numbers come last, in their own
# pass, so that the placeholders of the other kinds bound them ("834-593-2689-[CN_ID]").
_DIGIT_PASS = _digit_pass(
    [f"(?P<cn_id>{_CN_ID})", f"(?P<mobile>{_MOBILE})", f"(?P<card>{_CARD})", f"(?P<phone10>{_PHONE10})"],
    [f"(?P<mobile_>{_MOBILE})", f"(?P<ip>{_IP_MULTI})", f"(?P<card_>{_CARD})"],
    [f"(?P<ip_>{_IP_SINGLE})", f"(?P<card__>{_CARD})"])
_DIGIT_REACH = 40  # the longest kind from its run's first digit: a card of 19 digits and 18 separators
# Kinds that may start inside a card-shaped span that failed the Luhn check ("55 13812345678"), or at
# its start ("4155550132 123"), or run on past its end ("... 0071 888-242.164.166.171"); serving/pii.py
# `_only_cards` tells the spans in which none can.
_INSIDE_CARD = _digit_pass([f"(?P<cn_id>{_CN_ID})", f"(?P<mobile>{_MOBILE})", f"(?P<phone10>{_PHONE10})"],
                           [f"(?P<mobile_>{_MOBILE})", f"(?P<ip>{_IP_MULTI})"], [f"(?P<ip_>{_IP_SINGLE})"])
_INSIDE_CARD_REACH = 20  # what starts inside a card-shaped span is at most 18 characters; lookarounds need 2 more
_CARD_DIGITS = _compile(r"\d(?:[ -]?\d){12,18}")
_PLUS86_MOBILE = _compile(r"\+86(?<![0-9]\+86)[ -]?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)")
_PHONE_PASS = _compile(
    r"[+(0-9](?:(?<![A-Za-z0-9_+][+(0-9])(?P<phone>"
    r"(?:(?<=\+)\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}"  # +country code, optional (area), first group
    r"|(?<=\()\d{1,4}\)[ .-]?\d{2,4}"  # (area) first group
    rf"|(?<=[0-9])\d{{1,3}}+){_PHONE_GROUPS})"  # a first group of 2-4 digits
    r"|(?<=[0-9])(?P<rest>\d{4,4095}+))")  # a run of 5+ digits: no phone starts in it
_PHONE_REACH = 45  # the longest phone match: 16 characters up to the first group, 3 groups of 9
_DATE = _compile(r"\d{4}([-./])\d{1,2}\1\d{1,2}")
PII_PATTERNS = (_EMAIL, _IBAN_PASS, _PLUS86_MOBILE, _DIGIT_PASS, _INSIDE_CARD, _PHONE_PASS)  # the scanners


# ---- checks -------------------------------------------------------------------------------------------
def _luhn_valid(digits: str | bytes, separators: bytes = b"") -> bool:
    """Luhn check of a string of ASCII digits and `separators`."""
    data = (digits.encode("ascii") if isinstance(digits, str) else digits).translate(None, separators)
    kept, doubled = data[-1::-2], data[-2::-2]
    return (sum(kept) - 48 * len(kept) + sum(doubled.translate(_DIGIT_DOUBLED))) % 10 == 0


def _stretch(view: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The characters the checks read, and the spans' places in them: the stretch of the view from the
    first span's start to the last one's end, or, where the spans cover less than a third of it, the
    spans alone, back to back."""
    low, high = int(starts.min()), int(ends.max())
    lengths = ends - starts
    total = int(lengths.sum())
    if 3 * total >= high - low:
        return view[low:high], starts - low, ends - low
    offsets = np.cumsum(lengths) - lengths
    positions = np.arange(total) + np.repeat(starts - offsets, lengths)
    return view[positions], offsets, offsets + lengths


def _table(mapping: dict[int, int]) -> bytes:
    """A bytes.translate table: each byte in `mapping` to its value, every other byte to 0."""
    table = bytearray(256)
    for byte, value in mapping.items():
        table[byte] = value
    return bytes(table)


_IS_DIGIT = _table({48 + d: 1 for d in range(10)})
_DIGIT_VALUE = _table({48 + d: d for d in range(10)})
_DIGIT_DOUBLED = _table({48 + d: v for d, v in enumerate([0, 2, 4, 6, 8, 1, 3, 5, 7, 9])})


def _read(codes: np.ndarray, table: bytes) -> np.ndarray:
    """Each byte through a translate table (one C pass, no index array)."""
    return np.frombuffer(codes.tobytes().translate(table), np.uint8)


def _prefix_sums(values: np.ndarray) -> np.ndarray:
    """0, then the running totals of `values` (int32 while they cannot overflow)."""
    sums = np.zeros(len(values) + 1, np.int32 if len(values) < 2**31 // 256 else np.int64)
    np.cumsum(values, dtype=sums.dtype, out=sums[1:])
    return sums


_NOT_DIGITS = bytes(byte for byte in range(256) if not 48 <= byte < 58)  # bytes.translate's delete
_LUHN_MAX_DIGITS = 28  # a span's Luhn sum, at most 9 per digit, stays below 256


def _luhn_valid_spans(view: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Luhn checks of many card-shaped spans (digits, spaces, dashes; each ends with a digit, holds at
    most 28 digits) at once, over the stretch of the view they lie in (see _luhn_valid_digit_spans)."""
    if not starts.size:
        return np.zeros(0, bool)
    codes, starts, ends = _stretch(view, starts, ends)
    digits_before = _prefix_sums(_read(codes, _IS_DIGIT))
    return _luhn_valid_digit_spans(codes.tobytes().translate(None, _NOT_DIGITS), digits_before[starts],
                                   digits_before[ends])


def _luhn_valid_digit_spans(digits: bytes, firsts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Luhn checks of the spans digits[firsts[i]:ends[i]] of a string of ASCII digits (at most 28 each)
    at once: counted from the right, every second digit is doubled (less 9 above 9), and the sum must end
    in 0. A span whose last digit has an even index sums `even_kept` (digits at even indices as they are,
    odd ones doubled), one whose last digit is odd sums `odd_kept`; each sum is a difference of prefix sums
    in uint8, which wrap mod 256 and so give every sum below 256 exactly: no per-digit work per span."""
    if not firsts.size:
        return np.zeros(0, bool)
    if int((ends - firsts).max()) > _LUHN_MAX_DIGITS:
        raise ValueError(f"a Luhn span holds more than {_LUHN_MAX_DIGITS} digits")
    codes, firsts, ends = _stretch(np.frombuffer(digits, np.uint8), firsts, ends)
    codes = codes.tobytes()
    values = np.frombuffer(codes.translate(_DIGIT_VALUE), np.uint8)
    doubled = np.frombuffer(codes.translate(_DIGIT_DOUBLED), np.uint8)
    even_kept, odd_kept = values.copy(), doubled.copy()
    even_kept[1::2], odd_kept[1::2] = doubled[1::2], values[1::2]
    sums = np.zeros((2, len(codes) + 1), np.uint8)
    np.cumsum(even_kept, dtype=np.uint8, out=sums[0, 1:])
    np.cumsum(odd_kept, dtype=np.uint8, out=sums[1, 1:])
    odd_last = (ends - 1) & 1
    return (sums[odd_last, ends] - sums[odd_last, firsts]) % 10 == 0


_IBAN_VALUE = _table({**{48 + d: d for d in range(10)}, **{65 + i: 10 + i for i in range(26)}})  # A=10 .. Z=35
_IBAN_SHIFT = _table({byte: 1 for byte in range(256)} | {48 + d: 10 for d in range(10)}  # digits: one place
                     | {65 + i: 100 for i in range(26)})  # letters: two
_IBAN_MAX_CHARS = 64  # an IBAN-shaped match holds at most 44


def _iban_valid_spans(view: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """mod-97 checks of many IBAN-shaped spans (two uppercase letters and two digits, then uppercase
    letters, digits and spaces; at most 64 characters) at once: without its spaces and with its first
    four characters moved to the end, letters read as 10-35, the span is a number that leaves 1.
    Horner's rule one column of characters at a time for all spans (a letter shifts the remainder by
    two decimal digits, a digit by one, a space or a place past the span's end leaves it as it is): only
    the spans' characters are read, and no step is per span."""
    if not starts.size:
        return np.zeros(0, bool)
    lengths = ends - starts
    width = int(lengths.max())
    if width > _IBAN_MAX_CHARS:
        raise ValueError(f"an IBAN-shaped span holds more than {_IBAN_MAX_CHARS} characters")
    padded = np.concatenate((view, np.full(width, ord(" "), np.uint8)))
    rows = np.lib.stride_tricks.sliding_window_view(padded, width)[starts]  # each span's characters, padded
    rows[np.arange(width) >= lengths[:, None]] = ord(" ")  # (a copy: the characters past each span's end)
    characters = rows.T.tobytes()  # column by column
    shifts = np.frombuffer(characters.translate(_IBAN_SHIFT), np.uint8).reshape(width, -1)
    values = np.frombuffer(characters.translate(_IBAN_VALUE), np.uint8).reshape(width, -1)
    remainder = np.zeros(len(starts), np.int32)
    for column in [*range(4, width), 0, 1, 2, 3]:  # the body, then the first four
        remainder = (remainder * shifts[column] + values[column]) % 97
    alphanumerics = (shifts > 1).sum(axis=0)
    return (alphanumerics >= 15) & (alphanumerics <= 34) & (remainder == 1)
