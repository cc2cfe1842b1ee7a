"""PII masking for serving's prompts, outputs and logs: emails, IBANs, Chinese ID-card and mobile numbers,
IPv4 addresses, bank cards and phone numbers are replaced by placeholders like [EMAIL].

How it stays fast on any input (issue 11 item 4; `python -m benchmarks.pii_masking` times 1 MB of 28
adversarial shapes against 100 ms):
- The patterns read a byte view of the text, one byte per character (`_view`): ASCII as is, every Unicode
  decimal digit (full-width ０-９, Arabic-Indic, Devanagari, ...) as its ASCII digit, full-width forms and
  the ideographic space as their ASCII counterparts, anything else as 0x80, which no pattern's class holds.
  Indices are the text's, so spans found in the view are cut from the original text.
- Passes in a fixed order (emails, IBANs, +86 mobiles, the digit kinds, phone numbers); a span masked by
  one pass reads as "[###]" to the later ones, as its placeholder would.
- numpy finds, for the IBAN, digit and phone passes, the positions where their kinds can start or end
  (from the digit runs: lengths, the characters around them, the digits a card-shaped chain of groups
  holds), and the regex runs only in windows around those positions: text where nothing can match costs
  a few vectorized operations per character, not an attempt of each pattern at each digit.
- Every repeat is bounded and every repeat above 64 is possessive (a test walks the parsed patterns), so
  no attempt costs more than a bounded number of steps.
- Luhn checks of all card-shaped spans and digit counts of all phone-shaped spans run vectorized at once.
ASCII classes, not \\w: in Python \\w matches CJK characters, and Chinese text puts digits right after
words (座机010-62345678).
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import re
import unicodedata

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
# its start ("4155550132 123"), or run on past its end ("... 0071 888-242.164.166.171"), and the quick
# test for one: 10 digits, a mobile's 1[3-9] / 86 after a separator, 10 digits and a separator at the
# start, or a dot right after the span (an IPv4 address).
_INSIDE_CARD = _digit_pass([f"(?P<cn_id>{_CN_ID})", f"(?P<mobile>{_MOBILE})", f"(?P<phone10>{_PHONE10})"],
                           [f"(?P<mobile_>{_MOBILE})", f"(?P<ip>{_IP_MULTI})"], [f"(?P<ip_>{_IP_SINGLE})"])
_INSIDE_CARD_REACH = 20  # what starts inside a card-shaped span is at most 18 characters; lookarounds need 2 more
_MAY_HOLD_ANOTHER = _compile(r"[ -](?:\d{10}|1[3-9]|86)")
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
PII_PATTERNS = (_EMAIL, _IBAN_PASS, _PLUS86_MOBILE, _DIGIT_PASS, _INSIDE_CARD, _MAY_HOLD_ANOTHER,
                _PHONE_PASS)  # the scanners
# A window's scan reads this far past its last possible start: more than any match (the "rest of a run"
# consumers aside, which mask nothing) and its lookahead, so it sees what a scan of the whole text sees.
_MARGIN = 72
_MERGE_GAP = 64  # windows closer than this are scanned as one

# ---- the byte view ------------------------------------------------------------------------------------
_OTHER = 0x80  # a character outside every pattern's classes


@functools.cache
def _normalization() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The byte each BMP code point reads as, and the supplementary-plane digits with their bytes."""
    every_character = "".join(map(chr, range(0x80, 0x110000)))
    mapped = {ord(digit): 0x30 + unicodedata.decimal(digit)  # str patterns' \d: every Unicode decimal digit
              for digit in re.findall(r"\d", every_character)}
    mapped.update({cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)})  # full-width ！..～ -> ASCII ! .. ~
    mapped[0x3000] = 0x20  # ideographic space
    bmp = np.full(0x10000, _OTHER, np.uint8)
    bmp[:0x80] = np.arange(0x80, dtype=np.uint8)
    for cp, byte in mapped.items():
        if cp < 0x10000:
            bmp[cp] = byte
    astral = sorted((cp, byte) for cp, byte in mapped.items() if cp >= 0x10000)
    return bmp, np.array([cp for cp, _ in astral], np.uint32), np.array([b for _, b in astral], np.uint8)


def _view(text: str) -> np.ndarray:
    """The text as the patterns read it: one byte per character (see the module docstring)."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), np.uint8)
    bmp, astral_cps, astral_bytes = _normalization()
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    view = bmp[np.minimum(cps, 0xFFFF)]
    astral = np.flatnonzero(cps > 0xFFFF)
    if astral.size:
        at = np.minimum(np.searchsorted(astral_cps, cps[astral]), len(astral_cps) - 1)
        hit = astral_cps[at] == cps[astral]
        view[astral[hit]] = astral_bytes[at[hit]]
    return view


def _in(codes: np.ndarray, chars: bytes) -> np.ndarray:
    found = codes == chars[0]
    for char in chars[1:]:
        found |= codes == char
    return found


def _in_lengths(lengths: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    found = lengths == values[0]
    for value in values[1:]:
        found |= lengths == value
    return found


def _is_digit(codes: np.ndarray) -> np.ndarray:
    return (codes - 48).astype(np.uint8) < 10


class _DigitRuns:
    """The maximal runs of ASCII digits in the view: where each starts and ends, and the bytes around it
    (0 past either end of the text)."""

    def __init__(self, view: np.ndarray):
        padded = np.zeros(len(view) + 4, np.uint8)
        padded[1:-3] = view
        digit = _is_digit(padded)
        edges = np.flatnonzero(digit[1:] != digit[:-1])
        self.starts, self.ends = edges[0::2], edges[1::2]
        self.lengths = self.ends - self.starts
        self.before = padded[self.starts]  # padded[i + 1] is view[i]
        self.first, self.second = padded[self.starts + 1], padded[self.starts + 2]
        self.after, self.after2, self.after3 = padded[self.ends + 1], padded[self.ends + 2], padded[self.ends + 3]
        self.third = padded[np.minimum(self.starts + 3, len(padded) - 1)]


# ---- checks -------------------------------------------------------------------------------------------
_LUHN_DOUBLED = bytes.maketrans(b"0123456789", bytes([0, 2, 4, 6, 8, 1, 3, 5, 7, 9]))
_LUHN_DOUBLED_ARRAY = np.array([0, 2, 4, 6, 8, 1, 3, 5, 7, 9], np.int32)


def _luhn_valid(digits: str | bytes, separators: bytes = b"") -> bool:
    """Luhn check of a string of ASCII digits and `separators`."""
    data = (digits.encode("ascii") if isinstance(digits, str) else digits).translate(None, separators)
    kept, doubled = data[-1::-2], data[-2::-2]
    return (sum(kept) - 48 * len(kept) + sum(doubled.translate(_LUHN_DOUBLED))) % 10 == 0


def _span_positions(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every position inside the spans, and the index of its span."""
    lengths = ends - starts
    span = np.repeat(np.arange(len(starts)), lengths)
    return np.arange(int(lengths.sum())) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths), span


def _luhn_valid_spans(view: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Luhn checks of many card-shaped spans (digits, spaces, dashes) at once: counted from the right,
    every second digit is doubled (less 9 above 9), and the sum must end in 0."""
    positions, span = _span_positions(starts, ends)
    values = view[positions].astype(np.int64) - 48
    digit = values >= 0
    values, span = values[digit], span[digit]
    length = np.bincount(span, minlength=len(starts))
    from_right = (np.cumsum(length) - 1)[span] - np.arange(len(values))  # 0 for each span's last digit
    summed = np.where(from_right % 2 == 1, _LUHN_DOUBLED_ARRAY[values], values)
    return np.bincount(span, weights=summed, minlength=len(starts)) % 10 == 0


_POW10_MOD97 = np.array([pow(10, k, 97) for k in range(80)], np.int64)


def _iban_valid_spans(view: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """mod-97 checks of many IBAN-shaped spans (uppercase letters, digits, spaces) at once: without its
    spaces and with its first four characters moved to the end, letters read as 10-35, the span is a
    number that leaves 1. Each character adds its value times 10**(digits after it) mod 97."""
    positions, span = _span_positions(starts, ends)
    chars = view[positions]
    kept = chars != ord(" ")
    chars, span = chars[kept].astype(np.int64), span[kept]
    length = np.bincount(span, minlength=len(starts))
    first = np.cumsum(length) - length
    rank = np.arange(len(chars)) - first[span]
    moved = np.where(rank >= 4, rank - 4, rank + length[span] - 4)  # position after the move
    order = np.lexsort((moved, span))
    chars, span = chars[order], span[order]
    letter = chars >= ord("A")
    value = np.where(letter, chars - 55, chars - 48)
    width = np.where(letter, 2, 1)
    through = np.cumsum(width)  # decimal digits up to and including each character, over all spans
    digits_after = through[(first + length - 1)[span]] - through
    remainder = np.bincount(span, weights=value * _POW10_MOD97[digits_after] % 97, minlength=len(starts)) % 97
    return (length >= 15) & (length <= 34) & (remainder == 1)


# ---- the masking --------------------------------------------------------------------------------------
_LABELS = ("email", "cn_id", "card", "phone", "ip", "iban")
_LABEL = {name: i for i, name in enumerate(_LABELS)}
_PLACEHOLDER_LIST = [PII_PLACEHOLDERS[name] for name in _LABELS]
_KIND_LABEL = {"cn_id": _LABEL["cn_id"], "mobile": _LABEL["phone"], "mobile_": _LABEL["phone"],
               "phone10": _LABEL["phone"], "ip": _LABEL["ip"], "ip_": _LABEL["ip"]}
_NO_KIND, _CARD_SHAPED = -1, -2


def _group_labels(pattern: re.Pattern[bytes]) -> np.ndarray:
    """Label of each group index of the digit pass: a placeholder, _CARD_SHAPED, or _NO_KIND."""
    labels = np.full(pattern.groups + 1, _NO_KIND, np.int64)
    for name, index in pattern.groupindex.items():
        labels[index] = _KIND_LABEL.get(name, _CARD_SHAPED if name.startswith("card") else _NO_KIND)
    return labels


_DIGIT_PASS_LABELS = _group_labels(_DIGIT_PASS)
_LASTINDEX = operator.attrgetter("lastindex")


class _Masking:
    """The view the patterns read, and the spans masked so far (each reads as "[###]" to later passes)."""

    def __init__(self, text: str):
        self.text = text
        self.view = _view(text)
        self.data = self.view.tobytes()
        self.starts: list[np.ndarray] = []
        self.ends: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def mask(self, starts, ends, labels) -> None:
        starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
        if not starts.size:
            return
        self.starts.append(starts)
        self.ends.append(ends)
        self.labels.append(np.broadcast_to(np.asarray(labels, np.int64), starts.shape))
        view = self.view.copy()
        if starts.size < 256:
            for start, end in zip(starts.tolist(), ends.tolist()):
                view[start:end] = ord("#")
        else:  # spans do not overlap: a position is covered when more spans start than end up to it
            covered = np.cumsum(np.bincount(starts, minlength=len(view) + 1)
                                - np.bincount(ends, minlength=len(view) + 1))[:-1] > 0
            view[covered] = ord("#")
        view[starts] = ord("[")
        view[ends - 1] = ord("]")
        self.view, self.data = view, view.tobytes()

    def result(self) -> str:
        """The original text with every masked span replaced by its placeholder."""
        if not self.starts:
            return self.text
        starts, ends, labels = (np.concatenate(parts) for parts in (self.starts, self.ends, self.labels))
        order = np.argsort(starts, kind="stable")
        starts, ends, labels = starts[order], ends[order], labels[order]
        kept = list(map(slice, [0, *ends.tolist()], [*starts.tolist(), len(self.text)]))
        pieces = [""] * (2 * len(kept) - 1)
        pieces[0::2] = operator.itemgetter(*kept)(self.text)
        pieces[1::2] = map(_PLACEHOLDER_LIST.__getitem__, labels.tolist())
        return "".join(pieces)


def _windows(starts: np.ndarray, reach: int, length: int) -> list[tuple[int, int]]:
    """Merged windows [start, start + reach) around sorted possible match starts."""
    if not starts.size:
        return []
    ends = np.minimum(starts + reach, length)
    breaks = np.flatnonzero(starts[1:] > ends[:-1] + _MERGE_GAP) + 1
    return list(zip(starts[np.concatenate(([0], breaks))].tolist(),
                    ends[np.concatenate((breaks - 1, [len(ends) - 1]))].tolist()))


def _scan(pattern: re.Pattern[bytes], data: bytes, windows: list[tuple[int, int]], grouped: bool = True):
    """Starts, ends, group indices (lastindex; 0 when not `grouped`) and window indices of the matches that
    start inside the windows, as a scan of the whole text finds them: nothing with a kind starts outside
    the windows, and each window's scan reads _MARGIN past its end, more than any match with a kind and
    its lookahead read."""
    found, window_ends, counts = [], [], []
    for start, end in windows:
        matches = list(pattern.finditer(data, start, min(end + _MARGIN, len(data))))
        found += matches
        window_ends.append(end)
        counts.append(len(matches))
    spans = np.fromiter(itertools.chain.from_iterable(map(re.Match.span, found)), np.int64, 2 * len(found))
    starts, ends = spans[0::2], spans[1::2]
    groups = (np.fromiter(map(_LASTINDEX, found), np.int64, len(found)) if grouped
              else np.zeros(len(found), np.int64))
    window = np.repeat(np.arange(len(windows)), counts)
    inside = starts < np.repeat(np.array(window_ends, np.int64), counts)
    return starts[inside], ends[inside], groups[inside], window[inside]


def _mask_emails(masking: _Masking) -> None:
    if b"@" in masking.data and b"." in masking.data:  # every domain holds a dot
        starts, ends, _, _ = _scan(_EMAIL, masking.data, [(0, len(masking.data))], grouped=False)
        masking.mask(starts, ends, _LABEL["email"])


def _mask_ibans(masking: _Masking) -> None:
    """IBANs start at an uppercase letter that starts a word, followed by a letter and two digits."""
    padded = np.zeros(len(masking.view) + 4, np.uint8)
    padded[1:-3] = masking.view
    upper = (padded - 65).astype(np.uint8) < 26
    digit = _is_digit(padded)
    alnum = upper | digit | ((padded - 97).astype(np.uint8) < 26)
    can_start = upper[1:-3] & upper[2:-2] & digit[3:-1] & digit[4:] & ~alnum[:-4]
    windows = _windows(np.flatnonzero(can_start), _IBAN_REACH, len(masking.view))
    starts, ends, groups, _ = _scan(_IBAN_PASS, masking.data, windows)
    iban = groups == _IBAN_PASS.groupindex["iban"]
    starts, ends = starts[iban], ends[iban]
    valid = _iban_valid_spans(masking.view, starts, ends)
    masking.mask(starts[valid], ends[valid], _LABEL["iban"])


def _mask_plus86_mobiles(masking: _Masking) -> None:
    """+86 mobiles: "+86", an optional space or dash, 1[3-9]."""
    if b"+86" not in masking.data:
        return
    padded = np.zeros(len(masking.view) + 6, np.uint8)
    padded[:-6] = masking.view
    mobile_digit = (padded - 51).astype(np.uint8) < 7
    can_start = (padded[:-6] == ord("+")) & (padded[1:-5] == ord("8")) & (padded[2:-4] == ord("6")) & (
        ((padded[3:-3] == ord("1")) & mobile_digit[4:-2])
        | (_in(padded[3:-3], b" -") & (padded[4:-2] == ord("1")) & mobile_digit[5:-1]))
    windows = _windows(np.flatnonzero(can_start), 20, len(masking.view))
    starts, ends, _, _ = _scan(_PLUS86_MOBILE, masking.data, windows, grouped=False)
    masking.mask(starts, ends, _LABEL["phone"])


def _digit_kind_starts(runs: _DigitRuns) -> tuple[np.ndarray, np.ndarray]:
    """Which digit runs a kind of the digit pass can match at (a superset, read off each kind's pattern),
    as two masks over the runs: other kinds, and IPv4 addresses that nothing else can reach.
    Other kinds: 11 or 13 digits (a mobile), 13-19 (a card), 10, 15, 17 or 18 not after a letter (a bare
    10-digit phone, an ID card); a chain of groups joined by one space or dash holding 13+ digits from
    this one on, not after a dash (a card); 1[3-9]d or 86 followed by [ -]1 or 1 (a mobile).
    IPv4: 1-3 digits followed by a dot and not preceded by one, where no other kind can start, and no
    other kind starts earlier in its chain (a card or mobile could run into it, "1 2 ... 3 4.5.6.7")."""
    lengths, before, after = runs.lengths, runs.before, runs.after
    if not lengths.size:
        return np.zeros(0, bool), np.zeros(0, bool)
    space_or_dash_after = _in(after, b" -")
    joined = (runs.starts[1:] == runs.ends[:-1] + 1) & space_or_dash_after[:-1]  # to the next group
    chain_starts = np.flatnonzero(np.concatenate(([True], ~joined)))
    chain = np.cumsum(np.concatenate(([True], ~joined))) - 1
    digits_through = np.cumsum(lengths)
    chain_last = np.concatenate((chain_starts[1:] - 1, [len(lengths) - 1]))
    digits_from_here = digits_through[chain_last][chain] - digits_through + lengths
    letter_before = ((before | 0x20) - 97).astype(np.uint8) < 26
    mobile = (runs.first == ord("1")) & ((runs.second - 51).astype(np.uint8) < 7) & (lengths >= 3) | (
        (runs.first == ord("8")) & (runs.second == ord("6")) & (
            ((lengths == 2) & space_or_dash_after & (runs.after2 == ord("1"))
             & ((runs.after3 - 51).astype(np.uint8) < 7)) | ((lengths >= 4) & (runs.third == ord("1")))))
    other = ((lengths == 11) | (lengths == 13) | ((lengths >= 13) & (lengths <= 19))
             | (~letter_before & _in_lengths(lengths, (10, 15, 17, 18)))
             | ((before != ord("-")) & space_or_dash_after & (digits_from_here >= 13))
             | (mobile & ((lengths >= 10) | space_or_dash_after)))
    ip = (lengths <= 3) & (after == ord(".")) & (before != ord("."))
    other_through = np.cumsum(other)
    other_earlier_in_chain = other_through - other - (other_through - other)[chain_starts][chain] > 0
    alone = ip & ~other & ~other_earlier_in_chain
    return other | (ip & ~alone), alone


def _ip_addresses(runs: _DigitRuns, alone: np.ndarray) -> np.ndarray:
    """The first runs of the IPv4 addresses that start at the runs `alone` (see _digit_kind_starts), as
    _IP_MULTI and _IP_SINGLE match them: four groups joined by single dots, each 0-255 without a
    leading zero, the last not followed by a digit or a dot and a digit."""
    lengths = runs.lengths
    digit = [(byte.astype(np.int64) - 48) for byte in (runs.first, runs.second, runs.third)]
    value = np.where(lengths == 1, digit[0], np.where(lengths == 2, 10 * digit[0] + digit[1],
                                                         100 * digit[0] + 10 * digit[1] + digit[2]))
    octet = (lengths <= 3) & (value <= 255) & ((lengths == 1) | (runs.first != ord("0")))
    dot_joined = np.concatenate(((runs.starts[1:] == runs.ends[:-1] + 1) & (runs.after[:-1] == ord(".")), [False]))
    ends_address = octet & ~((runs.after == ord(".")) & _is_digit(runs.after2))
    first = np.flatnonzero(alone)
    first = first[first + 3 < len(lengths)]
    address = (octet[first] & dot_joined[first] & octet[first + 1] & dot_joined[first + 1] & octet[first + 2]
               & dot_joined[first + 2] & ends_address[first + 3])
    return first[address]


def _mask_digit_kinds(masking: _Masking, runs: _DigitRuns) -> None:
    """The digit pass: ID cards, mobiles, IPv4 addresses, cards and bare 10-digit phones, leftmost first,
    in that order at one position. IPv4 addresses nothing else can reach are checked all at once, and so
    are the Luhn sums of card-shaped spans in which nothing else can start; the others may hold other
    kinds or end inside one, and then the scan resumes after that kind."""
    scanned, alone = _digit_kind_starts(runs)
    ip_runs = _ip_addresses(runs, alone)
    scanned[ip_runs + 3] = False  # a last octet followed by a space could start a card; the address holds it
    ip_starts, ip_ends = runs.starts[ip_runs], runs.ends[ip_runs + 3]
    windows = _windows(runs.starts[scanned], _DIGIT_REACH, len(masking.data))
    starts, ends, labels = [], [], []
    _digit_pass_windows(masking, runs, windows, starts, ends, labels)
    starts, ends, labels = np.concatenate(starts), np.concatenate(ends), np.concatenate(labels)
    found_twice = np.isin(starts, ip_starts)  # a window around another kind's start covered it too
    masking.mask(np.concatenate((starts[~found_twice], ip_starts)), np.concatenate((ends[~found_twice], ip_ends)),
                 np.concatenate((labels[~found_twice], np.full(len(ip_starts), _LABEL["ip"]))))


def _digit_pass_windows(masking: _Masking, runs: _DigitRuns, windows, starts: list, ends: list, labels: list):
    data = masking.data
    start, end, group, window = _scan(_DIGIT_PASS, data, windows)
    label = _DIGIT_PASS_LABELS[group]
    card = label == _CARD_SHAPED
    only_a_card = card.copy()
    only_a_card[card] = _only_cards(masking.view, runs, start[card], end[card])
    kept = label >= 0
    kept[only_a_card] = _luhn_valid_spans(masking.view, start[only_a_card], end[only_a_card])
    label[only_a_card] = _LABEL["card"]
    dropped = np.zeros(len(start), bool)  # found by a scan that a kind running on past a span overtook
    extra_starts, extra_ends, extra_labels = [], [], []
    for i in np.flatnonzero(card & ~only_a_card).tolist():
        if dropped[i]:
            continue
        stop = _mask_card_shaped(data, int(start[i]), int(end[i]), extra_starts, extra_ends, extra_labels)
        if stop > end[i]:  # the rest of its window is scanned again from there
            dropped |= (window == window[i]) & (np.arange(len(start)) > i)
            window_end = windows[window[i]][1]
            if stop < window_end:
                _digit_pass_windows(masking, runs, [(stop, window_end)], starts, ends, labels)
    kept &= ~dropped
    starts += [start[kept], np.array(extra_starts, np.int64)]
    ends += [end[kept], np.array(extra_ends, np.int64)]
    labels += [label[kept], np.array(extra_labels, np.int64)]


def _only_cards(view: np.ndarray, runs: _DigitRuns, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For card-shaped spans: no kind masked before cards can start inside (a group of 10+ digits, or one
    that starts like a mobile, 1[3-9] or 86), at the start (a first group of exactly 10 digits: a bare
    10-digit phone) or at the end (a dot follows: an IPv4 address)."""
    first_run, last_run = np.searchsorted(runs.starts, starts), np.searchsorted(runs.ends, ends)
    may_start = ((runs.lengths >= 10) | ((runs.first == ord("1")) & ((runs.second - 51).astype(np.uint8) < 7))
                 | ((runs.first == ord("8")) & (runs.second == ord("6"))))
    may_start_through = np.concatenate(([0], np.cumsum(may_start)))
    inside = may_start_through[last_run + 1] - may_start_through[first_run + 1] > 0
    dot_after = view[np.minimum(ends, len(view) - 1)] == ord(".")
    dot_after &= ends < len(view)
    one_group = first_run == last_run
    return ~dot_after & (one_group | ~(inside | (runs.lengths[first_run] == 10)))


def _mask_card_shaped(data: bytes, start: int, end: int, starts: list, ends: list, labels: list) -> int:
    """Masks a card-shaped span data[start:end] that other kinds may start in (appending to the span
    lists) and returns where it stops (past `end` when a kind inside it runs on). Those kinds are looked
    for in the whole text, so lookarounds see the real neighbours."""
    inner = [found for found in _INSIDE_CARD.finditer(data, start, min(end + _INSIDE_CARD_REACH, len(data)))
             if not found.lastgroup.startswith("rest") and found.start() < end]
    if all(found.lastgroup == "phone10" for found in inner):  # nothing masked before cards
        if _luhn_valid(data[start:end], b" -"):
            starts.append(start), ends.append(end), labels.append(_LABEL["card"])
            return end
    elif _is_card(before := data[start:inner[0].start()].rstrip(b" -")):  # a card, then an ID card ...
        starts.append(start), ends.append(start + len(before)), labels.append(_LABEL["card"])
    kept = end
    for found in inner:
        starts.append(found.start()), ends.append(found.end()), labels.append(_KIND_LABEL[found.lastgroup])
        kept = found.end()
    return max(kept, end)


def _is_card(text: bytes) -> bool:
    return bool(_CARD_DIGITS.fullmatch(text)) and _luhn_valid(text, b" -")


def _phone_ends(runs: _DigitRuns) -> np.ndarray:
    """Where a phone number can end: after a group of 2-8 digits right behind one space, dot or dash
    that follows a digit, not followed by a letter, digit, "_" or a dot or dash and a digit."""
    after = runs.after
    if not after.size:
        return runs.ends
    letter = ((after | 0x20) - 97).astype(np.uint8) < 26
    separated = np.concatenate(([False], runs.starts[1:] == runs.ends[:-1] + 1)) & _in(runs.before, b" .-")
    can_end = ((runs.lengths >= 2) & (runs.lengths <= 8) & separated & ~letter & (after != ord("_"))
               & ~(_in(after, b".-") & _is_digit(runs.after2)))
    return runs.ends[can_end]


def _mask_phones(masking: _Masking, runs: _DigitRuns) -> None:
    """Phone numbers: 7-15 digits, and not a date (2024-05-01)."""
    phone_ends = _phone_ends(runs)
    windows = _windows(np.maximum(phone_ends - _PHONE_REACH, 0), _PHONE_REACH + 1, len(masking.data))
    starts, ends, groups, _ = _scan(_PHONE_PASS, masking.data, windows)
    phone = groups == _PHONE_PASS.groupindex["phone"]
    starts, ends = starts[phone], ends[phone]
    digits_before = np.concatenate(([0], np.cumsum(_is_digit(masking.view), dtype=np.int64)))
    digits = digits_before[ends] - digits_before[starts]
    phone = (digits >= 7) & (digits <= 15)
    maybe_date = phone & (digits <= 8) & _in(masking.view[np.minimum(starts + 4, len(masking.view) - 1)], b"-./")
    for i in np.flatnonzero(maybe_date).tolist():
        phone[i] = not _DATE.fullmatch(masking.data, int(starts[i]), int(ends[i]))
    masking.mask(starts[phone], ends[phone], _LABEL["phone"])


def mask_pii(text: str) -> str:
    """Replace emails, IBANs, Chinese ID-card numbers (18 and legacy 15 digits), Chinese mobiles, IPv4
    addresses, Luhn-valid bank cards, bare 10-digit and other phone numbers with placeholders like
    [EMAIL], in ASCII and in other digit forms (full-width ０-９ and every Unicode decimal digit). Linear
    in the text length with a small constant on any input (benchmarks/pii_masking.py). Order matters:
    an IBAN holds digit groups, an ID card would also look like a phone or a card, an IPv4 address looks
    like a dotted phone number."""
    masking = _Masking(text)
    _mask_emails(masking)
    if not _is_digit(masking.view).any():
        return masking.result()  # every other kind holds digits
    _mask_ibans(masking)
    _mask_plus86_mobiles(masking)
    _mask_digit_kinds(masking, _DigitRuns(masking.view))
    _mask_phones(masking, _DigitRuns(masking.view))
    return masking.result()


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
